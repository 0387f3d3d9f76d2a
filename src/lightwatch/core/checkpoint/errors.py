"""The error and the warning category of lightwatch's checkpointing."""
from __future__ import annotations

import errno as _errno
import os
from typing import Any, Mapping, Optional

__all__ = ["CheckpointIntegrityError", "CheckpointSaveError", "CheckpointWarning", "save_error"]


class CheckpointSaveError(OSError):
    """A checkpoint could not be written or committed; raised with the same message on every rank.

    ``errno`` is the operating-system error of the failing rank (``errno.ENOSPC`` for a full disk), or ``None``
    for an error that was not an ``OSError``. The checkpoints committed before are intact.

    Example:
        >>> import errno
        >>> err = CheckpointSaveError(errno.ENOSPC, "could not save last.ckpt: no space left on device")
        >>> err.errno == errno.ENOSPC, isinstance(err, OSError)
        (True, True)
    """


class CheckpointIntegrityError(ValueError):
    """A checkpoint named in ``manifest.json`` no longer matches the size or SHA-256 recorded when it was committed
    (truncated, altered or replaced since): raised before its state is used to resume, test or roll back.

    Example:
        >>> err = CheckpointIntegrityError("last.ckpt: its SHA-256 does not match the manifest")
        >>> isinstance(err, ValueError)
        True
    """


class CheckpointWarning(UserWarning):
    """Category of the warnings ``MetricCheckpoint`` issues (a dropped file, a missing metric, ...).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", CheckpointWarning)  # silence them, e.g. in a notebook
        ...     warnings.warn("dropped epoch=1.ckpt", CheckpointWarning)
    """


def save_error(plan: Mapping[str, Any], dirpath: Optional[str], manifest: str, code: int, failed_rank: int,
               best: str, last: str, latest_healthy: Optional[str]) -> CheckpointSaveError:
    """The error every rank raises when a save failed: which files, where, why, on which rank, what is intact
    and what to do.

    Args:
        plan: the failed save's plan (``new`` entries, ``step``, ``epoch``).
        dirpath: the checkpoint directory.
        manifest: the manifest's file name.
        code: the failing rank's errno (-1: not an ``OSError``).
        failed_rank: the rank that failed.
        best: the best checkpoint before the save (``""``: none).
        last: the last checkpoint before the save (``""``: none).
        latest_healthy: the newest healthy checkpoint, or ``None``.

    Example:
        >>> err = save_error({"new": [{"file": "last.ckpt"}], "step": 7, "epoch": 1}, "/ckpt", "manifest.json",
        ...                  _errno.ENOSPC, 0, "", "/ckpt/last.ckpt", None)
        >>> err.errno == _errno.ENOSPC, "No space left on device on rank 0" in str(err)
        (True, True)
    """
    files = ", ".join(e["file"] for e in plan["new"])
    if code > 0:
        cause = os.strerror(code)
    else:
        cause = "an unexpected error (its traceback is on the failing rank)"
    if code == _errno.ENOSPC:
        hint = "Free disk space or point dirpath to a larger disk, then resume from the last checkpoint."
    elif code in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        hint = "Make dirpath writable, then resume from the last checkpoint."
    else:
        hint = "Fix the cause, then resume from the last checkpoint."
    message = (f"MetricCheckpoint could not save {files} at step {plan['step']} (epoch {plan['epoch']}) in "
               f"{dirpath}: {cause} on rank {failed_rank}. Nothing was committed; the checkpoints saved "
               f"before are intact and listed in {manifest} (best: {best or 'none'}, last: "
               f"{last or 'none'}, latest healthy: {latest_healthy or 'none'}). {hint}")
    return CheckpointSaveError(code if code > 0 else None, message)
