"""How a sampled step's cost grows: with the watched bytes, or with the number of watched modules?

``GradientStatsMonitor`` and ``ActivationStatsMonitor`` watch everything (``top_k=None``, no histograms) on
a stack of ``modules`` ``Linear(w, w)`` layers (``tanh`` between them, as a function: the Linear layers are
the only leaf modules) with ``modules * w * w`` close to ``params``; plain SGD (no optimizer state), batch 8,
one thread, synthetic data. Per configuration one run; a sampled step every ``--interval`` steps after
``--warmup`` steps (step 0, the first sampled step with its one-off diagnoses, is not counted). Reported:

- *inside (ms)*: the time inside the two monitors per sampled step (every Lightning hook and model hook,
  ``time.thread_time`` around each, less the timer's own cost: ``bench/hook_timing.py``'s ``HookClock``),
  minus their time per unsampled step;
- *extra (ms)*: the process CPU time of a sampled step minus the median of the run's unsampled steps;
- *one read (ms)*: the time of one norm of a contiguous tensor as large as the parameters, one read of
  the watched bytes: the floor a sampled step's statistics could cost (and, for comparison,
  ``torch._foreach_norm`` over the parameters themselves, which on the CPU pays a per-tensor cost too);
- per module (us) and per MB (ms): the inside time divided by each; and a least-squares fit of
  ``inside = a + b * modules + c * MB`` over the grid, whose ``b`` is the per-module (Python and launch)
  cost and ``c`` the per-byte cost. Cost that grows with bytes, not with per-module Python, shows as a
  per-MB cost close to the one-read floor's and a small ``b``.

    OMP_NUM_THREADS=1 python bench/scaling.py                                   # 10/100/1000 x 1M/10M/100M
    OMP_NUM_THREADS=1 python bench/scaling.py --modules 10 100 --params 1e6 1e7 --json outputs/scaling.json

Configurations whose estimated memory (16 bytes per parameter: weights, gradients, the update ratio's
copy, the floor's flat tensor) exceeds half the available memory are skipped and said so.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from hook_timing import HookClock, StepMarker, hook_rows, instrument, timed_model_hooks  # noqa: E402
from tables import fmt, json_safe, markdown_table  # noqa: E402

from lightwatch import ActivationStatsMonitor, GradientStatsMonitor  # noqa: E402

torch.set_num_threads(1)
torch.set_flush_denormal(True)  # a deep tanh stack's activations shrink towards denormals, which are slow on CPUs
warnings.filterwarnings("ignore")
for _name in ("pytorch_lightning", "lightning.pytorch", "lightwatch", "pytorch_lightning.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.ERROR)

BATCH = 8


class LinearStack(nn.Module):
    """``modules`` Linear(width, width) layers with ``tanh`` between them: ``modules`` watched leaf modules."""

    def __init__(self, modules: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(modules))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class StackTask(pl.LightningModule):
    def __init__(self, modules: int, width: int) -> None:
        super().__init__()
        self.net = LinearStack(modules, width)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class CPUClock(pl.Callback):
    """Process CPU time at the start of every step and at the end of the last one's ``on_train_batch_end``."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.marks: List[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.marks.append(time.process_time())

    def closing(self) -> pl.Callback:
        clock = self

        class Closing(pl.Callback):
            def on_train_batch_end(self, *args: Any) -> None:
                if len(clock.marks) == clock.steps:
                    clock.marks.append(time.process_time())

        return Closing()


def _best_ms(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def one_read_ms(model: nn.Module, repeats: int = 5) -> Dict[str, float]:
    """Best of ``repeats`` timings of reading the watched bytes once: ``flat``, one norm of a contiguous tensor
    of as many elements as the parameters (the memory floor); ``foreach``, ``torch._foreach_norm`` over the
    parameters themselves (which on the CPU also pays a per-tensor cost)."""
    params = [p.detach() for p in model.parameters()]
    flat = torch.ones(sum(p.numel() for p in params))
    costs = {"flat": _best_ms(lambda: torch.linalg.vector_norm(flat), repeats),
             "foreach": _best_ms(lambda: torch._foreach_norm(params), repeats)}
    return costs


def width_for(modules: int, params: float) -> int:
    return max(2, round(math.sqrt(params / modules)))


def run(modules: int, params: float, interval: int, warmup: int, sampled: int) -> Dict[str, Any]:
    width = width_for(modules, params)
    steps = warmup + sampled * interval
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * BATCH, width, generator=g)
    y = torch.randint(0, width, (steps * BATCH,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    pl.seed_everything(0, verbose=False)
    model = StackTask(modules, width)
    monitors = [GradientStatsMonitor(every_n_steps=interval, top_k=None, histogram_every_n_steps=0),
                ActivationStatsMonitor(every_n_steps=interval, top_k=None, histogram_every_n_steps=0)]
    hooks = HookClock(time.thread_time)  # CPU time: a shared machine's preemption does not inflate it
    instrument(hooks, monitors)
    cpu = CPUClock(steps)
    with tempfile.TemporaryDirectory() as directory:
        trainer = pl.Trainer(
            max_steps=steps, log_every_n_steps=50, accelerator="cpu", devices=1,
            callbacks=[StepMarker(hooks, monitors), cpu] + monitors + [cpu.closing()],
            logger=pl.loggers.TensorBoardLogger(directory, name="scaling"), enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
        with timed_model_hooks(hooks):
            trainer.fit(model, loader)
    step_s = [b - a for a, b in zip(cpu.marks, cpu.marks[1:])]
    counted = range(max(warmup, 1), len(step_s))
    on = [s for s in counted if s in hooks.sampled]
    off = [s for s in counted if s not in hooks.sampled]
    inside_on = statistics.fmean(sum(hooks.per_step[s].values()) for s in on)
    inside_off = statistics.fmean(sum(hooks.per_step[s].values()) for s in off)
    bare = statistics.median(step_s[s] for s in off)
    watched = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"modules": modules, "params": sum(p.numel() for p in model.parameters()), "width": width,
            "watched_mb": watched / 2 ** 20, "step_ms": bare * 1e3, "sampled_steps": len(on),
            "inside_ms": (inside_on - inside_off) * 1e3,
            "extra_ms": (statistics.fmean(step_s[s] for s in on) - bare) * 1e3,
            **{f"one_read_{k}_ms": v for k, v in one_read_ms(model).items()},
            "hooks": [{"callback": c, "hook": h, "unsampled_us": u, "sampled_ms": m}
                      for c, h, u, m in hook_rows(hooks, off, on)]}


def fit_costs(rows: Sequence[Dict[str, Any]]) -> Optional[Dict[str, float]]:
    """Least squares ``inside_ms = a + b * modules + c * MB``: b in us per module, c in ms per MB."""
    if len(rows) < 3:
        return None
    design = torch.tensor([[1.0, r["modules"], r["watched_mb"]] for r in rows], dtype=torch.float64)
    target = torch.tensor([[r["inside_ms"]] for r in rows], dtype=torch.float64)
    a, b, c = torch.linalg.lstsq(design, target).solution.flatten().tolist()
    read = torch.tensor([[r["one_read_flat_ms"]] for r in rows], dtype=torch.float64)
    floor = torch.linalg.lstsq(design, read).solution.flatten().tolist()
    return {"fixed_ms": a, "per_module_us": b * 1e3, "per_mb_ms": c, "one_read_per_mb_ms": floor[2]}


def available_bytes() -> float:
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modules", nargs="+", type=int, default=[10, 100, 1000])
    ap.add_argument("--params", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    ap.add_argument("--interval", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="steps before the counted ones (step 0 is never counted)")
    ap.add_argument("--sampled", type=int, default=3, help="sampled steps counted per configuration")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    header = (f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, torch "
              f"{torch.__version__}, pytorch_lightning {pl.__version__}, threads {torch.get_num_threads()}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; GradientStatsMonitor + "
              f"ActivationStatsMonitor, top_k=None, interval {args.interval}, {args.sampled} sampled steps each")
    print(header, flush=True)
    rows, skipped = [], []
    for params in args.params:
        for modules in args.modules:
            if 16 * params > available_bytes() / 2:
                skipped.append(f"{modules} modules x {params:.0e} parameters: ~{16 * params / 2 ** 30:.1f} GiB "
                               f"needed, more than half the available memory")
                print("skipped: " + skipped[-1], flush=True)
                continue
            rows.append(run(modules, params, args.interval, args.warmup, args.sampled))
            r = rows[-1]
            print(f"  {modules} modules, {r['params'] / 1e6:.1f}M parameters: inside {r['inside_ms']:.2f} ms, "
                  f"extra {r['extra_ms']:.2f} ms, one read {r['one_read_flat_ms']:.2f} ms", flush=True)
    headers = ["modules", "parameters (M)", "watched (MB)", "step (ms)", "inside, sampled step (ms)",
               "extra, sampled step (ms)", "one read, flat (ms)", "_foreach_norm (ms)", "inside / one read",
               "per module (us)", "per MB (ms)"]
    table = [[r["modules"], fmt(r["params"] / 1e6, 1), fmt(r["watched_mb"], 1), fmt(r["step_ms"], 1),
              fmt(r["inside_ms"], 2), fmt(r["extra_ms"], 2), fmt(r["one_read_flat_ms"], 2),
              fmt(r["one_read_foreach_ms"], 2), fmt(r["inside_ms"] / r["one_read_flat_ms"], 1),
              fmt(1e3 * r["inside_ms"] / r["modules"], 1),
              fmt(r["inside_ms"] / r["watched_mb"], 3)] for r in rows]
    costs = fit_costs(rows)
    lines = [header, ""] + markdown_table(headers, table) + [""]
    if costs:
        lines.append(f"Fit over the grid: inside = {costs['fixed_ms']:.2f} ms + {costs['per_module_us']:.1f} us per "
                     f"module + {costs['per_mb_ms']:.3f} ms per MB (one flat read: {costs['one_read_per_mb_ms']:.3f} "
                     f"ms per MB).")
    lines += [f"Skipped: {s}." for s in skipped]
    print("\n".join(lines[2:]), flush=True)
    print("(per hook, in the JSON: rows[].hooks)", flush=True)
    report = {"header": header, "config": vars(args), "rows": rows, "fit": costs, "skipped": skipped}
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(json_safe(report), fh, indent=1)
    return report


if __name__ == "__main__":
    main()
