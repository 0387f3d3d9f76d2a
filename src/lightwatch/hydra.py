"""Hydra support: typed schemas for the shipped ``monitor`` policies and :func:`instantiate_monitors`.

lightwatch ships its Hydra configs in the package (``lightwatch/conf``) and a search-path plugin that adds
``pkg://lightwatch.conf`` to every Hydra app, so an app only needs ``- monitor: default`` in its defaults
list::

    python train.py monitor=strict monitor.every_n_steps=10 monitor/grad_stats=full '~monitor/act_stats'

Every node of a policy has a dataclass schema, registered in the ConfigStore group ``lightwatch_schema``
(a group of its own, so the ``monitor`` groups list only real options). A wrong type or an unknown key
therefore fails when the config is composed, with Hydra's message naming the key; values left ``???``
are found by :func:`instantiate_monitors` before any training starts.

This module imports no torch: the search-path plugin registers the schemas at the start of every Hydra
app, and the callbacks are imported only when :func:`instantiate_monitors` builds them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = [
    "COMPONENTS",
    "SCHEMA_GROUP",
    "ActStatsConf",
    "ActStatsSelectConf",
    "CheckPoint",
    "CheckpointBestConf",
    "CheckpointConf",
    "DataCheckConf",
    "DataChecksConf",
    "DataQualityConf",
    "Direction",
    "Export",
    "FieldSchemaConf",
    "GradStatsConf",
    "GroupBy",
    "Mode",
    "MonitorConf",
    "MonitorConfigError",
    "Reduce",
    "RuleConf",
    "RuleKind",
    "RulesConf",
    "Severity",
    "SpikeMethod",
    "ThresholdConf",
    "instantiate_monitors",
    "register_schemas",
]

SCHEMA_GROUP = "lightwatch_schema"
"""ConfigStore group holding the schemas; a YAML config extends one with ``- /lightwatch_schema/<name>@_here_``."""


class MonitorConfigError(ValueError):
    """A ``monitor`` config that cannot be turned into callbacks: the message names the keys and the fix."""


# Closed choices are Enums: OmegaConf rejects ``Literal`` annotations, and an Enum gives the message
# "Invalid value 'x', expected one of [...]" at compose time. Names equal values; callbacks get the name.
class Severity(Enum):
    """Severity of an alert (``lightwatch.core.alerts.SEVERITIES``)."""

    info = "info"
    warning = "warning"
    error = "error"
    critical = "critical"


class GroupBy(Enum):
    """How :class:`~lightwatch.callbacks.GradientStatsMonitor` groups its series."""

    parameter = "parameter"
    module = "module"


class Mode(Enum):
    """Whether lower (``min``) or higher (``max``) is better."""

    min = "min"
    max = "max"


class RuleKind(Enum):
    """Kinds of :class:`~lightwatch.callbacks.MetricMonitor` rules."""

    threshold = "threshold"
    nonfinite = "nonfinite"
    plateau = "plateau"
    spike = "spike"
    gap = "gap"
    trend = "trend"


class LightningPackage(Enum):
    """Which Lightning package the callbacks are bound to (see :mod:`lightwatch.core.lightning`)."""

    auto = "auto"
    pytorch_lightning = "pytorch_lightning"
    lightning = "lightning"


class CheckPoint(Enum):
    """When a rule is checked."""

    every_step = "every_step"
    step = "step"
    validation = "validation"
    epoch = "epoch"


class Reduce(Enum):
    """How a rule's value is reduced over ranks."""

    max = "max"
    min = "min"
    mean = "mean"


class SpikeMethod(Enum):
    """Robust (``mad``) or classical (``std``) z-score of a spike rule."""

    mad = "mad"
    std = "std"


class Direction(Enum):
    """Direction a spike (``up``, ``down``, ``both``) or a trend (``up``, ``down``) is looked for in."""

    up = "up"
    down = "down"
    both = "both"


class Export(Enum):
    """Format :class:`~lightwatch.callbacks.MetricCheckpoint` exports the best model to."""

    onnx = "onnx"
    torchscript = "torchscript"


# ------------------------------------------------------------------------------------- component schemas
# One dataclass per callback, mirroring its constructor (names and defaults; a test keeps them in step).
# Mappings of typed entries default to {} where the constructor has None: OmegaConf cannot merge a mapping
# into a null typed mapping, so `+monitor.rules.rules={name: {...}}` needs an empty one to merge into.
# ``_target_`` and ``_convert_`` are declared fields: a typed node rejects undeclared keys, and with
# ``_convert_: all`` lists and dicts reach the constructor as plain Python objects even when a user calls
# ``hydra.utils.instantiate`` on the node directly.


@dataclass
class GradStatsConf:
    """Schema of :class:`~lightwatch.callbacks.GradientStatsMonitor` (``monitor.grad_stats``)."""

    _target_: str = "lightwatch.callbacks.GradientStatsMonitor"
    _convert_: str = "all"
    every_n_steps: Optional[int] = None
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    module_types: Optional[List[str]] = None
    group_by: GroupBy = GroupBy.parameter
    top_k: Optional[int] = None
    histogram_every_n_steps: Optional[int] = None
    norm_every_step: Optional[bool] = None
    track_update_ratio: bool = True
    nonfinite_action: str = "warn"
    nonfinite_severity: Severity = Severity.error
    diagnose: bool = True
    prefix: str = "monitor"
    alert_cooldown_steps: int = 100
    check_first_step: bool = True
    skip_diagnoses: Optional[List[str]] = None


@dataclass
class ActStatsConf:
    """Schema of :class:`~lightwatch.callbacks.ActivationStatsMonitor` (``monitor.act_stats``)."""

    _target_: str = "lightwatch.callbacks.ActivationStatsMonitor"
    _convert_: str = "all"
    every_n_steps: Optional[int] = None
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    module_types: Optional[List[str]] = None
    top_k: Optional[int] = None
    sample_size: int = 65536
    histogram_every_n_steps: Optional[int] = None
    nonfinite_action: str = "warn"
    nonfinite_severity: Severity = Severity.error
    diagnose: bool = True
    prefix: str = "monitor"
    alert_cooldown_steps: int = 100
    check_first_step: bool = True
    skip_diagnoses: Optional[List[str]] = None


@dataclass
class ActStatsSelectConf(ActStatsConf):
    """:class:`ActStatsConf` with ``include`` required (the ``act_stats=select`` variant).

    A required value lives in the schema: a ``???`` in a YAML file that extends a schema whose default is
    ``null`` is dropped by the merge (a missing value never replaces a set one).
    """

    include: List[str] = MISSING


@dataclass
class RuleConf:
    """One :class:`~lightwatch.callbacks.MetricMonitor` rule; keys left ``null`` take the rule's defaults.

    The rule's name is its key in ``rules`` and the metric is a value, because metric names hold ``/``,
    which Hydra's override grammar does not accept in keys (``monitor.rules.rules.val_plateau.patience=3``).
    Every kind's keys are here; a key that does not belong to the rule's kind is rejected when the callback
    is built.
    """

    metric: str = MISSING
    kind: RuleKind = MISSING
    action: Optional[str] = None
    severity: Optional[Severity] = None
    check_on: Optional[List[CheckPoint]] = None
    warmup: Optional[int] = None
    warmup_epochs: Optional[int] = None
    consecutive: Optional[int] = None
    cooldown: Optional[int] = None
    requires: Optional[List[str]] = None
    silent: Optional[bool] = None
    reduce: Optional[Reduce] = None
    message: Optional[str] = None
    # threshold, gap
    above: Optional[float] = None
    below: Optional[float] = None
    # plateau (and mode of the others)
    mode: Optional[Mode] = None
    patience: Optional[int] = None
    min_delta: Optional[float] = None
    # spike
    window: Optional[int] = None
    z: Optional[float] = None
    method: Optional[SpikeMethod] = None
    direction: Optional[Direction] = None
    min_history: Optional[int] = None
    min_rel_change: Optional[float] = None
    min_change: Optional[float] = None
    # gap
    reference: Optional[str] = None
    relative: Optional[bool] = None
    # trend
    checks: Optional[int] = None
    min_tau: Optional[float] = None


@dataclass
class RulesConf:
    """Schema of :class:`~lightwatch.callbacks.MetricMonitor` (``monitor.rules``).

    The shipped variants list the built-in rules explicitly, so they can be overridden by name; a rule set to
    ``null`` removes it, and ``builtin_rules=false`` drops them all.
    """

    _target_: str = "lightwatch.callbacks.MetricMonitor"
    _convert_: str = "all"
    rules: Dict[str, Optional[RuleConf]] = field(default_factory=dict)
    every_n_steps: Optional[int] = None
    builtin_rules: bool = True
    max_rollbacks: int = 3
    lr_factor: float = 1.0
    snapshots: Optional[int] = None
    snapshot_every_n_steps: Optional[int] = None
    snapshot_device: Optional[str] = None
    write_scores: bool = True
    prefix: str = "monitor"
    alert_cooldown_steps: int = 100
    name: Optional[str] = None


@dataclass
class ThresholdConf:
    """One :class:`~lightwatch.callbacks.MetricCheckpoint` threshold: save once when ``metric`` crosses a bound."""

    metric: str = MISSING
    above: Optional[float] = None
    below: Optional[float] = None


@dataclass
class CheckpointConf:
    """Schema of :class:`~lightwatch.callbacks.MetricCheckpoint` (``monitor.checkpoint``)."""

    _target_: str = "lightwatch.callbacks.MetricCheckpoint"
    _convert_: str = "all"
    dirpath: Optional[str] = None
    filename: Optional[str] = None
    monitor: Optional[str] = None
    mode: Mode = Mode.min
    save_top_k: int = 1
    save_last: bool = False
    every_n_train_steps: Optional[int] = None
    every_n_epochs: Optional[int] = None
    save_on_train_epoch_end: Optional[bool] = None
    thresholds: Dict[str, ThresholdConf] = field(default_factory=dict)
    keep_threshold_checkpoints: int = -1
    save_on_alert: bool = True
    alert_save_cooldown_steps: int = 10
    keep_alert_checkpoints: int = 3
    save_on_exception: bool = False
    save_weights_only: bool = False
    auto_insert_metric_name: bool = True
    verify: bool = False
    verify_on_resume: bool = True
    export: Optional[Export] = None
    name: str = "MetricCheckpoint"
    prefix: str = "monitor"


@dataclass
class CheckpointBestConf(CheckpointConf):
    """:class:`CheckpointConf` with ``monitor`` required (the ``checkpoint=best`` variant)."""

    monitor: str = MISSING


@dataclass
class DataCheckConf:
    """Settings of one :class:`~lightwatch.callbacks.DataQualityMonitor` check; ``null`` keeps the default.

    The numeric keys belong to particular checks (``margin`` and ``tolerance`` to ``out_of_range``,
    ``alpha`` to the statistical tests, ...); one given to a check that has no such setting is rejected when
    the callback is built.
    """

    enabled: Optional[bool] = None
    action: Optional[str] = None
    severity: Optional[Severity] = None
    margin: Optional[float] = None
    tolerance: Optional[float] = None
    alpha: Optional[float] = None
    psi_floor: Optional[float] = None
    ks_floor: Optional[float] = None
    floor: Optional[float] = None
    threshold: Optional[float] = None
    ratio: Optional[float] = None
    max_abs_mean: Optional[float] = None
    min_rms: Optional[float] = None
    offset_ratio: Optional[float] = None
    psi_warn: Optional[float] = None
    ks_warn: Optional[float] = None
    warn_above: Optional[float] = None
    min_z: Optional[float] = None
    min_rows: Optional[float] = None


@dataclass
class DataChecksConf:
    """Every check of :class:`~lightwatch.callbacks.DataQualityMonitor`; set one to ``null`` to switch it off."""

    nonfinite: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    label_range: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    out_of_range: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    schema: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    empty_batch: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    unnormalised: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    drift: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    drift_ref: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    label_shift: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    label_shift_ref: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    constant: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    duplicates: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    leakage: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    class_imbalance: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    labels_unrelated: Optional[DataCheckConf] = field(default_factory=DataCheckConf)
    padding_in_loss: Optional[DataCheckConf] = field(default_factory=DataCheckConf)


@dataclass
class FieldSchemaConf:
    """Expected dtype and per-sample shape of one batch field (``null`` in ``shape``: a variable size)."""

    dtype: str = MISSING
    shape: List[Optional[int]] = MISSING


@dataclass
class DataQualityConf:
    """Schema of :class:`~lightwatch.callbacks.DataQualityMonitor` (``monitor.data_quality``).

    ``inputs``, ``targets``, ``sample_ids``, ``feature_dim`` and ``ranges`` take several shapes (an index or a
    key, or a list of them; an int or a mapping; bounds or per-feature bounds), so they are not typed here;
    the callback checks them when it is built.
    """

    _target_: str = "lightwatch.callbacks.DataQualityMonitor"
    _convert_: str = "all"
    inputs: Any = None
    targets: Any = None
    reference: Optional[str] = None
    every_n_steps: Optional[int] = None
    sample_ids: Any = None
    num_classes: Optional[int] = None
    ignore_index: Optional[int] = -100
    feature_dim: Any = None
    feature_names: Dict[str, List[str]] = field(default_factory=dict)
    ranges: Dict[str, Any] = field(default_factory=dict)
    schema: Dict[str, FieldSchemaConf] = field(default_factory=dict)
    learn_ranges: bool = True
    bins: int = 10
    max_values_per_sample: int = 64
    distribution: bool = True
    duplicates: bool = True
    checks: DataChecksConf = field(default_factory=DataChecksConf)
    profile_path: Optional[str] = "auto"
    save_hashes: bool = False
    top_k: int = 10
    prefix: str = "monitor"
    alert_cooldown_steps: int = 100
    scan_before_fit: int = 0
    scan_iterable: bool = False


# ------------------------------------------------------------------------------------------ policy schema
@dataclass
class MonitorConf:
    """Schema of a policy (the ``monitor`` node).

    Policy-wide values are interpolated into every component (``every_n_steps: ${..every_n_steps}``) and
    can be overridden per component (``monitor.grad_stats.every_n_steps=50``). Components are typed
    ``Any`` so that their own sub-group configs (each with its own schema) merge in; ``null`` switches
    one off.

    Args:
        enabled: master switch; ``false`` makes :func:`instantiate_monitors` return no callbacks.
        every_n_steps: sampling interval of every component; ``null`` follows ``Trainer(log_every_n_steps)``.
        histogram_every_n_steps: histogram interval of the components that write histograms; ``null`` is
            ten sampling intervals, ``0`` turns histograms off.
        prefix: first part of every TensorBoard tag (``<prefix>.grad/...``).
        nonfinite_action: what a NaN/Inf finding does (``log``, ``warn``, ``stop``, ``raise``, ...).
        lightning: the package whose ``Trainer`` the callbacks are for: ``pytorch_lightning``
            (``lightwatch.callbacks``), ``lightning`` (``import lightning as L``: ``lightwatch.lightning``), or
            ``auto``: the one the app has imported, ``pytorch_lightning`` when it has imported both or neither
            and is installed.
        grad_stats: :class:`GradStatsConf` or ``null``.
        act_stats: :class:`ActStatsConf` or ``null``.
        data_quality: :class:`DataQualityConf` or ``null``.
        rules: :class:`RulesConf` or ``null``.
        checkpoint: :class:`CheckpointConf` or ``null``.
    """

    enabled: bool = True
    every_n_steps: Optional[int] = None
    histogram_every_n_steps: Optional[int] = None
    prefix: str = "monitor"
    nonfinite_action: str = "warn"
    lightning: LightningPackage = LightningPackage.auto
    grad_stats: Any = None
    act_stats: Any = None
    data_quality: Any = None
    rules: Any = None
    checkpoint: Any = None


# MetricMonitor comes after the statistics monitors: it reads their values in the same step.
COMPONENTS: Tuple[Tuple[str, type], ...] = (
    ("grad_stats", GradStatsConf),
    ("act_stats", ActStatsConf),
    ("data_quality", DataQualityConf),
    ("rules", RulesConf),
    ("checkpoint", CheckpointConf),
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
    # Likewise for data checks: null settings are unset; a check set to null is switched off.
    checks = container.get("checks")
    if isinstance(checks, dict):
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
        The callbacks, in component order (``grad_stats``, ``act_stats``, ``data_quality``, ``rules``,
        ``checkpoint``), ready for ``Trainer(callbacks=[*your_callbacks, *monitors])``.

    Example:
        >>> from hydra import compose, initialize_config_module
        >>> with initialize_config_module("lightwatch.conf", version_base="1.3"):
        ...     cfg = compose(overrides=["+monitor=default", "monitor.every_n_steps=10"])
        >>> [type(cb).__name__ for cb in instantiate_monitors(cfg.monitor)]
        ['GradientStatsMonitor', 'ActivationStatsMonitor', 'DataQualityMonitor', 'MetricMonitor']
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
