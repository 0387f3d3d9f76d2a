"""``ActivationStatsMonitor``: statistics of module outputs from forward hooks on sampled steps."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from lightwatch.core.lightning import bind, default_package
from lightwatch.core.alerts import check_severity
from lightwatch.core.callback import MonitorCallback
from lightwatch.core.histogram import HIST_BINS, decode_histogram_row, histogram_row, strided_sample
from lightwatch.core.readback import HostReadback
from lightwatch.core.reduce import all_reduce_flat
from lightwatch.core.runtime import logging_step
from lightwatch.core.selection import Selection, top_k_subjects

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["ActivationStatsMonitor", "first_tensor"]

# Device SUM row per module: Σy, Σy², non-zeros in the sample, saturated values in the sample.
_S_SUM, _S_SQ, _S_NONZERO, _S_SAT = range(4)
_SUM_WIDTH = 4
# Device MAX row per module: -min, max.
_M_NEG_MIN, _M_MAX = range(2)
_MAX_WIDTH = 2
# Host counts per module, known from shapes (no sync): values, sampled values, hook calls.
_C_N, _C_SAMPLE, _C_CALLS = range(3)
_COUNT_WIDTH = 3
# Modules whose outputs are exactly zero for inactive units: where "dead units" mean something.
_RECTIFIERS = (nn.ReLU, nn.ReLU6, nn.Threshold, nn.Hardswish, nn.Hardshrink, nn.Softshrink)
# Element-wise activation functions: the layers whose output scale through depth says whether the initialisation
# keeps signals stable (the "hidden activations" of act_exploding).
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign,
                nn.Tanhshrink, nn.LogSigmoid, nn.Threshold)
# act_exploding: at initialisation, the RMS of the last hidden activation over the first one's, with at least
# this many activation layers (with two, a ratio says more about the input scale than about depth).
_GROWTH_BOUND = 10.0
_GROWTH_MIN_LAYERS = 3
# act_dead: a unit counts as dead when it is zero for every sample of the batch; with fewer samples per unit
# than this, a live ReLU unit (zero for about half its inputs) reads dead by chance (1 in 2 with one sample),
# so the diagnosis skips such layers (the statistic is still written)
_MIN_SAMPLES_PER_UNIT = 8
_CHANNEL_FIRST = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                  "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
                  "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
                  "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "GroupNorm", "Dropout2d", "Dropout3d")


def first_tensor(output: Any) -> Optional[torch.Tensor]:
    """The first floating-point tensor in a module output (tensor, tuple/list, dict, dataclass-like)."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        items = output
    elif isinstance(output, dict):
        items = list(output.values())
    elif hasattr(output, "__dict__") and not isinstance(output, nn.Module):
        items = list(vars(output).values())
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule is a ``torch.compile`` wrapper."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - dynamo is missing on some builds
        return False
    return any(isinstance(m, OptimizedModule) for m in module.modules())


def _probability_rows(y: torch.Tensor, max_rows: int = 1024) -> torch.Tensor:
    """Share of the rows (last dimension) of ``y`` that are probability vectors: in [0, 1], summing to 1."""
    rows = y.reshape(-1, y.shape[-1])[:max_rows].float()
    in_range = ((rows >= 0) & (rows <= 1)).all(-1)
    sums_to_one = (rows.sum(-1) - 1).abs() <= 1e-3
    return (in_range & sums_to_one).float().mean()


def _selective_rows(grad: torch.Tensor, max_rows: int = 1024) -> torch.Tensor:
    """Share of the rows of a loss gradient with exactly one non-zero entry: a loss that picks one output per row
    and is linear in it (NLL), whose gradient does not depend on the outputs at all."""
    rows = grad.detach().reshape(-1, grad.shape[-1])[:max_rows]
    return ((rows != 0).sum(-1) == 1).float().mean()


def _unnormalised_rows(y: torch.Tensor, max_rows: int = 1024) -> torch.Tensor:
    """Share of the rows of ``y`` that are not log-probabilities (their logsumexp is not 0)."""
    rows = y.detach().reshape(-1, y.shape[-1])[:max_rows].float()
    return (torch.logsumexp(rows, -1).abs() > 0.1).float().mean()


def _saturation_mask(module: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """For bounded activations: a function marking values within 1% of a bound."""
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return lambda y: y.abs() > 0.99
    if isinstance(module, nn.Sigmoid):
        return lambda y: (y < 0.01) | (y > 0.99)
    if isinstance(module, nn.Hardsigmoid):
        return lambda y: (y <= 0.0) | (y >= 1.0)
    if isinstance(module, nn.ReLU6):
        return lambda y: y >= 6.0
    if isinstance(module, nn.Hardtanh):
        lo, hi = float(module.min_val), float(module.max_val)
        return lambda y: (y <= lo) | (y >= hi)
    return None


class _ActivationStatsMonitor(MonitorCallback):
    """Per-module statistics of activations (module outputs), from forward hooks on sampled steps.

    Written under ``monitor.act/<module>/<stat>`` every ``every_n_steps`` training steps:

    - ``mean``, ``std`` (from Σy and Σy², accumulated in float32), ``absmax``;
    - ``zero_frac``: fraction of exact zeros, on a strided sample of at most ``sample_size`` values;
    - ``dead_frac``: fraction of units (channels for convolutions, last dimension otherwise) that are zero
      for every sample of the batch (batches larger than ``4 * sample_size`` values: the first samples that
      fit), agreed over ranks (a unit alive on any rank is alive);
    - ``saturation``: for bounded activations (Tanh, Sigmoid, Hardtanh, ReLU6, ...), the fraction of values
      within 1% of a bound;
    - ``nonfinite``: 1 when the output held any NaN or Inf (exact: Σy and absmax are non-finite then);
    - histograms ``monitor.act_hist/<module>`` every ``histogram_every_n_steps``.

    The hooks are on the modules only during sampled steps (a module with a forward hook leaves PyTorch's
    fast call path even when the hook returns at once); a model compiled in ``configure_model`` keeps them
    for good, gated by one flag, since dynamo traced them. A sampled module costs three reductions over its
    output (Σy, ‖y‖, aminmax) plus work on a small sample. Under DDP, one SUM and one MAX all-reduce per
    sampled step merge the ranks. The first module in forward order whose
    output went non-finite is named in the alert ``act_nonfinite``. Outputs that are tuples, lists, dicts
    or dataclasses are read through their first floating-point tensor; other outputs are skipped.

    ``torch.compile``: register hooks before compiling, i.e. let this callback's ``setup`` run before you
    call ``torch.compile`` (compile in ``configure_model`` or later). Hooks added to an already compiled
    model are ignored by dynamo, so a model compiled before ``setup`` reports nothing.

    Args:
        every_n_steps: sampling interval; ``None`` follows ``Trainer(log_every_n_steps)``.
        include: regexes on module names to watch (``None``: every leaf module).
        exclude: regexes on module names to leave out.
        module_types: watch only these module types (classes or class names such as ``"ReLU"``).
        top_k: write only the ``k`` modules with the largest ``absmax`` (non-finite ones always).
        sample_size: values sampled per output for ``zero_frac``, saturation and histograms.
        histogram_every_n_steps: histogram interval; ``None`` = 10 sampling intervals, ``0`` = off.
        nonfinite_action: action for ``act_nonfinite``.
        nonfinite_severity: severity of ``act_nonfinite``.
        diagnose: warn about ``act_dead`` (a rectifier with more than 60% dead units for 3 checks in a row,
            judged only with at least 8 samples per unit in the batch; healthy runs of the fault suite stay at
            or below 16%) and ``act_saturated`` (a bounded activation
            with more than 50% of its outputs saturated for 2 checks; healthy at or below 10%), and, at the
            first sampled step, ``output_probabilities`` (the last module's output rows are probability
            vectors: a softmax before a loss that expects logits). At step 0 (``check_first_step``) the model
            is as initialised, where no learning dynamics add noise: a single reading over those bounds is
            enough for ``act_dead`` and ``act_saturated``, and ``act_exploding`` warns when the RMS of the
            last activation layer is more than 10x the first one's (3 or more activation layers): weights
            too large for the depth. Also at the first sampled step, ``nll_on_logits``: the loss gradient at the
            last module picks one output per row while the outputs are not log-probabilities (NLL on logits).
        prefix: first part of every tag.
        alert_cooldown_steps: at most one record per alert rule and subject in this many steps.
        check_first_step: also sample step 0 of a fresh fit (the initialised model, before the first
            optimizer step); one extra sampled step per fit.
        skip_diagnoses: names of diagnoses to switch off where a finding is intended in this run (for example
            ``["output_probabilities"]`` for a model that outputs probabilities to a loss that takes their
            log itself); the others stay on.

    Example:
        >>> from lightwatch.callbacks import ActivationStatsMonitor
        >>> monitor = ActivationStatsMonitor(every_n_steps=25, module_types=["ReLU", "Linear"])
        >>> monitor.every_n_steps
        25
    """

    DIAGNOSES = ("act_dead", "act_saturated", "act_exploding", "output_probabilities", "nll_on_logits")

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        module_types: Optional[Sequence[str]] = None,
        top_k: Optional[int] = None,
        sample_size: int = 65536,
        histogram_every_n_steps: Optional[int] = None,
        nonfinite_action: str = "warn",
        nonfinite_severity: str = "error",
        diagnose: bool = True,
        prefix: str = "monitor",
        alert_cooldown_steps: int = 100,
        check_first_step: bool = True,
        skip_diagnoses: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(every_n_steps, histogram_every_n_steps, prefix, alert_cooldown_steps, check_first_step)
        where = "ActivationStatsMonitor"
        self.diagnose = bool(diagnose)
        self.set_skip_diagnoses(skip_diagnoses)
        self._streaks: Dict[str, Dict[str, int]] = {}
        if top_k is not None and (int(top_k) != top_k or top_k < 1):
            raise ValueError(f"{where}: top_k must be a positive integer or None, got {top_k!r}.")
        if int(sample_size) < 16:
            raise ValueError(f"{where}: sample_size must be at least 16, got {sample_size!r}.")
        self.selection = Selection(include, exclude, module_types, where=where)
        self.top_k = None if top_k is None else int(top_k)
        self.sample_size = int(sample_size)
        self.nonfinite_action = self.check_action(nonfinite_action, f"{where}(nonfinite_action=...)")
        self.nonfinite_severity = check_severity(nonfinite_severity, f"{where}(nonfinite_severity=...)")
        self._names: List[str] = []
        self._handles: List[Any] = []
        self._hooks: List[Tuple[nn.Module, Callable[..., None]]] = []
        self._persistent_hooks = True  # until fit start decides (see `on_fit_start`)
        self._active = False
        self._rows: Optional[torch.Tensor] = None
        self._zero: Optional[torch.Tensor] = None
        self._sum: Optional[torch.Tensor] = None
        self._max: Optional[torch.Tensor] = None
        self._alive: List[Optional[torch.Tensor]] = []
        self._hist: List[Optional[torch.Tensor]] = []
        self._order: List[int] = []
        self._bounded: List[bool] = []
        self._activation: List[bool] = []
        self._rectifier: List[bool] = []
        self._nonnegative: List[bool] = []  # rectifiers whose outputs are never negative (ReLU, ReLU6)
        self._counts: List[List[float]] = []
        self._units: Optional[List[int]] = None
        # output_probabilities: the last module output of the first sampled step, and the agreed share of its
        # rows that are probability vectors (read with the unit counts, once)
        self._last_output: Optional[Tuple[int, torch.Tensor]] = None
        self._last_live: Optional[torch.Tensor] = None  # the same output, in the graph: its gradient is read once
        self._selective: Optional[torch.Tensor] = None  # share of its gradient rows with one non-zero entry
        # (module, probability-vector share, one-entry-gradient share, not-log-probability share), agreed once
        self._output_shares: Optional[Tuple[int, float, float, float]] = None
        self._with_units: List[int] = []
        self._segment_ids: Optional[torch.Tensor] = None
        self._hist_mask: List[bool] = []
        self._calls = 0
        self._skipped: Dict[str, str] = {}
        self._readback: HostReadback = HostReadback()

    # ------------------------------------------------------------------------------------ setup
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self._handles:
            return
        selected = self.selection.modules(pl_module)
        self._names = [n for n, _ in selected]
        self._alive = [None] * len(selected)
        self._counts = [[0.0] * _COUNT_WIDTH for _ in selected]
        self._rectifier = [isinstance(module, _RECTIFIERS) for _, module in selected]
        self._nonnegative = [isinstance(module, (nn.ReLU, nn.ReLU6)) for _, module in selected]
        self._hist = [None] * len(selected)
        self._order = [-1] * len(selected)
        self._bounded = [_saturation_mask(module) is not None for _, module in selected]
        self._activation = [isinstance(module, _ACTIVATIONS) for _, module in selected]
        self._hooks = [(module, self._make_hook(i, module)) for i, (_, module) in enumerate(selected)]
        # Registered here, before Lightning calls `configure_model`, so that a model compiled there traces
        # them; at fit start they are taken off again unless the model was compiled (see `on_fit_start`).
        self._attach()

    def _attach(self) -> None:
        self._handles = [module.register_forward_hook(hook) for module, hook in self._hooks]

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # A module with a forward hook takes PyTorch's slower call path even when the hook returns at once:
        # about 15 us a module, nothing next to CPU compute but up to 10% of a launch-bound GPU step on a
        # 100-module model. So the hooks are on the modules only during sampled steps; a compiled model
        # keeps them for good, since dynamo traced them and re-adding them would recompile.
        self._persistent_hooks = _compiled(pl_module)
        if not self._persistent_hooks:
            self._detach()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._detach()
            self._persistent_hooks = True

    def _make_hook(self, index: int, module: nn.Module) -> Callable[..., None]:
        saturation = _saturation_mask(module)
        channel_first = type(module).__name__ in _CHANNEL_FIRST

        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            if not self._active:
                return
            y = first_tensor(output)
            if y is None:
                self._skipped.setdefault(self._names[index], type(output).__name__)
                return
            self._record(index, y.detach(), saturation, channel_first)
            if self._units is None and self.diagnose and y.dim() >= 2 and y.shape[-1] >= 2 and y.is_floating_point():
                self._last_output = (index, y.detach())  # the last one to finish is the model's output
                self._last_live = y if y.requires_grad else None

        return hook

    # ------------------------------------------------------------------------------- hot path
    def _buffers(self, device: torch.device) -> torch.Tensor:
        """One preallocated row per module: the SUM columns, then the MAX columns (views ``_sum``, ``_max``)."""
        if self._rows is None or self._rows.device != device:
            self._rows = torch.zeros(len(self._names), _SUM_WIDTH + _MAX_WIDTH, device=device, dtype=torch.float32)
            self._sum, self._max = self._rows[:, :_SUM_WIDTH], self._rows[:, _SUM_WIDTH:]
            self._max.fill_(-float("inf"))
            self._zero = torch.zeros((), device=device)
        return self._rows

    def _record(self, i: int, y: torch.Tensor, saturation: Any, channel_first: bool) -> None:
        n = y.numel()
        if n == 0:
            return
        rows = self._buffers(y.device)
        if self._order[i] < 0:
            self._order[i] = self._calls
            self._calls += 1
        # Three reductions over the whole output; everything else on a strided sample or from shapes.
        total = y.sum(dtype=torch.float32)
        norm = torch.linalg.vector_norm(y, dtype=torch.float32)
        lo, hi = torch.aminmax(y)
        sample = strided_sample(y, self.sample_size)
        nonzero = sample.bool().sum()  # count_nonzero, at 60% of its cost on the CPU
        saturated = saturation(sample).sum() if saturation is not None else self._zero
        # -min and max reduce with MAX across ranks; NaN propagates, so non-finite outputs stay visible.
        values = [total, norm.square(), nonzero, saturated, lo.neg(), hi]
        counts = self._counts[i]
        if counts[_C_CALLS] == 0:  # the usual case: one call per step, written in place with one op
            torch.stack(values, out=rows[i])
        else:  # a module called again in the same step (shared layer, accumulation): accumulate
            row = torch.stack(values).float()
            self._sum[i] += row[:_SUM_WIDTH]
            torch.maximum(self._max[i], row[_SUM_WIDTH:], out=self._max[i])
        counts[_C_N] += n
        counts[_C_SAMPLE] += sample.numel()
        counts[_C_CALLS] += 1
        if self._rectifier[i] and y.dim() >= 2:
            self._record_alive(i, y, channel_first)
        if self.histogram_step and self._hist[i] is None:
            self._hist[i] = histogram_row(sample, HIST_BINS, self.sample_size)

    def _record_alive(self, i: int, y: torch.Tensor, channel_first: bool) -> None:
        """Per unit: non-zero anywhere in the batch (or in the first samples that fit the budget)."""
        per_sample = y.numel() // max(y.shape[0], 1)
        rows = y if y.numel() <= 4 * self.sample_size else y[: max(1, (4 * self.sample_size) // max(per_sample, 1))]
        if channel_first and y.dim() >= 3:  # [B, C, ...]: a unit is a channel
            dims = [0, *range(2, rows.dim())]
        else:  # [..., F]: a unit is a feature of the last dimension
            dims = list(range(rows.dim() - 1))
        # alive: non-zero anywhere, i.e. a largest magnitude != 0 (NaN counts as alive, as with `ne`); one
        # reduction without a mask copy, 4x cheaper than ne + any; ReLU outputs need no abs
        magnitude = rows if self._nonnegative[i] else rows.abs()
        alive = magnitude.amax(dim=dims) != 0
        prev = self._alive[i]
        self._alive[i] = alive if prev is None or prev.shape != alive.shape else prev | alive

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._active = self.sampled and bool(self._names)
        if self._active and not self._handles:
            self._attach()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._readback.pending:
            self._publish(trainer, pl_module)
        if not self._active:
            return
        self._active = False
        if not self._persistent_hooks:
            self._detach()
        if self._sum is None:
            return
        packed = self._pack()
        if self._output_shares is not None:
            self._check_output(trainer, pl_module)
        self._readback.submit(packed, (logging_step(trainer), list(self._order), self._hist_mask))
        self._order = [-1] * len(self._names)
        self._calls = 0
        if not HostReadback.deferred(packed):
            self._publish(trainer, pl_module)

    def _pack(self) -> torch.Tensor:
        """One flat buffer: the SUM part and MAX part (reduced across ranks), then histograms."""
        assert self._sum is not None and self._max is not None
        device = self._sum.device
        units = self._agreed_units(device)
        alive = [self._fit(self._alive[i], units[i], device) for i in self._with_units]
        # host counts travel with the device sums: pinned and non-blocking, so the copy never stalls
        counts = torch.tensor(self._counts, pin_memory=device.type == "cuda").to(device, non_blocking=True)
        sum_part = torch.cat([self._sum.reshape(-1), counts.reshape(-1)])
        max_part = torch.cat([self._max.reshape(-1)] + alive)
        all_reduce_flat(sum_part, max_part)  # a no-op on one process
        # units alive on any rank, counted after the MAX: one segment sum over the modules that have units
        flags = max_part[self._max.numel():]
        alive_counts = torch.zeros(len(self._with_units), device=device).index_add_(
            0, self._segments(device), flags) if self._with_units else flags
        parts = [sum_part, max_part[: self._max.numel()], alive_counts]
        self._hist_mask = [h is not None for h in self._hist]
        hist_rows = [h for h in self._hist if h is not None]
        if hist_rows:
            parts.append(torch.stack(hist_rows).reshape(-1))
        self._sum.zero_()
        self._max.fill_(-float("inf"))
        self._alive = [None] * len(self._names)
        self._counts = [[0.0] * _COUNT_WIDTH for _ in self._names]
        self._hist = [None] * len(self._names)
        return torch.cat(parts)

    def _agreed_units(self, device: torch.device) -> List[int]:
        """Units per module, the same on every rank, so the MAX buffer has the same length everywhere.

        Agreed once, at the first sampled step (which every rank reaches together), with one extra MAX
        collective; later steps pad or cut their per-unit flags to these sizes.
        """
        if self._units is None:
            local = torch.tensor([float(a.numel()) if a is not None else 0.0 for a in self._alive] + [0.0] * 3,
                                 device=device)
            if self._last_output is not None:
                y = self._last_output[1]
                local[-3] = _probability_rows(y).to(device)
                if y.dim() <= 3:  # [N, C] or [N, T, C]: classes last (channel-first maps are left alone)
                    local[-1] = _unnormalised_rows(y).to(device)
                if self._selective is not None:
                    local[-2] = self._selective.to(device)
            all_reduce_flat(None, local)  # the same MAX also agrees on the shares of the output's rows
            agreed = local.tolist()
            if self._last_output is not None:
                self._output_shares = (self._last_output[0], agreed[-3], agreed[-2], agreed[-1])
            self._last_output = self._last_live = self._selective = None
            self._units = [int(u) for u in agreed[:-3]]
            self._with_units = [i for i, u in enumerate(self._units) if u > 0]
            self._segment_ids = None
        return self._units

    def _segments(self, device: torch.device) -> torch.Tensor:
        """For each per-unit flag, the index of its module among those with units (cached)."""
        if self._segment_ids is None or self._segment_ids.device != device:
            ids = [j for j, i in enumerate(self._with_units) for _ in range(self._units[i])]  # type: ignore[index]
            self._segment_ids = torch.tensor(ids, dtype=torch.long, device=device)
        return self._segment_ids

    @staticmethod
    def _fit(alive: Optional[torch.Tensor], units: int, device: torch.device) -> torch.Tensor:
        if alive is None:
            return torch.zeros(units, device=device)
        alive = alive.float()
        if alive.numel() == units:
            return alive
        return torch.cat([alive, alive.new_zeros(max(units - alive.numel(), 0))])[:units]

    # --------------------------------------------------------------------------- host side
    def _publish(self, trainer: Any, pl_module: Any) -> None:
        for values, (step, order, hist_mask) in self._readback.collect():
            self._write(trainer, pl_module, values, step, order, hist_mask)

    def _write(self, trainer: Any, pl_module: Any, values: List[float], step: int, order: List[int],
               hist_mask: List[bool]) -> None:
        m = len(self._names)
        sums = [values[i * _SUM_WIDTH:(i + 1) * _SUM_WIDTH] for i in range(m)]
        base = m * _SUM_WIDTH
        counts = [values[base + i * _COUNT_WIDTH: base + (i + 1) * _COUNT_WIDTH] for i in range(m)]
        base += m * _COUNT_WIDTH
        maxes = [values[base + i * _MAX_WIDTH: base + (i + 1) * _MAX_WIDTH] for i in range(m)]
        base += m * _MAX_WIDTH
        k = len(self._with_units)
        alive_counts = [0.0] * m
        for j, i in enumerate(self._with_units):
            alive_counts[i] = values[base + j]
        base += k

        stats: List[Tuple[str, Dict[str, float]]] = []
        thin: Set[str] = set()  # rectifiers with too few samples per unit for a dead-unit verdict
        for i, name in enumerate(self._names):
            s, c, mx = sums[i], counts[i], maxes[i]
            n, n_sample = c[_C_N], c[_C_SAMPLE]
            if c[_C_CALLS] == 0 or n == 0:
                continue
            mean = s[_S_SUM] / n
            var = max(s[_S_SQ] / n - mean * mean, 0.0) if math.isfinite(mean) else float("nan")
            nonfinite = not (math.isfinite(mx[_M_NEG_MIN]) and math.isfinite(mx[_M_MAX]))
            row = {
                "mean": mean,
                "std": math.sqrt(var) if math.isfinite(var) else float("nan"),
                "absmax": float("inf") if nonfinite else max(mx[_M_NEG_MIN], mx[_M_MAX]),
                "zero_frac": 1.0 - s[_S_NONZERO] / n_sample,
                "nonfinite": float(nonfinite),
            }
            units = self._units[i] if self._units else 0
            if self._rectifier[i] and units > 0:
                row["dead_frac"] = (units - alive_counts[i]) / units
                if n / units < _MIN_SAMPLES_PER_UNIT:
                    thin.add(name)
            if self._bounded[i]:
                row["saturation"] = s[_S_SAT] / n_sample
            stats.append((name, row))

        flagged = [name for name, row in stats if row["nonfinite"] > 0]
        keep = set(top_k_subjects([n for n, _ in stats], [r["absmax"] for _, r in stats], self.top_k, flagged))
        scalars = {self.writer.tag("act", name, stat): v for name, row in stats if name in keep
                   for stat, v in row.items()}
        # the readings the diagnoses judge (over every watched module, not only the written ones), so their
        # healthy range can be read back from any run
        dead = [row["dead_frac"] for name, row in stats if "dead_frac" in row and name not in thin]
        if dead:
            scalars[self.writer.tag("diag", "act_dead", "max")] = max(dead)
        saturated = [row["saturation"] for _, row in stats if "saturation" in row]
        if saturated:
            scalars[self.writer.tag("diag", "act_saturated", "max")] = max(saturated)
        if step == 0:
            growth = self._growth(stats, {name: order[i] for i, name in enumerate(self._names)})
            if growth is not None:
                scalars[self.writer.tag("diag", "act_growth", "ratio")] = growth[0]
        self.writer.write_scalars(trainer, scalars, step)

        hist_rows = [i for i, has in enumerate(hist_mask) if has]
        if hist_rows and len(values) > base:
            width = 6 + HIST_BINS
            hists = {}
            for j, i in enumerate(hist_rows):
                if self._names[i] in keep:
                    hists[self.writer.tag("act_hist", self._names[i])] = decode_histogram_row(
                        values[base + j * width: base + (j + 1) * width])
            self.writer.write_histograms(trainer, hists, step)

        if self.diagnose:
            self._diagnose(trainer, pl_module, stats, order, step, thin)
        if flagged:
            position = {name: order[i] for i, name in enumerate(self._names)}
            in_order = sorted(flagged, key=lambda name: position.get(name, 1 << 30))
            first = in_order[0]
            self.raise_alert(
                trainer, pl_module, rule="act_nonfinite", severity=self.nonfinite_severity,
                action=self.nonfinite_action, subject=first, value=float(len(flagged)), step=step,
                message=(f"module '{first}' is the first in forward order whose output is non-finite "
                         f"({len(flagged)} module(s) affected: {', '.join(in_order[:5])}"
                         f"{' ...' if len(in_order) > 5 else ''}). Check its weights and its input: a NaN "
                         f"weight, an overflow, or a log/sqrt/div of a bad value there."),
            )

    # ----------------------------------------------------------------------------- diagnoses
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        # first sampled step only: read the loss gradient at the model's output once, on the device
        live, self._last_live = self._last_live, None
        if live is None or not self._active or self._units is not None:
            return

        def read(grad: torch.Tensor) -> None:
            self._selective = _selective_rows(grad)

        live.register_hook(read)

    def _check_output(self, trainer: Any, pl_module: Any) -> None:
        """At the first sampled step: ``output_probabilities`` (a softmax before the loss) and ``nll_on_logits``."""
        index, share, selective, unnormalised = self._output_shares  # type: ignore[misc]
        self._output_shares = None
        name = self._names[index]
        findings: List[Tuple[str, float, float, str]] = []
        if selective > 0.9 and unnormalised > 0.9:
            findings.append(("nll_on_logits", selective, 0.9, (
                f"the loss picks one output per row and is linear in it (its gradient at the model's output, "
                f"module '{name}', has one non-zero entry in {selective:.0%} of the rows), but the outputs are "
                f"not log-probabilities ({unnormalised:.0%} of the rows do not log-sum-exp to 0): NLL applied "
                f"to raw logits (or to probabilities without the log). Such a loss has no lower bound on logits: "
                f"it goes negative and diverges. Use F.cross_entropy on the logits, or F.nll_loss on "
                f"F.log_softmax of them.")))
        if share > 0.5:
            findings.append(("output_probabilities", share, 0.5, (
                f"the model's output (module '{name}', the last to run in the forward pass) is a probability "
                f"distribution in {share:.0%} of its rows (every value in [0, 1], each row summing to 1): a softmax "
                f"before a loss that expects logits (F.cross_entropy, nn.CrossEntropyLoss) caps how low the loss "
                f"can go and shrinks the gradients. Return logits and let the loss apply log_softmax; if your loss "
                f"takes probabilities on purpose, this is fine but numerically weaker than logits.")))
        for rule, value, threshold, message in findings:
            self.raise_alert(trainer, pl_module, rule=rule, severity="warning", action="warn", subject=name,
                             value=value, threshold=threshold, message=message)

    def _diagnose(self, trainer: Any, pl_module: Any, stats: List[Tuple[str, Dict[str, float]]], order: List[int],
                  step: int, thin: Set[str]) -> None:
        """Dead rectifier units or saturated bounded activations that persist over consecutive checks.

        At step 0 the model is as initialised: one reading is enough (nothing has moved yet, and a unit dead
        at initialisation gets no gradient to revive it), and activation growth through depth is checked.
        """
        position = {name: order[i] for i, name in enumerate(self._names)}
        initial = step == 0
        if initial:
            self._check_growth(trainer, pl_module, stats, position)
        for stat, rule, bound, checks, what, fix in (
            ("dead_frac", "act_dead", 0.6, 3, "of its units output zero for every sample",
             "a learning rate too high, a large negative bias, or poor init; try a lower learning rate, "
             "LeakyReLU/GELU, or normalisation"),
            ("saturation", "act_saturated", 0.5, 2, "of its outputs sit at the bounds of the activation",
             "inputs to the activation are too large (weights too large, inputs not normalised); rescale the "
             "init or inputs, or add normalisation before it"),
        ):
            over = [(name, row[stat]) for name, row in stats if row.get(stat, 0.0) > bound
                    and not (stat == "dead_frac" and name in thin)]
            streaks = self._streaks.setdefault(rule, {})
            for name in [n for n in streaks if n not in {o for o, _ in over}]:
                del streaks[name]
            hits = []
            for name, value in over:
                # at initialisation one reading counts as the whole streak (and is not reported again)
                streaks[name] = checks if initial else streaks.get(name, 0) + 1
                if streaks[name] == checks:
                    hits.append((name, value))
            if hits:
                name, value = min(hits, key=lambda h: position.get(h[0], 1 << 30))
                since = max(step - (checks - 1) * self.interval, 0)  # checks are every `interval` steps
                when = ("at initialisation (step 0, before any update)" if initial
                        else f"for {checks} checks in a row (since step {since})")
                self.raise_alert(
                    trainer, pl_module, rule=rule, severity="warning", subject=name, value=value, threshold=bound,
                    step=step,
                    message=(f"module '{name}': {100 * value:.0f}% {what}, {when} "
                             f"({len(hits)} module(s) affected; the first in forward order is named). Likely: {fix}."))

    def _growth(self, stats: List[Tuple[str, Dict[str, float]]],
                position: Dict[str, int]) -> Optional[Tuple[float, str, str, int]]:
        """RMS of the last activation module's output over the first's, in forward order, with the names and count.

        None with fewer than three activation modules (with two the ratio says more about the input scale than
        about depth) or a first RMS of 0.
        """
        index = {name: i for i, name in enumerate(self._names)}
        layers = sorted(((position.get(name, 1 << 30), name, math.sqrt(row["std"] ** 2 + row["mean"] ** 2))
                         for name, row in stats if self._activation[index[name]] and row["nonfinite"] == 0),
                        key=lambda t: t[0])
        if len(layers) < _GROWTH_MIN_LAYERS or not layers[0][2] > 0 or not math.isfinite(layers[-1][2]):
            return None
        (_, first, first_rms), (_, last, last_rms) = layers[0], layers[-1]
        return last_rms / first_rms, first, last, len(layers)

    def _check_growth(self, trainer: Any, pl_module: Any, stats: List[Tuple[str, Dict[str, float]]],
                      position: Dict[str, int]) -> None:
        """``act_exploding``: at initialisation, activations grow through depth (weights too large per layer)."""
        found = self._growth(stats, position)
        if found is None or not found[0] > _GROWTH_BOUND:
            return
        growth, first, last, count = found
        per_layer = growth ** (1.0 / (count - 1))
        self.raise_alert(
            trainer, pl_module, rule="act_exploding", severity="warning", subject=last, value=growth,
            threshold=_GROWTH_BOUND, step=0, message=(
                f"at initialisation the activations grow through depth: the RMS of '{last}' is {growth:.3g}x that "
                f"of '{first}' ({count} activation layers, x{per_layer:.3g} per layer; a stable init keeps it "
                f"near 1). Gradients grow the same way backwards and the first updates blow up: use the layers' "
                f"default or a He/Xavier init with gain 1, or add normalisation layers."))

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["streaks"] = {rule: dict(v) for rule, v in self._streaks.items()}
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._streaks = {str(r): {str(n): int(c) for n, c in v.items()}
                         for r, v in dict(state_dict.get("streaks", {})).items()}

    # ------------------------------------------------------------------------------------ end
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._readback.pending:
            self._publish(trainer, pl_module)
        self._active = False

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._active = False


#: The class to add to ``Trainer(callbacks=[...])``: the implementation above bound to the installed
#: Lightning package (``pytorch_lightning``, else ``lightning.pytorch``; ``lightwatch.lightning`` binds it to
#: the latter).
ActivationStatsMonitor = bind(_ActivationStatsMonitor, default_package(), "callback", module=__name__)
