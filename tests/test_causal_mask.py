"""``future_leak``: a next-token model that reads the tokens it must predict, found by a probe at the first batch."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from conftest import make_trainer, read_alerts, read_events, scalars
from lightwatch import GradientStatsMonitor
from lightwatch.checks.causal_mask import CallCapture, next_token_pair

VOCAB, LENGTH = 32, 12


class Tokens(Dataset):
    """Sequences of a repeating pattern; a dict (Hugging Face style, labels = inputs) or an (x, y) shifted pair."""

    def __init__(self, style: str, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.seq = (start + torch.arange(LENGTH + 1)) % VOCAB
        self.style = style

    def __len__(self) -> int:
        return len(self.seq)

    def __getitem__(self, i: int) -> Any:
        s = self.seq[i]
        if self.style == "dict":
            return {"input_ids": s[:-1], "labels": s[:-1].clone()}
        return s[:-1], s[1:]


class TinyLM(pl.LightningModule):
    """One transformer encoder layer used as a decoder: causal with ``mask=True``, reading the future without."""

    def __init__(self, causal: bool = True, style: str = "dict", feed_targets: bool = False) -> None:
        super().__init__()
        self.causal, self.style, self.feed_targets = causal, style, feed_targets
        self.embed = nn.Embedding(VOCAB, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.embed(tokens)
        if targets is not None:  # an encoder-decoder fed its targets (as Lightning's demo Transformer is)
            h = h + self.embed(targets)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1]) if self.causal else None
        return self.head(self.block(h, src_mask=mask, is_causal=self.causal))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.style == "dict":
            logits = self(batch["input_ids"])[:, :-1]
            labels = batch["labels"][:, 1:]
        else:
            x, y = batch
            logits, labels = self(x, y if self.feed_targets else None), y
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def run(tmp_path: Any, model: TinyLM, style: str) -> List[Dict[str, Any]]:
    trainer = make_trainer(tmp_path, [GradientStatsMonitor(every_n_steps=5)], max_steps=3)
    trainer.fit(model, DataLoader(Tokens(style), batch_size=16))
    return read_alerts(str(tmp_path))


@pytest.mark.parametrize("style", ["dict", "pair"])
def test_a_model_without_its_causal_mask_is_named_at_the_first_step(tmp_path: Any, style: str) -> None:
    torch.manual_seed(0)
    (alert,) = [a for a in run(tmp_path, TinyLM(causal=False, style=style), style) if a["rule"] == "future_leak"]
    assert alert["severity"] == "warning" and alert["step"] == 0 and alert["value"] > 1e-3
    assert alert["subject"] == "the module"  # the LightningModule itself got the tokens
    leak = scalars(read_events(str(tmp_path / "tb" / "version_0")), "monitor.diag/future_leak/ratio")
    assert list(leak) == [0] and leak[0] > 1e-3


@pytest.mark.parametrize("style", ["dict", "pair"])
def test_a_causal_model_reads_exactly_zero(tmp_path: Any, style: str) -> None:
    torch.manual_seed(0)
    assert "future_leak" not in [a["rule"] for a in run(tmp_path, TinyLM(causal=True, style=style), style)]
    leak = scalars(read_events(str(tmp_path / "tb" / "version_0")), "monitor.diag/future_leak/ratio")
    assert leak == {0: 0.0}


def test_no_probe_where_the_model_is_given_its_targets_or_the_batch_is_no_next_token_task(tmp_path: Any) -> None:
    torch.manual_seed(0)
    fed = run(tmp_path / "fed", TinyLM(causal=False, style="pair", feed_targets=True), "pair")
    assert "future_leak" not in [a["rule"] for a in fed]
    tokens = torch.randint(0, VOCAB, (8, LENGTH))
    assert next_token_pair({"input_ids": tokens, "labels": torch.randint(0, 3, (8,))}) is None  # classification
    masked = tokens.clone()
    masked[:, ::2] = 0  # masked-LM inputs: the labels differ from them where they are given
    assert next_token_pair({"input_ids": masked, "labels": tokens}) is None
    padded = tokens.clone()
    padded[:, 9:] = -100
    pair = next_token_pair({"input_ids": tokens, "labels": padded})
    assert pair is not None and pair.shift == 0 and pair.position == 4  # half of the shortest labelled stretch


def test_the_capture_keeps_the_outermost_call_and_removes_its_hooks() -> None:
    model = TinyLM()
    tokens = torch.randint(0, VOCAB, (2, LENGTH))
    capture = CallCapture(model, tokens)
    model(tokens)
    assert capture.module is model and capture.args[0] is tokens
    assert all(not m._forward_pre_hooks for m in model.modules())
