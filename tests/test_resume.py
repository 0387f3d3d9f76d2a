"""Resuming from a checkpoint (loaded weights_only) keeps the monitors' cadence and state."""
from __future__ import annotations

import glob
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from conftest import Classifier, make_loader, make_trainer, read_alerts, read_events, scalars
from lightwatch import ActivationStatsMonitor, GradientStatsMonitor


class PoisonGradAt(pl.Callback):
    """A NaN gradient that the monitors see, cleaned before the optimizer uses it (put it before them)."""

    def __init__(self, *steps: int) -> None:
        self.steps = steps

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if trainer.fit_loop.epoch_loop._batches_that_stepped in self.steps:
            pl_module.net[0].weight.grad[0, 0] = float("nan")


class CleanGrad(pl.Callback):
    """Runs after the monitors in on_before_optimizer_step, so the weights stay finite."""

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        for p in pl_module.parameters():
            p.grad.nan_to_num_(nan=0.0)


def monitors() -> list:
    return [GradientStatsMonitor(every_n_steps=5, nonfinite_action="log", alert_cooldown_steps=100),
            ActivationStatsMonitor(every_n_steps=5)]


def test_resume_keeps_cadence_and_alert_state(tmp_path: Any) -> None:
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=6, save_top_k=-1)
    first = make_trainer(tmp_path / "run1", [PoisonGradAt(4), ckpt] + monitors() + [CleanGrad()], max_steps=6,
                         log_every_n_steps=5, enable_checkpointing=True)
    first.fit(Classifier(), make_loader())
    assert [a["step"] for a in read_alerts(str(tmp_path / "run1"))] == [4]

    path = glob.glob(str(tmp_path / "ckpt" / "*.ckpt"))[0]
    state = torch.load(path, weights_only=True)  # callback state is weights_only-safe
    grad_state = state["callbacks"]["GradientStatsMonitor"]
    assert grad_state["sampled_steps"] == 2 and "rule" not in grad_state  # steps 0 and 4

    watched = monitors()
    second = make_trainer(tmp_path / "run2", [PoisonGradAt(9)] + watched + [CleanGrad()], max_steps=20,
                          log_every_n_steps=5, logger=TensorBoardLogger(str(tmp_path / "run2"), name="tb", version=0))
    second.fit(Classifier(), make_loader(), ckpt_path=path)

    acc = read_events(second.log_dir)
    # same cadence as an unbroken run, and no second "first step": the resumed model is not as initialised
    assert sorted(scalars(acc, "monitor.grad/_total/norm")) == [9, 14, 19]
    assert sorted(scalars(acc, "monitor.act/net.0/mean")) == [9, 14, 19]
    assert watched[0].sampled_steps == 5
    # the cooldown restored from the checkpoint suppresses the repeat at step 9 (within 100 steps of step 4)
    assert read_alerts(str(tmp_path / "run2")) == []
    assert scalars(acc, "monitor.grad/net.0.weight/nonfinite")[9] == 1.0
