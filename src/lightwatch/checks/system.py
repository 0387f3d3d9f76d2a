"""The job-health diagnoses of :class:`~lightwatch.callbacks.SystemMonitor`, judged on host numbers.

Each check sees one reading per logged step (the sums of a :class:`~lightwatch.core.system_stats.IntervalTiming`
or a memory reading) and reports a :class:`~lightwatch.checks.finding.Finding` when a fault *lasts*: a
single slow interval (a checkpoint write, a neighbour's burst on a shared machine) is never enough.

- ``input_bound``: the data wait is at least ``min_share`` of the step in ``patience`` logged intervals in a
  row, and at least ``min_wait_seconds`` a step. The data wait is host time between two batches, so it holds
  Lightning's own loop work too (about a millisecond, several on a loaded machine): on toy models with
  millisecond steps it can pass half the step without a slow loader, which the floor keeps quiet.
- ``memory_growth``: after a warm-up, the memory readings of the last ``window`` logged steps rise
  (most increments positive, the least-squares slope many standard errors above zero, and the rise a
  visible part of the level); the alert gives the growth per step and the projected step at which the
  device (or the host) runs out. ``warning`` when that step falls within the planned run or a run
  ``horizon_factor`` times as long as the steps done so far, ``info`` otherwise.
- ``step_time_regression``: the mean step time of ``patience`` logged intervals in a row is at least
  ``factor`` times the run's own baseline (the median of the first intervals after a warm-up that skips
  compilation and caching); ``warning`` when the process's CPU time a step grew with it, ``info`` when the
  process only waits longer (other jobs on a shared machine).
- ``straggler_rank``: under DDP, one rank's own time per step (data wait + forward: the part of a step
  before the gradient all-reduce makes the others wait for it) is at least ``factor`` times the median of
  the other ranks', and ``min_gap_seconds`` more, in ``patience`` logged intervals in a row.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Deque, List, Optional, Sequence, Tuple

from lightwatch.checks.finding import Finding

__all__ = ["INPUT_BOUND", "MEMORY_GROWTH", "STEP_TIME_REGRESSION", "STRAGGLER", "InputBoundCheck",
           "MemoryGrowthCheck", "StepTimeRegressionCheck", "StragglerCheck", "SYSTEM_DIAGNOSES"]

INPUT_BOUND = "input_bound"
MEMORY_GROWTH = "memory_growth"
STEP_TIME_REGRESSION = "step_time_regression"
STRAGGLER = "straggler_rank"
SYSTEM_DIAGNOSES = (INPUT_BOUND, MEMORY_GROWTH, STEP_TIME_REGRESSION, STRAGGLER)


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


class InputBoundCheck:
    """``input_bound``: the step waits for the data loader, lastingly.

    Args:
        min_share: share of the step spent waiting for the next batch.
        min_wait_seconds: and at least this many seconds of waiting a step.
        patience: logged intervals in a row.

    Example:
        >>> check = InputBoundCheck(patience=2)
        >>> check.observe(9, data_wait=0.08, step_time=0.1) is None  # once is not lasting
        True
        >>> check.observe(19, data_wait=0.08, step_time=0.1).rule  # reported once, when it becomes lasting
        'input_bound'
        >>> check.observe(29, data_wait=0.08, step_time=0.1) is None
        True
    """

    def __init__(self, min_share: float = 0.5, min_wait_seconds: float = 0.01, patience: int = 3) -> None:
        self.min_share, self.min_wait_seconds, self.patience = float(min_share), float(min_wait_seconds), int(patience)
        self.streak = 0

    def observe(self, step: int, data_wait: float, step_time: float) -> Optional[Finding]:
        """Judge one interval's mean data wait and mean step time (seconds a step)."""
        share = data_wait / step_time if step_time > 0 else 0.0
        bound = share >= self.min_share and data_wait >= self.min_wait_seconds
        self.streak = self.streak + 1 if bound else 0
        if self.streak != self.patience:  # once per episode: when it becomes lasting
            return None
        return Finding(
            INPUT_BOUND, "warning", "train", share,
            f"the training step waits for its data: {share:.0%} of each step ({data_wait * 1e3:.1f} ms of "
            f"{step_time * 1e3:.1f} ms) in {self.streak} logged intervals in a row. The data loader is the "
            f"bottleneck: raise DataLoader(num_workers=...), use pin_memory and persistent_workers, or move slow "
            f"transforms out of __getitem__ (precompute them, or run them on the device).",
            threshold=self.min_share, step=step)


class MemoryGrowthCheck:
    """``memory_growth``: memory that rises steadily after warm-up, with the projected out-of-memory step.

    Args:
        warmup_readings: logged readings ignored at the start (allocator caches, loader workers).
        window: readings judged at once (the most recent ones).
        min_readings: readings needed before judging.
        min_t: least-squares slope in standard errors (the run's own noise) needed.
        min_rise_fraction: share of the increments in the window that must be rises (or flat: allocators grow
            in chunks, so a leak reads as stairs; a sawtooth of collections fails it); at least half of them
            must be strict rises (a one-off level shift, such as a larger batch, is not a leak).
        min_relative_growth: rise over the window as a share of the level.
        horizon_factor: ``warning`` when memory runs out within the planned run or this many times the
            steps done so far; ``info`` otherwise.

    Example:
        >>> check = MemoryGrowthCheck(warmup_readings=0, window=8, min_readings=8)
        >>> for step in range(10, 90, 10):  # 1 MiB more every step
        ...     finding = check.observe(step, 2 ** 30 + step * 2 ** 20, available=2 ** 32, planned_last_step=10 ** 5)
        >>> finding.rule, finding.severity, finding.threshold > 80
        ('memory_growth', 'warning', True)
    """

    def __init__(self, warmup_readings: int = 3, window: int = 12, min_readings: int = 8, min_t: float = 8.0,
                 min_rise_fraction: float = 0.75, min_relative_growth: float = 0.02,
                 horizon_factor: float = 1000.0) -> None:
        self.warmup_readings, self.min_readings = int(warmup_readings), int(min_readings)
        self.min_t, self.min_rise_fraction = float(min_t), float(min_rise_fraction)
        self.min_relative_growth, self.horizon_factor = float(min_relative_growth), float(horizon_factor)
        self.readings: Deque[Tuple[int, float]] = deque(maxlen=int(window))
        self.seen = 0
        self.last_trend: Optional[Tuple[float, float]] = None  # (bytes a step, t)
        self.reported = False

    @staticmethod
    def trend(points: Sequence[Tuple[int, float]]) -> Tuple[float, float]:
        """Least-squares slope (units a step) and its size in standard errors (inf for an exact line)."""
        n = len(points)
        mx = sum(p[0] for p in points) / n
        my = sum(p[1] for p in points) / n
        sxx = sum((p[0] - mx) ** 2 for p in points)
        if sxx <= 0:
            return 0.0, 0.0
        slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
        residual = sum((p[1] - my - slope * (p[0] - mx)) ** 2 for p in points)
        se = math.sqrt(residual / max(n - 2, 1) / sxx)
        if se == 0:
            return slope, math.inf if slope > 0 else 0.0
        return slope, slope / se

    def observe(self, step: int, used: float, available: Optional[float],
                planned_last_step: Optional[float], what: str = "process RSS") -> Optional[Finding]:
        """Judge the memory in use at ``step`` (bytes); ``available``: bytes left before running out."""
        self.seen += 1
        if self.seen <= self.warmup_readings:
            return None
        self.readings.append((int(step), float(used)))
        if len(self.readings) < self.min_readings:
            return None
        points = list(self.readings)
        slope, t = self.trend(points)
        self.last_trend = (slope, t)
        # allocators grow in chunks: a leak reads as stairs, so a flat step counts as not falling; but a
        # level shift (a larger batch, a new phase) is one rise, and a leak rises again and again
        pairs = list(zip(points, points[1:]))
        rises = sum(b[1] >= a[1] for a, b in pairs) / len(pairs)
        strict = sum(b[1] > a[1] for a, b in pairs) / len(pairs)
        growth = slope * (points[-1][0] - points[0][0])
        level = max(points[0][1], 1.0)
        if not (slope > 0 and t >= self.min_t and rises >= self.min_rise_fraction and strict >= 0.5
                and growth >= self.min_relative_growth * level):
            self.reported = False
            return None
        if self.reported:  # once per episode of growth
            return None
        self.reported = True
        oom_step = step + available / slope if available is not None and available > 0 else math.inf
        horizon = max(float(planned_last_step or 0), step * self.horizon_factor)
        severity = "warning" if oom_step <= horizon else "info"
        when = (f"at this rate it runs out at about step {oom_step:,.0f} ({_mb(available or 0)} left)"
                if math.isfinite(oom_step) else "the memory left is unknown")
        return Finding(
            MEMORY_GROWTH, severity, what, slope,
            f"{what} grows steadily: +{_mb(slope)} a step over the last {len(points)} logged steps "
            f"({_mb(points[0][1])} -> {_mb(points[-1][1])}, {rises:.0%} of the readings did not fall); {when}. A leak: "
            f"tensors kept across steps with their graph (append loss.detach() or loss.item(), not loss), "
            f"activations or outputs cached in a list, or a growing Python container.",
            threshold=None if not math.isfinite(oom_step) else oom_step, step=step)


class StepTimeRegressionCheck:
    """``step_time_regression``: the step lastingly slower than the run's own earlier steps.

    The process's CPU time a step says whose time it is: when it grew with the step (at least half as much),
    the step does more work (a growing per-step cost, memory pressure, a throttled device the host spins on):
    ``warning``. When the step slowed and its CPU time did not, the process waits: for other jobs on the
    machine, for I/O: ``info``, since the run itself did not change.

    Args:
        factor: slowdown against the baseline.
        patience: logged intervals in a row.
        warmup_readings: logged intervals skipped at the start (compilation, caches, loader start-up).
        baseline_readings: intervals whose median is the baseline.
        min_extra_seconds: and the step at least this many seconds slower: on millisecond steps a doubling
            is a few milliseconds of noise from anything (the loop's own work, a denormal, the allocator), and
            costs nothing a user should act on.

    Example:
        >>> check = StepTimeRegressionCheck(warmup_readings=1, baseline_readings=2, patience=2)
        >>> [check.observe(s, t, t) for s, t in [(9, 0.5), (19, 0.1), (29, 0.1), (39, 0.3)]]
        [None, None, None, None]
        >>> finding = check.observe(49, 0.3, 0.3)
        >>> finding.rule, finding.severity
        ('step_time_regression', 'warning')
    """

    def __init__(self, factor: float = 2.0, patience: int = 3, warmup_readings: int = 2,
                 baseline_readings: int = 5, min_extra_seconds: float = 0.01) -> None:
        self.factor, self.patience = float(factor), int(patience)
        self.min_extra_seconds = float(min_extra_seconds)
        self.warmup_readings, self.baseline_readings = int(warmup_readings), int(baseline_readings)
        self.seen = 0
        self.early: List[Tuple[float, float]] = []
        self.baseline: Optional[float] = None
        self.baseline_cpu: Optional[float] = None
        self.streak = 0

    def observe(self, step: int, step_time: float, cpu_time: Optional[float] = None) -> Optional[Finding]:
        """Judge one interval's mean step time and CPU time a step (seconds; ``None``: CPU time unknown)."""
        self.seen += 1
        if self.seen <= self.warmup_readings or step_time <= 0:
            return None
        if self.baseline is None:
            self.early.append((step_time, -1.0 if cpu_time is None else cpu_time))
            if len(self.early) >= self.baseline_readings:
                self.baseline = statistics.median(t for t, _ in self.early)
                cpus = [c for _, c in self.early if c >= 0]
                self.baseline_cpu = statistics.median(cpus) if len(cpus) == len(self.early) else None
            return None
        ratio = step_time / self.baseline
        slower = ratio >= self.factor and step_time - self.baseline >= self.min_extra_seconds
        self.streak = self.streak + 1 if slower else 0
        if self.streak != self.patience:
            return None
        waiting = False
        cpu_note = ""
        if cpu_time is not None and self.baseline_cpu:
            cpu_ratio = cpu_time / self.baseline_cpu
            waiting = cpu_ratio - 1 < 0.5 * (ratio - 1)
            cpu_note = f"; its CPU time a step went {cpu_ratio:.1f}x"
        cause = ("The process waits rather than works: other jobs on the machine, I/O, or a device it does not "
                 "spin on." if waiting else
                 "The step does more work: a growing per-step cost in the training step, memory growth (swapping, "
                 "allocator pressure), or a throttled device (temperature, power).")
        return Finding(
            STEP_TIME_REGRESSION, "info" if waiting else "warning", "train", ratio,
            f"the training step is {ratio:.1f}x slower than earlier in this run ({step_time * 1e3:.1f} ms against "
            f"{self.baseline * 1e3:.1f} ms) for {self.streak} logged intervals in a row{cpu_note}. {cause}",
            threshold=self.factor, step=step)


class StragglerCheck:
    """``straggler_rank``: one rank lastingly slower than the others before the gradient all-reduce.

    Args:
        factor: the rank's own time against the median of the other ranks'.
        min_gap_seconds: and at least this many seconds more a step.
        patience: logged intervals in a row, the same rank.

    Example:
        >>> check = StragglerCheck(patience=2)
        >>> check.observe(9, [0.01, 0.05], ["a", "b"]) is None
        True
        >>> check.observe(19, [0.01, 0.05], ["a", "b"]).subject
        'rank 1 (b)'
    """

    def __init__(self, factor: float = 1.5, min_gap_seconds: float = 0.005, patience: int = 3) -> None:
        self.factor, self.min_gap_seconds, self.patience = float(factor), float(min_gap_seconds), int(patience)
        self.rank: Optional[int] = None
        self.streak = 0

    def observe(self, step: int, own_times: Sequence[float], hosts: Sequence[str]) -> Optional[Finding]:
        """Judge every rank's mean own time a step (seconds, indexed by global rank)."""
        if len(own_times) < 2:
            return None
        slowest = max(range(len(own_times)), key=lambda r: own_times[r])
        others = statistics.median([t for r, t in enumerate(own_times) if r != slowest])
        lag = own_times[slowest] - others
        lagging = own_times[slowest] >= self.factor * others and lag >= self.min_gap_seconds
        self.streak = self.streak + 1 if lagging and slowest == self.rank else (1 if lagging else 0)
        self.rank = slowest if lagging else None
        if self.streak != self.patience:
            return None
        host = hosts[slowest] if slowest < len(hosts) else "?"
        return Finding(
            STRAGGLER, "warning", f"rank {slowest} ({host})", own_times[slowest] / max(others, 1e-9),
            f"rank {slowest} on {host} is a straggler: {own_times[slowest] * 1e3:.1f} ms a step before the gradient "
            f"all-reduce against {others * 1e3:.1f} ms on the other ranks (median), for {self.streak} logged "
            f"intervals in a row; every rank waits for it at each step. Look at that rank's device (throttling, "
            f"temperature, ECC), its data loader and the other jobs on {host}.",
            threshold=self.factor, step=step)
