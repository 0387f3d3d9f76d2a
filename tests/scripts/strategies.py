"""Fit with every lightwatch callback under one Lightning package and strategy, then report what Lightning saw.

Usage: ``python strategies.py OUT_DIR PACKAGE STRATEGY`` with PACKAGE ``pytorch_lightning`` or ``lightning`` and
STRATEGY a Lightning CPU strategy (``auto``, ``ddp``, ``ddp_spawn``, ``ddp_fork``); under ``ddp`` launch it with
``torch.distributed.run``. Rank 0 of the main process writes ``OUT_DIR/report.json``.
"""
import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

PACKAGE, STRATEGY = sys.argv[2], sys.argv[3]
if PACKAGE == "lightning":
    import lightning.pytorch as pl

    import lightwatch.lightning as lw
else:
    import pytorch_lightning as pl

    import lightwatch.callbacks as lw

torch.set_num_threads(1)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 8, generator=g)
    return DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=16)


def main() -> None:
    out = sys.argv[1]
    devices = 1 if STRATEGY == "auto" else 2
    ckpt = lw.MetricCheckpoint(dirpath=os.path.join(out, "ckpt"), monitor="val/loss", mode="min", save_top_k=2,
                               save_last=True)
    callbacks = [lw.GradientStatsMonitor(every_n_steps=4), lw.ActivationStatsMonitor(every_n_steps=4),
                 lw.DataQualityMonitor(), lw.MetricMonitor(every_n_steps=4), ckpt]
    trainer = pl.Trainer(default_root_dir=out, max_epochs=3, accelerator="cpu", devices=devices, strategy=STRATEGY,
                         callbacks=callbacks, log_every_n_steps=4, enable_progress_bar=False,
                         enable_model_summary=False)
    model = Classifier()
    trainer.fit(model, loader(0), loader(1))
    # what Lightning resolves for ckpt_path="best" is this callback's best_model_path (set back by ddp_spawn)
    validated = trainer.validate(model, loader(1), ckpt_path="best", verbose=False)
    log_dir = trainer.log_dir or out  # a collective under DDP: every rank asks
    if trainer.is_global_zero:
        report = {
            "checkpoint_callback": type(trainer.checkpoint_callback).__name__,
            "checkpoint_callbacks": [type(c).__name__ for c in trainer.checkpoint_callbacks],
            "is_ours": trainer.checkpoint_callback is ckpt,
            "best_model_path": ckpt.best_model_path,
            "best_exists": bool(ckpt.best_model_path) and os.path.exists(ckpt.best_model_path),
            "best_model_score": None if ckpt.best_model_score is None else float(ckpt.best_model_score),
            "last_model_path": ckpt.last_model_path,
            "best_k_models": sorted(ckpt.best_k_models),
            "dirpath": ckpt.dirpath,
            "validated": [{k: float(v) for k, v in d.items()} for d in validated],
            "world_size": trainer.world_size,
            "log_dir": log_dir,
        }
        with open(os.path.join(out, "report.json"), "w") as fh:
            json.dump(report, fh)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
