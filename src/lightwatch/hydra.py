"""Hydra support: typed schemas for the shipped ``monitor`` policies and :func:`instantiate_monitors`.

lightwatch ships its Hydra configs in the package (``lightwatch/conf``) and a search-path plugin that adds
``pkg://lightwatch.conf`` to every Hydra app, so an app only needs ``- monitor: default`` in its defaults
list::

    python train.py monitor=strict monitor.every_n_steps=10 monitor/grad_stats=full '~monitor/act_stats'

Every node of a policy has a dataclass schema (in :mod:`lightwatch.hydra_schemas`, importable from here too),
registered in the ConfigStore group ``lightwatch_schema`` (a group of its own, so the ``monitor`` groups list
only real options). A wrong type or an unknown key therefore fails when the config is composed, with Hydra's
message naming the key; values left ``???`` are found by :func:`instantiate_monitors` before any training
starts.

This module imports no torch: the search-path plugin registers the schemas at the start of every Hydra
app, and the callbacks are imported only when :func:`instantiate_monitors` builds them.
"""
from __future__ import annotations

import difflib

from dataclasses import fields
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightwatch import hydra_schemas
from lightwatch.hydra_schemas import *  # noqa: F401,F403  (the schemas, importable from here as before)
from lightwatch.hydra_schemas import (ActStatsConf, ActStatsSelectConf, CheckpointBestConf, CheckpointConf,
                                      DataQualityConf, GradStatsConf, MonitorConf, RulesConf)
from lightwatch.hydra_schemas import SlicesConf
from lightwatch.hydra_schemas import PrometheusConf, PrometheusPushConf, SystemConf, WatchdogConf

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["COMPONENTS", "SCHEMA_GROUP", "MonitorConfigError", "instantiate_monitors", "register_schemas",
           *hydra_schemas.__all__]

SCHEMA_GROUP = "lightwatch_schema"
"""ConfigStore group holding the schemas; a YAML config extends one with ``- /lightwatch_schema/<name>@_here_``."""


class MonitorConfigError(ValueError):
    """A ``monitor`` config that cannot be turned into callbacks: the message names the keys and the fix.

    Example:
        >>> issubclass(MonitorConfigError, ValueError)
        True
    """


# MetricMonitor comes after the statistics monitors: it reads their values in the same step.
COMPONENTS: Tuple[Tuple[str, type], ...] = (
    ("grad_stats", GradStatsConf),
    ("act_stats", ActStatsConf),
    ("data_quality", DataQualityConf),
    ("system", SystemConf),
    ("watchdog", WatchdogConf),
    ("rules", RulesConf),
    ("checkpoint", CheckpointConf),
    ("slices", SlicesConf),
    ("prometheus", PrometheusConf),  # last: it exports the values the others computed in the same step
)
"""``(key under monitor, schema)`` of every component, in the order the callbacks are returned.

Adding a component is: a schema here, a field on :class:`MonitorConf`, and YAML variants under
``lightwatch/conf/monitor/<key>/``.
"""

_POLICY_KEYS = frozenset(f.name for f in fields(MonitorConf)) - {key for key, _ in COMPONENTS}


# Schemas of variants that make a value required: a `???` in YAML cannot replace a schema's default.
_VARIANT_SCHEMAS: Tuple[Tuple[str, type], ...] = (
    ("act_stats_select", ActStatsSelectConf),
    ("checkpoint_best", CheckpointBestConf),
    ("prometheus_push", PrometheusPushConf),
)


def register_schemas() -> None:
    """Store the schemas in the ConfigStore group ``lightwatch_schema`` (idempotent, no torch import).

    lightwatch's search-path plugin calls it before Hydra composes anything: Hydra works on a copy of the
    ConfigStore taken when composition starts, so schemas registered later would be missing from that copy.
    """
    cs = ConfigStore.instance()
    cs.store(group=SCHEMA_GROUP, name="monitor", node=MonitorConf, provider="lightwatch")
    for key, schema in COMPONENTS + _VARIANT_SCHEMAS:
        cs.store(group=SCHEMA_GROUP, name=key, node=schema, provider="lightwatch")


register_schemas()


# ----------------------------------------------------------------------------------------- instantiation
def _monitor_node(cfg: Any) -> DictConfig:
    """The policy node as a ``DictConfig``; also accepts a plain dict or the app's root config."""
    if isinstance(cfg, Mapping) and not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    if not isinstance(cfg, DictConfig):
        raise TypeError(
            f"instantiate_monitors expects the `monitor` config node (cfg.monitor, a DictConfig or dict), got "
            f"{type(cfg).__name__}. Add `- monitor: default` to your defaults list and pass cfg.monitor."
        )
    keys = set(cfg.keys())
    if "monitor" in keys and not keys & (_POLICY_KEYS | {key for key, _ in COMPONENTS}):
        node = cfg._get_node("monitor")
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            return node  # the root config was passed
    return cfg


def _where(cfg: DictConfig, key: str) -> str:
    full = cfg._get_full_key(key)
    return full or key


def _resolution_error(err: OmegaConfBaseException) -> MonitorConfigError:
    where = getattr(err, "full_key", None) or "the monitor config"
    message = str(err).split("\n")[0]
    return MonitorConfigError(
        f"lightwatch: `{where}` could not be resolved: {message}. Components interpolate the policy's values "
        f"(`${{..every_n_steps}}`), so select them inside a policy (`monitor=default monitor/<component>=...`) "
        f"and check the interpolations you added."
    )


def _check_missing(cfg: DictConfig) -> None:
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as err:  # missing_keys reads every value, interpolations included
        raise _resolution_error(err) from err
    if not missing:
        return
    base = cfg._get_full_key(None) or ""
    groups = []
    for key in missing:
        relative = key[len(base) + 1:] if base and key.startswith(base + ".") else key
        component = relative.split(".")[0].split("[")[0]
        group = f"{base.replace('.', '/')}/{component}" if base else component
        if component not in _POLICY_KEYS and group not in groups:
            groups.append(group)
    off = f", or switch the component off with {', '.join(f'`~{g}`' for g in groups)}" if groups else ""
    raise MonitorConfigError(
        f"lightwatch: {len(missing)} required monitor value(s) not set (still '???'): {', '.join(missing)}. "
        f"Set each on the command line (for example `{missing[0]}=...`) or in your config{off}. "
        f"Nothing was trained."
    )


def _component_container(cfg: DictConfig, key: str) -> Optional[Dict[str, Any]]:
    """The resolved, plain-Python form of one component, or ``None`` when it is switched off."""
    where = _where(cfg, key)
    node = cfg._get_node(key)
    if node is None or node._is_none():
        return None
    if not isinstance(node, DictConfig):
        raise MonitorConfigError(
            f"lightwatch: `{where}` must be a component config (a mapping with `_target_`) or null, got "
            f"{node._value()!r}. Select a variant (e.g. `{where.replace('.', '/')}=basic`) or switch it off "
            f"with `{where}=null`."
        )
    try:
        container = OmegaConf.to_container(node, resolve=True, enum_to_str=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise _resolution_error(err) from err
    assert isinstance(container, dict)
    if "_target_" not in container:
        raise MonitorConfigError(
            f"lightwatch: `{where}` has no `_target_` (keys: {sorted(container)}). It was probably replaced "
            f"instead of edited: change single values (`{where}.every_n_steps=10`) or select a variant "
            f"(`{where.replace('.', '/')}=basic`)."
        )
    return container


def _drop_unset_rule_keys(container: Dict[str, Any]) -> Dict[str, Any]:
    # The schema gives every rule every kind's keys; a rule accepts only its own kind's, and null means unset.
    rules = container.get("rules")
    if isinstance(rules, dict):
        container["rules"] = {name: None if spec is None else {k: v for k, v in spec.items() if v is not None}
                              for name, spec in rules.items()}
    return container


def _drop_unset_check_keys(container: Dict[str, Any]) -> Dict[str, Any]:
    # Likewise for data checks: null settings are unset; a check set to null is switched off. `only_checks`
    # lists the checks to run by name: every other one is switched off.
    checks = container.get("checks")
    only = container.pop("only_checks", None)
    if isinstance(checks, dict):
        if only is not None:
            unknown = [name for name in only if name not in checks]
            if unknown:
                close = {n: difflib.get_close_matches(n, list(checks), n=1) for n in unknown}
                hints = "; ".join(f"{n!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for n, c in close.items())
                raise MonitorConfigError(
                    f"lightwatch: `monitor.data_quality.only_checks` names unknown data check(s) {hints}; the "
                    f"checks are: {', '.join(checks)}.")
            checks = {name: spec if name in only else None for name, spec in checks.items()}
        container["checks"] = {name: False if spec is None else {k: v for k, v in spec.items() if v is not None}
                               for name, spec in checks.items()}
    return container


_PREPARE = {"rules": _drop_unset_rule_keys, "data_quality": _drop_unset_check_keys}


def _lightning_package(node: DictConfig) -> str:
    """``pytorch_lightning`` or ``lightning.pytorch``, from the policy's ``lightning`` key."""
    import sys

    from lightwatch.core.lightning import default_package

    choice = node.get("lightning", "auto")
    choice = str(getattr(choice, "value", choice))
    if choice == "lightning":
        return "lightning.pytorch"
    if choice == "pytorch_lightning":
        return "pytorch_lightning"
    if choice != "auto":
        raise MonitorConfigError(f"lightwatch: `{_where(node, 'lightning')}` must be auto, pytorch_lightning or "
                                 f"lightning, got {choice!r}.")
    imported = [p for p in ("pytorch_lightning", "lightning.pytorch") if sys.modules.get(p) is not None]
    return imported[0] if len(imported) == 1 else default_package()


def instantiate_monitors(cfg: Any) -> List["pl.Callback"]:
    """Build the callbacks of a composed ``monitor`` policy, after checking that nothing is left ``???``.

    What it does, in order, all before any training starts:

    1. ``OmegaConf.missing_keys``: every value still ``???`` is named in one :class:`MonitorConfigError`;
    2. ``enabled: false`` returns ``[]``;
    3. each component that is not ``null`` is resolved (interpolations, Enum names to strings) and
       instantiated with ``hydra.utils.instantiate``; a constructor that rejects a value (an unknown
       action, a bad regex) raises :class:`MonitorConfigError` naming the component's key.

    Args:
        cfg: the composed policy node, ``cfg.monitor`` (a plain ``dict`` works too; the app's root config,
            holding a ``monitor`` key, is accepted as well).

    Returns:
        The callbacks, in component order (``grad_stats``, ``act_stats``, ``data_quality``, ``system``,
        ``watchdog``, ``rules``, ``checkpoint``, ...), ready for ``Trainer(callbacks=[*your_callbacks, *monitors])``.

    Example:
        >>> from hydra import compose, initialize_config_module
        >>> with initialize_config_module("lightwatch.conf", version_base="1.3"):
        ...     cfg = compose(overrides=["+monitor=default", "monitor.every_n_steps=10"])
        >>> [type(cb).__name__ for cb in instantiate_monitors(cfg.monitor)]  # doctest: +NORMALIZE_WHITESPACE
        ['GradientStatsMonitor', 'ActivationStatsMonitor', 'DataQualityMonitor', 'SystemMonitor', 'HangWatchdog',
         'MetricMonitor']
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    node = _monitor_node(cfg)
    _check_missing(node)
    if "enabled" in node and not node.enabled:
        return []
    package = _lightning_package(node)
    callbacks: List[Any] = []
    known = [key for key, _ in COMPONENTS]
    extra = [key for key in node.keys() if key not in known and key not in _POLICY_KEYS]
    for key in known + extra:
        if key not in node:
            continue
        container = _component_container(node, str(key))
        if container is None:
            continue
        if key in _PREPARE:
            container = _PREPARE[key](container)
        target = str(container.get("_target_", ""))
        if package == "lightning.pytorch" and target.startswith("lightwatch.callbacks."):
            container["_target_"] = "lightwatch.lightning." + target.rsplit(".", 1)[1]
        try:
            callbacks.append(instantiate(container))
        except InstantiationException as err:
            cause = err.__cause__ if err.__cause__ is not None else err
            raise MonitorConfigError(
                f"lightwatch: `{_where(node, str(key))}` ({container['_target_']}) rejected its config: {cause}"
            ) from err
    return callbacks
