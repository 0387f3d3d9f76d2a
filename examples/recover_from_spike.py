"""A run that recovers by itself: a learning-rate spike (or a poisoned batch) makes the loss explode, and
``MetricMonitor`` rolls model, optimizer, scheduler and RNG back to the last healthy state and goes on.

Three runs of the same model on the same data, logged side by side for TensorBoard:

- ``healthy``: no fault, the reference;
- ``fault``: the fault, nothing watching: the loss explodes and the run does not get back to the reference;
- ``recovered``: the same fault with ``MetricMonitor``: a per-step spike rule on the training loss asks for
  ``rollback``; the learning rate is halved at the rollback (``lr_factor=0.5``).

Run it (CPU, about 10 seconds)::

    python examples/recover_from_spike.py                     # learning rate x100 from step 300 on
    python examples/recover_from_spike.py --fault batch       # one poisoned batch at step 300
    python examples/recover_from_spike.py --checkpoints       # roll back to MetricCheckpoint files
    tensorboard --logdir recover_from_spike_logs

In TensorBoard compare ``train/loss`` of the three runs, and see ``monitor.recovery/rollbacks`` and
``monitor.rule/loss_spike/score`` (the spike's z-score) of the recovered run; the alert texts are under
``monitor.alert``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightwatch.callbacks import MetricCheckpoint, MetricMonitor

RULES: Dict[str, Dict[str, Any]] = {
    # Checked before every optimizer update (one host sync per step): a spike is caught on the step it happens.
    "loss_spike": {"metric": "monitor.step/loss", "kind": "spike", "action": "rollback", "check_on": ["every_step"],
                   "consecutive": 2},
    "loss_nonfinite": {"metric": "monitor.step/loss", "kind": "nonfinite", "action": "rollback",
                       "check_on": ["every_step"]},
}


class Net(pl.LightningModule):
    """A small MLP classifier trained with SGD and momentum under a step-wise decaying learning rate."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + step / 500))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LearningRateSpike(pl.Callback):
    """From optimizer step ``at`` on, the learning rate is ``factor`` times its schedule: a bad change to the
    schedule, made once (a rollback to a state from before it undoes it)."""

    def __init__(self, at: int, factor: float = 100.0) -> None:
        self.at, self.factor, self.done = at, factor, False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at and not self.done:
            self.done = True
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= self.factor
            scheduler = trainer.lr_scheduler_configs[0].scheduler
            scheduler.base_lrs = [lr * self.factor for lr in scheduler.base_lrs]


class PoisonedBatch(pl.Callback):
    """Corrupt the training batch of optimizer step ``at``: inputs scaled by 1e3, labels shifted."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at:
            x, y = batch
            x.mul_(1e3)
            y.add_(1).remainder_(4)


def data(n: int = 16384, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Four overlapping Gaussian classes with 10% label noise: the loss settles well above zero."""
    g = torch.Generator().manual_seed(seed)
    centers = 0.6 * torch.randn(4, 16, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x = centers[y] + torch.randn(n, 16, generator=g)
    noisy = torch.rand(n, generator=g) < 0.1
    y[noisy] = torch.randint(0, 4, (int(noisy.sum()),), generator=g)
    return x, y


def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def train(name: str, out: str, steps: int, fault: Optional[str], watch: bool, checkpoints: bool,
          x: torch.Tensor, y: torch.Tensor) -> Dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = Net()
    callbacks: List[pl.Callback] = []
    if fault == "lr":
        callbacks.append(LearningRateSpike(at=steps // 2))
    elif fault == "batch":
        callbacks.append(PoisonedBatch(at=steps // 2))
    monitor: Optional[MetricMonitor] = None
    if watch:
        monitor = MetricMonitor(rules=RULES, every_n_steps=10, lr_factor=0.5, max_rollbacks=3)
        callbacks.append(monitor)
        if checkpoints:
            callbacks.append(MetricCheckpoint(dirpath=os.path.join(out, name, "checkpoints"),
                                              every_n_train_steps=50, save_top_k=2))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, log_every_n_steps=10, callbacks=callbacks,
        logger=TensorBoardLogger(out, name=name, version=0), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=checkpoints and watch,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    trainer.fit(model, loader)
    return {"name": name, "loss": full_loss(model, x, y), "steps": trainer.global_step, "monitor": monitor,
            "log_dir": trainer.logger.log_dir}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="recover_from_spike_logs", help="TensorBoard log directory")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--fault", choices=("lr", "batch"), default="lr", help="learning-rate spike or bad batch")
    parser.add_argument("--checkpoints", action="store_true",
                        help="roll back to MetricCheckpoint files instead of in-memory snapshots")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    x, y = data()
    runs = {
        "healthy": train("healthy", args.out, args.steps, None, False, False, x, y),
        "fault": train("fault", args.out, args.steps, args.fault, False, False, x, y),
        "recovered": train("recovered", args.out, args.steps, args.fault, True, args.checkpoints, x, y),
    }
    at = args.steps // 2
    what = f"the learning rate x100 from step {at} on" if args.fault == "lr" else f"one poisoned batch at step {at}"
    print(f"\nFault: {what}.\n")
    alerts_path = os.path.join(runs["recovered"]["log_dir"], "alerts.jsonl")
    if os.path.exists(alerts_path):
        print("What MetricMonitor saw and did (alerts.jsonl):")
        with open(alerts_path) as fh:
            for line in fh:
                a = json.loads(line)
                print(f"  step {a['step']:4d}  {a['severity']:8s} {a['rule']:15s} -> {a['action']}: {a['message']}")
    monitor: MetricMonitor = runs["recovered"]["monitor"]
    print(f"\nRollbacks: {monitor.recovery.rollbacks}; learning-rate scale now {monitor.recovery.lr_scale:g}.")
    print("\nFinal training loss over the whole data set:")
    for name in ("healthy", "fault", "recovered"):
        print(f"  {name:10s} {runs[name]['loss']:.4f}  ({runs[name]['steps']} steps)")
    print(f"\nCurves: tensorboard --logdir {os.path.abspath(args.out)}")
    return runs


if __name__ == "__main__":
    main()
