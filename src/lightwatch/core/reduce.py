"""Cross-rank reduction for the callbacks: :func:`all_reduce_flat` (from :mod:`lightwatch.metrics.reduce`)
and :func:`agree_max` for decisions.

Callers pack every additive quantity (sums, sums of squares, counts) into one flat SUM buffer and every
extreme (max, -min, per-unit "alive" flags, decision flags) into one flat MAX buffer, then call
:func:`all_reduce_flat` once per logged step. Steps that are not logged call nothing here.
"""
from __future__ import annotations

import torch

from lightwatch.metrics.reduce import all_reduce_flat

__all__ = ["all_reduce_flat", "agree_max"]


def agree_max(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise MAX of ``flags`` over ranks (in place; returned for chaining).

    Used for decisions that change control flow (stop, skip, rollback, raise): a decision any rank
    wants is taken by every rank, with one collective.

    Example:
        >>> import torch
        >>> agree_max(torch.tensor([0.0, 1.0])).tolist()  # single process: unchanged
        [0.0, 1.0]
    """
    all_reduce_flat(None, flags)
    return flags
