"""The values a set of rules reads, reduced over ranks in one buffer: one host read, at most two collectives.

Each value is a device scalar, a host number or missing (``None``). On one process the values are read to the
host as they are. Under DDP/FSDP one MAX all-reduce carries, per value, whether some rank has it, the highest
and (negated) lowest value and a NaN/Inf code, plus per-rule "new value" flags and extra flags; one SUM
all-reduce carries the sums and counts when a rule needs a mean (or a metric is a sum of squares over shards).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch

from lightwatch.core.action_context import MonitorWarning
from lightwatch.core.reduce import all_reduce_flat
from lightwatch.core.rule_base import MetricStats

__all__ = ["ReducedValues", "RuleValues", "ValueStack", "reduce_values"]



def _missing() -> MetricStats:
    return MetricStats(False, math.nan, math.nan, math.nan)


class ValueStack:
    """Stacks scalar values into one float32 vector on a device, with one stack op (no host sync).

    Example:
        >>> ValueStack().stack([torch.tensor(2.0), None, 3], torch.device("cpu")).tolist()
        [2.0, 0.0, 3.0]
    """

    def __init__(self) -> None:
        self._zero: Optional[torch.Tensor] = None

    def stack(self, raw: Sequence[Any], device: torch.device) -> torch.Tensor:
        """One float32 vector on ``device`` (0 where a value is missing)."""
        if device.type == "cpu" and all(v is None or not isinstance(v, torch.Tensor) or v.device.type == "cpu"
                                        for v in raw):
            # host numbers and CPU tensors: read here (no device to wait for), one tensor built from them
            # instead of one per value (~10 us each inside a training step)
            return torch.tensor([0.0 if v is None else float(v) for v in raw], dtype=torch.float32)
        items: List[torch.Tensor] = []
        for v in raw:
            if isinstance(v, torch.Tensor) and v.device == device:
                items.append(v.detach().reshape(()).float())
            elif isinstance(v, torch.Tensor) and v.device.type != "cpu":
                items.append(v.detach().reshape(()).float().to(device))
            elif v is None:
                zero = self._zero
                if zero is None or zero.device != device:
                    zero = self._zero = torch.zeros((), device=device)
                items.append(zero)
            else:  # a host number, or a CPU tensor (reading host memory is no device sync)
                items.append(torch.tensor(float(v), device=device))
        return torch.stack(items) if items else torch.zeros(0, device=device)


class ReducedValues(NamedTuple):
    """What :func:`reduce_values` read: per-name statistics, the reduced new-value flags and extra flags.

    Example:
        >>> ReducedValues(stats={}, new_flags=[1.0], flags=[], collectives=0).collectives
        0
    """

    stats: Dict[str, MetricStats]
    new_flags: List[float]
    flags: List[float]
    collectives: int


def reduce_values(names: Sequence[str], raw: Sequence[Any], values: torch.Tensor, new_flags: Sequence[float],
                  flags: Sequence[float], distributed: bool, need_sum: bool,
                  sum_of_squares: Optional[str] = None) -> ReducedValues:
    """Reduce ``values`` (``raw`` stacked, one per name) over ranks and read them to the host once.

    Args:
        names: the metric names, one per value.
        raw: the values before stacking (``None`` marks a missing one).
        values: ``raw`` as one device vector (:class:`ValueStack`).
        new_flags: per rule, 1.0 where its value is new on this rank (reduced with MAX).
        flags: extra flags to reduce with MAX.
        distributed: a process group is up (else the values are read as they are).
        need_sum: some rule needs the mean over ranks.
        sum_of_squares: a metric whose value is a sum of squares over shards: its statistic is the square root
            of the sum over ranks (a global gradient norm under FSDP).

    Example:
        >>> raw = [torch.tensor(2.0), None]
        >>> out = reduce_values(["a", "b"], raw, ValueStack().stack(raw, torch.device("cpu")), [1.0], [0.0],
        ...                     distributed=False, need_sum=False)
        >>> out.stats["a"].max, out.stats["b"].present, out.collectives
        (2.0, False, 0)
    """
    n = len(names)
    index = {name: i for i, name in enumerate(names)}
    if not distributed:
        local = values.tolist() if n else []
        stats = {name: MetricStats.of(local[i]) if raw[i] is not None else _missing() for i, name in enumerate(names)}
        if sum_of_squares in index and raw[index[sum_of_squares]] is not None:
            stats[sum_of_squares] = MetricStats.of(math.sqrt(local[index[sum_of_squares]]))
        return ReducedValues(stats, list(new_flags), list(flags), 0)
    device = values.device
    present = torch.tensor([0.0 if v is None else 1.0 for v in raw] + list(new_flags) + list(flags), device=device)
    inf = float("inf")
    pres = present[:n] > 0
    code = torch.isnan(values).float() * 2 + torch.isinf(values).float()
    high = torch.where(pres, values.nan_to_num(nan=inf, posinf=inf, neginf=-inf), -inf)
    neg_low = torch.where(pres, (-values).nan_to_num(nan=inf, posinf=inf, neginf=-inf), -inf)
    max_buf = torch.cat([present, high, neg_low, code])
    squares = sum_of_squares in index
    sum_buf = None
    if squares or need_sum:
        sum_buf = torch.cat([torch.where(pres, values, torch.zeros_like(values)), present[:n]])
    all_reduce_flat(sum_buf, max_buf)
    host = torch.cat([max_buf] + ([sum_buf] if sum_buf is not None else [])).tolist()

    k, f = len(new_flags), len(flags)
    pres_h, new_h, flags_h = host[:n], host[n:n + k], host[n + k:n + k + f]
    off = n + k + f
    high_h, neg_low_h, code_h = host[off:off + n], host[off + n:off + 2 * n], host[off + 2 * n:off + 3 * n]
    off += 3 * n
    sums_h = host[off:off + n] if sum_buf is not None else None
    counts_h = host[off + n:off + 2 * n] if sum_buf is not None else None
    stats: Dict[str, MetricStats] = {}
    for i, name in enumerate(names):
        if pres_h[i] <= 0:
            stats[name] = _missing()
        elif squares and name == sum_of_squares:
            stats[name] = MetricStats.of(math.sqrt(sums_h[i]) if sums_h is not None else math.nan)
        else:
            mean = sums_h[i] / counts_h[i] if sums_h is not None and counts_h[i] > 0 else math.nan
            stats[name] = MetricStats(True, high_h[i], -neg_low_h[i], mean, int(code_h[i]))
    return ReducedValues(stats, new_h, flags_h, 1)


class RuleValues:
    """Reads what a set of rules watches at a check: the values, whether each is new, reduced over ranks.

    A rule consumes its metric only when it was logged again since the rule last read it (the same object
    is not new), so ``val/loss`` counts once per validation whatever the check points. Values that are not
    scalars are skipped with one warning per metric.

    Example:
        >>> from lightwatch.core.rules import RuleSet
        >>> rules = RuleSet({"high": {"metric": "x", "kind": "threshold", "above": 1.0}}).rules
        >>> reader, x = RuleValues(), torch.tensor(2.0)
        >>> out, new = reader.read(["x"], {"x": x}.get, rules, [], torch.device("cpu"), False, False)
        >>> out.stats["x"].max, new, reader.read(["x"], {"x": x}.get, rules, [], torch.device("cpu"),
        ...                                      False, False)[1]
        (2.0, {'high': True}, {'high': False})
    """

    def __init__(self) -> None:
        self.last: Dict[str, Any] = {}  # per rule, the value object it read last (tensors of this process only)
        self._nonscalar_warned: set = set()
        self._stack = ValueStack()

    def forget(self) -> None:
        """Drop the values read so far (end of a fit)."""
        self.last.clear()

    def read(self, names: Sequence[str], value_of: Any, rules: Sequence[Any], flags: Sequence[float],
             device: torch.device, distributed: bool, need_sum: bool, sum_of_squares: Optional[str] = None):
        """``(ReducedValues, {rule name: new?})`` of ``names`` (``value_of(name)`` gives each raw value)."""
        raw = [self._scalar(n, value_of(n)) for n in names]
        index = {n: i for i, n in enumerate(names)}
        new_flags = [1.0 if raw[index[r.metric]] is not None and raw[index[r.metric]] is not self.last.get(r.name)
                     else 0.0 for r in rules]
        for r in rules:
            if raw[index[r.metric]] is not None:
                self.last[r.name] = raw[index[r.metric]]
        reduced = reduce_values(names, raw, self._stack.stack(raw, device), new_flags, flags, distributed,
                                need_sum=need_sum, sum_of_squares=sum_of_squares)
        return reduced, {r.name: f > 0 for r, f in zip(rules, reduced.new_flags)}

    def _scalar(self, name: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.numel() == 1:
                return value
            if name not in self._nonscalar_warned:
                self._nonscalar_warned.add(name)
                warnings.warn(f"MetricMonitor: metric {name!r} holds {value.numel()} values, not one; rules on it are "
                              f"skipped. Log a scalar (e.g. its mean).", MonitorWarning, stacklevel=4)
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        return None
