"""What a diagnosis reports: the fields of one alert record, before a callback raises it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

__all__ = ["Finding"]


@dataclass(frozen=True)
class Finding:
    """One alert a check wants raised (see the alert schema); the callback adds the run's context.

    Attributes:
        rule: the diagnosis' name (``update_ratio_high``, ...).
        severity: ``info``, ``warning``, ``error`` or ``critical``.
        subject: the parameter, module or field the alert is about.
        value: the value judged (None where there is none).
        message: what was seen, where, and what to do.
        threshold: the bound it crossed, where there is one.
        step: the step it refers to (``None``: the current step).
        action: the action to carry out (``log``, ``warn``, ...).

    Example:
        >>> finding = Finding("update_ratio_high", "warning", "net.0.weight", 0.4, "...", threshold=0.3, step=0)
        >>> sorted(finding.as_kwargs())
        ['action', 'message', 'rule', 'severity', 'step', 'subject', 'threshold', 'value']
    """

    rule: str
    severity: str
    subject: str
    value: Optional[float]
    message: str
    threshold: Optional[float] = None
    step: Optional[int] = None
    action: str = "log"

    def as_kwargs(self) -> Dict[str, Any]:
        """The fields as keyword arguments of ``MonitorCallback.raise_alert``."""
        return dataclasses.asdict(self)
