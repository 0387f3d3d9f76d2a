"""Shared test helpers: small real LightningModules, real Trainers, real event files."""
from __future__ import annotations

import glob
import json
import os
import warnings
from typing import Any, Dict, List

import importlib
import importlib.abc
import importlib.util
import sys

import pytest


class _LightningAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import pytorch_lightning[.x]`` give ``lightning.pytorch[.x]`` (and ``lightning_fabric`` give
    ``lightning.fabric``): the same tests then run against the ``import lightning as L`` package, with
    lightwatch's callbacks bound to it. Set ``LIGHTWATCH_TEST_LIGHTNING=lightning`` to use it."""

    ALIASES = (("pytorch_lightning", "lightning.pytorch"), ("lightning_fabric", "lightning.fabric"))

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        for alias, real in self.ALIASES:
            if name == alias or name.startswith(alias + "."):
                return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec: Any) -> Any:
        for alias, real in self.ALIASES:
            if spec.name == alias or spec.name.startswith(alias + "."):
                module = importlib.import_module(real + spec.name[len(alias):])
                sys.modules[spec.name] = module
                return module
        return None

    def exec_module(self, module: Any) -> None:
        pass  # the real module is already executed


#: which Lightning package these tests run against: "pytorch_lightning" (default) or "lightning"
LIGHTNING = os.environ.get("LIGHTWATCH_TEST_LIGHTNING", "pytorch_lightning")
if LIGHTNING == "lightning":
    sys.meta_path.insert(0, _LightningAlias())

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available.*")


class Classifier(pl.LightningModule):
    """A plain ``(x, y)`` classifier: an MLP by default."""

    def __init__(self, in_features: int = 8, hidden: int = 16, classes: int = 3, depth: int = 2, lr: float = 0.05,
                 activation: str = "relu") -> None:
        super().__init__()
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[activation]
        layers: List[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), act()]
            width = hidden
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class WarmedUpClassifier(Classifier):
    """:class:`Classifier` whose learning rate rises linearly from ~0 over ``warmup`` steps (per-step schedule)."""

    def __init__(self, warmup: int, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.warmup = warmup

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / self.warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def make_loader(n: int = 128, in_features: int = 8, classes: int = 3, batch_size: int = 16, seed: int = 0,
                shuffle: bool = False) -> DataLoader:
    """A learnable task: the label is the largest of the first ``classes`` features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = x[:, :classes].argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def make_trainer(tmp_path: Any, callbacks: List[Any], max_steps: int = 20, log_every_n_steps: int = 5,
                 **kwargs: Any) -> pl.Trainer:
    from pytorch_lightning.loggers import TensorBoardLogger

    kwargs.setdefault("logger", TensorBoardLogger(str(tmp_path), name="tb", version=0))
    return pl.Trainer(
        default_root_dir=str(tmp_path), max_steps=max_steps, log_every_n_steps=log_every_n_steps,
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False), accelerator="cpu", devices=1,
        limit_val_batches=kwargs.pop("limit_val_batches", 0), **kwargs,
    )


def read_events(log_dir: str) -> Any:
    """An ``EventAccumulator`` over ``log_dir`` keeping everything (size_guidance 0)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: Any, tag: str) -> Dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def read_alerts(directory: str) -> List[Dict[str, Any]]:
    paths = glob.glob(os.path.join(directory, "**", "alerts.jsonl"), recursive=True)
    out: List[Dict[str, Any]] = []
    for p in paths:
        with open(p) as fh:
            out += [json.loads(line) for line in fh]
    return out


@pytest.fixture
def seed() -> int:
    pl.seed_everything(0, workers=True)
    return 0


def shutdown_distributed() -> None:
    """End a torchrun test script in order: Lightning leaves the process group up after ``fit``, and tearing
    gloo down at interpreter exit can abort a rank ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
