"""A two-process DDP run of the job-health callbacks (launch with torchrun ``system_ddp.py <out>``).

Rank 1 is a straggler first: it sleeps 40 ms in every training step (before backward), which SystemMonitor
names. At step HANG_STEP it blocks: it sleeps HANG_SECONDS in its training step, and a HangWatchdog with a 2 s
step deadline and ``abort=True`` on both ranks writes ``hang_rank<R>.txt`` to ``<out>`` and ends each process
with status 75. Every ``dist.all_gather`` is counted per step into ``collectives_rank<R>.json`` (rewritten at
every step: the processes end by the abort).
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections import Counter
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import Classifier, make_loader, shutdown_distributed  # noqa: E402
from lightwatch.callbacks import HangWatchdog, SystemMonitor  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
HANG_SECONDS = 120
HANG_STEP = 36


class OneRankSlow(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_rank == 1:
            if self.global_step == HANG_STEP:
                time.sleep(HANG_SECONDS)  # the blocking line
            time.sleep(0.04)
        return super().training_step(batch, batch_idx)


def main(out: str) -> None:
    pl.seed_everything(0, verbose=False)
    counts: Counter = Counter()
    state = {"step": -1}
    all_gather = dist.all_gather

    def counting_all_gather(*args: Any, **kwargs: Any) -> Any:
        counts[state["step"]] += 1
        return all_gather(*args, **kwargs)

    dist.all_gather = counting_all_gather

    class StepMarker(pl.Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            state["step"] = trainer.fit_loop.epoch_loop._batches_that_stepped

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            with open(os.path.join(out, f"collectives_rank{trainer.global_rank}.json"), "w") as fh:
                json.dump({str(k): v for k, v in counts.items() if k >= 0}, fh)

    callbacks = [StepMarker(), SystemMonitor(every_n_steps=5),
                 HangWatchdog(step_seconds=2.0, startup_seconds=60, abort=True)]
    trainer = pl.Trainer(default_root_dir=out, max_steps=60, log_every_n_steps=5, callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accelerator="cpu", devices=2, strategy="ddp", logger=False, limit_val_batches=0)
    trainer.fit(OneRankSlow(), make_loader(n=4096))
    shutdown_distributed()  # not reached: the watchdog ends both processes


if __name__ == "__main__":
    main(sys.argv[1])
