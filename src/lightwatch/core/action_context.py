"""What an action handler receives, and the warning category of lightwatch's console warnings.

Kept apart from the registry (:mod:`lightwatch.core.actions`) so that the modules defining built-in actions
(:mod:`lightwatch.core.recovery`, :mod:`lightwatch.core.checkpoint.action`) need nothing from the registry
that lists them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lightwatch.core.alerts import Alert

__all__ = ["ActionContext", "ActionHandler", "MonitorWarning"]


class MonitorWarning(UserWarning):
    """Category of the Python warnings issued by the ``warn`` action (and by ``skip_step`` when it comes late).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("loss spike", MonitorWarning)
        >>> caught[0].category.__name__
        'MonitorWarning'
    """


@dataclass
class ActionContext:
    """What an action handler gets: the Trainer, the module, the alert and the callback that raised it.

    Args:
        trainer: the running Trainer.
        pl_module: the LightningModule being trained.
        alert: the alert whose ``action`` is being carried out.
        source: the callback that raised the alert (``None`` when unknown).

    Example:
        >>> ctx = ActionContext(trainer=None, pl_module=None, alert=Alert("Mine", "r", "warning", "m"))
        >>> ctx.alert.rule
        'r'
    """

    trainer: Any
    pl_module: Any
    alert: Alert
    source: Any = None


ActionHandler = Callable[[ActionContext], None]
