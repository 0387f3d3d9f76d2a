"""Cross-rank reduction of statistics: one SUM and one MAX collective on flat buffers, never per value.

Callers pack every additive quantity (sums, sums of squares, counts) into one flat SUM buffer and every
extreme (max, -min, per-unit "alive" flags, decision flags) into one flat MAX buffer, then call
:func:`all_reduce_flat` once per logged step. Steps that are not logged call nothing here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["all_reduce_flat"]


def _distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_flat(sum_buffer: Optional[torch.Tensor] = None, max_buffer: Optional[torch.Tensor] = None) -> None:
    """All-reduce ``sum_buffer`` with SUM and ``max_buffer`` with MAX, in place; a no-op on one process.

    NaN in a MAX buffer is replaced by +inf first: backends disagree on how MAX treats NaN, and +inf is
    what a non-finite extreme should read as.

    Args:
        sum_buffer: flat buffer of additive quantities, summed over ranks (``None`` or empty: skipped).
        max_buffer: flat buffer of extremes and flags, maximised over ranks (``None`` or empty: skipped).

    Example:
        >>> import torch
        >>> s, m = torch.tensor([1.0, 2.0]), torch.tensor([3.0])
        >>> all_reduce_flat(s, m)  # single process: values unchanged
        >>> s.tolist(), m.tolist()
        ([1.0, 2.0], [3.0])
    """
    if not _distributed_ready():
        return
    if sum_buffer is not None and sum_buffer.numel():
        dist.all_reduce(sum_buffer, op=dist.ReduceOp.SUM)
    if max_buffer is not None and max_buffer.numel():
        torch.nan_to_num_(max_buffer, nan=float("inf"))
        dist.all_reduce(max_buffer, op=dist.ReduceOp.MAX)
