"""Two-process DDP fit (gloo; launch with torchrun) where one rank fails: the job must end, not hang.

Usage: torchrun --nproc_per_node=2 reliability_rank_fault.py OUT_DIR FAULT SIDE

FAULT, at step 5: ``raise`` (rank 1 raises in ``training_step``), ``kill`` (rank 1 SIGKILLs itself), ``slow``
(rank 1 sleeps 3 s, then goes on), ``disk`` (rank 0's checkpoint directory is full: the ``io`` fault layer of
reliability_disk_full.py on rank 0, the only writer). SIDE: ``lightwatch`` (MetricCheckpoint and the monitors)
or ``lightning`` (ModelCheckpoint). Checkpoints every step (top-2 on ``train/loss`` and last). Each rank that
gets to the end writes OUT_DIR/rank<R>.json with the error it saw.
"""
import json
import os
import signal
import sys
import time
import traceback
import warnings

import pytorch_lightning as pl
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from conftest import Classifier, make_loader, shutdown_distributed  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
AT = 5


class Faulty(Classifier):
    def __init__(self, fault: str) -> None:
        super().__init__(hidden=64)
        self.fault = fault

    def training_step(self, batch, batch_idx):
        if self.global_step == AT and self.global_rank == 1:
            if self.fault == "raise":
                raise RuntimeError("rank 1 failed on purpose at step 5")
            if self.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.fault == "slow" and batch_idx == AT:
                time.sleep(3.0)
        return super().training_step(batch, batch_idx)


class Terminated(Exception):
    """The launcher ended this rank: torchrun sends SIGTERM to the other ranks as soon as it sees one die,
    which can come before this rank's next collective has failed on its own."""


def _terminated(signum, frame):
    raise Terminated("SIGTERM from the launcher after another rank failed")


def main() -> None:
    out_dir, fault, side = sys.argv[1:4]
    # either way this rank stops because another one failed: record it, rather than race the launcher
    signal.signal(signal.SIGTERM, _terminated)
    rank = int(os.environ.get("RANK", "0"))
    ck_dir = os.path.join(out_dir, "ck")
    if fault == "disk" and rank == 0:
        from reliability_disk_full import Budget

        fs = os.path.abspath(ck_dir)
        os.makedirs(fs, exist_ok=True)
        budget = Budget(fs)
        budget.install()

        class Fill(pl.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step == AT:
                    with open(os.path.join(fs, "filler.bin"), "wb") as fh:
                        fh.write(b"\0" * max(0, budget.free() - 1024))

        extra = [Fill()]
    else:
        extra = []
    if side == "lightwatch":
        from lightwatch.callbacks import GradientStatsMonitor, MetricCheckpoint, MetricMonitor

        ck = MetricCheckpoint(dirpath=ck_dir, monitor="train/loss", every_n_train_steps=1, save_top_k=2,
                              save_last=True)
        callbacks = [GradientStatsMonitor(every_n_steps=1), MetricMonitor(every_n_steps=1), ck]
    else:
        from pytorch_lightning.callbacks import ModelCheckpoint

        ck = ModelCheckpoint(dirpath=ck_dir, monitor="train/loss", every_n_train_steps=1, save_top_k=2,
                             save_last=True, filename="{step}")
        callbacks = [ck]
    pl.seed_everything(0)
    trainer = pl.Trainer(default_root_dir=out_dir, accelerator="cpu", devices=2, strategy="ddp", max_steps=12,
                         callbacks=extra + callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    result = {"rank": rank, "error": None}
    try:
        trainer.fit(Faulty(fault), make_loader(n=512))
    except BaseException as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the record is written before the launcher ends this rank
        result.update(error=type(exc).__name__, message=str(exc)[:800], traceback=traceback.format_exc()[-1200:])
    result["step"] = trainer.global_step
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    shutdown_distributed()
    if result["error"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
