"""Time spent inside lightwatch, per callback and per hook, on unsampled and on sampled steps.

Whole-run ratios on a shared machine carry about +-10% of noise; the time lightwatch's own code takes is
stable. This benchmark trains a workload under a Hydra policy (``monitor=default`` unless told otherwise)
and wraps every Lightning hook each of the policy's callbacks overrides, and every model hook lightwatch
registers (forward hooks, forward pre-hooks, tensor hooks), with a ``time.perf_counter`` timer. It prints,
per callback and hook, the time per unsampled step (microseconds, averaged over all unsampled steps) and
per sampled step (milliseconds), the fit-start cost (``setup`` + ``on_fit_start`` + the first step), and
the bare step time of the same run's unsampled steps for scale. Measured with one thread
(``OMP_NUM_THREADS=1``), synthetic data, no logger I/O beyond TensorBoard's.

    OMP_NUM_THREADS=1 python bench/hook_timing.py                               # mlp, transformer, cnn at 10, 50
    OMP_NUM_THREADS=1 python bench/hook_timing.py --workloads mlp --intervals 50 --steps 300 --policy strict
    python bench/hook_timing.py --markdown outputs/hook_timing.md

A step is *sampled* when any lightwatch monitor sampled it (``MonitorCallback.sampled`` at the end of the
step), which with one interval for the whole policy is every ``interval``-th step plus step 0.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, DefaultDict, Dict, Iterator, List, Set, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from workloads import WORKLOADS, describe, make  # noqa: E402

torch.set_num_threads(1)

Key = Tuple[str, str]  # (callback, hook)


class HookClock:
    """Accumulates the time of every wrapped call, per (callback, hook) and per training step.

    ``timer`` is ``time.perf_counter`` (wall time) unless told otherwise, e.g. ``time.thread_time`` (CPU time
    of the thread: not inflated when a shared machine preempts the process, but a system call, ~2 us here).
    The timer's own cost, the median of two back-to-back readings, is subtracted from every timed call."""

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self.timer = timer
        self.overhead = _timer_overhead(timer)
        self.step = -1  # -1: before the first training batch (setup, fit start)
        self.per_step: DefaultDict[int, DefaultDict[Key, float]] = collections.defaultdict(
            lambda: collections.defaultdict(float))
        self.sampled: Set[int] = set()

    def timed(self, key: Key, fn: Callable[..., Any]) -> Callable[..., Any]:
        timer, overhead = self.timer, self.overhead

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = timer()
            try:
                return fn(*args, **kwargs)
            finally:
                self.per_step[self.step][key] += timer() - start - overhead
        return wrapper


def _timer_overhead(timer: Callable[[], float], samples: int = 2001) -> float:
    gaps = []
    for _ in range(samples):
        start = timer()
        gaps.append(timer() - start)
    return sorted(gaps)[samples // 2]


def _overridden_hooks(callback: pl.Callback) -> List[str]:
    base = pl.Callback
    names = [n for n in dir(base) if n.startswith("on_") or n in ("setup", "teardown")]
    return [n for n in names if getattr(type(callback), n, None) is not getattr(base, n, None)]


class StepMarker(pl.Callback):
    """First and last callback: tracks the step index and which steps were sampled, and the bare step time."""

    def __init__(self, clock: HookClock, monitors: List[Any]) -> None:
        self.clock, self.monitors = clock, monitors
        self.starts: Dict[int, float] = {}
        self.durations: Dict[int, float] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.clock.step = trainer.global_step
        self.starts[trainer.global_step] = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = self.clock.step
        if any(getattr(m, "sampled", False) for m in self.monitors):
            self.clock.sampled.add(step)
        if step in self.starts:
            self.durations[step] = time.perf_counter() - self.starts[step]


def policy_callbacks(policy: str, interval: int) -> List[pl.Callback]:
    from hydra import compose, initialize_config_module

    from lightwatch.hydra import instantiate_monitors

    with initialize_config_module(config_module="lightwatch.conf", version_base="1.3"):
        cfg = compose(config_name=f"monitor/{policy}", overrides=[f"monitor.every_n_steps={interval}"])
    return instantiate_monitors(cfg.monitor)


def instrument(clock: HookClock, callbacks: List[pl.Callback]) -> None:
    """Wrap every Lightning hook each callback overrides with ``clock``'s timer, keyed by (class, hook)."""
    for cb in callbacks:
        for name in _overridden_hooks(cb):
            setattr(cb, name, clock.timed((type(cb).__name__, name), getattr(cb, name)))


def _hook_owner(hook: Callable[..., Any]) -> str:
    """The lightwatch class a hook belongs to (its bound object, or the class its closure was made in)."""
    fn = getattr(hook, "func", hook)  # a functools.partial
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        return type(owner).__name__
    # the classes of lightwatch.callbacks are private (`_ActivationStatsMonitor`), bound to Lightning under
    # their public names
    return getattr(fn, "__qualname__", "lightwatch").split(".")[0].lstrip("_")


def _is_lightwatch(hook: Callable[..., Any]) -> bool:
    return str(getattr(getattr(hook, "func", hook), "__module__", "")).startswith("lightwatch")


@contextlib.contextmanager
def timed_model_hooks(clock: HookClock) -> Iterator[None]:
    """While open, every forward hook (global ones too), forward pre-hook and tensor (gradient) hook lightwatch
    registers is wrapped with ``clock``'s timer, keyed by (owning class, "forward hooks" | "forward pre-hooks" | "tensor hooks").
    """
    patched = [(torch.nn.Module, "register_forward_hook", "forward hooks"),
               (torch.nn.Module, "register_forward_pre_hook", "forward pre-hooks"),
               (torch.Tensor, "register_hook", "tensor hooks")]
    originals = [getattr(owner, name) for owner, name, _ in patched]

    def wrapping(original: Callable[..., Any], label: str) -> Callable[..., Any]:
        def register(target: Any, hook: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if _is_lightwatch(hook):
                hook = clock.timed((_hook_owner(hook), label), hook)
            return original(target, hook, *args, **kwargs)
        return register

    # the global forward hook ActivationStatsMonitor registers for a sampled step (it dispatches to the
    # watched modules' hooks) counts as its forward hooks
    global_module = torch.nn.modules.module
    global_original = global_module.register_module_forward_hook

    def register_global(hook: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if _is_lightwatch(hook):
            hook = clock.timed((_hook_owner(hook), "forward hooks"), hook)
        return global_original(hook, *args, **kwargs)

    for (owner, name, label), original in zip(patched, originals):
        setattr(owner, name, wrapping(original, label))
    global_module.register_module_forward_hook = register_global
    try:
        yield
    finally:
        for (owner, name, _), original in zip(patched, originals):
            setattr(owner, name, original)
        global_module.register_module_forward_hook = global_original


def hook_rows(clock: HookClock, unsampled: List[int], sampled: List[int]) -> List[Tuple[str, str, float, float]]:
    """``(callback, hook, us per unsampled step, ms per sampled step)``, averaged over the given steps."""
    keys = sorted({k for per in clock.per_step.values() for k in per})
    rows = []
    for key in keys:
        un = sum(clock.per_step[s].get(key, 0.0) for s in unsampled) / max(len(unsampled), 1)
        sa = sum(clock.per_step[s].get(key, 0.0) for s in sampled) / max(len(sampled), 1)
        rows.append((key[0], key[1], un * 1e6, sa * 1e3))
    return rows


def fit_start_seconds(clock: HookClock) -> float:
    """Time inside the wrapped hooks before the first training batch and during step 0."""
    return sum(clock.per_step[-1].values()) + sum(clock.per_step[0].values())


def run(workload: str, interval: int, steps: int, policy: str) -> Dict[str, Any]:
    clock = HookClock()
    callbacks = policy_callbacks(policy, interval)
    instrument(clock, callbacks)
    marker = StepMarker(clock, callbacks)
    factory, loader = make(workload, steps)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            default_root_dir=tmp, max_steps=steps, log_every_n_steps=interval, callbacks=[marker] + callbacks,
            logger=pl.loggers.TensorBoardLogger(tmp, name="tb"), enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            accelerator="cpu", devices=1)
        with timed_model_hooks(clock), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(factory(), loader)
    return {"clock": clock, "durations": marker.durations, "steps": steps}


def summarise(result: Dict[str, Any]) -> Tuple[List[Tuple[str, str, float, float]], Dict[str, float]]:
    clock: HookClock = result["clock"]
    trained = [s for s in result["durations"] if s >= 1]  # step 0 is part of the fit-start cost
    sampled = [s for s in trained if s in clock.sampled]
    unsampled = [s for s in trained if s not in clock.sampled]
    rows = hook_rows(clock, unsampled, sampled)
    bare = sorted(result["durations"][s] for s in unsampled)
    median_step = bare[len(bare) // 2] if bare else float("nan")
    inside_un = sum(r[2] for r in rows) * 1e-6
    totals = {"step_ms": median_step * 1e3, "unsampled_us": inside_un * 1e6,
              "unsampled_share": inside_un / median_step if bare else float("nan"),
              "sampled_ms": sum(r[3] for r in rows), "fit_start_ms": fit_start_seconds(clock) * 1e3,
              "sampled_steps": float(len(sampled)), "unsampled_steps": float(len(unsampled))}
    return rows, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="mlp,transformer,cnn", help=f"from {', '.join(WORKLOADS)}")
    parser.add_argument("--intervals", default="10,50")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--policy", default="default")
    parser.add_argument("--markdown", default=None, help="also write the tables as Markdown to this file")
    args = parser.parse_args()
    import logging

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightwatch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lines = [f"# lightwatch hook timing: policy {args.policy}, {args.steps} steps; {platform.platform()}, "
             f"python {platform.python_version()}, torch {torch.__version__}, pytorch_lightning {pl.__version__}, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", ""]
    for workload in args.workloads.split(","):
        for interval in (int(i) for i in args.intervals.split(",")):
            rows, totals = summarise(run(workload, interval, args.steps, args.policy))
            lines += [f"## {workload} ({describe(workload)}), interval {interval}", "",
                      f"Bare step (median of unsampled steps, monitors included) {totals['step_ms']:.2f} ms; inside "
                      f"lightwatch per unsampled step {totals['unsampled_us']:.0f} us "
                      f"({100 * totals['unsampled_share']:.2f}% of the step), per sampled step "
                      f"{totals['sampled_ms']:.2f} ms; fit start (setup, on_fit_start, step 0) "
                      f"{totals['fit_start_ms']:.0f} ms; {totals['unsampled_steps']:.0f} unsampled and "
                      f"{totals['sampled_steps']:.0f} sampled steps timed.", "",
                      "| callback | hook | us per unsampled step | ms per sampled step |", "|---|---|---|---|"]
            lines += [f"| {cb} | {hook} | {un:.1f} | {sa:.3f} |" for cb, hook, un, sa in rows if un > 0 or sa > 0]
            lines.append("")
            print("\n".join(lines[-(len(rows) + 6):]), flush=True)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
