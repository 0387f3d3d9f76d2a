"""``GradientStatsMonitor``: per-parameter gradient statistics, parameter norms and update ratios."""
from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn.parameter import is_lazy

from lightwatch.core.lightning import bind, default_package
from lightwatch.core.alerts import check_severity
from lightwatch.core.callback import MonitorCallback
from lightwatch.core.histogram import HIST_BINS, decode_histogram_row, histogram_row
from lightwatch.core.init_signature import copies, fingerprints, uniform_init_votes
from lightwatch.core.readback import HostReadback
from lightwatch.core.reduce import agree_max, all_reduce_flat
from lightwatch.core.runtime import is_sharded_strategy, learning_rates, local_tensor, logging_step, lr_rising
from lightwatch.core.selection import Selection, top_k_subjects

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["GradientStatsMonitor"]

_GROUPINGS = ("parameter", "module")
_WEIGHT_LAYERS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
# The per-step norms of one interval live in a device ring of this many entries at most: with a longer interval
# `norm_max` and `nonfinite_steps` cover its last steps only, and memory stays bounded whatever the interval.
_RING_MAX = 4096
# update_ratio_high: the median over the weight tensors of ||dW|| / ||W||, at the first check after step 0 (a warmup
# too: with Adam a rate far too high moves every weight ~20% a step early, then the weights' norms grow and the
# ratio falls, so a later check would miss it). Healthy runs: at most 0.046 across the calibration corpus's families (the fault suite: 0.058 for the
# fastest layer); a learning rate x100: at least 0.19 in every layer. Single layers of healthy recipes read up to
# 0.37 (a fresh head of small norm: torchvision resnet18's fc with SGD momentum, an LSTM LM's decoder with SGD at
# lr 20), so one fast layer alone is `info`.
_RATIO_HIGH = 0.1
# grad_vanishing: the first quarter of the weight layers (its largest gradient norm) over the median layer's.
# Healthy across the calibration families: >= 0.06 (a GAN's generator, 6 layers); the fault suite's 10 sigmoid
# layers: 3.5e-4 to 5.2e-4. 5e-3 sits between, geometrically (x12 / x10).
_VANISHING = 5e-3
_RATIO_MIN_TENSORS = 3  # the median needs this many weight tensors; with fewer one layer's own scale decides


def _median_of(moves: List[Tuple[float, int]]) -> Optional[Tuple[float, int]]:
    """The median update ratio over the weight tensors (at least 3), and their count; else None."""
    if len(moves) < _RATIO_MIN_TENSORS:
        return None
    return statistics.median(r for r, _ in moves), len(moves)


def owners_of(module: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """Parameter name -> the module that holds it."""
    return {f"{m}.{p}" if m else p: mod for m, mod in module.named_modules()
            for p, _ in mod.named_parameters(recurse=False)}


def _norms(tensors: List[torch.Tensor], order: float = 2.0) -> torch.Tensor:
    """Norms of many tensors in one fused call, as one float32 vector.

    ``dtype=float32`` is only asked for when some tensor is not float32: it takes a slower path otherwise.
    """
    if all(t.dtype == torch.float32 for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, order))
    return torch.stack(torch._foreach_norm(tensors, order, dtype=torch.float32))


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

    Diagnoses (``diagnose=True``), with thresholds set on the fault suite (``bench/faults``) and checked on the
    calibration corpus of third-party model families (``bench/calibration``; healthy range in brackets): at
    fit start, ``init_zero`` / ``init_large`` when a Linear/Conv weight's variance times its fan-in is below
    1e-6 or above 20 (default inits give 0.33-2) or an embedding is all zeros, ``frozen_parameters`` (info),
    and ``frozen_at_init`` (warning) for frozen tensors of at least 1,024 values that still read as a fresh
    uniform random initialisation (a statistical test, :mod:`lightwatch.core.init_signature`; pretrained layers
    are not uniform, so fine-tuning stays quiet); in the first three steps, ``grad_stale`` when gradients are
    non-zero before backward at the start of an accumulation window (a forgotten ``zero_grad``; error); at the
    first sampled step (step 0, the model as initialised, with ``check_first_step``), ``grad_missing`` (info)
    for parameters of the optimizer being stepped without a gradient, ``param_not_in_optimizer`` (warning) for
    parameters with a gradient that no optimizer holds, and ``batchnorm_eval`` for BatchNorm layers in eval
    mode during training (warning with running statistics never collected, else info); at the first sampled
    step after step 0, ``update_ratio_high`` when the median over the weight tensors moves more than 10% in
    one step ([0, 0.046] across the calibration families; warning; one fast layer alone is info),
    ``update_ratio_low`` when even the fastest moves below 0.3% (info: fine-tuning legitimately moves weights
    slowly; warning below 0.01%, where nothing learns); and at any sampled step, step 0 included,
    ``grad_vanishing`` when the largest gradient norm of the first quarter of the weight layers is below 5e-3
    of the median layer's ([0.06, ...]; warning). While the learning rate is rising (a warmup) small updates
    are the intent, so ``update_ratio_low`` waits for the first check after the rise. A step-0 update above
    10% followed by no movement at all (< 0.01%) at the
    first check is ``update_ratio_high``: the first steps killed the network, which is not a rate too low.

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
        track_update_ratio: measure ‖Δw‖/‖w‖ on sampled steps (keeps a copy of the selected parameters
            between ``on_before_optimizer_step`` and ``on_train_batch_end`` of sampled steps only).
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
                 "param_not_in_optimizer", "batchnorm_eval", "update_ratio_high", "update_ratio_low",
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
        self._sharded = False
        self._ring: Optional[torch.Tensor] = None
        self._stats_step: Optional[int] = None
        self._grad_stats: Optional[torch.Tensor] = None
        self._grad_hist: Optional[torch.Tensor] = None
        self._before: Optional[List[torch.Tensor]] = None
        self.diagnose = bool(diagnose)
        self.set_skip_diagnoses(skip_diagnoses)
        self._norm_every_step = bool(norm_every_step)
        self._weight_layers: List[int] = []
        self._checks_done = 0
        self._ratio_checked = False
        self._matrices: List[int] = []
        self._lrs: Optional[List[float]] = None  # learning rates at the previous check (a warmup defers ratio_low)
        self._first_update: Optional[Tuple[float, int]] = None  # largest update ratio of step 0, and its weight
        # per selected parameter, whether the optimizer stepped at the first reading holds it: under manual
        # optimisation with several optimizers (a GAN), a parameter of another optimizer has no gradient by design
        self._stepped: Optional[List[bool]] = None
        self._in_optimizer: Optional[List[bool]] = None  # per selected parameter: held by some optimizer
        self._batchnorm_checked = False
        self._stale_checks_left = 3
        # grad_stale flags: read at once on the CPU, one step late on CUDA (no host sync in the step itself)
        self._stale_readback: HostReadback = HostReadback()
        self._stale_reported = False
        self._counts_on_device = False
        self._index_cache: Optional[Tuple[Tuple[int, ...], torch.Tensor]] = None
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
        self._counts_on_device = bool(self._params) and self._params[0].device.type == "cuda"
        self._ring = None

    # ------------------------------------------------------------------------------- hot path
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: torch.optim.Optimizer) -> None:
        step = logging_step(trainer)
        if self._stats_step == step:  # several optimizers in one step: the gradients were read already
            return
        if self._norm_every_step:
            grads = [local_tensor(p.grad) for p in self._all_params if p.grad is not None]
            if grads:
                if self._ring is None:
                    self._ring = torch.zeros(self._ring_size, device=grads[0].device, dtype=torch.float32)
                self._ring[step % self._ring_size] = _norms(grads).square().sum()
        if not self.sampled or not self._params:
            return
        self._stats_step = step
        if self.diagnose and not self._batchnorm_checked:
            self._batchnorm_checked = True
            self._check_batchnorm_mode(trainer, pl_module, step)
        if self._stepped is None:
            held = {id(p) for group in getattr(optimizer, "param_groups", ()) for p in group.get("params", ())}
            self._stepped = [id(p) in held for p in self._params] if held else [True] * len(self._params)
        self._grad_stats = self._gradient_rows()
        self._grad_hist = self._histogram_rows(p.grad for p in self._params) if self.histogram_step else None
        if self.track_update_ratio:
            self._before = [local_tensor(p.detach()).clone() for p in self._params]

    def _gradient_rows(self) -> torch.Tensor:
        """[4, P]: squared norm, absmax, non-finite count, present flag of each selected gradient."""
        device = self._params[0].device
        rows = torch.zeros(4, len(self._params), device=device, dtype=torch.float32)
        present = [i for i, p in enumerate(self._params) if p.grad is not None]
        if not present:
            return rows
        grads = [local_tensor(self._params[i].grad.detach()) for i in present]
        index = self._index(present, device)
        norms = _norms(grads)
        if device.type == "cuda":
            absmax = _norms(grads, float("inf"))
        else:  # on the CPU ord=inf is ~10x slower than one aminmax pass
            extremes = [torch.aminmax(g) if g.numel() else (g.new_zeros(()), g.new_zeros(())) for g in grads]
            absmax = torch.maximum(torch.stack([lo for lo, _ in extremes]).float().neg(),
                                   torch.stack([hi for _, hi in extremes]).float())
        rows[0].index_copy_(0, index, norms.square())
        rows[1].index_copy_(0, index, absmax)
        if self._counts_on_device:  # cheap on an accelerator, where reading the norms first would stall
            counts = torch.stack([(~torch.isfinite(g)).sum().float() for g in grads])
        else:
            # On the CPU a full isfinite pass costs ~10x a norm, while reading the norms costs nothing (no
            # device to wait for): count only the gradients whose norm says there is something to count.
            counts = torch.zeros(len(grads))
            for j, norm in enumerate(norms.tolist()):
                if not math.isfinite(norm):
                    counts[j] = float((~torch.isfinite(grads[j])).sum())
        rows[2].index_copy_(0, index, counts.to(device))
        rows[3].index_fill_(0, index, 1.0)
        return rows

    def _index(self, present: List[int], device: torch.device) -> torch.Tensor:
        """Index tensor of the gradients present, cached: building it is a host-to-device copy."""
        key = tuple(present)
        if self._index_cache is None or self._index_cache[0] != key or self._index_cache[1].device != device:
            self._index_cache = (key, torch.tensor(present, device=device))
        return self._index_cache[1]

    def _histogram_rows(self, tensors: Any) -> torch.Tensor:
        rows = []
        for t in tensors:
            if t is None:
                rows.append(torch.zeros(6 + HIST_BINS, device=self._params[0].device))
            else:
                rows.append(histogram_row(local_tensor(t.detach()), HIST_BINS).to(self._params[0].device))
        return torch.stack(rows)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._readback.pending:  # values of an earlier sampled step, read one step late on CUDA
            self._publish(trainer, pl_module)
        if self._stale_readback.pending and self._stale_readback.oldest_meta()[0] < logging_step(trainer):
            self._check_stale(trainer, pl_module)
        if not self.sampled or self._grad_stats is None or self._stats_step != logging_step(trainer):
            return
        packed = self._pack()
        self._readback.submit(packed, logging_step(trainer))
        if not HostReadback.deferred(packed):
            self._publish(trainer, pl_module)

    def _pack(self) -> torch.Tensor:
        """One flat buffer: SUM part (squares and counts), MAX part, then histograms."""
        params = [local_tensor(p.detach()) for p in self._params]
        p_norm_sq = _norms(params).square()
        if self._before is not None:
            before_sq = _norms(self._before).square()
            torch._foreach_sub_(self._before, params)  # in place: the copy becomes -Δw, no second allocation
            delta_sq = _norms(self._before).square()
            self._before = None
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
            parts += [self._grad_hist.reshape(-1), self._histogram_rows(params).reshape(-1)]
        if self._ring is not None:
            self._ring.zero_()
        self._grad_stats = self._grad_hist = None
        return torch.cat(parts)

    # --------------------------------------------------------------------------- host side
    def _publish(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
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


        subjects: List[Tuple[str, Dict[str, float]]] = []
        for name, idx in self._groups:
            if not any(present[i] for i in idx):
                continue
            g_norm = math.sqrt(sum(grad_sq[i] for i in idx))
            w_norm = math.sqrt(sum(p_sq[i] for i in idx))
            before = math.sqrt(sum(before_sq[i] for i in idx))
            delta = math.sqrt(sum(delta_sq[i] for i in idx))
            subjects.append((name, {
                "grad.norm": g_norm,
                "grad.absmax": max(absmax[i] for i in idx),
                "grad.nonfinite": sum(nonfinite[i] for i in idx),
                "param.norm": w_norm,
                "param.update_ratio": delta / before if before > 0 else (0.0 if delta == 0 else float("inf")),
            }))
        flagged = [name for name, s in subjects if s["grad.nonfinite"] != 0 or not math.isfinite(s["grad.norm"])]
        keep = set(top_k_subjects([s[0] for s in subjects], [s[1]["grad.norm"] for s in subjects], self.top_k,
                                  always=flagged))

        scalars: Dict[str, float] = {}
        total_sq = sum(grad_sq[i] for i in range(n) if present[i])
        scalars[self.writer.tag("grad", "_total", "norm")] = math.sqrt(total_sq)
        if self._norm_every_step and self._ring is not None:
            filled = [v for v in ring if v != 0.0]
            scalars[self.writer.tag("grad", "_total", "norm_max")] = (
                math.sqrt(max(filled, key=lambda v: float("inf") if v != v else v)) if filled else 0.0)
            scalars[self.writer.tag("grad", "_total", "nonfinite_steps")] = float(
                sum(1 for v in ring if not math.isfinite(v)))
        for name, stats in subjects:
            if name not in keep:
                continue
            for key, value in stats.items():
                family, stat = key.split(".")
                if stat == "update_ratio" and not self.track_update_ratio:
                    continue
                scalars[self.writer.tag(family, name, stat)] = value
        # the readings the diagnoses judge, so their healthy range can be read back from any run
        moves = self._update_ratios(present, before_sq, delta_sq)
        overall = self._overall_update_ratio(moves, before_sq, delta_sq) if step > 0 else None
        if overall is not None:
            scalars[self.writer.tag("diag", "update_ratio", "all_layers")] = overall
        typical = _median_of(moves) if step > 0 else None
        if typical is not None:
            scalars[self.writer.tag("diag", "update_ratio", "median")] = typical[0]
        depth = self._depth_ratio(present, grad_sq)
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
            self._diagnose_step(trainer, pl_module, step, present, moves, typical, depth)
        if flagged:
            names = ", ".join(flagged[:10]) + (" ..." if len(flagged) > 10 else "")
            total_bad = sum(s["grad.nonfinite"] for n_, s in subjects if n_ in flagged)
            self.raise_alert(
                trainer, pl_module, rule="grad_nonfinite", severity=self.nonfinite_severity,
                action=self.nonfinite_action, subject=flagged[0], value=total_bad, step=step,
                message=(f"non-finite gradient values in {len(flagged)} parameter(s): {names}. Likely causes: a "
                         f"learning rate too high, a log/div of zero in the loss, or NaN in the batch; check the "
                         f"first layer named and the data."),
            )

    # ----------------------------------------------------------------------------- diagnoses
    def _update_ratios(self, present: List[float], before_sq: List[float],
                       delta_sq: List[float]) -> List[Tuple[float, int]]:
        """``(||dW|| / ||W||, index)`` of every weight tensor (2 or more dimensions: Linear, Conv, recurrent,
        embedding, attention projections; HF's Conv1D too) that has a gradient, read once per check."""
        if not self.track_update_ratio:
            return []
        return [(math.sqrt(delta_sq[j] / before_sq[j]), j) for j in self._matrices
                if present[j] and before_sq[j] > 0 and math.isfinite(delta_sq[j])]

    @staticmethod
    def _overall_update_ratio(moves: List[Tuple[float, int]], before_sq: List[float],
                              delta_sq: List[float]) -> Optional[float]:
        """||dW|| / ||W|| over the same tensors together: how far one step moves the network."""
        if not moves:
            return None
        return math.sqrt(sum(delta_sq[j] for _, j in moves) / sum(before_sq[j] for _, j in moves))

    def _depth_ratio(self, present: List[float], grad_sq: List[float]) -> Optional[Tuple[float, int]]:
        """The largest gradient norm of the first quarter of the weight layers over the median layer's.

        Vanishing gradients fade through depth everywhere, so the first layers sit far below the middle of the
        network; single early tensors (attention queries and keys at init, embeddings) have small gradients by
        design beside healthy ones in the same block, and a fresh head's gradient can dwarf every other layer's
        late in training (a converged BERT: first quarter / head 1.2e-3, first quarter / median 0.55), so
        neither a single first layer nor the last one is the reference. Returns ``(ratio, k)`` with ``k`` the
        layers per quarter, or None with fewer than two layers.
        """
        layers = [i for i in self._weight_layers if present[i]]
        if len(layers) < 2:
            return None
        k = max(1, len(layers) // 4)
        head = [grad_sq[j] for j in layers[:k] if math.isfinite(grad_sq[j])]
        every = [grad_sq[j] for j in layers if math.isfinite(grad_sq[j])]
        median = statistics.median(every) if every else 0.0
        if not head or median <= 0:
            return None
        return math.sqrt(max(head) / median), k

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._resolve(trainer, pl_module)
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        held = {id(p) for opt in optimizers for group in getattr(opt, "param_groups", ()) for p in group.get("params", ())}
        # under FSDP the optimizers hold the sharded flat parameters, not the ones selected here
        self._in_optimizer = [id(p) in held for p in self._params] if optimizers and not self._sharded else None
        if not self.diagnose or int(getattr(trainer, "global_step", 0)) > 0:  # resumed: weights are trained
            self._batchnorm_checked = True
            return
        frozen_params = [(n, p) for n, p in pl_module.named_parameters() if not p.requires_grad]
        frozen = [n for n, _ in frozen_params]
        if frozen:
            total = sum(1 for _ in pl_module.parameters())
            self.raise_alert(
                trainer, pl_module, rule="frozen_parameters", severity="info", subject=frozen[0],
                value=float(len(frozen)),
                message=(f"{len(frozen)} of {total} parameter tensors do not require grad ({', '.join(frozen[:5])}"
                         f"{' ...' if len(frozen) > 5 else ''}); fine when freezing on purpose, a bug otherwise."))
            if "frozen_at_init" not in self.skip_diagnoses:
                self._check_frozen_at_init(trainer, pl_module, frozen_params)
        for i in self._weight_layers:
            if is_lazy(self._params[i]):  # a LazyLinear/LazyConv not yet run: its shape is not known
                continue
            w = self._params[i].detach()
            fan_in = w[0].numel() if w.dim() > 1 else 1
            scaled = float(w.float().var()) * fan_in if w.numel() > 1 else 1.0
            if scaled < 1e-6 or scaled > 20.0:
                rule = "init_zero" if scaled < 1e-6 else "init_large"
                self.raise_alert(
                    trainer, pl_module, rule=rule, severity="warning", subject=self._names[i], value=scaled,
                    threshold=1e-6 if rule == "init_zero" else 20.0,
                    message=(f"'{self._names[i]}' starts with weight variance x fan-in = {scaled:.3g} (default inits "
                             f"give 0.33-2): weights initialised "
                             f"{'to zero, so units stay identical' if rule == 'init_zero' else 'far too large'}; "
                             f"use the layer's default or a He/Xavier init."))
        # token embeddings that all start at 0 are all alike: nothing tells the tokens apart at the input (a
        # tied output layer starts from zero logits too); a padding row alone at 0 is the usual case, not this
        owners = owners_of(pl_module)
        embeddings = [(n, p) for n, p in zip(self._names, self._params) if not is_lazy(p) and p.dim() == 2
                      and isinstance(owners.get(n), torch.nn.Embedding)]
        zeros = [n for n, p in embeddings if p.numel() > 1 and not bool(p.detach().any())]
        if zeros:
            self.raise_alert(
                trainer, pl_module, rule="init_zero", severity="warning", subject=zeros[0], value=0.0,
                threshold=0.0,
                message=(f"embedding '{zeros[0]}' starts with every value 0: every token has the same embedding, "
                         f"so nothing tells the tokens apart at the input (and a tied output layer starts from "
                         f"all-zero logits); use nn.Embedding's default or a normal init (std 0.02 in GPT-2)."))

    def _check_frozen_at_init(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                              frozen: List[Tuple[str, torch.nn.Parameter]]) -> None:
        """Warn about frozen tensors that still hold a fresh uniform random initialisation.

        Freezing pretrained layers is fine-tuning; freezing a layer nobody trained makes it a fixed random
        projection, which is a mistake (the wrong layers frozen, or the weights loaded after freezing, or not
        at all). A frozen copy of a trainable tensor (a DQN target network, a MoCo/BYOL momentum encoder, a
        mean teacher) starts fresh by design and is left out. See :mod:`lightwatch.core.init_signature` for
        the tests and their thresholds.
        """
        tensors = [local_tensor(p) for _, p in frozen]
        device = next((t.device for t in tensors if t.device.type != "meta"), torch.device("cpu"))
        votes = uniform_init_votes(tensors, device)
        if self._sharded:  # each rank judged its own shards: a tensor is named when no rank objects
            agree_max(votes.view(-1))
        objection, support = votes.tolist()
        candidates = [i for i, (o, v) in enumerate(zip(objection, support)) if v > 0 and o == 0]
        if candidates:  # a frozen copy of a trainable tensor is a target or momentum network, fresh by design
            trainable = [local_tensor(p) for p in pl_module.parameters() if p.requires_grad]
            if not self._sharded:  # only tensors of the same size can be copies (shards may differ in size)
                sizes = {tensors[i].numel() for i in candidates}
                trainable = [t for t in trainable if not is_lazy(t) and t.numel() in sizes]
            rows = fingerprints([tensors[i] for i in candidates] + trainable, device)
            if self._sharded:  # fingerprints of shards add up to the whole tensor's
                all_reduce_flat(rows.view(-1))
            read = rows.tolist()
            copied = copies(read[:len(candidates)], read[len(candidates):])
            candidates = [i for i, c in zip(candidates, copied) if not c]
        if not candidates:
            return
        fresh = [frozen[i][0] for i in candidates]
        listed = ", ".join(fresh[:5]) + (" ..." if len(fresh) > 5 else "")
        self.raise_alert(
            trainer, pl_module, rule="frozen_at_init", severity="warning", subject=fresh[0], value=float(len(fresh)),
            message=(f"{len(fresh)} frozen parameter tensor(s) ({listed}) still hold a fresh uniform random "
                     f"initialisation (uniform values with a sharp edge, which a few training steps smear): these "
                     f"layers are fixed random projections and will never learn. Likely cause: the wrong layers "
                     f"frozen, or pretrained weights not loaded before freezing; unfreeze them or load the weights."))

    def _check_batchnorm_mode(self, trainer: Any, pl_module: Any, step: int) -> None:
        """``batchnorm_eval``: BatchNorm layers in eval mode during a training step (once, at the first reading).

        Eval mode normalises with the running statistics instead of the batch's. With running statistics that
        were never collected (mean 0, variance 1, no batch tracked) the layer does not normalise at all, and the
        model is later evaluated with statistics nobody computed: a bug (``warning``; a `model.eval()` left in
        the training code, or a submodule put in eval mode). With collected statistics it is how a pretrained
        backbone is fine-tuned with frozen normalisation (``info``).
        """
        if not getattr(pl_module, "training", True):
            return
        frozen = [(n, m) for n, m in pl_module.named_modules()
                  if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not m.training]
        if not frozen:
            return
        fresh = []
        for name, m in frozen:
            mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if mean is None or var is None or is_lazy(mean):
                fresh.append(name)  # no running statistics: eval mode cannot normalise with anything learned
                continue
            # one host read, once per run
            if bool(torch.all(mean == 0)) and bool(torch.all(var == 1)):
                fresh.append(name)
        names = [n for n, _ in frozen]
        listed = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        if fresh:
            self.raise_alert(
                trainer, pl_module, rule="batchnorm_eval", severity="warning", subject=fresh[0], step=step,
                value=float(len(fresh)),
                message=(f"{len(frozen)} BatchNorm layer(s) are in eval mode during training ({listed}), "
                         f"{len(fresh)} of them with running statistics never collected (mean 0, variance 1): they "
                         f"do not normalise, and evaluation will use statistics nobody computed. Likely a "
                         f"model.eval() (or a submodule's .eval()) left in the training code; call .train() there, "
                         f"or use frozen statistics only with a pretrained backbone."))
        else:
            self.raise_alert(
                trainer, pl_module, rule="batchnorm_eval", severity="info", subject=names[0], step=step,
                value=float(len(names)),
                message=(f"{len(names)} BatchNorm layer(s) are in eval mode during training ({listed}) with "
                         f"collected running statistics: frozen normalisation, as when fine-tuning a pretrained "
                         f"backbone; a bug otherwise."))

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
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
        flags = _norms([local_tensor(self._params[i].grad.detach()) for i in present]).ne(0).float()
        self._stale_readback.submit(flags, (step, present))
        if not HostReadback.deferred(flags):
            self._check_stale(trainer, pl_module)

    def _check_stale(self, trainer: Any, pl_module: Any) -> None:
        for flags, (step, present) in self._stale_readback.collect():
            stale = [self._names[i] for i, flag in zip(present, flags) if flag]
            if not stale or self._stale_reported:
                continue
            self._stale_reported, self._stale_checks_left = True, 0
            self.raise_alert(
                trainer, pl_module, rule="grad_stale", severity="error", subject=stale[0], value=float(len(stale)),
                step=step, message=(
                    f"gradients of {len(stale)} parameter(s) ({', '.join(stale[:3])}) are non-zero before "
                    f"backward at the start of step {step}: they accumulate across steps. "
                    f"zero_grad is not called (check an overridden optimizer_zero_grad or manual loop)."))

    def _diagnose_step(self, trainer: Any, pl_module: Any, step: int, present: List[float],
                       ratios: List[Tuple[float, int]], typical: Optional[Tuple[float, int]],
                       depth: Optional[Tuple[float, int]]) -> None:
        """The diagnoses of one reading; ``ratios``, ``typical`` and ``depth`` are what ``_write`` logged."""
        self._checks_done += 1
        layers = [i for i in self._weight_layers if present[i]]
        if self._checks_done == 1:
            stepped = self._stepped or [True] * len(self._names)
            missing = [n for n, p, s in zip(self._names, present, stepped) if not p and s]
            if missing:
                self.raise_alert(
                    trainer, pl_module, rule="grad_missing", severity="info", subject=missing[0], step=step,
                    value=float(len(missing)),
                    message=(f"{len(missing)} trainable parameter(s) of the optimizer being stepped got no gradient "
                             f"({', '.join(missing[:5])}): unused in the loss, or detached; fine for unused heads, a "
                             f"bug otherwise."))
            if self._in_optimizer is not None:
                # a gradient that no optimizer applies: the layer was built after the optimizer, or the optimizer
                # was given a sub-module's parameters; it stays as initialised for the whole run
                orphans = [n for n, p, held in zip(self._names, present, self._in_optimizer) if p and not held]
                if orphans:
                    self.raise_alert(
                        trainer, pl_module, rule="param_not_in_optimizer", severity="warning", subject=orphans[0],
                        step=step, value=float(len(orphans)),
                        message=(f"{len(orphans)} parameter(s) get a gradient but are in no optimizer "
                                 f"({', '.join(orphans[:5])}{' ...' if len(orphans) > 5 else ''}): they will never "
                                 f"be updated. Build the optimizer from self.parameters() (after every layer exists), "
                                 f"or set requires_grad=False on them if they are meant to stay fixed."))
        lrs = learning_rates(trainer)
        warming_up, self._lrs = lr_rising(self._lrs, lrs), lrs
        if step == 0 and ratios:
            self._first_update = max(ratios)  # the update of step 0: read only to explain a network that died
        if step > 0 and not self._ratio_checked:
            self._ratio_checked = True
            if ratios:
                ratio, i = max(ratios)
                # how far one step moves most of the network: the median over the weight tensors. A learning rate
                # too high moves every layer fast; a fresh head of small norm, or a layer whose weights shrink
                # towards 0, moves fast alone (healthy medians <= 0.046 across the calibration families while
                # single layers read up to 0.37; a learning rate x100: >= 0.19)
                first = self._first_update
                if ratio < 1e-4 and first is not None and first[0] > 0.1:
                    # a first update that large, then nothing moves: the first steps killed the network (every
                    # unit dead, no gradient), which reads as tiny updates but is a learning rate far too high
                    self.raise_alert(
                        trainer, pl_module, rule="update_ratio_high", severity="warning", subject=self._names[first[1]],
                        value=first[0], threshold=0.1, step=step, message=(
                            f"the first optimizer step changed '{self._names[first[1]]}' by {100 * first[0]:.3g}% of "
                            f"its norm, and by step {step} no weight moves any more ({ratio:.2g}): the first updates "
                            f"were so large that they killed the network (units dead, gradients zero). The learning "
                            f"rate is far too high; lower it about 10x, or warm it up."))
                elif typical is not None and typical[0] > _RATIO_HIGH:
                    self.raise_alert(
                        trainer, pl_module, rule="update_ratio_high", severity="warning", subject=self._names[i],
                        value=typical[0], threshold=_RATIO_HIGH, step=step,
                        message=(f"one optimizer step changes the typical weight tensor by {100 * typical[0]:.3g}% of "
                                 f"its norm (the median over {typical[1]} weight tensors; '{self._names[i]}' "
                                 f"{100 * ratio:.3g}%; healthy runs 0.2-5%): the learning rate is likely far too "
                                 f"high; lower it about 10x."))
                elif ratio < 3e-3 and warming_up:  # small steps are the point of a warmup: judge after it
                    self._ratio_checked = False
                elif ratio > _RATIO_HIGH:
                    self.raise_alert(
                        trainer, pl_module, rule="update_ratio_high", severity="info", subject=self._names[i],
                        value=ratio, threshold=_RATIO_HIGH, step=step,
                        message=(f"one optimizer step changes '{self._names[i]}' by {100 * ratio:.3g}% of its norm" +
                                 (f", the typical weight tensor {100 * typical[0]:.3g}%" if typical else "") +
                                 ": usual for a freshly initialised layer of small norm (a new head) in its first "
                                 "steps; a learning rate too high moves most layers that fast, which is a warning."))
                elif ratio < 3e-3:
                    # below 1e-4 nothing learns, fine-tuning included (Adam at lr 1e-5 moves ~5e-4 a step)
                    severity = "warning" if ratio < 1e-4 else "info"
                    self.raise_alert(
                        trainer, pl_module, rule="update_ratio_low", severity=severity, subject=self._names[i],
                        value=ratio, threshold=1e-4 if severity == "warning" else 3e-3, step=step,
                        message=(f"one optimizer step changes '{self._names[i]}' by {100 * ratio:.3g}% of its norm "
                                 f"(healthy 1-6% early in training): the learning rate is likely far too low, "
                                 f"unless this is fine-tuning."))
        if depth is not None and depth[0] < _VANISHING:
            ratio, k = depth
            self.raise_alert(
                trainer, pl_module, rule="grad_vanishing", severity="warning", subject=self._names[layers[0]],
                value=ratio, threshold=_VANISHING, step=step,
                message=(f"the largest gradient among the first {k} weight layer(s) (from "
                         f"'{self._names[layers[0]]}') is {ratio:.2g} of the median layer's: gradients vanish "
                         f"through depth (saturating activations without normalisation); use ReLU-family "
                         f"activations, normalisation layers or residual connections."))

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
