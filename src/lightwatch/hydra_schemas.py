"""The typed schemas of the Hydra ``monitor`` policies: one dataclass per callback, and their closed choices.

Each dataclass mirrors its callback's constructor (names and defaults); :mod:`lightwatch.hydra` registers them in
the ConfigStore group ``lightwatch_schema`` and instantiates the callbacks. Like that module, this one imports no
torch: Hydra apps load it when they start.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Dict, Iterable, List, Optional, TypeVar

from omegaconf import MISSING

# The torch-free table of the built-in data checks (not the ``lightwatch.checks.data`` package, which imports torch).
from lightwatch.checks.data_names import BUILTIN_DATA_CHECKS

__all__ = [
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
    "LightningPackage",
    "Mode",
    "MonitorConf",
    "Reduce",
    "RuleConf",
    "RuleKind",
    "RulesConf",
    "Severity",
    "SliceRuleConf",
    "SliceRuleKind",
    "SlicesConf",
    "SpikeMethod",
    "ThresholdConf",
    "PrometheusConf",
    "PrometheusMode",
    "PrometheusPushConf",
    "SystemConf",
    "WatchdogConf",
]


# Closed choices are Enums: OmegaConf rejects ``Literal`` annotations, and an Enum gives the message
# "Invalid value 'x', expected one of [...]" at compose time. Names equal values; callbacks get the name.
class Severity(Enum):
    """Severity of an alert (``lightwatch.core.alerts.SEVERITIES``).

    Example:
        >>> Severity("error").name
        'error'
    """

    info = "info"
    warning = "warning"
    error = "error"
    critical = "critical"


class GroupBy(Enum):
    """How :class:`~lightwatch.callbacks.GradientStatsMonitor` groups its series.

    Example:
        >>> GroupBy.module.value
        'module'
    """

    parameter = "parameter"
    module = "module"


class Mode(Enum):
    """Whether lower (``min``) or higher (``max``) is better.

    Example:
        >>> Mode("max").name
        'max'
    """

    min = "min"
    max = "max"


class RuleKind(Enum):
    """Kinds of :class:`~lightwatch.callbacks.MetricMonitor` rules.

    Example:
        >>> [k.name for k in RuleKind][:3]
        ['threshold', 'nonfinite', 'plateau']
    """

    threshold = "threshold"
    nonfinite = "nonfinite"
    plateau = "plateau"
    spike = "spike"
    gap = "gap"
    trend = "trend"


class LightningPackage(Enum):
    """Which Lightning package the callbacks are bound to (see :mod:`lightwatch.core.lightning`).

    Example:
        >>> LightningPackage("lightning").name
        'lightning'
    """

    auto = "auto"
    pytorch_lightning = "pytorch_lightning"
    lightning = "lightning"


class CheckPoint(Enum):
    """When a rule is checked.

    Example:
        >>> CheckPoint.validation.value
        'validation'
    """

    every_step = "every_step"
    step = "step"
    validation = "validation"
    epoch = "epoch"


class Reduce(Enum):
    """How a rule's value is reduced over ranks.

    Example:
        >>> Reduce("mean").name
        'mean'
    """

    max = "max"
    min = "min"
    mean = "mean"


class SpikeMethod(Enum):
    """Robust (``mad``) or classical (``std``) z-score of a spike rule.

    Example:
        >>> SpikeMethod.mad.value
        'mad'
    """

    mad = "mad"
    std = "std"


class Direction(Enum):
    """Direction a spike (``up``, ``down``, ``both``) or a trend (``up``, ``down``) is looked for in.

    Example:
        >>> Direction("both").name
        'both'
    """

    up = "up"
    down = "down"
    both = "both"


class Export(Enum):
    """Format :class:`~lightwatch.callbacks.MetricCheckpoint` exports the best model to.

    Example:
        >>> Export.onnx.value
        'onnx'
    """

    onnx = "onnx"
    torchscript = "torchscript"


class PrometheusMode(Enum):
    """How :class:`~lightwatch.callbacks.PrometheusExporter` exports: an HTTP endpoint, a textfile, a push.

    Example:
        >>> PrometheusMode("push").name
        'push'
    """

    http = "http"
    textfile = "textfile"
    push = "push"


@dataclass
class SystemConf:
    """Schema of :class:`~lightwatch.callbacks.SystemMonitor` (``monitor.system``).

    Example:
        >>> SystemConf()._target_, SystemConf().patience
        ('lightwatch.callbacks.SystemMonitor', 3)
    """

    _target_: str = "lightwatch.callbacks.SystemMonitor"
    _convert_: str = "all"
    every_n_steps: Optional[int] = None
    input_bound_share: float = 0.5
    input_bound_min_wait_seconds: float = 0.01
    memory_warmup_steps: int = 3
    memory_window: int = 12
    memory_read_share: float = 0.01
    regression_factor: float = 2.0
    straggler_factor: float = 1.5
    straggler_min_gap_seconds: float = 0.005
    patience: int = 3
    action: str = "warn"
    skip_diagnoses: Optional[List[str]] = None
    prefix: str = "monitor"
    alert_cooldown_steps: int = 100


@dataclass
class WatchdogConf:
    """Schema of :class:`~lightwatch.callbacks.HangWatchdog` (``monitor.watchdog``); deadlines in seconds.

    Example:
        >>> WatchdogConf().step_floor_seconds, WatchdogConf().abort
        (300.0, False)
    """

    _target_: str = "lightwatch.callbacks.HangWatchdog"
    _convert_: str = "all"
    startup_seconds: float = 1800.0
    step_seconds: Optional[float] = None
    validation_seconds: Optional[float] = None
    checkpoint_seconds: float = 1800.0
    step_floor_seconds: float = 300.0
    step_factor: float = 20.0
    abort: bool = False
    exit_code: int = 75
    prefix: str = "monitor"


@dataclass
class PrometheusConf:
    """Schema of :class:`~lightwatch.callbacks.PrometheusExporter` (``monitor.prometheus``; off unless selected).

    Example:
        >>> PrometheusConf().mode.name, PrometheusConf().port
        ('http', 9464)
    """

    _target_: str = "lightwatch.callbacks.PrometheusExporter"
    _convert_: str = "all"
    mode: PrometheusMode = PrometheusMode.http
    port: int = 9464
    addr: str = "0.0.0.0"
    textfile: Optional[str] = None
    pushgateway: Optional[str] = None
    job: str = "lightwatch"
    all_ranks: bool = False
    extra_metrics: Dict[str, str] = field(default_factory=dict)
    every_n_steps: Optional[int] = None
    prefix: str = "monitor"
    push_timeout_seconds: float = 5.0


@dataclass
class PrometheusPushConf(PrometheusConf):
    """:class:`PrometheusConf` with ``pushgateway`` required (the ``prometheus=push`` variant).

    Example:
        >>> PrometheusPushConf().pushgateway
        '???'
    """

    mode: PrometheusMode = PrometheusMode.push
    pushgateway: str = MISSING


# ------------------------------------------------------------------------------------- component schemas
# One dataclass per callback, mirroring its constructor (names and defaults; a test keeps them in step).
# Mappings of typed entries default to {} where the constructor has None: OmegaConf cannot merge a mapping
# into a null typed mapping, so `+monitor.rules.rules={name: {...}}` needs an empty one to merge into.
# ``_target_`` and ``_convert_`` are declared fields: a typed node rejects undeclared keys, and with
# ``_convert_: all`` lists and dicts reach the constructor as plain Python objects even when a user calls
# ``hydra.utils.instantiate`` on the node directly.


@dataclass
class GradStatsConf:
    """Schema of :class:`~lightwatch.callbacks.GradientStatsMonitor` (``monitor.grad_stats``).

    Example:
        >>> GradStatsConf()._target_, GradStatsConf().group_by.name
        ('lightwatch.callbacks.GradientStatsMonitor', 'parameter')
    """

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
    """Schema of :class:`~lightwatch.callbacks.ActivationStatsMonitor` (``monitor.act_stats``).

    Example:
        >>> ActStatsConf().sample_size
        65536
    """

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

    Example:
        >>> ActStatsSelectConf().include
        '???'
    """

    include: List[str] = MISSING


@dataclass
class RuleConf:
    """One :class:`~lightwatch.callbacks.MetricMonitor` rule; keys left ``null`` take the rule's defaults.

    The rule's name is its key in ``rules`` and the metric is a value, because metric names hold ``/``,
    which Hydra's override grammar does not accept in keys (``monitor.rules.rules.val_plateau.patience=3``).
    Every kind's keys are here; a key that does not belong to the rule's kind is rejected when the callback
    is built.

    Example:
        >>> RuleConf(metric="val/loss", kind=RuleKind.plateau).patience is None
        True
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

    Example:
        >>> RulesConf().builtin_rules, RulesConf().rules
        (True, {})
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


class SliceRuleKind(Enum):
    """Kind of a :class:`~lightwatch.callbacks.SliceMonitor` rule (``lightwatch.checks.slices.SLICE_RULE_KINDS``).

    Example:
        >>> SliceRuleKind("slice_gap").name
        'slice_gap'
    """

    slice_gap = "slice_gap"
    slice_regressed = "slice_regressed"


@dataclass
class SliceRuleConf:
    """One :class:`~lightwatch.callbacks.SliceMonitor` rule; ``null`` keys keep the rule's defaults.

    Example:
        >>> SliceRuleConf(kind=SliceRuleKind.slice_gap).margin is None
        True
    """

    kind: SliceRuleKind = MISSING
    metric: Optional[str] = None
    action: Optional[str] = None
    severity: Optional[Severity] = None
    consecutive: Optional[int] = None
    warmup: Optional[int] = None
    margin: Optional[float] = None
    message: Optional[str] = None
    hidden_only: Optional[bool] = None  # slice_regressed


@dataclass
class SlicesConf:
    """Schema of :class:`~lightwatch.callbacks.SliceMonitor` (``monitor.slices``; off unless selected).

    ``slice_by`` is a batch path (``group``, ``meta.site``, ``2``), ``dataloader``, a mapping with ``field``,
    ``column``, ``names``/``num_values`` and ``name``, or a list of those (their cross). ``preds``, ``target`` and
    ``outcome`` take batch paths or keys here; callables are for Python.

    Example:
        >>> SlicesConf().slice_by, SlicesConf().min_count
        ('dataloader', 30)
    """

    _target_: str = "lightwatch.callbacks.SliceMonitor"
    _convert_: str = "all"
    slice_by: Any = "dataloader"
    metrics: Optional[List[str]] = None
    task: str = "multiclass"
    num_classes: Optional[int] = None
    preds: Any = None
    target: Any = None
    outcome: Any = None
    rules: Dict[str, Optional[SliceRuleConf]] = field(default_factory=dict)
    min_count: int = 30
    bootstrap: int = 200
    confidence: float = 0.95
    rule_confidence: float = 0.99
    max_values: int = 16
    threshold: float = 0.5
    seed: int = 0
    every_n_steps: Optional[int] = None
    prefix: str = "monitor"
    alert_cooldown_steps: int = 0


@dataclass
class ThresholdConf:
    """One :class:`~lightwatch.callbacks.MetricCheckpoint` threshold: save once when ``metric`` crosses a bound.

    Example:
        >>> ThresholdConf(metric="val/acc", above=0.9).above
        0.9
    """

    metric: str = MISSING
    above: Optional[float] = None
    below: Optional[float] = None


@dataclass
class CheckpointConf:
    """Schema of :class:`~lightwatch.callbacks.MetricCheckpoint` (``monitor.checkpoint``).

    Example:
        >>> CheckpointConf().mode.name, CheckpointConf().save_top_k
        ('min', 1)
    """

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
    """:class:`CheckpointConf` with ``monitor`` required (the ``checkpoint=best`` variant).

    Example:
        >>> CheckpointBestConf().monitor
        '???'
    """

    monitor: str = MISSING


@dataclass
class DataCheckConf:
    """Settings of one :class:`~lightwatch.callbacks.DataQualityMonitor` check; ``null`` keeps the default.

    The numeric keys belong to particular checks (``margin`` and ``tolerance`` to ``out_of_range``,
    ``alpha`` to the statistical tests, ...); one given to a check that has no such setting is rejected when
    the callback is built.

    Example:
        >>> DataCheckConf(action="stop").action, DataCheckConf().alpha
        ('stop', None)
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


_Schema = TypeVar("_Schema", bound=type)


def check_fields(names: Iterable[str]) -> Callable[[_Schema], _Schema]:
    """A class decorator, applied under ``@dataclass``: one field ``Optional[DataCheckConf]`` (default: every
    setting ``null``) per check name, in the order given.

    Args:
        names: the check names, e.g. the keys of :data:`lightwatch.checks.data_names.BUILTIN_DATA_CHECKS`.

    Example:
        >>> @dataclass
        ... @check_fields(["nonfinite", "blank_rows"])
        ... class TwoChecks:
        ...     pass
        >>> list(TwoChecks.__dataclass_fields__), TwoChecks().blank_rows.alpha is None
        (['nonfinite', 'blank_rows'], True)
    """
    names = list(names)

    def add_fields(cls: _Schema) -> _Schema:
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for name in names:
            if name in annotations:
                raise ValueError(f"{cls.__name__}: check {name!r} is named twice; every check name needs one field.")
            annotations[name] = Optional[DataCheckConf]
            setattr(cls, name, field(default_factory=DataCheckConf))
        cls.__annotations__ = annotations
        return cls

    return add_fields


@dataclass
@check_fields(BUILTIN_DATA_CHECKS)
class DataChecksConf:
    """Every check of :class:`~lightwatch.callbacks.DataQualityMonitor`; set one to ``null`` to switch it off.

    One ``Optional[DataCheckConf]`` field per built-in check, named and ordered as in
    :data:`lightwatch.checks.data_names.BUILTIN_DATA_CHECKS`, so a new built-in check can be set from a policy
    as soon as it is in that table.

    Example:
        >>> sorted(DataChecksConf().__dataclass_fields__)[:3], DataChecksConf().drift.alpha is None
        (['class_imbalance', 'constant', 'drift'], True)
    """


@dataclass
class FieldSchemaConf:
    """Expected dtype and per-sample shape of one batch field (``null`` in ``shape``: a variable size).

    Example:
        >>> FieldSchemaConf(dtype="float32", shape=[3, None]).shape
        [3, None]
    """

    dtype: str = MISSING
    shape: List[Optional[int]] = MISSING


@dataclass
class DataQualityConf:
    """Schema of :class:`~lightwatch.callbacks.DataQualityMonitor` (``monitor.data_quality``).

    ``inputs``, ``targets``, ``sample_ids``, ``feature_dim`` and ``ranges`` take several shapes (an index or a
    key, or a list of them; an int or a mapping; bounds or per-feature bounds), so they are not typed here;
    the callback checks them when it is built.

    Example:
        >>> DataQualityConf()._target_, DataQualityConf().bins
        ('lightwatch.callbacks.DataQualityMonitor', 10)
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
    # run only these checks, by name (every other one off); null runs every check not set to null in `checks`
    only_checks: Optional[List[str]] = None
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
        slices: :class:`SlicesConf` or ``null`` (the default: the slice keys are the user's).
        system: :class:`SystemConf` or ``null``.
        watchdog: :class:`WatchdogConf` or ``null``.
        prometheus: :class:`PrometheusConf` or ``null`` (the default: ports and gateways are the user's).

    Example:
        >>> MonitorConf().enabled, MonitorConf().lightning.name
        (True, 'auto')
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
    slices: Any = None
    system: Any = None
    watchdog: Any = None
    prometheus: Any = None
