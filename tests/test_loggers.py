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


def _records(path: str) -> list:
    """Every record of a TFRecord file as (length bytes, length crc, data, data crc)."""
    import struct

    out = []
    with open(path, "rb") as fh:
        while True:
            head = fh.read(12)
            if not head:
                return out
            (length,) = struct.unpack("<Q", head[:8])
            data = fh.read(length)
            out.append((head[:8], struct.unpack("<I", head[8:])[0], data, struct.unpack("<I", fh.read(4))[0]))


def test_scalars_written_from_encoded_bytes_read_back_with_valid_checksums(tmp_path: Any, seed: int) -> None:
    """The monitors' scalars (serialized from per-tag bytes, checksummed in C) are what TensorBoard reads back,
    under a logger prefix, and every record's checksum is the one TensorBoard's own function computes."""
    import glob
    import math

    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

    from conftest import read_events, scalars
    from lightwatch.core import tensorboard_crc
    from lightwatch.core.writer import MonitorWriter

    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0, prefix="run")
    grad = GradientStatsMonitor(every_n_steps=5)
    trainer = make_trainer(tmp_path, [grad], max_steps=11, logger=logger)
    trainer.fit(Classifier(), make_loader())
    writer = MonitorWriter("extra")
    values = {"extra.x/big": 1e300, "extra.x/nan": float("nan"), "extra.x/neg": -2.5, "extra.x/ünï": 3}
    writer.write_scalars(trainer, values, step=99)
    logger.experiment.flush()

    assert tensorboard_crc.install()  # google-crc32c is a dependency: its C extension is used
    acc = read_events(logger.log_dir)
    norm = scalars(acc, "run-monitor.grad/_total/norm")
    assert sorted(norm) == [0, 4, 9] and all(v > 0 for v in norm.values())
    assert scalars(acc, "run-extra.x/big") == {99: math.inf}
    assert math.isnan(scalars(acc, "run-extra.x/nan")[99])
    assert scalars(acc, "run-extra.x/neg") == {99: -2.5} and scalars(acc, "run-extra.x/ünï") == {99: 3.0}
    # the same values are in callback_metrics, as float32 tensors
    assert float(trainer.callback_metrics["extra.x/neg"]) == -2.5
    records = [r for path in glob.glob(os.path.join(logger.log_dir, "events.out.tfevents.*")) for r in _records(path)]
    assert len(records) > 4
    for length, length_crc, data, data_crc in records:
        assert reference(length) == length_crc and reference(data) == data_crc
