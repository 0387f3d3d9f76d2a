"""Rules over metric values, declared as data: ``threshold``, ``nonfinite``, ``plateau``, ``spike``, ``gap``, ``trend``.

A rule is a mapping of plain settings (no expression strings are evaluated)::

    {"metric": "val/loss", "kind": "plateau", "patience": 5, "action": "stop"}

Every setting is checked when the rule is built; an error names the rule, the bad key and what is allowed.
Rule state (windows, counters, best values) is made of plain lists, ints, floats and strings, so it can be
saved in a checkpoint and loaded with ``torch.load(weights_only=True)``.

This module holds the host-side logic only: :class:`RuleSet` is given one :class:`MetricStats` per metric
(already reduced across ranks, so every rank takes the same decision) and returns the rules that fire.
What every rule shares is in :mod:`lightwatch.core.rule_base`, the kinds in :mod:`lightwatch.core.rule_kinds`,
the reading of settings in :mod:`lightwatch.core.rule_keys`; their public names are importable from here.
:class:`~lightwatch.callbacks.metric_monitor.MetricMonitor` reads the values, reduces them and carries out
the actions.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from lightwatch.core.rule_base import CHECK_POINTS, Finding, Firing, MetricStats, Rule
from lightwatch.core.rule_keys import plain
from lightwatch.core.rule_kinds import (RULE_KINDS, GapRule, NonFiniteRule, PlateauRule, SpikeRule, ThresholdRule,
                                        TrendRule, build_rule)

__all__ = [
    "CHECK_POINTS",
    "RULE_KINDS",
    "Finding",
    "Firing",
    "MetricStats",
    "Rule",
    "RuleSet",
    "ThresholdRule",
    "NonFiniteRule",
    "PlateauRule",
    "SpikeRule",
    "GapRule",
    "TrendRule",
    "build_rule",
    "plain",
]


class RuleSet:
    """The rules of one monitor, validated together, evaluated in dependency order.

    Args:
        rules: rule name -> settings (``None`` drops a rule of that name, e.g. a default one).
        where: name used in error messages.
        default_cooldown: cooldown (steps) of ``log``/``warn`` rules that set none.

    Example:
        >>> rs = RuleSet({"stuck": {"metric": "train/loss", "kind": "plateau", "patience": 2, "silent": True},
        ...               "big": {"metric": "grad", "kind": "threshold", "above": 5, "requires": "stuck"}})
        >>> [r.name for r in rs.rules]
        ['stuck', 'big']
    """

    def __init__(self, rules: Mapping[str, Any], where: str = "MetricMonitor", default_cooldown: int = 100) -> None:
        rules = plain(rules)
        if not isinstance(rules, Mapping):
            raise ValueError(f"{where}: rules must be a mapping of rule name to settings, got {type(rules).__name__}.")
        built = {str(name): build_rule(str(name), spec, where, default_cooldown)
                 for name, spec in rules.items() if spec is not None}
        for rule in built.values():
            for req in rule.requires:
                if req not in built:
                    close = difflib.get_close_matches(req, list(built), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else f"; rules: {', '.join(sorted(built))}"
                    raise ValueError(f"{where} rule {rule.name!r}: key 'requires' names unknown rule {req!r}{hint}")
                if req == rule.name:
                    raise ValueError(f"{where} rule {rule.name!r}: key 'requires' names the rule itself.")
        self.where = where
        self.rules: List[Rule] = self._ordered(built)
        self.by_name: Dict[str, Rule] = {r.name: r for r in self.rules}

    def _ordered(self, built: Dict[str, Rule]) -> List[Rule]:
        order: List[Rule] = []
        state: Dict[str, int] = {}

        def visit(name: str, path: List[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = " -> ".join(path[path.index(name):] + [name])
                raise ValueError(f"{self.where}: rules require each other in a cycle: {cycle}. Remove one 'requires'.")
            state[name] = 1
            for req in built[name].requires:
                visit(req, path + [name])
            state[name] = 2
            order.append(built[name])

        for name in built:
            visit(name, [])
        return order

    def __len__(self) -> int:
        return len(self.rules)

    def due(self, point: str) -> List[Rule]:
        """The rules checked at ``point`` (an internal check point such as ``step`` or ``epoch_late``)."""
        return [r for r in self.rules if point in r.points]

    @staticmethod
    def metrics_of(rules: Sequence[Rule]) -> List[str]:
        """The metrics ``rules`` read, each once, in rule order."""
        return list(dict.fromkeys(m for r in rules for m in r.metrics))

    def evaluate(self, point: str, rules: Sequence[Rule], stats: Mapping[str, MetricStats],
                 new: Mapping[str, bool], step: int, epoch: int) -> List[Firing]:
        """Update ``rules`` (those due at ``point``) with the values in ``stats``; return the firings.

        ``new[name]`` says whether the rule's metric was logged again since the rule last read it (a new
        tensor). A new tensor with exactly the value last read counts only at the same kind of check point: at
        phase changes Lightning hands out a fresh copy of an old value, which must not be counted twice.
        """
        firings: List[Firing] = []
        for rule in rules:
            current = stats.get(rule.metric)
            if current is None or not current.present:
                continue
            rule.seen = True
            ref = None
            if rule.reference is not None:
                ref = stats.get(rule.reference)
                if ref is None or not ref.present:
                    continue
            value = rule.select(current)
            repeat = rule.last_value is not None and _same(value, rule.last_value) and rule.last_point != point
            if not new.get(rule.name, False) or repeat:
                continue
            rule.last_value, rule.last_point = value, point
            gate = all(self.by_name[r].active for r in rule.requires)
            finding, fire = rule.check(current, ref, step, epoch, gate)
            if fire and finding is not None:
                firings.append(Firing(rule, finding, step))
        return firings

    def forget_after(self, step: int) -> None:
        """Drop what every rule learned from checks at steps >= ``step`` (after a rollback)."""
        for rule in self.rules:
            rule.forget_after(step)

    def state_dict(self) -> Dict[str, Any]:
        """Rule name -> that rule's state (plain values)."""
        return {r.name: r.state_dict() for r in self.rules}

    def load_state_dict(self, state: Mapping[str, Any], warn: Optional[Callable[[str], None]] = None) -> None:
        """Restore the rules' states; a saved state with no configured rule of that name and kind is skipped
        and reported through ``warn``."""
        for name, rule_state in dict(state).items():
            rule = self.by_name.get(name)
            if rule is None or rule_state.get("kind") != rule.kind:
                if warn is not None:
                    warn(f"{self.where}: saved state of rule {name!r} does not match a configured rule of the same "
                         f"kind; it was not restored.")
                continue
            rule.load_state_dict(rule_state)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
