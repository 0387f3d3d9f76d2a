"""Readers of the run's health as a job: host step timing, process and device memory, GPU sensors.

Everything here is host-side and cheap. :class:`StepClock` takes ``time.perf_counter`` stamps at the
Lightning hooks (no tensor op, no device sync) and sums them over a logging interval; :class:`SystemReader`
reads process RSS and CPU use and the host's available memory (from ``/proc`` on Linux, else ``psutil``),
the bytes in use by the C allocator (glibc's ``mallinfo2``) and Python's object allocator, CUDA memory
(``torch.cuda``, host-side counters, no sync) and, where ``nvidia-ml-py`` is installed, GPU utilisation,
temperature and power. ``psutil`` and ``nvidia-ml-py`` are the optional ``system`` extra: without them the
values they give are simply absent (on Linux ``/proc`` gives the process and host values without
``psutil``), and :attr:`SystemReader.missing` says which package to install.
"""
from __future__ import annotations

import ctypes
import importlib
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = ["IntervalTiming", "PYTHON_BLOCK_BYTES", "ProcFiles", "StepClock", "SystemReader", "hostname"]

# Bytes counted for each block of Python's small-object allocator (objects of <= 512 bytes, in 16-byte size
# classes): an estimate, since CPython gives the number of blocks and not their sizes; the blocks of small
# floats, tuples and dicts that a leak of Python objects is made of are 32-232 bytes.
PYTHON_BLOCK_BYTES = 64


def hostname() -> str:
    """This machine's short host name (what a straggler alert names)."""
    return socket.gethostname().split(".")[0] or "localhost"


@dataclass
class IntervalTiming:
    """Step timing summed over one logging interval (host seconds).

    Attributes:
        steps: training steps measured in the interval.
        data_wait: seconds between the end of one batch and the start of the next, summed.
        compute: seconds from the start of a batch to its end, summed.
        forward: seconds from the start of a batch to ``on_before_backward``, summed: the part of a step a
            rank spends before DDP's gradient all-reduce makes it wait for the others.
        slowest: the longest single step (data wait + compute).
        samples: samples seen in the interval (0 where the batch size is unknown).
        tokens: tokens seen (samples x sequence length where a sequence dimension is found), else 0.
        wall: seconds from the end of the previous interval to the end of this one.
        cpu: CPU seconds this process used over the same time (``time.process_time``; every thread, not the
            loader's worker processes).

    Example:
        >>> t = IntervalTiming(steps=4, data_wait=1.0, compute=3.0, forward=1.0, slowest=1.2, wall=4.0)
        >>> round(t.data_share, 2), t.step_time
        (0.25, 1.0)
    """

    steps: int = 0
    data_wait: float = 0.0
    compute: float = 0.0
    forward: float = 0.0
    slowest: float = 0.0
    samples: int = 0
    tokens: int = 0
    wall: float = 0.0
    cpu: float = 0.0

    @property
    def step_time(self) -> float:
        """Mean seconds per step (data wait + compute)."""
        return (self.data_wait + self.compute) / self.steps if self.steps else 0.0

    @property
    def data_share(self) -> float:
        """Share of the step spent waiting for the next batch."""
        total = self.data_wait + self.compute
        return self.data_wait / total if total > 0 else 0.0

    @property
    def own_time(self) -> float:
        """Mean seconds per step a rank spends before its first collective (data wait + forward)."""
        return (self.data_wait + self.forward) / self.steps if self.steps else 0.0


class StepClock:
    """Host timestamps at the step hooks, summed per logging interval; no tensor op, no device sync.

    ``data wait`` of batch *n* is ``start(n) - end(n - 1)``; it is not measured for the first batch of an
    epoch or after validation (:meth:`pause`), where the gap holds the loader's start-up or the evaluation.

    Example:
        >>> clock = StepClock()
        >>> for _ in range(3):
        ...     clock.batch_start(); clock.before_backward(); clock.batch_end(samples=8)
        >>> t = clock.take()
        >>> t.steps, t.samples, t.data_wait >= 0
        (3, 24, True)
    """

    def __init__(self) -> None:
        self._now = time.perf_counter
        self._start: Optional[float] = None
        self._prev_end: Optional[float] = None
        self._interval_start: Optional[float] = None
        self._cpu_start: Optional[float] = None
        self._forward_end: Optional[float] = None
        self._wait = 0.0
        self.current = IntervalTiming()

    def pause(self) -> None:
        """Forget the end of the last batch: the next gap is not a data wait (epoch start, validation)."""
        self._prev_end = None

    def batch_start(self) -> None:
        now = self._now()
        if self._interval_start is None:
            self._interval_start, self._cpu_start = now, time.process_time()
        self._wait = now - self._prev_end if self._prev_end is not None else 0.0
        self._start = now
        self._forward_end = None

    def before_backward(self) -> None:
        if self._start is not None and self._forward_end is None:
            self._forward_end = self._now()

    def batch_end(self, samples: int = 0, tokens: int = 0) -> None:
        if self._start is None:
            return
        now = self._now()
        compute = now - self._start
        cur = self.current
        cur.steps += 1
        cur.data_wait += self._wait
        cur.compute += compute
        cur.forward += (self._forward_end if self._forward_end is not None else now) - self._start
        cur.slowest = max(cur.slowest, self._wait + compute)
        cur.samples += samples
        cur.tokens += tokens
        self._prev_end = now
        self._start = None

    def take(self) -> IntervalTiming:
        """The interval's sums; the next interval starts now."""
        done, self.current = self.current, IntervalTiming()
        now, cpu = self._now(), time.process_time()
        done.wall = now - self._interval_start if self._interval_start is not None else 0.0
        done.cpu = cpu - self._cpu_start if self._cpu_start is not None else 0.0
        self._interval_start, self._cpu_start = now, cpu
        return done


class _MallocInfo2(ctypes.Structure):
    # glibc's struct mallinfo2 (malloc.h, glibc 2.33+), every field a size_t
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_reader() -> Optional[Callable[[], _MallocInfo2]]:
    """glibc's ``mallinfo2``, or ``None`` where there is none (musl, macOS, Windows, glibc < 2.33) or where
    another allocator is preloaded (its allocations would be missing from glibc's counters)."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    if any(name in preloaded for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return None
    try:
        # it walks malloc's free lists (microseconds to milliseconds, see `SystemReader.read`); CDLL releases
        # the GIL meanwhile, so other threads (the TensorBoard writer's) can run
        fn = ctypes.CDLL(None).mallinfo2
    except Exception:  # no C library by that name, or no such symbol
        return None
    fn.restype, fn.argtypes = _MallocInfo2, []
    return fn


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception:  # not installed, or a broken install: the values it gives are left out
        return None


class ProcFiles:
    """Process RSS, process CPU use and the host's available memory from ``/proc`` (Linux), without ``psutil``.

    The two files stay open and are re-read in place (``os.pread``): ~2 and ~9 us a reading, where
    ``psutil`` opens, reads and parses them again each call (~85 us for the three values, more with the
    files cold). CPU use is the process's CPU seconds (every thread, ``time.process_time``) over the wall
    seconds since the previous reading, in percent, as ``psutil.Process.cpu_percent(None)`` gives it.

    Example:
        >>> files = ProcFiles.open()
        >>> files is None or (files.rss_bytes() > 0 and files.available_bytes() > 0)
        True
    """

    def __init__(self, statm: int, meminfo: int) -> None:
        self._statm, self._meminfo, self._pid = statm, meminfo, os.getpid()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._cpu_at = (time.perf_counter(), time.process_time())

    @classmethod
    def open(cls) -> "Optional[ProcFiles]":
        """The reader, or ``None`` where ``/proc`` does not have the files (not Linux)."""
        try:
            statm = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            return None
        try:
            meminfo = os.open("/proc/meminfo", os.O_RDONLY)
        except OSError:
            os.close(statm)
            return None
        return cls(statm, meminfo)

    def _fresh(self) -> None:
        if os.getpid() != self._pid:  # a forked child: /proc/self was the parent's when the file was opened
            os.close(self._statm)
            self._statm, self._pid = os.open("/proc/self/statm", os.O_RDONLY), os.getpid()

    def rss_bytes(self) -> float:
        self._fresh()
        return float(int(os.pread(self._statm, 256, 0).split()[1]) * self._page)

    def available_bytes(self) -> float:
        data = os.pread(self._meminfo, 8192, 0)
        at = data.find(b"MemAvailable:")
        if at < 0:  # kernels before 3.14
            return math.nan
        return float(int(data[at + 13:data.index(b"kB", at)]) * 1024)

    def cpu_percent(self) -> float:
        wall, cpu = time.perf_counter(), time.process_time()
        (wall0, cpu0), self._cpu_at = self._cpu_at, (wall, cpu)
        return 100.0 * (cpu - cpu0) / (wall - wall0) if wall > wall0 else 0.0

    def close(self) -> None:
        fds, self._statm, self._meminfo = (self._statm, self._meminfo), -1, -1
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except Exception:  # already closed, or `os` gone at interpreter exit (from __del__)
                    pass

    def __del__(self) -> None:  # the reader goes with its monitor: so do its two descriptors
        self.close()


@dataclass
class SystemReader:
    """Reads process, host and device memory and sensors, at logged steps only.

    Args:
        device: the module's device; CUDA memory and NVML sensors are read for a CUDA device only.
        heap_share: the allocator counters (``heap_in_use_bytes``, ``heap_free_bytes``, ``python_blocks``) are
            read only while that reading takes at most this share of the wall time since the previous one.

    Attributes:
        missing: optional packages that would give more values (``psutil``, ``nvidia-ml-py``).

    Example:
        >>> reader = SystemReader(torch.device("cpu"))
        >>> stats = reader.read()
        >>> "rss_bytes" in stats or "psutil" in reader.missing  # from /proc on Linux, else psutil
        True
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    heap_share: float = 0.01
    missing: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._proc = ProcFiles.open()
        self._psutil = _optional("psutil") if self._proc is None else None
        self._process = self._psutil.Process(os.getpid()) if self._psutil is not None else None
        if self._process is not None:
            self._process.cpu_percent(None)  # the first call starts the measuring interval
        elif self._proc is None:
            self.missing.append("psutil")
        self._mallinfo = _malloc_reader()
        self._heap_cost = 0.0  # seconds the last allocator reading took
        self._heap_read_at = -math.inf  # perf_counter() of that reading
        self._nvml: Any = None
        self._nvml_handle: Any = None
        if self.device.type == "cuda":
            nvml = _optional("pynvml")
            if nvml is None:
                self.missing.append("nvidia-ml-py")
            else:
                try:
                    nvml.nvmlInit()
                    index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                    self._nvml, self._nvml_handle = nvml, nvml.nvmlDeviceGetHandleByIndex(index)
                except Exception:  # no driver access (containers): sensors are left out
                    self._nvml = None

    @property
    def heap_known(self) -> bool:
        """Whether :meth:`read` gives ``heap_in_use_bytes`` (glibc's ``mallinfo2``), when the reading is due."""
        return self._mallinfo is not None

    def memory_in_use(self, stats: Dict[str, float]) -> float:
        """The process's memory in use from :meth:`read`'s values: malloc's bytes in use plus Python's
        small-object blocks (:data:`PYTHON_BLOCK_BYTES` each) where glibc tells them (``nan`` at a reading
        that skipped them, see ``heap_share``), else RSS (``nan`` where neither ``/proc`` nor ``psutil`` gives it).

        Why not RSS: a freed chunk stays resident until malloc can return it, so a run whose batches change
        shape fragments the heap and RSS climbs in stairs for hundreds of steps while nothing is kept (a
        healthy BERT run with per-batch padding: +0.3 MiB a step, 4.8% in 12 logged steps); the bytes in use
        stay flat (at most 0.07% over any window of 140 healthy runs) and a leak reads as an exact line.

        Example:
            >>> reader = SystemReader(torch.device("cpu"))
            >>> used = reader.memory_in_use(reader.read())
            >>> used > 0 or used != used  # bytes, or nan where neither glibc nor psutil tells them
            True
        """
        if self._mallinfo is None:
            return stats.get("rss_bytes", math.nan)
        if "heap_in_use_bytes" not in stats:
            return math.nan
        return stats["heap_in_use_bytes"] + PYTHON_BLOCK_BYTES * stats.get("python_blocks", 0.0)

    def read(self) -> Dict[str, float]:
        """``rss_bytes``, ``cpu_percent``, ``host_available_bytes``; with glibc, when due (``heap_share``),
        ``heap_in_use_bytes``, ``heap_free_bytes`` and ``python_blocks``; on CUDA ``cuda_allocated_bytes``,
        ``cuda_reserved_bytes``, ``cuda_peak_bytes``, ``device_total_bytes`` and, with NVML,
        ``gpu_utilization_percent``, ``gpu_temperature_celsius``, ``gpu_power_watts``."""
        out: Dict[str, float] = {}
        if self._proc is not None:
            out["rss_bytes"] = self._proc.rss_bytes()
            out["cpu_percent"] = self._proc.cpu_percent()
            available = self._proc.available_bytes()
            if not math.isnan(available):  # no MemAvailable line (kernels before 3.14)
                out["host_available_bytes"] = available
        elif self._process is not None:
            out["rss_bytes"] = float(self._process.memory_info().rss)
            out["cpu_percent"] = float(self._process.cpu_percent(None))
            out["host_available_bytes"] = float(self._psutil.virtual_memory().available)
        now = time.perf_counter()
        if self._mallinfo is not None and self._heap_cost <= self.heap_share * (now - self._heap_read_at):
            # Both walk the allocators' lists: microseconds in a fresh process, 3-5 ms in a long-running one
            # whose heap is fragmented; taken only while they cost at most `heap_share` of the time since the
            # previous reading (the leak check then judges the readings it has).
            info = self._mallinfo()
            # bytes malloc handed out and not freed: chunks in its arenas plus chunks mapped on their own
            out["heap_in_use_bytes"] = float(info.uordblks + info.hblkhd)
            out["heap_free_bytes"] = float(info.fordblks)
            out["python_blocks"] = float(sys.getallocatedblocks())
            done = time.perf_counter()
            self._heap_cost, self._heap_read_at = done - now, done
        if self.device.type == "cuda":
            # host-side allocator counters: no device sync
            out["cuda_allocated_bytes"] = float(torch.cuda.memory_allocated(self.device))
            out["cuda_reserved_bytes"] = float(torch.cuda.memory_reserved(self.device))
            out["cuda_peak_bytes"] = float(torch.cuda.max_memory_allocated(self.device))
            out["device_total_bytes"] = float(torch.cuda.get_device_properties(self.device).total_memory)
            if self._nvml is not None:
                try:
                    nvml, handle = self._nvml, self._nvml_handle
                    out["gpu_utilization_percent"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                    out["gpu_temperature_celsius"] = float(nvml.nvmlDeviceGetTemperature(handle, 0))
                    out["gpu_power_watts"] = float(nvml.nvmlDeviceGetPowerUsage(handle)) / 1000.0
                except Exception:  # a sensor the card does not report
                    pass
        return out
