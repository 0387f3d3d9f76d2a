"""HangWatchdog: a blocked step is reported with every thread's stack; a slow first step, a long validation and a
slow checkpoint write are not; the thread is gone after fit and after an exception; under DDP both ranks report a
rank that blocks and the abort option ends the job with its exit status."""
from __future__ import annotations

import glob
import json
import os
import threading
import time
from typing import Any

import pytest

from conftest import Classifier, make_loader, make_trainer, read_alerts
from lightwatch.callbacks import HangWatchdog
from lightwatch.callbacks.hang_watchdog import ABORT_EXIT_CODE
from test_ddp_stats import torchrun


HERE = os.path.dirname(os.path.abspath(__file__))


def blocking_line(path: str) -> int:
    """The line number of the line marked ``# the blocking line`` in ``path``."""
    return next(i for i, line in enumerate(open(path), 1) if line.rstrip().endswith("# the blocking line"))


def watchdog_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("lightwatch-hang-watchdog")]


class Stalling(Classifier):
    """Sleeps ``sleeps[step]`` seconds in the training step; ``val_sleep`` in every validation batch."""

    def __init__(self, sleeps: Any = None, val_sleep: float = 0.0, save_sleep: float = 0.0) -> None:
        super().__init__()
        self.sleeps, self.val_sleep, self.save_sleep = dict(sleeps or {}), val_sleep, save_sleep

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step in self.sleeps:
            time.sleep(self.sleeps[self.global_step])  # the blocking line
        if self.global_step == 99:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        time.sleep(self.val_sleep)
        super().validation_step(batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: Any) -> None:
        time.sleep(self.save_sleep)  # a large checkpoint write


def test_a_blocked_step_is_reported_with_every_threads_stack(tmp_path: Any) -> None:
    dog = HangWatchdog(step_seconds=1.0, startup_seconds=30)
    trainer = make_trainer(tmp_path, [dog], max_steps=8)
    start = time.monotonic()
    trainer.fit(Stalling(sleeps={5: 2.0}), make_loader())
    assert time.monotonic() - start < 10
    (path,) = glob.glob(str(tmp_path / "**" / "hang_rank0.txt"), recursive=True)
    text = open(path).read()
    assert "phase 'training'" in text and "training step 5" in text
    # faulthandler names the file, the line and the function of every frame of every thread
    assert f'File "{__file__}", line {blocking_line(__file__)} in training_step' in text
    (alert,) = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "hang"]
    assert alert["severity"] == "critical" and alert["subject"] == "rank 0" and alert["threshold"] == 1.0
    assert 1.0 < alert["value"] < 2.0 and path in alert["message"]
    assert dog.fired == 1 and not watchdog_threads()


def test_slow_first_step_long_validation_and_slow_checkpoint_do_not_fire(tmp_path: Any) -> None:
    # derived step deadline: max(1 s floor, 20 x the slowest step); validation: 8 batches of 0.15 s (1.2 s in
    # all, over the floor, but progressing); a 1.2 s checkpoint write under its own 4 s deadline
    from pytorch_lightning.callbacks import ModelCheckpoint

    dog = HangWatchdog(startup_seconds=4, step_floor_seconds=1.0, checkpoint_seconds=4)
    trainer = make_trainer(tmp_path, [dog, ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=6)],
                           max_steps=8, limit_val_batches=8, val_check_interval=6, enable_checkpointing=True,
                           num_sanity_val_steps=0)
    loader = make_loader(n=192, batch_size=16)
    trainer.fit(Stalling(sleeps={0: 1.2}, val_sleep=0.15, save_sleep=1.2), loader, make_loader(n=192))
    assert dog.fired == 0 and not glob.glob(str(tmp_path / "**" / "hang_rank*.txt"), recursive=True)
    assert not [a for a in read_alerts(str(tmp_path)) if a["rule"] == "hang"]
    assert not watchdog_threads()


def test_the_thread_stops_on_an_exception(tmp_path: Any) -> None:
    dog = HangWatchdog(step_seconds=5)
    trainer = make_trainer(tmp_path, [dog], max_steps=120)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Stalling(), make_loader(n=4096))
    assert dog.fired == 0 and not watchdog_threads()


def test_bad_deadline_says_which() -> None:
    with pytest.raises(ValueError, match="step_seconds must be a number of seconds > 0"):
        HangWatchdog(step_seconds=0)


@pytest.mark.ddp
def test_ddp_a_straggler_is_named_then_a_blocked_rank_is_reported_by_both_and_the_job_ends(tmp_path: Any) -> None:
    # rank 1 sleeps 40 ms a step (a straggler), then 120 s at step 36; the step deadline is 2 s with abort: both
    # ranks write their stacks within the deadline plus a few seconds and end with the abort status.
    start = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        torchrun("system_ddp.py", str(tmp_path), timeout=100)
    assert time.monotonic() - start < 80
    assert f"exitcode  : {ABORT_EXIT_CODE}" in str(failed.value), str(failed.value)[-2000:]
    stacks = {r: open(tmp_path / f"hang_rank{r}.txt").read() for r in (0, 1)}
    for r, text in stacks.items():
        assert "phase 'training'" in text and "training step 36" in text, text[:400]
        idle = float(text.split("no progress for ")[1].split(" s")[0])
        assert 2.0 <= idle < 6.0
    script = os.path.join(HERE, "scripts", "system_ddp.py")
    assert f'system_ddp.py", line {blocking_line(script)} in training_step' in stacks[1]
    assert "in training_step" not in stacks[0]  # rank 0 waits in the gradient all-reduce, not in its own step
    alerts = read_alerts(str(tmp_path))
    hangs = [a for a in alerts if a["rule"] == "hang"]
    assert hangs and hangs[0]["action"] == "abort" and hangs[0]["subject"] == "rank 0"
    stragglers = [a for a in alerts if a["rule"] == "straggler_rank"]
    assert stragglers and stragglers[0]["subject"].startswith("rank 1 (") and stragglers[0]["severity"] == "warning"
    assert {a["rule"] for a in alerts} == {"hang", "straggler_rank"}
    counts = [json.load(open(tmp_path / f"collectives_rank{r}.json")) for r in (0, 1)]
    # one all_gather per logged step and none on other steps (and one all_gather_object of host names at start)
    assert counts[0] == counts[1] == {str(s): 1 for s in range(4, 36, 5)}


def test_the_job_health_callbacks_pickle_after_a_fit(tmp_path: Any) -> None:
    # ddp_spawn pickles the callbacks; a thread, a server or a lock must not come along
    import pickle

    from lightwatch.callbacks import PrometheusExporter, SystemMonitor

    callbacks = [HangWatchdog(step_seconds=30), SystemMonitor(every_n_steps=5),
                 PrometheusExporter(mode="textfile", textfile=str(tmp_path / "x.prom"))]
    make_trainer(tmp_path, callbacks, max_steps=6).fit(Classifier(), make_loader())
    for cb in callbacks:
        copy = pickle.loads(pickle.dumps(cb))
        assert type(copy) is type(cb)
    assert not watchdog_threads()
