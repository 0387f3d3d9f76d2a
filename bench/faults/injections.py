"""Faults that happen during training, planted by a callback at a known optimizer step."""
from __future__ import annotations

from typing import Any, List, Optional

import pytorch_lightning as pl

__all__ = ["LRSpike", "optimizer_step_index"]


def optimizer_step_index(trainer: "pl.Trainer") -> int:
    """Index of the optimizer step the current batch will make (the step ``self.log`` curves use)."""
    try:
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    except AttributeError:
        return int(trainer.global_step)


class LRSpike(pl.Callback):
    """Multiply every learning rate by ``factor`` for ``steps`` optimizer steps from ``step``, then restore it.

    The loss jumps on the batches after the spiked updates and then recovers: a transient loss spike with
    a known start, so the delay of a detector can be measured exactly.

    Args:
        step: first optimizer step made with the multiplied learning rate.
        factor: the multiplier.
        steps: how many optimizer steps use it.

    Example:
        >>> spike = LRSpike(step=100, factor=30.0, steps=2)
        >>> spike.planted
        []
    """

    def __init__(self, step: int = 100, factor: float = 30.0, steps: int = 2) -> None:
        if step < 0 or steps < 1 or factor <= 0:
            raise ValueError(f"LRSpike: need step >= 0, steps >= 1 and factor > 0; got {step}, {steps}, {factor}.")
        self.step = int(step)
        self.factor = float(factor)
        self.steps = int(steps)
        self.planted: List[str] = []
        self._saved: Optional[List[List[float]]] = None

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        step = optimizer_step_index(trainer)
        if self._saved is None and not self.planted and step == self.step:
            self._saved = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] *= self.factor
            self.planted.append(f"learning rate x{self.factor:g} at step {step}")
        elif self._saved is not None and step >= self.step + self.steps:
            for opt, saved in zip(trainer.optimizers, self._saved):
                for group, lr in zip(opt.param_groups, saved):
                    group["lr"] = lr
            self._saved = None
            self.planted.append(f"learning rate restored at step {step}")
