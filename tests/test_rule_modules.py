"""The parts of the rules, each alone: settings (``rule_keys``), the shared rule logic (``rule_base``), the kinds
(``rule_kinds``), and the names :mod:`lightwatch.core.rules` keeps importable."""
from __future__ import annotations

import ast
import inspect
from enum import Enum
from typing import Any, Optional

import pytest

from lightwatch.core import rule_base, rule_keys, rule_kinds, rules
from lightwatch.core.rule_base import Finding, MetricStats, Rule
from lightwatch.core.rule_keys import RuleKeys


def test_rules_keeps_every_public_name_and_they_are_the_moved_objects() -> None:
    for name in rules.__all__:
        assert hasattr(rules, name), name
    assert rules.MetricStats is rule_base.MetricStats and rules.Firing is rule_base.Firing
    assert rules.Rule is rule_base.Rule and rules.CHECK_POINTS is rule_base.CHECK_POINTS
    assert rules.SpikeRule is rule_kinds.SpikeRule and rules.RULE_KINDS is rule_kinds.RULE_KINDS
    assert rules.build_rule is rule_kinds.build_rule and rules.plain is rule_keys.plain


@pytest.mark.parametrize("module, allowed", [
    (rule_keys, set()),
    (rule_base, {"lightwatch.core.actions", "lightwatch.core.alerts", "lightwatch.core.rule_keys"}),
    (rule_kinds, {"lightwatch.core.rule_base", "lightwatch.core.rule_keys"}),
])
def test_the_parts_import_only_below_themselves(module: Any, allowed: set) -> None:
    tree = ast.parse(inspect.getsource(module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module and node.module.startswith("lightwatch")}
    assert imported <= allowed


def test_rule_keys_name_the_rule_and_the_key() -> None:
    keys = RuleKeys("r", {"metric": "m", "patience": "3", "mode": "mean", "flag": 1, "names": ["a", ""]},
                    "MetricMonitor")
    with pytest.raises(ValueError, match=r"^MetricMonitor rule 'r': key 'patience' must be an integer, got '3'\.$"):
        keys.integer("patience")
    with pytest.raises(ValueError, match=r"key 'mode' must be one of min, max, got 'mean'"):
        keys.string("mode", choices=("min", "max"))
    with pytest.raises(ValueError, match=r"key 'flag' must be true or false, got 1"):
        keys.boolean("flag", False)
    with pytest.raises(ValueError, match=r"key 'names' must be a name or a list of names"):
        keys.names("names")
    with pytest.raises(ValueError, match=r"unknown key 'patiense'; did you mean 'patience'\?"):
        RuleKeys("r", {"patiense": 3}, "MetricMonitor").check_unknown(["metric", "patience"])
    with pytest.raises(ValueError, match=r"key 'above' is missing \(the config left it as \?\?\?\)"):
        RuleKeys("r", {"above": "???"}, "MetricMonitor").number("above")
    assert keys.integer("absent", 4) == 4 and keys.names("absent") == []
    assert RuleKeys("r", {"checks": 3.0}, "X").integer("checks") == 3  # a whole float is an integer


def test_enum_members_are_read_as_their_values() -> None:
    class Direction(Enum):
        UP = "up"

    assert RuleKeys("r", {"direction": Direction.UP}, "X").string("direction", choices=("up", "down")) == "up"


class Above(Rule):
    """A minimal kind: the value is above ``bound``."""

    kind = "above"
    kind_keys = ("bound",)

    def configure(self, keys: RuleKeys) -> None:
        self.bound: float = keys.number("bound", 1.0)  # type: ignore[assignment]

    def evaluate(self, stats: MetricStats, reference: Optional[MetricStats], step: int) -> Finding:
        value = self.select(stats)
        return Finding(value > self.bound, value, self.bound, detail=f"{self.metric} above {self.bound} at {step}.")


def test_a_kind_gets_warmup_streaks_cooldown_and_state_from_the_base() -> None:
    rule = Above("big", {"metric": "m", "bound": 2, "warmup": 2, "consecutive": 2, "cooldown": 3, "action": "log"})
    fired = [rule.check(MetricStats.of(5.0), None, step, 0, True)[1] for step in range(8)]
    # steps 0-1 warm-up; 2 starts the streak; 3 fires; 4-5 cool down; 6 fires again
    assert fired == [False, False, False, True, False, False, True, False]
    state = rule.state_dict()
    assert state["kind"] == "above" and state["fired"] == 2 and state["since"] == 2
    again = Above("big", {"metric": "m", "bound": 2})
    again.load_state_dict(state)
    assert (again.streak, again.last_fired, again.fired) == (rule.streak, rule.last_fired, rule.fired)


def test_a_kind_rejects_keys_of_other_kinds() -> None:
    with pytest.raises(ValueError, match=r"rule 'big': unknown key 'patience'"):
        Above("big", {"metric": "m", "patience": 3})


def test_build_rule_suggests_the_closest_kind() -> None:
    with pytest.raises(ValueError, match=r"key 'kind' must be one of .*got 'platau'; did you mean 'plateau'\?"):
        rule_kinds.build_rule("r", {"metric": "m", "kind": "platau"})
    with pytest.raises(ValueError, match=r"settings must be a mapping"):
        rule_kinds.build_rule("r", ["metric", "m"])
