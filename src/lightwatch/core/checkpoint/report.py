"""What a checkpoint callback reports: its warnings as alert records, its saves as TensorBoard scalars and text,
and what it does when training raised.

Everything here goes through a running Trainer duck-typed (as :mod:`lightwatch.core.checkpoint.trainer`), so
the callback bound to ``pytorch_lightning`` or to ``lightning.pytorch`` uses it unchanged.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, Iterable, Optional, Tuple

from lightwatch.core.alerts import Alert, AlertCooldown, MonitorError, alert_log
from lightwatch.core.checkpoint.errors import CheckpointWarning
from lightwatch.core.checkpoint.selection import CheckpointSelection, Entry, Item
from lightwatch.core.checkpoint.trainer import fitting
from lightwatch.core.runtime import distributed_ready, is_global_zero, logging_step
from lightwatch.core.writer import MonitorWriter

__all__ = ["SOURCE", "exception_item", "exception_save", "publish_save_failure", "publish_warning", "write_save"]

logger = logging.getLogger("lightwatch")

#: The ``source`` of the alerts a checkpoint callback publishes; its healthy marks leave these out.
SOURCE = "MetricCheckpoint"


def publish_warning(trainer: Any, writer: MonitorWriter, cooldown: AlertCooldown, name: str, subject: Optional[str],
                    rule: str, message: str, value: Optional[float] = None,
                    python_warning: bool = False) -> Optional[Alert]:
    """Publish a warning alert of ``rule`` from the checkpoint callback ``name``, rate-limited per rule.

    Args:
        trainer: the running Trainer (its alert log receives the alert; rank 0 writes it).
        writer: the callback's writer (the alert's TensorBoard text).
        cooldown: the callback's rate limit; a suppressed alert is counted in the next one's message.
        name: the callback's name (the cooldown's subject).
        subject: the alert's subject (the monitored metric).
        rule: the alert's rule, e.g. ``checkpoint_dropped``.
        message: what happened, where, and what to do.
        value: the value the warning is about, if any.
        python_warning: also issue a :class:`~lightwatch.core.checkpoint.errors.CheckpointWarning` (rank 0),
            for problems a user must see even without reading alerts.

    Returns:
        The published alert, or ``None`` when the cooldown kept it back.

    Example:
        >>> class Trainer:
        ...     is_global_zero, global_step, current_epoch = False, 7, 1  # rank 1: nothing is written
        >>> trainer, cooldown = Trainer(), AlertCooldown(100)
        >>> alert = publish_warning(trainer, MonitorWriter("monitor"), cooldown, "ckpt", "val/loss",
        ...                         "checkpoint_monitor_missing", "no val/loss at step 7")
        >>> alert.severity, alert.step, alert.source
        ('warning', 7, 'MetricCheckpoint')
        >>> publish_warning(trainer, MonitorWriter("monitor"), cooldown, "ckpt", "val/loss",
        ...                 "checkpoint_monitor_missing", "again") is None
        True
    """
    step = logging_step(trainer)
    if python_warning and is_global_zero(trainer):
        # attributed to the caller of the callback method that warns, as when the callback warned itself
        warnings.warn(message, CheckpointWarning, stacklevel=4)
    allowed, suppressed = cooldown.allow(rule, name, step)
    if not allowed:
        return None
    if suppressed:
        message += f" ({suppressed} similar alert(s) suppressed.)"
    alert = Alert(source=SOURCE, rule=rule, severity="warning", message=message, subject=subject,
                  value=None if value is None else float(value), action="log", step=step,
                  epoch=int(getattr(trainer, "current_epoch", 0)))
    alert_log(trainer).publish(alert, writer)
    return alert


def publish_save_failure(trainer: Any, writer: MonitorWriter, subject: Optional[str],
                         error: BaseException) -> Alert:
    """Publish the ``checkpoint_save_failed`` alert (critical, action ``raise``) for a failed save, before the
    :class:`~lightwatch.core.checkpoint.errors.CheckpointSaveError` ends training: every rank counts it, rank 0
    writes it (to ``alerts.jsonl`` unless that disk is the full one; Python logging always).

    Example:
        >>> class Trainer:
        ...     is_global_zero, global_step, current_epoch = False, 9, 0
        >>> publish_save_failure(Trainer(), MonitorWriter("monitor"), None, OSError(28, "full")).severity
        'critical'
    """
    alert = Alert(source=SOURCE, rule="checkpoint_save_failed", severity="critical", message=str(error),
                  subject=subject, value=None if getattr(error, "errno", None) is None else float(error.errno),
                  action="raise", step=logging_step(trainer), epoch=int(getattr(trainer, "current_epoch", 0)))
    try:
        alert_log(trainer).publish(alert, writer)
    except Exception as exc:  # the save error itself must reach the user whatever happens here
        logger.error("MetricCheckpoint: the alert for a failed save could not be published: %s", exc)
    return alert


def write_save(trainer: Any, writer: MonitorWriter, name: str, selection: CheckpointSelection,
               new: Iterable[Entry]) -> Dict[str, float]:
    """Report a committed save: the scalars ``<prefix>.ckpt/<name>/saves`` and ``.../best`` (every rank, as
    callback metrics; rank 0 to the loggers) and the text ``<prefix>.ckpt/<name>`` naming the new files.

    Returns the scalars written.

    Example:
        >>> class Trainer:
        ...     is_global_zero, global_step, callback_metrics, loggers = True, 4, {}, []
        >>> selection = CheckpointSelection()
        >>> write_save(Trainer(), MonitorWriter("monitor"), "ckpt", selection, [])
        {'monitor.ckpt/ckpt/saves': 0.0}
    """
    step = logging_step(trainer)
    values: Dict[str, float] = {writer.tag("ckpt", name, "saves"): float(selection.saves)}
    best = selection.best_entry()
    if best is not None and best.get("score") is not None:
        values[writer.tag("ckpt", name, "best")] = float(best["score"])
    writer.write_scalars(trainer, values, step)
    if is_global_zero(trainer):
        writer.write_text(trainer, writer.tag("ckpt", name), selection.describe(new), step)
    return values


def exception_save(trainer: Any, exception: BaseException) -> Tuple[bool, str]:
    """Whether the state may be saved because training raised ``exception``, and if not, what to warn (or ``""``).

    Nothing is saved outside ``fit``, during the sanity check or before the first optimizer step (with nothing
    to warn). Under distributed training only a :class:`~lightwatch.core.alerts.MonitorError` is saved: it is
    raised on every rank at the same point, while another exception may have hit one rank only, and saving (a
    collective) would then hang; the warning says so.

    Example:
        >>> class State:
        ...     fn = "fit"
        >>> class Trainer:
        ...     state, sanity_checking, global_step = State(), False, 12
        >>> exception_save(Trainer(), ValueError("loss is nan"))
        (True, '')
    """
    if trainer.sanity_checking or not fitting(trainer) or trainer.global_step == 0:
        return False, ""
    if distributed_ready() and not isinstance(exception, MonitorError):
        return False, (f"MetricCheckpoint: no exception checkpoint for {type(exception).__name__}: under "
                       "distributed training the other ranks may not be at the same point, and a save would hang.")
    return True, ""


def exception_item(exception: BaseException) -> Item:
    """The save request for an exception checkpoint: its reason and the error it records (500 characters at most).

    Example:
        >>> exception_item(ValueError("loss is nan"))
        ('exception', {'error': 'ValueError: loss is nan'})
    """
    return "exception", {"error": f"{type(exception).__name__}: {exception}"[:500]}
