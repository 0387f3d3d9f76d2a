"""Rule kinds on scripted metric sequences: each fires exactly when it should, never on healthy sequences.

These drive :class:`lightwatch.core.rules.RuleSet` directly (host-side logic, no Trainer); the Trainer-level
behaviour (when values are read, DDP, actions) is in ``test_metric_monitor.py`` and ``test_recovery.py``.
"""
from __future__ import annotations

import io
import math
import random
from typing import Any, Dict, List, Mapping, Optional, Sequence

import pytest
import torch

from lightwatch.core.rules import MetricStats, RuleSet, SpikeRule

NAN, INF = float("nan"), float("inf")


def run(rules: Mapping[str, Any], series: Dict[str, Sequence[float]], point: str = "step",
        epochs: Optional[Sequence[int]] = None) -> Dict[str, List[int]]:
    """Feed ``series`` (metric -> values, one per check) to ``rules``; return rule -> indices where it fired."""
    rs = rules if isinstance(rules, RuleSet) else RuleSet(rules)
    length = max(len(v) for v in series.values())
    fired: Dict[str, List[int]] = {r.name: [] for r in rs.rules}
    for i in range(length):
        stats = {m: MetricStats.of(v[i]) for m, v in series.items() if i < len(v) and v[i] is not None}
        due = rs.due(point)
        new = {r.name: True for r in due}
        epoch = epochs[i] if epochs is not None else 0
        for f in rs.evaluate(point, due, stats, new, step=i, epoch=epoch):
            fired[f.rule.name].append(i)
    return fired


def healthy_loss(seed: int, n: int = 400, batch: int = 16) -> List[float]:
    """A decreasing training loss with batch noise (mean of `batch` exponential per-sample losses)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        level = 0.3 + 2.0 * math.exp(-i / 80)
        out.append(sum(rng.expovariate(1.0 / level) for _ in range(batch)) / batch)
    return out


# --------------------------------------------------------------------------------------------- kinds
def test_threshold_fires_above_and_below_and_on_nan() -> None:
    fired = run({"hi": {"metric": "m", "kind": "threshold", "above": 10, "action": "log", "cooldown": 0},
                 "lo": {"metric": "m", "kind": "threshold", "below": 0, "action": "log", "cooldown": 0},
                 "band": {"metric": "m", "kind": "threshold", "above": 10, "below": 0, "action": "log",
                          "cooldown": 0}},
                {"m": [1, 10, 10.5, 3, -0.1, 0, NAN, 2]})
    assert fired["hi"] == [2, 6]  # 10 is not above 10; NaN is outside any bound
    assert fired["lo"] == [4, 6]
    assert fired["band"] == [2, 4, 6]


def test_nonfinite_fires_on_nan_and_inf_only() -> None:
    fired = run({"nf": {"metric": "m", "kind": "nonfinite", "cooldown": 0}},
                {"m": [1.0, NAN, 2.0, INF, -INF, 1e30]})
    assert fired["nf"] == [1, 3, 4]


def test_plateau_counts_checks_without_improvement_including_exact_repeats() -> None:
    rules = {"p": {"metric": "m", "kind": "plateau", "patience": 3, "min_delta": 0.1, "action": "stop"}}
    # improvements at 0, 1; 1.95/1.99/1.92 are within min_delta of the best (2.0); 1.5 improves again
    fired = run(rules, {"m": [3.0, 2.0, 1.95, 1.99, 1.92, 1.5, 1.5, 1.5, 1.5, 1.5]})
    assert fired["p"] == [4, 8, 9]  # stop rules have no cooldown: they fire at every check while it holds
    fired = run({"p": {"metric": "acc", "kind": "plateau", "mode": "max", "patience": 2, "action": "stop"}},
                {"acc": [0.5, 0.75, 0.75, 0.75, 0.8, NAN, 0.7]})
    assert fired["p"] == [3, 6]  # exact repeats and NaN are not improvements


def test_spike_fires_exactly_at_the_spike_and_not_on_healthy_noise() -> None:
    for seed in range(20):
        assert run({"s": {"metric": "loss", "kind": "spike"}}, {"loss": healthy_loss(seed)})["s"] == [], seed
    series = healthy_loss(3)
    series[300] += 2.0
    series[301] = NAN
    fired = run({"s": {"metric": "loss", "kind": "spike", "cooldown": 0}}, {"loss": series})
    assert fired["s"] == [300, 301]


def test_spike_window_excludes_flagged_values_and_needs_history() -> None:
    rs = RuleSet({"s": {"metric": "m", "kind": "spike", "window": 5, "min_history": 5, "cooldown": 0}})
    rule = rs.by_name["s"]
    fired = run(rs, {"m": [1.0, 1.1, 0.9, 50.0, 1.0, 1.05, 50.0, 50.0]})
    assert fired["s"] == [6, 7]  # index 3 came before 5 values were known: it is history, not a spike
    assert 50.0 in rule.values and rule.values.count(50.0) == 1  # flagged 50s never entered the window
    assert len(rule.values) == 5


def test_spike_methods_directions_and_floors() -> None:
    down = run({"s": {"metric": "m", "kind": "spike", "direction": "down", "min_history": 5}},
               {"m": [1.0, 1.1, 0.9, 1.0, 1.05, 5.0, 0.01]})
    assert down["s"] == [6]
    std = run({"s": {"metric": "m", "kind": "spike", "method": "std", "min_history": 5}},
              {"m": [1.0, 1.1, 0.9, 1.0, 1.05, 1.02, 2.5]})
    assert std["s"] == [6]
    # a nearly constant series: MAD ~ 0, yet a 1% wiggle is no spike (min_rel_change 5%), a 20% jump is
    flat = [1.0] * 20 + [1.01, 1.0, 1.2]
    assert run({"s": {"metric": "m", "kind": "spike"}}, {"m": flat})["s"] == [22]
    rule = SpikeRule("x", {"metric": "m", "kind": "spike", "method": "std"})
    assert (rule.window, rule.z) == (128, 6.0)  # OLMo-core's stability-monitor defaults


def test_gap_compares_metric_with_reference() -> None:
    fired = run({"overfit": {"metric": "val", "kind": "gap", "reference": "train", "above": 0.5, "cooldown": 0},
                 "rel": {"metric": "val", "kind": "gap", "reference": "train", "above": 0.5, "relative": True,
                         "cooldown": 0}},
                {"val": [1.0, 1.0, 1.2, 1.4], "train": [0.9, 0.6, 0.6, 1.0]})
    assert fired["overfit"] == [2]  # 0.6 > 0.5 only at index 2
    assert fired["rel"] == [1, 2]  # 0.4/0.6 and 0.6/0.6 relative gaps


def test_trend_fires_on_a_sustained_rise_and_not_on_healthy_noise() -> None:
    fired = run({"t": {"metric": "m", "kind": "trend", "checks": 4, "cooldown": 0}},
                {"m": [1.0, 1.0, 1.0, 1.0, 1.1, 1.05, 1.2, 1.3, NAN, 1.25, 1.0, 0.9]})
    # window [1.0, 1.1, 1.05, 1.2] at index 6: tau 0.67, rise 0.15 >= 10% of 1.08; NaN is left out
    assert fired["t"] == [6, 7, 9]
    for seed in range(20):  # noisy per-batch losses that fall, then plateau
        assert run({"t": {"metric": "loss", "kind": "trend"}}, {"loss": healthy_loss(seed)})["t"] == [], seed
    rising = [0.35 * 1.03 ** i for i in range(40)]
    assert run({"t": {"metric": "loss", "kind": "trend"}}, {"loss": rising})["t"] == [19]  # once the window is full
    down = run({"t": {"metric": "acc", "kind": "trend", "direction": "down", "checks": 3, "min_rel_change": 0.0,
                      "min_change": 0.05}},
               {"acc": [0.9, 0.88, 0.87, 0.8, 0.7]})
    assert down["t"] == [3]  # [0.88, 0.87, 0.80]: a fall of 0.08 >= 0.05; then the warn cooldown holds


# ------------------------------------------------------------------------------------------ common
def test_warmup_in_steps_and_epochs() -> None:
    always = {"metric": "m", "kind": "threshold", "above": 0, "action": "stop"}
    assert run({"r": dict(always, warmup=3)}, {"m": [1] * 6})["r"] == [3, 4, 5]
    assert run({"r": dict(always, warmup_epochs=1)}, {"m": [1] * 4}, epochs=[0, 0, 1, 1])["r"] == [2, 3]


def test_cooldown_defaults_to_alert_cooldown_for_records_and_zero_for_control_flow() -> None:
    rs = RuleSet({"w": {"metric": "m", "kind": "threshold", "above": 0},
                  "s": {"metric": "m", "kind": "threshold", "above": 0, "action": "stop"},
                  "c": {"metric": "m", "kind": "threshold", "above": 0, "action": "warn", "cooldown": 4}},
                 default_cooldown=100)
    assert (rs.by_name["w"].cooldown, rs.by_name["s"].cooldown) == (100, 0)
    fired = run(rs, {"m": [1] * 10})
    assert fired["w"] == [0] and fired["s"] == list(range(10)) and fired["c"] == [0, 4, 8]


def test_consecutive_requires_a_run_of_checks() -> None:
    fired = run({"r": {"metric": "m", "kind": "threshold", "above": 1, "consecutive": 3, "action": "stop"}},
                {"m": [2, 2, 0, 2, 2, 2, 2]})
    assert fired["r"] == [5, 6]
    rs = RuleSet({"r": {"metric": "m", "kind": "threshold", "above": 1, "consecutive": 3}})
    messages = []
    for i, value in enumerate([2, 2, 0, 2, 2, 2]):  # the streak that fires starts at step 3
        due = rs.due("step")
        messages += [f.message for f in rs.evaluate("step", due, {"m": MetricStats.of(value)},
                                                    {r.name: True for r in due}, step=i, epoch=0)]
    assert len(messages) == 1 and messages[0].endswith("(held at 3 checks in a row, since step 3)")
    restored = RuleSet({"r": {"metric": "m", "kind": "threshold", "above": 1, "consecutive": 3}})
    restored.load_state_dict(rs.state_dict())  # the start of a streak survives a resume
    assert restored.by_name["r"].since == 3


def test_requires_gates_a_rule_on_another_rules_state() -> None:
    # AUTOTRAINER-style gate: a gradient alarm counts only while the loss is not improving.
    rules = {"stuck": {"metric": "loss", "kind": "plateau", "patience": 2, "silent": True},
             "grad_big": {"metric": "grad", "kind": "threshold", "above": 5, "requires": "stuck", "action": "stop"}}
    fired = run(rules, {"loss": [3, 2, 1, 1, 1, 0.5, 0.5], "grad": [9, 9, 9, 9, 9, 9, 9]})
    assert fired["grad_big"] == [4]  # loss stuck at indices 3-4 (wait 2 at index 4); improves at 5
    assert fired["stuck"] == []  # silent: a condition only


def test_freshness_a_value_counts_once() -> None:
    rs = RuleSet({"p": {"metric": "m", "kind": "plateau", "patience": 2, "action": "stop"}})
    rule = rs.by_name["p"]
    stats = {"m": MetricStats.of(1.0)}
    rs.evaluate("validation", [rule], stats, {"p": True}, 0, 0)
    rs.evaluate("step", [rule], stats, {"p": False}, 1, 0)  # the same tensor: not read again
    rs.evaluate("epoch", [rule], stats, {"p": True}, 2, 0)  # a fresh copy of the same value elsewhere: skipped
    assert rule.wait == 0
    rs.evaluate("validation", [rule], stats, {"p": True}, 3, 0)  # a new value equal to the last, same point
    assert rule.wait == 1


def test_missing_or_absent_metric_is_skipped_without_error() -> None:
    rs = RuleSet({"r": {"metric": "m", "kind": "threshold", "above": 0}})
    assert rs.evaluate("step", rs.rules, {}, {"r": True}, 0, 0) == []
    assert rs.evaluate("step", rs.rules, {"m": MetricStats(False, NAN, NAN, NAN)}, {"r": True}, 0, 0) == []
    assert not rs.by_name["r"].seen


def test_ddp_reductions_pick_the_worst_rank_or_the_mean() -> None:
    # rank values 1.0 and 9.0: max 9, min 1, mean 5
    stats = {"m": MetricStats(True, 9.0, 1.0, 5.0)}
    rs = RuleSet({"above": {"metric": "m", "kind": "threshold", "above": 8, "action": "stop"},
                  "below": {"metric": "m", "kind": "threshold", "below": 2, "action": "stop"},
                  "mean": {"metric": "m", "kind": "threshold", "above": 8, "reduce": "mean", "action": "stop"}})
    fired = [f.rule.name for f in rs.evaluate("step", rs.rules, stats, {r.name: True for r in rs.rules}, 0, 0)]
    assert fired == ["above", "below"]
    nan_somewhere = {"m": MetricStats(True, INF, 1.0, NAN, nonfinite=2)}
    rs = RuleSet({"nf": {"metric": "m", "kind": "nonfinite"}})
    (f,) = rs.evaluate("step", rs.rules, nan_somewhere, {"nf": True}, 0, 0)
    assert math.isnan(f.finding.value) and "NaN" in f.message


# --------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("spec, words", [
    ({"metric": "m", "kind": "threshhold", "above": 1}, ["'r'", "kind", "'threshold'"]),
    ({"metric": "m", "kind": "threshold", "abov": 1}, ["'r'", "unknown key 'abov'", "'above'"]),
    ({"kind": "nonfinite"}, ["'r'", "'metric'", "required"]),
    ({"metric": "m", "kind": "threshold"}, ["'r'", "'above'", "required"]),
    ({"metric": "m", "kind": "threshold", "above": 1, "below": 2}, ["'below'", "every value"]),
    ({"metric": "m", "kind": "threshold", "above": "10"}, ["'above'", "number", "'10'"]),
    ({"metric": "m", "kind": "plateau", "patience": 0}, ["'patience'", ">= 1"]),
    ({"metric": "m", "kind": "plateau", "patience": 2.5}, ["'patience'", "integer"]),
    ({"metric": "m", "kind": "spike", "window": 10, "min_history": 20}, ["'min_history'", "'window'"]),
    ({"metric": "m", "kind": "spike", "method": "iqr"}, ["'method'", "mad, std"]),
    ({"metric": "m", "kind": "trend", "min_tau": 1.5}, ["'min_tau'", "<= 1"]),
    ({"metric": "m", "kind": "gap", "above": 1}, ["'reference'", "required"]),
    ({"metric": "m", "kind": "nonfinite", "action": "explode"}, ["'r'", "unknown action 'explode'", "rollback"]),
    ({"metric": "m", "kind": "nonfinite", "severity": "fatal"}, ["'r'", "severity", "critical"]),
    ({"metric": "m", "kind": "nonfinite", "check_on": ["batch"]}, ["'check_on'", "'batch'", "every_step"]),
    ({"metric": "m", "kind": "nonfinite", "check_on": ["step", "every_step"]}, ["'check_on'", "drop 'step'"]),
    ({"metric": "m", "kind": "nonfinite", "action": "skip_step", "check_on": ["step"]},
     ["'check_on'", "[every_step]", "before the optimizer step"]),
    ({"metric": "m", "kind": "nonfinite", "silent": True, "action": "stop"}, ["'action'", "silent"]),
    ({"metric": "m", "kind": "nonfinite", "warmup": "???"}, ["'warmup'", "missing"]),
    ("m", ["'r'", "mapping"]),
])
def test_bad_settings_name_the_rule_and_the_key(spec: Any, words: List[str]) -> None:
    with pytest.raises(ValueError) as err:
        RuleSet({"r": spec})
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_requires_errors_unknown_self_and_cycles() -> None:
    base = {"metric": "m", "kind": "nonfinite"}
    with pytest.raises(ValueError, match="unknown rule 'stuk'.*did you mean 'stuck'"):
        RuleSet({"stuck": base, "r": dict(base, requires="stuk")})
    with pytest.raises(ValueError, match="names the rule itself"):
        RuleSet({"r": dict(base, requires="r")})
    with pytest.raises(ValueError, match="cycle: a -> b -> a|cycle: b -> a -> b"):
        RuleSet({"a": dict(base, requires="b"), "b": dict(base, requires=["a"])})


def test_skip_step_defaults_to_every_step_and_rollback_to_error_severity() -> None:
    rs = RuleSet({"s": {"metric": "m", "kind": "spike", "action": "skip_step"},
                  "r": {"metric": "m", "kind": "nonfinite", "action": "rollback"},
                  "t": {"metric": "m", "kind": "trend"}})
    assert rs.by_name["s"].check_on == ["every_step"]
    assert rs.by_name["r"].severity == "error"
    assert rs.by_name["t"].check_on == ["step", "validation", "epoch"] and rs.by_name["t"].action == "warn"


def test_omegaconf_containers_are_accepted() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"stuck": {"metric": "val/loss", "kind": "plateau", "patience": 3,
                                      "check_on": ["validation"]},
                            "big": {"metric": "monitor.grad/_total/norm", "kind": "threshold", "above": 50.0,
                                    "requires": ["stuck"]}})
    rs = RuleSet(cfg)
    assert rs.by_name["stuck"].check_on == ["validation"] and rs.by_name["big"].requires == ["stuck"]


# -------------------------------------------------------------------------------------------- state
def test_state_round_trips_through_weights_only_load() -> None:
    rules = {"t": {"metric": "m", "kind": "threshold", "above": 5, "consecutive": 2},
             "n": {"metric": "m", "kind": "nonfinite"},
             "p": {"metric": "m", "kind": "plateau", "patience": 50},
             "s": {"metric": "m", "kind": "spike", "min_history": 3},
             "g": {"metric": "m", "kind": "gap", "reference": "r", "above": 100},
             "tr": {"metric": "m", "kind": "trend", "checks": 50}}
    a = RuleSet(rules)
    run(a, {"m": [3.0, 2.0, 6.0, 2.5, 7.0, 1.0], "r": [0.0] * 6})
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = RuleSet(rules)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    # both continue identically
    assert run(a, {"m": [9.0, 9.0, 1.0], "r": [0.0] * 3}) == run(b, {"m": [9.0, 9.0, 1.0], "r": [0.0] * 3})


def test_state_of_renamed_or_rekinded_rules_is_not_loaded_and_says_so() -> None:
    a = RuleSet({"p": {"metric": "m", "kind": "plateau"}})
    b = RuleSet({"p": {"metric": "m", "kind": "trend"}})
    notes: List[str] = []
    b.load_state_dict(a.state_dict(), warn=notes.append)
    assert notes and "'p'" in notes[0]


def test_forget_after_drops_what_was_learned_after_a_restored_step() -> None:
    rs = RuleSet({"s": {"metric": "m", "kind": "spike", "min_history": 3},
                  "t": {"metric": "m", "kind": "trend", "checks": 10}})
    run(rs, {"m": [1.0, 1.1, 1.2, 1.3, 1.4]})
    rs.forget_after(3)
    assert rs.by_name["s"].steps == [0, 1, 2]
    assert rs.by_name["t"].steps == [0, 1, 2]


def test_enum_values_from_structured_configs_are_accepted() -> None:
    from enum import Enum

    class Kind(Enum):
        plateau = "plateau"

    class Point(Enum):
        validation = "validation"

    rs = RuleSet({"p": {"metric": "val/loss", "kind": Kind.plateau, "check_on": [Point.validation]}})
    assert rs.by_name["p"].kind == "plateau" and rs.by_name["p"].check_on == ["validation"]


def test_only_rules_reading_a_mean_need_the_sum_reduction() -> None:
    rs = RuleSet({"t": {"metric": "m", "kind": "threshold", "above": 1},
                  "n": {"metric": "m", "kind": "nonfinite"},
                  "s": {"metric": "m", "kind": "spike"},
                  "sb": {"metric": "m", "kind": "spike", "direction": "both"},
                  "p": {"metric": "m", "kind": "plateau"},
                  "pm": {"metric": "m", "kind": "plateau", "reduce": "max"}})
    assert [r.name for r in rs.rules if r.needs_mean()] == ["sb", "p"]
