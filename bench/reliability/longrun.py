"""A long run with every callback on: resident memory, open files and the sizes of what it writes, over steps.

Usage: ``python -m bench.reliability.longrun OUT_DIR [STEPS] [EVERY]`` (default 20,000 steps, a row every
2,000). The model is the tests' small MLP on a 4,096-sample task with one batch in 8 holding a NaN feature (so
the data monitor and the rules alert all along, and the cooldowns are what keeps ``alerts.jsonl`` small), a
validation pass every 500 steps, and ``MetricCheckpoint`` (top-3 on ``val/loss``, last, every 250 steps).
Prints a Markdown table and writes OUT_DIR/longrun.json.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

__all__ = ["run_long"]


def dir_bytes(path: str) -> int:
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(base, name))
            except OSError:
                pass
    return total


def run_long(out: str, steps: int = 20000, every: int = 2000) -> List[Dict[str, Any]]:
    import psutil
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from conftest import Classifier
    from lightwatch.callbacks import (
        ActivationStatsMonitor,
        DataQualityMonitor,
        GradientStatsMonitor,
        MetricCheckpoint,
        MetricMonitor,
    )

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=g)
    y = x[:, :3].argmax(1)
    x[::128, 5] = float("nan")  # one batch in 8 (batch size 16) holds a NaN
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[:512].nan_to_num(), y[:512]), batch_size=64)

    class Model(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            xb, yb = batch
            return super().training_step((xb.nan_to_num(), yb), batch_idx)

    process = psutil.Process()
    rows: List[Dict[str, Any]] = []
    started = time.time()

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            step = trainer.global_step
            if step % every == 0 or step == 1:
                rows.append({
                    "step": step, "seconds": round(time.time() - started, 1),
                    "rss_mib": round(process.memory_info().rss / 2**20, 1),
                    "open_files": len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd")
                    else len(process.open_files()),
                    "alerts_kib": round(os.path.getsize(os.path.join(out, "tb", "version_0", "alerts.jsonl")) / 1024, 1)
                    if os.path.exists(os.path.join(out, "tb", "version_0", "alerts.jsonl")) else 0.0,
                    "tensorboard_kib": round(dir_bytes(os.path.join(out, "tb")) / 1024, 1),
                    "checkpoints_kib": round(dir_bytes(os.path.join(out, "ck")) / 1024, 1),
                })

    callbacks = [GradientStatsMonitor(), ActivationStatsMonitor(), DataQualityMonitor(), MetricMonitor(),
                 MetricCheckpoint(dirpath=os.path.join(out, "ck"), monitor="val/loss", save_top_k=3, save_last=True,
                                  every_n_train_steps=250), Probe()]
    trainer = pl.Trainer(default_root_dir=out, max_steps=steps, callbacks=callbacks, accelerator="cpu", devices=1,
                         logger=TensorBoardLogger(out, name="tb", version=0), enable_progress_bar=False,
                         enable_model_summary=False, val_check_interval=500, check_val_every_n_epoch=None,
                         limit_val_batches=4, log_every_n_steps=50)
    trainer.fit(Model(), train, val)
    with open(os.path.join(out, "longrun.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    return rows


def table(rows: List[Dict[str, Any]]) -> List[str]:
    from bench.tables import markdown_table

    keys = ["step", "seconds", "rss_mib", "open_files", "alerts_kib", "tensorboard_kib", "checkpoints_kib"]
    return markdown_table(keys, [[str(r[k]) for k in keys] for r in rows])


def main() -> None:
    out = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    every = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    os.makedirs(out, exist_ok=True)
    print("\n".join(table(run_long(out, steps, every))))


if __name__ == "__main__":
    main()
