"""The small models of the fault suite and the LightningModule that trains them.

Every network is an ``nn.Sequential`` of named layers under ``self.net``, so parameter and module names
read like ``net.fc1.weight`` or ``net.act2`` in alerts and TensorBoard tags, and a fault's location is
a name you can find in ``named_modules()``.

- ``mlp``: 64 -> 64 -> 32 -> 10 with ReLU (or tanh/sigmoid) units;
- ``cnn``: the 8x8 image through two 3x3 convolutions and a max-pool, then a linear head;
- ``gru``: the image read row by row (8 steps of 8 pixels) by a GRU, then a linear head;
- ``deep``: ``depth`` equal hidden layers, optionally with LayerNorm (the healthy deep net has it).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from .data import CLASSES, FEATURES

__all__ = ["ACTIVATIONS", "DigitsClassifier", "GRUHead", "PartialSoftmax", "accuracy", "build_net"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class GRUHead(nn.Module):
    """Reads a 64-pixel image as 8 rows of 8 pixels and returns the GRU's last hidden state."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.gru = nn.GRU(8, hidden, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.reshape(x.shape[0], 8, 8))
        return out[:, -1]


class PartialSoftmax(nn.Module):
    """``(1 - weight) * z + weight * softmax(z)``: a softmax left in front of a loss that expects logits.

    ``weight = 1`` is the plain mistake (an ``nn.Softmax`` as the last layer); smaller weights are milder
    doses of it, for severity sweeps.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p = z.softmax(-1)
        return p if self.weight == 1.0 else (1.0 - self.weight) * z + self.weight * p


def build_net(model: str = "mlp", hidden: Sequence[int] = (64, 32), activation: str = "relu", depth: int = 8,
              width: int = 64, norm: bool = False, softmax_weight: float = 0.0) -> nn.Sequential:
    """A named ``nn.Sequential`` for one of the suite's architectures.

    Args:
        model: ``mlp``, ``cnn``, ``gru`` or ``deep``.
        hidden: hidden widths of ``mlp``.
        activation: ``relu``, ``tanh`` or ``sigmoid`` (``mlp`` and ``deep``).
        depth: number of hidden layers of ``deep``.
        width: hidden width of ``deep``.
        norm: LayerNorm before each activation of ``deep``.
        softmax_weight: > 0 appends a (partial) softmax named ``softmax`` after the output layer.

    Example:
        >>> [name for name, _ in build_net("mlp").named_children()]
        ['fc1', 'act1', 'fc2', 'act2', 'out']
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"build_net: unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}.")
    act = ACTIVATIONS[activation]
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    if model == "mlp":
        width_in = FEATURES
        for i, h in enumerate(hidden, 1):
            layers[f"fc{i}"] = nn.Linear(width_in, h)
            layers[f"act{i}"] = act()
            width_in = h
        layers["out"] = nn.Linear(width_in, CLASSES)
    elif model == "deep":
        width_in = FEATURES
        for i in range(1, depth + 1):
            layers[f"fc{i}"] = nn.Linear(width_in, width)
            if norm:
                layers[f"norm{i}"] = nn.LayerNorm(width)
            layers[f"act{i}"] = act()
            width_in = width
        layers["out"] = nn.Linear(width_in, CLASSES)
    elif model == "cnn":
        layers["image"] = nn.Unflatten(1, (1, 8, 8))
        layers["conv1"] = nn.Conv2d(1, 16, 3, padding=1)
        layers["act1"] = nn.ReLU()
        layers["conv2"] = nn.Conv2d(16, 32, 3, padding=1)
        layers["act2"] = nn.ReLU()
        layers["pool"] = nn.MaxPool2d(2)
        layers["flat"] = nn.Flatten()
        layers["out"] = nn.Linear(32 * 4 * 4, CLASSES)
    elif model == "gru":
        layers["rnn"] = GRUHead(32)
        layers["out"] = nn.Linear(32, CLASSES)
    else:
        raise ValueError(f"build_net: unknown model {model!r}; use one of mlp, cnn, gru, deep.")
    if softmax_weight > 0:
        layers["softmax"] = PartialSoftmax(softmax_weight)
    return nn.Sequential(layers)


class DigitsClassifier(pl.LightningModule):
    """A plain ``(x, y)`` classifier whose loss and optimizer step can be broken on purpose.

    Logs ``train/loss`` and ``train/acc`` every step and ``val/loss`` and ``val/acc`` per epoch, as a user
    would.

    Args:
        net: the network (see :func:`build_net`).
        optimizer: ``sgd`` (with ``momentum``) or ``adam``.
        lr: learning rate.
        momentum: SGD momentum.
        loss: ``ce`` (cross-entropy on logits, healthy) or ``nll_raw`` (``nll_loss`` on raw logits, the
            wrong loss: it is minus the target logit, unbounded below).
        loss_weight: share of the wrong loss in ``(1 - w) * ce + w * wrong`` (1: the wrong loss alone).
        zero_grad_every: gradients are zeroed only every this many steps (1: healthy; a large value is
            a forgotten ``optimizer.zero_grad()``).
    """

    def __init__(self, net: nn.Module, optimizer: str = "sgd", lr: float = 0.05, momentum: float = 0.9,
                 loss: str = "ce", loss_weight: float = 1.0, zero_grad_every: int = 1) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"DigitsClassifier: optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
        if loss not in ("ce", "nll_raw"):
            raise ValueError(f"DigitsClassifier: loss must be 'ce' or 'nll_raw', got {loss!r}.")
        if int(zero_grad_every) < 1:
            raise ValueError(f"DigitsClassifier: zero_grad_every must be >= 1, got {zero_grad_every!r}.")
        self.net = net
        self.optimizer_name = optimizer
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.loss_name = loss
        self.loss_weight = float(loss_weight)
        self.zero_grad_every = int(zero_grad_every)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(out, y)
        if self.loss_name == "ce":
            return ce
        wrong = F.nll_loss(out, y)  # expects log-probabilities; on raw logits it is -logit[y]
        return wrong if self.loss_weight == 1.0 else (1.0 - self.loss_weight) * ce + self.loss_weight * wrong

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = self.loss(out, y)
        self.log("train/loss", loss)
        self.log("train/acc", (out.argmax(-1) == y).float().mean())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.log("val/loss", self.loss(out, y))
        self.log("val/acc", (out.argmax(-1) == y).float().mean())

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        # The forgotten-zero_grad fault lives here, in the hook a user overrides: gradients of earlier
        # steps are left in .grad and the next backward adds to them.
        if self.zero_grad_every == 1 or self.trainer.global_step % self.zero_grad_every == 0:
            optimizer.zero_grad()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


@torch.no_grad()
def accuracy(model: nn.Module, loader: Any) -> float:
    """Accuracy of ``model`` over ``loader`` (NaN outputs count as wrong)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        out = model(x)
        ok = (out.argmax(-1) == y) & torch.isfinite(out).all(-1)
        correct += int(ok.sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)

