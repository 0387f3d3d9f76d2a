"""Per-step cost of DataQualityMonitor on the reference workloads, against the same training without it.

Protocol (as bench/overhead.py): one thread, synthetic data (bench/workloads.py), every variant warmed up,
variants interleaved in shuffled rounds in one process, per-step wall time taken at
``on_train_batch_start``. Variants:

- ``bare``: no monitor;
- ``per-batch``: the per-batch tier alone (``distribution=False, duplicates=False``): non-finite,
  range and label checks on every batch, read once per logging period;
- ``full``: the defaults, i.e. both tiers: per-feature moments and histograms, label counts and sample
  hashes on every batch, reduced and checked at the end of the epoch;
- ``full-no-short-path``: the defaults with every batch taking the full path of the hook (schema checked
  field by field), as before batches of a known layout were only compared and copied: what the short
  path saves (``lightwatch.checks.data.counters.SHORT_PATH``).

Each run is one epoch whose last step carries the epoch-end reduction and checks, so the amortized
ratio (mean step time over the run, watched / bare; median and IQR over rounds) charges the distribution
tier its epoch end once per run, which is more often than in real training. Because the difference of
two noisy means is itself noisy on a busy machine, the time spent inside the monitor's hooks is also
measured directly and reported as a share of the bare step time (``hook share``), and the per-batch hook
alone: the median time of ``on_train_batch_start`` on unlogged steps (no fold due), over all rounds.

    OMP_NUM_THREADS=1 python bench/data_quality.py                        # all workloads
    OMP_NUM_THREADS=1 python bench/data_quality.py --workloads mlp --rounds 3 --steps 60
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import platform
import random
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from workloads import WORKLOADS, make  # noqa: E402

from lightwatch.callbacks import DataQualityMonitor  # noqa: E402
from lightwatch.checks.data import counters  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightwatch").setLevel(logging.CRITICAL)

VARIANTS: Dict[str, Optional[Dict[str, Any]]] = {
    "bare": None,
    "per-batch": {"distribution": False, "duplicates": False},
    "full": {},
    "full-no-short-path": {},
}
HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_epoch_start", "on_train_epoch_end",
         "on_train_end")


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.starts: List[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def step_times(self) -> List[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def timed(monitor: DataQualityMonitor) -> Tuple[List[float], List[float]]:
    """Wrap the monitor's hooks (on the instance): the time spent inside them, summed, and the time of each
    ``on_train_batch_start`` call of an unlogged step (the per-batch hook alone, no fold due)."""
    spent = [0.0]
    per_batch: List[float] = []

    def wrap(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                spent[0] += took
                if name == "on_train_batch_start" and not monitor.sampled:
                    per_batch.append(took)
        return inner

    for name in HOOKS:
        setattr(monitor, name, wrap(name, getattr(monitor, name)))
    return spent, per_batch


def run_once(workload: str, variant: str, steps: int, log_dir: str) -> Tuple[List[float], float, List[float]]:
    factory, loader = make(workload, steps)
    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks: List[pl.Callback] = [timer]
    spent, per_batch = [0.0], []
    settings = VARIANTS[variant]
    counters.SHORT_PATH = variant != "full-no-short-path"
    if settings is not None:
        monitor = DataQualityMonitor(profile_path=None, **settings)
        spent, per_batch = timed(monitor)
        callbacks.append(monitor)
    trainer = pl.Trainer(
        max_steps=steps, log_every_n_steps=50, accelerator="cpu", devices=1, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        logger=pl.loggers.TensorBoardLogger(log_dir, name=workload), limit_val_batches=0,
    )
    trainer.fit(factory(), loader)
    return timer.step_times(), spent[0], per_batch


def iqr(values: List[float]) -> float:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return q[2] - q[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100, help="steps per run (one epoch); a logging period is 50")
    ap.add_argument("--warmup", type=int, default=5, help="first steps of each run left out of the means")
    ap.add_argument("--log-dir", default="/tmp/lightwatch-bench-dq")
    args = ap.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, torch {torch.__version__}, pytorch_lightning {pl.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"{args.rounds} rounds of {args.steps} steps (one epoch, epoch end included), first {args.warmup} left "
          f"out\n")
    print("| workload | tier | bare step (ms) | amortized ratio (median) | IQR | hook share | hook time / step (ms) "
          "| per-batch hook, unlogged step (us, median) |")
    print("|---|---|---|---|---|---|---|---|")
    for workload in args.workloads:
        for v in VARIANTS:  # warm-up of every variant
            run_once(workload, v, args.warmup + 5, args.log_dir)
        times: Dict[str, List[List[float]]] = {v: [] for v in VARIANTS}
        hooks: Dict[str, List[float]] = {v: [] for v in VARIANTS}
        batch_hook: Dict[str, List[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            order = list(VARIANTS)
            random.shuffle(order)
            for v in order:
                steps, spent, per_batch = run_once(workload, v, args.steps, args.log_dir)
                times[v].append(steps[args.warmup:])
                hooks[v].append(spent)
                batch_hook[v] += per_batch[args.warmup:]
        for v in ("per-batch", "full", "full-no-short-path"):
            ratios, shares, per_step, bare_means = [], [], [], []
            for bare, watched, spent in zip(times["bare"], times[v], hooks[v]):
                bare_mean = statistics.fmean(bare)
                bare_means.append(bare_mean)
                ratios.append(statistics.fmean(watched) / bare_mean)
                per_step.append(spent / args.steps)  # all steps' hook time, the epoch end included
                shares.append(spent / args.steps / bare_mean)
            print(f"| {WORKLOADS[workload]} | {v} | {1e3 * statistics.median(bare_means):.1f} | "
                  f"{statistics.median(ratios):.3f} | {iqr(ratios):.3f} | {100 * statistics.median(shares):.2f}% | "
                  f"{1e3 * statistics.median(per_step):.2f} | {1e6 * statistics.median(batch_hook[v]):.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
