"""When a checkpoint callback checks what to save: every n optimizer steps, or every n epochs."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from lightwatch.core.checkpoint.selection import check_int

__all__ = ["CheckpointSchedule"]


class CheckpointSchedule:
    """Which safe points of the loop are scheduled checks, remembered across a resume.

    Args:
        every_n_train_steps: check every this many optimizer steps (``None`` or 0: never by steps).
        every_n_epochs: check every this many epochs (``None`` or 0: never by epochs). With neither given,
            every epoch.

    Example:
        >>> schedule = CheckpointSchedule(every_n_train_steps=5)
        >>> schedule.batch_started(9)
        >>> schedule.stepped(10), schedule.step_due(10)
        (True, True)
        >>> schedule.mark("step", step=10, epoch=0)
        >>> schedule.step_due(10), schedule.epoch_due(epoch=0, global_step=10)
        (False, False)
    """

    def __init__(self, every_n_train_steps: Optional[int] = None, every_n_epochs: Optional[int] = None) -> None:
        self.every_n_train_steps = check_int(every_n_train_steps, "every_n_train_steps", 0, allow_none=True)
        self.every_n_epochs = check_int(every_n_epochs, "every_n_epochs", 0, allow_none=True)
        if self.every_n_train_steps is None and self.every_n_epochs is None:
            self.epochs, self.steps = 1, 0
        else:
            self.epochs, self.steps = self.every_n_epochs or 0, self.every_n_train_steps or 0
        self.last_check_step = 0
        self.last_epoch_checked = -1
        self.step_at_batch_start = -1

    def batch_started(self, global_step: int) -> None:
        self.step_at_batch_start = int(global_step)

    def stepped(self, global_step: int) -> bool:
        """Whether the optimizer stepped in this batch (a safe point; not inside an accumulation window)."""
        return global_step != self.step_at_batch_start

    def step_due(self, global_step: int) -> bool:
        n = self.steps
        return n > 0 and global_step % n == 0 and self.last_check_step != global_step

    def epoch_due(self, epoch: int, global_step: int) -> bool:
        n = self.epochs
        return n >= 1 and (epoch + 1) % n == 0 and global_step > 0 and self.last_epoch_checked != epoch

    def mark(self, trigger: Optional[str], step: int, epoch: int) -> None:
        """Record a scheduled check (``trigger`` ``"step"`` or ``"epoch"``; ``None``: a check for requests only)."""
        if trigger == "step":
            self.last_check_step = int(step)
        elif trigger == "epoch":
            self.last_epoch_checked = int(epoch)

    def state_dict(self) -> Dict[str, Any]:
        return {"last_check_step": int(self.last_check_step), "last_epoch_checked": int(self.last_epoch_checked)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_check_step = int(state.get("last_check_step", 0))
        self.last_epoch_checked = int(state.get("last_epoch_checked", -1))
