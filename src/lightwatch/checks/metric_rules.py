"""Checks on the metrics :class:`~lightwatch.callbacks.metric_monitor.MetricMonitor` reads, beside its rules:
a rule that watches a metric nobody logs (``metric_missing``), and a loss below zero (``loss_negative``)."""
from __future__ import annotations

import difflib
import math
from typing import Dict, Iterable, List, Optional, Sequence, Set

from lightwatch.checks.finding import Finding

__all__ = ["NEGATIVE", "missing_metric_findings", "negative_loss_finding"]

NEGATIVE = "loss_negative"


def negative_loss_finding(metric: str, minimum: float, nonfinite: bool, step: int,
                          since: int) -> Optional[Finding]:
    """``loss_negative``: a finite training loss below 0 (the minimum over ranks: the same on every rank).

    Healthy runs of non-negative losses (cross-entropy, NLL of log-probabilities) never go below 0; the usual
    cause is NLL or cross-entropy applied to raw logits. NaN/Inf belongs to ``loss_nonfinite``.

    Args:
        metric: the loss's name.
        minimum: its smallest value over ranks at this check.
        nonfinite: some rank's value was NaN or infinite.
        step: the step of the check.
        since: the first step it was seen negative.

    Example:
        >>> negative_loss_finding("monitor.step/loss", -0.3, False, step=20, since=10).rule
        'loss_negative'
        >>> negative_loss_finding("monitor.step/loss", 0.3, False, step=20, since=10) is None
        True
    """
    if nonfinite or not math.isfinite(minimum) or minimum >= 0:
        return None
    return Finding(
        NEGATIVE, "warning", metric, minimum, threshold=0.0, step=step, action="warn", message=(
            f"the training loss {metric} = {minimum:.4g} at step {step} is negative (first seen "
            f"negative at step {since}): a loss that should be non-negative (cross-entropy, NLL "
            f"of log-probabilities) is negative: likely NLL/cross-entropy applied to raw logits instead of "
            f"log_softmax. Use F.cross_entropy on the logits, or F.nll_loss on log_softmax outputs. If this loss "
            f"can legitimately be negative, drop the check with rules={{'{NEGATIVE}': None}}."))


def missing_metric_findings(watched: Dict[str, List[str]], check_points: Dict[str, Iterable[str]],
                            existing: Sequence[str], step: int) -> List[Finding]:
    """``metric_missing`` (warning) for each metric a rule watches that has not been logged, with a close match.

    Args:
        watched: metric -> the names of the rules that watch it (only metrics not seen yet).
        check_points: rule name -> where it is checked (``step``, ``validation``, ...).
        existing: the metrics that do exist, sorted.
        step: the current step.

    Example:
        >>> [f.message.split("Did you mean ")[1] for f in missing_metric_findings(
        ...     {"val/los": ["val_plateau"]}, {"val_plateau": ["validation"]}, ["train/loss", "val/loss"], 99)]
        ["'val/loss'?"]
    """
    shown = ", ".join(existing[:30]) + (" ..." if len(existing) > 30 else "") if existing else "none yet"
    found = []
    for metric, rule_names in watched.items():
        close = difflib.get_close_matches(metric, list(existing), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        points: Set[str] = {c for name in rule_names for c in check_points[name]}
        found.append(Finding(
            "metric_missing", "warning", metric, None, action="warn",
            message=(f"MetricMonitor rule(s) {', '.join(map(repr, rule_names))} watch {metric!r}, which has not "
                     f"been logged by step {step} (checked on {', '.join(sorted(points))}). Metrics "
                     f"that exist: {shown}.{hint}")))
    return found
