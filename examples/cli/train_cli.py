"""LightningCLI with lightwatch's callbacks configured from YAML.

Run from the repository root::

    python examples/cli/train_cli.py fit --config examples/cli/lightwatch.yaml

Every callback takes its arguments under ``init_args``; LightningCLI validates them against the constructors'
type hints, so a misspelt argument stops the run before training with "Option '...' is not accepted". With
``import lightning as L``, use ``lightning.pytorch.cli.LightningCLI`` and ``class_path: lightwatch.lightning.*``.
"""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI


class DigitsClassifier(pl.LightningModule):
    """An MLP on scikit-learn's digits (8x8 images, 10 classes)."""

    def __init__(self, hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Digits(pl.LightningDataModule):
    """scikit-learn's digits, standardised with the training split's statistics."""

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32)
        y = torch.tensor(y)
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(x), generator=g)
        train, val = order[:1500], order[1500:]
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
        self.train_set = TensorDataset((x[train] - mean) / std, y[train])
        self.val_set = TensorDataset((x[val] - mean) / std, y[val])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


if __name__ == "__main__":
    torch.set_num_threads(1)
    LightningCLI(DigitsClassifier, Digits)
