"""A catalog of bad input, each case a test: what a user gets for a wrong argument, a malformed override or
bad data during fit.

Arguments fail at construction with a ``ValueError`` (or ``TypeError``) that names the argument; bad data
during fit gives an alert naming the field and the step (the run goes on, or stops as configured), never a
crash inside lightwatch; a crash the data causes (a label out of range) is explained by an alert written to
``alerts.jsonl`` before the error propagates. ``python -m bench.reliability --part catalog`` runs this file and
counts the cases.
"""
from __future__ import annotations

import dataclasses
import os
from collections import namedtuple
from typing import Any, Callable, Dict, List

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import Classifier, make_loader, make_trainer, read_alerts
from lightwatch.callbacks import (
    ActivationStatsMonitor,
    DataQualityMonitor,
    GradientStatsMonitor,
    MetricCheckpoint,
    MetricMonitor,
)

# ----------------------------------------------------------------------------------------- arguments
# (case id, constructor call, exception type, words the message must contain)
ARGUMENT_CASES: List[Any] = [
    ("grad_negative_interval", lambda d: GradientStatsMonitor(every_n_steps=-1), ValueError, ["every_n_steps"]),
    ("act_zero_interval", lambda d: ActivationStatsMonitor(every_n_steps=0), ValueError, ["every_n_steps"]),
    ("data_negative_interval", lambda d: DataQualityMonitor(every_n_steps=-5), ValueError, ["every_n_steps"]),
    ("rules_negative_interval", lambda d: MetricMonitor(every_n_steps=-1), ValueError, ["every_n_steps"]),
    ("rule_unknown_kind", lambda d: MetricMonitor(rules={"r": {"metric": "val/loss", "kind": "spiky"}}),
     ValueError, ["'r'", "spiky"]),
    ("rule_unknown_action", lambda d: MetricMonitor(rules={"r": {"metric": "val/loss", "kind": "nonfinite",
                                                                 "action": "explode"}}),
     ValueError, ["'r'", "explode"]),
    ("rule_unknown_severity", lambda d: MetricMonitor(rules={"r": {"metric": "val/loss", "kind": "nonfinite",
                                                                   "severity": "fatal"}}),
     ValueError, ["fatal"]),
    ("rule_threshold_without_bound", lambda d: MetricMonitor(rules={"r": {"metric": "val/loss",
                                                                          "kind": "threshold"}}),
     ValueError, ["'r'", "above"]),
    ("rule_without_metric", lambda d: MetricMonitor(rules={"r": {"kind": "plateau"}}), ValueError, ["metric"]),
    ("grad_unknown_action", lambda d: GradientStatsMonitor(nonfinite_action="explode"), ValueError, ["explode"]),
    ("ckpt_mode_maxx", lambda d: MetricCheckpoint(monitor="val/loss", mode="maxx"), ValueError, ["mode", "maxx"]),
    ("ckpt_negative_top_k", lambda d: MetricCheckpoint(save_top_k=-2), ValueError, ["save_top_k"]),
    ("ckpt_negative_interval", lambda d: MetricCheckpoint(every_n_train_steps=-1), ValueError,
     ["every_n_train_steps"]),
    ("ckpt_unknown_export", lambda d: MetricCheckpoint(export="pdf"), ValueError, ["export", "pdf"]),
    ("ckpt_threshold_without_bound", lambda d: MetricCheckpoint(thresholds={"t": {"metric": "val/acc"}}),
     ValueError, ["'t'", "above"]),
    ("ckpt_filename_with_separator", lambda d: MetricCheckpoint(filename="sub/{epoch}"), ValueError,
     ["filename", "separator"]),
    ("ckpt_remote_dirpath", lambda d: MetricCheckpoint(dirpath="s3://bucket/run"), ValueError,
     ["s3://bucket/run", "local"]),
    ("ckpt_dirpath_is_a_file", lambda d: MetricCheckpoint(dirpath=_a_file(d)), ValueError,
     ["dirpath", "not a directory"]),
    ("ckpt_dirpath_under_a_file", lambda d: MetricCheckpoint(dirpath=os.path.join(_a_file(d), "ck")), ValueError,
     ["dirpath", "not a directory"]),
    ("data_missing_reference", lambda d: DataQualityMonitor(reference=os.path.join(d, "nope.json")),
     (ValueError, OSError), ["nope.json"]),
    ("data_corrupt_reference", lambda d: DataQualityMonitor(reference=_a_file(d, "{not json")),
     ValueError, ["ref"]),
]


def _a_file(directory: str, text: str = "x") -> str:
    path = os.path.join(directory, "ref")
    with open(path, "w") as fh:
        fh.write(text)
    return path


@pytest.mark.parametrize("case,build,error,needles", ARGUMENT_CASES, ids=[c[0] for c in ARGUMENT_CASES])
def test_a_bad_argument_fails_at_construction_naming_it(tmp_path: Any, case: str, build: Callable[[str], Any],
                                                        error: Any, needles: List[str]) -> None:
    with pytest.raises(error) as info:
        build(str(tmp_path))
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{case}: {needle!r} not in {message!r}"


def test_a_dirpath_on_a_read_only_filesystem_fails_at_construction(tmp_path: Any) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root; the file cases above cover the check without it")
    mount = tmp_path / "ro"
    mount.mkdir()
    if os.system(f"mount -t tmpfs -o ro,size=64k tmpfs {mount} 2>/dev/null") != 0:
        pytest.skip("mount is not permitted here")
    try:
        with pytest.raises(ValueError, match="not writable"):
            MetricCheckpoint(dirpath=str(mount / "ck"))
    finally:
        os.system(f"umount {mount}")


# ----------------------------------------------------------------------------------------- Hydra overrides
@pytest.mark.parametrize("override", [
    "monitor.every_n_steps=[1,",  # unbalanced bracket
    "monitor.every_n_steps==3",  # a doubled '='
    "monitor/checkpoint=nonexistent",  # a variant that does not exist
    "monitor.grad_stats.every_n_steps=-3",  # a value the callback rejects
])
def test_a_malformed_hydra_override_is_an_error_naming_it(override: str) -> None:
    from hydra import compose, initialize_config_module

    from lightwatch.hydra import instantiate_monitors

    with initialize_config_module("lightwatch.conf", version_base="1.3"):
        with pytest.raises(Exception) as info:
            instantiate_monitors(compose(overrides=["+monitor=default", override]).monitor)
    assert type(info.value).__name__ not in ("KeyError", "AttributeError", "IndexError"), repr(info.value)
    key = override.split("=")[0].split("/")[-1].split(".")[-1]
    assert key in str(info.value) or override.split("=")[-1] in str(info.value), str(info.value)


# ----------------------------------------------------------------------------------------- data during fit
def all_monitors(**data: Any) -> List[Any]:
    return [GradientStatsMonitor(every_n_steps=1), ActivationStatsMonitor(every_n_steps=1),
            DataQualityMonitor(every_n_steps=1, **data), MetricMonitor(every_n_steps=1)]


def fit(tmp_path: Any, model: pl.LightningModule, train: Any, val: Any = None, max_steps: int = 6,
        callbacks: Any = None, checkpointing: bool = False, **data: Any) -> List[Dict[str, Any]]:
    trainer = make_trainer(tmp_path, callbacks if callbacks is not None else all_monitors(**data),
                           max_steps=max_steps, log_every_n_steps=1, enable_checkpointing=checkpointing,
                           limit_val_batches=2 if val is not None else 0, num_sanity_val_steps=0)
    trainer.fit(model, train, val)
    return read_alerts(str(tmp_path))


def batches_loader(batches: List[Any]) -> DataLoader:
    """A DataLoader that yields ``batches`` as they are (any structure)."""
    return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def loader_with(x: torch.Tensor, y: torch.Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def clean(n: int = 64) -> Any:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, x[:, :3].argmax(1)


def names(alerts: List[Dict[str, Any]]) -> List[str]:
    return [a["rule"] for a in alerts]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_inputs_give_an_alert_naming_the_field_and_step(tmp_path: Any, value: float) -> None:
    x, y = clean()
    x[20, 3] = value  # batch 1
    alerts = fit(tmp_path, Classifier(), loader_with(x, y), max_steps=3)
    hits = [a for a in alerts if a["rule"] == "data_nonfinite"]
    assert hits, names(alerts)
    assert "x" in (hits[0]["subject"] or "") + hits[0]["message"] and hits[0]["step"] <= 2


def test_a_nan_loss_gives_an_alert_not_a_crash_inside_lightwatch(tmp_path: Any) -> None:
    class NanLoss(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 2 else loss

    alerts = fit(tmp_path, NanLoss(), make_loader(), max_steps=5)
    assert any("nonfinite" in a["rule"] or "nan" in a["rule"] for a in alerts), names(alerts)


def test_an_empty_batch_gives_an_alert(tmp_path: Any) -> None:
    class SkipsEmpty(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return None if len(x) == 0 else super().training_step(batch, batch_idx)

    x, y = clean()
    batches = [(x[:16], y[:16]), (x[:0], y[:0]), (x[16:32], y[16:32]), (x[32:48], y[32:48])]
    alerts = fit(tmp_path, SkipsEmpty(), batches_loader(batches), max_steps=3)
    assert any("empty" in a["rule"] for a in alerts), names(alerts)


class DictBatchModel(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self(batch["inputs"]["x"]), batch["y"])
        self.log("train/loss", loss)
        return loss


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor


Pair = namedtuple("Pair", ["x", "y"])


class FieldsModel(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self(batch.x), batch.y)
        self.log("train/loss", loss)
        return loss


@pytest.mark.parametrize("kind", ["nested_dict", "dataclass", "namedtuple"])
def test_structured_batches_are_read_and_their_nan_named(tmp_path: Any, kind: str) -> None:
    x, y = clean(48)
    x[5, 0] = float("nan")
    if kind == "nested_dict":
        batches = [{"inputs": {"x": x[i:i + 16]}, "y": y[i:i + 16]} for i in range(0, 48, 16)]
        model, data = DictBatchModel(), {"inputs": "inputs.x", "targets": "y"}
    else:
        make = Batch if kind == "dataclass" else Pair
        batches = [make(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]
        model, data = FieldsModel(), {"inputs": "x", "targets": "y"}
    alerts = fit(tmp_path, model, batches_loader(batches), max_steps=3, **data)
    hits = [a for a in alerts if a["rule"] == "data_nonfinite"]
    assert hits and hits[0]["step"] == 0, names(alerts)


def test_a_batch_of_strings_is_skipped_with_a_note_not_a_crash(tmp_path: Any) -> None:
    class Texts(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            texts, y = batch
            x = torch.stack([torch.full((8,), float(len(t))) for t in texts])
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train/loss", loss)
            return loss

    batches = [(["a", "bb", "ccc", "dddd"], torch.tensor([0, 1, 2, 0])) for _ in range(3)]
    fit(tmp_path, Texts(), batches_loader(batches), max_steps=3)  # no exception: the label field is still checked


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_label_out_of_range_crash_is_explained_by_an_alert_first(tmp_path: Any, split: str) -> None:
    x, y = clean()
    bad = y.clone()
    bad[21] = 7  # 3 classes
    train = loader_with(x, bad if split == "train" else y)
    val = loader_with(x, bad if split == "val" else y)
    with pytest.raises((IndexError, RuntimeError)):
        fit(tmp_path, Classifier(), train, val, max_steps=8, num_classes=3)
    alerts = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "data_label_range"]
    assert alerts, names(read_alerts(str(tmp_path)))
    assert "7" in alerts[0]["message"] and split in (alerts[0]["subject"] or "") + alerts[0]["message"]


def test_a_label_out_of_range_in_val_is_explained_without_num_classes(tmp_path: Any) -> None:
    x, y = clean()
    bad = y.clone()
    bad[3] = 9
    with pytest.raises((IndexError, RuntimeError)):
        fit(tmp_path, Classifier(), loader_with(x, y), loader_with(x, bad), max_steps=8)
    alerts = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "data_label_range"]
    assert alerts and "9" in alerts[0]["message"], names(read_alerts(str(tmp_path)))


def test_float_labels_with_an_integer_loss_are_explained(tmp_path: Any) -> None:
    x, y = clean()
    with pytest.raises(RuntimeError):
        fit(tmp_path, Classifier(), loader_with(x, y.float()), max_steps=3)
    # the monitors did not crash first: the error is the loss's own (float targets of the wrong shape)


def test_a_zero_dim_tensor_in_the_batch_is_not_a_crash(tmp_path: Any) -> None:
    class WithScalar(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y, temperature = batch
            loss = nn.functional.cross_entropy(self(x) / temperature, y)
            self.log("train/loss", loss)
            return loss

    x, y = clean(48)
    batches = [(x[i:i + 16], y[i:i + 16], torch.tensor(2.0)) for i in range(0, 48, 16)]
    fit(tmp_path, WithScalar(), batches_loader(batches), max_steps=3)


def test_a_model_without_parameters_runs_with_every_monitor(tmp_path: Any) -> None:
    class NoParameters(pl.LightningModule):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("train/loss", x.abs().mean())

        def configure_optimizers(self) -> None:
            return None

    fit(tmp_path, NoParameters(), make_loader(), max_steps=3)


def test_a_frozen_model_runs_with_every_monitor(tmp_path: Any) -> None:
    class Frozen(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.net.requires_grad_(False)
            self.scale = nn.Parameter(torch.ones(()))  # the only trainable tensor, outside the hooked layers

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) * self.scale

    fit(tmp_path, Frozen(), make_loader(), max_steps=3)


def test_manual_optimisation_runs_with_every_monitor_and_names_a_nan(tmp_path: Any) -> None:
    class Manual(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train/loss", loss)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    x, y = clean()
    x[40, 1] = float("nan")  # batch 2
    alerts = fit(tmp_path, Manual(), loader_with(x, y), max_steps=4)
    assert "data_nonfinite" in names(alerts), names(alerts)


def test_a_monitor_key_that_never_appears_is_an_alert_naming_it(tmp_path: Any) -> None:
    ck = MetricCheckpoint(dirpath=str(tmp_path / "ck"), monitor="val/acc", every_n_train_steps=2)
    alerts = fit(tmp_path, Classifier(), make_loader(), max_steps=4, callbacks=[ck], checkpointing=True)
    hits = [a for a in alerts if "val/acc" in a["message"]]
    assert hits, names(alerts)


def test_a_rule_on_a_metric_that_never_appears_is_an_alert_naming_it(tmp_path: Any) -> None:
    rules = {"acc_floor": {"metric": "val/accuracy", "kind": "threshold", "below": 0.1}}
    alerts = fit(tmp_path, Classifier(), make_loader(), max_steps=12,
                 callbacks=[MetricMonitor(rules=rules, every_n_steps=1)])
    hits = [a for a in alerts if "val/accuracy" in a["message"]]
    assert hits, names(alerts)
