"""Two-process DDP run (launch with torchrun): SliceMonitor's per-slice state merges exactly across ranks.

Each rank validates its own samples (no distributed sampler: rank 0 has 37, rank 1 has 54, so the slices have
odd, different sizes per rank; one sample of rank 1 has a group outside the known ones). Each rank writes
``rank<R>.json`` with its own predictions, targets and groups per evaluation, the values SliceMonitor computed,
and the collectives (``torch.distributed`` calls) made inside SliceMonitor's validation hooks: the test
recomputes every value from both ranks' raw predictions and counts the collectives.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from typing import Any, Dict, List

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import shutdown_distributed
from lightwatch.callbacks import MetricCheckpoint, SliceMonitor

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

COUNTED = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
           "reduce", "gather", "scatter", "reduce_scatter", "all_to_all")
calls: Dict[str, Dict[str, int]] = {"batch": {}, "epoch": {}}
counting: List[Any] = [None]  # the hook being counted: "batch", "epoch" or None


def count_collectives() -> None:
    """Wrap torch.distributed's collectives with counters, per hook kind, while ``counting[0]`` names one."""
    for name in COUNTED:
        real = getattr(dist, name, None)
        if real is None:
            continue

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            if counting[0] is not None:
                where = calls[counting[0]]
                where[_name] = where.get(_name, 0) + 1
            return _real(*args, **kwargs)

        setattr(dist, name, functools.wraps(real)(counted))


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        self.seen: List[List[Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_validation_epoch_start(self) -> None:
        self.seen.append([])

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, group = batch
        logits = self(x)
        self.seen[-1] += [[int(p), int(t), int(g)] for p, t, g in zip(logits.argmax(1), y, group)]
        return logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CountedSliceMonitor(SliceMonitor):
    """SliceMonitor with the collectives of its validation hooks counted (per hook)."""

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        counting[0] = "batch"
        try:
            super().on_validation_batch_end(*args, **kwargs)
        finally:
            counting[0] = None

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        calls["epoch"] = {}
        counting[0] = "epoch"
        try:
            super().on_validation_epoch_end(trainer, pl_module)
        finally:
            counting[0] = None
        if trainer.sanity_checking:
            return
        r = self.last_result
        assert r is not None
        self.records.append({"collectives": dict(calls["epoch"]),
                             "counts": r.counts.tolist(), "other": r.other, "overall": r.overall,
                             "values": {m: v.tolist() for m, v in r.values.items()},
                             "worst": float(trainer.callback_metrics["monitor.slice/acc/_worst"])})


def data(rank: int, n: int) -> DataLoader:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, 6, generator=g)
    y = x[:, :3].argmax(1)
    group = torch.randint(0, 3, (n,), generator=g)
    if rank == 1:
        group[5] = 7  # outside the three named groups: counts overall only
    return DataLoader(TensorDataset(x, y, group), batch_size=8)


def main() -> None:
    out = sys.argv[1]
    count_collectives()
    pl.seed_everything(0, verbose=False)
    rank = int(os.environ.get("RANK", "0"))
    monitor = CountedSliceMonitor(slice_by={"field": 2, "names": ["a", "b", "c"]}, task="multiclass", num_classes=3,
                                  metrics=["acc", "precision", "recall", "f1"], min_count=5, bootstrap=20)
    monitor.records = []
    checkpoint = MetricCheckpoint(dirpath=os.path.join(out, "ckpt"), monitor="monitor.slice/acc/_worst", mode="max",
                                  save_top_k=1)
    model = Model()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, log_every_n_steps=2,
                         callbacks=[monitor, checkpoint], logger=TensorBoardLogger(out, name="tb", version=0),
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                         use_distributed_sampler=False)
    # the same number of training batches on both ranks (DDP's backward is a collective); odd validation sizes
    trainer.fit(model, data(rank, 32), data(rank, (37, 54)[rank]))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"seen": model.seen[1:] if len(model.seen) > len(monitor.records) else model.seen,
                   "records": monitor.records, "batch_hook_collectives": calls["batch"],
                   "best_model_score": float(checkpoint.best_model_score)}, fh)


if __name__ == "__main__":
    main()
    shutdown_distributed()
