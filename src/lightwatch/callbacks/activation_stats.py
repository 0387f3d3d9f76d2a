"""``ActivationStatsMonitor``: statistics of module outputs from forward hooks on sampled steps."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from lightwatch.checks.activation import (DeadUnitsCheck, GrowthCheck, LayerReading, NllOnLogitsCheck,
                                         NonFiniteOutputCheck, OutputReading, ProbabilityOutputCheck, SaturationCheck,
                                         probability_rows, saturation_mask, selective_rows, unnormalised_rows)
from lightwatch.core.alerts import check_severity
from lightwatch.core.callback import MonitorCallback
from lightwatch.core.gc_pause import gc_paused
from lightwatch.core.histogram import (HIST_BINS, decode_histogram_row, histogram_row, spread_sample, spread_step,
                                       strided_sample)
from lightwatch.core.lightning import bind, default_package
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
# Host counts per module, known from shapes (no sync): values, sampled values (saturation), hook calls, values
# sampled for the zero count.
_C_N, _C_SAMPLE, _C_CALLS, _C_ZERO_SAMPLE = range(4)
_COUNT_WIDTH = 4
# The zero count reads a spread sample of at most this many values: +-0.8% or better on the fraction (one
# standard error), a count 2-4x cheaper than over a whole [64, 256] output (count_nonzero is the dearest of a
# module's reductions on the CPU: 8 us there against 1.5-4 us for the sum, norm and min/max).
ZERO_SAMPLE = 4096
# Outputs larger than this many values get their min and max from two reductions instead of one aminmax.
_APART = 32768
# Small outputs on the CPU (at most _SMALL_OUTPUT values) are copied in the hook and reduced together, a chunk of
# at most _SMALL_CHUNK values at a time: a reduction call costs a few microseconds whatever its size, so on a
# model of many small modules five reductions a module were most of the sampled step. Larger outputs are
# reduced in the hook, where their bytes cost more than the calls.
_SMALL_OUTPUT = 4096
_SMALL_CHUNK = 1 << 16
_Rows = List[List[float]]  # one row of floats per module, as read back on the host
_STATS = ("mean", "std", "absmax", "zero_frac", "nonfinite", "dead_frac", "saturation")  # written per module
# Modules whose outputs are exactly zero for inactive units: where "dead units" mean something.
_RECTIFIERS = (nn.ReLU, nn.ReLU6, nn.Threshold, nn.Hardswish, nn.Hardshrink, nn.Softshrink)
# Element-wise activation functions: the layers whose output scale through depth says whether the initialisation
# keeps signals stable (the "hidden activations" of act_exploding).
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign,
                nn.Tanhshrink, nn.LogSigmoid, nn.Threshold)
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


class _StepSums:
    """The device-side sums of one sampled step, one slot per watched module, in two buffers allocated once.

    Per module: a float32 slot (Σy, ‖y‖, min, max) and an int64 slot (saturated values in the sample) that the
    reductions write into directly (``out=``: no result tensor to allocate, nothing to stack; half the cost per
    module of returning 0-d tensors and stacking them); the non-zero count of a spread sample (0-d, stacked
    once in :meth:`pack`: copying it into a slot cost as much as counting); host counts known from shapes,
    per-unit "alive" flags for rectifiers and a histogram row. :meth:`pack` merges the ranks (one SUM and one
    MAX all-reduce) and frees the slots for the next sampled step; :meth:`unpack` splits the values read
    back on the host.
    """

    def __init__(self) -> None:
        self.sample_size = 0
        self.modules = 0
        self.rectifier: List[bool] = []
        self.nonnegative: List[bool] = []  # rectifiers whose outputs are never negative (ReLU, ReLU6)
        # [M + 1, 5]: Σy, ‖y‖, min, max, non-zeros of outputs reduced in a stack (see `_flush`); the last row is
        # scratch
        self.floats: Optional[torch.Tensor] = None
        self.ints: Optional[torch.Tensor] = None  # [M + 1]: saturated values in the sample
        self._slots: List[Tuple[List[torch.Tensor], torch.Tensor]] = []  # 0-d views of each row, made once
        self.alive: List[Optional[torch.Tensor]] = []
        self.nonzero: List[Optional[torch.Tensor]] = []  # per module: non-zeros in its spread sample (0-d)
        self.hist: List[Optional[torch.Tensor]] = []
        self.order: List[int] = []  # forward position of each module in this step (-1: not called)
        self.counts: List[float] = []  # flat: _COUNT_WIDTH per module
        self.calls = 0
        self.segment_ids: Optional[torch.Tensor] = None
        # small outputs waiting for `_flush`: (module, copy of its output), and how many values they hold
        self._pending: List[Tuple[int, torch.Tensor]] = []
        self._pending_values = 0
        # index tensors of groups of modules (small outputs reduced together, counts to add), made once
        self._chunk_index: Dict[Tuple[int, ...], torch.Tensor] = {}
        self._spread_steps: Dict[int, int] = {}  # output size -> stride of its zero-count sample
        self._alive_dims: Dict[Tuple[int, bool], List[int]] = {}  # (output dims, channel first) -> reduced dims

    def layout(self, sample_size: int, rectifier: List[bool], nonnegative: List[bool]) -> None:
        """One slot per watched module, in selection order."""
        self.sample_size = sample_size
        self.modules = len(rectifier)
        self.rectifier, self.nonnegative = rectifier, nonnegative
        self.floats = self.ints = None
        self._chunk_index = {}
        self._clear()

    def _clear(self) -> None:
        m = self.modules
        self.alive = [None] * m
        self.nonzero = [None] * m
        self.counts = [0.0] * (_COUNT_WIDTH * m)
        self.hist = [None] * m
        self.order = [-1] * m
        self.calls = 0
        self._pending = []
        self._pending_values = 0

    def _start(self, device: torch.device) -> None:
        """At a step's first record: the buffers on ``device`` (made once), every slot empty: zero sums, no
        min (+inf), no max (-inf), which is what a module that is not called this step contributes."""
        if self.floats is None or self.floats.device != device:
            self.floats = torch.empty(self.modules + 1, 5, device=device, dtype=torch.float32)
            self.ints = torch.empty(self.modules + 1, device=device, dtype=torch.int64)
            self._slots = [(list(f.unbind(0)), n) for f, n in zip(self.floats, self.ints.unbind(0))]
        self.floats[:, :2].zero_()
        self.floats[:, 2].fill_(float("inf"))
        self.floats[:, 3].fill_(-float("inf"))
        self.floats[:, 4].zero_()
        self.ints.zero_()

    def record(self, i: int, y: torch.Tensor, saturation: Any, channel_first: bool, histogram: bool) -> None:
        """Add the output ``y`` of module ``i`` (``saturation``: its bound mask, if bounded)."""
        n = y.numel()
        if n == 0:
            return
        if self.calls == 0:
            self._start(y.device)
        again = self.order[i] >= 0  # a module called again in the same step (shared layer, accumulation)
        if not again:
            self.order[i] = self.calls
            self.calls += 1
            # (not while dynamo traces the hooks of a compiled model: it keeps the reductions in its graph)
            if (n <= _SMALL_OUTPUT and saturation is None and not histogram and not self.rectifier[i]
                    and y.dtype == torch.float32 and y.device.type == "cpu" and not torch.compiler.is_compiling()):
                self._defer(i, y, n)
                return
        elif self._pending:  # its first output may be waiting: the slot must hold it before the merge
            self._flush()
        # Three reductions over the whole output, into the module's slot; everything else on a strided sample
        # or from shapes. A second call of the module goes to the scratch row and is merged below.
        floats, saturated = self._slots[-1 if again else i]
        if y.dtype == torch.float32:  # no dtype argument: asking for the dtype the input has takes a slower path
            torch.sum(y, dim=None, out=floats[0])
            torch.linalg.vector_norm(y, out=floats[1])
            if n > _APART:  # amin and amax apart: 20-40% cheaper than aminmax on large outputs
                torch.amin(y, dim=(), out=floats[2])
                torch.amax(y, dim=(), out=floats[3])
            else:
                torch.aminmax(y, out=(floats[2], floats[3]))
        else:  # float32 sums of half-precision outputs; min and max in the input's dtype (out= must match it)
            torch.sum(y, dim=None, dtype=torch.float32, out=floats[0])
            torch.linalg.vector_norm(y, dtype=torch.float32, out=floats[1])
            lo, hi = torch.aminmax(y)
            floats[2].copy_(lo)
            floats[3].copy_(hi)
        # count_nonzero on a strided view: 2.5x cheaper than bool().sum(), 4x cheaper than a sum into out=; the
        # 0-d results are stacked once in `pack` (a copy into the slot per module cost as much as the count).
        # The view's stride is worked out once per output size (`y` is already detached).
        step = self._spread_steps.get(n)
        if step is None:
            step = self._spread_steps[n] = spread_step(n, min(self.sample_size, ZERO_SAMPLE))
        spread = y.as_strided((-(-n // step),), (step,)) if y.is_contiguous() else spread_sample(
            y, min(self.sample_size, ZERO_SAMPLE))
        nonzero = torch.count_nonzero(spread)
        previous = self.nonzero[i]
        self.nonzero[i] = nonzero if previous is None else previous + nonzero
        sample = strided_sample(y, self.sample_size) if saturation is not None or histogram else None
        if saturation is not None:
            saturated.copy_(torch.count_nonzero(saturation(sample)))
        elif again:
            saturated.zero_()
        if again:
            self._merge(i)
        counts, at = self.counts, i * _COUNT_WIDTH
        counts[at + _C_N] += n
        counts[at + _C_SAMPLE] += sample.numel() if sample is not None else 0
        counts[at + _C_ZERO_SAMPLE] += spread.numel()
        counts[at + _C_CALLS] += 1
        if self.rectifier[i] and y.dim() >= 2:
            self._record_alive(i, y, channel_first)
        if histogram and self.hist[i] is None:
            self.hist[i] = histogram_row(sample, HIST_BINS, self.sample_size)

    def _defer(self, i: int, y: torch.Tensor, n: int) -> None:
        """Copy a small output now (the caller may change it in place later: residual additions often do)
        and reduce it with the others of its shape in :meth:`_flush`. Its zero count reads all its values."""
        self._pending.append((i, y.clone()))
        counts, at = self.counts, i * _COUNT_WIDTH
        counts[at + _C_N] += n
        counts[at + _C_ZERO_SAMPLE] += n
        counts[at + _C_CALLS] += 1
        self._pending_values += n
        if self._pending_values >= _SMALL_CHUNK:
            self._flush()

    def _flush(self) -> None:
        """Reduce the waiting small outputs at once: outputs of one shape are stacked and reduced along rows (sum,
        norm, min and max, non-zeros: five calls for the whole stack; NaN propagates as in the per-output
        reductions), then written into their modules' slots in one call."""
        pending, self._pending, self._pending_values = self._pending, [], 0
        if not pending or self.floats is None:
            return
        by_shape: Dict[Tuple[int, ...], List[Tuple[int, torch.Tensor]]] = {}
        for item in pending:
            by_shape.setdefault(item[1].shape, []).append(item)
        for group in by_shape.values():
            index = self._index_of(tuple(i for i, _ in group), self.floats.device)
            x = torch.stack([v for _, v in group]).reshape(len(group), -1)
            # along rows: amin and amax apart, and non-zeros as a sum of signs (aminmax, count_nonzero and
            # comparisons with 0 take a slow path there, 10-40 us on 32 x 2,048 values against 3-5 us); a NaN
            # counts as non-zero, as with count_nonzero
            sums, norms, lo, hi = x.sum(1), torch.linalg.vector_norm(x, dim=1), x.amin(1), x.amax(1)
            nonzero = torch.nan_to_num_(x.abs_().sign_(), nan=1.0).sum(1)  # the stack is ours: in place
            self.floats.index_copy_(0, index, torch.stack([sums, norms, lo, hi, nonzero], 1))

    def _index_of(self, ids: Tuple[int, ...], device: torch.device) -> torch.Tensor:
        """An index tensor of ``ids`` on ``device``, made once (the same groups come back every sampled step)."""
        index = self._chunk_index.get(ids)
        if index is None or index.device != device:
            if len(self._chunk_index) > 64:  # a few groups a step; a model whose calls vary gets no more
                self._chunk_index.clear()
            index = self._chunk_index[ids] = torch.tensor(ids, device=device)
        return index

    def _merge(self, i: int) -> None:
        """Merge the scratch row (a module's second output in a step) into module ``i``'s slot; min and max
        propagate NaN, so a non-finite output stays visible."""
        assert self.floats is not None and self.ints is not None
        row, extra = self.floats[i], self.floats[-1]
        row[0].add_(extra[0])
        torch.hypot(row[1], extra[1], out=row[1])  # the norm of both outputs
        torch.minimum(row[2], extra[2], out=row[2])
        torch.maximum(row[3], extra[3], out=row[3])
        self.ints[i].add_(self.ints[-1])

    def _record_alive(self, i: int, y: torch.Tensor, channel_first: bool) -> None:
        """Per unit: the largest magnitude in the batch (or in the first samples that fit the budget); a unit is
        alive where it is not 0 (NaN counts as alive, as with ``ne``), compared for all modules in `pack`."""
        per_sample = y.numel() // max(y.shape[0], 1)
        rows = y if y.numel() <= 4 * self.sample_size else y[: max(1, (4 * self.sample_size) // max(per_sample, 1))]
        dims = self._alive_dims.get((rows.dim(), channel_first))
        if dims is None:
            if channel_first and y.dim() >= 3:  # [B, C, ...]: a unit is a channel
                dims = [0, *range(2, rows.dim())]
            else:  # [..., F]: a unit is a feature of the last dimension
                dims = list(range(rows.dim() - 1))
            self._alive_dims[(rows.dim(), channel_first)] = dims
        # one reduction without a mask copy, 4x cheaper than ne + any; ReLU outputs need no abs
        magnitude = (rows if self.nonnegative[i] else rows.abs()).amax(dim=dims)
        prev = self.alive[i]
        self.alive[i] = magnitude if prev is None or prev.shape != magnitude.shape else torch.maximum(prev, magnitude)

    def pack(self, units: List[int], with_units: List[int]) -> Tuple[torch.Tensor, List[int], List[bool]]:
        """One flat buffer: the SUM part and MAX part (reduced across ranks), then histograms; with the forward
        order and which modules have a histogram row. ``units``: units per module, agreed over ranks."""
        assert self.floats is not None and self.ints is not None
        device = self.floats.device
        if self.calls == 0:  # no watched module ran this step: every slot empty (the ranks still all-reduce)
            self._start(device)
        self._flush()
        m = self.modules
        floats = self.floats[:m]
        # non-zeros: the stacked outputs' column, plus the counts of the outputs reduced in their hooks
        counted = tuple(i for i, c in enumerate(self.nonzero) if c is not None)
        nonzero = floats[:, 4]
        if counted:
            nonzero = nonzero.index_add(0, self._index_of(counted, device),
                                        torch.stack([self.nonzero[i] for i in counted]).float())
        saturated = self.ints[:m].float()
        sums = torch.stack([floats[:, 0], floats[:, 1].square(), nonzero, saturated], 1)  # [M, _SUM_WIDTH]
        maxes = torch.stack([floats[:, 2].neg(), floats[:, 3]], 1)  # [M, _MAX_WIDTH]: -min, max
        alive = [self._fit(self.alive[i], units[i], device) for i in with_units]
        # host counts travel with the device sums: pinned and non-blocking, so the copy never stalls
        counts = torch.tensor(self.counts, pin_memory=device.type == "cuda").to(device, non_blocking=True)
        sum_part = torch.cat([sums.reshape(-1), counts.reshape(-1)])
        max_part = torch.cat([maxes.reshape(-1), torch.cat(alive).ne(0).float()] if alive else [maxes.reshape(-1)])
        all_reduce_flat(sum_part, max_part)  # a no-op on one process
        # units alive on any rank, counted after the MAX: one segment sum over the modules that have units
        flags = max_part[maxes.numel():]
        alive_counts = torch.zeros(len(with_units), device=device).index_add_(
            0, self._segments(device, units, with_units), flags) if with_units else flags
        parts = [sum_part, max_part[: maxes.numel()], alive_counts]
        hist_mask = [h is not None for h in self.hist]
        hist_rows = [h for h in self.hist if h is not None]
        if hist_rows:
            parts.append(torch.stack(hist_rows).reshape(-1))
        order = self.order
        self._clear()
        return torch.cat(parts), order, hist_mask

    def _segments(self, device: torch.device, units: List[int], with_units: List[int]) -> torch.Tensor:
        """For each per-unit flag, the index of its module among those with units (cached)."""
        if self.segment_ids is None or self.segment_ids.device != device:
            ids = [j for j, i in enumerate(with_units) for _ in range(units[i])]
            self.segment_ids = torch.tensor(ids, dtype=torch.long, device=device)
        return self.segment_ids

    @staticmethod
    def _fit(alive: Optional[torch.Tensor], units: int, device: torch.device) -> torch.Tensor:
        """A module's per-unit magnitudes cut or padded (with 0: dead) to the agreed number of units."""
        if alive is None:
            return torch.zeros(units, device=device)
        if alive.numel() == units:
            return alive
        return torch.cat([alive, alive.new_zeros(max(units - alive.numel(), 0))])[:units]

    @staticmethod
    def unpack(values: List[float], modules: int,
               with_units: List[int]) -> Tuple[_Rows, _Rows, _Rows, List[float], int]:
        """Columns, one value per module each: the SUM columns (``_SUM_WIDTH``), the count columns
        (``_COUNT_WIDTH``) and the MAX columns (``_MAX_WIDTH``); the alive units per module, and where the
        histogram rows start. Columns are strided slices of ``values``: one C-level copy each, no list per module.
        """
        m = modules
        sums = [values[k:m * _SUM_WIDTH:_SUM_WIDTH] for k in range(_SUM_WIDTH)]
        base = m * _SUM_WIDTH
        counts = [values[base + k:base + m * _COUNT_WIDTH:_COUNT_WIDTH] for k in range(_COUNT_WIDTH)]
        base += m * _COUNT_WIDTH
        maxes = [values[base + k:base + m * _MAX_WIDTH:_MAX_WIDTH] for k in range(_MAX_WIDTH)]
        base += m * _MAX_WIDTH
        alive_counts = [0.0] * m
        for j, i in enumerate(with_units):
            alive_counts[i] = values[base + j]
        return sums, counts, maxes, alive_counts, base + len(with_units)


class _ActivationStatsMonitor(MonitorCallback):
    """Per-module statistics of activations (module outputs), from forward hooks on sampled steps.

    Written under ``monitor.act/<module>/<stat>`` every ``every_n_steps`` training steps:

    - ``mean``, ``std`` (from Σy and Σy², accumulated in float32), ``absmax``;
    - ``zero_frac``: fraction of exact zeros, on a sample of at most 4,096 values (``ZERO_SAMPLE``) spread over
      every unit (a stride prime to 2, 3, 5 and 7);
    - ``dead_frac``: fraction of units (channels for convolutions, last dimension otherwise) that are zero
      for every sample of the batch (batches larger than ``4 * sample_size`` values: the first samples that
      fit), agreed over ranks (a unit alive on any rank is alive);
    - ``saturation``: for bounded activations (Tanh, Sigmoid, Hardtanh, ReLU6, ...), the fraction of values
      within 1% of a bound;
    - ``nonfinite``: 1 when the output held any NaN or Inf (exact: Σy and absmax are non-finite then);
    - histograms ``monitor.act_hist/<module>`` every ``histogram_every_n_steps``.

    The hooks run only during sampled steps, through one global forward hook registered for the step (a
    module with a forward hook leaves PyTorch's fast call path even when the hook returns at once; global
    hooks run before a module's own); a model compiled in ``configure_model`` keeps per-module hooks for
    good, gated by one flag, since dynamo traced them. A sampled module costs three reductions over its
    output (Σy, ‖y‖, aminmax) plus work on a small sample. Under DDP, one SUM and one MAX all-reduce per
    sampled step merge the ranks. The first module in forward order whose
    output went non-finite is named in the alert ``act_nonfinite``. Outputs that are tuples, lists, dicts
    or dataclasses are read through their first floating-point tensor; other outputs are skipped. The
    diagnoses are the checks of :mod:`lightwatch.checks.activation`, fed the readings of each sampled step.

    ``torch.compile``: register hooks before compiling, i.e. let this callback's ``setup`` run before you
    call ``torch.compile`` (compile in ``configure_model`` or later). Hooks added to an already compiled
    model are ignored by dynamo, so a model compiled before ``setup`` reports nothing.

    Args:
        every_n_steps: sampling interval; ``None`` follows ``Trainer(log_every_n_steps)``.
        include: regexes on module names to watch (``None``: every leaf module).
        exclude: regexes on module names to leave out.
        module_types: watch only these module types (classes or class names such as ``"ReLU"``).
        top_k: write only the ``k`` modules with the largest ``absmax`` (non-finite ones always).
        sample_size: values sampled per output for saturation and histograms.
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
        # the diagnoses (lightwatch.checks.activation), fed the host readings of each sampled step
        self._growth = GrowthCheck()
        self._dead = DeadUnitsCheck()
        self._saturated = SaturationCheck()
        self._output_checks = (NllOnLogitsCheck(), ProbabilityOutputCheck())
        if top_k is not None and (int(top_k) != top_k or top_k < 1):
            raise ValueError(f"{where}: top_k must be a positive integer or None, got {top_k!r}.")
        if int(sample_size) < 16:
            raise ValueError(f"{where}: sample_size must be at least 16, got {sample_size!r}.")
        self.selection = Selection(include, exclude, module_types, where=where)
        self.top_k = None if top_k is None else int(top_k)
        self.sample_size = int(sample_size)
        self._nonfinite = NonFiniteOutputCheck(
            severity=check_severity(nonfinite_severity, f"{where}(nonfinite_severity=...)"),
            action=self.check_action(nonfinite_action, f"{where}(nonfinite_action=...)"))
        self._names: List[str] = []
        self._tags_of: Dict[str, Dict[str, str]] = {}  # module -> stat -> tag
        self._handles: List[Any] = []
        self._hooks: List[Tuple[nn.Module, Callable[..., None]]] = []
        self._hook_of: Dict[int, Callable[..., None]] = {}
        self._step_hook: Any = None
        self._persistent_hooks = True  # until fit start decides (see `on_fit_start`)
        self._active = False
        self._sums = _StepSums()
        self._bounded: List[bool] = []
        self._activation: List[bool] = []
        self._rectifier: List[bool] = []
        self._units: Optional[List[int]] = None
        # output_probabilities: the last module output of the first sampled step, and the agreed share of its
        # rows that are probability vectors (read with the unit counts, once)
        self._last_output: Optional[Tuple[int, torch.Tensor]] = None
        self._last_live: Optional[torch.Tensor] = None  # the same output, in the graph: its gradient is read once
        self._selective: Optional[torch.Tensor] = None  # share of its gradient rows with one non-zero entry
        # (module, probability-vector share, one-entry-gradient share, not-log-probability share), agreed once
        self._output_shares: Optional[Tuple[int, float, float, float]] = None
        self._with_units: List[int] = []
        self._skipped: Dict[str, str] = {}
        self._readback: HostReadback = HostReadback()

    @property
    def nonfinite_action(self) -> str:
        """Action of ``act_nonfinite``."""
        return self._nonfinite.action

    @nonfinite_action.setter
    def nonfinite_action(self, action: str) -> None:
        self._nonfinite.action = self.check_action(action, f"{type(self).__name__}.nonfinite_action")

    @property
    def nonfinite_severity(self) -> str:
        """Severity of ``act_nonfinite``."""
        return self._nonfinite.severity

    @nonfinite_severity.setter
    def nonfinite_severity(self, severity: str) -> None:
        self._nonfinite.severity = check_severity(severity, f"{type(self).__name__}.nonfinite_severity")

    # ------------------------------------------------------------------------------------ setup
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self._handles:
            return
        selected = self.selection.modules(pl_module)
        self._names = [n for n, _ in selected]
        self._rectifier = [isinstance(module, _RECTIFIERS) for _, module in selected]
        self._sums.layout(self.sample_size, self._rectifier,
                          [isinstance(module, (nn.ReLU, nn.ReLU6)) for _, module in selected])
        self._bounded = [saturation_mask(module) is not None for _, module in selected]
        self._activation = [isinstance(module, _ACTIVATIONS) for _, module in selected]
        self._hooks = [(module, self._make_hook(i, module)) for i, (_, module) in enumerate(selected)]
        self._hook_of = {id(module): hook for module, hook in self._hooks}
        # Registered here, before Lightning calls `configure_model`, so that a model compiled there traces
        # them; at fit start they are taken off again unless the model was compiled (see `on_fit_start`).
        self._attach()

    def _attach(self) -> None:
        self._handles = [module.register_forward_hook(hook) for module, hook in self._hooks]

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._detach_step_hook()

    def _attach_step_hook(self) -> None:
        """For one sampled step: one global forward hook that dispatches to the watched modules' hooks.

        One registration and one removal per sampled step, whatever the number of watched modules (adding
        and removing a hook on each of 100 modules cost ~0.6 ms a sampled step). During the step every
        module call in the process passes through it (one dictionary lookup for a module that is not
        watched). Global hooks run before a module's own forward hooks: a hook of the user's that replaces a
        module's output is not seen by these statistics.
        """
        if self._step_hook is None:
            hook_of = self._hook_of

            def dispatch(module: nn.Module, inputs: Any, output: Any) -> None:
                hook = hook_of.get(id(module))
                if hook is not None:
                    hook(module, inputs, output)

            self._step_hook = nn_module.register_module_forward_hook(dispatch)

    def _detach_step_hook(self) -> None:
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # A module with a forward hook takes PyTorch's slower call path even when the hook returns at once:
        # about 15 us a module, nothing next to CPU compute but up to 10% of a launch-bound GPU step on a
        # 100-module model. So the hooks are on only during sampled steps (one global hook, see
        # `_attach_step_hook`); a compiled model keeps its per-module hooks for good, since dynamo traced them
        # and re-adding them would recompile.
        self._persistent_hooks = _compiled(pl_module)
        if not self._persistent_hooks:
            self._detach()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._detach()
            self._persistent_hooks = True

    def _make_hook(self, index: int, module: nn.Module) -> Callable[..., None]:
        saturation = saturation_mask(module)
        channel_first = type(module).__name__ in _CHANNEL_FIRST

        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            if not self._active:
                return
            # a plain tensor output (the usual case) without first_tensor's walk: this runs once per watched
            # module in a sampled step, where each Python call costs about a microsecond
            y = output if type(output) is torch.Tensor and output.is_floating_point() else first_tensor(output)
            if y is None:
                self._skipped.setdefault(self._names[index], type(output).__name__)
                return
            self._sums.record(index, y.detach(), saturation, channel_first, self.histogram_step)
            if self._units is None and self.diagnose and y.dim() >= 2 and y.shape[-1] >= 2 and y.is_floating_point():
                self._last_output = (index, y.detach())  # the last one to finish is the model's output
                self._last_live = y if y.requires_grad else None

        return hook

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._active = self.sampled and bool(self._names)
        if self._active and not self._persistent_hooks:
            self._attach_step_hook()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._readback.pending:
            self._publish(trainer, pl_module)
        if not self._active:
            return
        self._active = False
        self._detach_step_hook()
        if self._sums.floats is None:  # no watched module has run yet
            return
        with gc_paused():
            packed, order, hist_mask = self._sums.pack(self._agreed_units(self._sums.floats.device), self._with_units)
        if self._output_shares is not None:
            self._check_output(trainer, pl_module)
        self._readback.submit(packed, (logging_step(trainer), order, hist_mask))
        if not HostReadback.deferred(packed):
            self._publish(trainer, pl_module)

    def _agreed_units(self, device: torch.device) -> List[int]:
        """Units per module, the same on every rank, so the MAX buffer has the same length everywhere.

        Agreed once, at the first sampled step (which every rank reaches together), with one extra MAX
        collective; later steps pad or cut their per-unit flags to these sizes.
        """
        if self._units is None:
            local = torch.tensor([float(a.numel()) if a is not None else 0.0 for a in self._sums.alive] + [0.0] * 3,
                                 device=device)
            if self._last_output is not None:
                y = self._last_output[1]
                local[-3] = probability_rows(y).to(device)
                if y.dim() <= 3:  # [N, C] or [N, T, C]: classes last (channel-first maps are left alone)
                    local[-1] = unnormalised_rows(y).to(device)
                if self._selective is not None:
                    local[-2] = self._selective.to(device)
            all_reduce_flat(None, local)  # the same MAX also agrees on the shares of the output's rows
            agreed = local.tolist()
            if self._last_output is not None:
                self._output_shares = (self._last_output[0], agreed[-3], agreed[-2], agreed[-1])
            self._last_output = self._last_live = self._selective = None
            self._units = [int(u) for u in agreed[:-3]]
            self._with_units = [i for i, u in enumerate(self._units) if u > 0]
            self._sums.segment_ids = None
        return self._units

    # --------------------------------------------------------------------------- host side
    def _publish(self, trainer: Any, pl_module: Any) -> None:
        with gc_paused():  # a few objects per module and scalar: see lightwatch.core.gc_pause
            for values, (step, order, hist_mask) in self._readback.collect():
                self._write(trainer, pl_module, values, step, order, hist_mask)

    def _write(self, trainer: Any, pl_module: Any, values: List[float], step: int, order: List[int],
               hist_mask: List[bool]) -> None:
        sums, counts, maxes, alive_counts, base = _StepSums.unpack(values, len(self._names), self._with_units)

        stats: List[Tuple[str, Dict[str, float]]] = []
        layers: List[LayerReading] = []  # what the checks judge
        isfinite, sqrt, nan, inf = math.isfinite, math.sqrt, float("nan"), float("inf")
        units_of = self._units or [0] * len(self._names)
        # one pass over the columns, in their index order (_S_*, _C_*, _M_*); a sampled step goes through every
        # watched module here
        for (i, name, total, square, nonzero, saturated, n, n_sample, calls, n_zero, neg_min, hi, units, rectifier,
             bounded) in zip(range(len(self._names)), self._names, *sums, *counts, *maxes, units_of, self._rectifier,
                             self._bounded):
            if calls == 0 or n == 0:
                continue
            mean = total / n
            var = max(square / n - mean * mean, 0.0) if isfinite(mean) else nan
            nonfinite = not (isfinite(neg_min) and isfinite(hi))
            std = sqrt(var) if isfinite(var) else nan
            row = {"mean": mean, "std": std, "absmax": inf if nonfinite else max(neg_min, hi),
                   "zero_frac": 1.0 - nonzero / n_zero, "nonfinite": float(nonfinite)}
            dead = per_unit = saturation = None
            if rectifier and units > 0:
                dead = row["dead_frac"] = (units - alive_counts[i]) / units
                per_unit = n / units
            if bounded:
                saturation = row["saturation"] = saturated / n_sample
            stats.append((name, row))
            layers.append(LayerReading(name, order[i], mean, std, nonfinite, self._activation[i], dead, per_unit,
                                       saturation))

        flagged = [name for name, row in stats if row["nonfinite"] > 0]
        keep = set(top_k_subjects([n for n, _ in stats], [r["absmax"] for _, r in stats], self.top_k, flagged))
        scalars: Dict[str, float] = {}
        tags_of = self._tags_of
        for name, row in stats:
            if name in keep:
                tags = tags_of.get(name)
                if tags is None:  # a module's tags, built at its first write
                    tags = tags_of[name] = {stat: self.writer.tag("act", name, stat) for stat in _STATS}
                for stat, v in row.items():
                    scalars[tags[stat]] = v
        # the readings the diagnoses judge (over every watched module, not only the written ones), so their
        # healthy range can be read back from any run
        for check in (self._dead, self._saturated, self._growth):
            reading = check.reading(layers, step)
            if reading is not None:
                scalars[self.writer.tag("diag", *check.reading_tag)] = reading  # type: ignore[misc]
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
            # at step 0 the model is as initialised: one reading is enough for dead or saturated layers (a
            # unit dead at initialisation gets no gradient to revive it), and growth through depth is judged
            for check in (self._growth, self._dead, self._saturated):
                self.raise_finding(trainer, pl_module, check.judge(layers, step, self.interval))
        self.raise_finding(trainer, pl_module, self._nonfinite.judge(layers, step, self.interval))

    # ----------------------------------------------------------------------------- diagnoses
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        # first sampled step only: read the loss gradient at the model's output once, on the device
        live, self._last_live = self._last_live, None
        if live is None or not self._active or self._units is not None:
            return

        def read(grad: torch.Tensor) -> None:
            self._selective = selective_rows(grad)

        live.register_hook(read)

    def _check_output(self, trainer: Any, pl_module: Any) -> None:
        """At the first sampled step: ``nll_on_logits`` and ``output_probabilities`` (a softmax before the loss)."""
        index, share, selective, unnormalised = self._output_shares  # type: ignore[misc]
        self._output_shares = None
        output = OutputReading(self._names[index], share, selective, unnormalised)
        for check in self._output_checks:
            self.raise_finding(trainer, pl_module, check.judge(output))

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["streaks"] = {c.rule: c.state_dict() for c in (self._dead, self._saturated) if c.judged}
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        streaks = dict(state_dict.get("streaks", {}))
        for check in (self._dead, self._saturated):
            check.load_state_dict(streaks.get(check.rule))

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
