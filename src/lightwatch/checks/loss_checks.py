"""The built-in checks on the training loss's course, together: ``loss_not_learning`` / ``loss_slow``
(:mod:`lightwatch.checks.learning`) and ``loss_at_label_entropy`` (:mod:`lightwatch.checks.label_entropy`).

Both read the same blocks of per-step losses; an earlier alert that explains a loss that does not go down
(frozen layers, missing gradients, a softmax before the loss, ...) gives the verdict its name.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from lightwatch.checks.finding import Finding
from lightwatch.checks.label_entropy import CAUSES as LABEL_CAUSES
from lightwatch.checks.label_entropy import LabelEntropyCheck
from lightwatch.checks.learning import CAUSES as LEARNING_CAUSES
from lightwatch.checks.learning import LearningCheck
from lightwatch.core.alerts import severity_at_least

__all__ = ["LossChecks", "earlier_cause"]

Verdict = Tuple[str, Optional[Dict[str, float]], Optional[Finding]]  # diag name, readings, finding


def earlier_cause(history: Iterable[Any], causes: Sequence[str], severity: Optional[str] = None) -> Optional[Any]:
    """The most specific alert of ``history`` among ``causes`` (of ``severity`` or worse, if given), if any.

    Example:
        >>> from types import SimpleNamespace as A
        >>> found = earlier_cause([A(rule="grad_missing", severity="info"), A(rule="frozen_at_init",
        ...                        severity="warning")], ("frozen_at_init", "grad_missing"))
        >>> found.rule
        'frozen_at_init'
    """
    earlier: Dict[str, Any] = {}
    for alert in history:
        if severity is not None and not severity_at_least(alert.severity, severity):
            continue
        if alert.rule in causes and alert.rule not in earlier:
            earlier[alert.rule] = alert
    return next((earlier[r] for r in causes if r in earlier), None)


class LossChecks:
    """``loss_not_learning`` and ``loss_at_label_entropy`` over one run's loss blocks.

    Args:
        metric: the loss's name (the subject of the alerts).
        learning: run ``loss_not_learning`` / ``loss_slow``.
        labels: run ``loss_at_label_entropy``.

    Example:
        >>> checks = LossChecks("monitor.step/loss", learning=True, labels=False)
        >>> found = []
        >>> for step in range(4, 120, 5):  # a loss flat at 2.3 with batch noise 0.1
        ...     checks.remember(step, 5, 2.3, 2.3 ** 2 + 0.01, lrs=[0.1])
        ...     found += [(step, f.rule) for _, _, f in checks.judge(step, history=[]) if f is not None]
        >>> found  # flat at two evaluations in a row (steps 54 and 109)
        [(109, 'loss_not_learning')]
    """

    def __init__(self, metric: str, learning: bool = True, labels: bool = True) -> None:
        self.learning_on, self.labels_on = learning, labels
        self.learning = LearningCheck(metric)
        self.labels = LabelEntropyCheck(metric)
        self.labels.checked = not labels

    @property
    def open(self) -> bool:
        """Whether a check still needs the loss blocks."""
        return (self.learning_on and not self.learning.checked) or (self.labels_on and not self.labels.checked)

    def stop(self) -> None:
        """Close both for good (several optimizers stepped by hand: their losses are adversaries or separate
        objectives, not one quantity that training must drive down)."""
        self.learning.checked = self.labels.checked = True

    def remember(self, step: int, count: int, mean: float, square: float, lrs: List[float]) -> None:
        """Keep one check's block: the ``count`` steps up to ``step`` (one ring entry per step), their mean loss
        and mean square (NaN when absent)."""
        self.learning.remember(step - count + 1, step, count if math.isfinite(mean) else 0, mean, square, lrs)

    def judge(self, step: int, history: Sequence[Any]) -> List[Verdict]:
        """The verdicts due at this step check; ``history`` is the run's alerts so far (the earlier causes)."""
        verdicts: List[Verdict] = []
        if self.learning_on and not self.learning.checked:
            readings, finding = self.learning.judge(step, lambda: earlier_cause(history, LEARNING_CAUSES))
            verdicts.append(("loss_learning", readings, finding))
            if finding is not None and finding.severity == "warning":
                self.labels.checked = True  # the loss is already named as not learning: one warning is enough
        if self.labels.checked or step < self.labels.next_evaluation or self.learning.warming_up():
            return verdicts
        evidence, level = self.learning.evidence(step), self.learning.recent_level(step)
        if evidence is not None and level is not None:
            readings, finding = self.labels.judge(step, evidence[0], level[0], level[1], evidence[3],
                                                  lambda: earlier_cause(history, LABEL_CAUSES, "warning"))
            verdicts.append(("label_entropy", readings, finding))
        return verdicts

    def state_dict(self) -> Dict[str, Any]:
        """Both checks' states (the keys the callback's checkpoints have always used)."""
        return {**self.learning.state_dict(), **self.labels.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` kept."""
        self.learning.load_state_dict(state)
        self.labels.load_state_dict(state)
        self.labels.checked = self.labels.checked or not self.labels_on
