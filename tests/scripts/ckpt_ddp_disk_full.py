"""Two-process DDP run whose third checkpoint write hits ENOSPC on rank 0 (launched by test_metric_checkpoint.py).

Each rank logs a different ``val/loss`` without ``sync_dist``: deciding on local values would make the ranks
disagree about saving (a hang in ``ModelCheckpoint``); MetricCheckpoint decides on rank 0's values.
"""
import errno
import io
import json
import os
import sys

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import Classifier, make_loader, shutdown_distributed  # noqa: E402

from lightwatch.callbacks.metric_checkpoint import CheckpointSaveError, MetricCheckpoint  # noqa: E402

torch.set_num_threads(1)
out_dir = sys.argv[1]


class RankLoss(Classifier):
    def validation_step(self, batch, batch_idx):
        values = {0: [3.0, 2.0, 1.0, 0.5], 1: [1.0, 5.0, 0.1, 9.0]}[self.global_rank]
        self.log("val/loss", values[self.current_epoch])  # no sync_dist on purpose


class FullDiskIO(TorchCheckpointIO):
    """The third save writes 4 KiB of the checkpoint, then fails with ENOSPC (rank 0 is the only writer)."""

    calls = 0

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        FullDiskIO.calls += 1
        if FullDiskIO.calls != 3:
            return super().save_checkpoint(checkpoint, path, storage_options)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        with open(path, "wb") as fh:
            fh.write(buf.getvalue()[:4096])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


pl.seed_everything(0)
ck = MetricCheckpoint(dirpath=os.path.join(out_dir, "ck"), monitor="val/loss", save_top_k=1, save_last=True)
trainer = pl.Trainer(
    default_root_dir=out_dir, accelerator="cpu", devices=2, strategy="ddp", max_steps=8, callbacks=[ck],
    plugins=[FullDiskIO()], logger=False, enable_progress_bar=False, enable_model_summary=False,
    limit_val_batches=1, num_sanity_val_steps=0,
)
result = {"error": None}
try:
    trainer.fit(RankLoss(), make_loader(n=64), make_loader(n=32, seed=1))
except CheckpointSaveError as exc:
    result = {"error": type(exc).__name__, "errno": exc.errno, "message": str(exc)}
result.update(rank=trainer.global_rank, best=ck.best_model_path, healthy=ck.latest_healthy(),
              step=trainer.global_step)
with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
    json.dump(result, fh)
shutdown_distributed()
