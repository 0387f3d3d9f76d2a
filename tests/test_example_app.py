"""The example app (``examples/train.py`` with ``conf/``): its config tree, its faults, and real runs.

The end-to-end runs are subprocesses, exactly as a user types them (``python examples/train.py ...``),
each checked through what it leaves on disk: ``alerts.jsonl``, the TensorBoard events, Hydra's saved
config, and the summary it prints.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Dict, List, Sequence

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import read_events, scalars
from lightwatch.callbacks import ActivationStatsMonitor, GradientStatsMonitor
from lightwatch.hydra import MonitorConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(REPO, "conf")
EXAMPLES = os.path.join(REPO, "examples")
if EXAMPLES not in sys.path:  # what `python examples/train.py` has on its path, for `faults` and `train`
    sys.path.insert(0, EXAMPLES)

import faults  # noqa: E402
import train as app  # noqa: E402


def options(group: str) -> List[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


@pytest.fixture(scope="module", autouse=True)
def app_conf():
    """Hydra initialised once on the example's config tree (lightwatch's groups come from its plugin)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        yield


def compose_app(*overrides: str) -> Any:
    return compose(config_name="train", overrides=list(overrides))


def run_app(run_dir: str, *overrides: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "examples/train.py", *overrides, f"hydra.run.dir={run_dir}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def read_alerts(run_dir: str) -> List[Dict[str, Any]]:
    return app.read_alerts(os.path.join(run_dir, "alerts.jsonl"))


# ----------------------------------------------------------------------------------------- config tree
def test_the_app_config_tree_has_the_documented_groups():
    assert options("fault") == ["dead_units", "frozen_layer", "leaked_val", "lr_spike", "nan_batch", "none"]
    assert {"mlp", "tanh"} <= set(options("model"))
    assert {"default", "fast", "ddp"} <= set(options("trainer"))
    assert options("data") == ["digits"]
    assert options(os.path.join("monitor", "rules")) == ["digits"]  # an app's own option in lightwatch's group


@pytest.mark.parametrize("fault", ["dead_units", "frozen_layer", "leaked_val", "lr_spike", "nan_batch", "none"])
def test_every_fault_composes_and_instantiates(fault):
    cfg = compose_app(f"fault={fault}")
    if fault == "none":
        assert "_target_" not in cfg.fault
        return
    planted = instantiate(cfg.fault)
    assert isinstance(planted, faults.Fault) and planted.describe()


@pytest.mark.parametrize("trainer", ["default", "fast", "ddp"])
@pytest.mark.parametrize("model", ["mlp", "tanh"])
def test_every_model_and_trainer_option_composes_with_the_default_policy(model, trainer, tmp_path):
    cfg = compose_app(f"model={model}", f"trainer={trainer}")
    assert cfg.monitor.grad_stats._target_ == "lightwatch.callbacks.GradientStatsMonitor"  # from lightwatch
    net = app.DigitsClassifier(**cfg.model)
    assert isinstance(net.net[1], torch.nn.ReLU if model == "mlp" else torch.nn.Tanh)
    if trainer == "ddp":
        assert (cfg.trainer.devices, cfg.trainer.strategy) == (2, "ddp")
    else:
        built = instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path))
        assert built.log_every_n_steps == 5 and built.max_steps == (30 if trainer == "fast" else -1)


def run_in_process(tmp_path: Any, *overrides: str) -> Any:
    return app.run(compose_app(*overrides, "trainer.enable_checkpointing=false"), str(tmp_path / "run"))


def test_an_lr_spike_is_caught_by_the_loss_spike_rule_of_the_default_policy(tmp_path):
    result = run_in_process(tmp_path, "fault=lr_spike")
    assert result.trainer.global_step == 135
    alert, *after = result.alerts
    assert (alert["rule"], alert["subject"], alert["severity"]) == ("loss_spike", "monitor.step/loss", "warning")
    assert 110 < alert["step"] <= 120  # the spike starts at step 110; rules are checked every 5 steps
    # The spike's lasting damage: the loss level stays up (loss_shift), and every unit of the second ReLU
    # dies, which the activation monitor names once it has stayed dead for three checks.
    later = {a["rule"]: a for a in after}
    assert sorted(later) == ["act_dead", "loss_shift"] and len(after) == 2
    assert later["act_dead"]["subject"] == "net.3" and later["act_dead"]["value"] == 1.0
    assert alert["step"] <= later["loss_shift"]["step"] <= 125 and later["loss_shift"]["value"] >= 4
    assert later["act_dead"]["step"] > alert["step"]


def test_dead_units_are_caught_by_the_apps_own_rules_variant(tmp_path):
    result = run_in_process(tmp_path, "fault=dead_units", "monitor/rules=digits")
    assert {a["rule"] for a in result.alerts} == {"relu1_dead"}
    assert result.alerts[0]["step"] == 4 and result.alerts[0]["value"] == 0.5  # the first check
    healthy = run_in_process(tmp_path / "healthy", "monitor/rules=digits", "trainer.max_epochs=1")
    assert healthy.alerts == []


def test_leaked_validation_is_caught_by_the_data_scan_before_training(tmp_path):
    result = run_in_process(tmp_path, "fault=leaked_val")
    (alert,) = result.alerts  # once: the same leak at the first validation end is not raised again
    assert (alert["rule"], alert["source"], alert["step"]) == ("data_leakage", "DataQualityMonitor", 0)
    assert "90 of the 359 val samples" in alert["message"]


def test_a_layer_frozen_as_initialised_is_named_at_fit_start(tmp_path):
    result = run_in_process(tmp_path, "fault=frozen_layer", "trainer.max_epochs=1")
    warnings = [a for a in result.alerts if a["severity"] != "info"]
    assert [(a["rule"], a["subject"], a["step"]) for a in warnings] == [("frozen_at_init", "net.0.weight", 0)]
    assert "fixed random projection" in warnings[0]["message"]


def test_the_recover_rules_roll_a_nan_back_and_training_finishes_healthy(tmp_path):
    result = run_in_process(tmp_path, "fault=nan_batch", "monitor/rules=recover")
    rollbacks = [a for a in result.alerts if a["action"] == "rollback"]
    assert rollbacks and all(a["step"] == 24 for a in rollbacks)  # the first check after the NaN at step 20
    assert result.trainer.global_step == 135 and result.stopped is None
    assert result.val_loss is not None and result.val_loss < 1.0  # finite, and the model still learned
    assert max(a["step"] for a in result.alerts) == 24  # nothing went wrong after the rollback


# ------------------------------------------------------------------------------------- faults, in-process
def fit(tmp_path: Any, callbacks: Sequence[Any], max_steps: int, data: Any = None) -> Any:
    from pytorch_lightning import Trainer
    from pytorch_lightning.loggers import TensorBoardLogger

    torch.manual_seed(0)
    data = data or app.DigitsData(batch_size=32)
    model = app.DigitsClassifier()
    trainer = Trainer(max_steps=max_steps, callbacks=list(callbacks), accelerator="cpu", devices=1,
                      logger=TensorBoardLogger(str(tmp_path), name="", version=""), limit_val_batches=0,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    return trainer


def test_dead_units_show_in_the_dead_fraction_of_the_relu_after_the_layer(tmp_path):
    healthy = fit(tmp_path / "healthy", [ActivationStatsMonitor(every_n_steps=2)], max_steps=6)
    dead = faults.DeadUnits(fraction=0.5)
    broken = fit(tmp_path / "broken", [dead, ActivationStatsMonitor(every_n_steps=2)], max_steps=6)
    assert dead.planted == ["32 of 64 units of 'net.0' killed at step 0"]
    before = scalars(read_events(healthy.log_dir), "monitor.act/net.1/dead_frac")
    after = scalars(read_events(broken.log_dir), "monitor.act/net.1/dead_frac")
    assert sorted(after) == [0, 1, 3, 5] and all(v >= 0.5 for v in after.values())  # step 0: as initialised
    assert all(v < 0.25 for v in before.values())


def test_an_lr_spike_shows_in_the_update_ratio_and_the_rate_is_restored(tmp_path):
    spike = faults.LRSpike(step=3, factor=100.0, steps=2)
    trainer = fit(tmp_path, [spike, GradientStatsMonitor(every_n_steps=1)], max_steps=8)
    ratio = scalars(read_events(trainer.log_dir), "monitor.param/net.0.weight/update_ratio")
    assert min(ratio[3], ratio[4]) > 20 * max(ratio[1], ratio[2])
    assert max(ratio[s] for s in (5, 6, 7)) < min(ratio[3], ratio[4])  # the momentum carries some of it on
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)
    assert spike.planted[-1] == "learning rate restored at step 5"


def test_leaked_validation_copies_training_samples_into_the_validation_set(tmp_path):
    data = app.DigitsData(batch_size=32)
    leak = faults.LeakedValidation(fraction=0.25)
    fit(tmp_path, [leak], max_steps=1, data=data)
    train_x = data.train_set.tensors[0]
    val_x, val_y = data.val_set.tensors
    k = round(0.25 * len(val_x))
    matches = (val_x[:, None, :] == train_x[None, :, :]).all(-1)  # [val, train]
    assert matches[:k].any(1).all() and not matches[k:].any()
    rows = matches[:k].float().argmax(1)
    assert torch.equal(val_y[:k], data.train_set.tensors[1][rows])


def test_a_nan_batch_corrupts_exactly_the_planned_samples_once(tmp_path):
    seen = []

    class Probe(faults.Fault):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(int(torch.isnan(batch[0]).any(1).sum()))

    nan = faults.NanBatch(step=2, rows=3)
    fit(tmp_path, [nan, Probe()], max_steps=5)
    assert seen == [0, 0, 3, 0, 0]
    assert len(nan.planted) == 1


# -------------------------------------------------------------------------------------- end to end
def test_the_app_runs_end_to_end_and_its_alerts_show_the_fault(tmp_path):
    run_dir = str(tmp_path / "run")
    result = run_app(run_dir, "fault=nan_batch", "fault.step=7", "monitor=strict", "monitor.every_n_steps=5",
                     "trainer=fast", "trainer.max_steps=25")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    alerts = {a["rule"]: a for a in read_alerts(run_dir)}
    assert set(alerts) == {"data_nonfinite", "grad_nonfinite", "act_nonfinite", "loss_nonfinite"}
    assert all(a["action"] == "stop" and a["severity"] == "error" for a in alerts.values())
    # The data check names the bad batch's own step; the others see its effect at the next check (step 9).
    assert alerts["data_nonfinite"]["step"] == 7
    assert {alerts[r]["step"] for r in ("grad_nonfinite", "act_nonfinite", "loss_nonfinite")} == {9}
    assert alerts["act_nonfinite"]["subject"] == "net.0"
    # The summary says what was planted, where the logs are, and what was found.
    assert "planted:     NaN in 1 sample(s) of the training batch at step 7" in out
    assert "stopped:     early, by a `stop` action" in out
    assert f"TensorBoard: tensorboard --logdir {run_dir}" in out
    assert f"alerts:      4 in {os.path.join(run_dir, 'alerts.jsonl')}" in out
    assert "by severity: error 4" in out
    assert all(f"{rule} 1" in out for rule in alerts)
    assert "policy:      monitor=strict" in out and "fault=nan_batch" in out
    # The monitors' own curves, at the overridden cadence, stop where training stopped.
    acc = read_events(run_dir)
    assert sorted(scalars(acc, "monitor.grad/_total/norm")) == [0, 4, 9]  # step 0: the initialised model
    assert scalars(acc, "monitor.grad/_total/nonfinite_steps")[9] == 3  # steps 7, 8, 9
    assert os.path.exists(os.path.join(run_dir, ".hydra", "config.yaml"))


def test_a_missing_value_stops_the_app_before_anything_is_built(tmp_path):
    cfg = compose_app("monitor/act_stats=select")
    with pytest.raises(MonitorConfigError, match=r"monitor\.act_stats\.include.*Nothing was trained"):
        app.run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_default_config_trains_well_and_raises_no_alert(tmp_path):
    """The configuration `make demo` runs: a healthy run must not raise a single alert."""
    cfg = compose(config_name="train", return_hydra_config=True)
    choices = {k: str(v) for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra/")}
    result = app.run(cfg, str(tmp_path / "run"), choices)
    assert result.stopped is None and result.alerts == [] and read_alerts(result.out_dir) == []
    assert "alerts:      0" in result.report and "none: nothing went wrong" in result.report
    assert ("policy:      monitor=default (act_stats=basic, data_quality=basic, grad_stats=basic, rules=default, "
            "system=basic, watchdog=basic), fault=none") in result.report
    acc = read_events(result.out_dir)
    val_acc = scalars(acc, "val/acc")
    assert val_acc[max(val_acc)] > 0.85 and result.val_loss is not None
    assert len(scalars(acc, "monitor.grad/_total/norm")) == 28  # 135 steps, every 5 (log_every_n_steps), and 0
    assert len(scalars(acc, "monitor.act/net.1/dead_frac")) == 28
