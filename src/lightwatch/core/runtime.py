"""What every callback needs to know about the running Trainer, read the same way everywhere.

Everything here goes through attributes that ``pytorch_lightning`` and ``lightning.pytorch`` share, so
the callbacks can later be offered for both import styles without change.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "dense_flat_view",
    "logging_step",
    "run_dir",
    "is_global_zero",
    "world_size",
    "distributed_ready",
    "tensorboard_writers",
    "is_sharded_strategy",
    "learning_rates",
    "lr_rising",
]


def logging_step(trainer: Any) -> int:
    """The step Lightning's ``self.log`` uses for training curves, so lightwatch curves line up.

    ``fit_loop.epoch_loop._batches_that_stepped`` is private; ``global_step`` is the fallback (it runs one
    ahead inside ``on_train_batch_end``, so it is only used when the private counter is missing).
    """
    try:
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    except AttributeError:
        return int(getattr(trainer, "global_step", 0))


def run_dir(trainer: Any) -> str:
    """Directory of this run's logs: the first logger's ``log_dir`` or the Trainer's root directory.

    Unlike ``trainer.log_dir`` this does not broadcast, so it is safe to call on rank 0 alone.
    """
    loggers = list(getattr(trainer, "loggers", None) or [])
    if loggers:
        first = loggers[0]
        path = getattr(first, "log_dir", None) or getattr(first, "save_dir", None)
        if path:
            return str(path)
    return str(getattr(trainer, "default_root_dir", None) or os.getcwd())


def is_global_zero(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_global_zero", True))


def distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size(trainer: Any = None) -> int:
    if trainer is not None and getattr(trainer, "world_size", None):
        return int(trainer.world_size)
    return dist.get_world_size() if distributed_ready() else 1


def tensorboard_writers(trainer: Any) -> Iterator[Any]:
    """The ``SummaryWriter``-like experiments of the Trainer's loggers (rank 0 only; duck-typed).

    Duck typing rather than ``isinstance(TensorBoardLogger)`` because the two Lightning packages have
    distinct logger classes, and on ranks > 0 ``experiment`` is a dummy.
    """
    if not is_global_zero(trainer):
        return
    for lg in list(getattr(trainer, "loggers", None) or []):
        exp = getattr(lg, "experiment", None)
        if exp is not None and hasattr(exp, "add_histogram_raw") and hasattr(exp, "add_text"):
            yield exp


def is_sharded_strategy(trainer: Any) -> bool:
    """True under FSDP-like strategies, where each rank holds only a shard of every parameter."""
    strategy = getattr(trainer, "strategy", None)
    name = type(strategy).__name__.lower() if strategy is not None else ""
    return "fsdp" in name or "deepspeed" in name or "modelparallel" in name


def parameters_are_dtensors(params: List[torch.Tensor]) -> bool:
    return any(type(p).__name__ == "DTensor" for p in params)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_PLAIN_SET = frozenset(_PLAIN_TENSORS)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    if type(t) in _PLAIN_TENSORS:  # the usual case, without a failed attribute lookup (~5 us a tensor)
        return t
    to_local: Optional[Any] = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def local_tensors(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """:func:`local_tensor` of each tensor; ``tensors`` itself (no new list) when none is a DTensor.

    One set of types instead of a function call per tensor: on 770 parameters a list built with
    :func:`local_tensor` took ~0.4 ms, several times a sampled step.

    Example:
        >>> ts = [torch.zeros(2), torch.nn.Parameter(torch.ones(3))]
        >>> local_tensors(ts) is ts
        True
    """
    if {type(t) for t in tensors} <= _PLAIN_SET:
        return tensors
    return [local_tensor(t) for t in tensors]


def dense_flat_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """A flat view of the memory ``t``'s elements fill, in memory order (``t``'s own order when it is
    contiguous; ``channels_last`` weights in their layout); None when they do not fill one dense block.

    ``reshape(-1)`` of a tensor that is not contiguous is a copy: a weight snapshot built from it never saw the
    optimizer's update (every ``channels_last`` weight read an update ratio of 0), and a sample of an
    activation copied the whole output first.

    Example:
        >>> w = torch.arange(24.0).reshape(2, 3, 2, 2).to(memory_format=torch.channels_last)
        >>> dense_flat_view(w).tolist() == w.permute(0, 2, 3, 1).reshape(-1).tolist()
        True
        >>> dense_flat_view(torch.ones(4, 4)[:, :2]) is None
        True
    """
    if t.is_contiguous():
        return t.view(-1)
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return None
        expected *= size
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def learning_rates(trainer: Any) -> List[float]:
    """The learning rate of every param group of every optimizer, as host floats.

    A tensor learning rate on an accelerator (``capturable`` optimizers) is left out: reading it would sync.
    """
    rates: List[float] = []
    for optimizer in getattr(trainer, "optimizers", None) or []:
        for group in optimizer.param_groups:
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor):
                lr = lr.item() if lr.device.type == "cpu" and lr.numel() == 1 else None
            if isinstance(lr, (int, float)):
                rates.append(float(lr))
    return rates


def lr_rising(before: Optional[List[float]], after: List[float]) -> bool:
    """Whether any param group's learning rate went up between two readings: a warmup in progress."""
    if not before or len(before) != len(after):
        return False
    return any(new > old * (1 + 1e-3) for old, new in zip(before, after))
