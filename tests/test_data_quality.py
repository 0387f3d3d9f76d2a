"""DataQualityMonitor in a real Trainer: faults planted in real batches, alerts and event files read back."""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import warnings
from collections import Counter, defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.tensorboard.writer import FileWriter

from conftest import Classifier, make_trainer, read_alerts, read_events, scalars
from lightwatch import MonitorError
from lightwatch.callbacks import DataQualityMonitor
from lightwatch.core.actions import MonitorWarning
from lightwatch.core.batch import BatchSelectorError
from lightwatch.profile import DataProfile, ProfileError
from lightwatch.metrics import cpu_shortcuts

HERE = os.path.dirname(__file__)
TB = ("tb", "version_0")
# planted faults warn by design; the healthy-run test records warnings itself
pytestmark = pytest.mark.filterwarnings("ignore::lightwatch.core.actions.MonitorWarning")


# ------------------------------------------------------------------------------------------ helpers
def tabular(n: int, seed: int, classes: int = 3, features: int = 8, shift: float = 0.0) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, features, generator=g) + shift, torch.randint(0, classes, (n,), generator=g)]


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class Plant(pl.Callback):
    """Edits a batch in place before the monitor (placed after this callback) sees it.

    ``train`` maps a training step to ``fn(batch)``; ``val`` maps a validation batch index of the first
    validation run (sanity check excluded) to ``fn(batch)``.
    """

    def __init__(self, train: Optional[Dict[int, Callable]] = None, val: Optional[Dict[int, Callable]] = None):
        self.train, self.val = train or {}, val or {}
        self.val_runs = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        fn = self.train.get(trainer.fit_loop.epoch_loop._batches_that_stepped)
        if fn is not None:
            fn(batch)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking and self.val_runs == 0 and batch_idx in self.val:
            self.val[batch_idx](batch)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.val_runs += 1


def fit(tmp_path: Any, monitor: DataQualityMonitor, train: DataLoader, val: Optional[DataLoader] = None,
        plant: Optional[pl.Callback] = None, model: Optional[pl.LightningModule] = None, max_steps: int = 16,
        log_every_n_steps: int = 5, **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    callbacks = ([plant] if plant is not None else []) + [monitor]
    kwargs.setdefault("num_sanity_val_steps", 0)
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, log_every_n_steps=log_every_n_steps,
                           limit_val_batches=None if val is not None else 0, **kwargs)
    trainer.fit(model or Classifier(), train, val)
    return trainer


def by_rule(tmp_path: Any, rule: str) -> List[Dict[str, Any]]:
    return [a for a in read_alerts(str(tmp_path)) if a["rule"] == rule]


def events(tmp_path: Any) -> Any:
    return read_events(str(tmp_path.joinpath(*TB)))


def set_value(row: int, col: int, value: float) -> Callable:
    def fn(batch: Any) -> None:
        batch[0][row, col] = value
    return fn


# ------------------------------------------------------------------------------------ per-batch tier
def test_nan_in_one_batch_is_alerted_at_its_step_with_split_and_feature(tmp_path: Any) -> None:
    plant = Plant(train={7: set_value(2, 3, float("nan"))}, val={1: set_value(0, 5, float("inf"))})
    fit(tmp_path, DataQualityMonitor(), loader(*tabular(128, 0)), loader(*tabular(64, 1)), plant)

    train_alert, val_alert = by_rule(tmp_path, "data_nonfinite")
    # read at a later logged step, reported at the step of the bad batch
    assert (train_alert["step"], train_alert["subject"], train_alert["severity"]) == (7, "train/x.3", "error")
    assert train_alert["value"] == 1 and "first at step 7" in train_alert["message"]
    assert train_alert["source"] == "DataQualityMonitor" and train_alert["action"] == "warn"
    assert val_alert["subject"] == "val/x.5" and "first in val batch 1" in val_alert["message"]

    acc = events(tmp_path)
    train_nf = scalars(acc, "monitor.data/train/x/nonfinite")
    (read_at,) = [s for s, v in train_nf.items() if v]
    assert sum(train_nf.values()) == 1 and 7 <= read_at <= 9  # read when validation starts, before step 9
    assert set(train_nf) >= {4, 9, 14}  # one point per logged step
    val_nf = scalars(acc, "monitor.data/val/x/nonfinite")
    assert val_nf[val_alert["step"]] == 1 and sum(val_nf.values()) == 1


def test_an_out_of_range_label_is_alerted(tmp_path: Any) -> None:
    def bad_label(batch: Any) -> None:
        batch[1][0] = 4

    def ignored(batch: Any) -> None:
        batch[1][:3] = -100  # cross-entropy's ignore_index: not a bad label

    monitor = DataQualityMonitor(num_classes=3)
    fit(tmp_path, monitor, loader(*tabular(128, 0)), plant=Plant(train={6: bad_label, 11: ignored}),
        model=Classifier(classes=5))
    (alert,) = by_rule(tmp_path, "data_label_range")
    assert (alert["step"], alert["subject"], alert["value"], alert["threshold"]) == (6, "train/y", 1.0, 3.0)
    assert "outside [0, 3) (num_classes argument)" in alert["message"] and "Largest label seen: 4" in alert["message"]
    assert sum(scalars(events(tmp_path), "monitor.data/train/y/out_of_range").values()) == 1


def test_validation_labels_unseen_in_training_are_out_of_range_in_the_first_epoch(tmp_path: Any) -> None:
    x, y = tabular(64, 1)
    y[5] = 7
    fit(tmp_path, DataQualityMonitor(), loader(*tabular(128, 0)), loader(x, y), model=Classifier(classes=8),
        max_steps=8)
    (alert,) = by_rule(tmp_path, "data_label_range")
    assert alert["subject"] == "val/y" and "largest training label so far" in alert["message"]


def test_a_label_that_crashes_the_loss_is_explained_before_the_traceback(tmp_path: Any) -> None:
    def bad_label(batch: Any) -> None:
        batch[1][3] = 9

    model = Classifier(classes=3)
    model.num_classes = 3  # found by the monitor like a hyperparameter
    with pytest.raises(IndexError):
        fit(tmp_path, DataQualityMonitor(), loader(*tabular(128, 0)), plant=Plant(train={3: bad_label}), model=model)
    (alert,) = by_rule(tmp_path, "data_label_range")
    assert alert["step"] == 3 and "the module's num_classes" in alert["message"]


def test_a_dtype_change_that_crashes_the_model_is_explained(tmp_path: Any) -> None:
    def to_double(batch: Any) -> None:
        batch[0] = batch[0].double()

    with pytest.raises(RuntimeError):
        fit(tmp_path, DataQualityMonitor(), loader(*tabular(128, 0)), plant=Plant(train={6: to_double}))
    (alert,) = by_rule(tmp_path, "data_schema")
    assert alert["step"] == 6 and "dtype float64 (expected float32)" in alert["message"]


def test_empty_batches_are_alerted(tmp_path: Any) -> None:
    def empty(batch: Any) -> None:
        batch[0], batch[1] = batch[0][:0], batch[1][:0]

    fit(tmp_path, DataQualityMonitor(), loader(*tabular(128, 0)), plant=Plant(train={3: empty}), max_steps=8)
    (alert,) = by_rule(tmp_path, "data_empty_batch")
    assert alert["step"] == 3 and alert["subject"] == "train/_all"


def test_given_ranges_report_every_value_outside(tmp_path: Any) -> None:
    monitor = DataQualityMonitor(ranges={"x": [-10.0, 10.0]})
    fit(tmp_path, monitor, loader(*tabular(128, 0)), plant=Plant(train={5: set_value(1, 2, 255.0)}), max_steps=8)
    (alert,) = by_rule(tmp_path, "data_out_of_range")
    assert (alert["step"], alert["subject"], alert["threshold"]) == (5, "train/x.2", 0.0)
    assert "given ranges" in alert["message"] and "x.2 (1 outside [-10, 10])" in alert["message"]


def test_learned_ranges_catch_unnormalised_validation_data(tmp_path: Any) -> None:
    x, y = tabular(64, 1)
    fit(tmp_path, DataQualityMonitor(), loader(*tabular(128, 0)), loader(x * 255.0, y), max_steps=16)
    alerts = by_rule(tmp_path, "data_out_of_range")
    # the first training epoch sets the ranges: the second validation run is checked against them
    assert alerts and alerts[0]["subject"].startswith("val/x.") and "first training epoch" in alerts[0]["message"]
    assert alerts[0]["value"] > 0.5


# ------------------------------------------------------------------------------ duplicates and leakage
def test_validation_samples_copied_from_train_are_leakage_with_the_right_fraction(tmp_path: Any) -> None:
    x, y = tabular(128, 0)
    vx, vy = tabular(64, 1)
    vx[::4] = x[10:26]  # 16 of the 64 validation samples are training samples
    monitor = DataQualityMonitor()
    fit(tmp_path, monitor, loader(x, y), loader(vx, vy), max_steps=8, num_sanity_val_steps=2)  # sanity: ignored
    (alert,) = by_rule(tmp_path, "data_leakage")
    assert alert["value"] == pytest.approx(0.25) and alert["subject"] == "val/_all"
    assert "16 of the 64 val samples" in alert["message"]
    acc = events(tmp_path)
    assert list(scalars(acc, "monitor.data/val/_all/leak_frac").values()) == [pytest.approx(0.25)]
    assert list(scalars(acc, "monitor.data/val/_all/leak_count").values()) == [16.0]
    assert set(scalars(acc, "monitor.data/train/_all/dup_count").values()) == {0.0}
    assert monitor.profile.splits["val"].samples == 64


def test_duplicates_inside_train_are_counted(tmp_path: Any) -> None:
    x, y = tabular(128, 0)
    x[100:112] = x[0:12]
    monitor = DataQualityMonitor()
    fit(tmp_path, monitor, loader(x, y, shuffle=True), max_steps=16)
    dup = scalars(events(tmp_path), "monitor.data/train/_all/dup_count")
    assert set(dup.values()) == {12.0}  # every epoch
    (first, *_) = by_rule(tmp_path, "data_duplicates")
    assert first["value"] == pytest.approx(12 / 128) and "12 of the 128 train samples" in first["message"]
    assert monitor.profile.splits["train"].duplicates["duplicates"] == 12


# ------------------------------------------------------------------------------- distribution tier
def test_a_shifted_validation_label_distribution_is_alerted(tmp_path: Any) -> None:
    vx, vy = tabular(96, 1)
    vy[: 72] = 0  # 75% or more of class 0, against about a third in training
    fit(tmp_path, DataQualityMonitor(), loader(*tabular(192, 0)), loader(vx, vy), max_steps=12)
    (alert,) = by_rule(tmp_path, "data_label_shift")
    assert alert["subject"] == "val/y" and alert["value"] > 0.3 and "class 0" in alert["message"]
    assert scalars(events(tmp_path), "monitor.data/val/y/label_shift")[alert["step"]] == pytest.approx(alert["value"])


def test_a_reference_profile_flags_a_shifted_run_and_not_an_identical_one(tmp_path: Any) -> None:
    ref_path = str(tmp_path / "reference.json")
    train, val = tabular(192, 0), tabular(96, 1)
    fit(tmp_path / "ref", DataQualityMonitor(profile_path=ref_path), loader(*train), loader(*val), max_steps=12)
    profile = DataProfile.load(ref_path)
    assert profile.splits["train"].samples == 192 and profile.splits["val"].samples == 96
    assert profile.splits["train"].duplicates["samples"] == 192

    # the same data again: nothing drifted, nothing is alerted, PSI is exactly 0
    fit(tmp_path / "same", DataQualityMonitor(reference=ref_path), loader(*train), loader(*val), max_steps=12)
    assert read_alerts(str(tmp_path / "same")) == []
    acc = events(tmp_path / "same")
    assert set(scalars(acc, "monitor.data/train/x/psi_ref").values()) == {0.0}
    assert set(scalars(acc, "monitor.data/val/y/label_shift_ref").values()) == {0.0}

    # feature 2 shifted by 1.5 standard deviations in both splits
    shifted = [t.clone() for t in train], [t.clone() for t in val]
    for split in shifted:
        split[0][:, 2] += 1.5
    fit(tmp_path / "shifted", DataQualityMonitor(reference=ref_path), loader(*shifted[0]), loader(*shifted[1]),
        max_steps=12)
    drift = by_rule(tmp_path / "shifted", "data_drift_ref")
    assert {a["subject"] for a in drift} == {"train/x.2", "val/x.2"}
    assert all("1 of the 8 feature(s)" in a["message"] and a["value"] > a["threshold"] for a in drift)

    # evaluation on its own (trainer.validate) is compared with the reference too
    trainer = make_trainer(tmp_path / "validate", [DataQualityMonitor(reference=ref_path)], limit_val_batches=None)
    trainer.validate(Classifier(), loader(*shifted[1]), verbose=False)
    assert [a["subject"] for a in by_rule(tmp_path / "validate", "data_drift_ref")] == ["val/x.2"]


class ImageNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch["image"]), batch["label"])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", nn.functional.cross_entropy(self.net(batch["image"]), batch["label"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Images(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"image": self.x[i], "label": self.y[i]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_runs_raise_no_warning(tmp_path: Any, seed: int) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if seed < 2:  # tabular, shuffled, validation drawn apart
            fit(tmp_path, DataQualityMonitor(), loader(*tabular(256, seed), shuffle=True),
                loader(*tabular(96, seed + 100)), max_steps=48)
        else:  # images in dict batches, channels as features, subsampled pixels
            fit(tmp_path, DataQualityMonitor(), DataLoader(Images(128, seed), batch_size=16, shuffle=True),
                DataLoader(Images(48, seed + 100), batch_size=16), model=ImageNet(), max_steps=24)
    loud = [a for a in read_alerts(str(tmp_path)) if a["severity"] != "info"]
    assert loud == []
    assert not [w for w in caught if issubclass(w.category, MonitorWarning)]
    acc = events(tmp_path)
    psi_tag = "monitor.data/val/x/psi" if seed < 2 else "monitor.data/val/image/psi"
    assert len(scalars(acc, psi_tag)) >= 3  # drift was measured every epoch, and stayed quiet


def test_image_statistics_do_not_depend_on_how_samples_are_batched(tmp_path: Any) -> None:
    profiles = []
    for batch_size in (8, 16):
        monitor = DataQualityMonitor(profile_path=None)
        fit(tmp_path / str(batch_size), monitor, DataLoader(Images(64, 0), batch_size=batch_size), model=ImageNet(),
            max_steps=64 // batch_size)
        profiles.append(monitor.profile.splits["train"].fields["image"])
    a, b = profiles
    assert a.num_features == 3 and a.feature_dim == 1 and a.shape == [3, 16, 16]
    # 256 pixels per channel and image, read with an odd stride of 5 (at most 64 wanted): 52 each; 156 values an
    # image, so the histogram counts the images whose content hash falls in one of ceil(156 / 64) = 3 classes
    counted = a.histogram.binned_counts().sum().item()
    assert counted % (52 * 3) == 0 and 64 * 52 * 3 / 6 < counted < 64 * 52 * 3 / 1.5, counted
    assert b.histogram.binned_counts().sum().item() == counted  # the same images either way (edges differ)
    assert a.moments.compute()["count"].sum().item() == 64 * 52 * 3  # the moments read every image
    assert torch.allclose(a.moments.compute()["mean"], b.moments.compute()["mean"], rtol=1e-12, atol=1e-12)
    assert a.moments.compute()["count"].tolist() == b.moments.compute()["count"].tolist()


def test_wide_fields_histogram_a_content_chosen_share_and_drift_takes_the_samples_counted(tmp_path: Any) -> None:
    """200 features a sample: the histograms count the samples whose content hash falls in one of
    ceil(200 / 64) = 4 classes, the moments every sample; a healthy validation split raises nothing, a
    shifted one is still caught, with thresholds for the samples the histograms counted."""
    from lightwatch.checks.data.drift import counted_share

    x, y = tabular(640, 0, features=200)
    monitors = {}
    for name, shift in (("healthy", 0.0), ("shifted", 0.5)):
        vx, vy = tabular(320, 1, features=200, shift=shift)
        monitors[name] = DataQualityMonitor(profile_path=None)
        fit(tmp_path / name, monitors[name], loader(x, y, batch_size=64), loader(vx, vy, batch_size=64),
            model=Classifier(in_features=200), max_steps=10)
    train = monitors["healthy"].profile.splits["train"].fields["x"]
    assert train.moments.compute()["count"].tolist() == [640] * 200
    share = counted_share(train)
    assert 0.15 < share < 0.35, share  # about a quarter, chosen by content
    assert train.histogram.compute()["total"].tolist() == [round(640 * share)] * 200  # whole samples
    assert not by_rule(tmp_path / "healthy", "data_drift")
    drifted = by_rule(tmp_path / "shifted", "data_drift")
    assert drifted and drifted[0]["subject"].startswith("val/x."), drifted


def test_staging_buffer_reuses_its_slots_and_clones_fields_whose_shape_varies() -> None:
    """Fixed-shape batches land in one staging tensor (the fold reads a view, not a concatenation); a field
    padded per batch to another length is cloned from then on, instead of a new staging tensor per batch
    (which made the process's memory grow on a BERT run with dynamic padding)."""
    from lightwatch.checks.data.buffers import Buffer, Pending

    buf = Buffer()
    for marker in range(3):
        buf.add(Pending([torch.full((4, 2), float(marker)), torch.arange(4)], marker, 4, None), copy=True)
    x = buf.joined(0, buf.batches)
    assert x.shape == (12, 2) and x._base is not None and x.sum().item() == 2 * 4 * (0 + 1 + 2)
    first = buf.batches[0].parts[0]
    buf.clear()
    buf.add(Pending([torch.ones(4, 2), torch.arange(4)], 3, 4, None), copy=True)
    assert buf.batches[0].parts[0].data_ptr() == first.data_ptr()  # the same slot, reused
    buf.clear()
    for marker, length in enumerate((5, 7, 3)):  # a sequence field padded per batch
        buf.add(Pending([torch.ones(4, length), torch.arange(4)], marker, 4, None), copy=True)
        assert buf.batches[-1].parts[0].shape == (4, length)
        buf.clear()
    assert 0 not in buf._stage and 1 in buf._stage  # field 0 is cloned now, field 1 still staged


class SpoilAfter(pl.Callback):
    """Placed after the monitor: overwrites every training batch in place once the monitor has seen it."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        batch[0].fill_(float("nan"))


def test_batches_of_one_layout_take_the_short_path_and_count_like_the_full_one(tmp_path: Any) -> None:
    """After one batch of a layout has passed the schema check, the next batches of that layout are only
    compared and copied (the short path). They still count every sample, the values are the ones the monitor
    saw (a callback spoiling the batch afterwards changes nothing), a bad value is found at its step, and a
    batch of another layout (the epoch's short last batch, another dtype) goes the full way again."""
    x, y = tabular(120, 0)  # 7 batches of 16 and one of 8 per epoch
    plant = Plant(train={9: set_value(3, 1, float("inf")), 13: lambda b: b.__setitem__(0, b[0].double())})
    monitor = DataQualityMonitor(scan_before_fit=0)
    with pytest.raises(RuntimeError):  # the float64 batch at step 13 crashes the float32 model
        fit(tmp_path, monitor, loader(x, y), plant=plant, max_steps=16, log_every_n_steps=4)
    sp = monitor._splits["train"]
    assert sp.steady is None  # the float64 batch left the short path

    nonfinite, = by_rule(tmp_path, "data_nonfinite")
    assert (nonfinite["step"], nonfinite["subject"]) == (9, "train/x.1")
    schema, = by_rule(tmp_path, "data_schema")
    assert schema["step"] == 13 and "dtype float64 (expected float32)" in schema["message"]
    profile = monitor.profile.splits["train"]
    assert profile.samples == 120  # the first epoch, its short last batch included

    spoiled = tmp_path / "spoiled"
    monitor = DataQualityMonitor(scan_before_fit=0)
    trainer = make_trainer(spoiled, [monitor, SpoilAfter()], max_steps=10, log_every_n_steps=4, limit_val_batches=0)
    trainer.fit(Classifier(), loader(x, y))
    assert monitor._splits["train"].steady is not None  # the run went the short way
    assert not by_rule(spoiled, "data_nonfinite")  # the copies were taken before the batches were spoiled
    seen = scalars(events(spoiled), "monitor.data/train/x/nonfinite")
    assert seen and not any(seen.values())


def test_regression_targets_are_numeric_fields(tmp_path: Any) -> None:
    class Regressor(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.mse_loss(self(batch[0])[:, 0], batch[1])

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

    x, _ = tabular(128, 0)
    vx, _ = tabular(64, 1)
    fit(tmp_path, DataQualityMonitor(), loader(x, x.sum(1)), loader(vx, vx.sum(1) + 10.0), model=Regressor(),
        max_steps=8)
    (alert,) = by_rule(tmp_path, "data_drift")
    assert alert["subject"] == "val/y" and "target 'y'" in alert["message"]


def test_variable_sequence_lengths_are_learned_not_alerted(tmp_path: Any) -> None:
    class Sequences(Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> Any:
            return torch.full((4,), float(i % 3)), torch.tensor(i % 2)

    def collate(items: List[Any]) -> Any:
        length = 5 + int(items[0][0][0])  # 5, 6 or 7 from batch to batch
        xs = torch.stack([x for x, _ in items]).unsqueeze(1).expand(-1, length, -1).contiguous()
        return xs, torch.stack([y for _, y in items])

    class Pool(Classifier):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.mean(1))

    monitor = DataQualityMonitor(feature_dim=-1)
    fit(tmp_path, monitor, DataLoader(Sequences(), batch_size=10, collate_fn=collate), model=Pool(in_features=4),
        max_steps=21)
    assert by_rule(tmp_path, "data_schema") == []
    assert monitor.profile.splits["train"].fields["x"].shape == [None, 4]


class TokenModel(pl.LightningModule):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits = self.head(self.embed(batch["input_ids"]))
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_token_batches_with_a_large_vocabulary(tmp_path: Any) -> None:
    vocab = 3000  # more classes than the label counts keep when the class count is not given
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (64, 12), generator=g)
    labels = ids.roll(-1, dims=1)
    labels[:, -3:] = -100  # padding, ignored by the loss and by the monitor

    class Tokens(Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "labels": labels[i]}

    path = str(tmp_path / "profile.json")
    monitor = DataQualityMonitor(profile_path=path)
    fit(tmp_path, monitor, DataLoader(Tokens(), batch_size=8), model=TokenModel(vocab), max_steps=16)
    assert [a for a in read_alerts(str(tmp_path)) if a["severity"] != "info"] == []
    field = DataProfile.load(path).splits["train"].fields["labels"]
    assert field.kind == "labels" and field.num_classes == int(labels.max()) + 1 > field.labels.num_classes
    ids_field = DataProfile.load(path).splits["train"].fields["input_ids"]
    # token ids: the sequence dimension is variable and all ids of a sample are one feature (not 12 positions)
    assert ids_field.num_features == 1 and ids_field.shape == [None]


def test_the_example_reports_the_planted_faults(tmp_path: Any) -> None:
    cmd = [sys.executable, os.path.join(HERE, "..", "examples", "data_faults.py"), "--fault", "leak", "--epochs", "1",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    healthy, leak = proc.stdout.split("=== fault: leak")
    assert "no alerts" in healthy
    assert "data_leakage" in leak and "60 of the 360 val samples" in leak


# -------------------------------------------------------------------------------- immediate actions
def test_raise_acts_on_the_bad_batch_itself(tmp_path: Any) -> None:
    monitor = DataQualityMonitor(checks={"nonfinite": {"action": "raise", "severity": "critical"}})
    with pytest.raises(MonitorError, match="data_nonfinite.*step 6") as err:
        fit(tmp_path, monitor, loader(*tabular(128, 0)), plant=Plant(train={6: set_value(0, 0, float("nan"))}))
    assert err.value.alert.step == 6 and err.value.alert.subject == "train/x.0"


def test_skip_step_drops_the_update_of_the_bad_batch(tmp_path: Any) -> None:
    from lightwatch.core.recovery import recovery_for

    monitor = DataQualityMonitor(checks={"nonfinite": {"action": "skip_step"}})
    trainer = fit(tmp_path, monitor, loader(*tabular(128, 0)), plant=Plant(train={6: set_value(0, 0, float("nan"))}))
    model = trainer.lightning_module
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN never reached the weights
    assert recovery_for(trainer).skipped_steps == 1
    assert [a["step"] for a in by_rule(tmp_path, "data_nonfinite")] == [6]


# ------------------------------------------------------------------------------------ bad input
def test_an_unknown_batch_structure_is_a_clear_error(tmp_path: Any) -> None:
    class Texts(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> str:
            return f"sample {i}"

    with pytest.raises(BatchSelectorError, match="cannot find any tensor in the batch.*list"):
        fit(tmp_path, DataQualityMonitor(), DataLoader(Texts(), batch_size=4), max_steps=2)


def test_a_selector_that_matches_nothing_names_the_available_keys(tmp_path: Any) -> None:
    with pytest.raises(BatchSelectorError, match=r"selector 'image' matches nothing.*indices 0\.\.1.*Tensor\[16, 8\]"):
        fit(tmp_path, DataQualityMonitor(inputs="image"), loader(*tabular(32, 0)), max_steps=2)
    with pytest.raises(BatchSelectorError, match=r"ranges=.*no field named \['z'\].*\['x', 'y'\]"):
        fit(tmp_path, DataQualityMonitor(ranges={"z": [0, 1]}), loader(*tabular(32, 0)), max_steps=2)


def test_bad_profiles_fail_clearly(tmp_path: Any) -> None:
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "lightwatch-data-profile", "version": 1, "spl')
    with pytest.raises(ProfileError, match="not valid JSON"):
        DataQualityMonitor(reference=str(corrupt))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DataQualityMonitor(reference=str(tmp_path / "missing.json"))
    # a profile of 8 features, used on data with 5
    ref_path = str(tmp_path / "eight.json")
    fit(tmp_path / "a", DataQualityMonitor(profile_path=ref_path), loader(*tabular(64, 0)), max_steps=4)
    with pytest.raises(ProfileError, match=r"field 'x' has 8 features in the reference profile.*but 5 in this run"):
        fit(tmp_path / "b", DataQualityMonitor(reference=ref_path), loader(*tabular(64, 0, features=5)),
            model=Classifier(in_features=5), max_steps=4)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"checks": {"nan": {}}}, r"unknown check\(s\) \['nan'\]"),
    ({"checks": {"drift": {"action": "explode"}}}, "unknown action 'explode'"),
    ({"checks": {"drift": {"severity": "fatal"}}}, "unknown severity 'fatal'"),
    ({"checks": {"drift": {"alpha": 0.0}}}, r"drift.*alpha.*must be a number in \(0.0, 1.0\]"),
    ({"checks": {"drift": {"treshold": 1}}}, r"unknown setting\(s\) \['treshold'\]"),
    ({"bins": 1}, "bins must be an integer >= 2"),
    ({"num_classes": 0}, "num_classes must be a positive integer"),
    ({"feature_dim": "last"}, "feature_dim must be an int"),
    ({"schema": {"x": {"dtype": "float99", "shape": [8]}}}, "unknown dtype 'float99'"),
    ({"inputs": 2.5}, "expected a selector"),
])
def test_bad_arguments_fail_at_construction(kwargs: Dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        DataQualityMonitor(**kwargs)


def test_checks_can_be_switched_off_and_accept_omegaconf() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"checks": {"leakage": False, "drift": {"alpha": 0.05}}, "ranges": {"x": [0, 1]},
                            "inputs": ["image", "mask"], "feature_dim": {"image": 1, "mask": None},
                            "schema": {"image": {"dtype": "float32", "shape": [3, None, None]}},
                            "feature_names": {"image": ["r", "g", "b"]}})
    monitor = DataQualityMonitor(inputs=cfg.inputs, checks=cfg.checks, ranges=cfg.ranges, feature_dim=cfg.feature_dim,
                                 schema=cfg.schema, feature_names=cfg.feature_names)
    assert not monitor.checks["leakage"].enabled and monitor.checks["drift"]["alpha"] == 0.05
    assert monitor.selector.inputs == ["image", "mask"] and monitor.feature_dim == {"image": 1, "mask": None}
    assert monitor.schema["image"].dims == [3, None, None] and monitor.feature_names == {"image": ["r", "g", "b"]}


# ------------------------------------------------------------------------------ state and resume
def test_state_is_weights_only_safe_and_resume_keeps_the_bin_edges(tmp_path: Any) -> None:
    train = loader(*tabular(128, 0), shuffle=True)
    first = DataQualityMonitor()
    fit(tmp_path / "a", first, train, max_steps=8, enable_checkpointing=True)
    (ckpt,) = glob.glob(str(tmp_path / "a" / "**" / "*.ckpt"), recursive=True)
    state = torch.load(ckpt, weights_only=True)  # plain types only
    assert any(k.startswith("DataQualityMonitor") for k in state["callbacks"])

    second = DataQualityMonitor()
    pl.seed_everything(1, verbose=False)
    trainer = make_trainer(tmp_path / "b", [second], max_steps=16, log_every_n_steps=5)
    trainer.fit(Classifier(), loader(*tabular(128, 7), shuffle=True), ckpt_path=ckpt)
    a = first.profile.splits["train"].fields["x"].histogram.edges
    b = second.profile.splits["train"].fields["x"].histogram.edges
    assert torch.equal(a, b)  # frozen in the first run, kept across the resume (data of the second run differs)
    assert second._learned


# ---------------------------------------------------------------------------------------- budget
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "unique", "_unique2", "unique_dim", "masked_select", "equal",
            "is_nonzero"}


class OpsPerStep(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.step = -1
        self.ops: Dict[int, Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[self.step][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class StepMarker(pl.Callback):
    def __init__(self, counter: OpsPerStep) -> None:
        self.counter = counter

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self.counter.step = trainer.fit_loop.epoch_loop._batches_that_stepped


def run_counted(tmp_path: Any, monitors: List[Any], monkeypatch: Any) -> Tuple[OpsPerStep, Dict, Dict]:
    counter = OpsPerStep()
    writes: Dict[int, int] = defaultdict(int)
    reads: Dict[int, int] = defaultdict(int)
    add_event, tolist = FileWriter.add_event, torch.Tensor.tolist

    def counting_add_event(self: Any, event: Any, *a: Any, **k: Any) -> Any:
        writes[counter.step] += 1
        return add_event(self, event, *a, **k)

    def counting_tolist(self: torch.Tensor) -> Any:
        reads[counter.step] += 1  # on CUDA a device-to-host copy
        return tolist(self)

    monkeypatch.setattr(FileWriter, "add_event", counting_add_event)
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [StepMarker(counter)] + monitors, max_steps=25, log_every_n_steps=10)
    with counter:
        trainer.fit(Classifier(), loader(*tabular(480, 0)))  # 30 batches an epoch: no epoch end in 25 steps
    monkeypatch.undo()
    return counter, writes, reads


@pytest.mark.parametrize("shortcuts", [True, False], ids=["cpu-shortcuts", "accelerator-path"])
def test_no_host_sync_and_no_write_on_unsampled_steps_at_defaults(tmp_path: Any, monkeypatch: Any,
                                                                  shortcuts: bool) -> None:
    """Unsampled steps copy the batch's fields into the staging buffer and do nothing else. At a logged step
    the fold runs: on the CPU it may read values to skip empty masks; the accelerator's path (run here on the
    CPU with the shortcuts off) reads nothing but the one ``tolist`` of the counters."""
    bare, bare_writes, bare_reads = run_counted(tmp_path / "bare", [], monkeypatch)
    monitor = DataQualityMonitor()
    with cpu_shortcuts(shortcuts):
        watched, writes, reads = run_counted(tmp_path / "watched", [monitor], monkeypatch)
    sampled = {9, 19}
    for step in range(1, 24):  # step 0 freezes the histogram edges (once per run); step 24 ends the fit
        extra = watched.ops[step] - bare.ops[step]
        assert not bare.ops[step] - watched.ops[step], f"step {step}: ops disappeared"
        if step in sampled:
            # the fold (checks, statistics, hashes of 10 batches at once)
            if shortcuts:
                assert extra["amin"] >= 1 and extra["ge"] >= 1, extra  # clean chunks: min/max, edge counts
            else:
                assert extra["scatter_add_"] >= 1 and extra["_local_scalar_dense"] == 0, extra
            continue
        # the whole per-step cost: a copy of each field (x and y) into the staging buffer (the slot's view is
        # made the first time the slot is used; the first batch of a layout is detached and checked in full)
        assert extra - Counter({"slice": 2, "detach": 2}) == Counter({"copy_": 2}), f"step {step}: {extra}"
        assert reads[step] == bare_reads[step] and writes[step] == bare_writes[step], f"step {step}: read or write"
    assert all(writes[s] > bare_writes[s] and reads[s] > bare_reads[s] for s in sampled)
    assert monitor._readback.copies == 2  # steps 9 and 19; the rest is read with the epoch-end reduction


# ------------------------------------------------------------------------------------------ DDP
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, timeout: int = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(HERE, "scripts", script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.ddp
def test_ddp_counts_and_histograms_equal_one_process_and_decisions_agree(tmp_path: Any) -> None:
    sys.path.insert(0, os.path.join(HERE, "scripts"))
    from dq_ddp import datasets, monitor_for

    # one process first: its profile is the reference (frozen edges) and the expected result
    train, val = datasets()
    single = str(tmp_path / "single.json")
    trainer = make_trainer(tmp_path / "single", [monitor_for(profile_path=single)], max_steps=10_000, max_epochs=1,
                           limit_val_batches=None, num_sanity_val_steps=0)
    pl.seed_everything(0, verbose=False)
    trainer.fit(Classifier(), DataLoader(train, batch_size=8), DataLoader(val, batch_size=8))

    torchrun("dq_ddp.py", str(tmp_path / "ddp"), single)
    ranks = [json.load(open(tmp_path / "ddp" / f"rank{r}.json")) for r in (0, 1)]
    one, two = DataProfile.load(single), DataProfile.load(str(tmp_path / "ddp" / "epoch0.json"))
    for split, n in (("train", 101), ("val", 51)):
        a, b = one.splits[split], two.splits[split]
        assert a.samples == b.samples == n  # DistributedSampler's padding repeats are not counted
        assert a.duplicates == b.duplicates and b.duplicates["duplicates"] == 0  # nor taken for duplicates
        ha, hb = a.fields["x"].histogram, b.fields["x"].histogram
        assert torch.equal(ha.edges, hb.edges) and torch.equal(ha.binned_counts(), hb.binned_counts())
        ma, mb = a.fields["x"].moments.compute(), b.fields["x"].moments.compute()
        assert ma["count"].tolist() == mb["count"].tolist()
        assert torch.allclose(ma["mean"], mb["mean"], rtol=1e-9) and torch.allclose(ma["var"], mb["var"], rtol=1e-9)
        assert a.fields["y"].labels.counts.tolist() == b.fields["y"].labels.counts.tolist()
    assert two.splits["val"].leakage == one.splits["val"].leakage == {"reference_split": "train", "count": 5,
                                                                       "fraction": 5 / 51}

    # decisions: the NaN rank 1 alone saw stops both ranks at the same step, with the step of the batch
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == ranks[0]["stop_step"] + 1
    assert ranks[0]["alerts"] == ranks[1]["alerts"]  # every rank took every decision
    assert ["data_nonfinite", 7, "train/x.1"] in ranks[0]["alerts"]
    # the scan before training (4 batches of each rank's shards) named the leak at step 0, on both ranks, and
    # the val end did not repeat it; the profile compared above is the streaming one, unchanged by the scan
    assert [a for a in ranks[0]["alerts"] if a[0] == "data_leakage"] == [["data_leakage", 0, "val/_all"]]
    # its collectives, the same on each rank: two MAX to agree on the batch counts, one MAX on the first batch's
    # input scale, one MAX and one SUM per split (train, val), one SUM of the nearest-neighbour label agreement
    # (labels_unrelated); its edges come from the reference
    assert ranks[0]["collectives"]["-1"] == ranks[1]["collectives"]["-1"] == 2 + 1 + 2 * 2 + 1
    assert one_writer(tmp_path / "ddp")
    # without a reference, the edges come from the first batch of each rank, averaged: the same everywhere
    assert ranks[0]["noref_edges"] == ranks[1]["noref_edges"]
    noref = DataProfile.load(str(tmp_path / "ddp" / "noref.json")).splits["train"].fields["x"]
    assert noref.histogram.compute()["total"].tolist() == [101] * 8
    # collectives: none on steps that are not logged; one SUM and one MAX per logged step and monitor;
    # one SUM at the first batch to agree on the edges of the monitor without a reference; once per run, at
    # the first logged step, one MAX per monitor to agree on the input scale of the first batches
    for r in ranks:
        per_step = {int(k): v for k, v in r["collectives"].items()}
        assert per_step.get(0) == 1 and all(per_step.get(s, 0) == 0 for s in (1, 2, 3, 5)), per_step
        assert per_step[4] == 2 * 2 + 2, per_step  # step 6 ends the epoch


def one_writer(directory: Any) -> bool:
    return (len(glob.glob(str(directory / "**" / "events.out.tfevents.*"), recursive=True)) == 1
            and len(glob.glob(str(directory / "**" / "alerts.jsonl"), recursive=True)) == 1)


# ------------------------------------------------------------------------ default policy: severities
def test_unnormalised_inputs_warn_once_at_the_first_batch_and_scaled_inputs_stay_quiet(tmp_path: Any) -> None:
    x, y = tabular(128, 0)
    fit(tmp_path / "raw", DataQualityMonitor(), loader(x * 6.0 + 5.0, y), max_steps=12)
    (alert,) = by_rule(tmp_path / "raw", "data_unnormalised")
    assert (alert["subject"], alert["severity"], alert["step"]) == ("train/x", "warning", 0)
    assert alert["value"] == pytest.approx(float((x[:16] * 6.0 + 5.0).mean()), rel=1e-4)
    assert "not standardised" in alert["message"] and "normalise the inputs" in alert["message"]
    # standardised inputs, and images in [0, 1] (mean 0.5 but unit scale), are not flagged
    fit(tmp_path / "std", DataQualityMonitor(), loader(x, y), max_steps=12)
    unit = torch.rand(128, 8, generator=torch.Generator().manual_seed(3))
    fit(tmp_path / "unit", DataQualityMonitor(), loader(unit, y), max_steps=12)
    fit(tmp_path / "off", DataQualityMonitor(checks={"unnormalised": None}), loader(x * 6.0 + 5.0, y), max_steps=12)
    for name in ("std", "unit", "off"):
        assert by_rule(tmp_path / name, "data_unnormalised") == [], name


def test_duplicates_are_info_when_few_and_a_warning_when_most_of_the_split(tmp_path: Any) -> None:
    x, y = tabular(128, 0)
    few = x.clone()
    few[100:104] = few[0:4]  # 3%: above the 1% info threshold
    fit(tmp_path / "few", DataQualityMonitor(), loader(few, y), max_steps=8)
    severities = {a["severity"] for a in by_rule(tmp_path / "few", "data_duplicates")}
    assert severities == {"info"}
    most = x[torch.arange(128) % 12]  # 116 of 128 rows repeat one of 12
    fit(tmp_path / "most", DataQualityMonitor(), loader(most, y), max_steps=8)
    (alert, *_) = by_rule(tmp_path / "most", "data_duplicates")
    assert alert["severity"] == "warning" and alert["value"] == pytest.approx(116 / 128)
    assert alert["threshold"] == pytest.approx(0.5)


def test_a_rare_class_is_a_warning_and_a_balanced_one_is_silent(tmp_path: Any) -> None:
    x, _ = tabular(128, 0)
    y = torch.arange(128) % 3
    rare = y.clone()
    rare[rare == 2] = torch.tensor([2, 2] + [0, 1] * 20)[: int((rare == 2).sum())]  # class 2: 2 of 128
    fit(tmp_path / "rare", DataQualityMonitor(num_classes=3), loader(x, rare), max_steps=8)
    (alert,) = by_rule(tmp_path / "rare", "data_class_imbalance")
    assert (alert["severity"], alert["subject"]) == ("warning", "train/y")
    assert "class 2" in alert["message"] and alert["threshold"] == pytest.approx(0.2 / 3)
    fit(tmp_path / "balanced", DataQualityMonitor(num_classes=3), loader(x, y), max_steps=8)
    assert by_rule(tmp_path / "balanced", "data_class_imbalance") == []


def test_drift_is_a_warning_only_when_psi_and_ks_are_both_large(tmp_path: Any) -> None:
    x, y = tabular(128, 0)
    vx, vy = tabular(64, 1)
    vx[:, 2] += 3.0  # one feature shifted by three standard deviations: PSI >> 0.5, KS ~ 0.9
    fit(tmp_path / "big", DataQualityMonitor(), loader(x, y), loader(vx, vy), max_steps=8)
    (alert, *_) = by_rule(tmp_path / "big", "data_drift")
    assert (alert["subject"], alert["severity"]) == ("val/x.2", "warning")
    # the same drift under a stricter escalation bar is reported at `info`
    monitor = DataQualityMonitor(checks={"drift": {"psi_warn": 1e6}})
    fit(tmp_path / "graded", monitor, loader(x, y), loader(vx, vy), max_steps=8)
    (alert, *_) = by_rule(tmp_path / "graded", "data_drift")
    assert (alert["subject"], alert["severity"]) == ("val/x.2", "info")
