"""``GradientStatsMonitor``: per-parameter gradient statistics, parameter norms and update ratios."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn.parameter import is_lazy

from lightwatch.checks import gradient as checks
from lightwatch.checks.causal_mask import LEAK_MAX, FutureLeakProbe
from lightwatch.checks.structure import ModelStructure, batchnorm_mode_finding, owners_of
from lightwatch.core.lightning import bind, default_package
from lightwatch.core.alerts import check_severity
from lightwatch.core.callback import MonitorCallback
from lightwatch.core.gc_pause import gc_paused
from lightwatch.core.gradient_reader import (GradientReader, WeightSnapshot, fused_norms, group_norms, group_stats,
                                             ring_summary)
from lightwatch.core.histogram import HIST_BINS, decode_histogram_row
from lightwatch.core.readback import HostReadback
from lightwatch.core.reduce import all_reduce_flat
from lightwatch.core.runtime import (is_sharded_strategy, learning_rates, local_tensor, local_tensors, logging_step,
                                     lr_rising)
from lightwatch.core.selection import Selection, top_k_subjects

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["GradientStatsMonitor"]

# the keys of `group_stats`' rows, split once into the family and the stat of their tags
_STAT_KEYS = [(k, *k.split(".")) for k in ("grad.norm", "grad.absmax", "grad.nonfinite", "param.norm",
                                            "param.update_ratio")]

_GROUPINGS = ("parameter", "module")
_WEIGHT_LAYERS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
# The per-step norms of one interval live in a device ring of this many entries at most: with a longer interval
# `norm_max` and `nonfinite_steps` cover its last steps only, and memory stays bounded whatever the interval.
_RING_MAX = 4096
class _GradientStatsMonitor(MonitorCallback):
    """Gradient and parameter statistics per parameter (or per module), written to TensorBoard.

    On sampled steps (every ``every_n_steps``) it reads the gradients in ``on_before_optimizer_step``, after
    accumulation, AMP unscaling and the DDP all-reduce, and writes, per selected parameter:

    - ``monitor.grad/<name>/norm``, ``absmax``, ``nonfinite`` (number of NaN/Inf gradient values);
    - ``monitor.param/<name>/norm`` (after the step) and ``update_ratio`` = ‖w_after − w_before‖ / ‖w_before‖;
    - ``monitor.grad/_total/norm`` and, from a norm kept on the device every step,
      ``monitor.grad/_total/norm_max`` (largest global norm in the interval, so a spike between samples is not
      lost) and ``monitor.grad/_total/nonfinite_steps``;
    - histograms ``monitor.grad_hist/<name>`` and ``monitor.param_hist/<name>`` every
      ``histogram_every_n_steps``.

    Other steps cost one fused norm of all gradients on the device (``norm_every_step``; by default only when
    the gradients live on an accelerator, see below), no host sync, no
    collective and no write. Under DDP the gradients are already reduced, so no collective is made; under
    FSDP each rank sums its shard and one SUM plus one MAX all-reduce of a flat buffer gives exact norms.
    A non-finite gradient raises the alert ``grad_nonfinite`` naming the parameters.

    Diagnoses (``diagnose=True``; what each observes, when, and its threshold with the healthy range measured
    across the calibration corpus: :mod:`lightwatch.checks.gradient`, ``docs/diagnoses.md``): at fit start
    ``init_zero``, ``init_large``, ``frozen_parameters`` (info) and ``frozen_at_init``; in the first steps
    ``grad_stale`` (a forgotten ``zero_grad``); at step 0 ``grad_missing`` (info), ``param_not_in_optimizer``,
    ``batchnorm_eval``, ``update_ratio_high`` (a first step that moves the median weight tensor by over 30%)
    and, for next-token objectives, ``future_leak`` (:mod:`lightwatch.checks.causal_mask`); at the first
    sampled step after step 0 (after a warmup's rise) ``update_ratio_high`` / ``update_ratio_low``; at every
    sampled step ``grad_vanishing``.

    Args:
        every_n_steps: sampling interval; ``None`` follows ``Trainer(log_every_n_steps)``.
        include: regexes on parameter names to watch (``None``: all trainable parameters).
        exclude: regexes on parameter names to leave out.
        module_types: watch only parameters of these module types (classes or class names).
        group_by: ``"parameter"`` (one series per tensor) or ``"module"`` (norms combined per owning module).
        top_k: write only the ``k`` subjects with the largest gradient norm each sampled step (non-finite
            ones always), so a 1,000-layer model does not write 10,000 series; ``None`` writes all.
        histogram_every_n_steps: histogram interval; ``None`` = 10 sampling intervals, ``0`` = off.
        norm_every_step: keep the global gradient norm on the device every step for ``norm_max``. ``None``
            (default): on when the gradients live on an accelerator, where one more read of them is a small
            fraction of a step; off on the CPU, where it is a full memory pass over the gradients (measured
            +7% of the step on the deep-MLP benchmark).
        track_update_ratio: measure ‖Δw‖/‖w‖ on sampled steps. Between ``on_before_optimizer_step`` and
            ``on_train_batch_end`` of a sampled step it keeps a copy of about 1% of each selected weight's
            elements (at least 1,024; small tensors whole), not of the weights: the ratio of a large tensor is
            an estimate within a few percent (:class:`~lightwatch.core.gradient_reader.WeightSnapshot`).
        nonfinite_action: action for ``grad_nonfinite`` (``log``, ``warn``, ``stop``, ``raise``, ...).
        nonfinite_severity: severity of ``grad_nonfinite``.
        diagnose: run the fault diagnoses (see "Diagnoses" above).
        prefix: first part of every tag.
        alert_cooldown_steps: at most one record per alert rule and subject in this many steps.
        check_first_step: also sample step 0 of a fresh fit, so the diagnoses see the initialised model before
            the first optimizer step (one extra sampled step per fit).
        skip_diagnoses: names of diagnoses to switch off where a finding is intended in this run (for example
            ``["frozen_at_init"]`` for a layer that is a fixed random projection on purpose); the others stay on.

    Example:
        >>> from lightwatch.callbacks import GradientStatsMonitor
        >>> monitor = GradientStatsMonitor(every_n_steps=10, exclude=[r"\\.bias$"], top_k=20)
        >>> monitor.every_n_steps
        10
    """

    DIAGNOSES = ("init_zero", "init_large", "frozen_parameters", "frozen_at_init", "grad_stale", "grad_missing",
                 "param_not_in_optimizer", "batchnorm_eval", "future_leak", "update_ratio_high", "update_ratio_low",
                 "grad_vanishing")

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        module_types: Optional[Sequence[str]] = None,
        group_by: str = "parameter",
        top_k: Optional[int] = None,
        histogram_every_n_steps: Optional[int] = None,
        norm_every_step: Optional[bool] = None,
        track_update_ratio: bool = True,
        nonfinite_action: str = "warn",
        nonfinite_severity: str = "error",
        diagnose: bool = True,
        prefix: str = "monitor",
        alert_cooldown_steps: int = 100,
        check_first_step: bool = True,
        skip_diagnoses: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(every_n_steps, histogram_every_n_steps, prefix, alert_cooldown_steps, check_first_step)
        where = "GradientStatsMonitor"
        if group_by not in _GROUPINGS:
            raise ValueError(f"{where}: group_by must be one of {_GROUPINGS}, got {group_by!r}.")
        if top_k is not None and (int(top_k) != top_k or top_k < 1):
            raise ValueError(f"{where}: top_k must be a positive integer or None, got {top_k!r}.")
        self.selection = Selection(include, exclude, module_types, where=where)
        self.group_by = group_by
        self.top_k = None if top_k is None else int(top_k)
        self.norm_every_step = norm_every_step
        self.track_update_ratio = bool(track_update_ratio)
        self.nonfinite_action = self.check_action(nonfinite_action, f"{where}(nonfinite_action=...)")
        self.nonfinite_severity = check_severity(nonfinite_severity, f"{where}(nonfinite_severity=...)")
        self._names: List[str] = []
        self._params: List[torch.nn.Parameter] = []
        self._all_params: List[torch.nn.Parameter] = []
        self._groups: List[Tuple[str, List[int]]] = []
        self._tags_of: Dict[str, List[Tuple[str, str]]] = {}  # subject -> its (tag, statistic) pairs
        self._sharded = False
        self._ring: Optional[torch.Tensor] = None
        self._stats_step: Optional[int] = None
        self._grad_stats: Optional[torch.Tensor] = None
        self._grad_hist: Optional[torch.Tensor] = None
        self._snapshot = WeightSnapshot()
        self.diagnose = bool(diagnose)
        self.set_skip_diagnoses(skip_diagnoses)
        self._norm_every_step = bool(norm_every_step)
        self._weight_layers: List[int] = []
        self._checks_done = 0
        self._update_check = checks.UpdateRatioCheck()
        self._matrices: List[int] = []
        self._lrs: Optional[List[float]] = None  # learning rates at the previous check (a warmup defers ratio_low)
        # per selected parameter, whether the optimizer stepped at the first reading holds it: under manual
        # optimisation with several optimizers (a GAN), a parameter of another optimizer has no gradient by design
        self._stepped: Optional[List[bool]] = None
        self._in_optimizer: Optional[List[bool]] = None  # per selected parameter: held by some optimizer
        self._batchnorm_checked = False
        self._leak_probe: Optional[FutureLeakProbe] = None  # set for the first batch of a fresh fit only
        self._stale_checks_left = 3
        # grad_stale flags: read at once on the CPU, one step late on CUDA (no host sync in the step itself)
        self._stale_readback: HostReadback = HostReadback()
        self._stale_reported = False
        self._reader = GradientReader([])
        self._readback: HostReadback = HostReadback()

    @property
    def _ring_size(self) -> int:
        return min(self.interval, _RING_MAX)

    @property
    def _ring_packed(self) -> int:
        """Entries of the ring in a packed buffer: none when the per-step norm is off."""
        return self._ring_size if self._norm_every_step else 0

    # ------------------------------------------------------------------------------------ setup
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._resolve(trainer, pl_module)  # here for the errors: a selection that matches nothing fails early

    def _resolve(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The selected parameters and every device-dependent choice.

        Done again at fit start: ``setup`` runs before the strategy moves the model to its device and wraps it
        (FSDP replaces parameters), so only then are the parameters and their device the final ones.
        """
        selected = self.selection.parameters(pl_module)
        self._names = [n for n, _ in selected]
        self._params = [p for _, p in selected]
        self._all_params = [p for p in pl_module.parameters() if p.requires_grad]
        if self.group_by == "module":
            groups: Dict[str, List[int]] = {}
            for i, name in enumerate(self._names):
                groups.setdefault(name.rpartition(".")[0] or name, []).append(i)
            self._groups = list(groups.items())
        else:
            self._groups = [(n, [i]) for i, n in enumerate(self._names)]
        owners = owners_of(pl_module)
        # weights of Linear/Conv layers in registration order: the layers the diagnoses compare
        self._weight_layers = [i for i, n in enumerate(self._names)
                               if n.endswith("weight") and isinstance(owners.get(n), _WEIGHT_LAYERS)]
        # every weight tensor (biases and norm scales left out) for the all-weight update ratio; sharded flat
        # parameters (1-D) fall back to the Linear/Conv weights
        self._matrices = [i for i, p in enumerate(self._params) if not is_lazy(p) and local_tensor(p).dim() >= 2] \
            or list(self._weight_layers)
        self._sharded = is_sharded_strategy(trainer)
        on_accelerator = bool(self._params) and self._params[0].device.type != "cpu"
        self._norm_every_step = on_accelerator if self.norm_every_step is None else bool(self.norm_every_step)
        self._reader = GradientReader(self._params)
        self._ring = None

    # ------------------------------------------------------------------------------- hot path
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: torch.optim.Optimizer) -> None:
        step = logging_step(trainer)
        if self._stats_step == step:  # several optimizers in one step: the gradients were read already
            return
        if self._norm_every_step:
            grads = local_tensors([p.grad for p in self._all_params if p.grad is not None])
            if grads:
                if self._ring is None:
                    self._ring = torch.zeros(self._ring_size, device=grads[0].device, dtype=torch.float32)
                self._ring[step % self._ring_size] = fused_norms(grads).square().sum()
        if not self.sampled or not self._params:
            return
        self._stats_step = step
        if self.diagnose and not self._batchnorm_checked:
            self._batchnorm_checked = True
            if getattr(pl_module, "training", True):
                self.raise_finding(trainer, pl_module, batchnorm_mode_finding(pl_module, step))
        if self._stepped is None:
            held = {id(p) for group in getattr(optimizer, "param_groups", ()) for p in group.get("params", ())}
            self._stepped = [id(p) in held for p in self._params] if held else [True] * len(self._params)
        with gc_paused():
            self._grad_stats = self._reader.gradient_rows()
            self._grad_hist = (self._reader.histogram_rows(p.grad for p in self._params) if self.histogram_step
                               else None)
            if self.track_update_ratio:
                self._snapshot.take(self._params)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        # future_leak: once, on the first batch of a fresh fit (not under a sharded strategy, where a submodule
        # cannot run outside the root's forward)
        # (`batch_idx` first: every later batch stops there, before the trainer's step property is read)
        if (batch_idx == 0 and self.diagnose and "future_leak" not in self.skip_diagnoses and not self._sharded
                and int(getattr(trainer, "global_step", 0)) == 0 and self._leak_probe is None):
            probe = FutureLeakProbe()
            if probe.start(pl_module, batch):
                self._leak_probe = probe

    def _finish_leak_probe(self, trainer: Any, pl_module: Any) -> None:
        probe, self._leak_probe = self._leak_probe, None
        leak = probe.finish() if probe is not None else None
        if leak is None:
            return
        step = int(getattr(trainer, "global_step", 0))
        self.writer.write_scalars(trainer, {self.writer.tag("diag", "future_leak", "ratio"): leak}, step)
        where = next((n for n, m in pl_module.named_modules() if m is probe.module), "") or "the module"
        self.raise_finding(trainer, pl_module, checks.future_leak_finding(where, leak, LEAK_MAX, step))

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._leak_probe is not None:  # no backward ran (a manual step that skipped it)
            self._finish_leak_probe(trainer, pl_module)
        if self._readback.pending:  # values of an earlier sampled step, read one step late on CUDA
            self._publish(trainer, pl_module)
        if self._stale_readback.pending and self._stale_readback.oldest_meta()[0] < logging_step(trainer):
            self._check_stale(trainer, pl_module)
        if not self.sampled or self._grad_stats is None or self._stats_step != logging_step(trainer):
            return
        with gc_paused(), torch.no_grad():
            packed = self._pack()
        self._readback.submit(packed, logging_step(trainer))
        if not HostReadback.deferred(packed):
            self._publish(trainer, pl_module)

    def _pack(self) -> torch.Tensor:
        """One flat buffer: SUM part (squares and counts), MAX part, then histograms."""
        params = local_tensors(self._params)  # read under no_grad: no detach needed
        p_norm_sq = self._reader.parameter_norms(params).square()
        if self._snapshot.pending:
            before_sq, delta_sq = self._snapshot.norms_sq(self._params)
        else:
            delta_sq = before_sq = torch.full_like(p_norm_sq, float("nan"))
        g = self._grad_stats
        ring = self._ring if self._ring is not None else torch.zeros(self._ring_packed, device=g.device)
        sum_part = torch.cat([g[0], g[2], g[3], p_norm_sq, delta_sq, before_sq, ring])
        max_part = g[1].clone()
        if self._sharded:
            all_reduce_flat(sum_part, max_part)
        parts = [sum_part, max_part]
        if self._grad_hist is not None:
            parts += [self._grad_hist.reshape(-1), self._reader.histogram_rows(params).reshape(-1)]
        if self._ring is not None:
            self._ring.zero_()
        self._grad_stats = self._grad_hist = None
        return torch.cat(parts)

    # --------------------------------------------------------------------------- host side
    def _publish(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        with gc_paused():  # a few objects per parameter and scalar: see lightwatch.core.gc_pause
            for values, step in self._readback.collect():
                self._write(trainer, pl_module, values, step)

    def _write(self, trainer: Any, pl_module: Any, values: List[float], step: int) -> None:
        n = len(self._params)
        cols = [values[i * n:(i + 1) * n] for i in range(6)]
        grad_sq, nonfinite, present, p_sq, delta_sq, before_sq = cols
        offset = 6 * n
        ring = values[offset:offset + self._ring_packed]
        offset += self._ring_packed
        absmax = values[offset:offset + n]
        offset += n
        # the groups written (the largest norms, every non-finite one) are picked first: only they get a row
        norms = group_norms(self._groups, grad_sq, nonfinite, present)
        flagged: List[str] = []
        total_bad = 0.0
        for name, norm, bad in norms:
            if bad != 0 or not math.isfinite(norm):
                flagged.append(name)
                total_bad += bad
        keep = set(top_k_subjects([n for n, _, _ in norms], [v for _, v, _ in norms], self.top_k, always=flagged))
        groups = self._groups if len(keep) == len(norms) else [g for g in self._groups if g[0] in keep]
        subjects = group_stats(groups, grad_sq, absmax, nonfinite, present, p_sq, before_sq, delta_sq)

        scalars: Dict[str, float] = {}
        total_sq = sum(grad_sq[i] for i in range(n) if present[i])
        scalars[self.writer.tag("grad", "_total", "norm")] = math.sqrt(total_sq)
        if self._norm_every_step and self._ring is not None:
            norm_max, nonfinite_steps = ring_summary(ring)
            scalars[self.writer.tag("grad", "_total", "norm_max")] = norm_max
            scalars[self.writer.tag("grad", "_total", "nonfinite_steps")] = nonfinite_steps
        tags_of = self._tags_of
        for name, stats in subjects:
            if name not in keep:
                continue
            pairs = tags_of.get(name)
            if pairs is None:  # a subject's (tag, statistic) pairs, built at its first write
                pairs = tags_of[name] = [(self.writer.tag(family, name, stat), key) for key, family, stat in _STAT_KEYS
                                         if stat != "update_ratio" or self.track_update_ratio]
            for tag, key in pairs:
                scalars[tag] = stats[key]
        # the readings the diagnoses judge, so their healthy range can be read back from any run
        moves = checks.update_ratios(self._matrices, present, before_sq, delta_sq) if self.track_update_ratio else []
        overall = checks.overall_update_ratio(moves, before_sq, delta_sq) if step > 0 else None
        if overall is not None:
            scalars[self.writer.tag("diag", "update_ratio", "all_layers")] = overall
        typical = checks.median_update(moves)
        if typical is not None:
            # step 0's median is judged against its own, higher threshold (Adam's first step is sign-like)
            scalars[self.writer.tag("diag", "update_ratio", "median" if step > 0 else "first_step")] = typical[0]
        depth = checks.depth_ratio([i for i in self._weight_layers if present[i]], grad_sq)
        if depth is not None:
            scalars[self.writer.tag("diag", "grad_depth", "ratio")] = depth[0]
        self.writer.write_scalars(trainer, scalars, step)

        if len(values) > offset:
            width = 6 + HIST_BINS
            hists = {}
            for family, base in (("grad_hist", offset), ("param_hist", offset + n * width)):
                for name, idx in self._groups:
                    if name not in keep:
                        continue
                    i = idx[0]  # per-module grouping: the histogram of the module's first parameter
                    row = values[base + i * width: base + (i + 1) * width]
                    hists[self.writer.tag(family, name)] = decode_histogram_row(row)
            self.writer.write_histograms(trainer, hists, step)

        if self.diagnose:
            self._diagnose_step(trainer, pl_module, step, present, moves, depth)
        self.raise_finding(trainer, pl_module, checks.nonfinite_gradient_finding(
            flagged, total_bad, self.nonfinite_severity, self.nonfinite_action, step))

    # ----------------------------------------------------------------------------- diagnoses
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._resolve(trainer, pl_module)
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        held = {id(p) for opt in optimizers for group in getattr(opt, "param_groups", ()) for p in group.get("params", ())}
        # under FSDP the optimizers hold the sharded flat parameters, not the ones selected here
        self._in_optimizer = [id(p) in held for p in self._params] if optimizers and not self._sharded else None
        if not self.diagnose or int(getattr(trainer, "global_step", 0)) > 0:  # resumed: weights are trained
            self._batchnorm_checked = True
            return
        structure = ModelStructure(pl_module, self._names, self._params, self._weight_layers, self._sharded)
        for finding in structure.fit_start_findings(check_frozen_at_init="frozen_at_init" not in self.skip_diagnoses):
            self.raise_finding(trainer, pl_module, finding)

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        if self._leak_probe is not None:  # the first forward pass has run: the call that read the tokens is known
            self._finish_leak_probe(trainer, pl_module)
        # A static check of the first steps only: gradients left over from the previous step mean zero_grad
        # is never called. Inside an accumulation window they are expected, so only a window's start counts.
        if not self.diagnose or self._stale_checks_left <= 0 or not getattr(pl_module, "automatic_optimization",
                                                                            True):
            return
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        if trainer.fit_loop.epoch_loop.batch_progress.current.ready % accumulate != 1 % accumulate:
            return
        self._stale_checks_left -= 1
        step = int(getattr(trainer, "global_step", 0))
        if step == 0:
            return
        present = [i for i, p in enumerate(self._params) if p.grad is not None]
        if not present:
            return
        # one fused norm per gradient: non-zero (or NaN) means the gradient survived the previous step
        flags = fused_norms([local_tensor(self._params[i].grad.detach()) for i in present]).ne(0).float()
        self._stale_readback.submit(flags, (step, present))
        if not HostReadback.deferred(flags):
            self._check_stale(trainer, pl_module)

    def _check_stale(self, trainer: Any, pl_module: Any) -> None:
        for flags, (step, present) in self._stale_readback.collect():
            stale = [self._names[i] for i, flag in zip(present, flags) if flag]
            if not stale or self._stale_reported:
                continue
            self._stale_reported, self._stale_checks_left = True, 0
            self.raise_finding(trainer, pl_module, checks.stale_gradient_finding(stale, step))

    def _diagnose_step(self, trainer: Any, pl_module: Any, step: int, present: List[float],
                       ratios: List[Tuple[float, int]], depth: Optional[Tuple[float, int]]) -> None:
        """The diagnoses of one reading; ``ratios`` and ``depth`` are what ``_write`` logged."""
        self._checks_done += 1
        if self._checks_done == 1:
            stepped = self._stepped or [True] * len(self._names)
            missing = [n for n, p, s in zip(self._names, present, stepped) if not p and s]
            self.raise_finding(trainer, pl_module, checks.missing_gradient_finding(missing, step))
            if self._in_optimizer is not None:
                orphans = [n for n, p, held in zip(self._names, present, self._in_optimizer) if p and not held]
                self.raise_finding(trainer, pl_module, checks.orphan_finding(orphans, step))
        lrs = learning_rates(trainer)
        warming_up, self._lrs = lr_rising(self._lrs, lrs), lrs
        self.raise_finding(trainer, pl_module, self._update_check.judge(step, ratios, warming_up, self._names))
        layers = [i for i in self._weight_layers if present[i]]
        if depth is not None:
            self.raise_finding(trainer, pl_module, checks.vanishing_finding(depth, self._names[layers[0]], step))

    # ------------------------------------------------------------------------------------ end
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._stale_readback.pending:
            self._check_stale(trainer, pl_module)
        if self._readback.pending:
            self._publish(trainer, pl_module)


#: The class to add to ``Trainer(callbacks=[...])``: the implementation above bound to the installed
#: Lightning package (``pytorch_lightning``, else ``lightning.pytorch``; ``lightwatch.lightning`` binds it to
#: the latter).
GradientStatsMonitor = bind(_GradientStatsMonitor, default_package(), "callback", module=__name__)
