"""MetricCheckpoint: which files exist, what the manifest says, and what survives failures and resumes.

Every test trains a real LightningModule with a real Trainer and checks the files on disk: names, SHA-256,
``torch.load(weights_only=True)``, ``manifest.json`` and the TensorBoard events.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO

from conftest import Classifier, make_loader, make_trainer, read_events, scalars
from lightwatch.callbacks import MetricCheckpoint
from lightwatch.callbacks.metric_checkpoint import (
    CheckpointSaveError,
    CheckpointWarning,
    collect_rng_state,
    restore_rng_state,
)
from lightwatch.core.actions import registered_actions
from lightwatch.core.atomic import (
    atomic_save,
    atomic_write_json,
    check_free_space,
    link_or_copy,
    path_size,
    sha256_path,
    temp_path_for,
)
from lightwatch.callbacks import MonitorCallback

HERE = os.path.dirname(__file__)
NAN = float("nan")


# ------------------------------------------------------------------------------------------- helpers
class Scripted(Classifier):
    """Logs scripted validation metrics: ``val/loss`` and ``val/acc`` take the value listed for each epoch."""

    def __init__(self, val_loss: Sequence[float] = (), val_acc: Sequence[float] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.val_loss = list(val_loss)
        self.val_acc = list(val_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        e = self.current_epoch
        if self.val_loss:
            self.log("val/loss", float(self.val_loss[e]))
        if self.val_acc:
            self.log("val/acc", float(self.val_acc[e]))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test/loss", torch.nn.functional.cross_entropy(self(x), y))


def fit(tmp_path: Any, callbacks: List[Any], model: Optional[pl.LightningModule] = None, epochs: int = 4,
        steps_per_epoch: int = 2, ckpt_path: Optional[str] = None, **kwargs: Any) -> pl.Trainer:
    """Train ``epochs`` epochs of ``steps_per_epoch`` steps, with one validation batch per epoch."""
    pl.seed_everything(0)
    kwargs.setdefault("max_steps", epochs * steps_per_epoch)
    trainer = make_trainer(tmp_path, callbacks, enable_checkpointing=True,
                           limit_val_batches=kwargs.pop("limit_val_batches", 1), num_sanity_val_steps=0, **kwargs)
    trainer.fit(model or Scripted(), make_loader(n=16 * steps_per_epoch), make_loader(n=16, seed=1),
                ckpt_path=ckpt_path)
    return trainer


def manifest(dirpath: str) -> Dict[str, Any]:
    with open(os.path.join(dirpath, "manifest.json")) as fh:
        return json.load(fh)


def assert_consistent(dirpath: str) -> Dict[str, Any]:
    """The manifest invariant: every file it names exists, matches size and hash, and loads weights_only."""
    doc = manifest(dirpath)
    names = [e["file"] for e in doc["checkpoints"]]
    assert len(names) == len(set(names)), names
    for e in doc["checkpoints"]:
        path = os.path.join(dirpath, e["file"])
        assert os.path.exists(path), e
        assert path_size(path) == e["bytes"], e
        assert sha256_path(path) == e["sha256"], e
        assert e["reason"] in ("top_k", "last", "threshold", "interval", "alert", "exception")
        if os.path.isfile(path):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            assert ckpt["global_step"] == e["step"]
    for key in ("best", "last"):
        assert doc[key] is None or doc[key] in names
    best = [e for e in doc["checkpoints"] if e["file"] == doc["best"]]
    if best and doc["monitor"]:
        assert best[0]["score"] is not None and np.isfinite(best[0]["score"])
    assert not [n for n in os.listdir(dirpath) if ".tmp-" in n], os.listdir(dirpath)
    return doc


def files(doc: Dict[str, Any], reason: Optional[str] = None) -> List[str]:
    return sorted(e["file"] for e in doc["checkpoints"] if reason is None or e["reason"] == reason)


class AlertAt(MonitorCallback):
    """Raises one alert per listed step (the logging step), with the given action and severity."""

    def __init__(self, steps: Dict[int, str], action: str = "checkpoint", rule: str = "probe") -> None:
        super().__init__(every_n_steps=1, alert_cooldown_steps=0)
        self.steps = steps
        self.action = action
        self.rule = rule

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # after the optimizer step: 1 at the end of the first batch
        if step in self.steps:
            self.raise_alert(trainer, pl_module, rule=self.rule, severity=self.steps[step], action=self.action,
                             message=f"probe alert at step {step}", value=float(step))


class FullDiskIO(TorchCheckpointIO):
    """Fault injection at the file-write layer: the ``fail_at``-th save writes ``limit`` bytes, then ENOSPC."""

    def __init__(self, fail_at: int, limit: int = 4096) -> None:
        super().__init__()
        self.fail_at, self.limit, self.calls = fail_at, limit, 0

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.calls += 1
        if self.calls != self.fail_at:
            return super().save_checkpoint(checkpoint, path, storage_options)
        import io

        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        with open(path, "wb") as fh:
            fh.write(buf.getvalue()[: self.limit])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


# ------------------------------------------------------------------------------------- triggers
def test_top_k_keeps_exactly_the_best_files_and_nan_is_never_saved(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, monitor="val/loss", save_top_k=2, filename="{epoch}-{val/loss:.2f}")
    # epoch:      0    1    2    3    4    5
    losses = [5.0, 3.0, 4.0, 1.0, NAN, 2.0]
    trainer = fit(tmp_path, [ck], Scripted(val_loss=losses), epochs=6)

    doc = assert_consistent(d)
    # top-2 over the finite values: epoch 3 (1.0) and epoch 5 (2.0); the "/" never made a sub-directory.
    assert files(doc) == ["epoch=3-val_loss=1.00.ckpt", "epoch=5-val_loss=2.00.ckpt"]
    assert sorted(os.listdir(d)) == ["epoch=3-val_loss=1.00.ckpt", "epoch=5-val_loss=2.00.ckpt", "manifest.json"]
    assert [(e["step"], e["epoch"], e["score"], e["reason"]) for e in doc["checkpoints"]] == [
        (8, 3, 1.0, "top_k"), (12, 5, 2.0, "top_k")]
    assert doc["best"] == "epoch=3-val_loss=1.00.ckpt" and doc["monitor"] == "val/loss" and doc["mode"] == "min"
    assert all(e["metrics"]["val/loss"] == e["score"] for e in doc["checkpoints"])
    assert doc["checkpoints"][0]["healthy"] is True and doc["checkpoints"][0]["time"].endswith("+00:00")

    # The Lightning-compatible view agrees with the manifest.
    assert ck.best_model_path == os.path.join(d, "epoch=3-val_loss=1.00.ckpt")
    assert ck.best_model_score.item() == 1.0
    assert ck.kth_best_model_path == os.path.join(d, "epoch=5-val_loss=2.00.ckpt") and ck.kth_value.item() == 2.0
    assert {os.path.basename(k): v.item() for k, v in ck.best_k_models.items()} == {
        "epoch=3-val_loss=1.00.ckpt": 1.0, "epoch=5-val_loss=2.00.ckpt": 2.0}
    assert trainer.checkpoint_callback is ck  # no default ModelCheckpoint was added
    assert not [cb for cb in trainer.callbacks if type(cb).__name__ == "ModelCheckpoint"]

    # The NaN epoch was reported, not saved.
    alerts = [json.loads(line) for line in open(glob.glob(str(tmp_path / "**" / "alerts.jsonl"), recursive=True)[0])]
    assert [a["step"] for a in alerts if a["rule"] == "checkpoint_monitor_nonfinite"] == [10]

    # TensorBoard: monitor.ckpt/<name>/best and /saves at every save, on the self.log step axis.
    acc = read_events(str(tmp_path / "tb" / "version_0"))
    assert scalars(acc, "monitor.ckpt/MetricCheckpoint/best") == {2: 5.0, 4: 3.0, 6: 3.0, 8: 1.0, 12: 1.0}
    assert scalars(acc, "monitor.ckpt/MetricCheckpoint/saves") == {2: 1.0, 4: 2.0, 6: 3.0, 8: 4.0, 12: 5.0}


def test_nan_while_fewer_than_k_is_not_saved_and_never_best(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, monitor="val/acc", mode="max", save_top_k=3)
    fit(tmp_path, [ck], Scripted(val_acc=[NAN, float("inf"), 0.4, NAN]), epochs=4)
    doc = assert_consistent(d)
    # ModelCheckpoint saves NaN as +-inf while it has fewer than k files; MetricCheckpoint saves only 0.4.
    assert files(doc) == ["epoch=2-step=6.ckpt"]
    assert ck.best_model_score.item() == pytest.approx(0.4) and doc["best"] == "epoch=2-step=6.ckpt"


def test_threshold_saves_once_per_crossing(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, save_top_k=0, filename="{epoch}-{val/acc:.2f}",
                          thresholds={"acc90": {"metric": "val/acc", "above": 0.9},
                                      "low": {"metric": "val/acc", "below": 0.5}})
    #            epoch: 0    1     2     3    4     5
    fit(tmp_path, [ck], Scripted(val_acc=[0.6, 0.95, 0.97, 0.8, 0.9, 0.4]), epochs=6)
    doc = assert_consistent(d)
    # Above 0.9 at epochs 1 (crossing), 2 (still above: no save), 4 (crossed again; >= is inclusive).
    assert files(doc) == ["threshold-acc90-epoch=1-val_acc=0.95.ckpt", "threshold-acc90-epoch=4-val_acc=0.90.ckpt",
                          "threshold-low-epoch=5-val_acc=0.40.ckpt"]
    first = doc["checkpoints"][0]
    assert first["reason"] == "threshold" and first["threshold"] == "acc90" and first["value"] == pytest.approx(0.95)
    assert first["bound"] == 0.9 and first["metric"] == "val/acc" and first["score"] is None
    assert doc["best"] is None and ck.best_model_path == ""


def test_intervals_keep_the_newest_and_last_is_never_stale(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, every_n_train_steps=5, save_top_k=2, save_last=True)
    fit(tmp_path, [ck], epochs=6, steps_per_epoch=4, max_steps=23)
    doc = assert_consistent(d)
    # Interval checks at steps 5, 10, 15, 20 keep the two newest; last.ckpt is refreshed at the end (step 23).
    assert files(doc, "interval") == ["epoch=3-step=15.ckpt", "epoch=4-step=20.ckpt"]
    assert files(doc, "last") == ["last.ckpt"]
    assert torch.load(os.path.join(d, "last.ckpt"), weights_only=True)["global_step"] == 23
    assert doc["last"] == "last.ckpt" and doc["best"] == "epoch=4-step=20.ckpt"  # newest without monitor
    assert ck.last_model_path == os.path.join(d, "last.ckpt")
    # Several reasons at one step share one write: last.ckpt at step 20 was a hard link of the interval file.
    assert sorted(os.listdir(d)) == ["epoch=3-step=15.ckpt", "epoch=4-step=20.ckpt", "last.ckpt", "manifest.json"]


def test_last_follows_training_when_the_metric_stops_improving(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, monitor="val/loss", save_top_k=1, save_last=True)
    fit(tmp_path, [ck], Scripted(val_loss=[1.0, 2.0, 3.0, 4.0]), epochs=4)
    doc = assert_consistent(d)
    assert files(doc) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    last = [e for e in doc["checkpoints"] if e["reason"] == "last"][0]
    assert last["step"] == 8  # ModelCheckpoint leaves last.ckpt at step 2 here (its top-k did not save)


def test_alert_checkpoints_at_the_end_of_the_step_with_cooldown_and_health(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, save_top_k=0, alert_save_cooldown_steps=5, keep_alert_checkpoints=2)
    probe = AlertAt({3: "warning", 5: "error", 9: "error", 14: "warning"})
    fit(tmp_path, [probe, ck], epochs=4, steps_per_epoch=4)
    doc = assert_consistent(d)
    # Requests at 3, 5 (cooldown: skipped), 9, 14; the two newest are kept.
    assert files(doc) == ["alert-probe-epoch=2-step=9.ckpt", "alert-probe-epoch=3-step=14.ckpt"]
    by_step = {e["step"]: e for e in doc["checkpoints"]}
    # Saved at the end of the very step that raised: the optimizer step is complete (global_step matches).
    assert torch.load(os.path.join(d, by_step[9]["file"]), weights_only=True)["global_step"] == 9
    assert by_step[9]["alert"]["rule"] == "probe" and by_step[9]["alert"]["severity"] == "error"
    # Healthy: the save at 9 follows errors (5, 9); the save at 14 follows only a warning.
    assert by_step[9]["healthy"] is False and by_step[14]["healthy"] is True
    assert ck.latest_healthy() == os.path.join(d, "alert-probe-epoch=3-step=14.ckpt")
    assert "checkpoint" in registered_actions() and registered_actions()["checkpoint"].changes_control_flow


def test_alert_request_waits_for_the_end_of_gradient_accumulation(tmp_path: Any) -> None:
    class AlertOnBatch(MonitorCallback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 2:  # the first batch of the second accumulation window
                self.raise_alert(trainer, pl_module, rule="mid_window", severity="warning", action="checkpoint",
                                 message="mid accumulation")

    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, save_top_k=0)
    fit(tmp_path, [AlertOnBatch(every_n_steps=1), ck], epochs=1, steps_per_epoch=8, max_steps=4,
        accumulate_grad_batches=2)
    doc = assert_consistent(d)
    # Batch 2 ends inside the window (global step 1); the save happens after batch 3's optimizer step.
    assert [(e["reason"], e["step"]) for e in doc["checkpoints"]] == [("alert", 2)]


def test_checkpoint_action_without_metric_checkpoint_warns_once(tmp_path: Any) -> None:
    probe = AlertAt({2: "warning", 4: "warning"}, rule="no_ckpt")
    with pytest.warns(CheckpointWarning, match="no MetricCheckpoint") as record:
        trainer = make_trainer(tmp_path, [probe], max_steps=6)
        trainer.fit(Classifier(), make_loader())
    assert len([w for w in record if "no MetricCheckpoint" in str(w.message)]) == 1


def test_request_save_rejects_unknown_reasons() -> None:
    with pytest.raises(ValueError, match="reason must be one of"):
        MetricCheckpoint().request_save("top_k")


def test_healthy_rollback_point_is_pinned_until_a_newer_healthy_one(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, save_top_k=0, save_last=True, every_n_train_steps=4)
    seen: Dict[int, Optional[str]] = {}
    steps: Dict[int, int] = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:  # after the previous step's saves
            path = seen[trainer.global_step] = ck.latest_healthy()
            if path:
                steps[trainer.global_step] = torch.load(path, weights_only=True)["global_step"]

    # An error (action log) at step 6: last.ckpt@8 is unhealthy, so last.ckpt@4 survives as a pinned copy.
    fit(tmp_path, [AlertAt({6: "error"}, action="log"), ck, Watch()], epochs=3, steps_per_epoch=4, max_steps=12)
    assert seen[3] is None and os.path.basename(seen[4]) == "last.ckpt"
    assert os.path.basename(seen[8]) == "last-healthy.ckpt"
    assert steps[5] == 4 and steps[8] == 4  # the pinned copy is the state of step 4
    # The save at 12 is healthy again: the pinned copy is released and deleted.
    doc = assert_consistent(d)
    assert files(doc) == ["last.ckpt"] and doc["checkpoints"][0]["healthy"] is True
    assert ck.latest_healthy() == os.path.join(d, "last.ckpt")
    assert sorted(os.listdir(d)) == ["last.ckpt", "manifest.json"]


# ------------------------------------------------------------------------------------- resume
def test_resume_restores_top_k_best_and_thresholds_then_keeps_ranking(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    losses = [5.0, 3.0, 4.0, 1.0, 0.5, 6.0]
    thresholds = {"good": {"metric": "val/loss", "below": 2.0}}
    ck = MetricCheckpoint(dirpath=d, monitor="val/loss", save_top_k=2, save_last=True, thresholds=thresholds)
    fit(tmp_path, [ck], Scripted(val_loss=losses), epochs=4)  # stops after epoch 3
    before = assert_consistent(d)
    assert files(before, "top_k") == ["epoch=1-step=4.ckpt", "epoch=3-step=8.ckpt"]
    assert files(before, "threshold") == ["threshold-good-epoch=3-step=8.ckpt"]

    restored: Dict[str, Any] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            cb = trainer.checkpoint_callback
            restored.update(best=cb.best_model_path, score=cb.best_model_score.item(), kth=cb.kth_value.item(),
                            last=cb.last_model_path, armed=dict(cb._armed))

    ck2 = MetricCheckpoint(dirpath=d, monitor="val/loss", save_top_k=2, save_last=True, thresholds=thresholds)
    fit(tmp_path, [ck2, Probe()], Scripted(val_loss=losses), epochs=6, ckpt_path=os.path.join(d, "last.ckpt"))
    assert restored == {"best": os.path.join(d, "epoch=3-step=8.ckpt"), "score": 1.0, "kth": 3.0,
                        "last": os.path.join(d, "last.ckpt"), "armed": {"good": False}}
    doc = assert_consistent(d)
    # Epoch 4 (0.5) displaced epoch 1 (3.0); epoch 5 (6.0) was not saved; the threshold did not fire again.
    assert files(doc, "top_k") == ["epoch=3-step=8.ckpt", "epoch=4-step=10.ckpt"]
    assert files(doc, "threshold") == ["threshold-good-epoch=3-step=8.ckpt"]
    assert doc["best"] == "epoch=4-step=10.ckpt" and ck2.best_model_score.item() == 0.5
    assert doc["run"] == before["run"]
    assert torch.load(os.path.join(d, "last.ckpt"), weights_only=True)["global_step"] == 12


def test_tampered_and_missing_files_are_dropped_on_resume(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    losses = [3.0, 1.0, 2.0, 5.0, 5.0]
    fit(tmp_path, [MetricCheckpoint(dirpath=d, monitor="val/loss", save_top_k=3, save_last=True)],
        Scripted(val_loss=losses), epochs=3)
    doc = assert_consistent(d)
    assert doc["best"] == "epoch=1-step=4.ckpt"
    with open(os.path.join(d, "epoch=1-step=4.ckpt"), "r+b") as fh:  # same size, one byte changed
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.remove(os.path.join(d, "epoch=0-step=2.ckpt"))

    ck = MetricCheckpoint(dirpath=d, monitor="val/loss", save_top_k=3, save_last=True)
    with pytest.warns(CheckpointWarning) as record:
        fit(tmp_path, [ck], Scripted(val_loss=losses), epochs=4, ckpt_path=os.path.join(d, "last.ckpt"))
    messages = " ".join(str(w.message) for w in record)
    assert "epoch=1-step=4.ckpt" in messages and "SHA-256 does not match" in messages
    assert "epoch=0-step=2.ckpt" in messages and "missing" in messages
    doc = assert_consistent(d)
    assert files(doc, "top_k") == ["epoch=2-step=6.ckpt", "epoch=3-step=8.ckpt"]
    assert doc["best"] == "epoch=2-step=6.ckpt" and ck.best_model_score.item() == 2.0
    assert os.path.exists(os.path.join(d, "epoch=1-step=4.ckpt"))  # left on disk for inspection, not tracked


def test_fresh_run_in_a_used_directory_keeps_the_old_files(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    fit(tmp_path, [MetricCheckpoint(dirpath=d, save_top_k=-1)], epochs=2)
    old = manifest(d)
    ck = MetricCheckpoint(dirpath=d, save_top_k=-1)
    with pytest.warns(CheckpointWarning, match="earlier run"):
        fit(tmp_path, [ck], epochs=2)
    doc = assert_consistent(d)
    assert doc["run"] != old["run"]
    # The old names were taken, so the new files got versioned names; the old files and record are kept.
    assert files(doc) == ["epoch=0-step=2-v1.ckpt", "epoch=1-step=4-v1.ckpt"]
    assert os.path.exists(os.path.join(d, f"manifest-{old['run'][:8]}.json"))
    assert all(os.path.exists(os.path.join(d, e["file"])) for e in old["checkpoints"])


def test_trainer_test_with_best_loads_the_best_file(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, monitor="val/loss", save_top_k=2, save_last=True)
    trainer = fit(tmp_path, [ck], Scripted(val_loss=[4.0, 2.0, 3.0, 5.0]), epochs=4)
    model = Scripted()
    trainer.test(model, make_loader(n=16), ckpt_path="best", verbose=False)
    best = os.path.join(d, "epoch=1-step=4.ckpt")
    assert trainer.ckpt_path == best
    saved = torch.load(best, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    last = torch.load(os.path.join(d, "last.ckpt"), weights_only=True)["state_dict"]
    assert not all(torch.equal(last[k], saved[k]) for k in saved)  # really a different file from last


# ------------------------------------------------------------------------------------ content
def test_every_checkpoint_carries_rng_states_that_restore_weights_only(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, save_top_k=1, every_n_train_steps=3)
    fit(tmp_path, [ck], epochs=1, steps_per_epoch=4, max_steps=3)
    ckpt = torch.load(ck.best_model_path, map_location="cpu", weights_only=True)
    rng = ckpt["lightwatch"]["rng"]
    assert isinstance(rng["torch"], torch.Tensor) and isinstance(rng["numpy"]["keys"], torch.Tensor)
    assert set(rng) >= {"torch", "numpy", "python"}

    restore_rng_state(rng)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng_state(rng)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    # The state object itself is weights_only-safe on its own.
    path = str(tmp_path / "rng.pt")
    torch.save(collect_rng_state(), path)
    assert set(torch.load(path, weights_only=True)) >= {"torch", "numpy", "python"}


def test_verify_and_torchscript_export_of_each_new_best(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")

    class WithExample(Scripted):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.example_input_array = torch.zeros(2, 8)

    ck = MetricCheckpoint(dirpath=d, monitor="val/loss", verify=True, export="torchscript")
    model = WithExample(val_loss=[3.0, 1.0, 2.0])
    fit(tmp_path, [ck], model, epochs=3)
    doc = assert_consistent(d)
    export = doc["export"]
    assert export["format"] == "torchscript" and export["source"] == "epoch=1-step=4.ckpt" and export["step"] == 4
    assert sha256_path(os.path.join(d, "best.pt")) == export["sha256"]
    scripted = torch.jit.load(os.path.join(d, "best.pt"))
    best_model = WithExample()
    best_model.load_state_dict(torch.load(ck.best_model_path, weights_only=True)["state_dict"])
    x = torch.randn(4, 8)
    assert torch.allclose(scripted(x), best_model(x))


def test_directory_checkpoints_are_committed_by_rename(tmp_path: Any) -> None:
    class ShardedIO(TorchCheckpointIO):
        """Writes a directory per checkpoint, as sharded strategies do (one file per part)."""

        def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Any = None) -> None:
            os.makedirs(path)
            torch.save(checkpoint["state_dict"], os.path.join(path, "model.pt"))
            torch.save({k: v for k, v in checkpoint.items() if k != "state_dict"}, os.path.join(path, "meta.pt"))

    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, monitor="val/loss", save_top_k=1, save_last=True)
    fit(tmp_path, [ck], Scripted(val_loss=[2.0, 1.0, 3.0]), epochs=3, plugins=[ShardedIO()])
    doc = assert_consistent(d)
    assert files(doc) == ["epoch=1-step=4.ckpt", "last.ckpt"]
    assert sorted(os.listdir(os.path.join(d, "last.ckpt"))) == ["meta.pt", "model.pt"]
    meta = torch.load(os.path.join(d, "last.ckpt", "meta.pt"), weights_only=True)
    assert meta["global_step"] == 6  # last.ckpt (a directory) was replaced twice, atomically


def test_exception_checkpoint_is_saved_and_unhealthy(tmp_path: Any) -> None:
    class Boom(Scripted):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if self.global_step == 5:
                raise RuntimeError("data loader exploded")
            return super().training_step(batch, batch_idx)

    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, save_top_k=0, save_on_exception=True)
    with pytest.raises(RuntimeError, match="exploded"):
        fit(tmp_path, [ck], Boom(), epochs=4)
    doc = assert_consistent(d)
    (entry,) = doc["checkpoints"]
    assert entry["file"] == "exception-epoch=2-step=5.ckpt" and entry["reason"] == "exception"
    assert entry["healthy"] is False and "exploded" in entry["error"]


def test_record_event_appends_to_the_manifest(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, save_top_k=1)

    class Rollback(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 3:
                ck.record_event("rollback", restored="x.ckpt", reason="loss spike")

    fit(tmp_path, [ck, Rollback()], epochs=2)
    events = manifest(d)["events"]
    assert len(events) == 1 and events[0]["kind"] == "rollback" and events[0]["step"] == 3
    assert events[0]["restored"] == "x.ckpt" and events[0]["reason"] == "loss spike"


def test_bad_arguments_say_what_and_how() -> None:
    with pytest.raises(ValueError, match="path separator"):
        MetricCheckpoint(filename="runs/{epoch}")
    with pytest.raises(ValueError, match="exactly one of 'above'"):
        MetricCheckpoint(thresholds={"t": {"metric": "val/acc"}})
    with pytest.raises(ValueError, match="mode must be"):
        MetricCheckpoint(mode="best")
    with pytest.raises(ValueError, match="save_top_k"):
        MetricCheckpoint(save_top_k=-2)
    with pytest.raises(ValueError, match="local filesystem"):
        MetricCheckpoint(dirpath="s3://bucket/ckpt")
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"acc": {"metric": "val/acc", "above": 0.9}})
    assert MetricCheckpoint(thresholds=cfg).thresholds == {"acc": {"metric": "val/acc", "kind": "above", "bound": 0.9}}


# ---------------------------------------------------------------------------------- write failures
def test_disk_full_during_a_save_keeps_every_earlier_checkpoint(tmp_path: Any) -> None:
    d = str(tmp_path / "ck")
    ck = MetricCheckpoint(dirpath=d, monitor="val/loss", save_top_k=1, save_last=True)
    # Saves: epoch 0 (top_k+last share one write), epoch 1 (same), epoch 2 fails after 4 KiB.
    with pytest.raises(CheckpointSaveError) as info:
        fit(tmp_path, [ck], Scripted(val_loss=[3.0, 2.0, 1.0, 0.5]), epochs=4, plugins=[FullDiskIO(fail_at=3)])
    err = info.value
    assert err.errno == errno.ENOSPC and "No space left on device on rank 0" in str(err)
    assert "epoch=2-step=6.ckpt" in str(err) and "intact" in str(err) and "Free disk space" in str(err)
    assert isinstance(err.__cause__, OSError)
    doc = assert_consistent(d)  # also: no partial temporary left behind
    assert files(doc) == ["epoch=1-step=4.ckpt", "last.ckpt"]
    assert doc["best"] == "epoch=1-step=4.ckpt"
    assert ck.best_model_path == os.path.join(d, "epoch=1-step=4.ckpt") and os.path.exists(ck.best_model_path)
    assert ck.best_model_score.item() == 2.0
    assert torch.load(ck.last_model_path, weights_only=True)["global_step"] == 4


def test_free_space_is_checked_before_writing(tmp_path: Any) -> None:
    with pytest.raises(OSError) as info:
        check_free_space(str(tmp_path), 1 << 60, "a huge checkpoint")
    assert info.value.errno == errno.ENOSPC and "a huge checkpoint" in str(info.value)


def torchrun(script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(HERE, "scripts", script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.ddp
def test_ddp_disk_full_raises_the_same_error_on_every_rank_without_hanging(tmp_path: Any) -> None:
    proc = torchrun("ckpt_ddp_disk_full.py", str(tmp_path))
    out = {r: json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Both ranks raised CheckpointSaveError with the same message, at the same step.
    assert out[0]["error"] == "CheckpointSaveError" and out[1]["error"] == "CheckpointSaveError"
    assert out[0]["message"] == out[1]["message"] and out[0]["errno"] == out[1]["errno"] == errno.ENOSPC
    assert "on rank 0" in out[0]["message"]
    # The monitored value differed per rank (logged without sync_dist): rank 0's decided, identically.
    assert out[0]["best"] == out[1]["best"] and out[0]["best"].endswith("epoch=1-step=4.ckpt")
    assert out[0]["healthy"] == out[1]["healthy"]
    doc = assert_consistent(str(tmp_path / "ck"))
    assert files(doc) == ["epoch=1-step=4.ckpt", "last.ckpt"]


# ------------------------------------------------------------------------------------ atomic helpers
def test_atomic_helpers_leave_the_old_version_on_failure(tmp_path: Any) -> None:
    path = str(tmp_path / "profile.json")
    atomic_write_json(path, {"a": 1})
    with pytest.raises(ValueError):
        atomic_write_json(path, {"a": float("nan")})  # JSON cannot hold NaN: refused before anything is written

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write('{"a": 2')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_save(half_then_fail, path)
    assert json.load(open(path)) == {"a": 1}
    assert os.listdir(tmp_path) == ["profile.json"]

    # Directories: a non-empty directory is replaced as a whole.
    final = str(tmp_path / "shards")
    for content in ("one", "two"):
        def write_dir(tmp: str, content: str = content) -> None:
            os.makedirs(tmp)
            for i in range(2):
                with open(os.path.join(tmp, f"part{i}"), "w") as fh:
                    fh.write(content)

        atomic_save(write_dir, final)
    assert sorted(os.listdir(final)) == ["part0", "part1"] and open(os.path.join(final, "part0")).read() == "two"
    assert sorted(os.listdir(tmp_path)) == ["profile.json", "shards"]
    digest = sha256_path(final)
    with open(os.path.join(final, "part1"), "a") as fh:
        fh.write("!")
    assert sha256_path(final) != digest

    link_or_copy(path, str(tmp_path / "copy.json"))
    assert json.load(open(tmp_path / "copy.json")) == {"a": 1}
    assert os.path.basename(temp_path_for("/x/last.ckpt", "t")) == ".last.ckpt.tmp-t"
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == sha256_path(path)


def test_the_saved_state_keeps_its_keys_and_their_order() -> None:
    ck = MetricCheckpoint(monitor="val/loss", every_n_train_steps=3, thresholds={"t": {"metric": "acc", "above": 1}})
    state = ck.state_dict()
    assert list(state) == ["version", "run", "dirpath", "monitor", "seq", "saves", "entries", "errors_since_save",
                           "armed", "last_check_step", "last_epoch_checked", "last_alert_save_step",
                           "best_model_path", "best_model_score", "last_model_path"]
    assert (state["monitor"], state["armed"], state["best_model_path"], state["best_model_score"]) == (
        "val/loss", {"t": True}, "", None)
    assert ck._value_keys == ["acc", "val/loss"]
