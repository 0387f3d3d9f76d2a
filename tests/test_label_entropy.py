"""``loss_at_label_entropy``: a loss that came down to the entropy of its labels and stays there."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from conftest import Classifier, make_trainer, read_alerts
from lightwatch.callbacks import MetricMonitor
from lightwatch.checks.label_entropy import LabelEntropyCheck, label_entropy

VOCAB = 32


def markov_sequences(n: int, length: int = 25, seed: int = 0) -> torch.Tensor:
    """Token sequences of a chain whose tokens have skewed frequencies and two likely successors each."""
    g = torch.Generator().manual_seed(seed)
    base = -0.25 * torch.arange(VOCAB, dtype=torch.float)  # Zipf-like: a unigram entropy well below log(vocab)
    logits = base.repeat(VOCAB, 1)
    for i in range(VOCAB):
        logits[i, torch.randperm(VOCAB, generator=g)[:2]] += 4.0
    p = logits.softmax(1)
    seqs = torch.empty(n, length, dtype=torch.long)
    seqs[:, 0] = torch.multinomial(base.softmax(0), n, replacement=True, generator=g)
    for t in range(1, length):
        seqs[:, t] = torch.multinomial(p[seqs[:, t - 1]], 1, generator=g).squeeze(1)
    return seqs


def token_loader(shuffle_labels: bool, n: int = 512, seed: int = 0) -> DataLoader:
    """``{"input_ids", "labels"}`` batches: the labels are the next tokens, -100 past each sequence's end."""
    seqs = markov_sequences(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(12, seqs.size(1), (n,), generator=g)

    def collate(items: List[int]) -> Dict[str, torch.Tensor]:
        ids = seqs[items, :-1].clone()
        labels = seqs[items, 1:].clone()
        for row, i in enumerate(items):
            n_real = int(lengths[i])
            if shuffle_labels:  # the fault: labels permuted within each sequence, their frequencies kept
                labels[row, :n_real] = labels[row, :n_real][torch.randperm(n_real, generator=g)]
            labels[row, n_real:] = -100
        return {"input_ids": ids, "labels": labels}

    return DataLoader(list(range(n)), batch_size=16, shuffle=False, collate_fn=collate)


class BigramLM(pl.LightningModule):
    """Predicts the next token from the current one: it goes below the unigram entropy when labels follow inputs."""

    def __init__(self, lr: float = 0.03) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 32)
        self.head = torch.nn.Linear(32, VOCAB)
        self.lr = lr

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.head(self.embed(batch["input_ids"]))
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), ignore_index=-100)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def alerts_of(tmp_path: Any, model: pl.LightningModule, loader: DataLoader, max_steps: int = 130,
              **monitor_kwargs: Any) -> List[dict]:
    trainer = make_trainer(tmp_path, [MetricMonitor(every_n_steps=10, **monitor_kwargs)], max_steps=max_steps)
    trainer.fit(model, loader)
    return [a for a in read_alerts(str(tmp_path)) if a["severity"] != "info"]


def test_the_entropy_leaves_out_ignored_positions_and_corrects_for_finite_counts() -> None:
    h, n, k = label_entropy(torch.tensor([[0, 1, -100], [2, 3, -100]]))
    assert (n, k) == (4, 4) and h == pytest.approx(torch.log(torch.tensor(4.0)).item() + 3 / 8)
    assert label_entropy(torch.tensor([5, 5, -100])) is None  # one label: nothing to judge


def test_float_targets_close_the_check() -> None:
    check = LabelEntropyCheck("loss")
    check.observe((torch.zeros(4, 3), torch.zeros(4)))
    assert check.checked and not check.collecting


def test_the_check_keeps_its_entropy_and_place_in_a_checkpoint() -> None:
    check = LabelEntropyCheck("loss")
    check.observe((torch.zeros(4, 3), torch.tensor([0, 1, 2, 2])))
    check.entropy()
    check.near, check.next_evaluation = 1, 118
    restored = LabelEntropyCheck("loss")
    restored.load_state_dict(check.state_dict())
    assert (restored.entropy(), restored.near, restored.next_evaluation) == (check.entropy(), 1, 118)
    assert not restored.collecting


@pytest.mark.parametrize("rules", [None, {"loss_not_learning": None}])
def test_labels_shuffled_within_each_sequence_are_named(tmp_path: Any, seed: int, rules: Any) -> None:
    (alert,) = alerts_of(tmp_path, BigramLM(), token_loader(shuffle_labels=True), rules=rules)
    assert (alert["rule"], alert["severity"], alert["subject"]) == ("loss_at_label_entropy", "warning",
                                                                    "monitor.step/loss")
    assert alert["step"] == 119 and "labels likely do not belong to their inputs" in alert["message"]
    assert alert["value"] >= 0.97


def test_a_healthy_language_model_and_a_switched_off_check_stay_quiet(tmp_path: Any, seed: int) -> None:
    assert alerts_of(tmp_path / "healthy", BigramLM(), token_loader(shuffle_labels=False)) == []
    off = alerts_of(tmp_path / "off", BigramLM(), token_loader(shuffle_labels=True),
                    rules={"loss_at_label_entropy": None})
    assert off == []


def test_a_slow_healthy_classifier_stays_quiet(tmp_path: Any, seed: int) -> None:
    from test_metric_monitor import labelled_loader

    # SGD at 0.02: the loss starts at the labels' entropy and falls slowly below it
    assert alerts_of(tmp_path, Classifier(lr=0.02), labelled_loader(shuffle_labels=False), max_steps=260) == []


def test_a_loss_at_the_label_entropy_twice_is_named_after_an_earlier_cause_when_there_is_one() -> None:
    from types import SimpleNamespace

    check = LabelEntropyCheck("loss")
    check.observe((torch.zeros(4, 3), torch.tensor([0, 1, 2, 2])))
    h = check.entropy()
    zeroed = SimpleNamespace(rule="init_zero", subject="embed.weight", step=0, source="GradientStatsMonitor",
                             message="the embedding is all zeros.")
    assert check.judge(59, 1.2 * h, h, 0.01, 5.0, lambda: zeroed)[1] is None  # at H once: may be passing through
    finding = check.judge(119, 1.2 * h, 0.99 * h, 0.01, 1.0, lambda: zeroed)[1]
    assert (finding.rule, finding.severity, finding.subject) == ("init_zero", "warning", "embed.weight")
    assert "That is the likely cause" in finding.message
