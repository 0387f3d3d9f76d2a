"""Metrics per slice of the data, in one mergeable state: sums per slice, with intervals.

A *slice* is a group of samples (a value of a batch field, a validation set, a cross of two keys). For every
slice :class:`SliceMetrics` keeps the sums of a few per-sample statistics (count, correct predictions, per-class
targets, predictions and true positives, squared and absolute errors, a per-sample outcome of your own) in ONE
state tensor of a fixed shape ``[replicates, num_slices + 1, columns]`` reduced by ``sum``. It is a torchmetrics
:class:`~torchmetrics.Metric`: ``update`` accumulates on the device without a host sync, and ``compute`` syncs
the state across ranks through torchmetrics' own reduction (``dist_reduce_fx="sum"``), which merges exactly:
every statistic is a sum, and integer counts are exact in float64. The last row holds samples whose slice id
is out of range (``other``): they count in the overall value, not in any slice.

Metrics (``higher`` or ``lower`` is better):

- ``acc`` (higher): fraction of correct predictions; a rate, so its interval is Wilson's score interval;
- ``precision``, ``recall``, ``f1`` (higher): of the positive class (``binary``) or macro-averaged over the
  classes that occur in the slice as a target or a prediction (``multiclass``, as scikit-learn's ``macro``);
- ``mse``, ``mae`` (lower): mean squared and absolute error (``regression``);
- ``outcome`` (lower): the mean of a per-sample value you pass to ``update`` (a per-sample loss, say).

Intervals of the metrics that are not a rate come from a **Poisson bootstrap**: each sample enters each of
``bootstrap`` replicates with a Poisson(1) weight, drawn on the device from the metric's own generator (the
global RNG is left alone). Replicate 0 holds the unweighted sums. So the bootstrap keeps no per-sample buffer at
all: its memory is bounded by ``(bootstrap + 1) * (num_slices + 1) * columns`` floats whatever the epoch's size,
and it merges across ranks like any other sum (a Poisson bootstrap of the union is the union of the ranks'
Poisson bootstraps). The interval is the percentile interval of the replicates.

Example:
    >>> import torch
    >>> m = SliceMetrics(num_slices=2, metrics=["acc", "f1"], task="binary", bootstrap=50)
    >>> m.update(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 0, 1]), torch.tensor([0, 0, 1, 1]))
    >>> out = m.compute()
    >>> out.values["acc"].tolist(), out.counts.tolist(), round(out.overall["acc"], 3)
    ([1.0, 0.5], [2.0, 2.0], 0.75)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torchmetrics import Metric

__all__ = ["SLICE_METRICS", "SliceMetrics", "SliceResult", "interval_at", "sum_over_ranks", "wilson_interval"]

#: metric name -> (higher is better, is a rate with a Wilson interval, tasks it applies to)
SLICE_METRICS: Dict[str, Tuple[bool, bool, Tuple[str, ...]]] = {
    "acc": (True, True, ("binary", "multiclass")),
    "precision": (True, False, ("binary", "multiclass")),
    "recall": (True, False, ("binary", "multiclass")),
    "f1": (True, False, ("binary", "multiclass")),
    "mse": (False, False, ("regression",)),
    "mae": (False, False, ("regression",)),
    "outcome": (False, False, ("binary", "multiclass", "regression")),
}
_TASKS = ("binary", "multiclass", "regression")
_PER_CLASS = ("precision", "recall", "f1")


def wilson_interval(successes: torch.Tensor, n: torch.Tensor, confidence: float = 0.95
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Wilson's score interval of a rate ``successes / n`` (NaN where ``n`` is 0).

    Example:
        >>> lo, hi = wilson_interval(torch.tensor([8.0]), torch.tensor([10.0]))
        >>> round(lo.item(), 4), round(hi.item(), 4)
        (0.4902, 0.9433)
    """
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    n = n.double()
    p = successes.double() / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * torch.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (center - half).clamp(min=0.0), (center + half).clamp(max=1.0)


@dataclass
class SliceResult:
    """What :meth:`SliceMetrics.compute` returns (host tensors of float64, one entry per slice).

    Attributes:
        counts: samples per slice.
        values: metric -> value per slice (NaN where a slice has no sample, or the metric is undefined).
        ci_low, ci_high: metric -> interval bounds per slice (NaN where there is none).
        overall: metric -> value over every sample (the ``other`` row included).
        overall_ci: metric -> ``(low, high)`` of the overall value.
        intervals: confidence level -> metric -> ``(low per slice, high per slice, overall low, overall high)``,
            for every level asked for (the first is ``ci_low``/``ci_high``/``overall_ci``).
        stderr: metric -> bootstrap standard error per slice (NaN for rates and without bootstrap).
        overall_stderr: metric -> bootstrap standard error of the overall value.
        other: samples whose slice id was out of range.
        higher_is_better: metric -> direction.
    """

    counts: torch.Tensor
    values: Dict[str, torch.Tensor]
    ci_low: Dict[str, torch.Tensor]
    ci_high: Dict[str, torch.Tensor]
    overall: Dict[str, float]
    overall_ci: Dict[str, Tuple[float, float]]
    other: float
    higher_is_better: Dict[str, bool]
    intervals: Dict[float, Dict[str, Tuple[torch.Tensor, torch.Tensor, float, float]]]
    stderr: Dict[str, torch.Tensor]
    overall_stderr: Dict[str, float]


def interval_at(result: SliceResult, metric: str, confidence: float) -> Tuple[torch.Tensor, torch.Tensor, float, float]:
    """Intervals of ``metric`` at any level, from a computed result: ``(low, high)`` per slice and overall.

    Rates get Wilson's interval (exact at every level); the other metrics ``value ± z * stderr`` with the bootstrap
    standard error, which, unlike percentiles of a few hundred replicates, reaches far tails (a level corrected for
    many slices). NaN without bootstrap.

    Example:
        >>> m = SliceMetrics(2, ["acc"])
        >>> m.update(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]), torch.tensor([0, 0, 1, 1]))
        >>> lo, hi, olo, ohi = interval_at(m.compute(), "acc", 0.95)
        >>> [round(v, 3) for v in lo.tolist()], round(olo, 3)
        ([0.095, 0.342], 0.301)
    """
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    values, counts = result.values[metric], result.counts
    if SLICE_METRICS[metric][1]:
        lo, hi = wilson_interval(torch.round(values.nan_to_num(0.0) * counts), counts, confidence)
        total = counts.sum() + result.other
        olo, ohi = wilson_interval(torch.round(torch.tensor(result.overall[metric]) * total).reshape(1),
                                   total.reshape(1), confidence)
        return lo, hi, float(olo[0]), float(ohi[0])
    se, ose = result.stderr[metric], result.overall_stderr[metric]
    overall = result.overall[metric]
    return values - z * se, values + z * se, overall - z * ose, overall + z * ose


def sum_over_ranks(tensor: torch.Tensor, group: Optional[Any] = None) -> List[torch.Tensor]:
    """The transport of :class:`SliceMetrics`' sync: one SUM all-reduce of the state, returned as a one-element
    list for torchmetrics to apply its ``dist_reduce_fx`` (``sum``) to.

    torchmetrics' default transport gathers every rank's tensor (a barrier, an all-gather of the shapes, one of the
    data) because states may differ in shape across ranks; the slice table has the same fixed shape on every rank,
    so one all-reduce carries the same sum: one collective per evaluation.

    Example:
        >>> import torch
        >>> sum_over_ranks(torch.ones(2))  # one process: the tensor itself
        [tensor([1., 1.])]
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return [tensor]


class SliceMetrics(Metric):
    """Per-slice metrics with intervals, in one summed state tensor (see the module docstring).

    Args:
        num_slices: slice ids run from 0 to ``num_slices - 1`` (ids outside count in the ``other`` row).
        metrics: names from :data:`SLICE_METRICS`.
        task: ``binary`` (predictions: scores thresholded at ``threshold``, or labels, or ``[N, 2]`` scores),
            ``multiclass`` (``[N, C]`` scores or labels) or ``regression``.
        num_classes: classes of a ``multiclass`` task (needed for precision, recall and F1).
        threshold: decision threshold of ``binary`` scores given as ``[N]`` floats.
        bootstrap: Poisson-bootstrap replicates for the intervals of metrics that are not rates (0: none).
        confidence: level of the intervals, or a list of levels (the first is the main one; see
            :attr:`SliceResult.intervals`).
        seed: seed of the bootstrap generator (give each rank its own); re-seeded by :meth:`reset`, so every
            evaluation of the same data draws the same weights and the intervals of two evaluations compare.

    Example:
        >>> m = SliceMetrics(num_slices=3, metrics=["acc"])
        >>> m.update(torch.tensor([[2.0, 0.1], [0.3, 0.9]]), torch.tensor([0, 0]), torch.tensor([0, 5]))
        >>> out = m.compute()
        >>> out.counts.tolist(), out.other, out.overall["acc"]
        ([1.0, 0.0, 0.0], 1.0, 0.5)
    """

    full_state_update = False
    is_differentiable = False
    table: torch.Tensor

    def __init__(self, num_slices: int, metrics: Sequence[str] = ("acc",), task: str = "multiclass",
                 num_classes: Optional[int] = None, threshold: float = 0.5, bootstrap: int = 200,
                 confidence: Union[float, Sequence[float]] = 0.95, seed: int = 0, **kwargs: object) -> None:
        kwargs.setdefault("dist_sync_fn", sum_over_ranks)
        super().__init__(**kwargs)  # type: ignore[arg-type]
        where = "SliceMetrics"
        if task not in _TASKS:
            raise ValueError(f"{where}: task must be one of {', '.join(_TASKS)}, got {task!r}.")
        metrics = list(dict.fromkeys(metrics))
        for name in metrics:
            if name not in SLICE_METRICS:
                raise ValueError(f"{where}: unknown metric {name!r}; use some of {', '.join(SLICE_METRICS)}.")
            if task not in SLICE_METRICS[name][2]:
                raise ValueError(f"{where}: metric {name!r} does not apply to task {task!r}; it applies to "
                                 f"{', '.join(SLICE_METRICS[name][2])}.")
        if not metrics:
            raise ValueError(f"{where}: metrics is empty; name at least one of {', '.join(SLICE_METRICS)}.")
        if int(num_slices) < 1:
            raise ValueError(f"{where}: num_slices must be >= 1, got {num_slices!r}.")
        if task == "binary":
            num_classes = 2
        elif task == "multiclass" and any(m in _PER_CLASS for m in metrics) and not num_classes:
            raise ValueError(f"{where}: {', '.join(m for m in metrics if m in _PER_CLASS)} of a multiclass task "
                             f"need num_classes (the number of classes).")
        levels = [float(c) for c in (confidence if isinstance(confidence, (list, tuple)) else [confidence])]
        if not levels or not all(0 < c < 1 for c in levels):
            raise ValueError(f"{where}: confidence must be in (0, 1) (or a list of such levels), got {confidence!r}.")
        if int(bootstrap) < 0:
            raise ValueError(f"{where}: bootstrap must be >= 0 replicates, got {bootstrap!r}.")
        self.num_slices = int(num_slices)
        self.metric_names: List[str] = metrics
        self.task = task
        self.num_classes = int(num_classes or 0)
        self.threshold = float(threshold)
        self.levels = list(dict.fromkeys(levels))
        self.confidence = self.levels[0]
        self.seed = int(seed)
        needs_bootstrap = any(not SLICE_METRICS[m][1] for m in metrics)
        self.bootstrap = int(bootstrap) if needs_bootstrap else 0
        self.columns = self._layout()
        width = max(self.columns.values()) + 1
        self.add_state("table", torch.zeros(self.bootstrap + 1, self.num_slices + 1, width, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self._generator: Optional[torch.Generator] = None

    def _layout(self) -> Dict[str, int]:
        """Column of each per-sample statistic (per-class ones take ``num_classes`` columns from there)."""
        cols = {"n": 0}
        nxt = 1
        if self.task != "regression":
            cols["correct"] = nxt
            nxt += 1
            if any(m in _PER_CLASS for m in self.metric_names):
                for name in ("target", "pred", "tp"):
                    cols[name] = nxt
                    nxt += self.num_classes
        else:
            cols["sq"], cols["abs"] = nxt, nxt + 1
            nxt += 2
        if "outcome" in self.metric_names:
            cols["outcome"] = nxt
            nxt += 1
        cols["_end"] = nxt - 1
        return cols

    # ------------------------------------------------------------------------------------------- update
    def _labels(self, preds: torch.Tensor) -> torch.Tensor:
        if preds.is_floating_point():
            if preds.ndim >= 2 and preds.shape[-1] > 1:
                return preds.argmax(-1).reshape(-1)
            if self.task == "binary":
                return (preds.reshape(-1) > self.threshold).long()
            raise ValueError(f"SliceMetrics: multiclass predictions must be [N, C] scores or [N] integer labels, "
                             f"got floats of shape {tuple(preds.shape)}.")
        return preds.reshape(-1).long()

    def per_sample(self, preds: torch.Tensor, target: torch.Tensor,
                   outcome: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The ``[N, columns]`` per-sample statistics (float64, on ``preds``' device).

        Example:
            >>> SliceMetrics(1, ["acc"]).per_sample(torch.tensor([1, 2]), torch.tensor([1, 0])).tolist()
            [[1.0, 1.0], [1.0, 0.0]]
        """
        n = target.shape[0] if target.ndim else 1
        out = torch.zeros(n, self.columns["_end"] + 1, dtype=torch.float64, device=preds.device)
        out[:, 0] = 1.0
        if self.task == "regression":
            err = preds.reshape(n, -1).double().sum(1) - target.reshape(n, -1).double().sum(1)
            out[:, self.columns["sq"]] = err * err
            out[:, self.columns["abs"]] = err.abs()
        else:
            labels = self._labels(preds)
            tgt = target.reshape(-1).long()
            if labels.shape[0] != tgt.shape[0]:
                raise ValueError(f"SliceMetrics: {labels.shape[0]} predictions for {tgt.shape[0]} targets; give one "
                                 f"prediction per sample.")
            correct = (labels == tgt).double()
            out[:, self.columns["correct"]] = correct
            if "target" in self.columns:
                c = self.num_classes
                # out-of-range labels count in no class (clamped into a spare index that is cut off)
                t1 = torch.nn.functional.one_hot(torch.where((tgt >= 0) & (tgt < c), tgt, c), c + 1)[:, :c].double()
                p1 = torch.nn.functional.one_hot(torch.where((labels >= 0) & (labels < c), labels, c), c + 1)[:, :c]
                a, b, d = self.columns["target"], self.columns["pred"], self.columns["tp"]
                out[:, a:a + c] = t1
                out[:, b:b + c] = p1.double()
                out[:, d:d + c] = t1 * correct[:, None]
        if "outcome" in self.columns:
            if outcome is None:
                raise ValueError("SliceMetrics: metric 'outcome' needs the per-sample outcome in update(outcome=...).")
            out[:, self.columns["outcome"]] = outcome.reshape(-1).double()
        return out

    def update(self, preds: torch.Tensor, target: torch.Tensor, slice_ids: torch.Tensor,  # type: ignore[override]
               outcome: Optional[torch.Tensor] = None) -> None:
        """Add a batch: predictions, targets, the slice id of each sample (and its outcome, for ``outcome``)."""
        stats = self.per_sample(preds, target, outcome)
        ids = slice_ids.reshape(-1).to(stats.device).long()
        if ids.shape[0] != stats.shape[0]:
            raise ValueError(f"SliceMetrics: {ids.shape[0]} slice ids for {stats.shape[0]} samples; give one slice id "
                             f"per sample.")
        rows = self.num_slices + 1
        ids = torch.where((ids >= 0) & (ids < self.num_slices), ids, self.num_slices)
        onehot = torch.nn.functional.one_hot(ids, rows).double()
        spread = (onehot[:, :, None] * stats[:, None, :]).reshape(stats.shape[0], -1)  # [N, rows * columns]
        weights = torch.ones(self.bootstrap + 1, stats.shape[0], dtype=torch.float64, device=stats.device)
        if self.bootstrap:
            weights[1:] = torch.poisson(weights[1:], generator=self._bootstrap_generator(stats.device))
        self.table += (weights @ spread).reshape(self.table.shape)

    def _bootstrap_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def reset(self) -> None:
        super().reset()
        if self._generator is not None:
            self._generator.manual_seed(self.seed)

    # ------------------------------------------------------------------------------------------ compute
    def _metric(self, name: str, sums: torch.Tensor) -> torch.Tensor:
        """``name`` from summed statistics ``[..., columns]`` (NaN where undefined)."""
        cols = self.columns
        n = sums[..., 0]
        nan = torch.full_like(n, math.nan)
        if name == "acc":
            return torch.where(n > 0, sums[..., cols["correct"]] / n, nan)
        if name in ("mse", "mae", "outcome"):
            col = {"mse": "sq", "mae": "abs", "outcome": "outcome"}[name]
            return torch.where(n > 0, sums[..., cols[col]] / n, nan)
        c = self.num_classes
        tgt = sums[..., cols["target"]:cols["target"] + c]
        pred = sums[..., cols["pred"]:cols["pred"] + c]
        tp = sums[..., cols["tp"]:cols["tp"] + c]
        zero = torch.zeros_like(tp)
        # zero division gives 0, as scikit-learn's and torchmetrics' defaults
        precision = torch.where(pred > 0, tp / pred.clamp(min=1e-300), zero)
        recall = torch.where(tgt > 0, tp / tgt.clamp(min=1e-300), zero)
        denom = pred + tgt
        f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1e-300), zero)
        per_class = {"precision": precision, "recall": recall, "f1": f1}[name]
        if self.task == "binary":
            value = per_class[..., 1]
        else:
            present = (denom > 0).double()  # classes seen as a target or a prediction
            count = present.sum(-1)
            value = torch.where(count > 0, (per_class * present).sum(-1) / count.clamp(min=1), nan)
        return torch.where(n > 0, value, nan)

    def compute(self) -> SliceResult:  # type: ignore[override]
        """Values, intervals and counts per slice and overall (the state is synced across ranks first)."""
        table = self.table.detach().cpu()
        slices, everything = table[:, :self.num_slices], table.sum(1)  # [R, S, k], [R, k]
        counts = slices[0, :, 0].clone()
        values: Dict[str, torch.Tensor] = {}
        overall: Dict[str, float] = {}
        intervals: Dict[float, Dict[str, Tuple[torch.Tensor, torch.Tensor, float, float]]] = {
            c: {} for c in self.levels}
        stderr: Dict[str, torch.Tensor] = {}
        overall_stderr: Dict[str, float] = {}
        for name in self.metric_names:
            is_rate = SLICE_METRICS[name][1]
            per_slice = self._metric(name, slices)  # [R, S]
            total = self._metric(name, everything)  # [R]
            values[name] = per_slice[0]
            overall[name] = float(total[0])
            stderr[name], overall_stderr[name] = torch.full_like(counts, math.nan), math.nan
            if self.bootstrap and not is_rate:
                stderr[name] = _nanstd(per_slice[1:])
                overall_stderr[name] = float(_nanstd(total[1:, None])[0])
            for level in self.levels:
                if is_rate:
                    correct = slices[0, :, self.columns["correct"]]
                    lo, hi = wilson_interval(correct, counts, level)
                    olo, ohi = wilson_interval(everything[0, self.columns["correct"]], everything[0, 0], level)
                    intervals[level][name] = (lo, hi, float(olo), float(ohi))
                elif self.bootstrap:
                    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
                    bounds = torch.nanquantile(per_slice[1:], q, dim=0)  # [2, S]
                    tb = torch.nanquantile(total[1:], q)
                    intervals[level][name] = (bounds[0], bounds[1], float(tb[0]), float(tb[1]))
                else:
                    none = torch.full_like(counts, math.nan)
                    intervals[level][name] = (none, none, math.nan, math.nan)
        main = intervals[self.confidence]
        return SliceResult(counts=counts, values=values, ci_low={m: v[0] for m, v in main.items()},
                           ci_high={m: v[1] for m, v in main.items()}, overall=overall,
                           overall_ci={m: (v[2], v[3]) for m, v in main.items()},
                           other=float(table[0, self.num_slices, 0]),
                           higher_is_better={m: SLICE_METRICS[m][0] for m in self.metric_names}, intervals=intervals,
                           stderr=stderr, overall_stderr=overall_stderr)


def _nanstd(replicates: torch.Tensor) -> torch.Tensor:
    """Standard deviation over dim 0, leaving NaN replicates out (NaN with fewer than two finite ones)."""
    finite = torch.isfinite(replicates)
    n = finite.sum(0).double()
    x = torch.where(finite, replicates, torch.zeros_like(replicates))
    mean = x.sum(0) / n.clamp(min=1)
    var = (torch.where(finite, replicates - mean, torch.zeros_like(replicates)) ** 2).sum(0) / (n - 1).clamp(min=1)
    return torch.where(n >= 2, var.sqrt(), torch.full_like(mean, math.nan))
