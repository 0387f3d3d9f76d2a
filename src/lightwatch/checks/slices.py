"""The rules of :class:`~lightwatch.callbacks.SliceMonitor`: ``slice_gap`` and ``slice_regressed``.

Both judge one evaluation of one metric over every slice (a :class:`SliceReading`, already merged across ranks,
so every rank takes the same decision) against the run's own noise: each slice's interval, not a fixed fraction.

- ``slice_gap``: a slice trails the overall value by more than ``margin`` beyond its own interval (for a metric
  where higher is better: ``overall - ci_high > margin``), at ``consecutive`` (2) evaluations in a row;
- ``slice_regressed``: a slice got significantly worse than its best evaluation so far (its interval now lies
  wholly below the interval it had then, by more than ``margin``) while the overall value did not get
  significantly worse (it stays at or above the lower bound of the overall interval it had then): the hidden
  regression an aggregate metric does not show. ``hidden_only: false`` judges the slice alone.

Slices with fewer than ``min_count`` samples are left out. A rule fires once per episode and slice: it fires
again for that slice only after its condition has cleared. Settings are read like ``MetricMonitor``'s rules
(:class:`~lightwatch.core.rule_keys.RuleKeys`): every error names the rule and the key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

from lightwatch.checks.finding import Finding
from lightwatch.core.actions import check_action
from lightwatch.core.alerts import check_severity
from lightwatch.core.rule_keys import RuleKeys, format_value, plain, rule_kind

__all__ = ["SLICE_RULE_KINDS", "SliceGapRule", "SliceReading", "SliceRegressedRule", "SliceRule",
           "build_slice_rules", "default_slice_rules"]


@dataclass
class SliceReading:
    """One evaluation of one metric: per slice its count, value and interval, and the overall value.

    Example:
        >>> r = SliceReading("acc", True, ["a", "b"], [50, 3], [0.9, 0.1], [0.8, 0.0], [0.95, 0.5], 0.85,
        ...                  (0.8, 0.9), min_count=10)
        >>> [r.eligible(i) for i in range(2)]
        [True, False]
    """

    metric: str
    higher_is_better: bool
    names: List[str]
    counts: List[float]
    values: List[float]
    ci_low: List[float]
    ci_high: List[float]
    overall: float
    overall_ci: Tuple[float, float]
    min_count: int = 1

    def eligible(self, i: int) -> bool:
        """Slice ``i`` has enough samples and a finite value and interval."""
        return (self.counts[i] >= self.min_count and math.isfinite(self.values[i])
                and math.isfinite(self.ci_low[i]) and math.isfinite(self.ci_high[i]))

    def trails_by(self, i: int) -> float:
        """How far slice ``i``'s interval lies on the worse side of the overall value (> 0: wholly worse)."""
        if self.higher_is_better:
            return self.overall - self.ci_high[i]
        return self.ci_low[i] - self.overall


class SliceRule:
    """A rule over the slices of one metric; fires per slice, once per episode.

    Keys every kind accepts: ``kind``, ``metric`` (one of the monitor's metrics; default: its first),
    ``action`` (``warn``; any registered action), ``severity`` (``warning``), ``consecutive`` (evaluations in a
    row the condition must hold), ``warmup`` (evaluations to skip at the start, 0), ``margin`` (0.0, in the
    metric's units, beyond the interval), ``message`` (text appended to the alert).

    Args:
        name: the rule's name (the alert's ``rule``).
        spec: its settings.
        default_metric: the metric used when ``metric`` is not given.
        where: the owner, for error messages.
    """

    kind: ClassVar[str] = ""
    default_consecutive: ClassVar[int] = 1
    common_keys: ClassVar[Tuple[str, ...]] = ("kind", "metric", "action", "severity", "consecutive", "warmup",
                                              "margin", "message")
    kind_keys: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, name: str, spec: Mapping[str, Any], default_metric: str, where: str = "SliceMonitor") -> None:
        keys = RuleKeys(name, spec, where)
        keys.check_unknown(self.common_keys + self.kind_keys)
        keys.raw("kind")
        self.name = name
        self.metric: str = keys.string("metric", default_metric)  # type: ignore[assignment]
        self.action: str = keys.string("action", "warn")  # type: ignore[assignment]
        try:
            check_action(self.action, f"{where} rule {name!r}")
            if self.action == "skip_step":
                raise ValueError(f"{where} rule {name!r}: action 'skip_step' cannot apply: slice rules are judged at "
                                 f"the end of validation, when no optimizer step is pending; use warn, stop, "
                                 f"checkpoint, raise or rollback")
        except ValueError as err:
            raise ValueError(f"{err} (key 'action')") from None
        self.severity: str = keys.string("severity", "warning")  # type: ignore[assignment]
        try:
            check_severity(self.severity, f"{where} rule {name!r}")
        except ValueError as err:
            raise ValueError(f"{err} (key 'severity')") from None
        self.consecutive: int = keys.integer("consecutive", self.default_consecutive, minimum=1)  # type: ignore
        self.warmup: int = keys.integer("warmup", 0)  # type: ignore[assignment]
        self.margin: float = keys.number("margin", 0.0, minimum=0.0)  # type: ignore[assignment]
        self.message = str(keys.raw("message", "") or "")
        self.configure(keys)
        self.evaluations = 0
        self.streaks: Dict[str, int] = {}
        self.latched: List[str] = []

    def configure(self, keys: RuleKeys) -> None:
        """Read the kind's own keys."""

    def holds(self, reading: SliceReading, i: int) -> Optional[Tuple[float, float, str]]:
        """``(value, threshold, sentence)`` when the condition holds for slice ``i``, else ``None``."""
        raise NotImplementedError

    def after(self, reading: SliceReading) -> None:
        """Update what the kind remembers once every slice was judged."""

    def judge(self, reading: SliceReading, step: int) -> List[Finding]:
        """Judge one evaluation; the findings of the slices for which the rule fires now."""
        self.evaluations += 1
        findings: List[Finding] = []
        if self.evaluations <= self.warmup:
            self.after(reading)
            return findings
        for i, name in enumerate(reading.names):
            hit = self.holds(reading, i) if reading.eligible(i) else None
            if hit is None:
                self.streaks.pop(name, None)
                if name in self.latched:
                    self.latched.remove(name)
                continue
            self.streaks[name] = self.streaks.get(name, 0) + 1
            if self.streaks[name] < self.consecutive or name in self.latched:
                continue
            self.latched.append(name)
            value, threshold, sentence = hit
            held = f" It held at {self.streaks[name]} evaluations in a row." if self.consecutive > 1 else ""
            text = f"{sentence}{held} {self.message}".strip()
            findings.append(Finding(self.name, self.severity, name, value, text, threshold=threshold, step=step,
                                    action=self.action))
        self.after(reading)
        return findings

    def state_dict(self) -> Dict[str, Any]:
        """Plain values, loadable with ``torch.load(weights_only=True)``."""
        return {"kind": self.kind, "evaluations": self.evaluations, "streaks": dict(self.streaks),
                "latched": list(self.latched)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluations = int(state.get("evaluations", 0))
        self.streaks = {str(k): int(v) for k, v in dict(state.get("streaks", {})).items()}
        self.latched = [str(n) for n in state.get("latched", [])]


def _fmt_ci(lo: float, hi: float) -> str:
    return f"[{format_value(lo)}, {format_value(hi)}]"


class SliceGapRule(SliceRule):
    """``slice_gap``: the slice trails the overall value by more than ``margin`` beyond its interval.

    Example:
        >>> rule = SliceGapRule("slice_gap", {"consecutive": 1}, "acc")
        >>> r = SliceReading("acc", True, ["majority", "minority"], [900, 100], [0.95, 0.55], [0.93, 0.45],
        ...                  [0.96, 0.64], 0.91, (0.89, 0.93), min_count=20)
        >>> [(f.subject, round(f.value, 2)) for f in rule.judge(r, step=100)]
        [('minority', 0.36)]
    """

    kind = "slice_gap"
    default_consecutive = 2

    def holds(self, reading: SliceReading, i: int) -> Optional[Tuple[float, float, str]]:
        beyond = reading.trails_by(i)
        if not beyond > self.margin:
            return None
        value, overall = reading.values[i], reading.overall
        gap = overall - value if reading.higher_is_better else value - overall
        needed = gap - beyond + self.margin  # the gap that would just be significant
        worse = "below" if reading.higher_is_better else "above"
        sentence = (f"slice {reading.names[i]!r} trails overall {reading.metric}: {format_value(value)} "
                    f"({int(reading.counts[i])} samples, interval {_fmt_ci(reading.ci_low[i], reading.ci_high[i])}) "
                    f"against {format_value(overall)} overall; its whole interval lies {format_value(beyond)} "
                    f"{worse} the overall value (margin {format_value(self.margin)}).")
        return gap, needed, sentence


class SliceRegressedRule(SliceRule):
    """``slice_regressed``: the slice got significantly worse than its best evaluation while the aggregate did not.

    Kind keys: ``hidden_only`` (true: only while the overall value is not significantly worse than it was at
    the slice's best evaluation).

    Example:
        >>> rule = SliceRegressedRule("slice_regressed", {}, "acc")
        >>> def reading(minority, overall):
        ...     lo, hi = (minority - 0.08, minority + 0.08)
        ...     return SliceReading("acc", True, ["majority", "minority"], [900, 100], [0.9, minority],
        ...                         [0.88, lo], [0.92, hi], overall, (overall - 0.02, overall + 0.02), min_count=20)
        >>> rule.judge(reading(0.9, 0.90), step=10), [f.subject for f in rule.judge(reading(0.4, 0.91), step=20)]
        ([], ['minority'])
    """

    kind = "slice_regressed"
    kind_keys = ("hidden_only",)

    def configure(self, keys: RuleKeys) -> None:
        self.hidden_only = keys.boolean("hidden_only", True)
        # per slice: value, ci_low, ci_high, overall, overall_low, overall_high, step of its best evaluation
        self.best: Dict[str, List[float]] = {}
        self._step = 0

    def judge(self, reading: SliceReading, step: int) -> List[Finding]:
        self._step = step
        return super().judge(reading, step)

    def holds(self, reading: SliceReading, i: int) -> Optional[Tuple[float, float, str]]:
        best = self.best.get(reading.names[i])
        if best is None:
            return None
        value, lo, hi = reading.values[i], reading.ci_low[i], reading.ci_high[i]
        b_value, b_lo, b_hi, b_overall, b_overall_lo, b_overall_hi, b_step = best
        higher = reading.higher_is_better
        drop = (b_lo - hi) if higher else (lo - b_hi)
        if not drop > self.margin:
            return None
        overall_held = reading.overall >= b_overall_lo if higher else reading.overall <= b_overall_hi
        if self.hidden_only and not overall_held:
            return None
        moved = "rose" if reading.overall > b_overall else "fell" if reading.overall < b_overall else "held"
        sentence = (f"slice {reading.names[i]!r} regressed on {reading.metric}: {format_value(value)} (interval "
                    f"{_fmt_ci(lo, hi)}, {int(reading.counts[i])} samples) against its best {format_value(b_value)} "
                    f"(interval {_fmt_ci(b_lo, b_hi)}) at step {int(b_step)}, while the overall {reading.metric} "
                    f"{moved} ({format_value(b_overall)} -> {format_value(reading.overall)}): a regression the "
                    f"aggregate hides.")
        return value, (b_lo if higher else b_hi), sentence

    def after(self, reading: SliceReading) -> None:
        for i, name in enumerate(reading.names):
            if not reading.eligible(i):
                continue
            best = self.best.get(name)
            better = best is None or (reading.values[i] > best[0] if reading.higher_is_better
                                      else reading.values[i] < best[0])
            if better:
                self.best[name] = [reading.values[i], reading.ci_low[i], reading.ci_high[i], reading.overall,
                                   reading.overall_ci[0], reading.overall_ci[1], float(self._step)]

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "best": {k: list(v) for k, v in self.best.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.best = {str(k): [float(x) for x in v] for k, v in dict(state.get("best", {})).items()}


#: rule kind -> class
SLICE_RULE_KINDS: Dict[str, type] = {cls.kind: cls for cls in (SliceGapRule, SliceRegressedRule)}


def default_slice_rules() -> Dict[str, Dict[str, Any]]:
    """The rules a ``SliceMonitor`` has when given none: both kinds, on its first metric, warning.

    Example:
        >>> sorted(default_slice_rules())
        ['slice_gap', 'slice_regressed']
    """
    return {"slice_gap": {"kind": "slice_gap"}, "slice_regressed": {"kind": "slice_regressed"}}


def build_slice_rules(rules: Optional[Mapping[str, Any]], metrics: Sequence[str],
                      where: str = "SliceMonitor") -> List[SliceRule]:
    """Build the rules (rule name -> settings; ``None`` drops one) over ``metrics`` (the first is the default).

    Example:
        >>> [r.kind for r in build_slice_rules({"gap_f1": {"kind": "slice_gap", "metric": "f1"}}, ["acc", "f1"])]
        ['slice_gap']
        >>> build_slice_rules({"g": {"kind": "slice_gap", "metric": "auc"}}, ["acc"])
        Traceback (most recent call last):
        ...
        ValueError: SliceMonitor rule 'g': key 'metric' names 'auc', which this monitor does not compute; its metrics: acc.
    """
    rules = plain(default_slice_rules() if rules is None else rules)
    if not isinstance(rules, Mapping):
        raise ValueError(f"{where}: rules must be a mapping of rule name to settings, got {type(rules).__name__}.")
    built: List[SliceRule] = []
    for name, spec in rules.items():
        if spec is None:
            continue
        spec = plain(spec)
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where} rule {name!r}: settings must be a mapping such as {{'kind': 'slice_gap'}}, "
                             f"got {spec!r}.")
        spec = {k: v for k, v in spec.items() if v is not None}  # null keeps a key's default (Hydra's schema)
        kind = rule_kind(str(name), spec, SLICE_RULE_KINDS, where)
        rule = SLICE_RULE_KINDS[kind](str(name), spec, metrics[0], where)
        if rule.metric not in metrics:
            raise ValueError(f"{where} rule {name!r}: key 'metric' names {rule.metric!r}, which this monitor does not "
                             f"compute; its metrics: {', '.join(metrics)}.")
        built.append(rule)
    return built
