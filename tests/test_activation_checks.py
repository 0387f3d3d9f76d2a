"""The activation diagnoses alone (:mod:`lightwatch.checks.activation`): fed numbers, no Trainer."""
from __future__ import annotations

import math
from typing import List, Optional

import pytest

from lightwatch.checks.activation import (ActivationAlert, DeadUnitsCheck, GrowthCheck, LayerReading, NllOnLogitsCheck,
                                         NonFiniteOutputCheck, OutputReading, ProbabilityOutputCheck, SaturationCheck)


def dead(name: str, position: int, frac: float, per_unit: float = 64.0) -> LayerReading:
    return LayerReading(name, position, mean=0.1, std=0.2, activation=True, dead_frac=frac, samples_per_unit=per_unit)


def saturated(name: str, position: int, share: float) -> LayerReading:
    return LayerReading(name, position, mean=0.0, std=0.9, activation=True, saturation=share)


def judge_steps(check: DeadUnitsCheck, layers: List[LayerReading], steps: List[int],
                interval: int = 5) -> List[Optional[ActivationAlert]]:
    return [check.judge(layers, step, interval) for step in steps]


# ------------------------------------------------------------------------------------------- act_dead
def test_dead_units_fire_on_the_third_check_in_a_row_and_name_the_first_layer_in_forward_order() -> None:
    check = DeadUnitsCheck()
    layers = [dead("net.3", 3, 0.9), dead("net.1", 1, 0.7)]
    first, second, third, fourth = judge_steps(check, layers, [4, 9, 14, 19])
    assert first is None and second is None and fourth is None  # reported once, when the streak completes
    assert third is not None
    assert (third.rule, third.severity, third.action) == ("act_dead", "warning", "log")
    assert (third.subject, third.value, third.threshold, third.step) == ("net.1", 0.7, 0.6, 14)
    assert third.message == (
        "module 'net.1': 70% of its units output zero for every sample, for 3 checks in a row (since step 4) "
        "(2 module(s) affected; the first in forward order is named). Likely: a learning rate too high, a large "
        "negative bias, or poor init; try a lower learning rate, LeakyReLU/GELU, or normalisation.")


def test_a_dead_streak_restarts_when_the_layer_recovers() -> None:
    check = DeadUnitsCheck()
    alerts = [check.judge([dead("net.1", 1, frac)], step, 5) for step, frac in
              zip([4, 9, 14, 19, 24], [0.9, 0.9, 0.1, 0.9, 0.9])]
    assert alerts == [None] * 5 and check.streaks == {"net.1": 2}


def test_at_initialisation_one_reading_is_the_whole_streak() -> None:
    check = DeadUnitsCheck()
    alert = check.judge([dead("net.1", 1, 0.9)], 0, 5)
    assert alert is not None and "at initialisation (step 0, before any update)" in alert.message
    assert check.judge([dead("net.1", 1, 0.9)], 5, 5) is None  # not reported again at the next checks


def test_too_few_samples_per_unit_is_no_evidence_of_dead_units() -> None:
    check = DeadUnitsCheck()
    thin = [dead("net.1", 1, 1.0, per_unit=4.0)]
    assert check.reading(thin, 0) is None and check.judge(thin, 0, 5) is None
    mixed = thin + [dead("net.3", 3, 0.2, per_unit=8.0)]
    assert check.reading(mixed, 0) == 0.2  # the thin layer is left out of the reading too


def test_layers_without_a_dead_share_are_not_judged() -> None:
    check = DeadUnitsCheck()
    layers = [LayerReading("net.0", 0, mean=0.0, std=1.0)]
    assert check.reading(layers, 3) is None and check.judge(layers, 3, 5) is None and check.streaks == {}


def test_the_streak_state_round_trips_and_says_whether_anything_was_judged() -> None:
    check = DeadUnitsCheck()
    assert not check.judged
    judge_steps(check, [dead("net.1", 1, 0.9)], [4, 9])
    assert check.judged and check.state_dict() == {"net.1": 2}
    restored = DeadUnitsCheck()
    restored.load_state_dict(check.state_dict())
    alert = restored.judge([dead("net.1", 1, 0.9)], 14, 5)
    assert alert is not None and alert.step == 14
    restored.load_state_dict(None)
    assert not restored.judged and restored.streaks == {}


def test_a_persistent_check_needs_at_least_one_check() -> None:
    with pytest.raises(ValueError, match=r"DeadUnitsCheck: checks must be at least 1, got 0"):
        DeadUnitsCheck(checks=0)


# ------------------------------------------------------------------------------------ act_saturated
def test_saturation_fires_on_the_second_check_and_reads_the_largest_share() -> None:
    check = SaturationCheck()
    layers = [saturated("net.1", 1, 0.8), saturated("net.3", 3, 0.3)]
    assert check.reading(layers, 10) == 0.8
    assert check.judge(layers, 10, 10) is None
    alert = check.judge(layers, 20, 10)
    assert alert is not None and (alert.rule, alert.subject, alert.threshold) == ("act_saturated", "net.1", 0.5)
    assert alert.message.startswith("module 'net.1': 80% of its outputs sit at the bounds of the activation, "
                                    "for 2 checks in a row (since step 10)")


def test_the_since_step_is_never_before_zero() -> None:
    check = SaturationCheck(checks=3)
    alerts = [check.judge([saturated("net.1", 1, 0.9)], step, 50) for step in (1, 2, 3)]
    assert alerts[-1] is not None and "(since step 0)" in alerts[-1].message


# ------------------------------------------------------------------------------------ act_exploding
def activations(stds: List[float], **kwargs: bool) -> List[LayerReading]:
    return [LayerReading(f"net.{2 * i + 1}", 2 * i + 1, mean=0.0, std=s, activation=True, **kwargs)
            for i, s in enumerate(stds)]


def test_growth_through_depth_at_initialisation() -> None:
    check = GrowthCheck()
    layers = activations([1.0, 4.0, 16.0])
    assert check.reading(layers, 0) == 16.0
    alert = check.judge(layers, 0, 5)
    assert alert is not None
    assert (alert.rule, alert.subject, alert.value, alert.threshold, alert.step) == ("act_exploding", "net.5", 16.0,
                                                                                     10.0, 0)
    assert "the RMS of 'net.5' is 16x that of 'net.1' (3 activation layers, x4 per layer" in alert.message


def test_growth_is_judged_at_step_zero_only() -> None:
    check = GrowthCheck()
    layers = activations([1.0, 4.0, 16.0])
    assert check.reading(layers, 5) is None and check.judge(layers, 5, 5) is None


def test_growth_needs_three_finite_activation_layers_and_a_first_rms_above_zero() -> None:
    check = GrowthCheck()
    assert check.reading(activations([1.0, 100.0]), 0) is None  # two say more about the input scale
    assert check.reading(activations([0.0, 1.0, 100.0]), 0) is None
    others = [LayerReading("net.0", 0, mean=0.0, std=100.0)]  # not an activation layer
    broken = [LayerReading("net.9", 9, mean=math.nan, std=math.nan, nonfinite=True, activation=True)]
    assert check.reading(activations([1.0, 2.0, 4.0]) + others + broken, 0) == 4.0
    assert check.judge(activations([1.0, 2.0, 4.0]), 0, 5) is None  # under the bound


def test_growth_orders_layers_by_their_forward_position() -> None:
    layers = list(reversed(activations([1.0, 4.0, 16.0])))
    assert GrowthCheck().growth(layers) == (16.0, "net.1", "net.5", 3)


# ------------------------------------------------------------------------------------ act_nonfinite
def test_nonfinite_names_the_first_layer_in_forward_order_with_its_severity_and_action() -> None:
    layers = [LayerReading(f"net.{i}", 10 - i, mean=math.nan, std=math.nan, nonfinite=True) for i in range(7)]
    layers.append(LayerReading("net.ok", 0, mean=0.0, std=1.0))
    alert = NonFiniteOutputCheck(severity="critical", action="stop").judge(layers, 8, 1)
    assert alert is not None
    assert (alert.rule, alert.subject, alert.value, alert.threshold, alert.step) == ("act_nonfinite", "net.6", 7.0,
                                                                                     None, 8)
    assert (alert.severity, alert.action) == ("critical", "stop")
    assert "(7 module(s) affected: net.6, net.5, net.4, net.3, net.2 ...)" in alert.message
    assert NonFiniteOutputCheck().judge(layers[-1:], 8, 1) is None


# ----------------------------------------------------------------------- the model's output, first step
def test_nll_on_logits_needs_both_shares_above_the_bound() -> None:
    check = NllOnLogitsCheck()
    alert = check.judge(OutputReading("net.4", 0.0, 1.0, 0.95))
    assert alert is not None
    assert (alert.rule, alert.severity, alert.action, alert.subject, alert.value, alert.threshold, alert.step) == (
        "nll_on_logits", "warning", "warn", "net.4", 1.0, 0.9, None)
    assert "one non-zero entry in 100% of the rows" in alert.message and "(95% of the rows" in alert.message
    assert check.judge(OutputReading("net.4", 0.0, 1.0, 0.0)) is None  # log-probabilities: NLL is right
    assert check.judge(OutputReading("net.4", 0.0, 0.5, 1.0)) is None  # a dense gradient: not NLL


def test_probability_outputs() -> None:
    check = ProbabilityOutputCheck()
    alert = check.judge(OutputReading("net.5", 1.0, 0.0, 1.0))
    assert alert is not None and (alert.rule, alert.subject, alert.value, alert.threshold, alert.action) == (
        "output_probabilities", "net.5", 1.0, 0.5, "warn")
    assert "is a probability distribution in 100% of its rows" in alert.message
    assert check.judge(OutputReading("net.5", 0.5, 0.0, 1.0)) is None
    assert check.judge(OutputReading("net.5", math.nan, 0.0, 1.0)) is None


def test_an_alert_is_the_keyword_arguments_of_raise_alert() -> None:
    alert = ProbabilityOutputCheck().judge(OutputReading("net.5", 1.0, 0.0, 1.0))
    assert alert is not None
    assert set(alert.as_kwargs()) == {"rule", "severity", "action", "subject", "value", "threshold", "message",
                                      "step"}


# ------------------------------------------------------------------------------ the callback's state
def test_the_monitor_saves_and_restores_the_streaks_in_the_same_layout() -> None:
    from lightwatch import ActivationStatsMonitor

    monitor = ActivationStatsMonitor()
    assert monitor.state_dict()["streaks"] == {}  # nothing judged yet
    monitor.load_state_dict({"streaks": {"act_dead": {"net.1": 2}, "act_saturated": {}}})
    assert monitor.state_dict()["streaks"] == {"act_dead": {"net.1": 2}, "act_saturated": {}}
    assert monitor.nonfinite_action == "warn" and monitor.nonfinite_severity == "error"
    with pytest.raises(ValueError, match="nonfinite_severity"):
        monitor.nonfinite_severity = "fatal"
