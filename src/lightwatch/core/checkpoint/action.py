"""The ``checkpoint`` action, and how lightwatch finds the checkpoint callbacks of a Trainer.

Any callback with ``request_save(reason, alert)`` and ``latest_healthy()`` (the :class:`CheckpointTarget`
protocol; ``MetricCheckpoint`` is one) is found in ``trainer.callbacks``: nothing here depends on the callback
classes.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any, List, Optional, Protocol, runtime_checkable

from lightwatch.core.action_context import ActionContext
from lightwatch.core.alerts import Alert
from lightwatch.core.checkpoint.errors import CheckpointWarning
from lightwatch.core.runtime import is_global_zero

__all__ = ["CheckpointTarget", "checkpoint_targets", "request_checkpoint"]

logger = logging.getLogger("lightwatch")

_WARNED_NO_CHECKPOINT: "weakref.WeakSet[Any]" = weakref.WeakSet()


@runtime_checkable
class CheckpointTarget(Protocol):
    """A callback that saves checkpoints on request and knows its newest healthy one (a rollback point).

    Example:
        >>> class Saver:
        ...     def request_save(self, reason="alert", alert=None): print("save:", reason)
        ...     def latest_healthy(self): return None
        >>> isinstance(Saver(), CheckpointTarget)
        True
    """

    def request_save(self, reason: str = "alert", alert: Optional[Alert] = None) -> None:
        """Save at the next safe point of the training loop."""

    def latest_healthy(self) -> Optional[str]:
        """Path of the newest healthy checkpoint, or ``None``."""


def checkpoint_targets(trainer: Any) -> List[CheckpointTarget]:
    """The callbacks of ``trainer`` that follow :class:`CheckpointTarget`, in ``trainer.callbacks`` order.

    Example:
        >>> class Trainer:
        ...     callbacks = [object()]
        >>> checkpoint_targets(Trainer())
        []
    """
    return [cb for cb in list(getattr(trainer, "callbacks", None) or []) if isinstance(cb, CheckpointTarget)]


def request_checkpoint(ctx: ActionContext) -> None:
    """The ``checkpoint`` action: ask every checkpoint callback of the Trainer to save at the next safe point.

    Without one, a warning (once per Trainer) says how to add a ``MetricCheckpoint``.
    """
    found = checkpoint_targets(ctx.trainer)
    for cb in found:
        cb.request_save("alert", ctx.alert)
    if not found and ctx.trainer not in _WARNED_NO_CHECKPOINT:
        _WARNED_NO_CHECKPOINT.add(ctx.trainer)
        message = (f"lightwatch: rule {ctx.alert.rule!r} asked for a checkpoint, but the Trainer has no "
                   "MetricCheckpoint callback; add lightwatch.callbacks.MetricCheckpoint(...) to "
                   "Trainer(callbacks=...). (Warned once.)")
        logger.warning(message)
        if is_global_zero(ctx.trainer):
            warnings.warn(message, CheckpointWarning, stacklevel=2)
