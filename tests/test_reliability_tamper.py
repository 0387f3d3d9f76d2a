"""Tampering between runs: truncated, bit-flipped, deleted and replaced checkpoints (and a pickle that would
run code) at resume, at ``ckpt_path="best"`` and at rollback; damaged data profiles; a half-written last line
of ``alerts.jsonl``.

Each case must be detected with a clear error (the manifest's SHA-256 for files that still load), a rollback
must fall back to the previous checkpoint that matches its record, and nothing may be unpickled without
``weights_only=True``. ``python -m bench.reliability --part tamper`` runs this file and counts the cases.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Dict, List

import pytest
import pytorch_lightning as pl
import torch

from conftest import Classifier, make_loader, make_trainer, read_alerts
from lightwatch.callbacks import MetricCheckpoint, MonitorCallback
from lightwatch.core.checkpoint import CheckpointIntegrityError

torch.set_num_threads(1)


def checkpointing(tmp_path: Any, **kwargs: Any) -> MetricCheckpoint:
    kwargs.setdefault("every_n_train_steps", 2)
    kwargs.setdefault("save_top_k", 2)
    return MetricCheckpoint(dirpath=str(tmp_path / "ck"), monitor="train/loss", save_last=True, **kwargs)


def trained(tmp_path: Any, steps: int = 8) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [checkpointing(tmp_path)], max_steps=steps, enable_checkpointing=True,
                           limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(Classifier(), make_loader(), make_loader(seed=1))
    return trainer


def manifest(directory: str) -> Dict[str, Any]:
    with open(os.path.join(directory, "manifest.json")) as fh:
        return json.load(fh)


def flip_byte(path: str, where: float = 0.6) -> None:
    """Flip one bit in the middle of the file: inside tensor data, so ``torch.load`` still succeeds."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(int(size * where))
        byte = fh.read(1)
        fh.seek(int(size * where))
        fh.write(bytes([byte[0] ^ 0x01]))


def truncate(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def replace_with_older(path: str) -> None:
    directory = os.path.dirname(path)
    older = min((e for e in manifest(directory)["checkpoints"] if e["file"] != os.path.basename(path)),
                key=lambda e: e["step"])
    shutil.copyfile(os.path.join(directory, older["file"]), path)


class Payload:
    """Unpickling this runs code (creates the file at ``marker``)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.makedirs, (self.marker,))


def replace_with_code(path: str) -> None:
    state = torch.load(path, weights_only=True)
    state["payload"] = Payload(path + ".pwned")
    torch.save(state, path)


TAMPERINGS: Dict[str, Callable[[str], None]] = {
    "truncated": truncate,
    "bit_flipped": flip_byte,
    "deleted": os.remove,
    "replaced_by_an_older_checkpoint": replace_with_older,
    "replaced_by_a_pickle_that_runs_code": replace_with_code,
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: Any) -> str:
    """One trained run, copied for each case (the fit is the slow part)."""
    root = tmp_path_factory.mktemp("fitted")
    trained(root)
    return str(root)


def copy_run(fitted: str, tmp_path: Any) -> str:
    shutil.copytree(fitted, str(tmp_path), dirs_exist_ok=True)
    # the manifest names files relative to its directory; only the directory moved
    return str(tmp_path / "ck")


@pytest.mark.parametrize("kind", list(TAMPERINGS))
def test_a_tampered_last_checkpoint_is_refused_at_resume(fitted: str, tmp_path: Any, kind: str) -> None:
    directory = copy_run(fitted, tmp_path)
    last = os.path.join(directory, "last.ckpt")
    TAMPERINGS[kind](last)
    trainer = make_trainer(tmp_path, [checkpointing(tmp_path)], max_steps=12, enable_checkpointing=True)
    # refused before a byte of it is unpickled, even where torch.load would have read it without complaint
    with pytest.raises(CheckpointIntegrityError, match="does not match manifest.json") as info:
        trainer.fit(Classifier(), make_loader(), ckpt_path=last)
    assert not os.path.exists(last + ".pwned")
    # the message names the newest file that still matches, and resuming from it works
    good = str(info.value).split("still matches its record is ")[1].split(" (step")[0]
    again = make_trainer(tmp_path, [checkpointing(tmp_path)], max_steps=12, enable_checkpointing=True)
    again.fit(Classifier(), make_loader(), ckpt_path=good)
    assert again.global_step == 12


def test_a_pickle_that_runs_code_outside_any_manifest_is_not_unpickled(fitted: str, tmp_path: Any) -> None:
    """A file no manifest records is loaded by Lightning with torch.load's default, weights_only=True."""
    evil = str(tmp_path / "downloaded.ckpt")
    shutil.copyfile(os.path.join(fitted, "ck", "last.ckpt"), evil)
    replace_with_code(evil)
    trainer = make_trainer(tmp_path, [checkpointing(tmp_path)], max_steps=12, enable_checkpointing=True)
    with pytest.raises(Exception, match="weights_only"):
        trainer.fit(Classifier(), make_loader(), ckpt_path=evil)
    assert not os.path.exists(evil + ".pwned")


def test_a_tampered_best_checkpoint_is_refused_at_validate_best(tmp_path: Any) -> None:
    trainer = trained(tmp_path)
    flip_byte(trainer.checkpoint_callback.best_model_path)
    with pytest.raises(CheckpointIntegrityError, match="does not match manifest.json"):
        trainer.validate(Classifier(), make_loader(seed=1), ckpt_path="best")


def test_a_tampered_checkpoint_is_dropped_from_the_manifest_at_the_next_start(fitted: str, tmp_path: Any) -> None:
    directory = copy_run(fitted, tmp_path)
    victim = [e for e in manifest(directory)["checkpoints"] if e["file"] != "last.ckpt"][0]["file"]
    flip_byte(os.path.join(directory, victim))
    trainer = make_trainer(tmp_path, [checkpointing(tmp_path)], max_steps=12, enable_checkpointing=True)
    with pytest.warns(UserWarning, match=f"dropped {victim}"):
        trainer.fit(Classifier(), make_loader(), ckpt_path=os.path.join(directory, "last.ckpt"))
    assert victim not in [e["file"] for e in manifest(directory)["checkpoints"]]


def test_a_mangled_manifest_is_set_aside_with_a_warning(fitted: str, tmp_path: Any) -> None:
    directory = copy_run(fitted, tmp_path)
    with open(os.path.join(directory, "manifest.json"), "w") as fh:
        fh.write('{"version": 1, "checkpoints": [{"file": "last.ck')
    trainer = make_trainer(tmp_path, [checkpointing(tmp_path)], max_steps=12, enable_checkpointing=True)
    with pytest.warns(UserWarning, match="could not be read"):
        trainer.fit(Classifier(), make_loader(), ckpt_path=os.path.join(directory, "last.ckpt"))
    assert [n for n in os.listdir(directory) if n.startswith("manifest-unreadable")]


class RollbackAt(MonitorCallback):
    """Damages the newest healthy checkpoint with ``damage``, then asks for a rollback, at ``step``."""

    def __init__(self, step: int, damage: Callable[[str], None]) -> None:
        super().__init__(every_n_steps=1)
        self.at, self.damage = step, damage

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at:
            self.damage(trainer.checkpoint_callback.latest_healthy())
            self.raise_alert(trainer, pl_module, rule="probe", severity="error", action="rollback",
                             message="rollback probe")


@pytest.mark.parametrize("kind", ["bit_flipped", "truncated", "replaced_by_a_pickle_that_runs_code"])
def test_rollback_passes_over_a_damaged_checkpoint_to_the_previous_verified_one(tmp_path: Any, kind: str) -> None:
    pl.seed_everything(0, verbose=False)
    ck = checkpointing(tmp_path, every_n_train_steps=1, save_top_k=-1)
    damaged: List[str] = []

    def damage(path: str) -> None:
        damaged.append(path)
        TAMPERINGS[kind](path)

    trainer = make_trainer(tmp_path, [RollbackAt(6, damage), ck], max_steps=8, enable_checkpointing=True)
    trainer.fit(Classifier(), make_loader())
    (rollback,) = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "rollback"]
    restored = int(rollback["value"])
    assert damaged and os.path.basename(damaged[0]) not in rollback["message"], rollback["message"]
    assert restored < 6 and restored >= 4, rollback
    assert not os.path.exists(damaged[0] + ".pwned")


# ----------------------------------------------------------------------------------------- profiles, alerts
def profile_run(tmp_path: Any) -> str:
    from lightwatch.callbacks import DataQualityMonitor

    path = str(tmp_path / "profile.json")
    trainer = make_trainer(tmp_path, [DataQualityMonitor(every_n_steps=1, profile_path=path)], max_steps=8,
                           limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(Classifier(), make_loader(), make_loader(seed=1))
    assert os.path.exists(path)
    return path


def change_a_number(path: str) -> None:
    doc = json.load(open(path))
    moments = doc["splits"]["train"]["fields"]["x"]["moments"]
    key = next(k for k, v in moments.items() if isinstance(v, list) and v and isinstance(v[0], (int, float)))
    moments[key][0] = float(moments[key][0]) + 1.0
    with open(path, "w") as fh:
        json.dump(doc, fh)


@pytest.mark.parametrize("damage", [truncate, change_a_number], ids=["truncated", "a_number_changed"])
def test_a_damaged_reference_profile_is_an_error_at_construction(tmp_path: Any, damage: Callable[[str], None]) -> None:
    from lightwatch.callbacks import DataQualityMonitor
    from lightwatch.profile import ProfileError

    path = profile_run(tmp_path)
    damage(path)
    with pytest.raises(ProfileError, match="profile.json"):
        DataQualityMonitor(reference=path)


def test_a_half_written_last_alert_line_is_tolerated_at_resume(tmp_path: Any) -> None:
    from lightwatch.callbacks import MetricMonitor

    rules = {"always": {"metric": "train/loss", "kind": "threshold", "above": -1.0, "severity": "info"}}
    log_dir = str(tmp_path / "tb" / "version_0")
    make_trainer(tmp_path, [MetricMonitor(rules=rules, every_n_steps=1, alert_cooldown_steps=1)],
                 max_steps=4).fit(Classifier(), make_loader())
    path = os.path.join(log_dir, "alerts.jsonl")
    before = open(path).read().splitlines()
    with open(path, "a") as fh:
        fh.write('{"time": "2026-01-01T00:00:00Z", "step": 4, "rule": "alw')  # the kill came mid-write
    make_trainer(tmp_path, [MetricMonitor(rules=rules, every_n_steps=1, alert_cooldown_steps=1)],
                 max_steps=4).fit(Classifier(), make_loader())
    records = [json.loads(line) for line in open(path)]  # every line parses
    assert len(records) > len(before)


def test_a_committed_file_left_under_a_name_its_record_moved_from_is_not_refused(fitted: str, tmp_path: Any) -> None:
    """A kill right after a save's pending manifest, when the old last.ckpt was given a pinned name: last.ckpt on
    disk is the old, verified content, recorded under the pinned name; the pending record of last.ckpt is the new
    file that never got renamed. Found by the SIGKILL bench (trial 124 of 200)."""
    directory = copy_run(fitted, tmp_path)
    doc = manifest(directory)
    (last,) = [e for e in doc["checkpoints"] if e["file"] == "last.ckpt"]
    os.link(os.path.join(directory, "last.ckpt"), os.path.join(directory, "last-pinned.ckpt"))
    last["file"] = "last-pinned.ckpt"
    doc["pending"] = [dict(last, file="last.ckpt", sha256="0" * 64, bytes=last["bytes"] + 64, step=last["step"] + 1)]
    doc["last"] = None
    with open(os.path.join(directory, "manifest.json"), "w") as fh:
        json.dump(doc, fh)
    trainer = make_trainer(tmp_path, [checkpointing(tmp_path)], max_steps=12, enable_checkpointing=True)
    trainer.fit(Classifier(), make_loader(), ckpt_path=os.path.join(directory, "last.ckpt"))
    assert trainer.global_step == 12


@pytest.fixture(scope="module")
def fitted_model_checkpoint(tmp_path_factory: Any) -> str:
    """The same run with Lightning's ModelCheckpoint (top-2, last, every 2 steps), for the side-by-side row."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    root = tmp_path_factory.mktemp("fitted_mc")
    pl.seed_everything(0, verbose=False)
    ck = ModelCheckpoint(dirpath=str(root / "ck"), monitor="train/loss", save_last=True, save_top_k=2,
                         every_n_train_steps=2)
    trainer = make_trainer(root, [ck], max_steps=8, enable_checkpointing=True, limit_val_batches=2,
                           num_sanity_val_steps=0)
    trainer.fit(Classifier(), make_loader(), make_loader(seed=1))
    return str(root)


def _older_lightning_checkpoint(path: str) -> None:
    directory = os.path.dirname(path)
    older = sorted(f for f in os.listdir(directory) if f.endswith(".ckpt") and f != "last.ckpt")[0]
    shutil.copyfile(os.path.join(directory, older), path)


# What Lightning's ModelCheckpoint does with the same damage at resume (it records no hashes): a damaged file that
# still unpickles resumes silently from wrong weights or the wrong step; the others fail inside torch or fsspec.
MODEL_CHECKPOINT_OUTCOMES = {
    "truncated": "error",
    "bit_flipped": "resumed silently",
    "deleted": "error",
    "replaced_by_an_older_checkpoint": "resumed silently",
    "replaced_by_a_pickle_that_runs_code": "error",  # torch.load(weights_only=True) refuses it: nothing runs
}


@pytest.mark.parametrize("kind", list(TAMPERINGS))
def test_model_checkpoint_side_by_side(fitted_model_checkpoint: str, tmp_path: Any, kind: str) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    shutil.copytree(fitted_model_checkpoint, str(tmp_path), dirs_exist_ok=True)
    last = str(tmp_path / "ck" / "last.ckpt")
    (_older_lightning_checkpoint if kind == "replaced_by_an_older_checkpoint" else TAMPERINGS[kind])(last)
    ck = ModelCheckpoint(dirpath=str(tmp_path / "ck"), monitor="train/loss", save_last=True, save_top_k=2,
                         every_n_train_steps=2)
    trainer = make_trainer(tmp_path, [ck], max_steps=12, enable_checkpointing=True, limit_val_batches=2,
                           num_sanity_val_steps=0)
    try:
        trainer.fit(Classifier(), make_loader(), make_loader(seed=1), ckpt_path=last)
        outcome = "resumed silently"
    except Exception:  # noqa: BLE001 - whatever torch, fsspec or Lightning raise
        outcome = "error"
    assert outcome == MODEL_CHECKPOINT_OUTCOMES[kind]
    assert not os.path.exists(last + ".pwned")
