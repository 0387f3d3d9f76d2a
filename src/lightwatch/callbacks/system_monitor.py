"""``SystemMonitor``: the run's health as a job: step time and where it goes, throughput, memory, stragglers."""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from lightwatch.checks.system import (SYSTEM_DIAGNOSES, InputBoundCheck, MemoryGrowthCheck, StepTimeRegressionCheck,
                                      StragglerCheck)
from lightwatch.core.callback import MonitorCallback
from lightwatch.core.lightning import bind, default_package
from lightwatch.core.runtime import distributed_ready, logging_step
from lightwatch.core.system_stats import IntervalTiming, StepClock, SystemReader, hostname

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["SystemMonitor"]

logger = logging.getLogger("lightwatch")

# What each rank sends at a logged step, in this order: one all_gather of this many floats.
_GATHERED = ("own_seconds", "step_seconds", "data_wait_seconds", "cpu_seconds", "in_use_bytes",
             "host_available_bytes", "cuda_allocated_bytes", "cuda_available_bytes")
_OWN, _STEP, _WAIT, _CPU, _IN_USE, _HOST_FREE, _CUDA, _CUDA_FREE = range(len(_GATHERED))


def _batch_size(batch: Any, depth: int = 0) -> Tuple[int, int]:
    """``(samples, tokens)`` of a batch from its first tensor's shape (no tensor op): tokens where that tensor
    holds integer ids with a sequence dimension."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return 0, 0
        samples = int(batch.shape[0])
        integer = not (batch.is_floating_point() or batch.is_complex() or batch.dtype == torch.bool)
        return samples, samples * int(batch.shape[1]) if integer and batch.dim() == 2 else 0
    if depth > 3:
        return 0, 0
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            found = _batch_size(item, depth + 1)
            if found[0]:
                return found
    return 0, 0


class _SystemMonitor(MonitorCallback):
    """Watches step time, input stalls, memory and stragglers; alerts when one of them goes wrong and stays so.

    Every step costs two ``time.perf_counter()`` stamps and a look at the batch's first shape: no tensor op,
    no device sync, no collective. At each logged step it writes, under ``<prefix>.system/``:

    - ``step/seconds``, ``step/data_wait_seconds``, ``step/compute_seconds``, ``step/data_share``,
      ``step/slowest_seconds`` (host time, means over the interval), and on CUDA ``step/device_seconds`` (CUDA
      events around the logged step, read at its end);
    - ``throughput/samples_per_second`` and ``throughput/tokens_per_second`` (integer ``(batch, seq)`` inputs);
    - ``process/rss_bytes``, ``process/cpu_percent``, ``host/available_bytes`` (``/proc`` on Linux, else ``psutil``);
      ``process/python_blocks`` (blocks of Python's object allocator in use); with glibc
      ``process/heap_in_use_bytes`` and ``process/heap_free_bytes`` (malloc's bytes in use, and freed but kept);
      ``cuda/allocated_bytes``, ``cuda/reserved_bytes``, ``cuda/peak_bytes`` and, with ``nvidia-ml-py``,
      ``gpu/utilization_percent``, ``gpu/temperature_celsius``, ``gpu/power_watts``;
    - under DDP, ``ranks/own_seconds_max`` and ``ranks/own_seconds_median``.

    Under DDP every rank's numbers travel in one ``all_gather`` of 8 floats per logged step (none on other
    steps, and one ``all_gather_object`` of host names at the start of fit), so every rank judges the same
    numbers and names the straggler by rank and host.

    Diagnoses (see :mod:`lightwatch.checks.system`): ``input_bound``, ``memory_growth`` (the process's memory in
    use, :meth:`SystemReader.memory_in_use <lightwatch.core.system_stats.SystemReader.memory_in_use>`: malloc's
    and Python's bytes in use where glibc tells them, else RSS; and CUDA memory allocated on a GPU),
    ``step_time_regression``, ``straggler_rank``.

    Args:
        every_n_steps: logging interval; ``None`` follows ``Trainer(log_every_n_steps)``.
        input_bound_share: data wait as a share of the step for ``input_bound``.
        input_bound_min_wait_seconds: and at least this much data wait a step.
        memory_warmup_steps: logged readings skipped before judging memory growth.
        memory_window: logged readings judged for memory growth.
        memory_read_share: the allocator's counters (what ``memory_growth`` judges, with glibc) are read at a
            logged step only while reading them takes at most this share of the wall time since the previous
            reading (the walk of a fragmented heap takes 3-5 ms); under DDP at every logged step.
        regression_factor: step-time slowdown against the run's own baseline.
        straggler_factor: a rank's own time against the others' median.
        straggler_min_gap_seconds: and at least this much more a step.
        patience: logged intervals in a row a condition must hold (input, regression, straggler).
        action: the action of every diagnosis (``log``, ``warn``, ``stop``, ...).
        skip_diagnoses: diagnoses to switch off by name.
        prefix: first part of every TensorBoard tag.
        alert_cooldown_steps: at most one alert per rule and subject in this many steps.

    Example:
        >>> from lightwatch.callbacks import SystemMonitor
        >>> SystemMonitor(every_n_steps=10, skip_diagnoses=["straggler_rank"]).skip_diagnoses
        frozenset({'straggler_rank'})
    """

    DIAGNOSES = SYSTEM_DIAGNOSES

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        input_bound_share: float = 0.5,
        input_bound_min_wait_seconds: float = 0.01,
        memory_warmup_steps: int = 3,
        memory_window: int = 12,
        memory_read_share: float = 0.01,
        regression_factor: float = 2.0,
        straggler_factor: float = 1.5,
        straggler_min_gap_seconds: float = 0.005,
        patience: int = 3,
        action: str = "warn",
        skip_diagnoses: Optional[Sequence[str]] = None,
        prefix: str = "monitor",
        alert_cooldown_steps: int = 100,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, histogram_every_n_steps=0, prefix=prefix,
                         alert_cooldown_steps=alert_cooldown_steps)
        where = "SystemMonitor"
        if not 0 < float(input_bound_share) <= 1:
            raise ValueError(f"{where}: input_bound_share must be in (0, 1], got {input_bound_share!r}.")
        for name, value in (("regression_factor", regression_factor), ("straggler_factor", straggler_factor)):
            if float(value) <= 1:
                raise ValueError(f"{where}: {name} must be > 1 (a slowdown factor), got {value!r}.")
        if not float(memory_read_share) > 0:
            raise ValueError(f"{where}: memory_read_share must be > 0 (the most share of the wall time the "
                             f"allocator readings of memory_growth may take), got {memory_read_share!r}.")
        self.memory_read_share = float(memory_read_share)
        if int(patience) < 1 or int(memory_window) < 3:
            raise ValueError(f"{where}: patience must be >= 1 and memory_window >= 3, got {patience!r} and "
                             f"{memory_window!r}.")
        self.action = self.check_action(action, f"{where}(action=...)")
        self.set_skip_diagnoses(skip_diagnoses)
        self.input_bound = InputBoundCheck(input_bound_share, input_bound_min_wait_seconds, patience)
        window = int(memory_window)
        self.host_memory_growth = MemoryGrowthCheck(memory_warmup_steps, window, min(8, window))
        self.cuda_growth = MemoryGrowthCheck(memory_warmup_steps, window, min(8, window))
        self.regression = StepTimeRegressionCheck(regression_factor, patience)
        self.straggler = StragglerCheck(straggler_factor, straggler_min_gap_seconds, patience)
        self.clock = StepClock()
        self.reader: Optional[SystemReader] = None
        self.hosts: List[str] = [hostname()]
        self.planned_last_step: Optional[float] = None
        self.last: Dict[str, float] = {}
        # the extremes seen, for calibration tables: largest data share; slowest interval after the baseline
        self.max_data_share = 0.0
        self.max_step_time = 0.0
        self._events: Optional[Tuple[Any, Any]] = None

    def __getstate__(self) -> Dict[str, Any]:
        # the readers (a psutil process, NVML handles, CUDA events) belong to this process: on_fit_start makes them
        state = dict(self.__dict__)
        state.update(reader=None, _events=None)
        return state

    # ------------------------------------------------------------------------------------------ fit
    @property
    def memory_subject(self) -> str:
        """What ``memory_growth`` judges on the host (its alerts' subject)."""
        if self.reader is not None and self.reader.heap_known:
            return "process memory in use"
        return "process RSS"

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        device = getattr(pl_module, "device", torch.device("cpu"))
        # under DDP every rank reads the allocator at every logged step: ranks that skipped different steps
        # would leave no step with every rank's reading
        share = math.inf if distributed_ready() else self.memory_read_share
        self.reader = SystemReader(torch.device(device), heap_share=share)
        if self.reader.missing:
            logger.info("SystemMonitor: %s not installed: the values it gives (process memory and CPU; GPU "
                        "sensors) are not read, and memory_growth watches %s. Install lightwatch[system].",
                        " and ".join(self.reader.missing), "CUDA memory only" if device.type == "cuda" else
                        "nothing")
        if distributed_ready():
            # once per fit, not per step: the straggler alert names the host
            hosts: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(hosts, hostname())
            self.hosts = [str(h) for h in hosts]
        max_steps = int(getattr(trainer, "max_steps", -1) or -1)
        try:
            planned = float(trainer.estimated_stepping_batches) if max_steps < 0 else float(max_steps)
        except Exception:  # an iterable of unknown length
            planned = math.inf
        self.planned_last_step = planned if math.isfinite(planned) else None

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.clock.pause()

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.clock.pause()

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        self.clock.pause()

    # ----------------------------------------------------------------------------------------- step
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.clock.batch_start()
        if self.sampled and self.reader is not None and self.reader.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._events = (start, end)

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Any) -> None:
        self.clock.before_backward()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        samples, tokens = _batch_size(batch)
        self.clock.batch_end(samples, tokens)
        if not self.sampled:
            return
        device_seconds = None
        if self._events is not None:
            start, end = self._events
            end.record()
            end.synchronize()  # a logged step: the one read of the device this step
            device_seconds = start.elapsed_time(end) / 1e3
            self._events = None
        self._logged_step(trainer, pl_module, self.clock.take(), device_seconds)

    def _logged_step(self, trainer: Any, pl_module: Any, timing: IntervalTiming,
                     device_seconds: Optional[float]) -> None:
        if timing.steps == 0:
            return
        stats = self.reader.read() if self.reader is not None else {}
        step = int(getattr(trainer, "global_step", 0))
        mine = [timing.own_time, timing.step_time, timing.data_wait / timing.steps, timing.cpu / timing.steps,
                self.reader.memory_in_use(stats) if self.reader is not None else math.nan,
                stats.get("host_available_bytes", math.nan), stats.get("cuda_allocated_bytes", math.nan),
                stats.get("device_total_bytes", math.nan) - stats.get("cuda_reserved_bytes", math.nan)]
        ranks = self._gather(mine)
        values = self._values(timing, stats, device_seconds, ranks)
        self.last = {k.rsplit(".system/", 1)[-1]: v for k, v in values.items()}
        self.writer.write_scalars(trainer, values, logging_step(trainer))
        self._judge(trainer, pl_module, step, ranks)

    def _gather(self, mine: List[float]) -> List[List[float]]:
        """Every rank's numbers, indexed by global rank: the one collective of a logged step (DDP only)."""
        if not distributed_ready():
            return [mine]
        local = torch.tensor(mine, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            local = local.cuda()
        out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(out, local)
        return [t.cpu().tolist() for t in out]

    def _values(self, timing: IntervalTiming, stats: Dict[str, float], device_seconds: Optional[float],
                ranks: List[List[float]]) -> Dict[str, float]:
        tag = self.writer.tag
        busy = timing.data_wait + timing.compute
        values = {
            tag("system", "step", "seconds"): timing.step_time,
            tag("system", "step", "data_wait_seconds"): timing.data_wait / timing.steps,
            tag("system", "step", "compute_seconds"): timing.compute / timing.steps,
            tag("system", "step", "data_share"): timing.data_share,
            tag("system", "step", "slowest_seconds"): timing.slowest,
        }
        if device_seconds is not None:
            values[tag("system", "step", "device_seconds")] = device_seconds
        if timing.samples and busy > 0:
            values[tag("system", "throughput", "samples_per_second")] = timing.samples / busy
        if timing.tokens and busy > 0:
            values[tag("system", "throughput", "tokens_per_second")] = timing.tokens / busy
        names = {"rss_bytes": ("process", "rss_bytes"), "heap_free_bytes": ("process", "heap_free_bytes"),
                 "heap_in_use_bytes": ("process", "heap_in_use_bytes"), "python_blocks": ("process", "python_blocks"),
                 "cpu_percent": ("process", "cpu_percent"),
                 "host_available_bytes": ("host", "available_bytes"),
                 "cuda_allocated_bytes": ("cuda", "allocated_bytes"), "cuda_reserved_bytes": ("cuda", "reserved_bytes"),
                 "cuda_peak_bytes": ("cuda", "peak_bytes"),
                 "gpu_utilization_percent": ("gpu", "utilization_percent"),
                 "gpu_temperature_celsius": ("gpu", "temperature_celsius"), "gpu_power_watts": ("gpu", "power_watts")}
        for key, (subject, stat) in names.items():
            if key in stats:
                values[tag("system", subject, stat)] = stats[key]
        if len(ranks) > 1:
            own = sorted(r[_OWN] for r in ranks)
            values[tag("system", "ranks", "own_seconds_max")] = own[-1]
            values[tag("system", "ranks", "own_seconds_median")] = own[len(own) // 2] if len(own) % 2 else \
                (own[len(own) // 2 - 1] + own[len(own) // 2]) / 2
        return values

    def _judge(self, trainer: Any, pl_module: Any, step: int, ranks: List[List[float]]) -> None:
        findings = []
        self.max_data_share = max([self.max_data_share] + [r[_WAIT] / r[_STEP] for r in ranks if r[_STEP] > 0])
        if self.regression.baseline is not None:
            self.max_step_time = max([self.max_step_time] + [r[_STEP] for r in ranks])
        if "input_bound" not in self.skip_diagnoses:
            # the slowest loader among the ranks: it holds every rank back
            worst = max(ranks, key=lambda r: r[_WAIT] / r[_STEP] if r[_STEP] > 0 else 0.0)
            findings.append(self.input_bound.observe(step, worst[_WAIT], worst[_STEP]))
        if "step_time_regression" not in self.skip_diagnoses:
            slowest = max(ranks, key=lambda r: r[_STEP])
            findings.append(self.regression.observe(step, slowest[_STEP], slowest[_CPU]))
        if "memory_growth" not in self.skip_diagnoses:
            if all(math.isfinite(r[_IN_USE]) for r in ranks):
                findings.append(self.host_memory_growth.observe(step, max(r[_IN_USE] for r in ranks),
                                                        min(r[_HOST_FREE] for r in ranks), self.planned_last_step,
                                                        self.memory_subject))
            if all(math.isfinite(r[_CUDA]) for r in ranks):
                findings.append(self.cuda_growth.observe(step, max(r[_CUDA] for r in ranks),
                                                         min(r[_CUDA_FREE] for r in ranks), self.planned_last_step,
                                                         "CUDA memory allocated"))
        if len(ranks) > 1 and "straggler_rank" not in self.skip_diagnoses:
            findings.append(self.straggler.observe(step, [r[_OWN] for r in ranks], self.hosts))
        for finding in findings:
            if finding is not None:
                # an `info` finding (the machine, not the run, got slower) is recorded, never acted on
                action = "log" if finding.severity == "info" else self.action
                self.raise_alert(trainer, pl_module, **{**finding.as_kwargs(), "action": action,
                                                        "step": logging_step(trainer)})


SystemMonitor = bind(_SystemMonitor, default_package(), module=__name__)
