"""Scalars reach every logger the Trainer has (TensorBoard and CSV are in test_core.py), and no logger at all
is fine: alerts.jsonl then goes to ``default_root_dir``."""
from __future__ import annotations

import json
import os
from typing import Any

import pytest

from conftest import Classifier, make_loader, make_trainer, read_alerts
from lightwatch import (ActivationStatsMonitor, DataQualityMonitor, GradientStatsMonitor, MetricCheckpoint,
                        MetricMonitor)


def every_callback(tmp_path: Any) -> list:
    return [GradientStatsMonitor(every_n_steps=5), ActivationStatsMonitor(every_n_steps=5),
            DataQualityMonitor(scan_before_fit=4), MetricMonitor(every_n_steps=5),
            MetricCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="train/loss", every_n_train_steps=10)]


class NaNAt(Classifier):
    """A NaN loss at step 12: an alert that must be written somewhere even without a logger."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 12 else loss


def test_no_logger_at_all(tmp_path: Any, seed: int) -> None:
    trainer = make_trainer(tmp_path, every_callback(tmp_path), max_steps=20, logger=False, enable_checkpointing=True)
    trainer.fit(NaNAt(), make_loader(n=256))
    alerts = read_alerts(str(tmp_path))  # alerts.jsonl in default_root_dir
    assert "loss_nonfinite" in {a["rule"] for a in alerts if a["severity"] == "error"}
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["checkpoints"] and all(os.path.exists(tmp_path / "ckpt" / e["file"])
                                           for e in manifest["checkpoints"])


def test_scalars_reach_mlflow_with_a_local_store(tmp_path: Any, seed: int, monkeypatch: Any) -> None:
    pytest.importorskip("mlflow")
    from pytorch_lightning.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind a switch
    store = tmp_path / "mlruns"
    logger = MLFlowLogger(experiment_name="lightwatch", tracking_uri=f"file:{store}")
    trainer = make_trainer(tmp_path, [GradientStatsMonitor(every_n_steps=5), MetricMonitor(every_n_steps=5)],
                           max_steps=10, logger=[logger])
    trainer.fit(Classifier(), make_loader())
    metrics = store / logger.experiment_id / logger.run_id / "metrics"
    norm = metrics / "monitor.grad" / "_total" / "norm"
    steps = [int(line.split()[2]) for line in norm.read_text().splitlines()]
    assert steps == [0, 4, 9]  # step 0 (the model as initialised), then every 5 steps
    assert (metrics / "monitor.diag").is_dir()


def test_callbacks_reused_across_fits_as_in_a_notebook(tmp_path: Any, seed: int) -> None:
    # an interactive session: the same callbacks in a second Trainer, and a second fit on the same Trainer
    callbacks = every_callback(tmp_path)
    model = Classifier()
    first = make_trainer(tmp_path / "a", callbacks, max_steps=10, enable_checkpointing=True)
    first.fit(model, make_loader(n=256))
    second = make_trainer(tmp_path / "b", callbacks, max_steps=20, enable_checkpointing=True)
    second.fit(model, make_loader(n=256))
    second.fit_loop.epoch_loop.max_steps = 30
    second.fit(model, make_loader(n=256))
    assert second.global_step == 30
    from conftest import read_events, scalars

    steps = sorted(scalars(read_events(str(tmp_path / "b" / "tb" / "version_0")), "monitor.grad/_total/norm"))
    assert steps[-1] == 29 and 14 in steps  # the monitors kept sampling through both fits    assert not [a for a in read_alerts(str(tmp_path / "b" / "tb" / "version_0")) if a["severity"] != "info"]
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert all(os.path.exists(tmp_path / "ckpt" / e["file"]) for e in manifest["checkpoints"])
