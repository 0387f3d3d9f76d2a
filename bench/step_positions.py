"""Training-thread CPU time per step, by the step's position in the sampling period, against bare training.

Whole-run ratios on a shared 2-core machine move by +-10% between runs of the same variant; the CPU time of
the training thread, step by step, does not. This benchmark trains a workload bare and under a variant
(``monitor=default`` unless told otherwise), in alternating runs, and prints per position ``step % interval``
the median and the smallest step time (``time.thread_time`` of the training thread from one
``on_train_batch_start`` to the next, steps from 20 on). The last position is the sampled step (a
sampled step is the ``interval``-th); the others show what an unsampled step costs, hooks, Lightning's calls
of them and any cache effect included (the time inside lightwatch's hooks alone is ``bench/hook_timing.py``).
TensorBoard's writer thread is not in it (``bench/policy_overhead.py``'s *other threads* column is).

    OMP_NUM_THREADS=1 python bench/step_positions.py --workload mlp --interval 10 --steps 160 --pairs 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from policy_overhead import variant_callbacks  # noqa: E402
from workloads import SMOKE_WORKLOADS, WORKLOADS, make  # noqa: E402

torch.set_num_threads(1)


class _Marks(pl.Callback):
    def __init__(self) -> None:
        self.marks: List[Tuple[int, float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.marks.append((trainer.global_step, time.thread_time()))


def step_times(workload: str, variant: str, interval: int, steps: int, warmup: int = 20) -> Dict[int, List[float]]:
    """Training-thread milliseconds of each step from ``warmup`` on, grouped by ``step % interval``."""
    factory, loader = make(workload, 2 * steps)
    with tempfile.TemporaryDirectory() as tmp:
        marks = _Marks()
        callbacks = variant_callbacks(variant, interval, tmp) if variant != "bare" else []
        trainer = pl.Trainer(default_root_dir=tmp, max_steps=steps, log_every_n_steps=50,
                             callbacks=[marks] + callbacks, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, accelerator="cpu", devices=1,
                             logger=pl.loggers.TensorBoardLogger(tmp, name="", version=""))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(factory(), loader)
    per: Dict[int, List[float]] = {}
    for (step, start), (_, end) in zip(marks.marks, marks.marks[1:]):
        if step >= warmup:
            per.setdefault(step % interval, []).append((end - start) * 1e3)
    return per


def main(argv: Optional[List[str]] = None) -> List[Dict[str, float]]:
    """Print the table; returns per pair ``bare_ms``, ``unsampled_extra_ms`` and ``sampled_extra_ms``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="mlp", choices=list(WORKLOADS) + list(SMOKE_WORKLOADS))
    parser.add_argument("--variant", default="monitor=default")
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--pairs", type=int, default=2, help="bare/variant runs, alternating")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out at the start of each run")
    args = parser.parse_args(argv)
    import logging

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightwatch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"{args.workload}, interval {args.interval}, {args.steps} steps; training-thread ms per step, "
          f"median / smallest, by step % interval (position {args.interval - 1} is the sampled step)")
    results: List[Dict[str, float]] = []
    for pair in range(args.pairs):
        rows = {v: step_times(args.workload, v, args.interval, args.steps, args.warmup)
                for v in ("bare", args.variant)}
        for variant, per in rows.items():
            cells = " ".join(f"{k}:{statistics.median(v):.1f}/{min(v):.1f}" for k, v in sorted(per.items()))
            print(f"pair {pair + 1} {variant:>16}  {cells}", flush=True)
        bare, other = rows["bare"], rows[args.variant]
        last = args.interval - 1
        unsampled = [statistics.median(other[k]) - statistics.median(bare[k]) for k in other if k != last]
        bare_step = statistics.median([x for k in bare for x in bare[k]])
        sampled = statistics.median(other[last]) - bare_step if last in other else float("nan")
        print(f"pair {pair + 1}: bare step {bare_step:.2f} ms; unsampled extra (median over positions) "
              f"{statistics.median(unsampled):+.2f} ms; sampled-step extra {sampled:+.2f} ms "
              f"({sampled / bare_step:.2f}x a bare step)", flush=True)
        results.append({"bare_ms": bare_step, "unsampled_extra_ms": statistics.median(unsampled),
                        "sampled_extra_ms": sampled})
    return results


if __name__ == "__main__":
    main()
