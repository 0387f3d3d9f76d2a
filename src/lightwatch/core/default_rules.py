"""The rules ``MetricMonitor()`` runs with no arguments, on its built-in training-loss values."""
from __future__ import annotations

from typing import Any, Dict

__all__ = ["default_rules"]

_SHIFT_Z = 4.0
_REGRESS_RATIO = 1.5
_REGRESS_ADVICE = ("A learning rate too high for this stage of training is the usual cause (the loss oscillates "
                   "back up): lower it or decay it sooner. If the loss is meant to rise (a loss weight annealed up, "
                   "a curriculum that gets harder), drop this rule: rules={'loss_regressed': None}.")


def default_rules(prefix: str = "monitor") -> Dict[str, Dict[str, Any]]:
    """The rules ``MetricMonitor()`` runs with no arguments; both watch the built-in training loss.

    - ``loss_nonfinite``: the loss is NaN or infinite -> ``error``, ``stop`` (the weights are lost from there
      on; as Lightning's ``EarlyStopping(check_finite=True)``);
    - ``loss_spike``: the loss stays at a robust z-score >= 8 against the last 50 checks for two checks in a
      row -> ``warning``, ``warn``. (A single check at z >= 8 happened about once in 14,000 checks of healthy
      small-batch runs, where a few misclassified samples make the batch loss heavy-tailed; two in a row did
      not happen.)
    - ``loss_shift``: the median per-step loss since the last check is 4 robust standard deviations above the
      median of the 50 steps before -> ``warning``, ``warn``: a spike that set training back, even when it
      fell between two checks. It keeps every step's loss in a small ring on the device (one scalar copy a
      step, no host read).
    - ``loss_regressed``: the median loss of the last 50 steps is at least 1.5x the lowest such median since
      the learning rate last rose, at two checks in a row, while at least 10% of the first step's loss ->
      ``warning``, ``warn``: the loss went back up and stayed there (a learning rate too high for this stage
      of training, an instability), which no single spike shows.

    They are checked every ``every_n_steps`` steps. ``MetricMonitor`` also runs the built-in checks
    ``loss_negative`` and ``loss_not_learning`` (see :class:`MetricMonitor`); they are not rules of this list.
    """
    loss = f"{prefix}.step/loss"
    return {
        "loss_nonfinite": {
            "metric": loss, "kind": "nonfinite", "severity": "error", "action": "stop", "check_on": ["step"],
            "message": "Training was stopped. To recover by itself instead, use action 'rollback' (with a "
                       "MetricCheckpoint, or MetricMonitor's in-memory snapshots)."},
        "loss_spike": {"metric": loss, "kind": "spike", "severity": "warning", "action": "warn", "check_on": ["step"],
                       "consecutive": 2},
        "loss_shift": {"metric": f"{prefix}.step/loss_shift_z", "kind": "threshold", "above": _SHIFT_Z,
                       "severity": "warning", "action": "warn", "check_on": ["step"]},
        "loss_regressed": {"metric": f"{prefix}.step/loss_regress", "kind": "threshold", "above": _REGRESS_RATIO,
                           "severity": "warning", "action": "warn", "check_on": ["step"], "consecutive": 2,
                           "message": _REGRESS_ADVICE},
    }
