"""Two-process DDP run of DataQualityMonitor (launched by tests/test_data_quality.py with torchrun).

Usage: ``dq_ddp.py OUT_DIR REFERENCE_PROFILE``. The datasets have odd sizes, so DistributedSampler pads
each epoch with a repeated sample; 5 validation samples are copies of training samples. Epoch 0 runs
clean and its profile is copied to ``epoch0.json``; in epoch 1 rank 1 alone sees a NaN at step 7 and the
``stop`` action must stop both ranks at the same step. The first monitor also scans 4 batches of each rank's
train and val shards before training (``scan_before_fit=4``): its collectives are counted under step -1, and
its streaming results must not change. A second monitor, without a reference, freezes its histogram edges
from the first batch of each rank (averaged over ranks) and writes ``noref.json``. Each rank writes
``rank<r>.json``.
"""
import inspect
import json
import os
import shutil
import sys
from collections import defaultdict
from typing import Any, Tuple

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import Classifier, shutdown_distributed  # noqa: E402

from lightwatch.callbacks import DataQualityMonitor  # noqa: E402
from lightwatch.core.alerts import alert_log  # noqa: E402


def datasets() -> Tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(101, 8, generator=g), torch.randint(0, 3, (101,), generator=g)
    vx, vy = torch.randn(51, 8, generator=g), torch.randint(0, 3, (51,), generator=g)
    vx[10:15] = x[40:45]  # leaked
    return TensorDataset(x, y), TensorDataset(vx, vy)


def monitor_for(**kwargs: Any) -> DataQualityMonitor:
    return DataQualityMonitor(**kwargs)


collectives = defaultdict(int)
step_now = {"step": -1}


class Probe(pl.Callback):
    """Marks steps, plants the NaN on rank 1, records when the stop was decided (placed before the monitor)."""

    def __init__(self) -> None:
        self.stop_step = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step_now["step"] = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step_now["step"] == 7 and trainer.global_rank == 1:
            batch[0][0, 1] = float("nan")

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.should_stop and self.stop_step is None:
            self.stop_step = step_now["step"]


class KeepFirstProfile(pl.Callback):
    """Copies the profile written at the end of epoch 0 (placed after the monitor, which writes it)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == 0 and trainer.is_global_zero:
            shutil.copy(os.path.join(self.out_dir, "data_profile.json"), os.path.join(self.out_dir, "epoch0.json"))


def main() -> None:
    out_dir, reference = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    _all_reduce = dist.all_reduce

    def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
        if any("lightwatch" in (f.filename or "") for f in inspect.stack()[1:4]):
            collectives[step_now["step"]] += 1
        return _all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    pl.seed_everything(0)
    train, val = datasets()
    probe = Probe()
    monitor = monitor_for(reference=reference, profile_path=os.path.join(out_dir, "data_profile.json"),
                          checks={"nonfinite": {"action": "stop"}}, scan_before_fit=4)
    noref = monitor_for(profile_path=os.path.join(out_dir, "noref.json"), duplicates=False)
    trainer = pl.Trainer(
        default_root_dir=out_dir, max_epochs=2, log_every_n_steps=5, accelerator="cpu", devices=2, strategy="ddp",
        callbacks=[probe, monitor, KeepFirstProfile(out_dir), noref], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        logger=pl.loggers.TensorBoardLogger(out_dir, name="tb", version=0),
    )
    trainer.fit(Classifier(), DataLoader(train, batch_size=8), DataLoader(val, batch_size=8))
    alerts = [[a.rule, a.step, a.subject] for a in alert_log(trainer).history]
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump({"rank": trainer.global_rank, "global_step": trainer.global_step, "stop_step": probe.stop_step,
                   "alerts": alerts, "collectives": collectives,
                   "noref_edges": noref.profile.splits["train"].fields["x"].histogram.edges.tolist()}, fh)


if __name__ == "__main__":
    main()
    shutdown_distributed()
