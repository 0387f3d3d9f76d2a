"""The actions an alert can take, in one open registry.

Built in: ``log`` (record only), ``warn`` (also a Python warning on the console), ``stop`` (graceful
``trainer.should_stop``), ``raise`` (:class:`~lightwatch.core.alerts.MonitorError`). Other modules register
more (``checkpoint`` by ``MetricCheckpoint``, ``skip_step`` and ``rollback`` by the rules module) with
:func:`register_action`, and every callback accepts them without any other change.

Decisions that change control flow must be the same on every rank. lightwatch callbacks decide on values
that were already reduced across ranks (so every rank computes the same decision), or agree on a flag with
:func:`lightwatch.core.reduce.agree_max` before acting.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from lightwatch.core.alerts import Alert, MonitorError
from lightwatch.core.runtime import is_global_zero

__all__ = [
    "ActionContext",
    "ActionSpec",
    "MonitorWarning",
    "register_action",
    "check_action",
    "run_action",
    "registered_actions",
]


class MonitorWarning(UserWarning):
    """Category of the Python warnings issued by the ``warn`` action."""


@dataclass
class ActionContext:
    """What an action handler gets: the Trainer, the module, the alert and the callback that raised it."""

    trainer: Any
    pl_module: Any
    alert: Alert
    source: Any = None


ActionHandler = Callable[[ActionContext], None]


@dataclass(frozen=True)
class ActionSpec:
    name: str
    handler: ActionHandler
    changes_control_flow: bool
    description: str = ""


_ACTIONS: Dict[str, ActionSpec] = {}


def register_action(
    name: str,
    handler: ActionHandler,
    *,
    changes_control_flow: bool,
    description: str = "",
    replace: bool = False,
) -> None:
    """Make ``name`` usable as ``action=`` in every lightwatch rule and check.

    Args:
        name: the action's name in configs.
        handler: called with an :class:`ActionContext` each time an alert with this action fires.
        changes_control_flow: whether the action changes what the Trainer does (stop, skip, restore):
            such actions must be decided identically on every rank.
        description: one line for error messages and docs.
        replace: allow overriding an existing registration.

    Example:
        >>> calls = []
        >>> register_action("count", lambda ctx: calls.append(ctx.alert.rule), changes_control_flow=False,
        ...                 replace=True)
        >>> "count" in registered_actions()
        True
    """
    if name in _ACTIONS and not replace and _ACTIONS[name].handler is not handler:
        raise ValueError(f"lightwatch action {name!r} is already registered; pass replace=True to override it.")
    _ACTIONS[name] = ActionSpec(name, handler, changes_control_flow, description)


def registered_actions() -> Dict[str, ActionSpec]:
    return dict(_ACTIONS)


def check_action(action: str, where: str) -> str:
    """Return ``action`` if registered, else raise a ``ValueError`` naming ``where`` and the known actions."""
    if action not in _ACTIONS:
        # Actions registered by optional modules only exist once those are imported.
        import lightwatch.callbacks  # noqa: F401  (registers checkpoint, skip_step, rollback)
    if action not in _ACTIONS:
        known = ", ".join(sorted(_ACTIONS))
        raise ValueError(f"{where}: unknown action {action!r}; use one of {known}.")
    return action


def run_action(action: str, ctx: ActionContext) -> None:
    """Carry out ``action`` for ``ctx.alert``."""
    check_action(action, f"{ctx.alert.source} rule {ctx.alert.rule!r}")
    _ACTIONS[action].handler(ctx)


def _log(ctx: ActionContext) -> None:
    """Record only (the record is written before any action runs)."""


def _warn(ctx: ActionContext) -> None:
    if is_global_zero(ctx.trainer):
        warnings.warn(f"lightwatch [{ctx.alert.rule}] step {ctx.alert.step}: {ctx.alert.message}", MonitorWarning,
                      stacklevel=2)


def _stop(ctx: ActionContext) -> None:
    ctx.trainer.should_stop = True


def _raise(ctx: ActionContext) -> None:
    raise MonitorError(ctx.alert)


register_action("log", _log, changes_control_flow=False, description="write the alert record only")
register_action("warn", _warn, changes_control_flow=False, description="also issue a Python warning")
register_action("stop", _stop, changes_control_flow=True, description="stop training gracefully")
register_action("raise", _raise, changes_control_flow=True, description="raise lightwatch.MonitorError")


def lookup(action: str) -> Optional[ActionSpec]:
    return _ACTIONS.get(action)
