"""Overhead of lightwatch's monitors against the same training without them, in the same process.

Protocol (see docs/performance.md): one thread, synthetic data, every variant warmed up, variants interleaved in
shuffled rounds, per-step wall time taken at ``on_train_batch_start``; the amortized ratio is the ratio of
mean step times over whole logging periods (median and IQR over rounds, and the ratio of the fastest
rounds, which a shared machine's noise disturbs least); unsampled-step overhead is the ratio of mean times
of the steps that were not sampled; the sampled-step extra is the median over rounds of the mean extra time
of a sampled step.

    OMP_NUM_THREADS=1 python bench/overhead.py                      # all workloads, intervals 1, 10, 50
    OMP_NUM_THREADS=1 python bench/overhead.py --workloads mlp --rounds 5 --intervals 50
    python bench/overhead.py --accelerator gpu --rounds 3                  # on one GPU
    python bench/overhead.py --never-sampled --intervals 50                # + runs that never sample

On a GPU the step times are host times at ``on_train_batch_start`` and the device is synchronised at the end
of each run, so the amortized ratio is exact; the per-step split (unsampled, sampled extra) shows where the
host waits.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from workloads import WORKLOADS, make  # noqa: E402

from lightwatch import ActivationStatsMonitor, GradientStatsMonitor  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
import logging  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightwatch").setLevel(logging.ERROR)  # the deep MLP trips act_dead; alerts are not measured here


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.starts: List[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args: Any) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the queued work belongs to the measured steps
        self.starts.append(time.perf_counter())

    def step_times(self) -> List[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


NEVER = 10 ** 6  # an interval no run reaches: every step is an unsampled step
Variant = Tuple[Optional[int], Optional[bool]]  # (interval or None for bare training, norm_every_step)


def monitors(variant: Variant, histograms: bool) -> List[pl.Callback]:
    interval, norm = variant
    if interval is None:
        return []
    hist = None if histograms else 0
    return [GradientStatsMonitor(every_n_steps=interval, histogram_every_n_steps=hist, norm_every_step=norm),
            ActivationStatsMonitor(every_n_steps=interval, histogram_every_n_steps=hist)]


def run_once(workload: str, variant: Variant, steps: int, histograms: bool, log_dir: str,
             accelerator: str = "cpu") -> List[float]:
    factory, loader = make(workload, steps)
    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=steps, log_every_n_steps=50, accelerator=accelerator, devices=1, callbacks=[timer] + monitors(
            variant, histograms), enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        logger=pl.loggers.TensorBoardLogger(log_dir, name=workload), limit_val_batches=0,
    )
    trainer.fit(factory(), loader)
    return timer.step_times()


def iqr(values: List[float]) -> float:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return q[2] - q[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--intervals", nargs="+", type=int, default=[1, 10, 50])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--periods", type=int, default=2, help="logging periods of 50 steps measured per run")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--histograms", action="store_true", help="also write histograms (every 10 intervals)")
    ap.add_argument("--log-dir", default="/tmp/lightwatch-bench")
    ap.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--norm-every-step", default="auto", choices=["auto", "on", "off"],
                    help="GradientStatsMonitor(norm_every_step=): auto is on for accelerators, off on the CPU")
    ap.add_argument("--never-sampled", action="store_true",
                    help="also time runs whose monitors never sample, with the per-step norm as set and off")
    args = ap.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, torch {torch.__version__}, pytorch_lightning {pl.__version__}, "
          f"threads {torch.get_num_threads()}, accelerator {args.accelerator}"
          + (f" ({torch.cuda.get_device_name()})" if args.accelerator == "gpu" else ""))
    measured = args.periods * 50
    steps = args.warmup + measured
    print(f"{args.rounds} rounds, {measured} measured steps per run after {args.warmup} warm-up steps\n")
    print("| workload | interval | bare step (ms) | amortized ratio (median) | IQR | best-round ratio | "
          "unsampled-step ratio | sampled-step extra (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for workload in args.workloads:
        norm = {"auto": None, "on": True, "off": False}[args.norm_every_step]
        variants: List[Variant] = [(None, None)] + [(i, norm) for i in args.intervals]
        if args.never_sampled:
            variants += [(NEVER, norm)] + ([(NEVER, False)] if norm is not False else [])
        for v in variants:  # warm-up of every variant
            run_once(workload, v, args.warmup + 5, args.histograms, args.log_dir, args.accelerator)
        times: Dict[Variant, List[List[float]]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            order = variants[:]
            random.shuffle(order)
            for v in order:
                run = run_once(workload, v, steps, args.histograms, args.log_dir, args.accelerator)
                times[v].append(run[args.warmup:steps])
        for variant in variants[1:]:
            interval = variant[0]
            ratios, idle_ratios, extras, bare_means = [], [], [], []
            for bare, watched in zip(times[(None, None)], times[variant]):
                first = args.warmup
                sampled = [i for i in range(len(watched)) if (first + i + 1) % interval == 0]
                unsampled = [i for i in range(len(watched)) if (first + i + 1) % interval != 0]
                bare_mean = statistics.fmean(bare)
                bare_means.append(bare_mean)
                ratios.append(statistics.fmean(watched) / bare_mean)
                if unsampled:
                    idle_ratios.append(statistics.fmean(watched[i] for i in unsampled) /
                                       statistics.fmean(bare[i] for i in unsampled))
                if sampled:
                    extras.append(statistics.fmean(watched[i] - bare[i] for i in sampled))
            idle = f"{statistics.median(idle_ratios):.3f}" if idle_ratios else "n/a (every step sampled)"
            label = "never" if interval == NEVER else str(interval)
            if variant[1] is not None:
                label += f", norm_every_step={variant[1]}"
            extra = f"{1e3 * statistics.median(extras):.2f}" if extras else "-"
            # the least disturbed round of each: on a shared machine the noise only ever adds time
            best = min(statistics.fmean(w) for w in times[variant]) / min(statistics.fmean(b) for b in
                                                                           times[(None, None)])
            print(f"| {WORKLOADS[workload]} | {label} | {1e3 * statistics.median(bare_means):.1f} | "
                  f"{statistics.median(ratios):.3f} | {iqr(ratios):.3f} | {best:.3f} | {idle} | {extra} |",
                  flush=True)


if __name__ == "__main__":
    main()
