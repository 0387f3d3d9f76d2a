"""One device-to-host copy per logged step, without stalling the device.

On the CPU the values are read at once. On CUDA the packed buffer is copied ``non_blocking`` into pinned
memory behind an event, and read one step later, when the copy has long finished: the training stream is
never synchronised for statistics. Reads happen at a deterministic point (the next training-batch end, or
fit end), so every rank acts on a logged step's values at the same step.
"""
from __future__ import annotations

from typing import Any, Generic, List, Optional, Tuple, TypeVar

import torch

__all__ = ["HostReadback"]

Meta = TypeVar("Meta")


class HostReadback(Generic[Meta]):
    """Queue of packed statistics on their way to the host.

    Example:
        >>> rb = HostReadback()
        >>> rb.submit(torch.tensor([1.0, 2.0]), meta={"step": 3})
        >>> rb.collect()
        [([1.0, 2.0], {'step': 3})]
    """

    def __init__(self) -> None:
        self._pending: List[Tuple[torch.Tensor, Optional[Any], Meta]] = []
        self.copies = 0  # device-to-host copies made; tests and benchmarks read it

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def submit(self, values: torch.Tensor, meta: Meta) -> None:
        values = values.detach()
        self.copies += 1
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, event, meta))
        else:
            self._pending.append((values.clone() if values.requires_grad else values, None, meta))

    def oldest_meta(self) -> Meta:
        """The ``meta`` of the oldest pending submission (there must be one)."""
        return self._pending[0][2]

    def collect(self) -> List[Tuple[List[float], Meta]]:
        """Everything submitted so far, as host lists (waits on CUDA events, which are done by then)."""
        out: List[Tuple[List[float], Meta]] = []
        for host, event, meta in self._pending:
            if event is not None:
                event.synchronize()
            out.append((host.reshape(-1).tolist(), meta))
        self._pending.clear()
        return out

    @staticmethod
    def deferred(values: torch.Tensor) -> bool:
        """Whether values on this device are read one step late (CUDA) rather than at once (CPU)."""
        return values.is_cuda
