"""DataQualityMonitor on healthy third-party-style training: no false alarms, and real faults still caught.

Real Trainers and LightningModules; alerts read back from alerts.jsonl.
"""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from conftest import Classifier, read_alerts
from lightwatch.callbacks import DataQualityMonitor
from lightwatch.checks.data.class_imbalance import rarest_class_chance as _rarest_class_chance
from lightwatch.profile import DataProfile
from test_data_quality import Plant, by_rule, fit, loader, tabular

pytestmark = pytest.mark.filterwarnings("ignore::lightwatch.core.actions.MonitorWarning")
VOCAB = 200


def loud(tmp_path: Any) -> List[Dict[str, Any]]:
    return [a for a in read_alerts(str(tmp_path)) if a["severity"] != "info"]


# ------------------------------------------------------------------------- token batches (GPT-2 / BERT style)
def zipf(n: int, g: torch.Generator) -> torch.Tensor:
    p = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=g)


class Texts(Dataset):
    """Variable-length token sequences with Zipfian token frequencies."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = [zipf(int(torch.randint(6, 30, (1,), generator=g)), g) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.items[i]


def pad_to_longest(items: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A Hugging Face-style dynamic-padding collate: {input_ids, attention_mask, labels (-100 at padding)}."""
    length = max(len(t) for t in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(items):
        ids[i, :len(t)], mask[i, :len(t)] = t, 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class CausalLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

    def loss(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.head(self.embed(batch["input_ids"]))
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("scan", [0, 64])
def test_dynamically_padded_token_batches_raise_nothing(tmp_path: Any, scan: int) -> None:
    train = DataLoader(Texts(192, 0), batch_size=8, shuffle=True, collate_fn=pad_to_longest)
    val = DataLoader(Texts(64, 1), batch_size=8, collate_fn=pad_to_longest)
    path = str(tmp_path / "profile.json")
    monitor = DataQualityMonitor(scan_before_fit=scan, profile_path=path)
    fit(tmp_path, monitor, train, val, model=CausalLM(), max_steps=56, num_sanity_val_steps=2)
    assert loud(tmp_path) == []
    assert by_rule(tmp_path, "data_schema") == [] and by_rule(tmp_path, "data_class_imbalance") == []
    profile = DataProfile.load(path)
    ids = profile.splits["train"].fields["input_ids"]
    assert ids.shape == [None] and ids.num_features == 1  # a sequence of ids, one feature
    assert profile.splits["val"].fields["labels"].shape == [None]


def pad_into_labels(items: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The bug: labels copied from the padded input_ids, padding (id 0) included."""
    batch = pad_to_longest(items)
    batch["labels"] = batch["input_ids"].clone()
    return batch


@pytest.mark.parametrize("scan", [0, 64])
def test_labels_at_padded_positions_that_the_loss_counts_are_named(tmp_path: Any, scan: int) -> None:
    train = DataLoader(Texts(192, 0), batch_size=8, shuffle=True, collate_fn=pad_into_labels)
    fit(tmp_path, DataQualityMonitor(scan_before_fit=scan), train, model=CausalLM(), max_steps=12)
    (alert,) = by_rule(tmp_path, "data_padding_in_loss")
    assert (alert["severity"], alert["subject"], alert["step"]) == ("warning", "train/labels", 0)
    assert alert["value"] == 1.0 and "predict pad tokens" in alert["message"]


def test_a_real_schema_change_of_token_ids_or_float_features_is_still_an_error(tmp_path: Any) -> None:
    def to_int32(batch: Any) -> None:
        batch["input_ids"] = batch["input_ids"].to(torch.int32)

    class Int32LM(CausalLM):  # embeddings take int32 too: the run goes on, the schema change is reported
        pass

    fit(tmp_path / "ids", DataQualityMonitor(), DataLoader(Texts(64, 0), batch_size=8, collate_fn=pad_to_longest),
        model=Int32LM(), plant=Plant(train={5: to_int32}), max_steps=8)
    (alert,) = by_rule(tmp_path / "ids", "data_schema")
    assert alert["severity"] == "error" and "dtype int32 (expected int64)" in alert["message"]

    # a float feature dimension constant over the whole first epoch, then changed: an error
    x, y = tabular(64, 0)

    class Wider(Classifier):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x[:, :8])

    def widen(batch: Any) -> None:
        batch[0] = torch.cat([batch[0], batch[0][:, :2]], 1)

    fit(tmp_path / "float", DataQualityMonitor(), loader(x, y), model=Wider(), plant=Plant(train={6: widen}),
        max_steps=8)
    (alert,) = by_rule(tmp_path / "float", "data_schema")
    assert alert["severity"] == "error" and "10 features along dimension 1 (expected 8)" in alert["message"]


class Waves(Dataset):
    """Float sequences [T] of varying length (padded per batch): a float feature dimension that varies."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = [torch.randn(int(torch.randint(10, 20, (1,), generator=g)), generator=g) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i], torch.tensor(i % 2)


def pad_waves(items: List[Any]) -> Any:
    length = max(len(x) for x, _ in items)
    xs = torch.zeros(len(items), length)
    for i, (x, _) in enumerate(items):
        xs[i, :len(x)] = x
    return xs, torch.stack([y for _, y in items])


class PoolNet(Classifier):
    def __init__(self) -> None:
        super().__init__(in_features=1, classes=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.mean(1, keepdim=True))


def test_a_float_dimension_that_varies_in_the_first_epoch_is_variable_and_nan_is_still_found(tmp_path: Any) -> None:
    def nan(batch: Any) -> None:
        batch[0][1, -1] = float("nan")

    train = DataLoader(Waves(96, 0), batch_size=8, collate_fn=pad_waves)
    monitor = DataQualityMonitor()
    fit(tmp_path, monitor, train, DataLoader(Waves(32, 1), batch_size=8, collate_fn=pad_waves), model=PoolNet(),
        plant=Plant(train={16: nan}), max_steps=30)
    assert by_rule(tmp_path, "data_schema") == []
    (alert,) = by_rule(tmp_path, "data_nonfinite")
    assert alert["step"] == 16 and alert["subject"].startswith("train/x")
    assert monitor.profile.splits["train"].fields["x"].shape == [None]


# ------------------------------------------------------------------------------- sequence targets, imbalance
class DemoLM(pl.LightningModule):
    """Like Lightning's demo Transformer/LSTM: (input [B, T], target [B, T]) token tuples, target = input shifted."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.embed(x)).flatten(0, 1), y.flatten())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("scan", [0, 64])
def test_language_model_targets_are_not_judged_for_class_imbalance(tmp_path: Any, scan: int) -> None:
    g = torch.Generator().manual_seed(0)
    seq, vseq = zipf(192 * 33, g).reshape(192, 33), zipf(64 * 33, g).reshape(64, 33)
    fit(tmp_path, DataQualityMonitor(scan_before_fit=scan), loader(seq[:, :-1], seq[:, 1:], shuffle=True),
        loader(vseq[:, :-1], vseq[:, 1:]), model=DemoLM(), max_steps=36)
    assert loud(tmp_path) == []
    assert by_rule(tmp_path, "data_class_imbalance") == [] and by_rule(tmp_path, "data_label_shift") == []


def test_many_classes_few_labels_each_are_not_imbalance_but_a_rare_class_is(tmp_path: Any) -> None:
    # 200 classes, 3 labels each on average: some class has 0 by chance (a sample of this size shows it)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(600, 8, generator=g), torch.randint(0, 200, (600,), generator=g)
    fit(tmp_path / "many", DataQualityMonitor(num_classes=200), loader(x, y, batch_size=50),
        model=Classifier(classes=200), max_steps=12)
    assert by_rule(tmp_path / "many", "data_class_imbalance") == []
    assert _rarest_class_chance(0, 600, 200) == pytest.approx(1.0)
    # the fault suite's imbalance (10 classes, rarest share x C = 0.063 over ~830 labels) stays a warning
    y10 = torch.arange(830) % 10
    y10[(y10 == 7).nonzero()[5:]] = 0  # class 7 keeps 5 of 83 labels: share x C = 0.06
    fit(tmp_path / "rare", DataQualityMonitor(num_classes=10), loader(torch.randn(830, 8), y10, batch_size=64),
        model=Classifier(classes=10), max_steps=13)
    (alert,) = by_rule(tmp_path / "rare", "data_class_imbalance")
    assert alert["severity"] == "warning" and "class 7" in alert["message"]
    assert _rarest_class_chance(5, 830, 10) < 1e-20


# ---------------------------------------------------------------------------------------- input scale
class AdamClassifier(Classifier):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("transform, model, severity", [
    (lambda x: x * 2 + 3, AdamClassifier, "info"),     # N(3, 2^2), Adam: measured a mild cost -> info
    (lambda x: x * 2 + 3, Classifier, "warning"),      # the same under SGD: measured 10 points of accuracy
    (lambda x: x * 0.9 + 3, AdamClassifier, "warning"),  # an offset > 2 x the spread hurts Adam too
    (lambda x: torch.sigmoid(x), AdamClassifier, None),  # values in [0, 1]: quiet
    (lambda x: x, Classifier, None),                     # standardised: quiet
])
def test_unnormalised_severity_follows_the_measured_harm(tmp_path: Any, transform: Any, model: Any,
                                                         severity: Any) -> None:
    x, y = tabular(128, 0)
    fit(tmp_path, DataQualityMonitor(), loader(transform(x), y), model=model(), max_steps=6)
    alerts = by_rule(tmp_path, "data_unnormalised")
    assert [a["severity"] for a in alerts] == ([severity] if severity else [])
    if severity:
        assert ("Adam" in alerts[0]["message"]) == (model is AdamClassifier)


# ---------------------------------------------------------------------------------- a crash explained
def labels_with(bad_at: int, n: int, seed: int) -> List[torch.Tensor]:
    x, y = tabular(n, seed, classes=10)
    y[bad_at] = 12
    return [x, y]


@pytest.mark.parametrize("sanity, scan", [(2, 64), (2, 0), (0, 0), (0, 64)])
def test_a_val_label_that_crashes_the_loss_is_named_before_the_error(tmp_path: Any, sanity: int, scan: int) -> None:
    """Lightning's sanity check runs validation before training (and before the scan): the crash there is
    explained from the batch the model was given. Without it, the first validation (or the scan, at step 0)
    names the label before the crash, and the crash does not repeat it."""
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        fit(tmp_path, DataQualityMonitor(scan_before_fit=scan), loader(*tabular(128, 0, classes=10)),
            loader(*labels_with(21, 64, 1)), model=Classifier(classes=10), max_steps=16, num_sanity_val_steps=sanity)
    (alert,) = by_rule(tmp_path, "data_label_range")
    assert alert["subject"] == "val/y" and alert["severity"] == "error" and alert["threshold"] == 10
    assert "val batch 1" in alert["message"] and ("label value(s) 12" in alert["message"]
                                                  or "Largest label seen: 12" in alert["message"])
    assert ("sanity check" in alert["message"]) == bool(sanity)
    assert ("found by the data scan" in alert["message"]) == (scan > 0 and not sanity)


def test_a_train_label_that_crashes_the_loss_is_named_before_the_error(tmp_path: Any) -> None:
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        fit(tmp_path, DataQualityMonitor(), loader(*labels_with(100, 128, 0)), model=Classifier(classes=10),
            max_steps=16)
    (alert,) = by_rule(tmp_path, "data_label_range")
    assert alert["subject"] == "train/y" and alert["step"] == 6
    assert "label value(s) 12" in alert["message"] and "outside [0, 10)" in alert["message"]
    assert "last linear layer" in alert["message"]
