"""What every rule shares: the values it judges, what it finds, when it fires, and its saved state.

:class:`MetricStats` is one metric's value at a check (reduced over ranks), :class:`Finding` what a rule
saw in it, :class:`Firing` a rule that fires; :class:`Rule` reads the keys every kind accepts and keeps the
streak, gate, warm-up and cooldown logic. The kinds are in :mod:`lightwatch.core.rule_kinds`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

from lightwatch.core.actions import check_action, lookup
from lightwatch.core.alerts import check_severity
from lightwatch.core.rule_keys import RuleKeys

__all__ = ["CHECK_POINTS", "Finding", "Firing", "MetricStats", "Rule"]

#: Where a rule can be checked (the ``check_on`` key).
#: ``every_step``: before every optimizer step (one host sync per step, see the docs);
#: ``step``: every ``every_n_steps`` steps, after the optimizer step; ``validation``: at validation end;
#: ``epoch``: at training-epoch end (values logged in ``LightningModule.on_train_epoch_end`` are read at the
#: start of the next epoch or at the end of training, because Lightning calls that hook after callbacks).
CHECK_POINTS: Tuple[str, ...] = ("every_step", "step", "validation", "epoch")
# Internal points: "epoch_late" is the follow-up read of values logged after the callbacks' epoch-end hook.
_POINTS_OF = {"every_step": ("every_step",), "step": ("step",), "validation": ("validation",),
              "epoch": ("epoch", "epoch_late")}
_REDUCTIONS = ("max", "min", "mean")


@dataclass
class MetricStats:
    """One metric's value at a check, reduced over ranks (all four equal on one process).

    Attributes:
        present: the metric existed on at least one rank.
        max: largest value over ranks (NaN counts as +inf).
        min: smallest value over ranks (NaN counts as -inf).
        mean: mean over the ranks where it exists (NaN when any is NaN).
        nonfinite: 0 finite everywhere, 1 infinite somewhere, 2 NaN somewhere.

    Example:
        >>> stats = MetricStats.of(float("inf"))
        >>> stats.present, stats.get("max"), stats.nonfinite
        (True, inf, 1)
        >>> MetricStats(True, max=3.0, min=1.0, mean=2.0).get("min")
        1.0
    """

    present: bool
    max: float
    min: float
    mean: float
    nonfinite: int = 0

    @staticmethod
    def of(value: float) -> "MetricStats":
        """Stats of a single value (one process)."""
        value = float(value)
        code = 2 if math.isnan(value) else (1 if math.isinf(value) else 0)
        return MetricStats(True, value, value, value, code)

    def get(self, reduce: str) -> float:
        """The value reduced with ``reduce`` (``max``, ``min`` or ``mean``)."""
        return float(getattr(self, reduce))


@dataclass
class Finding:
    """What a rule saw at one check: whether its condition holds, the value, the bound and a sentence.

    Attributes:
        holds: the rule's condition holds at this check.
        value: the value judged (for ``gap``: the gap).
        threshold: the bound the value crossed, where there is one.
        score: the rule's own measure (a z-score, a count of checks without improvement, ...).
        detail: the sentence that opens the alert message.

    Example:
        >>> Finding(True, 12.0, threshold=10.0, detail="train/loss = 12 is above 10 at step 5.").holds
        True
    """

    holds: bool
    value: float
    threshold: Optional[float] = None
    score: Optional[float] = None
    detail: str = ""


@dataclass
class Firing:
    """A rule that fires at this check (condition held for ``consecutive`` checks, gates open, not cooling down).

    Attributes:
        rule: the rule that fires.
        finding: what it saw.
        step: the step of the check.

    Example:
        >>> from lightwatch.core.rules import build_rule
        >>> rule = build_rule("loss_high", {"metric": "train/loss", "kind": "threshold", "above": 10,
        ...                                 "message": "Lower the learning rate."})
        >>> finding, fire = rule.check(MetricStats.of(12.0), None, step=5, epoch=0, gate_open=True)
        >>> Firing(rule, finding, 5).message
        'train/loss = 12 is above 10 at step 5. Lower the learning rate.'
    """

    rule: "Rule"
    finding: Finding
    step: int

    @property
    def message(self) -> str:
        """The alert message: the finding's sentence, the streak it held for, and the rule's own hint."""
        text = self.finding.detail
        if self.rule.consecutive > 1 and self.rule.since is not None:
            text = f"{text} (held at {self.rule.streak} checks in a row, since step {self.rule.since})"
        if self.rule.message:
            text = f"{text} {self.rule.message}"
        return text


class Rule:
    """One rule: a metric, a kind-specific condition, and when and how it fires.

    Keys every kind accepts:

    - ``metric`` (required): a key of ``trainer.callback_metrics`` or a built-in value of ``MetricMonitor``;
    - ``kind`` (required): ``threshold``, ``nonfinite``, ``plateau``, ``spike``, ``gap`` or ``trend``;
    - ``action`` (``warn``): any registered action (``log``, ``warn``, ``stop``, ``raise``, ``checkpoint``,
      ``skip_step``, ``rollback``, ...);
    - ``severity``: ``info|warning|error|critical`` (``error`` for ``nonfinite`` and for rules whose action is
      ``rollback``, ``warning`` otherwise);
    - ``check_on``: a list of ``every_step``, ``step``, ``validation``, ``epoch`` (default: the last three;
      ``[every_step]`` when the action is ``skip_step``, which must be decided before the update);
    - ``warmup`` (0) / ``warmup_epochs`` (0): optimizer steps / epochs before the rule looks at any value;
    - ``consecutive`` (1): fire only when the condition held at this many checks in a row;
    - ``cooldown``: steps after a firing during which the rule does not fire again (default: 0 for actions
      that change control flow, the monitor's alert cooldown for ``log``/``warn``);
    - ``requires``: a rule name or list of names that must all be *active* (their condition currently holds)
      for this rule to count, e.g. a gradient alarm that counts only while the loss is not improving;
    - ``silent`` (false): a condition only, for ``requires``: no alert, no action;
    - ``reduce``: ``max``, ``min`` or ``mean`` over ranks under DDP (default per kind: the worst rank for
      thresholds and spikes, the mean for plateau, trend and gap);
    - ``message``: text appended to the alert message (a hint for whoever reads it).

    A kind is a subclass that sets :attr:`kind` and :attr:`kind_keys`, reads its keys in :meth:`configure`
    and judges a value in :meth:`evaluate`; the kinds are registered in
    :data:`~lightwatch.core.rule_kinds.RULE_KINDS`.

    Args:
        name: the rule's name (alerts carry it as their ``rule``).
        spec: the settings, as above.
        where: the owner, for error messages.
        default_cooldown: cooldown (steps) of ``log``/``warn`` rules that set none.

    Example:
        >>> class Above(Rule):
        ...     kind = "above_one"
        ...     def evaluate(self, stats, reference, step):
        ...         value = self.select(stats)
        ...         return Finding(value > 1, value, 1.0, detail=f"{self.metric} is above 1 at step {step}.")
        >>> rule = Above("big", {"metric": "grad_norm", "consecutive": 2})
        >>> rule.action, rule.severity, rule.check_on
        ('warn', 'warning', ['step', 'validation', 'epoch'])
        >>> [rule.check(MetricStats.of(v), None, step=s, epoch=0, gate_open=True)[1]
        ...  for s, v in enumerate([2.0, 3.0, 0.5])]
        [False, True, False]
    """

    kind: ClassVar[str] = ""
    default_severity: ClassVar[str] = "warning"
    common_keys: ClassVar[Tuple[str, ...]] = (
        "metric", "kind", "action", "severity", "check_on", "warmup", "warmup_epochs", "consecutive", "cooldown",
        "requires", "silent", "reduce", "message")
    kind_keys: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, name: str, spec: Mapping[str, Any], *, where: str = "MetricMonitor",
                 default_cooldown: int = 100) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: rule names must be non-empty strings, got {name!r}.")
        keys = RuleKeys(name, spec, where)
        keys.check_unknown(self.common_keys + self.kind_keys)
        self.name = name
        self.where = where
        self.metric: str = keys.string("metric", required=True)  # type: ignore[assignment]
        self.silent = keys.boolean("silent", False)
        if self.silent and keys.has("action"):
            raise keys.error("action", "cannot be combined with silent: true (a silent rule takes no action)")
        self.action: str = keys.string("action", "log" if self.silent else "warn")  # type: ignore[assignment]
        try:
            check_action(self.action, f"{where} rule {name!r}")
        except ValueError as err:
            raise ValueError(f"{err} (key 'action')") from None
        # A rollback means the state went bad: error by default, so checkpoints taken meanwhile are not healthy.
        severity = "error" if self.action == "rollback" else self.default_severity
        self.severity: str = keys.string("severity", severity)  # type: ignore[assignment]
        try:
            check_severity(self.severity, f"{where} rule {name!r}")
        except ValueError as err:
            raise ValueError(f"{err} (key 'severity')") from None
        self.check_on = self._check_on(keys)
        self.points = tuple(p for c in self.check_on for p in _POINTS_OF[c])
        self.warmup: int = keys.integer("warmup", 0)  # type: ignore[assignment]
        self.warmup_epochs: int = keys.integer("warmup_epochs", 0)  # type: ignore[assignment]
        self.consecutive: int = keys.integer("consecutive", 1, minimum=1)  # type: ignore[assignment]
        spec_ = lookup(self.action)
        self.changes_control_flow = bool(spec_ is not None and spec_.changes_control_flow)
        auto_cooldown = 0 if self.changes_control_flow else int(default_cooldown)
        self.cooldown: int = keys.integer("cooldown", auto_cooldown)  # type: ignore[assignment]
        self.requires: List[str] = keys.names("requires")
        self.reduce: Optional[str] = keys.string("reduce", None, choices=_REDUCTIONS)
        self.message: str = str(keys.raw("message", "") or "")
        self.reference: Optional[str] = None
        self.configure(keys)
        self._init_state()

    def _check_on(self, keys: RuleKeys) -> List[str]:
        if keys.has("check_on"):
            check_on = keys.names("check_on")
            for point in check_on:
                if point not in CHECK_POINTS:
                    raise keys.error("check_on", f"holds {point!r}; use some of {', '.join(CHECK_POINTS)}")
            if "every_step" in check_on and "step" in check_on:
                raise keys.error("check_on", "lists both 'every_step' and 'step'; 'every_step' already checks "
                                             "every step, drop 'step'")
        else:
            keys.raw("check_on")
            check_on = ["every_step"] if self.action == "skip_step" else ["step", "validation", "epoch"]
        if self.action == "skip_step" and check_on != ["every_step"]:
            raise keys.error("check_on", "must be [every_step] with action 'skip_step': the update of a step can "
                                         "only be dropped by a check made before the optimizer step")
        return list(dict.fromkeys(check_on))

    # ------------------------------------------------------------------------------ kind hooks
    def configure(self, keys: RuleKeys) -> None:
        """Read the kind's own keys."""

    def select(self, stats: MetricStats) -> float:
        """The value this rule judges (the default reduction of its kind, or ``reduce``)."""
        return stats.get(self.reduce or "mean")

    def evaluate(self, stats: MetricStats, reference: Optional[MetricStats], step: int) -> Finding:
        """Judge a new value (and the reference's, for kinds that have one), updating the kind's state."""
        raise NotImplementedError(f"{type(self).__name__}: a rule kind must define evaluate().")

    def kind_state(self) -> Dict[str, Any]:
        """The kind's own state, as plain values (saved with the common state)."""
        return {}

    def load_kind_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`kind_state` returned."""

    def forget_after(self, step: int) -> None:
        """Drop what was learned from checks at steps >= ``step`` (the model went back to before them)."""
        self.streak = 0
        self.active = False

    # --------------------------------------------------------------------------------- common
    def _init_state(self) -> None:
        self.streak = 0
        self.since: Optional[int] = None  # the step of the first check of the current streak
        self.active = False
        self.last_fired: Optional[int] = None
        self.fired = 0
        self.seen = False
        self.last_value: Optional[float] = None
        self.last_point: Optional[str] = None
        self.last_score: Optional[float] = None

    @property
    def metrics(self) -> List[str]:
        """The metrics this rule reads: its own and its reference, if any."""
        return [self.metric] + ([self.reference] if self.reference else [])

    def needs_mean(self) -> bool:
        """Whether this rule reads the mean over ranks (which costs a SUM all-reduce under DDP)."""
        return (self.reduce or "mean") == "mean"

    def in_warmup(self, step: int, epoch: int) -> bool:
        """Whether ``step``/``epoch`` fall before the rule starts looking at values."""
        return step < self.warmup or epoch < self.warmup_epochs

    def check(self, stats: MetricStats, reference: Optional[MetricStats], step: int, epoch: int,
              gate_open: bool) -> Tuple[Optional[Finding], bool]:
        """Update the rule with a new value; return the finding and whether the rule fires now."""
        if self.in_warmup(step, epoch):
            self.active = False
            return None, False
        finding = self.evaluate(stats, reference, step)
        self.last_score = finding.score
        holds = finding.holds and gate_open
        self.streak = self.streak + 1 if holds else 0
        if self.streak == 1:
            self.since = step
        self.active = self.streak >= self.consecutive
        cooling = self.last_fired is not None and 0 <= step - self.last_fired < self.cooldown
        fire = self.active and not self.silent and not cooling
        if fire:
            self.last_fired = step
            self.fired += 1
        return finding, fire

    def state_dict(self) -> Dict[str, Any]:
        """The rule's state as plain values, loadable with ``torch.load(weights_only=True)``."""
        return {
            "kind": self.kind,
            "streak": int(self.streak),
            "since": self.since,
            "active": bool(self.active),
            "last_fired": self.last_fired,
            "fired": int(self.fired),
            "seen": bool(self.seen),
            "last_value": self.last_value,
            "last_point": self.last_point,
            **self.kind_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.streak = int(state.get("streak", 0))
        since = state.get("since")
        self.since = None if since is None else int(since)
        self.active = bool(state.get("active", False))
        last = state.get("last_fired")
        self.last_fired = None if last is None else int(last)
        self.fired = int(state.get("fired", 0))
        self.seen = bool(state.get("seen", False))
        value = state.get("last_value")
        self.last_value = None if value is None else float(value)
        self.last_point = state.get("last_point")
        self.load_kind_state(state)
