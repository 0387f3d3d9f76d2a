"""The actions an alert can take, in one open registry.

Built in (one table, :data:`BUILTIN_ACTIONS`): ``log`` (record only), ``warn`` (also a Python warning on the
console), ``stop`` (graceful ``trainer.should_stop``), ``raise`` (:class:`~lightwatch.core.alerts.MonitorError`),
``checkpoint`` (a save by every checkpoint callback of the Trainer, see :mod:`lightwatch.core.checkpoint.action`),
``skip_step`` and ``rollback`` (see :mod:`lightwatch.core.recovery`). :func:`register_action` adds your own, and
every callback accepts them without any other change.

Decisions that change control flow must be the same on every rank. lightwatch callbacks decide on values
that were already reduced across ranks (so every rank computes the same decision), or agree on a flag with
:func:`lightwatch.core.reduce.agree_max` before acting.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from lightwatch.core.action_context import ActionContext, ActionHandler, MonitorWarning
from lightwatch.core.alerts import MonitorError
from lightwatch.core.checkpoint.action import request_checkpoint
from lightwatch.core.recovery import request_rollback, skip_step
from lightwatch.core.runtime import is_global_zero

__all__ = [
    "ActionContext",
    "ActionSpec",
    "BUILTIN_ACTIONS",
    "MonitorWarning",
    "register_action",
    "check_action",
    "run_action",
    "registered_actions",
]


@dataclass(frozen=True)
class ActionSpec:
    """One registered action.

    Args:
        name: the action's name in configs (``action: warn``).
        handler: called with an :class:`ActionContext` each time an alert with this action fires.
        changes_control_flow: whether it changes what the Trainer does (must then be decided alike on every rank).
        description: one line for error messages and docs.

    Example:
        >>> registered_actions()["stop"].changes_control_flow
        True
    """

    name: str
    handler: ActionHandler
    changes_control_flow: bool
    description: str = ""


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


#: The actions every lightwatch rule and check accepts out of the box.
BUILTIN_ACTIONS: Tuple[ActionSpec, ...] = (
    ActionSpec("log", _log, False, "write the alert record only"),
    ActionSpec("warn", _warn, False, "also issue a Python warning"),
    ActionSpec("stop", _stop, True, "stop training gracefully"),
    ActionSpec("raise", _raise, True, "raise lightwatch.MonitorError"),
    ActionSpec("checkpoint", request_checkpoint, True,
               "save a checkpoint with MetricCheckpoint at the next safe point"),
    ActionSpec("skip_step", skip_step, True,
               "drop this step's optimizer update (every .grad set to None before the step)"),
    ActionSpec("rollback", request_rollback, True,
               "restore model, optimizer, scheduler and RNG from the last healthy state and continue"),
)

_ACTIONS: Dict[str, ActionSpec] = {spec.name: spec for spec in BUILTIN_ACTIONS}


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
    """Every action by name: the built-in ones and those added with :func:`register_action`.

    Example:
        >>> {"log", "warn", "stop", "raise", "checkpoint", "skip_step", "rollback"} <= set(registered_actions())
        True
    """
    return dict(_ACTIONS)


def check_action(action: str, where: str) -> str:
    """Return ``action`` if registered, else raise a ``ValueError`` naming ``where`` and the known actions.

    Example:
        >>> check_action("warn", "my_rule")
        'warn'
    """
    if action not in _ACTIONS:
        known = ", ".join(sorted(_ACTIONS))
        raise ValueError(f"{where}: unknown action {action!r}; use one of {known}.")
    return action


def run_action(action: str, ctx: ActionContext) -> None:
    """Carry out ``action`` for ``ctx.alert``."""
    check_action(action, f"{ctx.alert.source} rule {ctx.alert.rule!r}")
    _ACTIONS[action].handler(ctx)


def lookup(action: str) -> Optional[ActionSpec]:
    """The registered :class:`ActionSpec` of ``action``, or ``None``."""
    return _ACTIONS.get(action)
