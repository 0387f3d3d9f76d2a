"""Alerts: the record every lightwatch check writes when something goes wrong.

An :class:`Alert` is written by global rank 0 to ``alerts.jsonl`` in the run directory (one JSON object a
line, flushed at once), to TensorBoard as text under ``<prefix>.alert/<rule>`` (and a scalar
``<prefix>.alert/<rule>/value``), and to the Python logger ``lightwatch``. Listeners (for example
``MetricCheckpoint``'s healthy marks) are told on every rank, so state derived from alerts agrees.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from lightwatch.core.runtime import is_global_zero, run_dir

__all__ = [
    "SEVERITIES",
    "Alert",
    "AlertLog",
    "AlertCooldown",
    "MonitorError",
    "alert_log",
    "check_severity",
    "severity_at_least",
]

logger = logging.getLogger("lightwatch")

SEVERITIES: Tuple[str, ...] = ("info", "warning", "error", "critical")
_LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
ALERTS_FILENAME = "alerts.jsonl"


def check_severity(severity: str, where: str) -> str:
    """Return ``severity`` if it is known, else raise a ``ValueError`` that says where and what is allowed."""
    if severity not in SEVERITIES:
        raise ValueError(f"{where}: unknown severity {severity!r}; use one of {', '.join(SEVERITIES)}.")
    return severity


def severity_at_least(severity: str, minimum: str) -> bool:
    return SEVERITIES.index(severity) >= SEVERITIES.index(minimum)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _json_number(value: Optional[float]) -> Optional[float]:
    # JSON has no NaN/Inf: a non-finite value is written as null and spelled out in the message.
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class Alert:
    """One thing that went wrong, with where, when, how bad, and what was done about it.

    Args:
        source: class name of the callback that raised it.
        rule: rule or check name (a TensorBoard-safe identifier, e.g. ``grad_nonfinite``).
        severity: ``info``, ``warning``, ``error`` or ``critical``.
        message: one or two sentences: what, where, since when, and a likely cause or fix.
        subject: layer, parameter, feature or metric the alert is about, or ``None``.
        value: the offending value, if there is one.
        threshold: the bound it crossed, if there is one.
        action: the action taken (``log``, ``warn``, ``stop``, ``raise``, ...).
        step: the logging step (the one ``self.log`` curves use).
        epoch: the current epoch.

    Example:
        >>> a = Alert("GradientStatsMonitor", "grad_nonfinite", "error", "NaN gradient", subject="fc.weight")
        >>> sorted(a.to_record())[:4]
        ['action', 'epoch', 'message', 'rule']
    """

    source: str
    rule: str
    severity: str
    message: str
    subject: Optional[str] = None
    value: Optional[float] = None
    threshold: Optional[float] = None
    action: str = "log"
    step: int = 0
    epoch: int = 0
    time: str = field(default_factory=_utc_now)

    def to_record(self) -> Dict[str, Any]:
        return {
            "time": self.time,
            "step": int(self.step),
            "epoch": int(self.epoch),
            "source": self.source,
            "rule": self.rule,
            "severity": self.severity,
            "subject": self.subject,
            "value": _json_number(self.value),
            "threshold": _json_number(self.threshold),
            "action": self.action,
            "message": self.message,
        }


class MonitorError(RuntimeError):
    """Raised by the ``raise`` action; names the rule, subject, value and step.

    Example:
        >>> err = MonitorError(Alert("MetricMonitor", "loss_nan", "critical", "loss is NaN", subject="train/loss",
        ...                          value=float("nan"), step=12))
        >>> "loss_nan" in str(err) and "train/loss" in str(err)
        True
    """

    def __init__(self, alert: Alert) -> None:
        self.alert = alert
        super().__init__(
            f"lightwatch {alert.source} rule {alert.rule!r} (severity {alert.severity}) at step {alert.step}, "
            f"epoch {alert.epoch}: subject={alert.subject!r} value={alert.value!r} threshold={alert.threshold!r}. "
            f"{alert.message}"
        )


AlertListener = Callable[[Alert], None]


class AlertLog:
    """The alert record of one Trainer: file, TensorBoard text, logging, listeners and counts.

    There is one per Trainer, shared by every lightwatch callback (get it with :func:`alert_log`).

    Args:
        trainer: the Trainer whose run directory receives ``alerts.jsonl`` (held by a weak reference).

    Example:
        >>> import json, os, tempfile
        >>> class Trainer:  # what the log reads of a Trainer
        ...     is_global_zero, loggers, default_root_dir = True, [], tempfile.mkdtemp()
        >>> trainer = Trainer()
        >>> log = alert_log(trainer)
        >>> seen = []
        >>> log.subscribe(seen.append)
        >>> log.publish(Alert("MetricMonitor", "loss_nonfinite", "error", "loss is NaN", step=7))
        >>> log.counts["error"], [a.rule for a in seen]
        (1, ['loss_nonfinite'])
        >>> with open(log.path) as fh:
        ...     json.loads(fh.readline())["step"]
        7
        >>> os.path.basename(log.path)
        'alerts.jsonl'
    """

    def __init__(self, trainer: Any) -> None:
        self._trainer_ref = weakref.ref(trainer)
        self._listeners: List[AlertListener] = []
        self.counts: Dict[str, int] = {s: 0 for s in SEVERITIES}
        self.history: List[Alert] = []
        self.max_history = 1000
        self._path: Optional[str] = None
        self._write_failed = False

    @property
    def path(self) -> Optional[str]:
        """``alerts.jsonl`` of this run (rank 0 only), or ``None`` before the first alert."""
        return self._path

    def subscribe(self, listener: AlertListener) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)

    def unsubscribe(self, listener: AlertListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def publish(self, alert: Alert, writer: Any = None, record: bool = True) -> None:
        """Count ``alert`` and tell the listeners (every rank); write it (rank 0) unless ``record`` is False.

        ``record=False`` is for alerts a cooldown keeps out of the files: they still count, so state derived
        from alerts (a checkpoint's healthy mark) never misses a fault that keeps firing.
        """
        self.counts[alert.severity] = self.counts.get(alert.severity, 0) + 1
        self.history.append(alert)
        del self.history[: -self.max_history]
        trainer = self._trainer_ref()
        if record and trainer is not None and is_global_zero(trainer):
            self._write_file(trainer, alert)
            logger.log(_LOG_LEVELS[alert.severity], "[%s] %s step %d: %s", alert.severity, alert.rule, alert.step,
                       alert.message)
            if writer is not None:
                writer.write_alert(trainer, alert)
        for listener in list(self._listeners):
            listener(alert)

    def _write_file(self, trainer: Any, alert: Alert) -> None:
        line = json.dumps(alert.to_record(), allow_nan=False) + "\n"
        try:
            if self._path is None:
                directory = run_dir(trainer)
                os.makedirs(directory, exist_ok=True)
                self._path = os.path.join(directory, ALERTS_FILENAME)
                drop_partial_line(self._path)
            # One write call per line, flushed at once: a crash never leaves half a record behind another.
            with open(self._path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
        except OSError as exc:
            # A full disk or a lost directory must not end training from inside lightwatch: the alert still
            # reaches Python logging and the listeners (a failed checkpoint save raises on its own).
            if not self._write_failed:
                logger.error("lightwatch: could not write %s (%s); alerts go to the log only until it can be "
                             "written again.", self._path or ALERTS_FILENAME, exc)
            self._write_failed = True
            return
        self._write_failed = False


def drop_partial_line(path: str) -> int:
    """Cut a half-written last line (no newline: a process killed inside a write) off the end of ``path`` so the
    next record starts on a line of its own; returns the bytes removed (0 when the file ends cleanly or is absent).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "alerts.jsonl")
        >>> with open(path, "w") as fh:
        ...     _ = fh.write('{"rule": "a"}\\n{"rule": "b", "mess')
        >>> drop_partial_line(path), open(path).read()
        (19, '{"rule": "a"}\\n')
    """
    try:
        with open(path, "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            fh.seek(max(0, size - 65536))
            tail = fh.read()
            if tail.endswith(b"\n"):
                return 0
            cut = tail.rfind(b"\n")
            keep = (size - len(tail) + cut + 1) if cut >= 0 else 0
            fh.truncate(keep)
    except FileNotFoundError:
        return 0
    logger.warning("lightwatch: %s ended in a half-written line (%d bytes, from a process that was killed while "
                   "writing it); the line was removed.", path, size - keep)
    return size - keep


_LOGS: "weakref.WeakKeyDictionary[Any, AlertLog]" = weakref.WeakKeyDictionary()


def alert_log(trainer: Any) -> AlertLog:
    """The :class:`AlertLog` shared by all lightwatch callbacks of ``trainer``."""
    log = _LOGS.get(trainer)
    if log is None:
        log = _LOGS[trainer] = AlertLog(trainer)
    return log


class AlertCooldown:
    """Rate limit for alert records: one record per (rule, subject) every ``steps`` steps.

    Suppressed alerts are counted and the count is reported in the next record, so one fault cannot write
    thousands of lines but nothing goes unmentioned. Actions are not rate-limited; only records are.

    Example:
        >>> c = AlertCooldown(steps=10)
        >>> c.allow("r", None, step=0), c.allow("r", None, step=5), c.allow("r", None, step=10)
        ((True, 0), (False, 0), (True, 1))
    """

    def __init__(self, steps: int = 100) -> None:
        if steps < 0:
            raise ValueError(f"AlertCooldown: steps must be >= 0, got {steps}.")
        self.steps = int(steps)
        self._last: Dict[str, int] = {}
        self._suppressed: Dict[str, int] = {}

    @staticmethod
    def _key(rule: str, subject: Optional[str]) -> str:
        return f"{rule}|{subject or ''}"

    def allow(self, rule: str, subject: Optional[str], step: int) -> Tuple[bool, int]:
        """Whether a record may be written now, and how many were suppressed since the last one."""
        key = self._key(rule, subject)
        last = self._last.get(key)
        if last is not None and 0 <= step - last < self.steps:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False, 0
        self._last[key] = step
        return True, self._suppressed.pop(key, 0)

    def state_dict(self) -> Dict[str, Any]:
        return {"last": dict(self._last), "suppressed": dict(self._suppressed)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._last = {str(k): int(v) for k, v in dict(state.get("last", {})).items()}
        self._suppressed = {str(k): int(v) for k, v in dict(state.get("suppressed", {})).items()}
