"""The shipped Hydra policies: composition, validation, instantiation, short fits, the search-path plugin.

Configs are composed the way users compose them (``initialize_config_module("lightwatch.conf")`` and
``compose`` with command-line style overrides, or a real Hydra app in a subprocess); callbacks are checked
through their attributes, and fits through the TensorBoard files and ``alerts.jsonl`` they write.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib.resources
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from typing import Any, Dict, List, Sequence

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from conftest import Classifier, make_loader, make_trainer, read_alerts, read_events, scalars
from lightwatch import MonitorError
from lightwatch.callbacks import (
    ActivationStatsMonitor,
    DataQualityMonitor,
    GradientStatsMonitor,
    MetricCheckpoint,
    MetricMonitor,
)
from lightwatch.callbacks import HangWatchdog, SystemMonitor
from lightwatch.hydra import COMPONENTS, MonitorConfigError, instantiate_monitors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
POLICIES = ("off", "default", "strict", "debug")
# Values a variant leaves `???` on purpose, and what the tests set them to.
REQUIRED = {
    ("act_stats", "select"): {"monitor.act_stats.include": "[net]"},
    ("rules", "plateau"): {"monitor.rules.rules.val_plateau.metric": "val/loss"},
    ("checkpoint", "best"): {"monitor.checkpoint.monitor": "val/loss"},
    ("prometheus", "push"): {"monitor.prometheus.pushgateway": "http://127.0.0.1:9091"},
}
# Constructor arguments a schema leaves out on purpose (none today).
NOT_IN_SCHEMA: dict = {}
# policy keys that lightwatch.hydra turns into constructor arguments (only_checks: every other check switched off)
NOT_IN_CONSTRUCTOR = {"DataQualityConf": ("only_checks",)}
STATS = [GradientStatsMonitor, ActivationStatsMonitor]
JOB = [SystemMonitor, HangWatchdog]  # the job-health components of the default policy
ALL = [GradientStatsMonitor, ActivationStatsMonitor, DataQualityMonitor, *JOB, MetricMonitor]


@pytest.fixture(scope="module", autouse=True)
def lightwatch_conf():
    """Hydra initialised once on the shipped configs, as a library user's tests would."""
    with initialize_config_module("lightwatch.conf", version_base="1.3"):
        yield


def monitor_cfg(*overrides: str, policy: str = "default") -> DictConfig:
    return compose(overrides=[f"+monitor={policy}", *overrides]).monitor


def monitors(*overrides: str, policy: str = "default") -> List[Any]:
    return instantiate_monitors(monitor_cfg(*overrides, policy=policy))


def by_type(callbacks: Sequence[Any]) -> Dict[type, Any]:
    return {type(cb): cb for cb in callbacks}


def composition_error(*overrides: str, policy: str = "default") -> str:
    """The message a user sees for a bad override: Hydra's message and its cause."""
    with pytest.raises((ConfigCompositionException, MissingConfigException)) as info:
        monitor_cfg(*overrides, policy=policy)
    return f"{info.value}\n{info.value.__cause__ or ''}"


def variants() -> List[tuple]:
    """Every (component, variant) shipped in the package, found from the files themselves."""
    root = importlib.resources.files("lightwatch.conf").joinpath("monitor")
    found = []
    for key, _ in COMPONENTS:
        group = root.joinpath(key)
        found += [(key, f.name[:-5]) for f in group.iterdir() if f.name.endswith(".yaml")]
    return sorted(found)


# ------------------------------------------------------------------------------------- composition
def test_the_package_ships_the_policies_and_the_documented_variants():
    names = {f.name for f in importlib.resources.files("lightwatch.conf").joinpath("monitor").iterdir()}
    assert {f"{p}.yaml" for p in POLICIES} <= names
    assert {("grad_stats", v) for v in ("basic", "full", "per_module")} <= set(variants())
    assert {("act_stats", v) for v in ("basic", "full", "select")} <= set(variants())
    assert {("rules", v) for v in ("default", "strict", "recover", "plateau")} <= set(variants())
    assert {("checkpoint", v) for v in ("last", "best")} <= set(variants())
    assert {("data_quality", v) for v in ("basic", "light", "strict")} <= set(variants())


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_composes_without_missing_values_and_instantiates(policy):
    cfg = monitor_cfg(policy=policy)
    assert OmegaConf.missing_keys(cfg) == set()
    callbacks = instantiate_monitors(cfg)
    expected = [] if policy == "off" else ALL
    assert [type(cb) for cb in callbacks] == expected


def rule_actions(monitor: MetricMonitor) -> Dict[str, str]:
    return {rule.name: rule.action for rule in monitor.rules.rules}


def test_policies_set_cadence_actions_and_detail_as_documented():
    default = by_type(monitors(policy="default"))
    for kind in STATS:
        cb = default[kind]
        assert cb.every_n_steps is None  # follows Trainer(log_every_n_steps)
        assert cb.nonfinite_action == "warn" and cb.top_k == 50 and cb.histogram_every_n_steps == 0
        assert cb.prefix == "monitor"
    assert default[MetricMonitor].every_n_steps is None
    assert rule_actions(default[MetricMonitor]) == {"loss_nonfinite": "stop", "loss_spike": "warn",
                                                    "loss_shift": "warn", "loss_regressed": "warn"}
    assert {r.metric for r in default[MetricMonitor].rules.rules} == {
        "monitor.step/loss", "monitor.step/loss_shift_z", "monitor.step/loss_regress"}
    # the policy's rules are MetricMonitor's own defaults, written out
    from lightwatch.callbacks.metric_monitor import default_rules

    assert {r.name: (r.metric, r.action, r.consecutive) for r in default[MetricMonitor].rules.rules} == {
        r.name: (r.metric, r.action, r.consecutive) for r in MetricMonitor().rules.rules}
    assert set(default_rules()) == {r.name for r in default[MetricMonitor].rules.rules}
    checks = default[DataQualityMonitor].checks
    assert default[DataQualityMonitor].distribution and default[DataQualityMonitor].duplicates
    assert (checks["nonfinite"].action, checks["leakage"].severity) == ("warn", "warning")

    strict = by_type(monitors(policy="strict"))
    for kind in STATS:
        assert (strict[kind].every_n_steps, strict[kind].nonfinite_action, strict[kind].top_k) == (10, "stop", 50)
    assert strict[MetricMonitor].every_n_steps == 10
    assert rule_actions(strict[MetricMonitor]) == {"loss_nonfinite": "stop", "loss_spike": "warn",
                                                   "loss_shift": "warn", "loss_regressed": "warn",
                                                   "grad_norm_spike": "warn"}
    checks = strict[DataQualityMonitor].checks
    assert [checks[c].action for c in ("nonfinite", "label_range", "schema")] == ["stop"] * 3
    assert checks["leakage"].severity == "error" and checks["drift"].action == "warn"

    debug = by_type(monitors(policy="debug"))
    for kind in STATS:
        cb = debug[kind]
        assert (cb.every_n_steps, cb.nonfinite_action, cb.top_k, cb.histogram_every_n_steps) == (1, "raise", None, 10)
    assert rule_actions(debug[MetricMonitor])["loss_nonfinite"] == "raise"
    assert debug[DataQualityMonitor].checks["nonfinite"].action == "raise"


@pytest.mark.parametrize("component,variant", variants())
def test_every_component_variant_composes_and_instantiates(component, variant):
    required = REQUIRED.get((component, variant), {})
    cfg = monitor_cfg(f"monitor/{component}={variant}", "monitor.every_n_steps=3", policy="off")
    # Only the documented `???` values are left open ...
    assert OmegaConf.missing_keys(cfg) == set(required)
    cfg = monitor_cfg(f"monitor/{component}={variant}", "monitor.every_n_steps=3",
                      *(f"{k}={v}" for k, v in required.items()), policy="off")
    (callback,) = instantiate_monitors(cfg)
    assert type(callback) is get_class(dict(COMPONENTS)[component]._target_)
    # ... and the policy-wide values reach the component through interpolation.
    assert callback.writer.prefix == "monitor"
    if getattr(callback, "every_n_steps", None) is not None:  # HangWatchdog: deadlines, no interval (None)
        assert callback.every_n_steps == 3


def is_unset(value: Any) -> bool:
    """An empty mapping, or a schema whose every setting is left null."""
    if dataclasses.is_dataclass(value):
        value = OmegaConf.to_container(OmegaConf.structured(value))
    if isinstance(value, dict):
        return all(v is None or is_unset(v) for v in value.values())
    return False


@pytest.mark.parametrize("component,schema", COMPONENTS)
def test_schemas_mirror_the_constructors(component, schema):
    """Every constructor argument has a schema field with the same default, and nothing else is there."""
    cls = get_class(schema._target_)
    params = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
              if n != "self" and n not in NOT_IN_SCHEMA.get(cls.__name__, ())}
    fields = {f.name: f.default for f in dataclasses.fields(schema)
              if f.name not in ("_target_", "_convert_") + NOT_IN_CONSTRUCTOR.get(schema.__name__, ())}
    assert sorted(fields) == sorted(params), f"{schema.__name__} and {cls.__name__} disagree on argument names"
    for name, default in fields.items():
        if isinstance(default, dataclasses._MISSING_TYPE):  # typed mappings start empty (see lightwatch.hydra)
            assert is_unset(schema.__dataclass_fields__[name].default_factory()) and params[name] is None, name
            continue
        plain = default.name if isinstance(default, enum.Enum) else default
        assert plain == params[name], f"{schema.__name__}.{name}: schema {plain!r} != constructor {params[name]!r}"


# ---------------------------------------------------------------------------------------- overrides
def test_command_line_overrides_reach_the_callbacks():
    model = Classifier()
    cbs = by_type(monitors(
        "monitor.every_n_steps=7",                 # policy-wide: both components
        "monitor.grad_stats.every_n_steps=3",      # per component: wins over the policy value
        "monitor.prefix=lw",
        "monitor/grad_stats=full",                 # another variant: all parameters
        "monitor.grad_stats.group_by=module",
        "monitor.act_stats.nonfinite_severity=critical",
        "monitor.act_stats.sample_size=128",
        "monitor.nonfinite_action=stop",
        "monitor.grad_stats.exclude=[bias$]",
        "monitor.act_stats.module_types=[ReLU]",
        "monitor.grad_stats.skip_diagnoses=[frozen_at_init,grad_vanishing]",
    ))
    grad, act = cbs[GradientStatsMonitor], cbs[ActivationStatsMonitor]
    assert (grad.every_n_steps, act.every_n_steps) == (3, 7)
    assert grad.prefix == act.prefix == "lw"
    assert grad.top_k is None and act.top_k == 50
    # Enum-typed values arrive as the plain strings the callbacks compare against.
    assert grad.group_by == "module" and type(grad.group_by) is str
    assert act.nonfinite_severity == "critical" and type(act.nonfinite_severity) is str
    assert act.sample_size == 128
    assert grad.nonfinite_action == act.nonfinite_action == "stop"
    # Lists arrive as lists and select what they say.
    assert type(grad.selection.exclude) is list
    assert [n for n, _ in grad.selection.parameters(model)] == ["net.0.weight", "net.2.weight", "net.4.weight"]
    assert [n for n, _ in act.selection.modules(model)] == ["net.1", "net.3"]
    assert grad.skip_diagnoses == {"frozen_at_init", "grad_vanishing"} and act.skip_diagnoses == set()


@pytest.mark.parametrize("overrides,expected", [
    (["~monitor/act_stats"], [GradientStatsMonitor, DataQualityMonitor, *JOB, MetricMonitor]),
    (["monitor.act_stats=null"], [GradientStatsMonitor, DataQualityMonitor, *JOB, MetricMonitor]),
    (["~monitor/rules", "monitor.grad_stats=null", "~monitor/data_quality"], [ActivationStatsMonitor, *JOB]),
    (["monitor.grad_stats=null", "monitor.act_stats=null", "monitor.data_quality=null", "monitor.rules=null"], JOB),
    (["~monitor/system", "monitor.watchdog=null"], [GradientStatsMonitor, ActivationStatsMonitor, DataQualityMonitor,
                                                   MetricMonitor]),
    (["monitor/checkpoint=last"], [*ALL, MetricCheckpoint]),
    (["monitor.enabled=false"], []),
])
def test_components_are_switched_off_from_the_command_line(overrides, expected):
    assert [type(cb) for cb in monitors(*overrides)] == expected


def test_off_is_the_base_for_an_a_la_carte_selection():
    (grad,) = monitors("monitor/grad_stats=per_module", policy="off")
    assert isinstance(grad, GradientStatsMonitor) and grad.group_by == "module"


def test_rules_are_edited_added_and_removed_by_name_from_the_command_line():
    rules = by_type(monitors(
        "monitor.rules.rules.loss_spike.z=5",
        "monitor.rules.rules.loss_nonfinite=null",
        # A rule is added by merging a mapping into `rules` (validated against the rule schema).
        "+monitor.rules.rules={val_plateau: {metric: val/loss, kind: plateau, patience: 2, action: stop}}",
        "monitor.rules.max_rollbacks=1",
    ))[MetricMonitor]
    by_name = {rule.name: rule for rule in rules.rules.rules}
    assert sorted(by_name) == ["loss_regressed", "loss_shift", "loss_spike", "val_plateau"]
    assert by_name["loss_spike"].z == 5.0 and by_name["loss_spike"].consecutive == 2
    assert (by_name["val_plateau"].metric, by_name["val_plateau"].patience, by_name["val_plateau"].action) == (
        "val/loss", 2, "stop")
    assert rules.recovery.max_rollbacks == 1


def test_the_rule_variants_carry_their_documented_actions():
    recover = by_type(monitors("monitor/rules=recover"))[MetricMonitor]
    assert rule_actions(recover) == {"loss_nonfinite": "rollback", "loss_spike": "rollback", "loss_shift": "rollback",
                                     "loss_regressed": "warn"}  # a slow setback: rolling back would repeat it
    plateau = by_type(monitors("monitor/rules=plateau", "monitor.rules.rules.val_plateau.metric=val/acc",
                               "monitor.rules.rules.val_plateau.mode=max"))[MetricMonitor]
    rule = next(r for r in plateau.rules.rules if r.name == "val_plateau")
    assert (rule.metric, rule.mode, rule.patience, rule.action) == ("val/acc", "max", 5, "stop")


def test_checkpoint_variants_take_their_settings_from_the_command_line(tmp_path):
    (last,) = monitors("monitor/checkpoint=last", policy="off")
    assert isinstance(last, MetricCheckpoint) and (last.monitor, last.save_top_k, last.save_last) == (None, 1, True)
    (best,) = monitors("monitor/checkpoint=best", "monitor.checkpoint.monitor=val/acc", "monitor.checkpoint.mode=max",
                       f"monitor.checkpoint.dirpath={tmp_path}", "monitor.checkpoint.filename='{epoch}-{val/acc:.2f}'",
                       "+monitor.checkpoint.thresholds={acc90: {metric: val/acc, above: 0.9}}", policy="off")
    assert (best.monitor, best.mode, best.save_top_k, best.dirpath) == ("val/acc", "max", 3, str(tmp_path))
    assert os.path.basename(best.format_checkpoint_name({"epoch": 2, "val/acc": 0.912})) == "epoch=2-val_acc=0.91.ckpt"
    assert best.thresholds == {"acc90": {"metric": "val/acc", "kind": "above", "bound": 0.9}}


def test_data_checks_are_tuned_and_switched_off_by_name():
    dq = by_type(monitors(
        "monitor.data_quality.checks.constant=null",
        "monitor.data_quality.checks.out_of_range.margin=0.5",
        "monitor.data_quality.checks.leakage.action=stop",
        "monitor.data_quality.bins=20",
        "+monitor.data_quality.schema={x: {dtype: float32, shape: [8]}}",
        "+monitor.data_quality.ranges={x: [-10, 10]}",
        "monitor.data_quality.checks.unnormalised.max_abs_mean=1.5",
        "monitor.data_quality.checks.drift.psi_warn=0.8",
        "monitor.data_quality.checks.duplicates.warn_above=0.2",
    ))[DataQualityMonitor]
    assert dq.checks["constant"].enabled is False and dq.checks["drift"].enabled is True
    assert dq.checks["unnormalised"]["max_abs_mean"] == 1.5 and dq.checks["unnormalised"]["min_rms"] == 2.0
    assert dq.checks["drift"]["psi_warn"] == 0.8 and dq.checks["duplicates"]["warn_above"] == 0.2
    assert dq.checks["out_of_range"]["margin"] == 0.5 and dq.checks["out_of_range"]["tolerance"] == 1e-3
    assert dq.checks["leakage"].action == "stop" and dq.bins == 20
    assert list(dq.schema) == ["x"] and dq.ranges == {"x": [-10, 10]}


def test_a_callback_of_your_own_joins_the_policy_under_a_new_key():
    from pytorch_lightning.callbacks import EarlyStopping

    callbacks = monitors("+monitor.early_stop={_target_: pytorch_lightning.callbacks.EarlyStopping, monitor: val/loss}",
                         policy="strict")
    assert [type(cb) for cb in callbacks] == [*ALL, EarlyStopping]
    assert callbacks[-1].monitor == "val/loss"


def test_a_dict_override_edits_the_component_instead_of_replacing_it():
    grad = by_type(monitors("monitor.grad_stats={every_n_steps: 4, top_k: 2}"))[GradientStatsMonitor]
    assert (grad.every_n_steps, grad.top_k, grad.prefix) == (4, 2, "monitor")


# ----------------------------------------------------------------------------- errors before training
@pytest.mark.parametrize("override,needles", [
    ("monitor.grad_stats.every_n_step=5", ["every_n_step", "GradStatsConf"]),
    ("monitor.every_n_step=5", ["every_n_step", "MonitorConf"]),
    ("monitor.act_stat.top_k=5", ["act_stat", "MonitorConf"]),
    ("monitor.rules.rules.loss_spike.zz=5", ["zz", "RuleConf"]),
    ("monitor.data_quality.checks.leakge.action=stop", ["leakge", "DataChecksConf"]),
    ("+monitor.rules.rules={new_rule: {metric: val/loss, kind: plateau, patiense: 3}}", ["patiense", "RuleConf"]),
])
def test_a_typo_fails_at_compose_time_naming_the_key(override, needles):
    message = composition_error(override)
    for needle in needles:
        assert needle in message


def test_a_typo_forced_in_with_plus_is_caught_before_training():
    # `+key=value` adds a key even to a typed node; the constructor then names it.
    cfg = monitor_cfg("+monitor.grad_stats.every_n_step=5")
    with pytest.raises(MonitorConfigError, match=r"monitor.grad_stats.*unexpected keyword argument 'every_n_step'"):
        instantiate_monitors(cfg)


def test_a_misspelled_policy_or_variant_lists_the_options():
    message = composition_error(policy="stirct")
    assert "monitor/stirct" in message and all(p in message for p in POLICIES)
    message = composition_error("monitor/grad_stats=fulll")
    assert "grad_stats/fulll" in message and "basic" in message and "full" in message


@pytest.mark.parametrize("override,needles", [
    ("monitor.rules.rules.loss_spike.kind=spiky", ["monitor.rules.rules.loss_spike.kind", "plateau, spike"]),
    ("monitor.rules.rules.loss_spike.z=high", ["monitor.rules.rules.loss_spike.z", "Float"]),
    ("monitor.rules.rules.loss_spike.check_on=[sometimes]", ["check_on", "every_step, step, validation, epoch"]),
    ("monitor/checkpoint=last monitor.checkpoint.mode=lowest", ["monitor.checkpoint.mode", "min, max"]),
    ("monitor.every_n_steps=abc", ["monitor.every_n_steps", "Integer"]),
    ("monitor.grad_stats.top_k=many", ["monitor.grad_stats.top_k", "Integer"]),
    ("monitor.grad_stats.norm_every_step=maybe", ["monitor.grad_stats.norm_every_step", "not a valid bool"]),
    ("monitor.grad_stats.group_by=layer", ["monitor.grad_stats.group_by", "parameter", "module"]),
    ("monitor.act_stats.nonfinite_severity=fatal", ["nonfinite_severity", "info, warning, error, critical"]),
    ("monitor.act_stats.include=net", ["monitor.act_stats.include"]),
    ("monitor.data_quality.checks.drift.alpha=often", ["monitor.data_quality.checks.drift.alpha", "Float"]),
    ("monitor.data_quality.checks.drift.severity=loud", ["monitor.data_quality.checks.drift.severity", "warning"]),
])
def test_a_wrong_type_fails_at_compose_time_naming_the_key(override, needles):
    message = composition_error(*override.split(" "))
    for needle in needles:
        assert needle in message, message


def test_a_rule_without_a_metric_is_named_before_anything_is_built():
    cfg = monitor_cfg("+monitor.rules.rules={val_plateau: {kind: plateau}}")
    with pytest.raises(MonitorConfigError, match=r"monitor\.rules\.rules\.val_plateau\.metric.*~monitor/rules"):
        instantiate_monitors(cfg)


def test_a_missing_required_value_is_named_before_anything_is_built():
    cfg = monitor_cfg("monitor/act_stats=select")
    with pytest.raises(MonitorConfigError) as info:
        instantiate_monitors(cfg)
    message = str(info.value)
    assert "monitor.act_stats.include" in message and "~monitor/act_stats" in message
    # Every missing key is named at once, not the first one only.
    cfg.grad_stats.prefix = "???"
    with pytest.raises(MonitorConfigError, match=r"2 required .*monitor.act_stats.include, monitor.grad_stats.prefix"):
        instantiate_monitors(cfg)


@pytest.mark.parametrize("override,needles", [
    ("monitor.grad_stats.nonfinite_action=explode", ["monitor.grad_stats", "explode", "stop"]),
    ("monitor.every_n_steps=0", ["monitor.grad_stats", "every_n_steps must be an integer >= 1"]),
    ("monitor.act_stats.include=['(unclosed']", ["monitor.act_stats", "invalid regular expression"]),
    # a key of another kind of rule: the schema knows every kind's keys, the rule knows its own
    ("monitor.rules.rules.loss_spike.patience=3", ["monitor.rules", "loss_spike", "unknown key 'patience'"]),
    ("monitor.rules.rules.loss_spike.action=explode", ["monitor.rules", "loss_spike", "explode"]),
    ("monitor.data_quality.checks.nonfinite.margin=0.5", ["monitor.data_quality", "'nonfinite'", "margin"]),
    ("monitor.data_quality.checks.drift.alpha=2", ["monitor.data_quality", "alpha"]),
    ("monitor.grad_stats.skip_diagnoses=[frozen]", ["monitor.grad_stats", "unknown diagnosis ['frozen']",
                                                    "frozen_at_init"]),
])
def test_values_a_callback_rejects_are_reported_with_the_component_key(override, needles):
    with pytest.raises(MonitorConfigError) as info:
        monitors(override)
    for needle in needles:
        assert needle in str(info.value)


def test_instantiate_monitors_accepts_plain_dicts_and_the_root_config_and_rejects_the_rest():
    (grad,) = instantiate_monitors({"grad_stats": {"_target_": "lightwatch.callbacks.GradientStatsMonitor",
                                                   "every_n_steps": 3, "exclude": ["bias"]}})
    assert grad.every_n_steps == 3 and grad.selection.exclude == ["bias"]
    root = compose(overrides=["+monitor=strict"])
    # HangWatchdog runs on deadlines, not a sampling interval
    assert [cb.every_n_steps for cb in instantiate_monitors(root)] == [10, 10, 10, 10, None, 10]
    with pytest.raises(TypeError, match="cfg.monitor"):
        instantiate_monitors(["grad_stats"])
    with pytest.raises(MonitorConfigError, match="no `_target_`"):
        instantiate_monitors({"grad_stats": {"every_n_steps": 3}})
    with pytest.raises(MonitorConfigError, match="`grad_stats.every_n_steps` could not be resolved"):
        instantiate_monitors({"grad_stats": {"_target_": "lightwatch.callbacks.GradientStatsMonitor",
                                             "every_n_steps": "${..nowhere}"}})


# ------------------------------------------------------------------------------------------ short fits
@pytest.mark.parametrize("policy,sampled,histograms", [
    ("off", [], False),
    ("default", [0, 4, 9], False),  # Trainer(log_every_n_steps=5), and step 0: the initialised model
    ("strict", [0, 9], False),      # every 10 steps, and step 0
    ("debug", list(range(10)), True),  # every step, histograms every 10
])
def test_a_short_fit_runs_with_each_policy(tmp_path, seed, policy, sampled, histograms):
    callbacks = monitors(policy=policy)
    trainer = make_trainer(tmp_path, callbacks, max_steps=10, log_every_n_steps=5)
    trainer.fit(Classifier(), make_loader(n=320))  # one epoch of 20 steps
    assert trainer.global_step == 10
    acc = read_events(trainer.log_dir)
    tags = acc.Tags()["scalars"]
    if not sampled:
        assert not any(t.startswith("monitor.") for t in tags)
        return
    assert sorted(scalars(acc, "monitor.grad/_total/norm")) == sampled
    assert sorted(scalars(acc, "monitor.act/net.1/dead_frac")) == sampled
    assert ("monitor.grad_hist/net.0.weight" in acc.Tags()["histograms"]) is histograms
    assert read_alerts(str(tmp_path)) == []


def test_the_checkpoint_component_keeps_a_manifest_of_existing_files(tmp_path, seed):
    ckpt_dir = tmp_path / "ckpt"
    callbacks = monitors("monitor/checkpoint=last", f"monitor.checkpoint.dirpath={ckpt_dir}")
    trainer = make_trainer(tmp_path, callbacks, max_steps=16, enable_checkpointing=True)
    trainer.fit(Classifier(), make_loader())  # two epochs of 8 steps
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    files = {entry["file"] for entry in manifest["checkpoints"]}
    assert manifest["version"] == 1 and "last.ckpt" in files and len(files) == 2
    assert all((ckpt_dir / name).is_file() for name in files)
    assert all(entry["healthy"] for entry in manifest["checkpoints"])


def nan_loader(bad_batch: int = 2) -> DataLoader:
    loader = make_loader(n=256)
    x, y = loader.dataset.tensors
    x = x.clone()
    x[bad_batch * 16] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_strict_stops_training_on_a_nan_and_says_so(tmp_path, seed):
    # without the data scan: the NaN batch is met in training
    trainer = make_trainer(tmp_path, monitors("monitor.data_quality.scan_before_fit=0", policy="strict"),
                           max_steps=16)
    trainer.fit(Classifier(), nan_loader())
    assert trainer.global_step == 10  # stopped at the first sampled step after the NaN (step 9)
    alerts = {a["rule"]: a for a in read_alerts(str(tmp_path))}
    assert set(alerts) == {"data_nonfinite", "grad_nonfinite", "act_nonfinite", "loss_nonfinite"}
    assert all(a["action"] == "stop" for a in alerts.values())
    assert alerts["data_nonfinite"]["step"] == 2  # the bad batch itself, read at the check
    assert {alerts[r]["step"] for r in ("grad_nonfinite", "act_nonfinite", "loss_nonfinite")} == {9}
    assert alerts["act_nonfinite"]["subject"] == "net.0"


def test_strict_stops_on_nan_in_the_training_data_before_the_first_update(tmp_path, seed):
    trainer = make_trainer(tmp_path, monitors(policy="strict"), max_steps=16)  # the policy scans 64 batches
    trainer.fit(Classifier(), nan_loader())
    assert trainer.global_step == 0
    (alert,) = read_alerts(str(tmp_path))
    assert (alert["rule"], alert["step"], alert["action"]) == ("data_nonfinite", 0, "stop")
    assert "first in train batch 2 of the scan" in alert["message"]


def test_debug_raises_at_the_first_nan_naming_the_layer(tmp_path, seed):
    trainer = make_trainer(tmp_path, monitors("monitor.data_quality.scan_before_fit=0", policy="debug"),
                           max_steps=16)
    with pytest.raises(MonitorError) as info:
        trainer.fit(Classifier(), nan_loader(bad_batch=2))
    # The data check sees the batch before the forward pass, so it is the one that raises.
    assert "'data_nonfinite'" in str(info.value) and "at step 2," in str(info.value)
    (alert,) = read_alerts(str(tmp_path))  # recorded before it was raised
    assert (alert["rule"], alert["step"], alert["action"]) == ("data_nonfinite", 2, "raise")
    assert trainer.global_step == 2  # no update was made with the bad batch


def test_debug_raises_on_nan_in_the_training_data_before_the_first_update(tmp_path, seed):
    trainer = make_trainer(tmp_path, monitors(policy="debug"), max_steps=16)
    with pytest.raises(MonitorError) as info:
        trainer.fit(Classifier(), nan_loader(bad_batch=2))
    assert "'data_nonfinite'" in str(info.value) and "at step 0," in str(info.value)
    assert trainer.global_step == 0


# --------------------------------------------------------------------------- search path and packaging
def run_python(args: Sequence[str], cwd: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    return subprocess.run([PYTHON, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


OUTSIDE_APP = '''
import hydra
from omegaconf import OmegaConf


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    import torch
    torch.set_num_threads(1)
    from lightwatch.hydra import instantiate_monitors

    callbacks = instantiate_monitors(cfg.monitor)
    print("NAME", cfg.name)
    for cb in callbacks:
        print("CALLBACK", type(cb).__name__, cb.every_n_steps, cb.prefix, getattr(cb, "nonfinite_action", "-"))


if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def outside_app(tmp_path_factory):
    """A Hydra app in a directory of its own, with lightwatch only installed (no copied configs)."""
    root = tmp_path_factory.mktemp("outside_app")
    (root / "conf").mkdir()
    (root / "conf" / "config.yaml").write_text("defaults:\n  - monitor: default\n  - _self_\n\nname: outside\n")
    (root / "app.py").write_text(OUTSIDE_APP)
    return root


def test_the_search_path_plugin_serves_an_app_outside_the_repository(outside_app):
    result = run_python(["app.py", "monitor=strict", "monitor.grad_stats.every_n_steps=4", "monitor.prefix=ext",
                         "~monitor/act_stats", f"hydra.run.dir={outside_app / 'run'}"], cwd=str(outside_app))
    assert result.returncode == 0, result.stderr
    assert "NAME outside" in result.stdout
    assert [line for line in result.stdout.splitlines() if line.startswith("CALLBACK")] == [
        "CALLBACK GradientStatsMonitor 4 ext stop", "CALLBACK DataQualityMonitor 10 ext -",
        "CALLBACK SystemMonitor 10 ext -", "CALLBACK HangWatchdog None ext -", "CALLBACK MetricMonitor 10 ext -"]


def test_the_outside_app_gets_hydras_message_for_a_typo(outside_app):
    result = run_python(["app.py", "monitor.grad_stats.every_n_step=4", f"hydra.run.dir={outside_app / 'run2'}"],
                        cwd=str(outside_app))
    assert result.returncode == 1
    assert "Key 'every_n_step' not in 'GradStatsConf'" in result.stderr
    assert "full_key: monitor.grad_stats.every_n_step" in result.stderr
    assert not (outside_app / "run2").exists()  # nothing ran


def test_the_plugin_module_is_light_and_is_discovered():
    code = textwrap.dedent("""
        import sys
        import hydra_plugins.lightwatch_searchpath.lightwatch_searchpath_plugin as plugin
        heavy = sorted(m for m in ("torch", "pytorch_lightning", "lightwatch") if m in sys.modules)
        from hydra.core.plugins import Plugins
        from hydra.plugins.search_path_plugin import SearchPathPlugin
        found = [p.__name__ for p in Plugins.instance().discover(SearchPathPlugin)]
        print("HEAVY", heavy, "FOUND", found)
    """)
    result = run_python(["-c", code], cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "HEAVY [] FOUND" in result.stdout and "LightwatchSearchPathPlugin" in result.stdout
    assert not os.path.exists(os.path.join(REPO, "hydra_plugins", "__init__.py"))  # a namespace package


def test_the_schema_module_imports_no_torch():
    """``lightwatch/hydra.py`` on its own (without the package ``__init__``) loads Hydra and OmegaConf only."""
    path = os.path.join(REPO, "src", "lightwatch", "hydra.py")
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("schema_only", {path!r})
        module = sys.modules["schema_only"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        from hydra.core.config_store import ConfigStore
        print("TORCH", "torch" in sys.modules, sorted(ConfigStore.instance().repo["lightwatch_schema"]))
    """)
    result = run_python(["-c", code], cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "TORCH False" in result.stdout and "'monitor.yaml'" in result.stdout


def test_a_policy_lists_the_data_checks_to_run_by_name():
    dq = by_type(monitors("monitor.data_quality.only_checks=[nonfinite,schema]",
                          "monitor.data_quality.checks.schema.action=stop"))[DataQualityMonitor]
    assert sorted(name for name, check in dq.checks.items() if check.enabled) == ["nonfinite", "schema"]
    assert dq.checks["schema"].action == "stop"
    with pytest.raises(MonitorConfigError, match=r"unknown data check\(s\) 'nonfinit' \(did you mean 'nonfinite'\?\)"):
        monitors("monitor.data_quality.only_checks=[nonfinit]")


def test_a_new_built_in_data_check_name_flows_into_the_schema():
    """A name added to the table of built-in data checks is a field of ``DataChecksConf``, with no edit of the
    schema: Hydra then accepts its settings, types them, and switches it off with ``null``."""
    code = textwrap.dedent("""
        import sys
        from lightwatch.checks.data_names import BUILTIN_DATA_CHECKS
        BUILTIN_DATA_CHECKS["blank_rows"] = "blank_rows.BlankRows"  # test-only: the schema never imports the class
        from hydra import compose, initialize_config_module
        from hydra.errors import ConfigCompositionException
        from lightwatch.hydra import DataChecksConf
        print("FIELDS", list(DataChecksConf.__dataclass_fields__)[-2:], "TORCH", "torch" in sys.modules)
        with initialize_config_module("lightwatch.conf", version_base="1.3"):
            def checks(*overrides):
                return compose(overrides=["+monitor=default", *overrides]).monitor.data_quality.checks
            print("DEFAULT", checks().blank_rows.alpha)
            print("SET", checks("monitor.data_quality.checks.blank_rows.alpha=0.5").blank_rows.alpha)
            print("OFF", checks("monitor.data_quality.checks.blank_rows=null").blank_rows)
            try:
                checks("monitor.data_quality.checks.blank_rows.alpha=often")
            except ConfigCompositionException as exc:
                print("TYPED", "blank_rows.alpha" in f"{exc} {exc.__cause__}")
    """)
    result = run_python(["-c", code], cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "FIELDS ['padding_in_loss', 'blank_rows'] TORCH False" in out, out
    assert "DEFAULT None" in out and "SET 0.5" in out and "OFF None" in out and "TYPED True" in out, out


def test_the_wheel_ships_every_config_file_and_the_plugin(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("src", "hydra_plugins"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    result = run_python(["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                         str(src)], cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("lightwatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = os.path.join(REPO, "src", "lightwatch", "conf")
    shipped = {os.path.relpath(os.path.join(d, f), os.path.join(REPO, "src")).replace(os.sep, "/")
               for d, _, files in os.walk(conf) for f in files if f.endswith((".yaml", ".py"))}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "hydra_plugins/lightwatch_searchpath/lightwatch_searchpath_plugin.py" in names
    assert "hydra_plugins/__init__.py" not in names
