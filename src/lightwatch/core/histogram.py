"""Small fixed-bucket histograms computed on the device, written raw to TensorBoard.

``torch.utils.tensorboard``'s default histogram moves the whole tensor to the host and writes ~600
exponential buckets (~10 KB a point). Here a strided subsample of at most ``max_values`` values is
bucketed on the device into ``bins`` equal buckets between its finite min and max, with no host sync;
the few numbers that result are read back together with the rest of a logged step's statistics.
Non-finite values are counted, not dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from lightwatch.core.runtime import dense_flat_view

__all__ = ["HIST_BINS", "histogram_row", "HistogramData", "decode_histogram_row", "spread_sample", "spread_step",
           "strided_sample"]

HIST_BINS = 64
# Layout of one packed row: [min, max, count(finite), sum, sum_sq, nonfinite, counts[bins]].
_HEADER = 6


def strided_sample(t: torch.Tensor, max_values: int) -> torch.Tensor:
    """A flat view (or small copy) of at most ``max_values`` evenly spaced values of ``t``."""
    return _every(t, max_values, spread=False)


def _every(t: torch.Tensor, max_values: int, spread: bool) -> torch.Tensor:
    """Every ``k``-th value of ``t`` as a flat view (a copy where ``t`` is not contiguous), ``k`` the smallest
    step keeping at most ``max_values``; with ``spread``, the smallest such ``k`` prime to 2, 3, 5 and 7."""
    t = t.detach()
    n = t.numel()
    if n <= max_values:
        return t.reshape(-1)
    step = spread_step(n, max_values) if spread else -(-n // max_values)
    if t.is_contiguous():  # the same values as reshape(-1)[::step], in one call instead of two
        return t.as_strided((-(-n // step),), (step,))
    flat = dense_flat_view(t)  # e.g. channels_last: sampled in memory order, without copying the whole tensor
    return (flat if flat is not None else t.reshape(-1))[::step]


def spread_step(n: int, max_values: int) -> int:
    """The stride :func:`spread_sample` takes on ``n`` values: the smallest keeping at most ``max_values`` that
    is prime to 2, 3, 5 and 7 (1 when all ``n`` fit).

    Example:
        >>> spread_step(64 * 256, 4096), spread_step(100, 4096)
        (11, 1)
    """
    if n <= max_values:
        return 1
    step = -(-n // max_values)
    while step % 2 == 0 or step % 3 == 0 or step % 5 == 0 or step % 7 == 0:
        step += 1
    return step


def spread_sample(t: torch.Tensor, max_values: int) -> torch.Tensor:
    """A flat view of at most ``max_values`` values of ``t``, one every ``k`` with ``k`` prime to 2, 3, 5 and 7.

    A stride that divides the last dimension (4 on ``[64, 256]``) samples the same few features in every row;
    a stride with none of the factors that layer widths are made of walks across every feature as it goes
    from row to row, so a per-feature property (e.g. a unit that is always zero) is seen in its share.

    Example:
        >>> x = torch.arange(64 * 256).reshape(64, 256)
        >>> s = spread_sample(x, 4096)
        >>> s.numel() <= 4096, len(set((s % 256).tolist())) == 256
        (True, True)
    """
    return _every(t, max_values, spread=True)


def histogram_row(t: torch.Tensor, bins: int = HIST_BINS, max_values: int = 65536) -> torch.Tensor:
    """Pack a histogram of ``t`` into one float32 row of length ``6 + bins`` on ``t``'s device.

    Example:
        >>> row = histogram_row(torch.tensor([0.0, 1.0, 1.0, float("nan")]), bins=2)
        >>> decode_histogram_row(row.tolist()).counts, decode_histogram_row(row.tolist()).nonfinite
        ([1.0, 2.0], 1.0)
    """
    x = strided_sample(t, max_values).float()
    finite = torch.isfinite(x)
    inf = x.new_full((), float("inf"))  # a fill, not a host-to-device copy
    lo = torch.where(finite, x, inf).amin() if x.numel() else inf
    hi = torch.where(finite, x, -inf).amax() if x.numel() else -inf
    any_finite = finite.any()
    lo = torch.where(any_finite, lo, torch.zeros_like(lo))
    hi = torch.where(any_finite, hi, torch.zeros_like(hi))
    width = torch.clamp(hi - lo, min=1e-12)
    xf = torch.where(finite, x, lo)
    idx = ((xf - lo) / width * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(bins, device=x.device, dtype=torch.float32)
    weights = finite.float()
    counts.scatter_add_(0, idx, weights)
    xz = xf * weights
    header = torch.stack([lo, hi, weights.sum(), xz.sum(), (xz * xz).sum(), (~finite).sum().float()])
    return torch.cat([header, counts])


@dataclass
class HistogramData:
    """A histogram decoded from a packed row: the arguments of TensorBoard's ``add_histogram_raw``.

    Args:
        min: smallest finite value.
        max: largest finite value.
        num: number of finite values.
        sum: sum of the finite values.
        sum_squares: sum of their squares.
        nonfinite: number of NaN/Inf values (left out of the buckets).
        bucket_limits: right edge of each bucket.
        counts: values per bucket.

    Example:
        >>> import torch
        >>> data = decode_histogram_row(histogram_row(torch.tensor([0.0, 1.0, 1.0, float("nan")]), bins=2).tolist())
        >>> data.num, data.nonfinite, data.counts, data.bucket_limits
        (3.0, 1.0, [1.0, 2.0], [0.5, 1.0])
    """

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    nonfinite: float
    bucket_limits: List[float]
    counts: List[float]


def decode_histogram_row(row: List[float]) -> HistogramData:
    """Turn a packed row (already on the host) into the arguments of ``add_histogram_raw``."""
    lo, hi, num, total, total_sq, nonfinite = row[:_HEADER]
    counts = list(row[_HEADER:])
    bins = len(counts)
    width = (hi - lo) / bins if hi > lo else 1e-12
    limits = [lo + width * (i + 1) for i in range(bins)]
    return HistogramData(lo, hi, num, total, total_sq, nonfinite, limits, counts)
