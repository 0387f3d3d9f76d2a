"""SystemMonitor: step timing and system statistics in real event files; input_bound, memory_growth and
step_time_regression named on their faults and quiet on the healthy twins; nothing on unlogged steps."""
from __future__ import annotations

import ctypes
import gc
import math
import os
import time
from typing import Any, List

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from conftest import Classifier, make_loader, make_trainer, read_alerts, read_events, scalars
from lightwatch.callbacks import SystemMonitor
from lightwatch.checks.system import MemoryGrowthCheck, StepTimeRegressionCheck, StragglerCheck
from lightwatch.core.system_stats import SystemReader
from test_step_budget import SYNC_OPS, run as run_counted

pytest.importorskip("psutil")


def slow_collate(items: List[Any]) -> Any:
    time.sleep(0.025)
    return default_collate(items)


class Leaky(Classifier):
    """Keeps a second forward's outputs, with their graph, every step (outputs kept for an epoch-end metric)."""

    def __init__(self) -> None:
        super().__init__(in_features=256, hidden=1024, depth=2)
        self.kept: List[torch.Tensor] = []
        self.leak = True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.leak:
            self.kept.append(self(batch[0]))  # about 1.5 MiB of activations a step stay alive
        return super().training_step(batch, batch_idx)


class Slowing(Classifier):
    """From step ``slow_from``: ``work`` takes the loss over the batch repeated 256 times (more work a step, tens
    of milliseconds: a slowdown of a few is below the rule's floor);
    ``sleep`` sleeps 20 ms a step (the process waits, as on a machine other jobs took over)."""

    slow_from: Any = None
    how = "work"

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.slow_from is not None and self.global_step >= self.slow_from:
            if self.how == "sleep":
                time.sleep(0.02)
            else:
                batch = (torch.cat([batch[0]] * 256), torch.cat([batch[1]] * 256))
        return super().training_step(batch, batch_idx)


def fit(tmp_path: Any, model: Any, loader: Any, steps: int, every: int = 5, **kwargs: Any) -> Any:
    monitor = SystemMonitor(every_n_steps=every, **kwargs)
    make_trainer(tmp_path, [monitor], max_steps=steps, log_every_n_steps=every).fit(model, loader)
    return monitor


def rules(tmp_path: Any) -> List[str]:
    return sorted({a["rule"] for a in read_alerts(str(tmp_path))})


def test_memory_in_use_counts_kept_tensors_and_not_the_holes_freed_between_them() -> None:
    reader = SystemReader(torch.device("cpu"), heap_share=math.inf)
    if not reader.heap_known:
        pytest.skip("glibc only: mallinfo2")
    before = reader.memory_in_use(reader.read())
    # 100 KiB tensors come from malloc's heap; freeing every other one leaves holes that stay resident
    tensors = [torch.ones(25_600) for _ in range(400)]
    kept = tensors[::2]
    del tensors
    kept_bytes = sum(t.numel() * t.element_size() for t in kept)
    stats = reader.read()
    grown = reader.memory_in_use(stats) - before
    assert 0.95 * kept_bytes <= grown <= 1.1 * kept_bytes, (grown, kept_bytes)
    assert stats["heap_free_bytes"] >= 0.5 * kept_bytes  # the holes: freed, kept by malloc
    del kept
    assert abs(reader.memory_in_use(reader.read()) - before) < 0.05 * kept_bytes


@pytest.mark.parametrize("slow", [True, False])
def test_input_bound_loader_is_named_and_its_healthy_twin_is_quiet(tmp_path: Any, slow: bool) -> None:
    data = make_loader(n=640)
    loader = DataLoader(data.dataset, batch_size=16, collate_fn=slow_collate if slow else None)
    monitor = fit(tmp_path, Classifier(), loader, steps=40)
    acc = read_events(str(tmp_path / "tb" / "version_0"))
    share = scalars(acc, "monitor.system/step/data_share")
    assert sorted(share) == [4, 9, 14, 19, 24, 29, 34, 39]
    for stat in ("seconds", "data_wait_seconds", "compute_seconds"):
        assert all(v > 0 for v in scalars(acc, f"monitor.system/step/{stat}").values()), stat
    assert scalars(acc, "monitor.system/throughput/samples_per_second")[39] > 0
    assert scalars(acc, "monitor.system/process/rss_bytes")[39] > 2 ** 20
    if slow:
        assert min(v for step, v in share.items() if step > 4) > 0.5  # the first step of an epoch waits for none
        alerts = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "input_bound"]
        assert alerts and alerts[0]["step"] in (14, 19) and alerts[0]["severity"] == "warning"
        assert "num_workers" in alerts[0]["message"]
    else:
        assert rules(tmp_path) == [], read_alerts(str(tmp_path))
    assert monitor.last["step/seconds"] > 0


@pytest.mark.parametrize("leak", [True, False])
def test_memory_leak_is_named_with_its_projected_oom_step(tmp_path: Any, leak: bool) -> None:
    # Heap freed by earlier tests would take the leak without a rise in RSS: give it back to the system first.
    # Their garbage too: collected during this run, its Python blocks would fall while the leak rises.
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pytest.skip("glibc only: malloc_trim")
    model = Leaky()
    model.leak = leak
    loader = make_loader(n=4096, in_features=256, batch_size=64)
    monitor = fit(tmp_path, model, loader, steps=45, every=3, memory_warmup_steps=2, memory_window=10,
                  memory_read_share=math.inf)  # every logged step: this run is 45 steps of a few ms
    found = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "memory_growth"]
    if leak:
        assert found, monitor.host_memory_growth.last_trend
        alert = found[0]
        assert alert["subject"] == "process memory in use" and alert["value"] > 2 ** 19  # bytes a step
        # the projected out-of-memory step; a warning when it falls within 1000x the steps done (this machine's
        # free memory decides which)
        assert alert["threshold"] > alert["step"]
        assert alert["severity"] == ("warning" if alert["threshold"] <= 1000 * alert["step"] else "info")
        assert "runs out at about step" in alert["message"] and "loss.detach()" in alert["message"]
    else:
        assert rules(tmp_path) == [], read_alerts(str(tmp_path))


@pytest.mark.parametrize("how", ["work", "sleep", None])
def test_step_time_regression_against_the_runs_own_steps(tmp_path: Any, how: Any) -> None:
    model = Slowing(in_features=64, hidden=256)
    model.slow_from, model.how = (45 if how else None), how
    # from step 45 the step is several times slower, in three logged intervals in a row
    fit(tmp_path, model, make_loader(n=1280, in_features=64), steps=75)
    alerts = read_alerts(str(tmp_path))
    # the slow steps: 45 onwards, lasting from the third logged interval (59) at the latest
    found = [a for a in alerts if a["rule"] == "step_time_regression" and a["step"] >= 49]
    if how:
        assert found and found[0]["step"] <= 59 and found[0]["value"] > 2
        cpu_ratio = float(found[0]["message"].split("CPU time a step went ")[1].split("x")[0])
        # more work a step is the run's own fault; a process that only waits longer is the machine's
        if how == "sleep":
            assert found[0]["severity"] == "info", found[0]["message"]
        else:
            assert cpu_ratio >= 3, found[0]["message"]
            # an overloaded machine makes even more work look like waiting: the process gets no CPU
            if os.getloadavg()[0] <= (os.cpu_count() or 1):
                assert found[0]["severity"] == "warning", found[0]["message"]
    # a loaded machine may slow a healthy run's steps too: the process waits, `info` at most
    assert not [a for a in alerts if a["severity"] != "info" and a not in found], alerts


def test_unlogged_steps_cost_no_sync_no_op_no_write(tmp_path: Any, monkeypatch: Any) -> None:
    bare = run_counted(tmp_path / "bare", [], monkeypatch)
    watched = run_counted(tmp_path / "watched", [SystemMonitor(every_n_steps=5)], monkeypatch)
    logged = {4, 9, 14, 19}
    for step in range(1, 20):
        extra = watched.ops[step] - bare.ops[step]
        assert not (bare.ops[step] - watched.ops[step]), f"step {step}: ops disappeared"
        if step in logged:
            assert not set(extra) & SYNC_OPS, f"step {step}: {extra}"
            continue
        assert not extra, f"unlogged step {step}: tensor ops {extra}"
        assert watched.writes[step] == bare.writes[step], f"unlogged step {step}: event-file writes"
    assert sum(watched.writes[s] - bare.writes[s] for s in logged) > 0


def test_checks_judge_lasting_faults_only() -> None:
    # memory: a flat level with page-sized noise is not a trend, a steady climb is
    flat = MemoryGrowthCheck(warmup_readings=0, window=10, min_readings=10)
    assert all(flat.observe(s, 5e8 + (s % 3) * 4096, 1e10, 1000) is None for s in range(0, 200, 10))
    climb = MemoryGrowthCheck(warmup_readings=0, window=10, min_readings=10)
    findings = [climb.observe(s, 5e8 + s * 1e6, 1e10, 1000) for s in range(0, 100, 10)]
    assert findings[-1] is not None and findings[-1].threshold == pytest.approx(90 + 1e10 / 1e6)
    # step time: one slow interval (a checkpoint write) is not a regression
    reg = StepTimeRegressionCheck(warmup_readings=0, baseline_readings=3, patience=3)
    times = [0.1, 0.1, 0.1, 0.5, 0.1, 0.5, 0.5, 0.1]
    assert [reg.observe(i, t) for i, t in enumerate(times)] == [None] * len(times)
    # straggler: the same rank lagging three times in a row; a lag that moves between ranks is noise
    strag = StragglerCheck(patience=3, min_gap_seconds=0.005)
    assert strag.observe(1, [0.01, 0.03], ["a", "b"]) is None
    assert strag.observe(2, [0.03, 0.01], ["a", "b"]) is None
    assert strag.observe(3, [0.01, 0.03], ["a", "b"]) is None
    assert strag.observe(4, [0.01, 0.03], ["a", "b"]) is None
    assert strag.observe(5, [0.01, 0.03], ["a", "b"]).subject == "rank 1 (b)"


def test_bad_settings_say_what_and_where() -> None:
    with pytest.raises(ValueError, match="regression_factor must be > 1"):
        SystemMonitor(regression_factor=0.5)
    with pytest.raises(ValueError, match="unknown diagnosis"):
        SystemMonitor(skip_diagnoses=["input_bund"])


def test_proc_files_agree_with_psutil() -> None:
    """On Linux the process and host values come from /proc read in place: the same as psutil gives."""
    import time

    import psutil

    from lightwatch.core.system_stats import ProcFiles, SystemReader

    files = ProcFiles.open()
    if files is None:
        pytest.skip("no /proc (not Linux)")
    process = psutil.Process()
    assert abs(files.rss_bytes() - process.memory_info().rss) <= 0.05 * process.memory_info().rss
    available = psutil.virtual_memory().available
    assert abs(files.available_bytes() - available) <= 0.1 * available
    files.cpu_percent()
    process.cpu_percent(None)
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:  # one busy thread: ~100%
        pass
    mine, theirs = files.cpu_percent(), process.cpu_percent(None)
    assert 60 <= mine <= 140 and abs(mine - theirs) <= 25
    files.close()
    files.close()  # twice is harmless
    reader = SystemReader(torch.device("cpu"))
    stats = reader.read()
    assert reader.missing == [] and stats["rss_bytes"] > 0 and stats["host_available_bytes"] > 0
