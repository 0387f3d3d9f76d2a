"""Faults planted on purpose, so that each can be seen being detected (``python examples/train.py fault=...``).

Each fault is a Lightning callback that breaks one thing at a known step and records what it did in
``planted``; the example app prints that next to the alerts lightwatch raised. Select one with the
``fault`` config group (``conf/fault/*.yaml``):

- ``nan_batch``: NaN in some samples of one training batch (``data_nonfinite`` names that very step; then
  ``grad_nonfinite``, ``act_nonfinite`` naming the first layer in forward order, and ``loss_nonfinite``);
- ``lr_spike``: the learning rate multiplied for a few steps (``loss_spike``; the update ratios and the
  gradient norm jump in TensorBoard);
- ``dead_units``: part of a layer's units killed so their ReLU never fires again (``dead_frac`` of that
  ReLU in ``monitor.act/<module>/dead_frac``, an alert with a threshold rule on it);
- ``leaked_val``: validation samples replaced by copies of training samples (``data_leakage``; training
  curves do not show it);
- ``frozen_layer``: a freshly initialised layer frozen by mistake (``frozen_at_init`` at fit start, naming
  the layer: it stays a fixed random projection).

Example:
    >>> fault = NanBatch(step=3, rows=2)
    >>> fault.describe()
    'NaN in 2 sample(s) of the training batch at step 3'
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Tuple

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["Fault", "NanBatch", "LRSpike", "DeadUnits", "FrozenLayer", "LeakedValidation"]

logger = logging.getLogger("lightwatch.example")


class Fault(pl.Callback):
    """A fault planted on purpose; ``planted`` lists what was done, in order."""

    def __init__(self) -> None:
        self.planted: List[str] = []

    def describe(self) -> str:
        """What this fault will do, in one line."""
        raise NotImplementedError

    def _record(self, trainer: "pl.Trainer", text: str) -> None:
        self.planted.append(text)
        if trainer.is_global_zero:
            logger.info("fault planted: %s", text)

    def _linear(self, pl_module: nn.Module, layer: Optional[str]) -> Tuple[str, nn.Linear]:
        """The ``nn.Linear`` named ``layer`` in ``named_modules()``, or the first one when ``layer`` is None."""
        linears = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, nn.Linear)]
        for name, module in linears:
            if layer is None or name == layer:
                return name, module
        raise ValueError(f"{type(self).__name__}: no nn.Linear named {layer!r}; Linear layers: "
                         f"{[n for n, _ in linears]}.")

    @staticmethod
    def _at(trainer: "pl.Trainer", step: int) -> bool:
        # The step the next optimizer update will have; with gradient accumulation several batches share it.
        return trainer.fit_loop.epoch_loop._batches_that_stepped == step


class NanBatch(Fault):
    """Set ``rows`` samples of the inputs of the training batch at optimizer step ``step`` to ``value``.

    The batch is changed in place in ``on_train_batch_start``, so put this callback before the monitors
    (the example app does) and data checks see it too.

    Args:
        step: optimizer step whose batch is corrupted.
        rows: number of samples set to ``value``.
        value: the value planted (NaN by default; ``inf`` works too).
    """

    def __init__(self, step: int = 20, rows: int = 1, value: float = float("nan")) -> None:
        super().__init__()
        if step < 0 or rows < 1:
            raise ValueError(f"NanBatch: step must be >= 0 and rows >= 1, got step={step}, rows={rows}.")
        self.step = int(step)
        self.rows = int(rows)
        self.value = float(value)

    def describe(self) -> str:
        value = "NaN" if self.value != self.value else f"{self.value:g}"
        return f"{value} in {self.rows} sample(s) of the training batch at step {self.step}"

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self.planted or not self._at(trainer, self.step):
            return
        x = batch[0] if isinstance(batch, (tuple, list)) else batch["x"]
        if not torch.is_floating_point(x):
            raise TypeError(f"NanBatch: the inputs must be floating point to hold {self.value}, got {x.dtype}.")
        x[: self.rows] = self.value
        self._record(trainer, f"{self.describe()} (batch {batch_idx} of epoch {trainer.current_epoch})")


class LRSpike(Fault):
    """Multiply every learning rate by ``factor`` for ``steps`` optimizer steps from ``step``, then restore it.

    Args:
        step: first optimizer step with the spiked learning rate.
        factor: multiplier.
        steps: how many steps the spike lasts.
    """

    def __init__(self, step: int = 20, factor: float = 100.0, steps: int = 3) -> None:
        super().__init__()
        if step < 0 or steps < 1 or factor <= 0:
            raise ValueError(f"LRSpike: need step >= 0, steps >= 1, factor > 0; got {step}, {steps}, {factor}.")
        self.step = int(step)
        self.factor = float(factor)
        self.steps = int(steps)
        self._saved: Optional[List[List[float]]] = None

    def describe(self) -> str:
        return f"learning rate x{self.factor:g} for {self.steps} step(s) from step {self.step}"

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if self._saved is None and not self.planted and step == self.step:
            self._saved = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] *= self.factor
            lrs = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]
            self._record(trainer, f"{self.describe()} (lr now {', '.join(f'{lr:g}' for lr in lrs)})")
        elif self._saved is not None and step >= self.step + self.steps:
            for opt, saved in zip(trainer.optimizers, self._saved):
                for group, lr in zip(opt.param_groups, saved):
                    group["lr"] = lr
            self._saved = None
            self._record(trainer, f"learning rate restored at step {step}")


class DeadUnits(Fault):
    """Kill a fraction of the output units of a ``Linear`` layer: zero weights and a large negative bias.

    The following ReLU then outputs zero for every input, its gradient is zero, and the units never
    recover: the textbook "dying ReLU", planted.

    Args:
        fraction: fraction of the layer's output units to kill.
        layer: name of the ``nn.Linear`` in ``named_modules()``; ``None`` is the first one.
        step: optimizer step at which they are killed.
        bias: the bias given to the killed units.
    """

    def __init__(self, fraction: float = 0.5, layer: Optional[str] = None, step: int = 0, bias: float = -10.0) -> None:
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"DeadUnits: fraction must be in (0, 1], got {fraction}.")
        self.fraction = float(fraction)
        self.layer = layer
        self.step = int(step)
        self.bias = float(bias)

    def describe(self) -> str:
        where = self.layer or "the first Linear layer"
        return f"{self.fraction:.0%} of the units of {where} killed at step {self.step}"

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self.planted or not self._at(trainer, self.step):
            return
        name, linear = self._linear(pl_module, self.layer)
        k = max(1, round(self.fraction * linear.out_features))
        with torch.no_grad():
            linear.weight[:k].zero_()
            if linear.bias is None:
                raise ValueError(f"DeadUnits: layer {name!r} has no bias to push below zero.")
            linear.bias[:k] = self.bias
        self._record(trainer, f"{k} of {linear.out_features} units of {name!r} killed at step {self.step}")


class FrozenLayer(Fault):
    """Freeze a ``Linear`` layer as initialised, in ``on_fit_start``: the wrong layer frozen, a common slip.

    The layer never learns and stays a fixed random projection; the rest of the network trains around it.

    Args:
        layer: name of the ``nn.Linear`` in ``named_modules()``; ``None`` is the first one.
    """

    def __init__(self, layer: Optional[str] = None) -> None:
        super().__init__()
        self.layer = layer

    def describe(self) -> str:
        return f"{self.layer or 'the first Linear layer'} frozen as initialised"

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        name, linear = self._linear(pl_module, self.layer)
        linear.requires_grad_(False)
        self._record(trainer, f"{name!r} frozen at fit start, as initialised")


class LeakedValidation(Fault):
    """Replace a fraction of the validation samples by exact copies of training samples.

    Works on a datamodule whose ``train_set`` and ``val_set`` are ``TensorDataset`` s (the example's), in
    ``setup``, after the datamodule's own ``setup`` and before any dataloader is built.

    Args:
        fraction: fraction of the validation set replaced.
        seed: which training samples are copied (the same on every rank).
    """

    def __init__(self, fraction: float = 0.25, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"LeakedValidation: fraction must be in (0, 1], got {fraction}.")
        self.fraction = float(fraction)
        self.seed = int(seed)

    def describe(self) -> str:
        return f"{self.fraction:.0%} of the validation samples replaced by copies of training samples"

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" or self.planted:
            return
        dm = trainer.datamodule
        train, val = getattr(dm, "train_set", None), getattr(dm, "val_set", None)
        if not isinstance(train, TensorDataset) or not isinstance(val, TensorDataset):
            raise TypeError("LeakedValidation needs a datamodule with TensorDataset attributes train_set and val_set.")
        k = max(1, round(self.fraction * len(val)))
        source = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))[:k]
        tensors = [v.clone() for v in val.tensors]
        for dst, src in zip(tensors, train.tensors):
            dst[:k] = src[source]
        dm.val_set = TensorDataset(*tensors)
        self._record(trainer, f"{k} of {len(val)} validation samples are now copies of training samples")
