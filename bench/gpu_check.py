"""Checks that need a CUDA GPU: host syncs per step, and CUDA values and alerts against the CPU's.

1. **Host syncs.** The default monitors (gradient, activation, data quality, metric rules) on the three
   benchmark workloads, with ``torch.cuda.set_sync_debug_mode`` armed from the first ``on_train_batch_start``
   hook to the last ``on_train_batch_end`` hook of every step (forward, backward, optimizer step and every
   monitor hook inside). A ``warn`` pass counts the synchronising calls per step and where they come from,
   for the bare run and the watched run; an ``error`` pass then arms only the steps that are not sampled
   and must finish without an exception.
2. **CUDA equals CPU.** The same seeded run on both devices with a NaN batch planted: the same alerts at the
   same steps, and the same scalar series (within float tolerance). This exercises the one-step-late
   pinned-memory readback, which the CPU test suite cannot.

    python bench/gpu_check.py --out /tmp/gpu-check        # prints a report; exits 1 if a check fails
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(__file__))
from workloads import WORKLOADS, make  # noqa: E402

from lightwatch import (ActivationStatsMonitor, DataQualityMonitor, GradientStatsMonitor,  # noqa: E402
                        MetricMonitor)

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightwatch").setLevel(logging.ERROR)

INTERVAL = 10


def default_monitors(interval: int) -> List[pl.Callback]:
    return [GradientStatsMonitor(every_n_steps=interval), ActivationStatsMonitor(every_n_steps=interval),
            DataQualityMonitor(every_n_steps=interval), MetricMonitor(every_n_steps=interval)]


def sampled(step: int, interval: int = INTERVAL) -> bool:
    # step 0 too: the statistics monitors check the initialised model there (check_first_step)
    return (step + 1) % interval == 0 or step == 0


# ------------------------------------------------------------------------------------------ host syncs
class SyncAudit:
    """Arms sync debug mode around each step's hooks and records the synchronising calls per step."""

    def __init__(self, mode: str, steps: str) -> None:
        self.mode, self.steps = mode, steps  # steps: "all" or "unsampled"
        self.per_step: Dict[int, List[Tuple[str, int, str]]] = {}
        self._recorder: Any = None
        self._caught: Optional[List[warnings.WarningMessage]] = None
        self._step = -1

    def armed_for(self, step: int) -> bool:
        return self.steps == "all" or not sampled(step)

    def arm(self, step: int) -> None:
        self._step = step
        if not self.armed_for(step):
            return
        if self.mode == "warn":
            self._recorder = warnings.catch_warnings(record=True)
            self._caught = self._recorder.__enter__()
            warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(self.mode)

    def disarm(self) -> None:
        torch.cuda.set_sync_debug_mode(0)
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            found = [(os.path.relpath(w.filename) if "lightwatch" in w.filename else w.filename, w.lineno,
                      str(w.message)[:80]) for w in self._caught or [] if "synchroniz" in str(w.message)]
            self.per_step[self._step] = found
            self._recorder = self._caught = None


class Arm(pl.Callback):
    def __init__(self, audit: SyncAudit) -> None:
        self.audit = audit

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.audit.arm(trainer.global_step)


class Disarm(pl.Callback):
    def __init__(self, audit: SyncAudit) -> None:
        self.audit = audit

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.audit.disarm()

    def on_exception(self, *args: Any) -> None:
        self.audit.disarm()


def audited_fit(workload: str, watched: bool, mode: str, steps: str, max_steps: int, log_dir: str) -> SyncAudit:
    factory, loader = make(workload, max_steps)
    pl.seed_everything(0, verbose=False)
    audit = SyncAudit(mode, steps)
    monitors = default_monitors(INTERVAL) if watched else []
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, max_steps=max_steps, log_every_n_steps=INTERVAL,
        callbacks=[Arm(audit), *monitors, Disarm(audit)], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, logger=pl.loggers.TensorBoardLogger(log_dir, name=workload), limit_val_batches=0)
    trainer.fit(factory(), loader)
    return audit


def check_syncs(workloads: List[str], max_steps: int, log_dir: str) -> bool:
    print(f"## Host syncs per step (sync debug mode; monitors every {INTERVAL} steps, {max_steps} steps)\n")
    print("| workload | run | steps with a sync (count) | syncs on unsampled steps | syncs on sampled steps | "
          "where (top 3) |")
    print("|---|---|---|---|---|---|")
    ok = True
    for workload in workloads:
        for watched in (False, True):
            audit = audited_fit(workload, watched, "warn", "all", max_steps, log_dir)
            unsampled = sum(len(v) for s, v in audit.per_step.items() if not sampled(s))
            at_sampled = sum(len(v) for s, v in audit.per_step.items() if sampled(s))
            steps_with = {s: len(v) for s, v in sorted(audit.per_step.items()) if v}
            where = Counter(f"{f}:{line}" for v in audit.per_step.values() for f, line, _ in v).most_common(3)
            print(f"| {WORKLOADS[workload]} | {'watched' if watched else 'bare'} | {steps_with or '-'} | "
                  f"{unsampled} | {at_sampled} | {', '.join(f'{w} x{n}' for w, n in where) or '-'} |", flush=True)
        try:
            audited_fit(workload, True, "error", "unsampled", max_steps, log_dir)
            result = "passed"
        except Exception as exc:  # the point of the check: report where a sync happened
            ok = False
            tb = [f"{os.path.basename(fr.filename)}:{fr.lineno} {fr.name}" for fr in
                  traceback.extract_tb(exc.__traceback__)][-4:]
            result = f"FAILED: {type(exc).__name__}: {str(exc)[:120]} at {' <- '.join(reversed(tb))}"
        print(f"| {WORKLOADS[workload]} | watched, `error` mode on unsampled steps | {result} | | | |", flush=True)
    print()
    return ok


# --------------------------------------------------------------------------------- CUDA equals CPU
class Planted(Dataset):
    """Fixed random classification data; one sample of the batch of step ``nan_step`` holds a NaN."""

    def __init__(self, n: int, nan_index: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 16, generator=g)
        self.y = (self.x[:, :4].sum(1) > 0).long() + 2 * (self.x[:, 4] > 0).long()
        self.x[nan_index, 3] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Small(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def equal_run(accelerator: str, root: str) -> Tuple[List[Tuple[str, int, Optional[str]]], Dict[str, Dict[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0, verbose=False)
    batch, nan_step = 16, 17
    data = DataLoader(Planted(batch * 40, nan_index=batch * nan_step + 5), batch_size=batch, shuffle=False)
    # the per-step norm is on for both devices (its default is on for CUDA only), so the tags match
    monitors = [GradientStatsMonitor(every_n_steps=5, nonfinite_action="stop", norm_every_step=True),
                ActivationStatsMonitor(every_n_steps=5), DataQualityMonitor(every_n_steps=5),
                MetricMonitor(every_n_steps=5)]
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=30, log_every_n_steps=5, callbacks=monitors,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         logger=pl.loggers.TensorBoardLogger(root, name=accelerator, version=0), limit_val_batches=0)
    trainer.fit(Small(), data)
    alerts = []
    for path in glob.glob(os.path.join(root, accelerator, "**", "alerts.jsonl"), recursive=True):
        alerts += [json.loads(line) for line in open(path)]
    alerts_key = sorted((a["rule"], a["step"], a["subject"]) for a in alerts)
    acc = EventAccumulator(os.path.join(root, accelerator, "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    series = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]
              if tag.startswith("monitor.")}
    return alerts_key, series


def check_equal(root: str) -> bool:
    print("## CUDA equals CPU (same seeded run, NaN planted in the batch of step 17, monitors every 5 steps)\n")
    cpu_alerts, cpu = equal_run("cpu", root)
    gpu_alerts, gpu = equal_run("gpu", root)
    ok = cpu_alerts == gpu_alerts and set(cpu) == set(gpu)
    worst, compared, step_mismatch = 0.0, 0, []
    for tag in sorted(set(cpu) & set(gpu)):
        if set(cpu[tag]) != set(gpu[tag]):
            step_mismatch.append(tag)
            continue
        for step, a in cpu[tag].items():
            b = gpu[tag][step]
            compared += 1
            if math.isnan(a) and math.isnan(b) or a == b:
                continue
            rel = abs(a - b) / max(abs(a), abs(b), 1e-3)
            worst = max(worst, rel)
    ok = ok and not step_mismatch and worst < 1e-2
    print(f"- alerts (rule, step, subject): CPU {cpu_alerts}")
    print(f"- alerts on CUDA are {'the same' if cpu_alerts == gpu_alerts else 'DIFFERENT: ' + str(gpu_alerts)}")
    print(f"- scalar tags: CPU {len(cpu)}, CUDA {len(gpu)}, only on one side: {sorted(set(cpu) ^ set(gpu))[:5]}")
    print(f"- tags whose steps differ: {step_mismatch[:5] or 'none'}")
    print(f"- {compared} values compared; largest relative difference {worst:.2e}")
    print(f"- result: {'passed' if ok else 'FAILED'}\n")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None, help="directory for the logs (default: a temporary one)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU; on the CPU the test suite covers the same code paths.")
    root = args.out or tempfile.mkdtemp(prefix="lightwatch-gpu-")
    print(f"torch {torch.__version__}, pytorch_lightning {pl.__version__}, {torch.cuda.get_device_name()}\n")
    ok = check_equal(os.path.join(root, "equal"))
    ok = check_syncs(args.workloads, args.steps, os.path.join(root, "syncs")) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
