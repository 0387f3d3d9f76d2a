"""The reference workloads of the overhead benchmark: synthetic data, no I/O, plain LightningModules."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Task(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 128, layers: int = 4, seq: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos))


def deep_mlp(depth: int = 32, width: int = 256) -> nn.Module:
    layers = [nn.Linear(64, width)]
    for _ in range(depth - 1):
        layers += [nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, width)]
    layers += [nn.ReLU(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


class ResidualStack(nn.Module):
    """``blocks`` residual blocks ``x + Linear(GELU(LayerNorm(Linear(x))))``: many small modules, little work each."""

    def __init__(self, blocks: int = 128, width: int = 64, inputs: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, width))
            for _ in range(blocks))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def wide_mlp(depth: int = 6, width: int = 4096) -> nn.Module:
    """About 100M parameters (1.2 GB with AdamW's state): where the memory lightwatch adds is judged against
    the model's, past the fixed costs that dominate on the small reference workloads."""
    layers: List[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))


def _loader(x: torch.Tensor, y: torch.Tensor, batch: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False, drop_last=True)


def make(name: str, steps: int) -> Tuple[Callable[[], pl.LightningModule], DataLoader]:
    """``(model factory, loader with at least `steps` batches)`` for a workload name."""
    g = torch.Generator().manual_seed(0)
    if name == "cnn":
        batch = 32
        x, y = torch.randn(steps * batch, 3, 32, 32, generator=g), torch.randint(0, 10, (steps * batch,), generator=g)
        return (lambda: Task(small_cnn())), _loader(x, y, batch)
    if name == "transformer":
        batch = 16
        x = torch.randint(0, 1000, (steps * batch, 64), generator=g)
        return (lambda: Task(TinyTransformer())), _loader(x, x.roll(-1, dims=1), batch)
    if name == "mlp":
        batch = 64
        x, y = torch.randn(steps * batch, 64, generator=g), torch.randint(0, 10, (steps * batch,), generator=g)
        return (lambda: Task(deep_mlp())), _loader(x, y, batch)
    if name == "many_modules":
        batch = 32
        x, y = torch.randn(steps * batch, 64, generator=g), torch.randint(0, 10, (steps * batch,), generator=g)
        return (lambda: Task(ResidualStack())), _loader(x, y, batch)
    if name == "wide":
        batch = 16
        x = torch.randn(steps * batch, 4096, generator=g)
        y = torch.randint(0, 10, (steps * batch,), generator=g)
        return (lambda: Task(wide_mlp())), _loader(x, y, batch)
    if name == "tiny":
        batch = 8
        x, y = torch.randn(steps * batch, 16, generator=g), torch.randint(0, 10, (steps * batch,), generator=g)
        return (lambda: Task(tiny_mlp())), _loader(x, y, batch)
    raise ValueError(f"unknown workload {name!r}; use one of "
                     f"{', '.join(list(WORKLOADS) + list(LARGE_WORKLOADS) + list(SMOKE_WORKLOADS))}")


WORKLOADS: Dict[str, str] = {
    "cnn": "(a) small CNN, CIFAR-size batch of 32",
    "transformer": "(b) tiny transformer, 4 layers, d=128, seq 64, batch 16",
    "mlp": "(c) deep MLP, 32 x [Linear 256, LayerNorm, ReLU], batch 64",
    "many_modules": "(d) 128 residual blocks [Linear 64, LayerNorm, GELU, Linear 64], 514 leaf modules, batch 32",
}
"""The reference workloads, by name: what the benchmarks run unless told otherwise."""

LARGE_WORKLOADS: Dict[str, str] = {
    "wide": "(e) wide MLP, 6 x [Linear 4096, ReLU], batch 16: 100M parameters, 1.2 GB with AdamW's state "
            "(memory at scale; seconds a step on a CPU)",
}
"""Workloads for the memory measurement at scale: run on request (``--workloads wide``), not by default."""

SMOKE_WORKLOADS: Dict[str, str] = {
    "tiny": "tiny MLP [Linear 32, ReLU, Linear 10], batch 8 (smoke tests of the benchmarks, not a reference)",
}


def describe(name: str) -> str:
    """The one-line description of a workload, reference or smoke."""
    return {**WORKLOADS, **LARGE_WORKLOADS, **SMOKE_WORKLOADS}[name]
