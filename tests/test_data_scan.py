"""DataQualityMonitor(scan_before_fit=N): data faults named before the first optimizer step.

Real Trainers, real LightningModules, real alert and event files. Every test compares a run with the scan
against the same run without it, or checks what the scan read.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from conftest import Classifier, make_trainer, read_alerts, read_events, scalars
from lightwatch.callbacks import DataQualityMonitor

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::lightwatch.core.actions.MonitorWarning")
SCAN = "found by the data scan before training"


# ------------------------------------------------------------------------------------------ helpers
def tabular(n: int, seed: int, classes: int = 3, features: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: the label is the largest of the first ``classes`` features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return x, x[:, :classes].argmax(1)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def fit(tmp_path: Any, monitor: DataQualityMonitor, train: Any, val: Any = None,
        model: Optional[pl.LightningModule] = None, max_steps: int = 16, callbacks: Optional[List[Any]] = None,
        **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    kwargs.setdefault("num_sanity_val_steps", 0)
    trainer = make_trainer(tmp_path, [monitor] + (callbacks or []), max_steps=max_steps,
                           limit_val_batches=None if val is not None else 0, **kwargs)
    trainer.fit(model or Classifier(), train, val)
    return trainer


def alerts(tmp_path: Any, rule: Optional[str] = None) -> List[Dict[str, Any]]:
    return [a for a in read_alerts(str(tmp_path)) if rule is None or a["rule"] == rule]


def leaked() -> Tuple[DataLoader, DataLoader]:
    """16 of the 64 val rows are train rows (val batches 0 to 3, train rows 10 to 25)."""
    x, y = tabular(128, 0)
    vx, vy = tabular(64, 1)
    vx[::4] = x[10:26]
    return loader(x, y, shuffle=True), loader(vx, vy)


def duplicated() -> Tuple[DataLoader, DataLoader]:
    x, y = tabular(128, 0)
    return loader(x[torch.arange(128) % 12], y, shuffle=True), loader(*tabular(64, 1))


def imbalanced() -> Tuple[DataLoader, DataLoader]:
    x, _ = tabular(128, 0)
    y = torch.arange(128) % 3
    y[y == 2] = torch.tensor([2, 2] + [0, 1] * 20)[: int((y == 2).sum())]  # class 2: 2 of 128 labels
    return loader(x, y, shuffle=True), loader(*tabular(64, 1))


def drifted() -> Tuple[DataLoader, DataLoader]:
    vx, vy = tabular(64, 1)
    vx[:, 2] += 3.0  # three standard deviations: PSI >> 0.5 and KS ~ 0.9, a warning
    return loader(*tabular(128, 0), shuffle=True), loader(vx, vy)


FAULTS = {
    "leakage": (leaked, "data_leakage", "val/_all"),
    "duplicates": (duplicated, "data_duplicates", "train/_all"),
    "imbalance": (imbalanced, "data_class_imbalance", "train/y"),
    "drift": (drifted, "data_drift", "val/x.2"),
}


# ------------------------------------------------------------------------------ faults at step 0
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_split_faults_are_named_at_step_0_with_the_scan_and_only_later_without_it(tmp_path: Any, fault: str) -> None:
    make, rule, subject = FAULTS[fault]
    fit(tmp_path / "stream", DataQualityMonitor(), *make())
    (late, *_) = alerts(tmp_path / "stream", rule)
    assert late["step"] >= 7 and SCAN not in late["message"]  # the first val end or train epoch end (8 steps)

    fit(tmp_path / "scan", DataQualityMonitor(scan_before_fit=8), *make())
    found = alerts(tmp_path / "scan", rule)
    assert len(found) == 1, found  # the training-time check does not say it again
    (early,) = found
    assert (early["step"], early["subject"], early["severity"]) == (0, subject, late["severity"])
    assert early["source"] == "DataQualityMonitor" and early["action"] == "warn"
    assert early["message"].endswith(f"[{SCAN}: 8 train and 4 val batch(es) read before the first optimizer step]")


def test_batch_faults_are_named_at_step_0_with_the_batch_of_the_scan_and_not_repeated(tmp_path: Any) -> None:
    x, y = tabular(128, 0)
    x[40, 3] = float("nan")  # row 40: batch 2 of the scan (and of training at steps 2 and 10)
    monitor = DataQualityMonitor(scan_before_fit=4)
    fit(tmp_path, monitor, loader(x * 6.0 + 5.0, y), loader(*tabular(64, 1)), max_steps=12)
    (nan,) = alerts(tmp_path, "data_nonfinite")
    assert (nan["step"], nan["subject"], nan["severity"]) == (0, "train/x.3", "error")
    assert "first in train batch 2 of the scan" in nan["message"] and SCAN in nan["message"]
    (scale,) = alerts(tmp_path, "data_unnormalised")
    assert (scale["step"], scale["subject"]) == (0, "train/x") and SCAN in scale["message"]
    # the streaming checks still count what they see (both epochs): their curves are unchanged by the scan
    acc = read_events(str(tmp_path / "tb" / "version_0"))
    assert sum(scalars(acc, "monitor.data/train/x/nonfinite").values()) == 2


def test_clean_data_raises_nothing(tmp_path: Any) -> None:
    for seed in (0, 1):
        fit(tmp_path / str(seed), DataQualityMonitor(scan_before_fit=64), loader(*tabular(256, seed), shuffle=True),
            loader(*tabular(96, seed + 100)), max_steps=24)
        assert [a for a in alerts(tmp_path / str(seed)) if SCAN in a["message"]] == []
        assert [a for a in alerts(tmp_path / str(seed)) if a["severity"] != "info"] == []


def test_a_class_sorted_split_read_in_part_is_not_taken_for_label_shift(tmp_path: Any) -> None:
    x, y = tabular(192, 0)
    vx, vy = tabular(96, 1)
    order = torch.argsort(vy, stable=True)  # val sorted by class, read in order: its first batches hold class 0
    fit(tmp_path, DataQualityMonitor(scan_before_fit=2), loader(x, y, shuffle=True), loader(vx[order], vy[order]),
        max_steps=12)
    assert [a for a in alerts(tmp_path) if SCAN in a["message"]] == []


def test_a_louder_finding_during_training_is_still_reported(tmp_path: Any) -> None:
    x, y = tabular(128, 0)
    x[28:32] = x[0:4]  # the scan's 32 rows hold 4 copies: 12.5%, info
    x[32:] = x[torch.arange(96) % 4]  # the whole epoch: 100 of 128, above half: a warning
    fit(tmp_path, DataQualityMonitor(scan_before_fit=2), loader(x, y), max_steps=8)
    early, late = alerts(tmp_path, "data_duplicates")
    assert (early["step"], early["severity"]) == (0, "info") and SCAN in early["message"]
    assert (late["step"], late["severity"]) == (8, "warning") and SCAN not in late["message"]


def test_a_stop_action_stops_before_the_first_step(tmp_path: Any) -> None:
    trainer = fit(tmp_path, DataQualityMonitor(scan_before_fit=4, checks={"leakage": {"action": "stop"}}), *leaked())
    assert trainer.global_step == 0
    (alert,) = alerts(tmp_path, "data_leakage")
    assert alert["action"] == "stop" and alert["step"] == 0


# ------------------------------------------------------------------------ the run is unchanged
class Augmented(Dataset):
    """Rows with noise from Python's, NumPy's and torch's global generators: any draw the scan made and
    did not put back would change the data the training steps get."""

    def __init__(self, n: int, seed: int) -> None:
        self.x, self.y = tabular(n, seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        noise = random.random() + float(np.random.rand()) + torch.rand(1)
        return self.x[i] + 0.01 * noise, self.y[i]


class Recorder(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.seen: List[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch[0].clone())
        return super().training_step(batch, batch_idx) + 0.0 * torch.rand(())  # training draws from the RNG too


@pytest.mark.parametrize("sanity", [0, 2])
def test_training_sees_the_same_batches_with_and_without_the_scan(tmp_path: Any, sanity: int) -> None:
    def run(scan: int, variant: str) -> Recorder:
        pl.seed_everything(0, verbose=False)  # the same initial weights
        g = torch.Generator().manual_seed(7) if variant == "own generator" else None
        # one worker that lives through the epochs: it augments with its own seeded generators
        workers = {"num_workers": 1, "persistent_workers": True} if variant == "worker" else {}
        train = DataLoader(Augmented(96, 0), batch_size=16, shuffle=True, generator=g, **workers)
        val = DataLoader(Augmented(48, 1), batch_size=16)
        model = Recorder()
        fit(tmp_path / f"{scan}{variant}", DataQualityMonitor(scan_before_fit=scan), train, val, model=model,
            max_steps=14, num_sanity_val_steps=sanity)
        return model

    for variant in ("global generator", "own generator") + (("worker",) if sanity else ()):
        plain, scanned = run(0, variant), run(4, variant)
        assert len(plain.seen) == len(scanned.seen) == 14  # two epochs and a half, validation in between
        assert all(torch.equal(a, b) for a, b in zip(plain.seen, scanned.seen))
        assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), scanned.parameters()))


def test_the_streaming_hashes_do_not_count_the_scanned_rows(tmp_path: Any) -> None:
    monitor = DataQualityMonitor(scan_before_fit=64)
    fit(tmp_path, monitor, *leaked(), max_steps=8)
    acc = read_events(str(tmp_path / "tb" / "version_0"))
    assert set(scalars(acc, "monitor.data/train/_all/dup_count").values()) == {0.0}
    assert list(scalars(acc, "monitor.data/val/_all/leak_count").values()) == [16.0]
    assert monitor.profile.splits["train"].duplicates["duplicates"] == 0
    assert monitor.profile.splits["val"].leakage["count"] == 16 and monitor.profile.splits["train"].samples == 128


# ------------------------------------------------------------------------------ what is read
class Counted(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.x, self.y = tabular(n, seed)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        return self.x[i], self.y[i]


class ReadsAtStart(pl.Callback):
    """Placed after the monitor: what had been read when training starts."""

    def __init__(self, *datasets: Counted) -> None:
        self.datasets, self.reads = datasets, None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.reads = [d.reads for d in self.datasets]


def test_the_scan_reads_at_most_n_batches_of_each_split(tmp_path: Any) -> None:
    train, val_a, val_b = Counted(160, 0), Counted(64, 1), Counted(24, 2)

    class TwoVal(Classifier):
        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            super().validation_step(batch, batch_idx)

    probe = ReadsAtStart(train, val_a, val_b)
    fit(tmp_path, DataQualityMonitor(scan_before_fit=3), DataLoader(train, batch_size=16, shuffle=True),
        [DataLoader(val_a, batch_size=16), DataLoader(val_b, batch_size=16)], model=TwoVal(), max_steps=4,
        callbacks=[probe])
    assert probe.reads == [3 * 16, 3 * 16, 24]  # the second val loader has 2 batches only
    probe = ReadsAtStart(train)
    train.reads = 0
    fit(tmp_path / "limited", DataQualityMonitor(scan_before_fit=64), DataLoader(train, batch_size=16), max_steps=2,
        limit_train_batches=5, callbacks=[probe])
    assert probe.reads == [5 * 16]  # never more than an epoch of training reads


class Stream(IterableDataset):
    """A stream that reading consumes: what the scan read, training would never see."""

    def __init__(self, n: int) -> None:
        self.x, self.y = tabular(n, 0)
        self.produced = 0

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self.x)):
            self.produced += 1
            yield self.x[i], self.y[i]


def test_iterable_datasets_are_skipped_unless_forced(tmp_path: Any, caplog: Any) -> None:
    stream = Stream(64)
    probe = ReadsAtStart()
    with caplog.at_level(logging.INFO, logger="lightwatch"):
        fit(tmp_path / "skip", DataQualityMonitor(scan_before_fit=4), DataLoader(stream, batch_size=16),
            loader(*tabular(32, 1)), max_steps=2, callbacks=[probe])
    notes = [r.getMessage() for r in caplog.records if "IterableDataset" in r.getMessage()]
    assert len(notes) == 1 and "scan_iterable=True" in notes[0]
    plain = Stream(64)
    fit(tmp_path / "plain", DataQualityMonitor(), DataLoader(plain, batch_size=16), loader(*tabular(32, 1)),
        max_steps=2)
    assert stream.produced == plain.produced == 3 * 16  # two steps and the batch Lightning fetches ahead
    fit(tmp_path / "forced", DataQualityMonitor(scan_before_fit=4, scan_iterable=True),
        DataLoader(Stream(64), batch_size=16), None, max_steps=1)
    assert alerts(tmp_path / "forced") == []


@pytest.mark.parametrize("setting", [{"num_sanity_val_steps": 2}, {"num_sanity_val_steps": 0},
                                     {"check_val_every_n_epoch": 2}])
def test_val_dataloaders_are_scanned_however_validation_is_scheduled(tmp_path: Any, setting: Dict[str, int]) -> None:
    fit(tmp_path, DataQualityMonitor(scan_before_fit=8), *leaked(), max_steps=4, **setting)
    (alert,) = alerts(tmp_path, "data_leakage")
    assert (alert["step"], alert["subject"]) == (0, "val/_all") and SCAN in alert["message"]
    # without validation there is no val split to scan, and the run goes on
    fit(tmp_path / "noval", DataQualityMonitor(scan_before_fit=8), leaked()[0], max_steps=2)
    assert alerts(tmp_path / "noval") == []


def test_a_resumed_run_does_not_scan_again(tmp_path: Any) -> None:
    train, val = leaked()
    first = fit(tmp_path / "a", DataQualityMonitor(scan_before_fit=8), train, val, max_steps=4)
    path = str(tmp_path / "step4.ckpt")
    first.save_checkpoint(path)

    def resume(directory: str, monitor: DataQualityMonitor) -> None:
        pl.seed_everything(0, verbose=False)
        trainer = make_trainer(tmp_path / directory, [monitor], max_steps=12, limit_val_batches=None,
                               num_sanity_val_steps=0)
        trainer.fit(Classifier(), train, val, ckpt_path=path)

    # the monitor's state says the scan ran and what it reported: the first val end does not repeat it
    resume("b", DataQualityMonitor(scan_before_fit=8))
    assert alerts(tmp_path / "b", "data_leakage") == []
    # a monitor without state in the checkpoint (another state key) sees global_step 4: no scan either
    resume("c", DataQualityMonitor(scan_before_fit=8, profile_path=str(tmp_path / "other.json")))
    (alert,) = alerts(tmp_path / "c", "data_leakage")
    assert alert["step"] >= 7 and SCAN not in alert["message"]  # at the val end of the first epoch


@pytest.mark.parametrize("value", [-1, 1.5, True, "64"])
def test_bad_scan_arguments_say_what_to_do(value: Any) -> None:
    with pytest.raises(ValueError, match=r"scan_before_fit must be an integer >= 0 .*0 turns the scan off"):
        DataQualityMonitor(scan_before_fit=value)
    with pytest.raises(ValueError, match="scan_iterable must be true or false"):
        DataQualityMonitor(scan_iterable="yes")  # type: ignore[arg-type]


def test_the_hydra_policies_set_the_scan() -> None:
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException

    from lightwatch.hydra import instantiate_monitors

    def data_monitor(*overrides: str) -> DataQualityMonitor:
        (monitor,) = [cb for cb in instantiate_monitors(compose(overrides=list(overrides)).monitor)
                      if isinstance(cb, DataQualityMonitor)]
        return monitor

    with initialize_config_module("lightwatch.conf", version_base="1.3"):
        assert data_monitor("+monitor=default").scan_before_fit == 64  # data_quality=basic
        assert data_monitor("+monitor=strict").scan_before_fit == 64
        assert data_monitor("+monitor=default", "monitor/data_quality=light").scan_before_fit == 0
        monitor = data_monitor("+monitor=default", "monitor.data_quality.scan_before_fit=8",
                               "monitor.data_quality.scan_iterable=true")
        assert (monitor.scan_before_fit, monitor.scan_iterable) == (8, True)
        with pytest.raises(ConfigCompositionException):
            compose(overrides=["+monitor=default", "monitor.data_quality.scan_before_fit=many"])


# ----------------------------------------------------------------------------- labels unrelated to inputs
def test_shuffled_labels_are_named_before_training_and_again_when_the_loss_stays_up(tmp_path: Any) -> None:
    from lightwatch.callbacks import MetricMonitor

    x, y = tabular(512, 0)
    shuffled = y[torch.randperm(512, generator=torch.Generator().manual_seed(1))]
    fit(tmp_path / "shuffled", DataQualityMonitor(scan_before_fit=64), loader(x, shuffled, shuffle=True),
        max_steps=80, model=Classifier(lr=0.2), callbacks=[MetricMonitor(every_n_steps=5)])
    found = alerts(tmp_path / "shuffled", "data_labels_unrelated")[0]
    assert (found["step"], found["severity"], found["subject"]) == (0, "info", "train/_all")
    assert found["value"] < 3 and SCAN in found["message"]
    # the run then does not learn: loss_not_learning takes the name of the finding that explains it
    (gate,) = [a for a in alerts(tmp_path / "shuffled") if a["source"] == "MetricMonitor"]
    assert (gate["rule"], gate["severity"]) == ("data_labels_unrelated", "warning")
    assert "That is the likely cause" in gate["message"]
    # the same data with its labels in place: the labels follow the inputs (z far above 3), nothing is said
    fit(tmp_path / "paired", DataQualityMonitor(scan_before_fit=64), loader(x, y, shuffle=True), max_steps=4)
    assert alerts(tmp_path / "paired", "data_labels_unrelated") == []


def test_too_few_rows_or_a_switched_off_check_say_nothing(tmp_path: Any) -> None:
    x, y = tabular(512, 0)
    shuffled = y.flip(0)
    fit(tmp_path / "few", DataQualityMonitor(scan_before_fit=8), loader(x, shuffled), max_steps=2)  # 128 rows
    assert alerts(tmp_path / "few", "data_labels_unrelated") == []
    fit(tmp_path / "off", DataQualityMonitor(scan_before_fit=64, checks={"labels_unrelated": None}),
        loader(x, shuffled), max_steps=2)
    assert alerts(tmp_path / "off", "data_labels_unrelated") == []
