"""What users run, against what they would pick instead: lightwatch's policies and each default callback
alone, Lightning's ``grad_norm`` recipe and ``wandb.watch``, against the same training without them.

Protocol (docs/performance.md, "The default policy against its anchors"): one process, one thread
(``OMP_NUM_THREADS=1``), synthetic data, ``Trainer(log_every_n_steps=50)`` and a TensorBoard logger for every
variant; one discarded warm-up round, then ``--rounds`` rounds, each running every variant once in a new
random order. Per run, the steady state is the ``--measured`` steps after the first ``--warmup`` (20) steps;
its cost is the process CPU time (``time.process_time``, all threads, plus the CPU time of child processes
such as wandb's service) on the CPU, and the wall time between two device synchronisations on a GPU. The
variants, at each interval N of ``--intervals``:

- ``bare``: no callback of lightwatch's, nothing else (the baseline of every ratio, run once per round);
- ``monitor=default``, ``monitor=strict``: ``instantiate_monitors`` of the policy with
  ``monitor.every_n_steps=N`` (the strict policy's own interval, 10, is overridden too);
- ``default:<Callback>``: each callback of ``monitor=default`` alone, at interval N;
- ``lightning grad_norm``: ``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``
  every step (Lightning's recipe; it does not depend on N, so it runs once per round);
- ``wandb.watch``: ``wandb.init(mode="offline")`` per run, ``wandb.watch(model, log="all", log_freq=N)``,
  a ``run.log`` every N steps (what a ``WandbLogger`` would do: it commits the staged histograms), and
  ``run.finish()`` at the end (skipped, and said so, when wandb is not installed: ``pip install .[bench]``).

Reported per workload and interval: the amortized ratio (median and IQR over rounds of steady-state cost /
the same round's bare cost; the steady state covers whole sampling intervals), the measured extra per step,
the time inside lightwatch (every Lightning hook of every lightwatch callback and every model hook lightwatch
registers, timed with ``time.perf_counter`` by ``bench/hook_timing.py``'s ``HookClock``), per unsampled step
(us) and per sampled step (ms), per callback and per hook, the extra CPU time of the process's other threads
(TensorBoard's event writer serialises what the hooks hand it; from ``/proc/self/task/*/schedstat``, against
the same round's bare run), the fit-start seconds (wall time from
``trainer.fit`` to the start of step 1: setup, ``on_fit_start``, the data scan, step 0) and the peak extra
memory: the RSS high-water mark of a fresh child process per variant, which imports every variant's
packages first and then resets the mark (``/proc/self/clear_refs``; the imports' transient peak would hide
a small model's training), minus the bare child's (``torch.cuda.max_memory_allocated`` on a GPU), and of that
extra, the resident pages of shared libraries' code the variant's kernels brought in (``RssFile`` at the end,
against the bare child's: counted by the high-water mark, but shared, read-only and reclaimable).

    OMP_NUM_THREADS=1 python bench/policy_overhead.py                           # short: 2 rounds, 50 steps
    OMP_NUM_THREADS=1 python bench/policy_overhead.py --rounds 5 --measured 100 \\
        --markdown outputs/policy_overhead.md --json outputs/policy_overhead.json   # the full run
    OMP_NUM_THREADS=1 python bench/policy_overhead.py --workloads mlp --intervals 50 --no-memory
    python bench/policy_overhead.py --accelerator gpu
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")  # never online: the benchmark downloads and uploads nothing
os.environ.setdefault("WANDB_SILENT", "true")
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from hook_timing import HookClock, StepMarker, fit_start_seconds, hook_rows, instrument, policy_callbacks  # noqa: E402
from hook_timing import timed_model_hooks  # noqa: E402
from tables import floats, fmt, json_safe, markdown_table, mb, median_iqr, share  # noqa: E402
from workloads import LARGE_WORKLOADS, SMOKE_WORKLOADS, WORKLOADS, describe, make  # noqa: E402

torch.set_num_threads(1)
QUIET = ("pytorch_lightning", "lightning.pytorch", "lightning", "lightwatch", "wandb",
         "pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")

BARE, DEFAULT, STRICT, GRAD_NORM, WANDB = "bare", "monitor=default", "monitor=strict", "lightning grad_norm", \
    "wandb.watch"
SINGLE = "default:"  # + a callback class name of the default policy
INTERVAL_FREE = (BARE, GRAD_NORM)  # variants whose cost does not depend on the interval: one run per round
LOG_EVERY = 50  # Trainer(log_every_n_steps) of every variant: Lightning's own logging costs the same in all
MEMORY_MARK = "LIGHTWATCH_BENCH_MEMORY "
Run = Tuple[str, Optional[int]]  # (variant, interval; None for the interval-free ones)


def has_wandb() -> bool:
    return importlib.util.find_spec("wandb") is not None


def default_callback_names() -> List[str]:
    """Class names of the callbacks ``instantiate_monitors`` builds for ``monitor=default``."""
    return [type(cb).__name__ for cb in policy_callbacks("default", 10)]


def variants(include_wandb: bool) -> List[str]:
    names = [BARE, DEFAULT, STRICT] + [SINGLE + n for n in default_callback_names()] + [GRAD_NORM]
    return names + ([WANDB] if include_wandb else [])


class WandbWatch(pl.Callback):
    """``wandb.watch(model, log="all", log_freq=N)`` on an offline run opened at fit start, closed at the end."""

    def __init__(self, log_freq: int, directory: str) -> None:
        self.log_freq, self.directory = log_freq, directory
        self.run: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import wandb

        # console="off": no capture of the process's stdout (nothing is printed while training here)
        self.run = wandb.init(project="lightwatch-bench", dir=self.directory, mode="offline",
                              settings=wandb.Settings(console="off"))
        wandb.watch(pl_module, log="all", log_freq=self.log_freq)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx % self.log_freq == 0:  # commits the histograms wandb.watch staged, as WandbLogger.log would
            self.run.log({"trainer/global_step": trainer.global_step})

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def log_grad_norm_every_step(module: pl.LightningModule) -> pl.LightningModule:
    """The module, given Lightning's recipe: ``self.log_dict(grad_norm(self, norm_type=2))`` every step."""
    from pytorch_lightning.utilities import grad_norm

    def on_before_optimizer_step(self: pl.LightningModule, optimizer: Any) -> None:
        self.log_dict(grad_norm(self, norm_type=2))

    cls = type(module)
    hooks = {"on_before_optimizer_step": on_before_optimizer_step}
    module.__class__ = type(cls.__name__ + "WithGradNorm", (cls,), hooks)
    return module


def variant_callbacks(variant: str, interval: Optional[int], directory: str) -> List[pl.Callback]:
    if variant in (BARE, GRAD_NORM):
        return []
    assert interval is not None
    if variant in (DEFAULT, STRICT):
        return policy_callbacks(variant.split("=")[1], interval)
    if variant.startswith(SINGLE):
        name = variant[len(SINGLE):]
        return [cb for cb in policy_callbacks("default", interval) if type(cb).__name__ == name]
    if variant == WANDB:
        return [WandbWatch(interval, directory)]
    raise ValueError(f"unknown variant {variant!r}; use one of {variants(True)}")


def _children_cpu() -> float:
    """CPU seconds of this process's live child processes (wandb's service); 0 without psutil."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def _other_threads_cpu() -> float:
    """CPU seconds of this process's threads other than the calling one (TensorBoard's event-writer thread, a
    watchdog), from ``/proc/self/task/*/schedstat`` (nanoseconds); 0 where there is no ``/proc``. Hook timers
    count the main thread only; this is where the work a hook hands to another thread shows."""
    me = threading.get_native_id()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    total = 0
    for tid in tids:
        if tid == str(me):
            continue
        try:
            with open(f"/proc/self/task/{tid}/schedstat", encoding="ascii") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            pass
    return total / 1e9


class StepClock(pl.Callback):
    """Marks the start of every training step, and the end of the last step's ``on_train_batch_end`` (through
    :meth:`closing`, a callback placed after all others): process CPU time (+ children's) and wall time. On a
    GPU the device is synchronised at the start of the steady state and at its end."""

    def __init__(self, steady_from: int, steps: int) -> None:
        self.steady_from, self.steps = steady_from, steps
        self.cpu: List[float] = []
        self.wall: List[float] = []
        self.children: Dict[str, float] = {}
        self.threads: Dict[str, float] = {}

    def _sync(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def _mark(self, children: Optional[str] = None) -> None:
        if children is not None:
            self._sync()
            self.children[children] = _children_cpu()
            self.threads[children] = _other_threads_cpu()
        self.cpu.append(time.process_time())
        self.wall.append(time.perf_counter())

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._mark("start" if len(self.cpu) == self.steady_from else None)

    def closing(self) -> pl.Callback:
        """The callback that ends the steady state: after the last step, before epoch-end and end-of-fit work,
        which happen once per epoch (a real epoch is hundreds of steps, not the few dozen of a run here)."""
        clock = self

        class Closing(pl.Callback):
            def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
                if len(clock.cpu) == clock.steps:
                    clock._mark("end")

        return Closing()


ONCE_HOOKS = ("on_train_epoch_end", "on_train_end", "teardown", "on_fit_end")  # after the steady state


def _state_bytes(trainer: pl.Trainer, model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers and of the optimizers' state tensors."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for optimizer in trainer.optimizers:
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


HOOK_TIMERS = {"wall": time.perf_counter, "cpu": time.thread_time}


def run_once(workload: str, variant: str, interval: Optional[int], steps: int, warmup: int, directory: str,
             accelerator: str = "cpu", hook_timer: str = "cpu") -> Dict[str, Any]:
    """Train one variant for ``steps`` steps; its costs, with the steady state starting at step ``warmup``."""
    # twice the batches the run takes: no epoch ends inside a run, so per-epoch work is not amortized over a
    # few dozen steps (a real epoch is hundreds or thousands)
    factory, loader = make(workload, 2 * steps)
    pl.seed_everything(0, verbose=False)
    hooks = HookClock(HOOK_TIMERS[hook_timer])
    callbacks = variant_callbacks(variant, interval, directory)
    watched = [cb for cb in callbacks if type(cb).__module__.startswith("lightwatch")]
    instrument(hooks, watched)
    clock = StepClock(warmup, steps)
    model = factory()
    if variant == GRAD_NORM:
        log_grad_norm_every_step(model)
    trainer = pl.Trainer(
        max_steps=steps, log_every_n_steps=LOG_EVERY, accelerator=accelerator, devices=1,
        callbacks=[StepMarker(hooks, watched), clock] + callbacks + [clock.closing()],
        logger=pl.loggers.TensorBoardLogger(directory, name=workload), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    wall_start = time.perf_counter()
    with timed_model_hooks(hooks):
        trainer.fit(model, loader)
    if len(clock.cpu) != steps + 1:
        raise RuntimeError(f"{workload}/{variant}: trained {len(clock.cpu) - 1} of {steps} steps; the loader of "
                           f"bench/workloads.py is too short or training stopped early (an alert's stop action?)")
    steady = list(range(warmup, steps))
    step_cost = clock.cpu if accelerator == "cpu" else clock.wall
    per_step = [b - a for a, b in zip(step_cost, step_cost[1:])]
    sampled = [s for s in steady if s in hooks.sampled]
    unsampled = [s for s in steady if s not in hooks.sampled]
    children = clock.children.get("end", 0.0) - clock.children.get("start", 0.0)
    last = hooks.per_step[steps - 1]
    once = [last.pop(key) for key in list(last) if key[1] in ONCE_HOOKS]
    return {
        "steady_s": step_cost[steps] - step_cost[warmup] + (children if accelerator == "cpu" else 0.0),
        "steady_wall_s": clock.wall[steps] - clock.wall[warmup],
        "children_cpu_s": children,
        "threads_cpu_s": clock.threads.get("end", 0.0) - clock.threads.get("start", 0.0),
        "step_s": per_step,
        "sampled": sampled,
        "hooks": hook_rows(hooks, unsampled, sampled),
        "inside_steady_s": sum(sum(hooks.per_step[s].values()) for s in steady),
        "once_s": sum(once),
        "fit_start_s": clock.wall[1] - wall_start,
        "fit_start_inside_s": fit_start_seconds(hooks),
        "state_bytes": _state_bytes(trainer, model),
    }


# ------------------------------------------------------------------------------------------------ memory
def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> Optional[int]:
    """A ``kB`` field of /proc/self/status in bytes; ``None`` where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    """VmHWM of /proc/self/status, else ``ru_maxrss`` (the high-water mark since the process started)."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB


def _rss_file_bytes() -> Optional[int]:
    """RssFile of /proc/self/status: resident pages mapped from files (shared libraries' code, read-only and
    shared with every process that maps them, dropped by the kernel under pressure); ``None`` where unknown."""
    return _status_bytes("RssFile")


def memory_child(workload: str, variant: str, interval: Optional[int], steps: int, accelerator: str) -> None:
    """In a fresh process: import what every variant imports, train one variant, print its high-water marks.
    The RSS high-water mark is reset after the imports: importing reaches a transient peak above a small
    model's training, which would hide every variant's extra."""
    default_callback_names()  # composes a policy: lightwatch, Hydra and OmegaConf are imported in every child
    if has_wandb():
        importlib.import_module("wandb")
    if accelerator == "gpu":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    reset = _reset_peak_rss()
    with tempfile.TemporaryDirectory() as directory:
        result = run_once(workload, variant, interval, steps, min(steps - 1, 1), directory, accelerator)
    peak = _peak_rss_bytes()
    record = {"rss_peak_bytes": peak, "ru_maxrss_bytes": peak,  # the older name too, for a parent of before
              "rss_file_bytes": _rss_file_bytes(),
              "rss_peak_since": "training" if reset else "process start",
              "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if accelerator == "gpu" else None,
              "state_bytes": result["state_bytes"]}
    print(MEMORY_MARK + json.dumps(record), flush=True)


def measure_memory(workload: str, names: Sequence[str], interval: int, steps: int, accelerator: str,
                   timeout: float) -> Dict[str, Dict[str, Any]]:
    """One fresh child process per variant; each variant's peak minus the bare child's."""
    peaks: Dict[str, Dict[str, Any]] = {}
    for variant in names:
        command = [sys.executable, os.path.abspath(__file__), "--memory-child", variant, "--workloads", workload,
                   "--intervals", str(interval), "--memory-steps", str(steps), "--accelerator", accelerator]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith(MEMORY_MARK)]
        if done.returncode != 0 or not lines:
            print(f"memory of {workload}/{variant} not measured (exit {done.returncode}): "
                  f"{done.stderr.strip().splitlines()[-1:] or done.stdout[-300:]}", file=sys.stderr)
            continue
        peaks[variant] = json.loads(lines[-1][len(MEMORY_MARK):])
    key = "cuda_max_allocated_bytes" if accelerator == "gpu" else "rss_peak_bytes"
    bare = peaks.get(BARE, {}).get(key)
    for record in peaks.values():
        record["peak_bytes"] = record[key]
        record["peak_extra_bytes"] = record[key] - bare if bare is not None else None
        record["peak_extra_share"] = (record["peak_extra_bytes"] / record["state_bytes"]
                                      if bare is not None and record["state_bytes"] else None)
        # of the extra, the pages of shared libraries' code that the variant's kernels brought in (the
        # high-water mark counts them; they are shared, read-only and reclaimable, not memory a run holds)
        bare_file = peaks.get(BARE, {}).get("rss_file_bytes")
        record["code_pages_extra_bytes"] = (record["rss_file_bytes"] - bare_file if key == "rss_peak_bytes"
                                            and bare_file is not None and record.get("rss_file_bytes") is not None
                                            else None)
    return peaks


# ------------------------------------------------------------------------------------------------ timing
def schedule(names: Sequence[str], intervals: Sequence[int]) -> List[Run]:
    """Every run of one round: the interval-free variants once, the others once per interval."""
    return [(v, None) if v in INTERVAL_FREE else (v, i) for v in names for i in
            ([None] if v in INTERVAL_FREE else intervals)]


def measure(workload: str, names: Sequence[str], intervals: Sequence[int], rounds: int, warmup: int, measured: int,
            warmup_round: bool, accelerator: str, hook_timer: str = "cpu"
            ) -> Dict[Run, List[Optional[Dict[str, Any]]]]:
    """Every run of ``--rounds`` shuffled rounds, per (variant, interval); ``None`` for a run that failed."""
    runs = schedule(names, intervals)
    results: Dict[Run, List[Optional[Dict[str, Any]]]] = {run: [] for run in runs}
    with tempfile.TemporaryDirectory() as directory:
        os.environ["WANDB_DIR"] = directory
        if warmup_round:  # imports, allocator and first-call caches, paid before any measured run
            for variant, interval in runs:
                run_once(workload, variant, interval, warmup + 2, warmup, directory, accelerator, hook_timer)
        for index in range(rounds):
            order = runs[:]
            random.shuffle(order)
            for variant, interval in order:
                try:
                    result: Optional[Dict[str, Any]] = run_once(
                        workload, variant, interval, warmup + measured, warmup, directory, accelerator, hook_timer)
                except Exception as error:  # one failed run (e.g. a policy being edited) costs one cell, not all
                    print(f"  {workload}/{variant}/{interval}: run failed: {type(error).__name__}: {error}",
                          file=sys.stderr, flush=True)
                    result = None
                results[(variant, interval)].append(result)
            print(f"  {workload}: round {index + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise(workload: str, interval: int, names: Sequence[str],
              results: Dict[Run, List[Optional[Dict[str, Any]]]], warmup: int, measured: int,
              memory: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One record per variant at this interval: ratios, extras, time inside lightwatch, fit start, memory.
    A round whose run of the variant or of bare failed is left out of the variant's record."""
    bare_all = results[(BARE, None)]
    bare_ok = [b for b in bare_all if b is not None]
    bare_step_ms, _ = median_iqr(r["steady_s"] / measured * 1e3 for r in bare_ok)
    bare_fit, _ = median_iqr(r["fit_start_s"] for r in bare_ok)
    records = []
    for variant in names:
        pairs = [(r, b) for r, b in zip(results[(variant, None if variant in INTERVAL_FREE else interval)], bare_all)
                 if r is not None and b is not None]
        if not pairs:
            records.append({"workload": workload, "interval": interval, "variant": variant, "rounds": 0,
                            "failed": True, "hooks": []})
            continue
        runs = [r for r, _ in pairs]
        ratio, spread = median_iqr(r["steady_s"] / b["steady_s"] for r, b in pairs)
        extra_ms, _ = median_iqr((r["steady_s"] - b["steady_s"]) / measured * 1e3 for r, b in pairs)
        extra_wall_ms, _ = median_iqr((r["steady_wall_s"] - b["steady_wall_s"]) / measured * 1e3 for r, b in pairs)
        sampled_extra = [_mean([r["step_s"][s] - b["step_s"][s] for s in r["sampled"]]) * 1e3
                         for r, b in pairs if r["sampled"]]
        hooks: Dict[Tuple[str, str], List[Tuple[float, float]]] = {}
        for r in runs:
            for callback, hook, unsampled_us, sampled_ms in r["hooks"]:
                hooks.setdefault((callback, hook), []).append((unsampled_us, sampled_ms))
        hook_records = [{"callback": c, "hook": h, "unsampled_us": _mean([u for u, _ in v]),
                         "sampled_ms": _mean([s for _, s in v]) if runs[0]["sampled"] else float("nan")}
                        for (c, h), v in sorted(hooks.items())]
        fit, _ = median_iqr(r["fit_start_s"] for r in runs)
        mem = memory.get(variant, {})
        records.append({
            "workload": workload, "interval": interval, "variant": variant, "rounds": len(runs),
            "ratio_median": ratio, "ratio_iqr": spread,
            "bare_step_ms": bare_step_ms, "extra_ms_per_step": extra_ms, "extra_wall_ms_per_step": extra_wall_ms,
            "inside_ms_per_step": median_iqr(r["inside_steady_s"] / measured * 1e3 for r in runs)[0],
            "unsampled_inside_us": sum(h["unsampled_us"] for h in hook_records),
            "sampled_inside_ms": (sum(h["sampled_ms"] for h in hook_records) if runs[0]["sampled"]
                                  else float("nan")),
            "sampled_step_extra_ms": median_iqr(sampled_extra)[0],
            "sampled_steps_per_run": len(runs[0]["sampled"]),
            "children_cpu_s": median_iqr(r["children_cpu_s"] for r in runs)[0],
            "threads_extra_ms_per_step": median_iqr((r.get("threads_cpu_s", 0.0) - b.get("threads_cpu_s", 0.0))
                                                    / measured * 1e3 for r, b in pairs)[0],
            "fit_start_s": fit, "fit_start_extra_s": fit - bare_fit,
            "fit_start_inside_s": median_iqr(r["fit_start_inside_s"] for r in runs)[0],
            "end_inside_ms": median_iqr(r["once_s"] * 1e3 for r in runs)[0],
            "state_bytes": runs[0]["state_bytes"],
            "peak_bytes": mem.get("peak_bytes"), "peak_extra_bytes": mem.get("peak_extra_bytes"),
            "peak_extra_share": mem.get("peak_extra_share"),
            "code_pages_extra_bytes": mem.get("code_pages_extra_bytes"),
            "hooks": hook_records,
        })
    return records


def markdown(workload: str, interval: int, records: List[Dict[str, Any]], clock: str) -> List[str]:
    bare = records[0]
    lines = [f"### {workload} ({describe(workload)}), interval {interval}", ""]
    if bare.get("failed"):
        return lines + ["Every bare run failed: nothing to compare with (see the benchmark's stderr).", ""]
    failed = [r["variant"] for r in records if r.get("failed")]
    records = [r for r in records if not r.get("failed")]
    lines += [f"Bare step {bare['bare_step_ms']:.2f} ms ({clock}); model + optimizer state "
              f"{mb(bare['state_bytes'])} MB; {bare['rounds']} rounds."
              + (f" Every run failed for: {', '.join(failed)}." if failed else ""), ""]
    headers = ["variant", "ratio (median)", "IQR", "extra per step (ms)", "inside lightwatch per step (ms)",
               "other threads, extra per step (ms)", "inside, unsampled step (us)", "inside, sampled step (ms)",
               "sampled-step extra (ms)",
               "fit start (s)", "epoch + fit end, inside (ms)", "peak extra (MB)", "of which code pages (MB)",
               "peak extra / state"]
    rows = []
    for r in records:
        lightwatch = r["variant"] in (DEFAULT, STRICT) or r["variant"].startswith(SINGLE)
        rows.append([r["variant"], fmt(r["ratio_median"]), fmt(r["ratio_iqr"]), fmt(r["extra_ms_per_step"], 2),
                     fmt(r["inside_ms_per_step"], 2) if lightwatch else "-",
                     fmt(r.get("threads_extra_ms_per_step"), 2),
                     fmt(r["unsampled_inside_us"], 1) if lightwatch else "-",
                     fmt(r["sampled_inside_ms"], 2) if lightwatch else "-",
                     fmt(r["sampled_step_extra_ms"], 2), fmt(r["fit_start_s"], 2),
                     fmt(r["end_inside_ms"], 2) if lightwatch else "-",
                     mb(r["peak_extra_bytes"]), mb(r.get("code_pages_extra_bytes")), share(r["peak_extra_share"])])
    lines += markdown_table(headers, rows) + [""]
    for r in records:
        if r["variant"] in (DEFAULT, STRICT):  # collapsible blocks on the documentation site (pymdownx.details)
            lines += [f'??? note "Per hook, {r["variant"]}, {workload}, interval {interval}"', ""]
            table = markdown_table(["callback", "hook", "us per unsampled step", "ms per sampled step"],
                                   [[h["callback"], h["hook"], fmt(h["unsampled_us"], 1), fmt(h["sampled_ms"], 3)]
                                    for h in r["hooks"] if h["unsampled_us"] > 0.05 or h["sampled_ms"] > 5e-4])
            lines += ["    " + line for line in table] + [""]
    return lines


def memory_table(workload: str, memory: Dict[str, Dict[str, Any]], names: Sequence[str]) -> List[str]:
    """The peak extra memory of each variant (``--memory-only``): all of it, the shared libraries' code pages
    among it, and the rest (anonymous memory: what the run holds), each also as a share of the model +
    optimizer state."""
    state = next((m["state_bytes"] for m in memory.values() if m.get("state_bytes")), None)
    lines = [f"### {workload} ({describe(workload)}): peak extra memory", "",
             f"Model + optimizer state {mb(state)} MB.", ""]
    rows = []
    for variant in names:
        m = memory.get(variant)
        if m is None:
            continue
        extra, code = m.get("peak_extra_bytes"), m.get("code_pages_extra_bytes")
        rest = extra - code if extra is not None and code is not None else None
        rows.append([variant, mb(extra), share(m.get("peak_extra_share")), mb(code), mb(rest),
                     share(rest / state if rest is not None and state else None)])
    return lines + markdown_table(["variant", "peak extra (MB)", "/ state", "of which code pages (MB)",
                                   "the rest (MB)", "the rest / state"], rows) + [""]


def render(report: Dict[str, Any]) -> List[str]:
    """The Markdown of a report: its header, then per workload and interval the tables of :func:`markdown`."""
    lines = ["```", *report["header"], "```", ""]
    blocks: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    for record in report["records"]:
        blocks.setdefault((record["workload"], record["interval"]), []).append(record)
    for (workload, interval), block in blocks.items():
        lines += markdown(workload, interval, block, report["clock"])
    return lines


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings and no log below ERROR from Lightning, lightwatch (the deep MLP trips ``act_dead``: alerts
    are not measured here) and wandb while open; the previous levels and filters afterwards."""
    levels = {name: logging.getLogger(name).level for name in QUIET}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in QUIET:
                logging.getLogger(name).setLevel(logging.ERROR)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def machine(accelerator: str) -> Dict[str, Any]:
    return {"machine": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "pytorch_lightning": pl.__version__, "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "accelerator": accelerator,
            "device": torch.cuda.get_device_name() if accelerator == "gpu" else platform.processor() or None,
            "wandb": __import__("wandb").__version__ if has_wandb() else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv``, measure, print the tables and write ``--markdown`` and ``--json``; the report."""
    with quiet():
        return _main(argv)


def _main(argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    every = {**WORKLOADS, **LARGE_WORKLOADS, **SMOKE_WORKLOADS}
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(every))
    ap.add_argument("--intervals", nargs="+", type=int, default=[10, 50])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=20, help="steps before the steady state (not measured)")
    ap.add_argument("--measured", type=int, default=50,
                    help="steady-state steps per run; a multiple of every interval, so that it holds whole periods")
    ap.add_argument("--no-warmup-round", action="store_true", help="skip the discarded warm-up round")
    ap.add_argument("--variants", nargs="+", default=None, help="a subset of the variants (bare is always run)")
    ap.add_argument("--no-wandb", action="store_true", help="leave out wandb.watch")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant child processes for memory")
    ap.add_argument("--memory-only", action="store_true",
                    help="measure the peak extra memory only (one child per variant), not the time: for the large "
                         "workloads, whose steps take seconds")
    ap.add_argument("--memory-steps", type=int, default=0,
                    help="steps of each memory child (default: twice the smallest interval + 1)")
    ap.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--markdown", default=None, help="write the tables to this Markdown file")
    ap.add_argument("--json", default=None, help="write every record to this JSON file")
    ap.add_argument("--hook-timer", default=None, choices=list(HOOK_TIMERS),
                    help="clock of the per-hook timers: cpu (thread_time; default on the CPU: a shared machine's "
                         "preemption does not inflate it) or wall (perf_counter; default on a GPU, where the host "
                         "may wait); the timer's own cost is subtracted from every timed call")
    ap.add_argument("--seed", type=int, default=0, help="seed of the round orders")
    ap.add_argument("--from-json", default=None, help="no measuring: print (and --markdown) the tables of a --json")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as fh:
            report = floats(json.load(fh))
        report.setdefault("header", header(report["machine"], report["config"], report["clock"], report["notes"]))
        lines = render(report)
        print("\n".join(lines))
        _write(lines, args.markdown, None, None)
        return report
    memory_steps = args.memory_steps or 2 * min(args.intervals) + 1
    args.hook_timer = args.hook_timer or ("cpu" if args.accelerator == "cpu" else "wall")
    if args.memory_child:
        variant = args.memory_child
        memory_child(args.workloads[0], variant, None if variant in INTERVAL_FREE else args.intervals[0],
                     memory_steps, args.accelerator)
        return {}
    odd = [i for i in args.intervals if args.measured % i]
    if odd:
        ap.error(f"--measured {args.measured} is not a multiple of the intervals {odd}: the steady state must "
                 f"hold whole sampling periods for the amortized ratio; use e.g. --measured {50 * max(args.intervals)}")
    random.seed(args.seed)
    names = variants(include_wandb=has_wandb() and not args.no_wandb)
    if args.variants:
        unknown = [v for v in args.variants if v not in names]
        if unknown:
            ap.error(f"unknown variants {unknown}; choose from {names}")
        names = [BARE] + [v for v in names if v in args.variants and v != BARE]
    info = machine(args.accelerator)
    clock = "process CPU time" if args.accelerator == "cpu" else "wall time between device synchronisations"
    notes = [] if has_wandb() or args.no_wandb else ["wandb is not installed (pip install '.[bench]'): "
                                                      "wandb.watch left out"]
    config = {k: v for k, v in vars(args).items() if k not in ("memory_child", "from_json")}
    lines = header(info, config, clock, notes)
    if args.memory_only:
        lines = lines[:1] + [f"memory only: one fresh child process per variant, {memory_steps} steps at interval "
                             f"{min(args.intervals)}; the RSS high-water mark after the imports"] + lines[2:]
    print("\n".join(lines), flush=True)
    records: List[Dict[str, Any]] = []
    report: Dict[str, Any] = {}
    if args.memory_only:
        for workload in args.workloads:
            memory = measure_memory(workload, names, min(args.intervals), memory_steps, args.accelerator,
                                    timeout=1800)
            records += [{"workload": workload, "variant": v, **memory[v]} for v in names if v in memory]
            lines += memory_table(workload, memory, names)
            print("\n".join(memory_table(workload, memory, names)), flush=True)
        _write(lines, args.markdown, {"machine": info, "config": config, "records": records}, args.json)
        return {"records": records}
    for workload in args.workloads:
        results = measure(workload, names, args.intervals, args.rounds, args.warmup, args.measured,
                          not args.no_warmup_round, args.accelerator, args.hook_timer)
        memory = {} if args.no_memory else measure_memory(
            workload, names, min(args.intervals), memory_steps, args.accelerator, timeout=600)
        for interval in args.intervals:
            block = summarise(workload, interval, names, results, args.warmup, args.measured, memory)
            records += block
            print("\n".join(markdown(workload, interval, block, clock)), flush=True)
        report = {"machine": info, "config": config, "header": lines, "variants": names, "clock": clock,
                  "notes": notes, "records": records}
        _write(render(report), args.markdown, report, args.json)  # after each workload: a partial run is kept
    return report


def header(info: Dict[str, Any], config: Dict[str, Any], clock: str, notes: List[str]) -> List[str]:
    """The lines that say where and how a report was measured."""
    device = f" ({info['device']})" if info["accelerator"] == "gpu" else ""
    warm = "no warm-up" if config.get("no_warmup_round") else "a discarded warm-up round"
    timer = "perf_counter (wall)" if config.get("hook_timer") == "wall" else "thread_time (CPU)"
    return [f"machine: {info['machine']}, {info['cores']} cores, python {info['python']}, torch {info['torch']}, "
            f"pytorch_lightning {info['pytorch_lightning']}, threads {info['threads']}, "
            f"accelerator {info['accelerator']}{device}, wandb {info['wandb']}, {info['date']}",
            f"{config['rounds']} rounds after {warm}; per run {config['measured']} measured steps after "
            f"{config['warmup']}; cost: {clock}; time inside lightwatch: {timer} around every hook"] + notes


def _write(lines: List[str], markdown_path: Optional[str], report: Optional[Dict[str, Any]],
           json_path: Optional[str]) -> None:
    for path, text in ((markdown_path, "\n".join(lines) + "\n"),
                       (json_path, json.dumps(json_safe(report), indent=1) if report is not None else None)):
        if path and text is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as fh:
                fh.write(text)


if __name__ == "__main__":
    main()
