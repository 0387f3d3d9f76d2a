"""``DataQualityMonitor``: data-quality checks on the batches, on the device, merged across DDP ranks.

Both tiers are fed from ``on_*_batch_start``, where the batch is already on its device. The hook checks
the schema on the host (tensor metadata only) and leaves a copy of each field in a per-split buffer; that
copy is the whole device work of a step. The buffered batches are checked and folded together at the next
logged step, at the end of an evaluation epoch, or when the buffer is full:

- the **per-batch tier** counts non-finite values per feature, values outside known ranges, labels
  outside ``[0, num_classes)``, and (on the host) schema changes and empty batches, each with the first
  step at which it occurred (per-row step markers). The counters are reduced with one SUM and one MAX
  all-reduce per logged step and read with one device-to-host copy;
- the **distribution tier** accumulates per-feature moments and fixed-edge histograms, label counts and
  64-bit sample hashes over the epoch; it is reduced once per epoch (one MAX, one SUM, one all-gather of
  hashes) and gives drift of val against train, drift of any split against a reference profile, label
  shift, class imbalance, features that became constant, duplicates within a split and train-to-val
  leakage.

With ``scan_before_fit=N`` the monitor also reads up to N batches of the train and of each val dataloader in
``on_train_start``, before the first optimizer step, and runs both tiers on them with separate state, so data
faults are named at step 0; every random state is put back, so training is bit-identical with and without it.

See the README section "Data quality" for the checks, their defaults, the thresholds and the profile format.
"""
from __future__ import annotations

import logging
import importlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from lightwatch.core.lightning import bind, default_package, package_of
from lightwatch.core.alerts import SEVERITIES, Alert, MonitorError, alert_log, check_severity, severity_at_least
from lightwatch.core.batch import BatchSelector, BatchSelectorError, Field, Selector
from lightwatch.core.callback import MonitorCallback
from lightwatch.core.histogram import HistogramData
from lightwatch.core.readback import HostReadback
from lightwatch.core.reduce import agree_max, all_reduce_flat
from lightwatch.core.runtime import distributed_ready, is_global_zero, logging_step, run_dir, world_size
from lightwatch.metrics import (
    Histogram,
    LabelCounts,
    Moments,
    SampleHasher,
    chi_squared,
    ks_binned,
    linf,
    load_packed,
    pack_max,
    pack_sum,
    psi,
    psi_threshold,
)
from lightwatch.metrics.histogram import quantile_edges, strictly_increasing
from lightwatch.metrics.label_signal import NeighbourLabelAgreement
from lightwatch.profile import DataProfile, FieldProfile, ProfileError, SplitProfile, dtype_name, parse_dtype

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["DataQualityMonitor", "CHECKS"]

logger = logging.getLogger("lightwatch")

_F64 = torch.float64
_NEG_INF = float("-inf")
_PROFILE_NAME = "data_profile.json"
# Label counts are kept for this many classes when the number of classes is not known up front.
_LABEL_CAPACITY = 1024
# Batches are buffered for the distribution tier up to this many bytes per split, then folded in one go.
_BUFFER_BYTES = 8 << 20
# Actions that must act on the very batch that triggered them: the per-batch tier reads its flags every
# step (one small host read, one MAX collective under DDP) when a per-batch check uses one of them.
_IMMEDIATE_ACTIONS = ("skip_step", "raise")

#: Every check, its tier, and its defaults: ``action``, ``severity`` and the check's own parameters.
CHECKS: Dict[str, Dict[str, Any]] = {
    # per-batch tier
    "nonfinite": {"tier": "batch", "action": "warn", "severity": "error"},
    "label_range": {"tier": "batch", "action": "warn", "severity": "error"},
    "out_of_range": {"tier": "batch", "action": "warn", "severity": "warning", "margin": 0.1, "tolerance": 1e-3},
    "schema": {"tier": "batch", "action": "warn", "severity": "error"},
    "empty_batch": {"tier": "batch", "action": "warn", "severity": "warning"},
    # once, on the first training batch: inputs far from zero mean and unit scale (raw pixels, raw units);
    # standardised digits: |mean| <= 0.05, RMS <= 1.2; raw 0..16 pixels: |mean| 4.7, RMS 7.6; images in
    # [0, 1] (|mean| 0.5, RMS 0.58) train well and stay below `min_rms`. The severity follows the measured harm,
    # which depends on the optimizer: plain gradient steps (SGD) scale with the inputs' second moment (digits
    # MLP, SGD: raw pixels x 0.3, RMS 2.3, cost 2 to 8 points of test accuracy; N(3, 2^2)-like, RMS 3.5, 10
    # points; x 1, RMS 7.8, 74 points) -> the check's severity; adaptive optimizers (Adam, RMSprop, Adagrad...)
    # normalise the step per weight, and only an offset that dominates the spread hurts (Adam: raw pixels at
    # any scale, |mean| / std 0.8, cost nothing; N(3, 2^2), 1.65, 1.6 points; |mean| / std 2.2, 4.4 points;
    # 3.3, 8 points) -> the check's severity when |mean| > `offset_ratio` x std, else `info`
    "unnormalised": {"tier": "first_batch", "action": "warn", "severity": "warning", "max_abs_mean": 0.5,
                     "min_rms": 2.0, "offset_ratio": 2.0},
    # distribution tier
    # drift: `info` when significant, the check's severity only when a feature has both PSI > psi_warn and
    # KS > ks_warn (healthy val vs train of small splits reaches PSI 0.14 and KS 0.13; duplicated or
    # imbalanced training data moves PSI to 0.4 at most, a real covariate shift to 5 and more)
    "drift": {"tier": "epoch", "action": "warn", "severity": "warning", "alpha": 0.01, "psi_floor": 0.1,
              "ks_floor": 0.1, "psi_warn": 0.5, "ks_warn": 0.3},
    "drift_ref": {"tier": "epoch", "action": "warn", "severity": "warning", "alpha": 0.01, "psi_floor": 0.1,
                  "ks_floor": 0.1, "psi_warn": 0.5, "ks_warn": 0.3},
    "label_shift": {"tier": "epoch", "action": "warn", "severity": "warning", "alpha": 1e-3, "floor": 0.1},
    "label_shift_ref": {"tier": "epoch", "action": "warn", "severity": "warning", "alpha": 1e-3, "floor": 0.1},
    "constant": {"tier": "epoch", "action": "warn", "severity": "warning", "alpha": 1e-3},
    # duplicates: `info` above `threshold`, the check's severity above `warn_above`
    "duplicates": {"tier": "epoch", "action": "warn", "severity": "warning", "threshold": 0.01, "warn_above": 0.5},
    "leakage": {"tier": "epoch", "action": "warn", "severity": "warning", "threshold": 0.0},
    # the rarest class below `ratio` of a uniform share (healthy digits: >= 0.87; harmful imbalance: 0.06), and
    # rarer than a balanced sample of that size would make it (chance < `alpha` over the C classes). Judged only
    # for classification targets, one label per sample: per-token or per-pixel labels are Zipfian or
    # background-heavy by nature, and their positions are no independent samples
    "class_imbalance": {"tier": "epoch", "action": "warn", "severity": "warning", "ratio": 0.2, "alpha": 1e-3},
    # scan before training only: labels no nearer to their inputs' nearest neighbours' labels than chance
    # (leave-one-out 1-NN agreement, z against chance below `min_z` over at least `min_rows` rows). Healthy
    # digits z ~100, shuffled labels |z| < 3, 70% label noise z ~11. `info`: inputs whose raw distances mean
    # little (raw audio, say) read near chance too; the not-learning check raises it when the loss stays up.
    "labels_unrelated": {"tier": "scan", "action": "log", "severity": "info", "min_z": 3.0, "min_rows": 200},
    # the first training batches with padding (an `attention_mask` with zeros beside per-token labels of the
    # same shape): the share of padded positions whose label is not `ignore_index`, i.e. that the loss counts.
    # A collate that copies input_ids into labels without masking the padding gives 1.0; HF's collators and a
    # correct collate give 0. Above `threshold` the model is also trained to predict padding.
    "padding_in_loss": {"tier": "first_batch", "action": "warn", "severity": "warning", "threshold": 0.5},
}
# Allowed range of each numeric parameter: (low, high, low inclusive).
_PARAM_BOUNDS = {"alpha": (0.0, 1.0, False), "psi_floor": (0.0, math.inf, True), "ks_floor": (0.0, 1.0, True),
                 "floor": (0.0, 1.0, True), "threshold": (0.0, 1.0, True), "margin": (0.0, math.inf, True),
                 "tolerance": (0.0, 1.0, True), "ratio": (0.0, 1.0, False), "max_abs_mean": (0.0, math.inf, False),
                 "min_rms": (0.0, math.inf, True), "offset_ratio": (0.0, math.inf, True),
                 "psi_warn": (0.0, math.inf, True), "ks_warn": (0.0, 1.0, True), "warn_above": (0.0, 1.0, True),
                 "min_z": (0.0, math.inf, True), "min_rows": (10.0, 1e6, True)}


@dataclass(frozen=True)
class _Check:
    name: str
    enabled: bool
    action: str
    severity: str
    params: Mapping[str, float]

    @property
    def rule(self) -> str:
        return f"data_{self.name}"

    def __getitem__(self, key: str) -> float:
        return self.params[key]

    def graded(self, strong: bool) -> str:
        """The check's severity when the finding is ``strong``, else at most ``info``."""
        if strong or not severity_at_least(self.severity, "info"):
            return self.severity
        return "info"


def _parse_checks(checks: Optional[Mapping[str, Any]], where: str) -> Dict[str, _Check]:
    user = dict(checks or {})
    unknown = sorted(set(user) - set(CHECKS))
    if unknown:
        raise ValueError(f"{where}(checks=...): unknown check(s) {unknown}; the checks are {', '.join(CHECKS)}.")
    out: Dict[str, _Check] = {}
    for name, defaults in CHECKS.items():
        override: Any = user.get(name, {})
        if override is None or override is False:
            override = {"enabled": False}
        elif override is True:
            override = {}
        if not isinstance(override, Mapping):
            raise ValueError(f"{where}(checks={{{name!r}: ...}}): expected a mapping of settings (or true/false), got "
                             f"{type(override).__name__} {override!r}.")
        override = dict(override)
        allowed = {"enabled", "action", "severity"} | (set(defaults) - {"tier", "action", "severity"})
        bad = sorted(set(override) - allowed)
        if bad:
            raise ValueError(f"{where}(checks={{{name!r}: ...}}): unknown setting(s) {bad}; allowed: "
                             f"{', '.join(sorted(allowed))}.")
        action = MonitorCallback.check_action(str(override.get("action", defaults["action"])),
                                              f"{where}(checks={{{name!r}: {{action: ...}}}})")
        severity = check_severity(str(override.get("severity", defaults["severity"])),
                                  f"{where}(checks={{{name!r}: {{severity: ...}}}})")
        params: Dict[str, float] = {}
        for key in sorted(allowed - {"enabled", "action", "severity"}):
            value = override.get(key, defaults[key])
            lo, hi, inclusive = _PARAM_BOUNDS[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    (lo <= value if inclusive else lo < value) and value <= hi):
                raise ValueError(f"{where}(checks={{{name!r}: {{{key}: ...}}}}): must be a number in "
                                 f"{'[' if inclusive else '('}{lo}, {hi}], got {value!r}.")
            params[key] = float(value)
        enabled = override.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ValueError(f"{where}(checks={{{name!r}: {{enabled: ...}}}}): must be true or false, got {enabled!r}.")
        out[name] = _Check(name, enabled, action, severity, params)
    return out


# ------------------------------------------------------------------------------------------ fields
@dataclass
class _Schema:
    """Expected dtype and sample shape of a field; dimensions are learned until ``frozen``."""

    dtype: torch.dtype
    dims: List[Optional[int]]
    frozen: bool
    source: str

    def describe(self) -> str:
        return f"{dtype_name(self.dtype)} {['*' if d is None else d for d in self.dims]}"


@dataclass
class _Spec:
    """A field of one split as the monitor sees it: where it is, what it is, where its counters live."""

    field: Field
    role: str  # "input" | "target"
    kind: str  # "numeric" | "labels"
    ndim: int
    feature_dim: Optional[int]  # dimension of the batch tensor holding the features; None: one feature
    num_features: int
    floating: bool
    offset: int  # first slot in the split's counter vector
    width: int  # slots: 2F (non-finite, out-of-range) for numeric, 1 for labels
    sum_dims: Optional[Tuple[int, ...]]
    names: Optional[List[str]] = None
    zeros: Optional[torch.Tensor] = None
    # one more counter slot (floating fields with a feature dimension): non-finite values of batches whose
    # feature dimension has another size than the field's layout (a dimension learned to be variable)
    loose_slot: bool = False

    @property
    def name(self) -> str:
        return self.field.name

    def label(self, j: int) -> str:
        if self.num_features == 1 and not self.names:
            return self.name
        return f"{self.name}.{self.names[j] if self.names else j}"


@dataclass
class _Ranges:
    lo: torch.Tensor  # broadcastable against the field, float64
    hi: torch.Tensor
    hard: bool  # given by the user: any value outside is reported
    source: str
    n_ref: int
    bounds: List[Tuple[float, float]] = field(default_factory=list)


class _LabelTally(LabelCounts):
    """``LabelCounts`` that leaves out labels equal to ``ignore_index`` (padding, masked positions)."""

    def __init__(self, num_classes: int, ignore_index: Optional[int], device: Any = None) -> None:
        super().__init__(num_classes, device=device)
        self.ignore_index = ignore_index

    def update(self, y: Any) -> None:
        y = torch.as_tensor(y).reshape(-1)
        if y.device != self.device:
            self.to(y.device)
        valid = (y >= 0) & (y < self.num_classes)
        bad = ~valid
        if self.ignore_index is not None:
            keep = y != self.ignore_index
            valid &= keep
            bad &= keep
        idx = torch.where(valid, y, torch.zeros_like(y)).to(torch.int64)
        self.counts.scatter_add_(0, idx, valid.to(torch.int64))
        self._extra[0] += bad.sum()

    def empty_like(self) -> "_LabelTally":
        return _LabelTally(self.num_classes, self.ignore_index, device=self.device)


@dataclass
class _Pending:
    """One buffered batch: a copy of each field (``None`` where the field was unusable), its marker (the
    training step, or the batch index of an evaluation epoch), its sample count and its sample ids."""

    parts: List[Optional[torch.Tensor]]
    marker: int
    rows: int
    ids: Optional[torch.Tensor]
    # fields of this batch whose feature dimension is variable and has another size than the field's layout:
    # checked for non-finite values as a whole, left out of the per-feature statistics
    loose: Dict[int, torch.Tensor] = field(default_factory=dict)


class _Buffer:
    """Copies of recent batches, waiting to be checked and folded into the statistics in one go.

    Counting non-finite values, range and label violations, updating moments, histograms and label counts,
    and hashing samples costs a few dozen small tensor operations whatever the batch size, and on small
    batches that per-operation cost (dispatch, kernel launches, cold caches right after the backward pass) is
    nearly all of it. So each batch only leaves a copy of its fields here (a copy, because training code may
    change the batch in place), and the work is done on the concatenation at the next logged step, at the end
    of the epoch, or when the buffer holds ``_BUFFER_BYTES``. Per-row markers keep the step of each value, so
    the first bad step is exact.
    """

    def __init__(self) -> None:
        self.batches: List[_Pending] = []
        self.shapes: Optional[List[Optional[Tuple[int, ...]]]] = None
        self.nbytes = 0

    def fits(self, parts: List[Optional[torch.Tensor]]) -> bool:
        """Whether these fields can be concatenated with the buffered ones (same sample shapes)."""
        if self.shapes is None:
            return True
        return all(p is None or old is None or tuple(p.shape[1:]) == old for p, old in zip(parts, self.shapes))

    def add(self, pending: _Pending) -> None:
        self.batches.append(pending)
        shapes = [None if p is None else tuple(p.shape[1:]) for p in pending.parts]
        if self.shapes is not None:
            shapes = [old if old is not None else new for old, new in zip(self.shapes, shapes)]
        self.shapes = shapes
        self.nbytes += sum(p.numel() * p.element_size() for p in pending.parts if p is not None)

    def clear(self) -> None:
        self.batches = []
        self.shapes = None
        self.nbytes = 0


class _Split:
    """Everything the monitor keeps for one split (``train``, ``val``, ``test``...)."""

    def __init__(self, name: str, marker_word: str) -> None:
        self.name = name
        self.marker_word = marker_word  # "step" for training, "batch" for evaluation
        self.specs: Optional[List[_Spec]] = None
        self.sample_ids: Optional[Field] = None
        self.device: Optional[torch.device] = None
        # per-batch tier: device SUM and MAX vectors, plus host counters
        self.counts: Optional[torch.Tensor] = None
        self.first: Optional[torch.Tensor] = None
        self.label_max: Optional[torch.Tensor] = None
        self.immediate: Optional[torch.Tensor] = None
        self.reset_host_counters()
        # distribution tier: local since the last reduction, and reduced over the epoch so far
        self.acc: Dict[str, Any] = {}
        self.glob: Dict[str, Any] = {}
        self.hasher = SampleHasher()
        self.seen = SampleHasher()
        self.buffer = _Buffer()
        self.epoch_samples = 0  # local, since the last reduction
        self.epoch_batches = 0
        self.glob_samples = 0  # reduced, this epoch so far
        self.glob_batches = 0
        # DistributedSampler padding: samples of this rank that are real in this epoch
        self.rows_seen = 0
        self.row_limit: Optional[int] = None
        self.limit_known = False
        self.batches_in_epoch = 0

    def reset_host_counters(self) -> None:
        self.batches = 0
        self.samples = 0
        self.empty = 0
        self.schema_errors = 0
        self.first_empty = _NEG_INF
        self.first_schema = _NEG_INF
        self.schema_notes: Dict[str, str] = {}
        self.values: List[int] = [0] * (len(self.specs) if self.specs else 0)
        self.pending = False

    def reset_epoch(self) -> None:
        for stat in list(self.acc.values()) + list(self.glob.values()):
            stat.reset()
        self.buffer.clear()
        self.hasher.reset()
        self.seen.reset()
        self.epoch_samples = self.epoch_batches = self.glob_samples = self.glob_batches = 0
        self.rows_seen = 0
        self.limit_known = False
        self.batches_in_epoch = 0


_SEQUENCE_INT_DTYPES = (torch.int16, torch.int32, torch.int64)


def _token_like(t: torch.Tensor) -> bool:
    """Integer ids with a sequence dimension (``[N, T]`` token ids, attention masks, per-token labels): int16/32/64
    tensors of two or more dimensions. Their last dimension is a sequence (padded to each batch's longest one by
    a dynamic-padding collate), not a set of features. ``uint8`` (raw images) and ``bool`` are not ids."""
    return t.dtype in _SEQUENCE_INT_DTYPES and t.dim() >= 2


def _default_feature_dim(ndim: int) -> Optional[int]:
    # [N] one feature; [N, F] and [N, T, F] features last; [N, C, H, W] (and 3-d volumes) channels first.
    if ndim <= 1:
        return None
    return ndim - 1 if ndim <= 3 else 1


def _feature_matrix(x: torch.Tensor, feature_dim: Optional[int], cap: int) -> torch.Tensor:
    """``[values, F]``: per sample at most ``cap`` evenly strided values of each feature (views where possible).

    The same positions of every sample are taken, so the result does not depend on how samples are
    grouped into batches (or ranks). The stride is odd so that on power-of-two image sizes it still walks
    across columns rather than down one.
    """
    n = x.shape[0]
    if feature_dim is None:
        xm = x.reshape(n, 1, -1)
    else:
        xm = x.movedim(feature_dim, 1)
        xm = xm.reshape(n, xm.shape[1], -1)
    per_sample = xm.shape[2]
    if per_sample > cap:
        stride = -(-per_sample // cap)
        stride += 1 - stride % 2
        xm = xm[:, :, ::stride]
    return xm.transpose(1, 2).reshape(-1, xm.shape[1])


def _copy_stat(stat: Any) -> Any:
    """A host copy of a statistic (through its JSON-safe state, so it is exactly what a profile holds)."""
    if isinstance(stat, Moments):
        return Moments.from_state_dict(stat.state_dict())
    if isinstance(stat, Histogram):
        return Histogram.from_state_dict(stat.state_dict())
    return LabelCounts.from_state_dict(stat.state_dict())


def _trimmed(tally: LabelCounts, classes: Optional[int]) -> LabelCounts:
    """A host copy of label counts over ``classes`` classes; labels beyond them count as out of range."""
    state = tally.state_dict()
    if classes is not None and classes < tally.num_classes:
        counts = state["counts"]
        state.update(num_classes=classes, counts=counts[:classes],
                     out_of_range=state["out_of_range"] + sum(counts[classes:]))
    return LabelCounts.from_state_dict(state)


def _rarest_class_chance(count: int, total: float, classes: int) -> float:
    """Chance that a balanced sample of ``total`` labels over ``classes`` classes has a class with at most ``count``
    labels: ``C * P(Poisson(total / C) <= count)`` (a union bound, capped at 1). With many classes and few labels
    per class a rare class is expected (1,000 classes, 5 labels each: some class has none about 99% of the
    time); a class made rare on purpose or by a bug is far below that."""
    lam = total / classes
    if lam <= 0:
        return 1.0
    log_terms = [-lam + i * math.log(lam) - math.lgamma(i + 1) for i in range(count + 1)]
    top = max(log_terms)
    cdf = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, classes * cdf)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------- the scan before training
# State of the monitor that the scan before training works on: it runs on fresh or copied values of all of
# these, and the streaming values are put back afterwards, so training-time checks see exactly what they
# would see without the scan.
_SCAN_ISOLATED = ("_splits", "_edges", "_schemas", "_layout", "_classes", "_class_source", "_label_max", "_ranges",
                  "_restored_ranges", "_learned", "_profile", "_train_hashes_last", "_reported", "_published_step",
                  "_skip_step", "_scale_probe", "_scale_checked", "_immediate_flag", "sampled")
# padding_in_loss looks at this many training batches at most for one with padding
_PADDING_BATCHES = 16
_MASK_KEYS = ("attention_mask",)
# Actions that act on an optimizer step: before training there is none to skip or roll back.
_STEP_ACTIONS = ("skip_step", "rollback")


@dataclass
class _Scan:
    """What the scan before training read: the numbers go into the message of every alert it raises."""

    train_batches: int
    val_batches: int
    ranks: int
    # splits read in a fixed order and not to their end: a class-sorted split read from its start looks
    # "imbalanced" and "drifted", so the distribution comparisons (drift, label shift, class imbalance,
    # constant features) are left out for them; duplicates and leakage are exact matches and stay valid
    partial: Tuple[str, ...] = ()

    def describe(self) -> str:
        where = f" on each of the {self.ranks} ranks" if self.ranks > 1 else ""
        return (f"found by the data scan before training: {self.train_batches} train and {self.val_batches} val "
                f"batch(es) read{where} before the first optimizer step")


class _FreshIterable:
    """Iterates a loader through iterators of its own and shuts their workers down in :meth:`close`.

    A ``DataLoader`` with ``persistent_workers`` caches one iterator (and its workers, whose random state
    feeds augmentation) for training; ``_get_iterator()`` makes a separate one, so the scan leaves the
    cached one untouched.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.iterators: List[Any] = []

    def __iter__(self) -> Iterator[Any]:
        make = getattr(self.loader, "_get_iterator", None)
        it = make() if isinstance(self.loader, DataLoader) and callable(make) else iter(self.loader)
        self.iterators.append(it)
        return it

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        for it in self.iterators:
            shutdown = getattr(it, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
        self.iterators = []


class _RandomStates:
    """Every random state reading data can draw from, saved at once and put back by :meth:`restore`.

    A shuffling ``DataLoader`` draws its order (and its workers' base seed) from the global torch generator,
    or from its own ``generator``; datasets may augment with ``random``, NumPy or torch (CPU or CUDA). Putting
    all of them back makes the training run bit-identical to one without the scan.
    """

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None
        self.python = random.getstate()
        self.numpy = np.random.get_state()
        self.generators: List[Tuple[torch.Generator, torch.Tensor]] = []

    def add(self, generators: Sequence[torch.Generator]) -> None:
        """Also save these generators (a loader's own), before anything draws from them."""
        known = {id(g) for g, _ in self.generators}
        self.generators += [(g, g.get_state()) for g in generators if id(g) not in known]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        for g, state in self.generators:
            g.set_state(state)


def _loader_generators(loader: Any) -> List[torch.Generator]:
    """The torch generators a loader draws from when iterated (its own, its sampler's, its batch sampler's)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    found: Dict[int, torch.Generator] = {}
    for obj in (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator):
            found[id(g)] = g
    return list(found.values())


def _streamed(loader: Any) -> bool:
    """Whether reading ``loader`` may consume what training would read: an ``IterableDataset`` (a stream, a
    queue, a generator) or an iterable that is not a ``DataLoader`` at all."""
    return not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset)


def _ordered(loader: Any) -> bool:
    """Whether ``loader`` reads its dataset in a fixed order (its first batches are no random sample)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
    if isinstance(sampler, SequentialSampler):
        return True
    # DistributedSampler (and look-alikes) with shuffle=False: each rank reads a fixed stride of the dataset
    return hasattr(sampler, "num_replicas") and getattr(sampler, "shuffle", True) is False


# Optimizers that scale each parameter's step by a running estimate of its gradient's size (or use its sign):
# the scale of the inputs then changes the first layer's updates far less than with plain gradient steps.
_ADAPTIVE_OPTIMIZERS = ("adam", "adamw", "adamax", "nadam", "radam", "sparseadam", "rmsprop", "adagrad",
                        "adadelta", "adafactor", "lion", "lamb", "sophia", "adan", "shampoo", "soap", "prodigy")


def _optimizer_list(trainer: Any) -> List[Any]:
    try:
        return list(getattr(trainer, "optimizers", None) or [])
    except Exception:  # a strategy that is not set up yet
        return []


def _optimizer_names(trainer: Any) -> str:
    return ", ".join(sorted({type(getattr(o, "optimizer", o)).__name__ for o in _optimizer_list(trainer)}))


def _adaptive_optimizer(trainer: Any) -> Optional[str]:
    """The name of the run's optimizer when every optimizer is adaptive (Adam, RMSprop, Adagrad, ... by class name,
    so fused and 8-bit variants count too), else ``None`` (SGD, an unknown optimizer, or none configured)."""
    optimizers = _optimizer_list(trainer)
    if not optimizers:
        return None
    names = []
    for opt in optimizers:
        cls = type(getattr(opt, "optimizer", opt))  # Lightning may wrap it
        stems = [c.__name__.lower() for c in cls.__mro__]
        if not any(stem.replace("fused", "").replace("8bit", "").replace("paged", "").replace("_", "")
                   .startswith(_ADAPTIVE_OPTIMIZERS) for stem in stems):
            return None
        names.append(cls.__name__)
    return ", ".join(sorted(set(names)))


def _finite_int(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


class _DataQualityMonitor(MonitorCallback):
    """Data-quality checks on every batch, on the device, with profiles and drift across splits and runs.

    **Per-batch tier** (every batch, on the device, read once per logged step; an unlogged step costs one
    copy of each field and no host sync): non-finite values per feature (``nonfinite``), labels outside
    ``[0, num_classes)`` or negative (``label_range``), values outside given, reference or learned ranges
    (``out_of_range``), a dtype or sample shape that changed (``schema``), empty batches (``empty_batch``).
    An alert for a bad batch carries the step of that batch, even though it is read at the next logged
    step. A per-batch check whose action is ``skip_step`` or ``raise`` makes the tier read its flags every
    step (one small host read, one MAX all-reduce under DDP), so the action hits the bad batch itself.

    **Distribution tier** (accumulated over each epoch, reduced once per epoch): per-feature moments and
    histograms on frozen bin edges, label counts and sample hashes. At the end of each epoch: drift of each
    evaluation split against the training split (``drift``: PSI and binned KS with thresholds that account
    for both sample sizes and the number of features), drift of any split against a reference profile
    (``drift_ref``), label shift (``label_shift``, ``label_shift_ref``: a chi-square test *and* the total
    variation distance as effect size), features that became constant (``constant``), duplicates within a split
    (``duplicates``), evaluation samples also seen in training (``leakage``) and class imbalance
    (``class_imbalance``). Once, at the first training batch: inputs far from zero mean and unit scale
    (``unnormalised``). Graded severities keep healthy runs quiet: drift is ``info`` unless a feature has both
    PSI > ``psi_warn`` (0.5) and KS > ``ks_warn`` (0.3), duplicates are ``info`` up to ``warn_above`` (50%)
    of the split. The statistics are saved as a JSON profile usable as ``reference`` of a later
    run.

    **Scan before training** (``scan_before_fit=N``, off by default; 64 in the Hydra ``default`` and
    ``strict`` policies): in ``on_train_start`` up to N batches of the train dataloader and of each val
    dataloader are read (through the batch-transfer hooks, without the model) and checked by both tiers on
    state of their own, so leakage, duplicates, class imbalance, label shift, drift, NaNs and unscaled inputs
    are reported at step 0, in alerts that say they come from the scan. All random states are restored, so the
    training run is bit-identical with and without it; the checks during training then do not repeat an
    alert (rule and subject) the scan already raised at the same or a higher severity.

    Tags: ``monitor.data/<split>/<field or field.feature or _all>/<stat>`` with stats ``nonfinite``,
    ``out_of_range``, ``schema_errors``, ``empty_batches``, ``samples``, ``dup_frac``, ``dup_count``,
    ``leak_frac``, ``leak_count``, ``psi``, ``ks``, ``psi_ref``, ``ks_ref``, ``mean``, ``std``, ``constant``,
    ``label_shift``, ``label_shift_ref``, ``imbalance``, ``classes``; label histograms under
    ``monitor.data_hist/<split>/<target>``.

    Features: the last dimension of 2-d and 3-d tensors (tabular ``[N, F]``, sequences ``[N, T, F]``), the
    channels of 4-d and 5-d tensors (``[N, C, H, W]``), a single feature for 1-d tensors; set
    ``feature_dim`` to change it. Integer targets are class labels; float targets are numeric like inputs.

    Args:
        inputs: selector(s) of the input tensors in the batch (``0``, ``"image"``, ``"inputs.ids"``); ``None``
            fits ``(x, y)`` tuples and ``{"x"/"input"/"features"/"image"/..., ...}`` dicts. ``[]``: none.
        targets: selector(s) of the targets; ``None`` fits ``(x, y)`` and ``{"y"/"label"/"target"/...}``.
        reference: path of a data profile saved by an earlier run (in Python also a path-like object or a
            :class:`~lightwatch.profile.DataProfile`): its bin edges, ranges, schema and class count are used,
            and every split is compared with it. The hint says ``str`` so that command-line parsers take it.
        every_n_steps: logging interval of the per-batch tier; ``None`` follows ``Trainer(log_every_n_steps)``.
        sample_ids: optional selector of per-sample ids (dataset indices): repeated ids are not duplicates.
        num_classes: number of classes of integer targets; ``None``: the module's ``num_classes`` attribute
            or hyperparameter, the reference, or the largest label of the first training epoch plus one.
        ignore_index: a label value that marks "no label" (cross-entropy's default ``-100``); never counted.
        feature_dim: dimension holding the features: one int for every field, or ``{field: int or None}``
            (``None``: all values of a sample are one feature). Unlisted fields use the default above.
        feature_names: ``{field: [names]}`` for tags and alerts (``x.age`` instead of ``x.3``).
        ranges: ``{field: [lo, hi]}`` or ``{field: [[lo, hi], ...]}`` per feature: hard bounds; any value
            outside is an ``out_of_range`` alert.
        schema: ``{field: {"dtype": "float32", "shape": [3, None, None]}}``: the expected dtype and sample
            shape (``None``: variable). Without it the schema comes from the reference, or is learned over
            the first training epoch (dimensions that vary are variable) and frozen after it.
        learn_ranges: after the first training epoch, use its per-feature ``[min, max]`` (widened by the
            ``out_of_range`` margin) as the range of later epochs and of evaluation splits, for fields
            without given or reference ranges.
        bins: histogram bins per feature (plus an underflow and an overflow bucket).
        max_values_per_sample: the distribution tier reads at most this many evenly strided values of each
            feature per sample (an image of 224x224 contributes 64 pixels per channel); the per-batch tier
            always reads everything.
        distribution: run the distribution tier (moments, histograms, labels, drift).
        duplicates: hash samples for duplicates and leakage.
        checks: per-check settings, ``{check: {"action": ..., "severity": ..., "enabled": bool, <params>}}``
            or ``{check: false}``; the checks and their defaults are in :data:`CHECKS`.
        profile_path: where this run's data profile is written (atomically, by global rank 0, at each
            epoch end); ``"auto"``: ``data_profile.json`` in the run directory; ``None``: not written.
        save_hashes: include the sample hashes in the profile (lets a later run find samples leaked from
            this run's training split; 8 bytes a sample).
        top_k: per-feature scalars are written for at most this many features per field (the most drifted).
        prefix: first part of every tag.
        alert_cooldown_steps: at most one record per alert rule and subject in this many steps.
        scan_before_fit: before the first optimizer step (in ``on_train_start``), read at most this many batches
            from the train dataloader and from each val dataloader, run every check on them (non-finite values,
            ranges, labels, schema, input scale, duplicates, leakage, class imbalance, label shift, drift) and
            report what they find at once, in alerts that say they come from the scan. It costs one pass of the
            data pipeline over up to this many batches per split, without the model; the training run is
            bit-identical with and without it (every random state is put back). A later alert of the same rule
            and subject (at the same or a lower severity) is not repeated. ``0``: no scan.
        scan_iterable: let the scan read dataloaders over an ``IterableDataset`` too (by default they are
            skipped: reading a stream may consume what training would read).

    Example:
        >>> from lightwatch.callbacks import DataQualityMonitor
        >>> monitor = DataQualityMonitor(inputs="image", targets="label", checks={"nonfinite": {"action": "stop"}})
        >>> monitor.checks["nonfinite"].action, monitor.checks["drift"].severity
        ('stop', 'warning')
    """

    def __init__(
        self,
        inputs: Optional[Union[Selector, Sequence[Selector]]] = None,
        targets: Optional[Union[Selector, Sequence[Selector]]] = None,
        reference: Optional[str] = None,
        every_n_steps: Optional[int] = None,
        sample_ids: Optional[Selector] = None,
        num_classes: Optional[int] = None,
        ignore_index: Optional[int] = -100,
        feature_dim: Optional[Union[int, Mapping[str, Optional[int]]]] = None,
        feature_names: Optional[Mapping[str, Sequence[str]]] = None,
        ranges: Optional[Mapping[str, Sequence[Any]]] = None,
        schema: Optional[Mapping[str, Mapping[str, Any]]] = None,
        learn_ranges: bool = True,
        bins: int = 10,
        max_values_per_sample: int = 64,
        distribution: bool = True,
        duplicates: bool = True,
        checks: Optional[Mapping[str, Any]] = None,
        profile_path: Optional[str] = "auto",
        save_hashes: bool = False,
        top_k: int = 10,
        prefix: str = "monitor",
        alert_cooldown_steps: int = 100,
        scan_before_fit: int = 0,
        scan_iterable: bool = False,
    ) -> None:
        super().__init__(every_n_steps, 0, prefix, alert_cooldown_steps)
        where = "DataQualityMonitor"
        self.selector = BatchSelector(inputs, targets, sample_ids, where=where)
        self.checks = _parse_checks(checks, where)
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) != num_classes
                                        or num_classes < 1):
            raise ValueError(f"{where}: num_classes must be a positive integer or None, got {num_classes!r}.")
        self.num_classes = None if num_classes is None else int(num_classes)
        if ignore_index is not None and (isinstance(ignore_index, bool) or int(ignore_index) != ignore_index):
            raise ValueError(f"{where}: ignore_index must be an integer or None, got {ignore_index!r}.")
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        if isinstance(feature_dim, bool) or not (feature_dim is None or isinstance(feature_dim, (int, Mapping))):
            raise ValueError(f"{where}: feature_dim must be an int, a mapping {{field: int or None}}, or None; got "
                             f"{feature_dim!r}.")
        self.feature_dim = dict(feature_dim) if isinstance(feature_dim, Mapping) else feature_dim
        self.feature_names = {str(k): [str(n) for n in v] for k, v in dict(feature_names or {}).items()}
        self.ranges = {str(k): v for k, v in dict(ranges or {}).items()}
        self.schema = self._parse_schema(schema, where)
        self.learn_ranges = bool(learn_ranges)
        if isinstance(bins, bool) or int(bins) != bins or bins < 2:
            raise ValueError(f"{where}: bins must be an integer >= 2, got {bins!r}.")
        self.bins = int(bins)
        if isinstance(max_values_per_sample, bool) or int(max_values_per_sample) != max_values_per_sample \
                or max_values_per_sample < 1:
            raise ValueError(f"{where}: max_values_per_sample must be a positive integer, got "
                             f"{max_values_per_sample!r}.")
        self.max_values_per_sample = int(max_values_per_sample)
        self.distribution = bool(distribution)
        self.duplicates = bool(duplicates)
        self.profile_path = None if profile_path is None else str(profile_path)
        self.save_hashes = bool(save_hashes)
        if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0:
            raise ValueError(f"{where}: top_k must be an integer >= 0, got {top_k!r}.")
        self.top_k = int(top_k)
        if isinstance(scan_before_fit, bool) or not isinstance(scan_before_fit, (int, float)) \
                or int(scan_before_fit) != scan_before_fit or scan_before_fit < 0:
            raise ValueError(f"{where}: scan_before_fit must be an integer >= 0 (the most batches read from the "
                             f"train and from each val dataloader before training; 0 turns the scan off), got "
                             f"{scan_before_fit!r}.")
        self.scan_before_fit = int(scan_before_fit)
        if not isinstance(scan_iterable, bool):
            raise ValueError(f"{where}: scan_iterable must be true or false (whether the scan before training may "
                             f"read dataloaders over an IterableDataset), got {scan_iterable!r}.")
        self.scan_iterable = scan_iterable
        self.reference: Optional[DataProfile] = None
        if isinstance(reference, DataProfile):
            self.reference = reference
        elif reference is not None:
            self.reference = DataProfile.load(reference)  # fail at construction: a typo must not wait an epoch
        self._immediate_checks = {name for name, c in self.checks.items()
                                  if c.enabled and CHECKS[name]["tier"] == "batch" and c.action in _IMMEDIATE_ACTIONS}
        # state shared by the splits: frozen edges, schema, classes, ranges, learned after the first epoch
        self._splits: Dict[str, _Split] = {}
        self._edges: Dict[str, torch.Tensor] = {}
        self._schemas: Dict[str, _Schema] = {}
        # number of features of each field with a feature dimension, from its first batch: every split uses it
        self._layout: Dict[str, int] = {}
        self._classes: Dict[str, int] = {}
        self._class_source: Dict[str, str] = {}
        self._label_max: Dict[str, float] = {}
        self._ranges: Dict[str, _Ranges] = {}
        self._learned = False  # the first training epoch has been folded into schema, ranges and classes
        self._profile = DataProfile()
        self._train_hashes_last = torch.zeros(0, dtype=torch.int64)
        self._reported: set = set()
        self._readback: HostReadback = HostReadback()
        self._published_step: Optional[int] = None
        self._skip_step: Optional[int] = None
        self._module_classes: Optional[int] = None
        self._notes: set = set()
        self._restored_ranges: Dict[str, Dict[str, Any]] = {}
        self._immediate_flag: Optional[torch.Tensor] = None
        self._record_only = False
        # input scale of the first training batch: (field names, device tensor [|mean|, std] per field), read
        # at the first logged step; `_scale_checked` keeps a resumed run from checking again
        self._scale_probe: Optional[Tuple[List[str], torch.Tensor, int]] = None
        self._scale_checked = False
        # padding_in_loss: training batches left to look at for padding (checked until one has some)
        self._padding_batches_left = _PADDING_BATCHES
        # the scan before training: set while it runs; the (rule, subject) it reported with their severity,
        # so the streaming checks do not report them again; done once per run (kept in checkpoints)
        self._scan: Optional[_Scan] = None
        self._scan_alerts: Dict[str, str] = {}
        self._scan_done = False
        # the batch the model gets next: (split, marker, batch, sanity check); a reference, no copy, read only
        # when training fails (`on_exception`) to name a label that crashed the loss
        self._last_batch: Optional[Tuple[str, int, Any, bool]] = None
        self._explained: set = set()

    @staticmethod
    def _parse_schema(schema: Optional[Mapping[str, Mapping[str, Any]]], where: str) -> Dict[str, _Schema]:
        out: Dict[str, _Schema] = {}
        for name, spec in dict(schema or {}).items():
            if not isinstance(spec, Mapping) or "dtype" not in spec or "shape" not in spec:
                raise ValueError(f"{where}(schema={{{name!r}: ...}}): expected {{'dtype': 'float32', 'shape': [...]}}, "
                                 f"got {spec!r}.")
            try:
                dtype = parse_dtype(spec["dtype"])
            except ValueError as err:
                raise ValueError(f"{where}(schema={{{name!r}: ...}}): {err}.") from None
            dims = list(spec["shape"])
            if any(d is not None and (isinstance(d, bool) or int(d) != d or d < 0) for d in dims):
                raise ValueError(f"{where}(schema={{{name!r}: ...}}): shape must list sizes >= 0 or None, got "
                                 f"{dims!r}.")
            out[str(name)] = _Schema(dtype, [None if d is None else int(d) for d in dims], True, "schema argument")
        return out

    # -------------------------------------------------------------------------------- public API
    @property
    def state_key(self) -> str:
        """Unique per selection and profile path, so several monitors can share a Trainer and a checkpoint."""
        return self._generate_state_key(inputs=self.selector.inputs, targets=self.selector.targets,
                                        profile_path=self.profile_path)

    @property
    def profile(self) -> DataProfile:
        """This run's data profile: the last completed epoch of each split."""
        return self._profile

    def save_profile(self, path: str) -> None:
        """Write this run's data profile to ``path`` (JSON, atomically)."""
        self._profile.save(path, with_hashes=self.save_hashes)

    # ------------------------------------------------------------------------------------- setup
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.num_classes is None:
            found = getattr(pl_module, "num_classes", None)
            hparams = getattr(pl_module, "hparams", None)
            if found is None and isinstance(hparams, Mapping):
                found = hparams.get("num_classes")
            if isinstance(found, int) and not isinstance(found, bool) and found > 0:
                self._module_classes = found

    def _split(self, name: str) -> _Split:
        sp = self._splits.get(name)
        if sp is None:
            sp = self._splits[name] = _Split(name, "step" if name == "train" else "batch")
        return sp

    @staticmethod
    def _eval_split(stage: str, dataloader_idx: int) -> str:
        return stage if dataloader_idx == 0 else f"{stage}_{dataloader_idx}"

    # ----------------------------------------------------------------------- first batch of a split
    def _setup_split(self, trainer: Any, sp: _Split, batch: Any) -> None:
        where = "DataQualityMonitor"
        fields = self.selector.resolve(batch)
        tensors = [(f, "input", self.selector.get(batch, f)) for f in fields.inputs]
        tensors += [(f, "target", self.selector.get(batch, f)) for f in fields.targets]
        specs: List[_Spec] = []
        kept: List[torch.Tensor] = []
        offset = 0
        for f, role, t in tensors:
            labels = role == "target" and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
            if t.is_complex():
                self._note(f"complex:{f.name}", f"{where}: field {f.name!r} is complex; it is not checked.")
                continue
            if t.dim() == 0:
                raise BatchSelectorError(f"{where}: field {f.name!r} is a 0-d tensor; fields need a batch dimension "
                                         f"(got shape {list(t.shape)}).")
            if labels:
                fd, nf, sum_dims = None, 1, None
            else:
                fd = self._feature_dim_of(f.name, t)
                nf = 1 if fd is None else int(self._layout.get(f.name, t.shape[fd]))
                if nf < 1:
                    raise BatchSelectorError(f"{where}: field {f.name!r} has no features along dimension {fd} "
                                             f"(shape {list(t.shape)}); set feature_dim.")
                sum_dims = None if fd is None else tuple(i for i in range(t.dim()) if i != fd)
            names = self.feature_names.get(f.name)
            if names is not None and len(names) != nf:
                raise ValueError(f"{where}(feature_names={{{f.name!r}: ...}}): {len(names)} names for {nf} features.")
            loose_slot = not labels and fd is not None and t.is_floating_point()
            width = 1 if labels else 2 * nf + int(loose_slot)
            spec = _Spec(f, role, "labels" if labels else "numeric", t.dim(), fd, nf, t.is_floating_point(), offset,
                         width, sum_dims, names, loose_slot=loose_slot)
            if fd is not None:
                self._layout.setdefault(f.name, nf)
            if not labels and fd is None and _token_like(t):
                self._note(f"tokens:{f.name}", f"{where}: field {f.name!r} holds integer ids of shape "
                                               f"{list(t.shape)} ({dtype_name(t.dtype)}): its last dimension is "
                                               f"taken as a sequence (variable length) and all its ids as one "
                                               f"feature; set feature_dim={{{f.name!r}: ...}} to change that.")
            spec.zeros = torch.zeros(nf, dtype=torch.int64, device=t.device)
            specs.append(spec)
            kept.append(t)
            offset += width
            self._check_reference_field(spec, t)
            if f.name not in self._schemas:
                self._schemas[f.name] = self._initial_schema(f.name, t)
        unknown = sorted(set(self.ranges) - {s.name for s in specs})
        if unknown:
            raise BatchSelectorError(f"{where}(ranges=...): no field named {unknown} in the {sp.name} batches; the "
                                     f"fields are {[s.name for s in specs]}.")
        device = kept[0].device if kept else torch.device("cpu")
        sp.specs, sp.sample_ids, sp.device = specs, fields.sample_ids, device
        sp.counts = torch.zeros(offset, dtype=torch.int64, device=device)  # exact; float64 only when read
        sp.first = torch.full((offset,), _NEG_INF, dtype=_F64, device=device)
        n_labels = sum(1 for s in specs if s.kind == "labels")
        sp.label_max = torch.full((n_labels,), _NEG_INF, dtype=_F64, device=device)
        sp.values = [0] * len(specs)
        sp.immediate = self._immediate_mask(specs, offset, device)
        for spec, t in zip(specs, kept):
            if spec.kind == "numeric" and spec.name not in self._ranges:
                self._init_ranges(spec, t)
        if self.distribution:
            self._init_stats(sp, specs, kept)

    def _note(self, key: str, message: str) -> None:
        if key not in self._notes:
            self._notes.add(key)
            logger.info(message)

    def _feature_dim_of(self, name: str, t: torch.Tensor) -> Optional[int]:
        fd: Any = self.feature_dim
        if (fd is None or (isinstance(fd, dict) and name not in fd)) and _token_like(t):
            # token ids: a position is no feature (position 23 exists only in the longest batches, and holds
            # padding in most samples); all ids of a sample are one feature
            return None
        if isinstance(fd, dict):
            if name not in fd:
                return _default_feature_dim(t.dim())
            fd = fd[name]
            if fd is None:
                return None
        elif fd is None or t.dim() <= 1:  # one dimension for all fields: 1-d fields have one feature anyway
            return _default_feature_dim(t.dim())
        d = int(fd) + (t.dim() if fd < 0 else 0)
        if not 1 <= d < t.dim():
            raise ValueError(f"DataQualityMonitor(feature_dim=...): {fd} is not a feature dimension of field {name!r} "
                             f"with shape {list(t.shape)} (dimension 0 is the batch).")
        return d

    def _immediate_mask(self, specs: List[_Spec], k: int, device: torch.device) -> Optional[torch.Tensor]:
        if not self._immediate_checks:
            return None
        mask = torch.zeros(k, dtype=torch.int64)
        for s in specs:
            if s.kind == "labels":
                mask[s.offset] = int("label_range" in self._immediate_checks)
            else:
                f = s.num_features
                mask[s.offset:s.offset + f] = int("nonfinite" in self._immediate_checks)
                mask[s.offset + f:s.offset + 2 * f] = int("out_of_range" in self._immediate_checks)
                if s.loose_slot:
                    mask[s.offset + 2 * f] = int("nonfinite" in self._immediate_checks)
        return mask.to(device)

    def _reference_field(self, name: str, split: str = "train") -> Optional[FieldProfile]:
        if self.reference is None:
            return None
        ref = self.reference.split(split, fallback=("train", "val"))
        return ref.fields.get(name) if ref is not None else None

    def _check_reference_field(self, spec: _Spec, t: torch.Tensor) -> None:
        if self.reference is None:
            return
        ref = self._reference_field(spec.name)
        if ref is None:
            self._note(f"noref:{spec.name}", f"DataQualityMonitor: the reference profile has no field {spec.name!r}; "
                                             f"it is not compared with the reference.")
            return
        ref.check_layout(spec.num_features, spec.kind, f"DataQualityMonitor(reference={self.reference.source})")

    def _initial_schema(self, name: str, t: torch.Tensor) -> _Schema:
        if name in self.schema:
            return self.schema[name]
        ref = self._reference_field(name)
        if ref is not None:
            return _Schema(parse_dtype(ref.dtype), list(ref.shape), True, "reference profile")
        dims: List[Optional[int]] = list(t.shape[1:])
        if _token_like(t):
            dims[-1] = None  # token ids, masks, per-token labels: padded to each batch's longest sequence
        return _Schema(t.dtype, dims, False, "first training epoch")

    def _init_ranges(self, spec: _Spec, t: torch.Tensor) -> None:
        given = self.ranges.get(spec.name)
        if given is not None:
            bounds = self._given_bounds(spec, given)
            self._ranges[spec.name] = self._make_ranges(spec, bounds, hard=True, source="given ranges", n_ref=0,
                                                        device=t.device)
            return
        restored = self._restored_ranges.pop(spec.name, None)
        if restored is not None and len(restored["bounds"]) == spec.num_features:
            bounds = [(float(lo), float(hi)) for lo, hi in restored["bounds"]]
            self._ranges[spec.name] = self._make_ranges(spec, bounds, hard=False, source=str(restored["source"]),
                                                        n_ref=int(restored["n_ref"]), device=t.device)
            return
        ref = self._reference_field(spec.name)
        if ref is not None and ref.kind == "numeric":
            mm = ref.value_range()
            split = self.reference.split("train", ("val",)) if self.reference else None
            if mm is not None and split is not None:
                self._ranges[spec.name] = self._learned_ranges(spec, mm, "the reference profile", split.samples,
                                                               t.device)

    def _given_bounds(self, spec: _Spec, given: Any) -> List[Tuple[float, float]]:
        where = f"DataQualityMonitor(ranges={{{spec.name!r}: ...}})"
        items = list(given)
        try:
            if len(items) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
                bounds = [(float(items[0]), float(items[1]))] * spec.num_features
            else:
                bounds = [(float(lo), float(hi)) for lo, hi in (list(pair) for pair in items)]
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected [lo, hi] or one [lo, hi] per feature, got {given!r}.") from None
        if len(bounds) != spec.num_features:
            raise ValueError(f"{where}: {len(bounds)} [lo, hi] pairs for {spec.num_features} features.")
        if any(not lo <= hi for lo, hi in bounds):
            raise ValueError(f"{where}: every range needs lo <= hi, got {bounds[:4]}.")
        return bounds

    def _learned_ranges(self, spec: _Spec, minmax: Tuple[List[float], List[float]], source: str, n_ref: int,
                        device: torch.device) -> _Ranges:
        margin = self.checks["out_of_range"]["margin"]
        bounds = []
        for lo, hi in zip(*minmax):
            if not (math.isfinite(lo) and math.isfinite(hi)):
                bounds.append((-math.inf, math.inf))  # no finite reference value: nothing to check against
                continue
            pad = margin * (hi - lo)
            bounds.append((lo - pad, hi + pad))
        return self._make_ranges(spec, bounds, hard=False, source=source, n_ref=n_ref, device=device)

    @staticmethod
    def _make_ranges(spec: _Spec, bounds: List[Tuple[float, float]], hard: bool, source: str, n_ref: int,
                     device: torch.device) -> _Ranges:
        shape = [1] * spec.ndim
        if spec.feature_dim is not None:
            shape[spec.feature_dim] = spec.num_features
        lo = torch.tensor([b[0] for b in bounds], dtype=_F64).reshape(shape).to(device)
        hi = torch.tensor([b[1] for b in bounds], dtype=_F64).reshape(shape).to(device)
        return _Ranges(lo, hi, hard, source, int(n_ref), bounds)

    def _init_stats(self, sp: _Split, specs: List[_Spec], tensors: List[torch.Tensor]) -> None:
        """Histograms need frozen edges: from the reference, or from the first batch (averaged over ranks)."""
        missing = [(s, t) for s, t in zip(specs, tensors) if s.kind == "numeric" and s.name not in self._edges]
        from_data: List[Tuple[_Spec, torch.Tensor]] = []
        for s, t in missing:
            ref = self._reference_field(s.name)
            if ref is not None and ref.histogram is not None and ref.histogram.num_features == s.num_features:
                self._edges[s.name] = ref.histogram.edges.to(torch.float64).cpu()
            else:
                sample = _feature_matrix(t.detach(), s.feature_dim, self.max_values_per_sample)
                from_data.append((s, quantile_edges(sample, bins=self.bins)))  # on the device, no host read
        if from_data:
            flat = torch.cat([e.reshape(-1) for _, e in from_data])
            if distributed_ready():  # once per run: every rank takes the mean of the ranks' quantiles
                all_reduce_flat(flat, None)
                flat /= world_size()
            for (s, e), part in zip(from_data, flat.split([e.numel() for _, e in from_data])):
                # stays on the device: copied to the host only when a profile or checkpoint is written
                self._edges[s.name] = strictly_increasing(part.reshape(e.shape).clone())
        for s in specs:
            if s.name in sp.acc:
                continue
            if s.kind == "numeric":
                ref = self._reference_field(s.name)
                shift = None
                if ref is not None and ref.moments is not None and ref.moments.num_features == s.num_features:
                    shift = ref.moments.compute()["mean"]
                for store in (sp.acc, sp.glob):
                    store[s.name] = Moments(num_features=s.num_features, shift=shift, device=sp.device)
                    # edges built here are valid by construction: no check, which would read them to the host
                    store[s.name + "\0hist"] = Histogram(self._edges[s.name].clone(), device=sp.device, _trusted=True)
            else:
                capacity = self._known_classes(s.name) or _LABEL_CAPACITY
                for store in (sp.acc, sp.glob):
                    store[s.name] = _LabelTally(capacity, self.ignore_index, device=sp.device)

    def _known_classes(self, name: str) -> Optional[int]:
        if name in self._classes:
            return self._classes[name]
        if self.num_classes is not None:
            source, n = "num_classes argument", self.num_classes
        elif self._module_classes is not None:
            source, n = "the module's num_classes", self._module_classes
        else:
            ref = self._reference_field(name)
            if ref is None or ref.kind != "labels" or not ref.num_classes:
                return None
            source, n = "the reference profile", ref.num_classes
        self._classes[name], self._class_source[name] = int(n), source
        return int(n)

    # ------------------------------------------------------------------------------ the hot path
    def _observe(self, trainer: Any, pl_module: Any, sp: _Split, batch: Any, marker: int) -> None:
        """Take one batch: host-side checks (schema, emptiness), then a copy of each field into the buffer."""
        if sp.specs is None:
            self._setup_split(trainer, sp, batch)
        assert sp.specs is not None
        tensors = [self.selector.get(batch, s.field) for s in sp.specs]
        if not tensors:
            return
        n = int(tensors[0].shape[0])
        sp.batches += 1
        sp.epoch_batches += 1
        sp.batches_in_epoch += 1
        sp.pending = True  # set on every rank alike: it decides whether a reduction is due
        if n == 0:
            sp.empty += 1
            sp.first_empty = max(sp.first_empty, -float(marker))
            return
        # DistributedSampler pads every rank to the same length with repeated samples: they are not data.
        keep = n if sp.row_limit is None else max(0, min(n, sp.row_limit - sp.rows_seen))
        sp.rows_seen += n
        if keep == 0:
            return
        sp.samples += keep
        sp.epoch_samples += keep
        parts: List[Optional[torch.Tensor]] = []
        loose: Dict[int, torch.Tensor] = {}
        for i, (s, t) in enumerate(zip(sp.specs, tensors)):
            usable, is_loose = self._check_schema(sp, s, t, marker)
            if not usable or t.dim() == 0 or t.shape[0] != n:
                parts.append(None)
                continue
            t = t.detach()
            if is_loose:
                parts.append(None)
                if s.floating:
                    loose[i] = t[:keep] if keep < n else t
                continue
            parts.append(t[:keep] if keep < n else t)
            sp.values[i] += parts[-1].numel()
        ids = None
        if self.duplicates and sp.sample_ids is not None:
            ids = self.selector.get(batch, sp.sample_ids).detach().reshape(-1)[:keep]
        if not sp.buffer.fits(parts):  # variable sample shapes cannot be concatenated: fold what is there
            self._fold(sp)
        size = sum(p.numel() * p.element_size() for p in parts if p is not None)
        direct = not sp.buffer.batches and (size >= _BUFFER_BYTES or bool(self._immediate_checks))
        if not direct:  # kept past this hook: copy, since training code may change the batch in place
            parts = [None if p is None else p.clone() for p in parts]
            ids = None if ids is None else ids.clone()
            loose = {i: v.clone() for i, v in loose.items()}
        sp.buffer.add(_Pending(parts, marker, keep, ids, loose))
        if direct or sp.buffer.nbytes >= _BUFFER_BYTES:
            self._fold(sp)

    def _fold(self, sp: _Split) -> None:
        """Check and count the buffered batches on the device: no host sync, no collective.

        Per field: non-finite values and values outside the ranges (per feature), labels outside the class
        range, each with the first marker (step) at which it occurred, taken from per-row markers; then the
        distribution statistics and the sample hashes.
        """
        buf = sp.buffer
        if not buf.batches or sp.specs is None or sp.counts is None or sp.first is None:
            buf.clear()
            return
        device = sp.counts.device
        counts: List[torch.Tensor] = []
        firsts: List[torch.Tensor] = []
        label_maxes: List[torch.Tensor] = []
        for i, s in enumerate(sp.specs):
            if s.loose_slot:
                loose = [b for b in buf.batches if i in b.loose]
                if loose:
                    flags = [torch.isfinite(b.loose[i]).logical_not_().reshape(b.loose[i].shape[0], -1).any(1)
                             for b in loose]
                    rows = torch.cat(flags)
                    marks = torch.tensor([float(b.marker) for b, f in zip(loose, flags) for _ in range(f.shape[0])],
                                         dtype=_F64).to(device)
                    loose_count = sum(torch.isfinite(b.loose[i]).logical_not_().sum() for b in loose).reshape(1)
                    loose_first = torch.where(rows, marks, math.inf).amin().reshape(1)
                else:
                    loose_count = torch.zeros(1, dtype=torch.int64, device=device)
                    loose_first = torch.full((1,), math.inf, dtype=_F64, device=device)
            batches = [b for b in buf.batches if b.parts[i] is not None]
            if not batches:
                counts.append(torch.zeros(s.width, dtype=torch.int64, device=device))
                firsts.append(torch.full((s.width,), math.inf, dtype=_F64, device=device))
                if s.loose_slot:
                    counts[-1][-1:] = loose_count
                    firsts[-1][-1:] = loose_first
                continue
            x = torch.cat([b.parts[i] for b in batches]) if len(batches) > 1 else batches[0].parts[i]
            assert x is not None
            markers = self._row_markers(batches, device).reshape((-1,) + (1,) * (x.dim() - 1))
            if s.kind == "labels":
                bad = x < 0
                if self.ignore_index is not None:
                    bad &= x != self.ignore_index
                classes = self._classes_for(sp, s.name)
                if classes is not None:
                    bad |= x >= classes
                counts.append(bad.sum().reshape(1))
                firsts.append(torch.where(bad, markers, math.inf).amin().reshape(1))
                valid = x if self.ignore_index is None or self.ignore_index < 0 else \
                    torch.where(x == self.ignore_index, torch.full_like(x, -1), x)
                label_maxes.append(valid.amax().to(_F64))
            else:
                for bad in self._numeric_flags(s, x):
                    if bad is None:
                        counts.append(s.zeros)
                        firsts.append(torch.full((s.num_features,), math.inf, dtype=_F64, device=device))
                        continue
                    counts.append(bad.sum(dim=s.sum_dims) if s.sum_dims is not None else bad.sum().reshape(1))
                    rows = self._rows_by_feature(bad, s)  # [rows, F]: which samples hold a bad value
                    firsts.append(torch.where(rows, markers.reshape(-1, 1), math.inf).amin(0))
                if s.loose_slot:
                    counts.append(loose_count)
                    firsts.append(loose_first)
            if self.distribution:
                if s.kind == "labels":
                    sp.acc[s.name].update(x)
                else:
                    sample = _feature_matrix(x, s.feature_dim, self.max_values_per_sample).to(_F64)
                    sp.acc[s.name].update(sample)
                    sp.acc[s.name + "\0hist"].update(sample)
        vec = torch.cat(counts)
        sp.counts.add_(vec)
        torch.maximum(sp.first, torch.cat(firsts).neg(), out=sp.first)
        if label_maxes and sp.label_max is not None:
            torch.maximum(sp.label_max, torch.stack(label_maxes), out=sp.label_max)
        if sp.immediate is not None:
            self._immediate_flag = (vec * sp.immediate).sum()
        if self.duplicates:
            inputs = [i for i, s in enumerate(sp.specs) if s.role == "input"]
            hashed = [b for b in buf.batches if inputs and all(b.parts[i] is not None for i in inputs)]
            if hashed:
                fields = [torch.cat([b.parts[i] for b in hashed]) for i in inputs]  # type: ignore[misc]
                ids = None
                if all(b.ids is not None for b in hashed):
                    ids = torch.cat([b.ids for b in hashed])  # type: ignore[misc]
                sp.hasher.update(fields, sample_ids=ids)
        buf.clear()

    def _numeric_flags(self, s: _Spec, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Element-wise masks of non-finite values and of values outside the field's ranges (or ``None``)."""
        nonfinite = torch.isfinite(x).logical_not_() if s.floating else None
        rng = self._ranges.get(s.name)
        outside = ((x < rng.lo) | (x > rng.hi)) if rng is not None else None
        return nonfinite, outside

    @staticmethod
    def _rows_by_feature(bad: torch.Tensor, s: _Spec) -> torch.Tensor:
        """``[rows, F]``: whether each sample has a flagged value in each feature (one reduction, no copy)."""
        if s.feature_dim is None:
            return bad.reshape(bad.shape[0], -1).any(1, keepdim=True)
        dims = tuple(d for d in range(1, bad.dim()) if d != s.feature_dim)
        return bad.any(dim=dims) if dims else bad

    @staticmethod
    def _row_markers(batches: List[_Pending], device: torch.device) -> torch.Tensor:
        """The marker of every buffered row, as float64 on ``device`` (one host-to-device copy)."""
        host = torch.tensor([float(b.marker) for b in batches for _ in range(b.rows)], dtype=_F64)
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)

    def _classes_for(self, sp: _Split, name: str) -> Optional[int]:
        """The class count labels are checked against: known, or (evaluation splits during the first epoch) the
        largest training label seen so far plus one."""
        classes = self._classes.get(name)
        if classes is None and sp.name != "train":
            largest = self._label_max.get(name)
            if largest is not None and math.isfinite(largest) and largest >= 0:
                classes = int(largest) + 1
        return classes

    def _check_schema(self, sp: _Split, s: _Spec, t: torch.Tensor, marker: int) -> Tuple[bool, bool]:
        """Host-side comparison of dtype and shape with the expected schema.

        Returns ``(usable, loose)``: ``usable`` false leaves the batch's field out of the checks and statistics;
        ``loose`` means its feature dimension is variable and has another size than the field's layout, so its
        values are checked as a whole (non-finite values) but not per feature.
        """
        exp = self._schemas.get(s.name)
        if exp is None:
            return True, False
        problems = []
        usable = True
        loose = False
        if t.dtype != exp.dtype:
            problems.append(f"dtype {dtype_name(t.dtype)} (expected {dtype_name(exp.dtype)})")
            # numbers of another dtype still count; labels that stopped being integers do not
            usable = s.kind == "numeric" or not (t.is_floating_point() or t.is_complex())
        dims = list(t.shape[1:])
        if len(dims) != len(exp.dims):
            problems.append(f"sample shape {dims} (expected {exp.describe()})")
            usable = False
        else:
            same_kind = t.dtype == exp.dtype
            for i, (got, want) in enumerate(zip(dims, exp.dims)):
                feature = s.feature_dim is not None and i + 1 == s.feature_dim
                if feature and got != s.num_features and (want is None or (not exp.frozen and same_kind)):
                    # a variable feature dimension (a sequence): learned while the schema is learned, or given
                    loose = True
                    if want is not None:
                        exp.dims[i] = None
                        self._note(f"vardim:{s.name}:{i + 1}", (
                            f"DataQualityMonitor: dimension {i + 1} of field {s.name!r} varies ({want} then {got}) "
                            f"while its dtype and other dimensions stay the same: it is taken as a variable "
                            f"(sequence) dimension, not a schema change. Its values are checked for non-finite "
                            f"values; per-feature statistics keep the {s.num_features} features of the first "
                            f"batches' size. Set feature_dim for this field to change that."))
                    continue
                if want is None or got == want:
                    continue
                if feature:
                    problems.append(f"{got} features along dimension {i + 1} (expected {want})")
                    usable = False
                elif exp.frozen:
                    problems.append(f"size {got} in dimension {i + 1} (expected {want}, from the {exp.source})")
                else:
                    exp.dims[i] = None  # still learning: a dimension that varies is variable
        if problems:
            sp.schema_errors += 1
            sp.first_schema = max(sp.first_schema, -float(marker))
            sp.schema_notes.setdefault(s.name, "; ".join(problems))
        return usable, loose and usable

    # ---------------------------------------------------------------------------------- hooks: train
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        sp = self._split("train")
        sp.reset_epoch()

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._readback.pending:  # values of an earlier logged step (CUDA: read one step late)
            self._publish_pending(trainer, pl_module)
        sp = self._split("train")
        if not sp.limit_known:
            sp.row_limit, sp.limit_known = self._row_limit(getattr(trainer, "train_dataloader", None)), True
        step = logging_step(trainer)
        self._immediate_flag = None
        self._last_batch = ("train", step, batch, False)
        self._observe(trainer, pl_module, sp, batch, step)
        if not self._scale_checked:
            self._check_scale(trainer, pl_module, sp, batch, step)
        if self._padding_batches_left > 0:
            self._check_padding(trainer, pl_module, sp, batch, step)
        if self._immediate_checks and self._immediate_triggered(sp):
            self._flush_step(trainer, pl_module, sp, step, synchronous=True)
            return
        if self.sampled and step != self._published_step:
            self._flush_step(trainer, pl_module, sp, step)

    def _check_scale(self, trainer: Any, pl_module: Any, sp: _Split, batch: Any, step: int) -> None:
        """``unnormalised``: |mean| of every floating input field of the first training batch.

        Fires when both ``|mean| > max_abs_mean`` and the RMS ``sqrt(mean^2 + std^2) > min_rms``. Computed on
        the device at the first batch and read at the first logged step (one small copy and, under DDP,
        one MAX over ranks, once per run).
        Standardised inputs have a batch mean near 0 (|mean| <= 0.05 on the digits suite); raw pixels or raw
        physical units sit far from it (4.7 for 0..16 pixels) and slow or stall training.
        """
        check = self.checks["unnormalised"]
        if not check.enabled or sp.specs is None:
            self._scale_checked = True
            return
        if self._scale_probe is None:
            names, rows = [], []
            for s in sp.specs:
                if s.role != "input" or s.kind != "numeric" or not s.floating:
                    continue
                t = self.selector.get(batch, s.field)
                if not isinstance(t, torch.Tensor) or t.numel() == 0:
                    continue
                x = t.detach().to(torch.float32)
                finite = torch.where(torch.isfinite(x), x, torch.nan)  # a NaN is data_nonfinite's business
                mean = torch.nanmean(finite)
                std = torch.nanmean((finite - mean).square()).sqrt()
                names.append(s.name)
                rows.append(torch.stack([mean.abs(), std]))
            if not rows:
                self._scale_checked = True
                return
            self._scale_probe = (names, torch.stack(rows), step)
        if not self.sampled:
            return  # no host read on a step that is not logged
        names, probe, first = self._scale_probe
        self._scale_probe, self._scale_checked = None, True
        # ranks see different first batches: the largest |mean| and std decide, so every rank raises the same
        # alert (and takes the same action); one MAX, once per run
        values = agree_max(probe).tolist()
        limit, min_rms, ratio = check["max_abs_mean"], check["min_rms"], check["offset_ratio"]
        adaptive = _adaptive_optimizer(trainer)
        for name, (abs_mean, std) in zip(names, values):
            rms = math.sqrt(abs_mean ** 2 + std ** 2)
            if math.isfinite(rms) and abs_mean > limit and rms > min_rms:
                if adaptive is None:
                    strong = True
                    why = (f"with {_optimizer_names(trainer) or 'this optimizer'}, whose steps scale with the "
                           f"inputs' second moment, raw pixels or raw units slow or stall training")
                else:
                    strong = abs_mean > ratio * std
                    why = (f"{adaptive} normalises each weight's step, so the scale itself costs little, " + (
                        f"but an offset of more than {ratio:g} x the spread (here {abs_mean / max(std, 1e-12):.3g}) "
                        f"dominates the first layer and slows training" if strong else
                        f"and the offset is within {ratio:g} x the spread (here {abs_mean / max(std, 1e-12):.3g}); "
                        f"a mild cost at most"))
                self._raise(trainer, pl_module, check, subject=f"train/{name}", value=abs_mean, threshold=limit,
                            step=first, severity=check.graded(strong), message=(
                                f"inputs are not standardised: mean |x| = {abs_mean:.3g} (std {std:.3g}, RMS "
                                f"{rms:.3g}) over the first training batch (step {first}) of input {name!r}, above "
                                f"|mean| {limit:g} and RMS {min_rms:g}: {why}; normalise the inputs (e.g. z-score "
                                f"per feature with the training statistics)."))

    def _check_padding(self, trainer: Any, pl_module: Any, sp: _Split, batch: Any, step: int) -> None:
        """``padding_in_loss``: per-token labels at padded positions that the loss counts (not ``ignore_index``).

        Looks at the first training batches (at most 16) until one holds padding: a batch mapping with an
        ``attention_mask`` that has zeros, beside a label field of the same shape. One small host read per such
        batch (under DDP one MAX first, so every rank stops at the same batch); nothing afterwards.
        """
        check = self.checks["padding_in_loss"]
        if not check.enabled or sp.specs is None or not isinstance(batch, Mapping):
            self._padding_batches_left = 0
            return
        mask = next((batch[k] for k in _MASK_KEYS if isinstance(batch.get(k), torch.Tensor)), None)
        labels = [(s, self.selector.get(batch, s.field)) for s in sp.specs if s.role == "target" and s.kind == "labels"]
        labels = [(s, t) for s, t in labels if isinstance(t, torch.Tensor) and mask is not None and t.shape == mask.shape
                  and t.dim() >= 2]
        if not labels or self.ignore_index is None:
            self._padding_batches_left = 0
            return
        self._padding_batches_left -= 1
        padded = mask == 0
        rows = []
        for _, t in labels:
            counted = (t != self.ignore_index) & padded
            rows.append(torch.stack([padded.sum().float(), counted.sum().float()]))
        probe = torch.stack(rows)
        values = agree_max(probe).tolist()  # the rank with the most padding speaks for all, alike on every rank
        if all(n_pad == 0 for n_pad, _ in values):
            return  # no padding in this batch: look at the next one
        self._padding_batches_left = 0
        for (s, _), (n_pad, counted) in zip(labels, values):
            share = counted / n_pad if n_pad > 0 else 0.0
            if share > check["threshold"]:
                self._raise(trainer, pl_module, check, subject=f"train/{s.name}", value=share,
                            threshold=check["threshold"], step=step, message=(
                                f"{100 * share:.3g}% of the padded positions (attention_mask 0) of training batch at "
                                f"step {step} have a label in {s.name!r} other than ignore_index "
                                f"{self.ignore_index}: the loss counts the padding, so the model is also trained to "
                                f"predict pad tokens and the loss reads better than the model is. Set the labels "
                                f"of padded positions to {self.ignore_index} in the collate (HF's "
                                f"DataCollatorForLanguageModeling does), or pass ignore_index to the loss."))

    def _immediate_triggered(self, sp: _Split) -> bool:
        """Every step, when a per-batch check acts on the batch itself: one host read (and one MAX)."""
        device = sp.device or torch.device("cpu")
        host = float(("schema" in self._immediate_checks and sp.schema_errors > 0)
                     or ("empty_batch" in self._immediate_checks and sp.empty > 0))
        flag = torch.zeros(1, dtype=_F64, device=device) + host
        if self._immediate_flag is not None:
            flag += self._immediate_flag
        agree_max(flag)
        return float(flag.item()) > 0  # the one documented per-step sync of immediate actions

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._skip_step is not None and self._skip_step == logging_step(trainer):
            from lightwatch.core.recovery import recovery_for

            recovery_for(trainer).apply_pending_skip(trainer, pl_module)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        sp = self._splits.get("train")
        if sp is None or sp.specs is None:
            return
        if self._readback.pending:
            self._publish_pending(trainer, pl_module)
        self._epoch_end(trainer, pl_module, sp)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._readback.pending:
            self._publish_pending(trainer, pl_module)
        sp = self._splits.get("train")
        if sp is not None and sp.specs is not None and sp.pending:
            self._flush_step(trainer, pl_module, sp, logging_step(trainer), synchronous=True)

    # ------------------------------------------------------------------ hooks: the scan before training
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """With ``scan_before_fit``: scan the train and val dataloaders before the first optimizer step."""
        super().on_train_start(trainer, pl_module)
        if self.scan_before_fit <= 0 or self._scan_done:
            return
        # a run resumed past its start (or restarted mid-way) has scanned already, or has trained on the data
        if int(getattr(trainer, "global_step", 0)) > 0 or logging_step(trainer) > 0:
            self._scan_done = True
            return
        self._scan_done = True
        self._scan_alerts = {}
        self._scan_data(trainer, pl_module)

    def _scan_sources(self, trainer: Any) -> List[Tuple[str, int, Any, List[Any], Optional[int]]]:
        """``(split, dataloader_idx, iterable, loaders, batches in an epoch)`` for the train split and each val
        dataloader, in the same order on every rank; streamed loaders are left out (with a note)."""
        CombinedLoader = importlib.import_module(
            f"{package_of(trainer).__name__}.utilities.combined_loader").CombinedLoader

        sources: List[Tuple[str, int, Any, List[Any], Optional[int]]] = []
        fit_loop = trainer.fit_loop
        combined = getattr(fit_loop, "_combined_loader", None)
        if combined is not None:
            # a fresh CombinedLoader over the same loaders yields the batch the training step gets (a collection
            # of batches for several train dataloaders), without touching the fit loop's iterator
            fresh = CombinedLoader(combined.iterables, getattr(combined, "_mode", "max_size_cycle"))
            loaders = list(fresh.flattened)
            if self._scannable("train", loaders):
                fresh.flattened = [_FreshIterable(dl) for dl in loaders]
                sources.append(("train", 0, fresh, loaders, _finite_int(getattr(trainer, "num_training_batches",
                                                                                    None))))
        val_loop = fit_loop.epoch_loop.val_loop
        if getattr(trainer, "enable_validation", False) and getattr(val_loop, "_combined_loader", None) is None:
            # no sanity check and no validation in the first epoch: load the val dataloaders now, as the fit
            # loop itself does when validation runs in the first epoch (they are not loaded again later)
            trainer.validating = True
            try:
                val_loop.setup_data()
            finally:
                trainer.training = True
        val_combined = getattr(val_loop, "_combined_loader", None)
        if val_combined is None:
            self._note("scan:noval", "DataQualityMonitor: no validation dataloader; the scan before training reads the "
                                     "train split only.")
            return sources
        limits = list(getattr(val_loop, "_max_batches", None) or [])
        for idx, loader in enumerate(val_combined.flattened):
            split = self._eval_split("val", idx)
            if self._scannable(split, [loader]):
                sources.append((split, idx, _FreshIterable(loader), [loader],
                                _finite_int(limits[idx]) if idx < len(limits) else None))
        return sources

    def _scannable(self, split: str, loaders: List[Any]) -> bool:
        if self.scan_iterable or not any(_streamed(dl) for dl in loaders):
            return True
        self._note(f"scan:stream:{split}",
                   f"DataQualityMonitor: the {split} dataloader reads an IterableDataset (or is not a torch "
                   f"DataLoader): reading it may consume what training would read, so the scan before training "
                   f"skips it; scan_iterable=True scans it anyway.")
        return False

    def _scan_batch(self, trainer: Any, pl_module: Any, split: str, idx: int, raw: Any) -> Any:
        """The batch as the training or validation step gets it: precision conversion and the batch-transfer
        hooks (``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``), with
        the Trainer in the matching stage, since hooks often augment in training only."""
        evaluation = split != "train"
        if evaluation:
            trainer.validating = True
        try:
            batch = trainer.precision_plugin.convert_input(raw)
            before = getattr(pl_module, "_on_before_batch_transfer", None)
            if callable(before):
                batch = before(batch, dataloader_idx=idx)
            return trainer.strategy.batch_to_device(batch, dataloader_idx=idx)
        finally:
            if evaluation:
                trainer.training = True

    def _scan_data(self, trainer: Any, pl_module: Any) -> None:
        """Read up to ``scan_before_fit`` batches of each split, check them on separate state, report at once.

        Collectives (under DDP) are the same on every rank: the batch counts are agreed first (the smallest
        over the ranks, 0 when any rank has none: that split is skipped everywhere), so the once-per-split
        reductions (and the first batch's edge and scale agreements) happen on every rank alike.
        """
        started = time.perf_counter()
        # saved before the val dataloaders may be loaded: a val_dataloader() hook may draw random numbers too
        states = _RandomStates()
        sources: List[Tuple[str, int, Any, List[Any], Optional[int]]] = []
        saved = self._enter_scan()
        iterators: List[Any] = []
        try:
            sources = self._scan_sources(trainer)
            states.add([g for _, _, _, loaders, _ in sources for dl in loaders for g in _loader_generators(dl)])
            firsts: List[Any] = []
            planned: List[int] = []
            end = object()
            for split, idx, iterable, loaders, epoch_batches in sources:
                limit = self.scan_before_fit if epoch_batches is None else min(self.scan_before_fit, epoch_batches)
                it = iter(iterable) if limit > 0 else iter(())
                iterators.append(it)
                first = next(it, end)
                firsts.append(first)
                planned.append(0 if first is end else limit)
            device = getattr(trainer.strategy, "root_device", None) or torch.device("cpu")
            counts = self._agree_counts(planned, device)
            n_train = sum(c for (split, *_), c in zip(sources, counts) if split == "train")
            n_val = sum(c for (split, *_), c in zip(sources, counts) if split != "train")
            partial = tuple(split for (split, _, _, loaders, epoch_batches), c in zip(sources, counts)
                            if c and (epoch_batches is None or c < epoch_batches)
                            and any(_ordered(dl) for dl in loaders))
            for split in partial:
                self._note(f"scan:partial:{split}",
                           f"DataQualityMonitor: the {split} dataloader reads in a fixed order and the scan reads "
                           f"only its first batches: their distribution is no sample of the split, so drift, label "
                           f"shift, class balance and constant features are left to the checks during training.")
            self._scan = _Scan(n_train, n_val, world_size(), partial)
            signal = NeighbourLabelAgreement() if self.checks["labels_unrelated"].enabled and n_train else None
            for (split, idx, _, loaders, _), it, first, count in zip(sources, iterators, firsts, counts):
                if count <= 0:
                    continue
                sp = self._split(split)
                sp.row_limit, sp.limit_known = (self._row_limit(loaders[0]) if len(loaders) == 1 else None), True
                raw = first
                for i in range(count):
                    if i:
                        raw = next(it, end)
                        if raw is end:
                            break
                    if split == "train":
                        raw = raw[0]  # CombinedLoader yields (batch, batch_idx, dataloader_idx)
                    batch = self._scan_batch(trainer, pl_module, split, idx, raw)
                    self._observe(trainer, pl_module, sp, batch, i)  # marker: the batch index in the scan
                    if split == "train" and signal is not None and not signal.full:
                        self._sample_labels(sp, batch, signal)
                    if split == "train" and i == 0:
                        self.sampled = True  # read the input scale of the first batch now
                        self._check_scale(trainer, pl_module, sp, batch, 0)
                        self.sampled = False
                    if split == "train" and self._padding_batches_left > 0:
                        self._check_padding(trainer, pl_module, sp, batch, 0)
                if sp.specs is not None:
                    self._epoch_end(trainer, pl_module, sp)
            if signal is not None:
                self._check_labels_unrelated(trainer, pl_module, signal, device)
            logger.info("lightwatch: DataQualityMonitor scanned %d train and %d val batch(es) before training in "
                        "%.2f s", n_train, n_val, time.perf_counter() - started)
        finally:
            for _, _, iterable, _, _ in sources:
                for fresh in (iterable.flattened if hasattr(iterable, "flattened") else [iterable]):
                    if isinstance(fresh, _FreshIterable):
                        fresh.close()
            self._leave_scan(saved)
            states.restore()

    def _sample_labels(self, sp: _Split, batch: Any, signal: NeighbourLabelAgreement) -> None:
        """Rows of the first floating input and of the class labels, for ``labels_unrelated``."""
        specs = sp.specs or []
        inputs = [s for s in specs if s.role == "input" and s.kind == "numeric" and s.floating]
        labels = [s for s in specs if s.role == "target" and s.kind == "labels"]
        if len(inputs) >= 1 and len(labels) == 1:
            x, y = self.selector.get(batch, inputs[0].field), self.selector.get(batch, labels[0].field)
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and y.dim() == 1:
                signal.update(x, y)

    def _check_labels_unrelated(self, trainer: Any, pl_module: Any, signal: NeighbourLabelAgreement,
                                device: torch.device) -> None:
        """``labels_unrelated``: the scanned labels agree with their nearest neighbours' no more than by chance.

        One SUM all-reduce of four numbers under DDP (every rank scanned the agreed number of train batches).
        """
        check = self.checks["labels_unrelated"]
        sums = signal.sums().to(device)
        all_reduce_flat(sums, None)
        found = NeighbourLabelAgreement.score(sums.cpu())
        if found["rows"] < check["min_rows"] or not found["z"] < check["min_z"]:
            return
        self._raise(
            trainer, pl_module, check, subject="train/_all", value=found["z"], threshold=check["min_z"], step=0,
            message=(f"the training labels look unrelated to the inputs: the nearest neighbour (standardised inputs) "
                     f"of a training sample carries the same label for {found['agreement']:.1%} of "
                     f"{int(found['rows'])} scanned samples, which is chance ({found['chance']:.1%}; z = "
                     f"{found['z']:.2g}). Likely: labels shuffled or misaligned with their inputs (a sort or a "
                     f"shuffle applied to one of them, a join on the wrong key). Fine for inputs whose raw "
                     f"distances mean little (token ids, raw audio); if the loss then does not fall, this is the "
                     f"first thing to check."))

    def _agree_counts(self, counts: List[int], device: torch.device) -> List[int]:
        """The smallest of each count over the ranks (two MAX all-reduces under DDP: the number of counts,
        then the negated counts; a rank with fewer splits counts 0 for the missing ones)."""
        if not distributed_ready():
            return counts
        size = torch.tensor([float(len(counts))], dtype=_F64, device=device)
        n = int(agree_max(size).item())
        buf = torch.zeros(n, dtype=_F64)
        buf[:len(counts)] = -torch.tensor([float(c) for c in counts], dtype=_F64)
        agreed = agree_max(buf.to(device)).tolist()
        return [int(-v) for v in agreed[:len(counts)]]

    def _enter_scan(self) -> Dict[str, Any]:
        """Put the monitor on separate state for the scan; returns what :meth:`_leave_scan` puts back."""
        saved = {name: getattr(self, name) for name in _SCAN_ISOLATED}
        saved["cooldown"] = self.cooldown.state_dict()
        self._splits = {}
        self._edges = dict(self._edges)
        self._schemas = {k: _Schema(v.dtype, list(v.dims), v.frozen, v.source) for k, v in self._schemas.items()}
        self._layout = dict(self._layout)
        self._classes, self._class_source = dict(self._classes), dict(self._class_source)
        self._label_max, self._ranges = dict(self._label_max), dict(self._ranges)
        self._restored_ranges = dict(self._restored_ranges)
        self._profile = DataProfile()
        self._train_hashes_last = torch.zeros(0, dtype=torch.int64)
        self._reported = set(self._reported)
        self._scale_probe, self._scale_checked = None, False
        return saved

    def _leave_scan(self, saved: Dict[str, Any]) -> None:
        self._scan = None
        # the cooldown too: a later alert that is louder than the scan's is recorded, not held back
        self.cooldown.load_state_dict(saved.pop("cooldown"))
        for name, value in saved.items():
            setattr(self, name, value)

    # ---------------------------------------------------------------------------- hooks: evaluation
    def _eval_epoch_start(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        train = self._splits.get("train")
        if train is not None and train.specs is not None and train.pending:
            # read the training counters now, so evaluation batches are checked against every training label
            if self._readback.pending:
                self._publish_pending(trainer, pl_module)
            self._flush_step(trainer, pl_module, train, logging_step(trainer), synchronous=True)
        for name, sp in self._splits.items():
            if (name == stage or name.startswith(stage + "_")) and sp.specs is not None:
                sp.reset_epoch()
                self._reset_counters(sp)

    def _eval_batch_start(self, trainer: Any, pl_module: Any, stage: str, batch: Any, dataloader_idx: int,
                          batch_idx: int = 0) -> None:
        split = self._eval_split(stage, dataloader_idx)
        if getattr(trainer, "sanity_checking", False):
            # not checked or counted (the sanity check is no epoch), but kept: if the model crashes on it (a label
            # out of range), `on_exception` names the cause
            self._last_batch = (split, batch_idx, batch, True)
            return
        sp = self._split(split)
        self._last_batch = (split, sp.batches_in_epoch, batch, False)
        if not sp.limit_known:
            loaders = getattr(trainer, "val_dataloaders" if stage == "val" else f"{stage}_dataloaders", None)
            if isinstance(loaders, (list, tuple)):
                loaders = loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
            sp.row_limit, sp.limit_known = self._row_limit(loaders), True
        self._immediate_flag = None
        self._observe(trainer, pl_module, sp, batch, sp.batches_in_epoch)
        if self._immediate_checks and self._immediate_triggered(sp):
            self._flush_step(trainer, pl_module, sp, logging_step(trainer), synchronous=True)

    def _eval_epoch_end(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        for name in sorted(self._splits):
            sp = self._splits[name]
            if (name == stage or name.startswith(stage + "_")) and sp.specs is not None:
                self._epoch_end(trainer, pl_module, sp)

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval_epoch_start(trainer, pl_module, "val")

    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_start(trainer, pl_module, "val", batch, dataloader_idx, batch_idx)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval_epoch_end(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval_epoch_start(trainer, pl_module, "test")

    def on_test_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_start(trainer, pl_module, "test", batch, dataloader_idx, batch_idx)

    def on_test_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval_epoch_end(trainer, pl_module, "test")

    @staticmethod
    def _row_limit(loader: Any) -> Optional[int]:
        """Samples of this rank that are real when a ``DistributedSampler`` pads the ranks to equal length."""
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        for candidate in (sampler, getattr(batch_sampler, "sampler", None)):
            needed = ("num_replicas", "rank", "total_size", "dataset")
            if candidate is None or not all(hasattr(candidate, a) for a in needed):
                continue
            try:
                n = len(candidate.dataset)
            except TypeError:
                return None
            if getattr(candidate, "drop_last", False) or candidate.total_size <= n:
                return None
            return len(range(int(candidate.rank), n, int(candidate.num_replicas)))
        return None

    # --------------------------------------------------------------------- per-batch tier: reading
    def _host_parts(self, sp: _Split) -> Tuple[List[float], List[float]]:
        sums = [float(sp.batches), float(sp.samples), float(sp.empty), float(sp.schema_errors)]
        sums += [float(v) for v in sp.values]
        return sums, [sp.first_empty, sp.first_schema]

    def _counter_buffers(self, sp: _Split) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
        assert sp.counts is not None and sp.first is not None and sp.label_max is not None
        device = sp.counts.device
        host_sum, host_max = self._host_parts(sp)
        pinned = device.type == "cuda"
        host = torch.tensor(host_sum + host_max, dtype=_F64, pin_memory=pinned).to(device, non_blocking=True)
        sum_buf = torch.cat([sp.counts.to(_F64), host[:len(host_sum)]])
        max_buf = torch.cat([sp.first, sp.label_max, host[len(host_sum):]])
        classes = {s.name: self._classes_for(sp, s.name) for s in sp.specs or [] if s.kind == "labels"}
        meta = {"split": sp.name, "notes": dict(sp.schema_notes),
                "ranges": {s.name: self._ranges[s.name] for s in sp.specs or [] if s.name in self._ranges},
                "classes": classes, "sum_size": sum_buf.numel()}
        return sum_buf, max_buf, meta

    def _reset_counters(self, sp: _Split) -> None:
        assert sp.counts is not None and sp.first is not None
        sp.counts.zero_()
        sp.first.fill_(_NEG_INF)
        sp.reset_host_counters()

    def _flush_step(self, trainer: Any, pl_module: Any, sp: _Split, step: int, synchronous: bool = False) -> None:
        """Reduce the per-batch counters (one SUM and one MAX) and read them back (one copy)."""
        if sp.name == "train":
            self._published_step = step
        self._fold(sp)  # a logged step: the buffered batches' statistics are brought up to date too
        sum_buf, max_buf, meta = self._counter_buffers(sp)
        all_reduce_flat(sum_buf, max_buf)
        meta["step"] = step
        self._reset_counters(sp)
        self._readback.submit(torch.cat([sum_buf, max_buf]), meta)
        if synchronous or not HostReadback.deferred(sum_buf):
            self._publish_pending(trainer, pl_module)

    def _publish_pending(self, trainer: Any, pl_module: Any) -> None:
        for values, meta in self._readback.collect():
            sp = self._splits[meta["split"]]
            self._publish_counters(trainer, pl_module, sp, values[:meta["sum_size"]], values[meta["sum_size"]:],
                                   meta, meta["step"])

    def _publish_counters(self, trainer: Any, pl_module: Any, sp: _Split, sums: List[float], maxes: List[float],
                          meta: Dict[str, Any], step: int, scalars: Optional[Dict[str, float]] = None) -> None:
        """Tags and alerts of the per-batch tier from reduced counters (identical on every rank)."""
        assert sp.specs is not None
        k = sum(s.width for s in sp.specs)
        counts, host = sums[:k], sums[k:]
        first, n_labels = maxes[:k], sum(1 for s in sp.specs if s.kind == "labels")
        label_max, host_first = maxes[k:k + n_labels], maxes[k + n_labels:]
        batches, samples, empty, schema_errors = host[:4]
        values = host[4:]
        own = scalars is None
        scalars = {} if scalars is None else scalars
        tag = self.writer.tag
        split = sp.name
        evaluation = sp.marker_word == "batch"
        li = 0
        for i, s in enumerate(sp.specs):
            seg = counts[s.offset:s.offset + s.width]
            seg_first = first[s.offset:s.offset + s.width]
            if s.kind == "labels":
                if li < len(label_max) and math.isfinite(label_max[li]):
                    self._label_max[s.name] = max(self._label_max.get(s.name, _NEG_INF), label_max[li])
                li += 1
                scalars[tag("data", f"{split}/{s.name}", "out_of_range")] = seg[0]
                if seg[0] > 0:
                    self._alert_labels(trainer, pl_module, sp, s, seg[0], -seg_first[0], meta, step, evaluation)
                continue
            f = s.num_features
            nonfinite, oor = seg[:f], seg[f:2 * f]
            loose_nf = seg[2 * f] if s.loose_slot else 0.0
            total_nf = sum(nonfinite) + loose_nf
            scalars[tag("data", f"{split}/{s.name}", "nonfinite")] = total_nf
            if total_nf > 0:
                firsts = [-v for v, c in zip(seg_first[:f], nonfinite) if c > 0]
                if loose_nf > 0:
                    firsts.append(-seg_first[2 * f])
                self._alert_nonfinite(trainer, pl_module, sp, s, nonfinite, min(firsts), step, evaluation, loose_nf)
            rng = meta["ranges"].get(s.name)
            if rng is not None:
                total_oor = sum(oor)
                scalars[tag("data", f"{split}/{s.name}", "out_of_range")] = total_oor
                frac = total_oor / values[i] if values[i] else 0.0
                tolerance = 0.0 if rng.hard else max(self.checks["out_of_range"]["tolerance"], 10.0 / max(rng.n_ref, 1))
                if total_oor > 0 and frac > tolerance:
                    firsts = [-v for v, c in zip(seg_first[f:2 * f], oor) if c > 0]
                    self._alert_out_of_range(trainer, pl_module, sp, s, oor, frac, tolerance, rng, min(firsts), step,
                                             evaluation)
        scalars[tag("data", f"{split}/_all", "schema_errors")] = schema_errors
        scalars[tag("data", f"{split}/_all", "empty_batches")] = empty
        if schema_errors > 0:
            self._alert_simple(trainer, pl_module, sp, "schema", schema_errors, -host_first[1], step, evaluation,
                               "batch(es) whose dtype or sample shape differs from the expected schema: " + ("; ".join(
                                   f"field {k!r}: {v}" for k, v in meta["notes"].items()) or "seen on another rank")
                               + ". A changed transform or collate_fn, or a mixed-up dataset, usually causes this.")
        if empty > 0:
            self._alert_simple(trainer, pl_module, sp, "empty_batch", empty, -host_first[0], step, evaluation,
                               "empty batch(es) (0 samples). Check the sampler, filtering in the dataset or "
                               "collate_fn, and drop_last.")
        if own and self._scan is None:
            self.writer.write_scalars(trainer, scalars, step)

    def _where(self, sp: _Split, first: float, step: int, evaluation: bool) -> Tuple[str, int]:
        if self._scan is not None:
            # markers of the scan are its batch indices: the scan's order is not the order training will read
            # (a shuffling loader draws another permutation), so the alert is at the scan's step, 0
            return f"first in {sp.name} batch {int(first)} of the scan", step
        if evaluation:
            return f"first in {sp.name} batch {int(first)} (during step {step})", step
        return f"first at step {int(first)}", int(first)

    def _alert_nonfinite(self, trainer: Any, pl_module: Any, sp: _Split, s: _Spec, counts: List[float], first: float,
                         step: int, evaluation: bool, loose: float = 0.0) -> None:
        check = self.checks["nonfinite"]
        if not check.enabled:
            return
        bad = sorted(((c, j) for j, c in enumerate(counts) if c > 0), reverse=True)
        where, at = self._where(sp, first, step, evaluation)
        listed = ", ".join(f"{s.label(j)} ({int(c)})" for c, j in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if loose > 0:  # batches of another length along a variable feature dimension: no per-feature attribution
            listed = (listed + ", " if listed else "") + f"{int(loose)} in batches of another length along " \
                f"dimension {s.feature_dim}"
        subject = f"{sp.name}/{s.label(bad[0][1])}" if bad else f"{sp.name}/{s.name}"
        self._raise(trainer, pl_module, check, subject=subject, value=sum(counts) + loose,
                    step=at, message=(
                        f"{int(sum(counts) + loose)} non-finite value(s) (NaN/Inf) in {sp.name} {s.role} {s.name!r}, "
                        f"{where}; feature(s): {listed}. Check the data source and the transforms (a division by zero, a log "
                        f"of 0, a failed normalisation, or missing values read as NaN)."))

    def _alert_labels(self, trainer: Any, pl_module: Any, sp: _Split, s: _Spec, count: float, first: float,
                      meta: Dict[str, Any], step: int, evaluation: bool) -> None:
        check = self.checks["label_range"]
        if not check.enabled or f"{sp.name}/{s.name}" in self._explained:
            return
        classes = meta["classes"].get(s.name)
        where, at = self._where(sp, first, step, evaluation)
        valid = f"[0, {classes})" if classes is not None else "non-negative values"
        source = f" ({self._class_source.get(s.name, 'the largest training label so far, plus one')})" \
            if classes is not None else ""
        ignore = f", ignore_index {self.ignore_index} excluded" if self.ignore_index is not None else ""
        largest = self._label_max.get(s.name)
        seen = f" Largest label seen: {int(largest)}." if largest is not None and math.isfinite(largest) else ""
        self._raise(trainer, pl_module, check, subject=f"{sp.name}/{s.name}", value=count, step=at,
                    threshold=None if classes is None else float(classes), message=(
                        f"{int(count)} label(s) of {sp.name} target {s.name!r} outside {valid}{source}{ignore}, "
                        f"{where}.{seen} Out-of-range labels crash cross-entropy on the CPU and trigger device-side "
                        f"asserts on CUDA; check the label encoding and num_classes."))

    def _alert_out_of_range(self, trainer: Any, pl_module: Any, sp: _Split, s: _Spec, counts: List[float],
                            frac: float, tolerance: float, rng: _Ranges, first: float, step: int,
                            evaluation: bool) -> None:
        check = self.checks["out_of_range"]
        if not check.enabled:
            return
        bad = sorted(((c, j) for j, c in enumerate(counts) if c > 0), reverse=True)
        where, at = self._where(sp, first, step, evaluation)
        listed = ", ".join(f"{s.label(j)} ({int(c)} outside [{_fmt(rng.bounds[j][0])}, {_fmt(rng.bounds[j][1])}])"
                           for c, j in bad[:4]) + (" ..." if len(bad) > 4 else "")
        self._raise(trainer, pl_module, check, subject=f"{sp.name}/{s.label(bad[0][1])}", value=frac,
                    threshold=tolerance, step=at, message=(
                        f"{100 * frac:.3g}% of the values of {sp.name} {s.role} {s.name!r} are outside the ranges "
                        f"from {rng.source}, {where}: {listed}. Unnormalised or differently scaled data (0-255 vs "
                        f"0-1, other units) is the usual cause."))

    def _alert_simple(self, trainer: Any, pl_module: Any, sp: _Split, name: str, count: float, first: float,
                      step: int, evaluation: bool, what: str) -> None:
        check = self.checks[name]
        if not check.enabled:
            return
        where, at = self._where(sp, first, step, evaluation)
        self._raise(trainer, pl_module, check, subject=f"{sp.name}/_all", value=count, step=at,
                    message=f"{int(count)} {sp.name} {what} ({where}.)")

    def _raise(self, trainer: Any, pl_module: Any, check: _Check, *, subject: str, value: Optional[float],
               message: str, step: int, threshold: Optional[float] = None, severity: Optional[str] = None) -> None:
        action = "log" if self._record_only else check.action
        severity = severity or check.severity
        key = self._scan_key(check.rule, subject)
        if self._scan is not None:
            message = f"{message} [{self._scan.describe()}]"
            if action in _STEP_ACTIONS:
                action = "warn"  # before training there is no optimizer step to skip or roll back
            known = self._scan_alerts.get(key)
            if known is None or SEVERITIES.index(severity) > SEVERITIES.index(known):
                self._scan_alerts[key] = severity
        elif key in self._scan_alerts and action not in _STEP_ACTIONS \
                and SEVERITIES.index(severity) <= SEVERITIES.index(self._scan_alerts[key]):
            # the scan before training reported this already (as loud or louder); a step action still acts
            return
        if action == "skip_step":
            self._skip_step = logging_step(trainer)
        if severity == "info" and severity != check.severity and action not in ("log", "warn"):
            action = "log"  # a weak finding never takes a control-flow action meant for a strong one
        self.raise_alert(trainer, pl_module, rule=check.rule, severity=severity, action=action,
                         subject=subject, value=value, threshold=threshold, message=message, step=step)

    def _scan_key(self, rule: str, subject: Optional[str]) -> str:
        """``rule|subject`` as the scan and the streaming checks compare it.

        A drift alert names the most drifted feature of a field, which depends on the sample; the finding is
        that the field drifted, so drift subjects are compared per field (``val/x.3`` -> ``val/x``).
        """
        if rule in ("data_drift", "data_drift_ref") and subject and "/" in subject:
            split, rest = subject.split("/", 1)
            sp = self._splits.get(split)
            for name in sorted((s.name for s in (sp.specs or [])) if sp is not None else [], key=len, reverse=True):
                if rest == name or rest.startswith(name + "."):
                    subject = f"{split}/{name}"
                    break
        return f"{rule}|{subject or ''}"

    # ---------------------------------------------------------------------- distribution tier
    def _stat_list(self, sp: _Split) -> List[Any]:
        return [sp.acc[k] for k in sorted(sp.acc)] if self.distribution else []

    def _epoch_end(self, trainer: Any, pl_module: Any, sp: _Split) -> None:
        """One MAX, one SUM and one all-gather: counters, statistics (and the training split's increments
        when an evaluation split ends) and sample hashes; then the checks of the distribution tier."""
        step = logging_step(trainer)
        train = self._splits.get("train")
        stat_splits = [sp]
        if sp.name != "train" and train is not None and train.specs is not None:
            stat_splits.append(train)  # the training split so far, to compare against
        for s in stat_splits:
            self._fold(s)
        stats = [st for s in stat_splits for st in self._stat_list(s)]
        hash_splits = [s for s in stat_splits if self.duplicates]
        device = sp.device or torch.device("cpu")

        counter_sum, counter_max, meta = self._counter_buffers(sp)
        local = torch.tensor([float(getattr(s, k)) for k in ("epoch_samples", "epoch_batches") for s in stat_splits],
                             dtype=_F64)
        rows = torch.tensor([float(s.hasher.num_rows) for s in hash_splits], dtype=_F64)
        max_stats = pack_max(stats) if stats else torch.zeros(0, dtype=_F64, device=device)
        max_buf = torch.cat([max_stats.to(device), rows.to(device), counter_max])
        all_reduce_flat(None, max_buf)
        n_max_stats = max_stats.numel()
        sum_stats = pack_sum(stats, max_buf[:n_max_stats]) if stats else torch.zeros(0, dtype=_F64, device=device)
        sum_buf = torch.cat([sum_stats.to(device), local.to(device), counter_sum])
        all_reduce_flat(sum_buf, None)
        if stats:
            load_packed(stats, sum_buf[:sum_stats.numel()], max_buf[:n_max_stats])
        for s in stat_splits:
            for key, stat in s.acc.items():
                s.glob[key].merge(stat)
                stat.reset()
        host_sum = sum_buf[sum_stats.numel():].tolist()
        host_max = max_buf[n_max_stats:].tolist()
        n = len(stat_splits)
        for j, s in enumerate(stat_splits):
            s.glob_samples += int(round(host_sum[j]))
            s.glob_batches += int(round(host_sum[n + j]))
            s.epoch_samples = s.epoch_batches = 0
        if hash_splits:
            self._gather_hashes(hash_splits, [int(r) for r in host_max[:len(hash_splits)]], device)
        scalars: Dict[str, float] = {}
        self._reset_counters(sp)
        if sp.name == "train":
            self._published_step = step
        self._publish_counters(trainer, pl_module, sp, host_sum[2 * n:], host_max[len(hash_splits):], meta, step,
                               scalars)
        self._distribution_checks(trainer, pl_module, sp, step, scalars)
        if self._scan is None:  # the scan reports through alerts only: its curves would mix with training's
            self.writer.write_scalars(trainer, scalars, step)
            self._save_profile(trainer)

    def _gather_hashes(self, splits: List[_Split], rows: List[int], device: torch.device) -> None:
        """Every rank's new sample hashes, in one all-gather (the row counts were agreed by the MAX)."""
        local = torch.cat([s.hasher.gather_state(pad_to=r) for s, r in zip(splits, rows)]).to(device)
        if distributed_ready():
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
        else:
            parts = [local]
        offset = 0
        for s, r in zip(splits, rows):
            got = SampleHasher(seed=s.hasher.seed)
            got.load_gathered([p[offset:offset + r] for p in parts])
            s.seen.merge(got)
            s.hasher.reset()
            offset += r

    def _snapshot(self, sp: _Split, step: int, epoch: int) -> SplitProfile:
        """The reduced statistics of a split so far, as host copies (what a profile holds)."""
        fields: Dict[str, FieldProfile] = {}
        for s in sp.specs or []:
            schema = self._schemas.get(s.name)
            dtype = dtype_name(schema.dtype) if schema else "float32"
            shape = list(schema.dims) if schema else []
            if s.kind == "labels":
                tally = sp.glob.get(s.name)
                classes = self._classes.get(s.name)
                if classes is None and tally is not None:
                    nz = torch.nonzero(tally.counts).reshape(-1)
                    classes = int(nz.max()) + 1 if nz.numel() else None
                fields[s.name] = FieldProfile(s.name, s.role, "labels", dtype, shape, None, 1,
                                              labels=_trimmed(tally, classes) if tally is not None else None,
                                              num_classes=classes)
            else:
                m, h = sp.glob.get(s.name), sp.glob.get(s.name + "\0hist")
                fields[s.name] = FieldProfile(s.name, s.role, "numeric", dtype, shape, s.feature_dim, s.num_features,
                                              s.names, _copy_stat(m) if m is not None else None,
                                              _copy_stat(h) if h is not None else None)
        duplicates = None
        if self.duplicates:
            d = sp.seen.compute()
            duplicates = {k: d[k] for k in ("samples", "unique", "duplicates", "duplicate_fraction")}
        hashes = None
        if self.duplicates and self.save_hashes:
            hashes = SampleHasher(seed=sp.seen.seed)
            hashes.merge(sp.seen)
        return SplitProfile(sp.name, sp.glob_samples, sp.glob_batches, epoch, step, fields, duplicates, None, hashes)

    def _distribution_checks(self, trainer: Any, pl_module: Any, sp: _Split, step: int,
                             scalars: Dict[str, float]) -> None:
        epoch = int(getattr(trainer, "current_epoch", 0))
        cur = self._snapshot(sp, step, epoch)
        tag = self.writer.tag
        name = sp.name
        scalars[tag("data", f"{name}/_all", "samples")] = float(sp.glob_samples)
        train_ref: Optional[SplitProfile] = None
        if name == "train":
            if not self._learned:
                self._learn(cur)
        else:
            current_train = self._splits.get("train")
            candidates = [p for p in (self._profile.splits.get("train"),) if p is not None]
            if current_train is not None and current_train.specs is not None and current_train.glob_samples:
                candidates.append(self._snapshot(current_train, step, epoch))
            if candidates:
                train_ref = max(candidates, key=lambda p: p.samples)
        ref = self.reference.split(name, fallback=("train",)) if self.reference is not None else None
        if cur.duplicates is not None:
            d = cur.duplicates
            scalars[tag("data", f"{name}/_all", "dup_frac")] = float(d["duplicate_fraction"])
            scalars[tag("data", f"{name}/_all", "dup_count")] = float(d["duplicates"])
            self._check_duplicates(trainer, pl_module, sp, d, step)
        if self.duplicates and name != "train":
            self._check_leakage(trainer, pl_module, sp, cur, step, scalars)
        biased = self._scan is not None and (name in self._scan.partial or (
            name != "train" and "train" in self._scan.partial))
        if self.distribution and not biased:
            for s in sp.specs or []:
                fp = cur.fields.get(s.name)
                if fp is None:
                    continue
                if s.kind == "labels":
                    self._label_checks(trainer, pl_module, sp, s, fp, cur, train_ref, ref, step, scalars)
                else:
                    self._numeric_checks(trainer, pl_module, sp, s, fp, cur, train_ref, ref, step, scalars)
        if name == "train":
            # an epoch cut short (a stop, max_steps) does not replace a complete one as the saved profile
            expected = getattr(trainer, "num_training_batches", math.inf)
            complete = not (isinstance(expected, int) and sp.batches_in_epoch < expected)
            if not complete and "train" in self._profile.splits:
                return
            if self.duplicates:
                self._train_hashes_last = sp.seen.hashes(unique_ids=False).clone()
        self._profile.splits[name] = cur

    def _learn(self, train: SplitProfile) -> None:
        """After the first training epoch: freeze the schema, infer class counts, learn value ranges."""
        self._learned = True
        for schema in self._schemas.values():
            if not schema.frozen:
                schema.frozen, schema.source = True, "first training epoch"
        sp = self._splits["train"]
        for s in sp.specs or []:
            fp = train.fields.get(s.name)
            if fp is None:
                continue
            if s.kind == "labels" and s.name not in self._classes:
                largest = self._label_max.get(s.name)
                if largest is not None and math.isfinite(largest) and largest >= 0:
                    self._classes[s.name] = int(largest) + 1
                    self._class_source[s.name] = "inferred from the first training epoch"
            elif s.kind == "numeric" and self.learn_ranges and s.name not in self._ranges:
                mm = fp.value_range()
                if mm is not None and train.samples:
                    self._ranges[s.name] = self._learned_ranges(s, mm, "the first training epoch", train.samples,
                                                                sp.device or torch.device("cpu"))

    def _check_duplicates(self, trainer: Any, pl_module: Any, sp: _Split, d: Mapping[str, Any], step: int) -> None:
        check = self.checks["duplicates"]
        if check.enabled and d["samples"] and d["duplicate_fraction"] > check["threshold"]:
            strong = d["duplicate_fraction"] > check["warn_above"]
            self._raise(trainer, pl_module, check, subject=f"{sp.name}/_all", value=float(d["duplicate_fraction"]),
                        threshold=check["warn_above"] if strong else check["threshold"], step=step,
                        severity=check.graded(strong), message=(
                            f"{d['duplicates']} of the {d['samples']} {sp.name} samples "
                            f"({100 * d['duplicate_fraction']:.3g}%) are exact copies of an earlier sample of the "
                            f"same epoch. Deduplicate the dataset, or check for an oversampling or indexing bug."))

    def _check_leakage(self, trainer: Any, pl_module: Any, sp: _Split, cur: SplitProfile, step: int,
                       scalars: Dict[str, float]) -> None:
        train = self._splits.get("train")
        pool = [self._train_hashes_last]
        if train is not None:
            pool.append(train.seen.hashes(unique_ids=False))
        references = torch.cat(pool)
        source = "this run's training split"
        if self.reference is not None:
            ref_train = self.reference.splits.get("train")
            if ref_train is not None and ref_train.hashes is not None and ref_train.hashes.seed == sp.seen.seed:
                references = torch.cat([references, ref_train.hashes.hashes(unique_ids=False)])
                source += " and the reference's training split"
        if references.numel() == 0:
            return
        mine = sp.seen.hashes()
        count = int(torch.isin(mine, references).sum()) if mine.numel() else 0
        fraction = count / mine.numel() if mine.numel() else 0.0
        cur.leakage = {"reference_split": "train", "count": count, "fraction": fraction}
        scalars[self.writer.tag("data", f"{sp.name}/_all", "leak_frac")] = fraction
        scalars[self.writer.tag("data", f"{sp.name}/_all", "leak_count")] = float(count)
        check = self.checks["leakage"]
        if check.enabled and count > 0 and fraction > check["threshold"]:
            self._raise(trainer, pl_module, check, subject=f"{sp.name}/_all", value=fraction,
                        threshold=check["threshold"], step=step, message=(
                            f"{count} of the {mine.numel()} {sp.name} samples ({100 * fraction:.3g}%) also occur in "
                            f"{source} (identical inputs): {sp.name} metrics overstate generalisation. Split the "
                            f"data before augmenting and deduplicate across splits."))

    def _numeric_checks(self, trainer: Any, pl_module: Any, sp: _Split, s: _Spec, fp: FieldProfile,
                        cur: SplitProfile, train_ref: Optional[SplitProfile], ref: Optional[SplitProfile], step: int,
                        scalars: Dict[str, float]) -> None:
        tag = self.writer.tag
        name = sp.name
        scores: Dict[str, List[float]] = {}
        comparisons = []
        if train_ref is not None and train_ref.fields.get(s.name) is not None:
            comparisons.append(("drift", "", train_ref, train_ref.fields[s.name], "this run's training split"))
        if ref is not None and ref.fields.get(s.name) is not None:
            comparisons.append(("drift_ref", "_ref", ref, ref.fields[s.name],
                                f"the reference profile's {ref.name!r} split"))
        for check_name, suffix, other, ofp, what in comparisons:
            res = self._drift(fp, ofp, cur.samples, other.samples, self.checks[check_name])
            if res is None:
                continue
            p, d, psi_thr, ks_thr, flagged = res
            scores["psi" + suffix], scores["ks" + suffix] = p, d
            scalars[tag("data", f"{name}/{s.name}", "psi" + suffix)] = max(p)
            scalars[tag("data", f"{name}/{s.name}", "ks" + suffix)] = max(d)
            check = self.checks[check_name]
            if flagged and check.enabled:
                worst = sorted(flagged, key=lambda j: -p[j])
                listed = ", ".join(f"{s.label(j)} (PSI {p[j]:.3g}, KS {d[j]:.3g})" for j in worst[:5])
                strong = any(p[j] > check["psi_warn"] and d[j] > check["ks_warn"] for j in flagged)
                self._raise(trainer, pl_module, check, subject=f"{name}/{s.label(worst[0])}", value=p[worst[0]],
                            threshold=psi_thr, step=step, severity=check.graded(strong), message=(
                                f"{len(flagged)} of the {s.num_features} feature(s) of {name} {s.role} {s.name!r} "
                                f"drifted from {what} ({cur.samples} vs {other.samples} samples; thresholds PSI "
                                f"{psi_thr:.3g}, KS {ks_thr:.3g}): {listed}"
                                f"{' ...' if len(flagged) > 5 else ''}. A changed preprocessing step or data source, "
                                f"or splits drawn from different populations."))
        # constant features: reported as a count; alerted when the reference says they should vary
        m = fp.moments.compute() if fp.moments is not None else None
        if m is not None:
            constant = [j for j in range(s.num_features)
                        if int(m["count"][j]) >= 2 and float(m["max"][j]) == float(m["min"][j])]
            scalars[tag("data", f"{name}/{s.name}", "constant")] = float(len(constant))
            base = comparisons[-1] if comparisons else None
            if constant and base is not None:
                self._check_constant(trainer, pl_module, sp, s, constant, cur, base[2], base[3], base[4], step)
            means, stds = m["mean"].tolist(), m["std"].tolist()
            order = list(range(s.num_features))
            key = "psi_ref" if "psi_ref" in scores else "psi" if "psi" in scores else None
            if key is not None:
                order.sort(key=lambda j: -scores[key][j] if math.isfinite(scores[key][j]) else 0.0)
            for j in order[: self.top_k]:
                subject = f"{name}/{s.label(j)}"
                if s.num_features > 1 or s.names:
                    for stat, vals in scores.items():
                        scalars[tag("data", subject, stat)] = vals[j]
                scalars[tag("data", subject, "mean")] = means[j]
                scalars[tag("data", subject, "std")] = stds[j]

    def _drift(self, cur: FieldProfile, ref: FieldProfile, n_cur: int, n_ref: int,
               check: _Check) -> Optional[Tuple[List[float], List[float], float, float, List[int]]]:
        """PSI and binned KS per feature, with thresholds from the sample sizes (Bonferroni over features).

        The sizes are numbers of samples, not of values: values of one sample (pixels of an image) are not
        independent, so counting samples keeps the thresholds conservative. PSI is taken between bucket
        counts expressed in samples with half a sample added to every bucket: a bucket empty on one side
        then adds a bounded amount instead of ``q ln(q / eps)``, and the null distribution stays close to
        the chi-square one :func:`~lightwatch.metrics.psi_threshold` assumes (measured: at most 1% false
        alarms at alpha 1% with 40 to 5000 samples, continuous and discrete data; without the half sample,
        26% to 54% with 50 to 96 evaluation samples).
        """
        if cur.histogram is None or ref.histogram is None or n_cur < 2 or n_ref < 2:
            return None
        if cur.histogram.edges.shape != ref.histogram.edges.shape or not torch.equal(
                cur.histogram.edges.cpu(), ref.histogram.edges.cpu()):
            return None
        rc = ref.histogram.binned_counts().to(torch.float64).cpu()
        cc = cur.histogram.binned_counts().to(torch.float64).cpu()
        valid = (rc.sum(1) > 0) & (cc.sum(1) > 0)
        if not bool(valid.any()):
            return None
        nan = float("nan")
        p_all = [nan] * rc.shape[0]
        d_all = [nan] * rc.shape[0]
        idx = torch.nonzero(valid).reshape(-1).tolist()
        smoothed_r = rc[valid] / rc[valid].sum(1, keepdim=True) * n_ref + 0.5
        smoothed_c = cc[valid] / cc[valid].sum(1, keepdim=True) * n_cur + 0.5
        p = psi(smoothed_r, smoothed_c, eps=0.0).tolist()
        d = ks_binned(rc[valid], cc[valid]).statistic.tolist()
        alpha = check["alpha"] / len(idx)
        psi_thr = psi_threshold(n_ref, n_cur, bins=rc.shape[1], alpha=alpha, floor=check["psi_floor"])
        n_eff = n_ref * n_cur / (n_ref + n_cur)
        ks_thr = max(check["ks_floor"], math.sqrt(-math.log(alpha / 2.0) / 2.0) / math.sqrt(n_eff))
        flagged = []
        for j, pj, dj in zip(idx, p, d):
            p_all[j], d_all[j] = pj, dj
            if pj > psi_thr or dj > ks_thr:
                flagged.append(j)
        return p_all, d_all, float(psi_thr), float(ks_thr), flagged

    def _check_constant(self, trainer: Any, pl_module: Any, sp: _Split, s: _Spec, constant: List[int],
                        cur: SplitProfile, other: SplitProfile, ofp: FieldProfile, what: str, step: int) -> None:
        """Alert on features that are constant now but varied in the reference, when that is no accident.

        If the reference's fullest bin holds a share ``p`` of its values, ``n`` samples all landing in one
        bin has probability at most ``p ** (n - 1)``; only features below the check's ``alpha`` are reported.
        """
        check = self.checks["constant"]
        if not check.enabled or ofp.moments is None or ofp.histogram is None:
            return
        om = ofp.moments.compute()
        counts = ofp.histogram.binned_counts().to(torch.float64)
        share = (counts.max(1).values / counts.sum(1).clamp_min(1.0)).tolist()
        flagged = [j for j in constant if float(om["max"][j]) > float(om["min"][j])
                   and share[j] ** max(cur.samples - 1, 0) < check["alpha"]]
        if not flagged:
            return
        value = float(cur.fields[s.name].moments.compute()["min"][flagged[0]])  # type: ignore[union-attr]
        listed = ", ".join(s.label(j) for j in flagged[:8]) + (" ..." if len(flagged) > 8 else "")
        self._raise(trainer, pl_module, check, subject=f"{sp.name}/{s.label(flagged[0])}", value=value, step=step,
                    message=(f"{len(flagged)} feature(s) of {sp.name} {s.role} {s.name!r} are constant over "
                             f"{cur.samples} samples but vary in {what}: {listed}. A dead sensor or column, a "
                             f"blank image channel, or a preprocessing step that zeroes the feature."))

    def _label_checks(self, trainer: Any, pl_module: Any, sp: _Split, s: _Spec, fp: FieldProfile,
                      cur: SplitProfile, train_ref: Optional[SplitProfile], ref: Optional[SplitProfile], step: int,
                      scalars: Dict[str, float]) -> None:
        tag = self.writer.tag
        name = sp.name
        tally = fp.labels
        if tally is None:
            return
        per_sample = self._per_sample_labels(s)
        classes = self._classes.get(s.name) or fp.num_classes or 0
        if classes > tally.num_classes or classes == 0:
            return
        counts = tally.counts[:classes].to(torch.float64)
        total = float(counts.sum())
        if total <= 0:
            return
        scalars[tag("data", f"{name}/{s.name}", "classes")] = float(int((counts > 0).sum()))
        freq = counts / total
        if classes >= 2:
            scalars[tag("data", f"{name}/{s.name}", "imbalance")] = float(freq.min()) * classes
        self._write_label_histogram(trainer, f"{name}/{s.name}", counts.tolist(), step)
        comparisons = []
        if train_ref is not None and train_ref.fields.get(s.name) is not None:
            comparisons.append(("label_shift", "", train_ref.fields[s.name], "this run's training split"))
        if ref is not None and ref.fields.get(s.name) is not None:
            comparisons.append(("label_shift_ref", "_ref", ref.fields[s.name],
                                f"the reference profile's {ref.name!r} split"))
        for check_name, suffix, ofp, what in comparisons:
            if ofp.labels is None:
                continue
            width = max(classes, ofp.num_classes or 0)
            other = torch.zeros(width, dtype=torch.float64)
            oc = ofp.labels.counts.to(torch.float64)[:width]
            other[:oc.numel()] = oc
            mine = torch.zeros(width, dtype=torch.float64)
            mine[:classes] = counts
            if float(other.sum()) <= 0:
                continue
            # effect size: the share of label mass that moved (total variation distance), so a shift spread
            # over many classes counts as much as one concentrated in a single class
            shift = 0.5 * float((other / other.sum() - mine / mine.sum()).abs().sum())
            largest = float(linf(other, mine))
            test = chi_squared(other, mine)
            scalars[tag("data", f"{name}/{s.name}", "label_shift" + suffix)] = shift
            check = self.checks[check_name]
            if check.enabled and per_sample and shift > check["floor"] and float(test.pvalue) < check["alpha"]:
                of, mf = (other / other.sum()).tolist(), (mine / mine.sum()).tolist()
                worst = sorted(range(width), key=lambda c: -abs(mf[c] - of[c]))[:4]
                listed = ", ".join(f"class {c}: {100 * mf[c]:.3g}% vs {100 * of[c]:.3g}%" for c in worst)
                self._raise(trainer, pl_module, check, subject=f"{name}/{s.name}", value=shift,
                            threshold=check["floor"], step=step, message=(
                                f"the label distribution of {name} target {s.name!r} differs from {what}: "
                                f"{100 * shift:.3g}% of the label mass moved (largest class difference "
                                f"{100 * largest:.3g} points, chi-square p={float(test.pvalue):.3g}); {listed}. A "
                                f"non-stratified or filtered split, or labels encoded differently."))
        if name == "train" and classes >= 2 and per_sample and ("imbalance", s.name) not in self._reported:
            self._reported.add(("imbalance", s.name))
            check = self.checks["class_imbalance"]
            rarest = int(torch.argmin(freq))
            chance = _rarest_class_chance(int(counts[rarest]), total, classes)
            if check.enabled and float(freq[rarest]) < check["ratio"] / classes and chance < check["alpha"]:
                self._raise(trainer, pl_module, check, subject=f"{name}/{s.name}", value=float(freq[rarest]),
                            threshold=check["ratio"] / classes, step=step, message=(
                                f"class {rarest} of {name} target {s.name!r} has {100 * float(freq[rarest]):.3g}% of "
                                f"the labels ({int(counts[rarest])} of {int(total)}), less than {check['ratio']:g} of "
                                f"a uniform share over {classes} classes, and rarer than a balanced sample of "
                                f"{int(total)} labels makes its rarest class (chance {chance:.2g}). Consider class "
                                f"weights or resampling, and per-class metrics." + (
                                    f" The class count was inferred from the largest label ({classes - 1}) and class "
                                    f"{rarest} never occurs: a label above the real class range (see "
                                    f"data_label_range) gives this too."
                                    if counts[rarest] == 0 and "inferred" in self._class_source.get(s.name, "inferred")
                                    else "")))

    def _per_sample_labels(self, s: _Spec) -> bool:
        """Whether integer targets are classification labels, one per sample (``[N]`` or ``[N, 1]``).

        Per-position targets (``[N, T]`` token ids of a language model, ``[N, H, W]`` segmentation masks) are
        not judged for class imbalance or label shift: token frequencies are Zipfian and pixel classes are
        background-heavy by nature, and the positions of one sample are no independent draws, so a chi-square
        over them overstates significance. Their labels are still range-checked and counted in the profile.
        """
        schema = self._schemas.get(s.name)
        dims = list(schema.dims) if schema is not None else None
        if s.ndim == 1 or (s.ndim == 2 and dims == [1]):
            return True
        self._note(f"seqlabels:{s.name}", f"DataQualityMonitor: target {s.name!r} holds one label per position "
                                          f"({s.ndim}-d batches): its label range is checked, but class imbalance "
                                          f"and label shift are judged only for one label per sample.")
        return False

    def _write_label_histogram(self, trainer: Any, subject: str, counts: List[float], step: int) -> None:
        n = len(counts)
        total = sum(counts)
        if n == 0 or total <= 0 or self._scan is not None:
            return
        sum_v = sum(c * i for i, c in enumerate(counts))
        sum_sq = sum(c * i * i for i, c in enumerate(counts))
        data = HistogramData(0.0, float(n - 1), total, sum_v, sum_sq, 0.0, [i + 0.5 for i in range(n)], counts)
        self.writer.write_histograms(trainer, {self.writer.tag("data_hist", subject): data}, step)

    # ----------------------------------------------------------------------------------- profile
    def _profile_file(self, trainer: Any) -> Optional[str]:
        if self.profile_path is None:
            return None
        if self.profile_path == "auto":
            return os.path.join(run_dir(trainer), _PROFILE_NAME)
        return self.profile_path

    def _save_profile(self, trainer: Any) -> None:
        path = self._profile_file(trainer)
        if path is None or not self._profile.splits or not is_global_zero(trainer):
            return
        self._profile.save(path, with_hashes=self.save_hashes)

    # ------------------------------------------------------------------------------- failures
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """Say what the data looked like before the failure: check the batch the model was given last (labels
        against the class count), read this rank's pending counters (no collective: the other ranks may be
        elsewhere) and record what they show, before the error propagates."""
        if isinstance(exception, Exception) and not isinstance(exception, MonitorError):
            try:
                self._explain_crash(trainer, pl_module, exception)
            except Exception as err:  # never mask the original failure
                logger.warning("lightwatch: DataQualityMonitor could not check the last batch: %s", err)
        if not isinstance(exception, MonitorError):
            for sp in self._splits.values():
                if sp.specs is not None and sp.pending:
                    try:
                        self._emergency_report(trainer, pl_module, sp)
                    except Exception as err:  # never mask the original failure
                        logger.warning("lightwatch: DataQualityMonitor could not report pending counters: %s", err)
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._last_batch = None  # do not keep a batch (device memory) alive after the run
        super().teardown(trainer, pl_module, stage)

    def _crash_classes(self, trainer: Any, pl_module: Any, split: str, name: str,
                       exception: BaseException) -> Tuple[Optional[int], str]:
        """The class count a crashing batch's labels are checked against, and where it comes from.

        Known counts first (``num_classes``, the module's ``num_classes``, the reference, the first training
        epoch; for evaluation splits the largest training label so far plus one). Failing those, and only when
        the error reads like an index error (a label out of bounds crashes cross-entropy with ``IndexError`` /
        "Target 12 is out of bounds" on CPU, a device-side assert on CUDA), the width of the module's last
        linear layer: a classifier's logits. A label at or above it is what the loss cannot index.
        """
        sp = self._splits.get(split)
        classes = self._classes_for(sp, name) if sp is not None else None
        if classes is None:
            classes = self._known_classes(name)
        if classes is None and split != "train":
            largest = self._label_max.get(name)
            if largest is not None and math.isfinite(largest) and largest >= 0:
                classes = int(largest) + 1
        if classes is not None:
            return classes, self._class_source.get(name, "the largest training label so far, plus one")
        text = f"{type(exception).__name__}: {exception}".lower()
        if not (isinstance(exception, IndexError) or any(k in text for k in ("out of bounds", "device-side assert",
                                                                              "index"))):
            return None, ""
        width = None
        for module in pl_module.modules() if isinstance(pl_module, torch.nn.Module) else []:
            out = getattr(module, "out_features", None)
            if isinstance(out, int) and not isinstance(out, bool) and out > 0:
                width = out
        if width is None:
            return None, ""
        return width, f"the width of the model's last linear layer, {width} outputs"

    def _explain_crash(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """``data_label_range`` for the batch the model was given last, when its labels explain the crash."""
        if self._last_batch is None or not self.checks["label_range"].enabled:
            return
        split, marker, batch, sanity = self._last_batch
        try:
            fields = self.selector.resolve(batch)
        except Exception:
            return
        for f in fields.targets:
            y = self.selector.get(batch, f)
            if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool \
                    or y.numel() == 0:
                continue
            classes, source = self._crash_classes(trainer, pl_module, split, f.name, exception)
            y = y.detach()
            bad = y < 0
            if self.ignore_index is not None:
                bad &= y != self.ignore_index
            if classes is not None:
                bad |= y >= classes
            if not bool(bad.any()):
                continue
            values = torch.unique(y[bad]).tolist()
            count = int(bad.sum())
            where = (f"{split} batch {marker} of the sanity check (validation before training)" if sanity else
                     f"{split} batch {marker}" if split != "train" else f"the train batch of step {marker}")
            valid = f"[0, {classes}) ({source})" if classes is not None else "non-negative values"
            listed = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
            subject = f"{split}/{f.name}"
            self._explained.add(subject)
            self._record_only = True
            try:
                self._raise(trainer, pl_module, self.checks["label_range"], subject=subject, value=float(count),
                            threshold=None if classes is None else float(classes), step=logging_step(trainer),
                            message=(f"{count} label(s) of {split} target {f.name!r} outside {valid} in {where}, the "
                                     f"batch the model was given when training failed ({type(exception).__name__}: "
                                     f"{str(exception)[:160]}): label value(s) {listed}. An out-of-range label "
                                     f"crashes cross-entropy on the CPU and triggers a device-side assert on CUDA; "
                                     f"check the label encoding of the {split} data and num_classes."))
            finally:
                self._record_only = False

    def _emergency_report(self, trainer: Any, pl_module: Any, sp: _Split) -> None:
        self._fold(sp)
        sum_buf, max_buf, meta = self._counter_buffers(sp)
        values = torch.cat([sum_buf, max_buf]).tolist()
        recorded: List[Alert] = []
        log = alert_log(trainer)

        def listener(alert: Alert) -> None:
            recorded.append(alert)

        # Record only: the actions of a crashing run do not matter any more, and must not raise again.
        self._record_only = True
        log.subscribe(listener)
        try:
            step = logging_step(trainer)
            self._publish_counters(trainer, pl_module, sp, values[:meta["sum_size"]], values[meta["sum_size"]:], meta,
                                   step, {})
        finally:
            log.unsubscribe(listener)
            self._record_only = False
        if not is_global_zero(trainer):  # rank 0 writes the file; say it here too so nothing goes unreported
            for alert in recorded:
                if severity_at_least(alert.severity, "warning"):
                    logger.error("[rank %s] %s step %d: %s", getattr(trainer, "global_rank", "?"), alert.rule,
                                 alert.step, alert.message)
        self._reset_counters(sp)

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update({
            "data_version": 1,
            "edges": {k: v.tolist() for k, v in self._edges.items()},
            "schemas": {k: {"dtype": dtype_name(v.dtype), "dims": list(v.dims), "frozen": v.frozen, "source": v.source}
                        for k, v in self._schemas.items()},
            "layout": {k: int(v) for k, v in self._layout.items()},
            "classes": dict(self._classes),
            "class_source": dict(self._class_source),
            "label_max": {k: float(v) for k, v in self._label_max.items() if math.isfinite(v)},
            "learned_ranges": {k: {"bounds": [list(b) for b in r.bounds], "n_ref": int(r.n_ref), "source": r.source}
                               for k, r in self._ranges.items() if not r.hard and r.bounds},
            "learned": bool(self._learned),
            "scale_checked": bool(self._scale_checked),
            "padding_batches_left": int(self._padding_batches_left),
            "reported": sorted(f"{a}|{b}" for a, b in self._reported),
            "scan_done": bool(self._scan_done),
            "scan_alerts": dict(self._scan_alerts),
            "profile": self._profile.to_dict(with_hashes=False),
        })
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("data_version") != 1:
            return
        self._edges = {k: torch.tensor(v, dtype=torch.float64) for k, v in state_dict.get("edges", {}).items()}
        self._schemas = {k: _Schema(parse_dtype(v["dtype"]), list(v["dims"]), bool(v["frozen"]), str(v["source"]))
                         for k, v in state_dict.get("schemas", {}).items()}
        self._layout = {k: int(v) for k, v in dict(state_dict.get("layout", {})).items()}
        self._classes = {k: int(v) for k, v in state_dict.get("classes", {}).items()}
        self._class_source = {k: str(v) for k, v in state_dict.get("class_source", {}).items()}
        self._label_max = {k: float(v) for k, v in state_dict.get("label_max", {}).items()}
        self._restored_ranges = {str(k): dict(v) for k, v in state_dict.get("learned_ranges", {}).items()}
        self._learned = bool(state_dict.get("learned", False))
        self._scale_checked = bool(state_dict.get("scale_checked", self._learned))
        self._padding_batches_left = int(state_dict.get("padding_batches_left", 0 if self._learned else
                                                        _PADDING_BATCHES))
        self._reported = {tuple(x.split("|", 1)) for x in state_dict.get("reported", [])}  # type: ignore[misc]
        self._scan_done = bool(state_dict.get("scan_done", False))
        self._scan_alerts = {str(k): str(v) for k, v in dict(state_dict.get("scan_alerts", {})).items()
                             if v in SEVERITIES}
        try:
            self._profile = DataProfile.from_dict(state_dict.get("profile", {}), "<checkpoint>")
        except ProfileError as err:
            logger.warning("lightwatch: DataQualityMonitor could not restore its profile from the checkpoint: %s", err)


#: The class to add to ``Trainer(callbacks=[...])``: the implementation above bound to the installed
#: Lightning package (``pytorch_lightning``, else ``lightning.pytorch``; ``lightwatch.lightning`` binds it to
#: the latter).
DataQualityMonitor = bind(_DataQualityMonitor, default_package(), "callback", module=__name__)
