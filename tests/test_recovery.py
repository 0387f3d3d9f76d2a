"""``skip_step`` and ``rollback`` in real Trainers: bit-identical skips, restored weights, caps, records, resume, DDP."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import Classifier, make_trainer, read_alerts
from lightwatch.callbacks import GradientStatsMonitor, MetricCheckpoint, MetricMonitor
from lightwatch.core.actions import MonitorWarning

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
SPIKE_SKIP = {"spike": {"metric": "monitor.step/loss", "kind": "spike", "action": "skip_step"}}
DIVERGE_ROLLBACK = {
    "spike": {"metric": "monitor.step/loss", "kind": "spike", "action": "rollback", "check_on": ["every_step"]},
    "nan": {"metric": "monitor.step/loss", "kind": "nonfinite", "action": "rollback", "check_on": ["every_step"]},
}

Batch = Tuple[torch.Tensor, torch.Tensor]


def make_batches(n: int, seed: int = 0, batch_size: int = 16) -> List[Batch]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * batch_size, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [(x[i * batch_size:(i + 1) * batch_size], y[i * batch_size:(i + 1) * batch_size]) for i in range(n)]


def loader(batches: Sequence[Batch]) -> DataLoader:
    return DataLoader(list(batches), batch_size=None)  # each item is one batch, in this order


class Model(Classifier):
    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, schedule: bool = False) -> None:
        super().__init__(lr=lr)
        self.optimizer_name = optimizer
        self.schedule = schedule

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=self.lr * 0.1)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if not self.schedule:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.01 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fresh_model(**kwargs: Any) -> Model:
    pl.seed_everything(0, verbose=False)
    return Model(**kwargs)


def full_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    with torch.no_grad():
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        return float(nn.functional.cross_entropy(model(x), y))


def assert_same_training_state(a: pl.Trainer, b: pl.Trainer) -> None:
    for (name, p), (_, q) in zip(a.lightning_module.named_parameters(), b.lightning_module.named_parameters()):
        assert torch.equal(p, q), name
    sa, sb = a.optimizers[0].state_dict()["state"], b.optimizers[0].state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        for field in sa[key]:
            assert torch.equal(torch.as_tensor(sa[key][field]), torch.as_tensor(sb[key][field])), (key, field)


# -------------------------------------------------------------------------------------------- skip_step
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_skip_step_is_bit_identical_to_a_run_without_that_batch(tmp_path: Any, optimizer: str) -> None:
    data = make_batches(30)
    poisoned = list(data)
    poisoned[20] = (data[20][0] * 1e3, data[20][1])
    monitor = MetricMonitor(rules=SPIKE_SKIP, builtin_rules=False, every_n_steps=5)
    skipped = make_trainer(tmp_path / "skip", [monitor], max_steps=30)
    skipped.fit(fresh_model(optimizer=optimizer), loader(poisoned))
    reference = make_trainer(tmp_path / "ref", [], max_steps=29)
    reference.fit(fresh_model(optimizer=optimizer), loader(data[:20] + data[21:]))
    assert monitor.recovery.skipped_steps == 1
    assert [(a["rule"], a["step"], a["action"]) for a in read_alerts(str(tmp_path / "skip"))] == \
        [("spike", 20, "skip_step")]
    assert_same_training_state(skipped, reference)


def test_skip_step_with_gradient_accumulation_and_clipping(tmp_path: Any) -> None:
    data = make_batches(30)
    poisoned = list(data)
    poisoned[21] = (data[21][0] * 1e3, data[21][1])  # second micro-batch of the 11th accumulation window
    kwargs = dict(accumulate_grad_batches=2, gradient_clip_val=0.5)
    monitor = MetricMonitor(rules=SPIKE_SKIP, builtin_rules=False, every_n_steps=5)
    skipped = make_trainer(tmp_path / "skip", [monitor], max_steps=15, **kwargs)
    skipped.fit(fresh_model(optimizer="adam"), loader(poisoned))
    reference = make_trainer(tmp_path / "ref", [], max_steps=14, **kwargs)
    reference.fit(fresh_model(optimizer="adam"), loader(data[:20] + data[22:]))  # the whole window is dropped
    assert monitor.recovery.skipped_steps == 1
    assert_same_training_state(skipped, reference)


def test_skip_step_under_amp_grad_scaler(tmp_path: Any) -> None:
    from pytorch_lightning.plugins.precision import MixedPrecision

    def amp() -> List[Any]:
        return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))]

    data = make_batches(30)
    poisoned = list(data)
    poisoned[20] = (data[20][0] * 30.0, (data[20][1] + 1) % 3)  # confidently wrong: a finite spike, no overflow
    monitor = MetricMonitor(rules=SPIKE_SKIP, builtin_rules=False, every_n_steps=5)
    skipped = make_trainer(tmp_path / "skip", [monitor], max_steps=30, plugins=amp())
    skipped.fit(fresh_model(optimizer="adam"), loader(poisoned))
    reference = make_trainer(tmp_path / "ref", [], max_steps=29, plugins=amp())
    reference.fit(fresh_model(optimizer="adam"), loader(data[:20] + data[21:]))
    assert monitor.recovery.skipped_steps == 1
    (alert,) = read_alerts(str(tmp_path / "skip"))
    assert alert["value"] > 5 * monitor.rules.by_name["spike"].values[-1]  # the unscaled loss, not loss x scale
    assert_same_training_state(skipped, reference)
    assert skipped.precision_plugin.scaler.get_scale() == reference.precision_plugin.scaler.get_scale()


def test_skip_step_asked_for_after_the_update_warns_that_nothing_was_skipped(tmp_path: Any) -> None:
    class NanAt(Model):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return super().training_step((x * float("nan") if self.trainer.global_step == 4 else x, y), batch_idx)

    grads = GradientStatsMonitor(every_n_steps=5, nonfinite_action="skip_step")
    trainer = make_trainer(tmp_path, [grads], max_steps=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(NanAt(), loader(make_batches(6)))
    text = [str(w.message) for w in caught if issubclass(w.category, MonitorWarning)]
    assert any("nothing was skipped" in t and "grad_nonfinite" in t and "every_step" in t for t in text)


# --------------------------------------------------------------------------------------------- rollback
class LRSpike(pl.Callback):
    """Multiplies the learning rate by ``factor`` once, before step ``at`` (a bad hot-fix, say)."""

    def __init__(self, at: int, factor: float = 200.0) -> None:
        self.at, self.factor, self.done = at, factor, False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at and not self.done:
            self.done = True
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= self.factor


class Recorder(pl.Callback):
    """Weights after every step, with the number of rollbacks done by then (put it after MetricMonitor)."""

    def __init__(self, monitor: MetricMonitor) -> None:
        self.monitor = monitor
        self.rows: List[Tuple[int, int, Dict[str, torch.Tensor], float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.rows.append((trainer.global_step, self.monitor.recovery.rollbacks, weights,
                          trainer.optimizers[0].param_groups[0]["lr"]))


def test_rollback_restores_the_snapshot_and_the_run_recovers(tmp_path: Any) -> None:
    data = make_batches(80)
    healthy = make_trainer(tmp_path / "healthy", [], max_steps=80)
    healthy_model = fresh_model(schedule=True)
    healthy.fit(healthy_model, loader(data))
    broken = make_trainer(tmp_path / "broken", [LRSpike(at=42)], max_steps=80)
    broken_model = fresh_model(schedule=True)
    broken.fit(broken_model, loader(data))

    monitor = MetricMonitor(rules=DIVERGE_ROLLBACK, every_n_steps=5, lr_factor=0.5)
    recorder = Recorder(monitor)
    trainer = make_trainer(tmp_path / "recovered", [LRSpike(at=42), monitor, recorder], max_steps=80)
    model = fresh_model(schedule=True)
    trainer.fit(model, loader(data))

    assert monitor.recovery.rollbacks == 1 and monitor.recovery.ring.captures >= 8
    record = monitor.recovery.history[0]
    assert record.restored_step == 40  # the newest snapshot, taken at the healthy check after step 40
    before = next(w for gs, n, w, _ in recorder.rows if gs == record.restored_step and n == 0)
    gs_after, _, after, lr_after = next(row for row in recorder.rows if row[1] == 1)
    for key in before:
        assert torch.equal(before[key], after[key]), key  # restored bit for bit
    expected_lr = 0.05 / (1.0 + 0.01 * 40) * 0.5  # the snapshot's scheduled LR, halved by lr_factor
    assert lr_after == pytest.approx(expected_lr)
    assert trainer.global_step == 80  # training went on
    last_lr = trainer.optimizers[0].param_groups[0]["lr"]
    sched_step = trainer.lr_scheduler_configs[0].scheduler.last_epoch
    assert last_lr == pytest.approx(0.05 / (1.0 + 0.01 * sched_step) * 0.5)  # the factor survives the schedule

    final, reference = full_loss(model, data), full_loss(healthy_model, data)
    broken_loss = full_loss(broken_model, data)
    assert not broken_loss < 2 * reference  # without rollback the spike ruins the run (NaN or far worse)
    assert abs(final - reference) < 0.1 * reference + 0.02

    alerts = read_alerts(str(tmp_path / "recovered"))
    rollback = [a for a in alerts if a["rule"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["value"] == 40.0 and rollback[0]["subject"] in ("spike", "nan")
    assert "in-memory snapshot of step 40" in rollback[0]["message"]
    trigger = [a for a in alerts if a["rule"] in ("spike", "nan")]
    assert trigger and trigger[0]["action"] == "rollback" and trigger[0]["severity"] == "error"


def test_rollback_count_is_capped_then_training_stops(tmp_path: Any) -> None:
    class Faulty(Model):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            if self.trainer.global_step in (21, 28, 35):
                x = x * 1e3
            return super().training_step((x, y), batch_idx)

    monitor = MetricMonitor(rules=DIVERGE_ROLLBACK, every_n_steps=5, max_rollbacks=2)
    trainer = make_trainer(tmp_path, [monitor], max_steps=60)
    trainer.fit(Faulty(), loader(make_batches(60)))
    assert monitor.recovery.rollbacks == 2
    assert [r.restored_step for r in monitor.recovery.history] == [20, 25]
    alerts = read_alerts(str(tmp_path))
    assert [a["step"] for a in alerts if a["rule"] == "rollback"] == [21, 28]
    (limit,) = [a for a in alerts if a["rule"] == "rollback_limit"]
    assert limit["step"] == 35 and limit["severity"] == "critical" and limit["action"] == "stop"
    assert trainer.global_step == 36  # stopped after the step that hit the cap


def test_rollback_without_any_healthy_state_stops_and_says_why(tmp_path: Any) -> None:
    class Early(Model):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return super().training_step((x * float("nan") if self.trainer.global_step == 2 else x, y), batch_idx)

    monitor = MetricMonitor(rules=DIVERGE_ROLLBACK, every_n_steps=5)
    trainer = make_trainer(tmp_path, [monitor], max_steps=20)
    trainer.fit(Early(), loader(make_batches(20)))
    (failed,) = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "rollback_failed"]
    assert "no in-memory snapshot yet" in failed["message"] and failed["action"] == "stop"
    assert trainer.global_step == 3


class CheckpointProbe(pl.Callback):
    """At the first step after a rollback: do the weights equal the file the manifest says was restored?"""

    def __init__(self, monitor: MetricMonitor, ckpt: MetricCheckpoint) -> None:
        self.monitor, self.ckpt = monitor, ckpt
        self.result: Optional[Tuple[str, bool]] = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        if self.result is None and self.monitor.recovery.rollbacks == 1:
            with open(self.ckpt.manifest_path) as fh:
                event = json.load(fh)["events"][-1]
            saved = torch.load(event["source"], weights_only=True)["state_dict"]
            same = all(torch.equal(saved[k], v) for k, v in pl_module.state_dict().items())
            self.result = (event["source"], same)


def test_rollback_from_metric_checkpoint_is_recorded_in_alerts_and_manifest(tmp_path: Any) -> None:
    monitor = MetricMonitor(rules=DIVERGE_ROLLBACK, every_n_steps=5, lr_factor=0.5)
    ckpt = MetricCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=10, save_top_k=2)
    probe = CheckpointProbe(monitor, ckpt)
    trainer = make_trainer(tmp_path, [LRSpike(at=44), monitor, probe, ckpt], max_steps=70, enable_checkpointing=True)
    trainer.fit(fresh_model(), loader(make_batches(70)))
    assert monitor.recovery.ring.size == 0  # a MetricCheckpoint is there: no in-memory copies
    assert monitor.recovery.rollbacks == 1
    source, same = probe.result  # type: ignore[misc]
    assert source.endswith("step=40.ckpt") and same
    with open(ckpt.manifest_path) as fh:
        manifest = json.load(fh)
    (event,) = manifest["events"]
    assert event["kind"] == "rollback" and event["restored_step"] == 40 and event["lr_scale"] == 0.5
    (record,) = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "rollback"]
    assert record["step"] == event["step"] and source in record["message"]
    assert all(c["healthy"] for c in manifest["checkpoints"] if c["step"] > event["step"])


def test_resume_after_a_rollback_keeps_rule_state(tmp_path: Any) -> None:
    monitor = MetricMonitor(rules=DIVERGE_ROLLBACK, every_n_steps=5, lr_factor=0.5)
    trainer = make_trainer(tmp_path / "a", [LRSpike(at=32), monitor], max_steps=50)
    trainer.fit(fresh_model(), loader(make_batches(80)))
    assert monitor.recovery.rollbacks == 1
    path = str(tmp_path / "after_rollback.ckpt")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]["MetricMonitor"]
    assert saved["recovery"]["rollbacks"] == 1 and saved["recovery"]["lr_scale"] == 0.5
    rolled_at = monitor.recovery.history[0].step
    steps = saved["rules"]["spike"]["steps"]
    assert [s for s in steps if 30 <= s <= rolled_at] == [] and steps[-1] == 49  # forgotten, then refilled
    assert saved == monitor.state_dict()

    class Probe(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self.state = resumed.state_dict()

    resumed = MetricMonitor(rules=DIVERGE_ROLLBACK, every_n_steps=5, lr_factor=0.5)
    probe = Probe()
    trainer = make_trainer(tmp_path / "b", [resumed, probe], max_steps=60)
    trainer.fit(fresh_model(), loader(make_batches(80)), ckpt_path=path)
    assert probe.state == saved  # windows, counters, rollbacks, LR scale: all back
    assert resumed.recovery.rollbacks == 1 and trainer.global_step == 60


# -------------------------------------------------------------------------------------------------- DDP
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_one_rank_spike_same_action_on_both_and_identical_weights(tmp_path: Any) -> None:
    script = os.path.join(HERE, "scripts", "rules_ddp.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           script, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    for scenario in ("skip", "rollback", "checkpoint"):
        r0, r1 = (r[scenario] for r in results)
        assert r0["poisoned_rank"] == 1
        assert r0["actions"] == r1["actions"] != 0  # the same action on both ranks
        assert r0["final"] == r1["final"]  # identical weights at the end
        assert r0["global_step"] == r1["global_step"] == r0["max_steps"]  # no hang, no early stop
    assert results[0]["skip"]["actions"] == 1 and results[0]["rollback"]["actions"] == 1
    for scenario in ("rollback", "checkpoint"):
        r0, r1 = results[0][scenario], results[1][scenario]
        assert r0["after_rollback"] == r1["after_rollback"] == r0["snapshot"]  # both restored the same state
        assert r0["source"] == r1["source"]
        alerts = read_alerts(str(tmp_path / scenario))
        assert [a["rule"] for a in alerts if a["rule"] == "rollback"] == ["rollback"]  # written once, by rank 0
    assert results[0]["checkpoint"]["source"].endswith("step=20.ckpt")
    with open(tmp_path / "checkpoint" / "ckpt" / "manifest.json") as fh:
        assert [e["kind"] for e in json.load(fh)["events"]] == ["rollback"]


def test_the_recovery_example_recovers(tmp_path: Any, capsys: Any) -> None:
    import importlib.util

    path = os.path.join(HERE, "..", "examples", "recover_from_spike.py")
    spec = importlib.util.spec_from_file_location("recover_from_spike", path)
    example = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    runs = example.main(["--out", str(tmp_path), "--steps", "240"])
    healthy, fault, recovered = (runs[n]["loss"] for n in ("healthy", "fault", "recovered"))
    assert runs["recovered"]["monitor"].recovery.rollbacks == 1
    assert not fault < 1.5 * healthy and abs(recovered - healthy) < 0.05 * healthy
    printed = capsys.readouterr().out
    assert "rolled back after rule 'loss_spike'" in printed and "tensorboard --logdir" in printed
