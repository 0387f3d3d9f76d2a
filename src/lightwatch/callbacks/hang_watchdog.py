"""``HangWatchdog``: a thread on every rank that notices when the run stops making progress, and says where."""
from __future__ import annotations

import faulthandler
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from lightwatch.core.alerts import Alert, alert_log
from lightwatch.core.lightning import bind, default_package
from lightwatch.core.runtime import logging_step, run_dir
from lightwatch.core.system_stats import hostname
from lightwatch.core.writer import MonitorWriter

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["HangWatchdog", "ABORT_EXIT_CODE"]

logger = logging.getLogger("lightwatch")

#: Exit status of a process the watchdog ends (``abort=True``): EX_TEMPFAIL, "try again", for schedulers
#: that restart a job on a temporary failure.
ABORT_EXIT_CODE = 75


def _positive(value: Optional[float], name: str) -> Optional[float]:
    if value is not None and not float(value) > 0:
        raise ValueError(f"HangWatchdog: {name} must be a number of seconds > 0 (or None), got {value!r}.")
    return None if value is None else float(value)


class _HangWatchdog:
    """Fires when no training step, validation batch or checkpoint write has completed within a deadline.

    A daemon thread per rank compares the time since the last sign of progress with the deadline of the
    phase the rank is in; the hooks only store a timestamp and a phase name (no lock, no tensor, no I/O).
    When a deadline passes it writes every thread's Python stack (``faulthandler``) with where the rank
    stopped to ``<log dir>/hang_rank<N>.txt``, logs an error naming the file, records a ``hang`` alert
    (``critical``; written by rank 0 when rank 0 is the one that notices) and, with ``abort``, ends the
    process with exit status :data:`ABORT_EXIT_CODE` (75) so a scheduler can restart the job. It fires once
    per stall; progress re-arms it. It stops, and joins its thread, at the end of fit, on an exception and
    at teardown.

    Phases and their deadlines (seconds):

    - ``startup``: from the start of fit to the end of the first training step (setup, the sanity check,
      compilation): ``startup_seconds``.
    - ``training``: between two completed training steps: ``step_seconds``, or when ``None``,
      ``max(step_floor_seconds, step_factor x the slowest step seen)``.
    - ``validation``: between two completed validation batches (a long validation that makes progress never
      fires): ``validation_seconds``, or ``max(step_floor_seconds, step_factor x the slowest batch seen)``.
    - ``checkpoint``: from a checkpoint's ``on_save_checkpoint`` to the next sign of progress (the write):
      ``checkpoint_seconds``.

    Under DDP a rank that blocks holds the others in their next collective, so every rank stops making
    progress and every rank writes its stack file: the one whose stack is not in a collective is the cause.

    Args:
        startup_seconds: deadline of the start-up phase.
        step_seconds: deadline between training steps; ``None`` derives it from the run's own steps.
        validation_seconds: deadline between validation batches; ``None`` derives it likewise.
        checkpoint_seconds: deadline of a checkpoint write.
        step_floor_seconds: least derived deadline.
        step_factor: derived deadline as a multiple of the slowest step (or batch) seen.
        abort: end the process (``os._exit``) with exit status ``exit_code`` after reporting.
        exit_code: the status ``abort`` ends the process with.
        prefix: first part of the alert's TensorBoard tag.

    Example:
        >>> from lightwatch.callbacks import HangWatchdog
        >>> dog = HangWatchdog(step_seconds=600, abort=True)
        >>> dog.deadline("training"), dog.exit_code
        (600.0, 75)
    """

    #: No sampling interval: the watchdog runs on deadlines (the attribute every lightwatch callback has).
    every_n_steps: Optional[int] = None

    def __init__(
        self,
        startup_seconds: float = 1800.0,
        step_seconds: Optional[float] = None,
        validation_seconds: Optional[float] = None,
        checkpoint_seconds: float = 1800.0,
        step_floor_seconds: float = 300.0,
        step_factor: float = 20.0,
        abort: bool = False,
        exit_code: int = ABORT_EXIT_CODE,
        prefix: str = "monitor",
    ) -> None:
        self.startup_seconds = _positive(startup_seconds, "startup_seconds")
        self.step_seconds = _positive(step_seconds, "step_seconds")
        self.validation_seconds = _positive(validation_seconds, "validation_seconds")
        self.checkpoint_seconds = _positive(checkpoint_seconds, "checkpoint_seconds")
        self.step_floor_seconds = _positive(step_floor_seconds, "step_floor_seconds")
        self.step_factor = _positive(step_factor, "step_factor")
        self.abort = bool(abort)
        self.exit_code = int(exit_code)
        self.writer = MonitorWriter(prefix)
        self.prefix = self.writer.prefix
        self.phase = "idle"
        # where the rank is, as a format and its arguments: formatted only when read (a hang, a test), not twice
        # a step
        self._where: Tuple[str, Tuple[Any, ...]] = ("not started", ())
        self.last_progress = time.monotonic()
        self.slowest: Dict[str, float] = {"training": 0.0, "validation": 0.0}
        self.fired = 0
        self.stack_file: Optional[str] = None
        self._trainer: Any = None
        self._rank = 0
        self._dir = "."
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._armed = True

    def __getstate__(self) -> Dict[str, Any]:
        # the thread, its event and the trainer belong to one process: a pickled copy (ddp_spawn) starts afresh
        state = dict(self.__dict__)
        state.update(_thread=None, _stop=None, _trainer=None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------------- deadlines
    def deadline(self, phase: str) -> Optional[float]:
        """The deadline of ``phase`` in seconds (``None``: not watched)."""
        if phase == "startup":
            return self.startup_seconds
        if phase == "checkpoint":
            return self.checkpoint_seconds
        if phase in ("training", "validation"):
            fixed = self.step_seconds if phase == "training" else self.validation_seconds
            if fixed is not None:
                return fixed
            return max(self.step_floor_seconds or 0.0, (self.step_factor or 0.0) * self.slowest[phase])
        return None

    @property
    def where(self) -> str:
        """Where this rank was last seen (the last progress, or the step it entered)."""
        text, args = self._where
        return text.format(*args) if args else text

    def _progress(self, phase: str, where: str, *args: Any) -> None:
        now = time.monotonic()
        if phase == self.phase and phase in self.slowest:
            self.slowest[phase] = max(self.slowest[phase], now - self.last_progress)
        self.last_progress, self.phase, self._where, self._armed = now, phase, (where, args), True

    # ----------------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._trainer = trainer
        self._rank = int(getattr(trainer, "global_rank", 0))
        self._dir = run_dir(trainer)
        self.fired = 0
        self._progress("startup", "start of fit (setup, sanity check, first step)")
        self._start_thread()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # entering a step is no progress of its own: the time since the last completed step keeps counting
        self._where = ("training step {} (batch {} of epoch {})",
                       (logging_step(trainer), batch_idx, trainer.current_epoch))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the first step (compilation) comes out of the start-up phase: it does not set the step deadline
        self._progress("training", "after training step {} (batch {})", logging_step(trainer), batch_idx)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.phase != "startup":
            self._progress("validation", "start of validation")

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if self.phase != "startup":
            self._progress("validation", "after validation batch {}", batch_idx)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.phase != "startup":
            self._progress("training", "end of validation")

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        self._progress("checkpoint", "checkpoint write at step {}", logging_step(trainer))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.stop()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.stop()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------- thread
    def _start_thread(self) -> None:
        self.stop()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"lightwatch-hang-watchdog-rank{self._rank}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it (idempotent)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _poll_seconds(self) -> float:
        deadlines = [d for d in (self.deadline(p) for p in ("startup", "training", "validation", "checkpoint"))
                     if d is not None]
        return max(0.05, min([1.0] + [d / 10 for d in deadlines]))

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_seconds()):
            deadline = self.deadline(self.phase)
            idle = time.monotonic() - self.last_progress
            if self._armed and deadline is not None and idle > deadline:
                self._armed = False
                self._fire(self.phase, self.where, idle, deadline)

    def _fire(self, phase: str, where: str, idle: float, deadline: float) -> None:
        self.fired += 1
        host = hostname()
        path = os.path.join(self._dir, f"hang_rank{self._rank}.txt")
        headline = (f"rank {self._rank} on {host} (pid {os.getpid()}) made no progress for {idle:.1f} s in phase "
                    f"'{phase}' (deadline {deadline:.1f} s); last seen: {where}")
        try:
            os.makedirs(self._dir, exist_ok=True)
            with open(path, "w") as fh:
                fh.write(f"lightwatch HangWatchdog: {headline}\ntime: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
                         f"Python stacks of every thread follow (most recent call first):\n\n")
                fh.flush()
                faulthandler.dump_traceback(file=fh, all_threads=True)
            self.stack_file = path
        except OSError as err:
            path = f"(not written: {err})"
        action = "abort" if self.abort else "log"
        logger.error("lightwatch HangWatchdog: %s. Stacks: %s.%s", headline, path,
                     f" Ending the process with exit status {self.exit_code}." if self.abort else "")
        trainer = self._trainer
        if trainer is not None:
            alert = Alert(source="HangWatchdog", rule="hang", severity="critical", subject=f"rank {self._rank}",
                          value=idle, threshold=deadline, action=action, step=logging_step(trainer),
                          epoch=int(getattr(trainer, "current_epoch", 0)),
                          message=f"{headline}. Every thread's stack is in {path}: the rank whose stack is not "
                                  f"waiting in a collective is the one that blocks (a data-loader worker, a "
                                  f"collective only some ranks reached, a deadlocked write).")
            try:
                alert_log(trainer).publish(alert, self.writer)
                self.writer.flush(trainer)
            except Exception as err:  # a stuck or closed writer must not keep the report from the log
                logger.error("lightwatch HangWatchdog: could not record the alert: %s", err)
        if self.abort:
            logging.shutdown()
            os._exit(self.exit_code)


HangWatchdog = bind(_HangWatchdog, default_package(), module=__name__)
