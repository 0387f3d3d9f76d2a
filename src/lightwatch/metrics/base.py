"""The statistic interface and the cross-rank reduction of many statistics with one MAX and one SUM.

Every reducible statistic exposes its state as two flat float64 buffers: one whose entries combine by
SUM (counts, shifted sums) and one whose entries combine by MAX (max, ``-min``, sketch registers,
and copies of configuration such as bin edges and shifts, stored as ``v`` and ``-v`` so the MAX
shows whether ranks agreed). A caller reduces any number of statistics with two collectives::

    max_buf = pack_max(stats)                 # 1. concatenate max_state() of every statistic
    all_reduce(max_buf, MAX)                  #    (NaN-free: "unset" is -inf)
    sum_buf = pack_sum(stats, max_buf)        # 2. concatenate sum_state(its slice of max_buf)
    all_reduce(sum_buf, SUM)
    load_packed(stats, sum_buf, max_buf)      # 3. every rank now holds the global state

The MAX goes first because :class:`~lightwatch.metrics.Moments` uses the reduced MAX buffer to re-center
every rank's shifted sums on one common shift before they are summed (see its docstring);
:func:`all_reduce_statistics` runs the three steps. All counts are exact in float64 up to 2**53.
"""
from __future__ import annotations

import abc
import contextlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

from lightwatch.metrics.reduce import all_reduce_flat

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "Statistic",
    "ReducibleStatistic",
    "pack_max",
    "pack_sum",
    "load_packed",
    "all_reduce_statistics",
    "cpu_shortcuts",
    "may_read_values",
]

Device = Union[str, torch.device, None]

_CPU_SHORTCUTS = True


def may_read_values(t: torch.Tensor) -> bool:
    """Whether code may read ``t``'s values on the host to take a shortcut (skip masks that would be empty).

    On the CPU such a read waits for nothing; on an accelerator it is a host sync, which the statistics
    never make, so there they always take the branch-free path. :func:`cpu_shortcuts` turns the shortcuts
    off, to run (and count the operations of) the accelerator's path on the CPU.

    Example:
        >>> import torch
        >>> may_read_values(torch.zeros(1))
        True
    """
    return _CPU_SHORTCUTS and t.device.type == "cpu"


@contextlib.contextmanager
def cpu_shortcuts(enabled: bool) -> Iterator[None]:
    """Within the block, take (or do not take) the CPU-only shortcuts of :func:`may_read_values`.

    Example:
        >>> import torch
        >>> with cpu_shortcuts(False):
        ...     may_read_values(torch.zeros(1))
        False
    """
    global _CPU_SHORTCUTS
    before, _CPU_SHORTCUTS = _CPU_SHORTCUTS, enabled
    try:
        yield
    finally:
        _CPU_SHORTCUTS = before


class Statistic(abc.ABC):
    """A mergeable statistic: ``update`` on the device, ``merge`` exactly, ``compute``, JSON state.

    Subclasses set ``kind`` (the ``"kind"`` field of their state dict) and ``version``.

    Example:
        >>> import torch
        >>> from lightwatch.metrics import Moments
        >>> a, b = Moments(num_features=2), Moments(num_features=2)
        >>> a.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> b.update(torch.tensor([[5.0, 6.0]]))
        >>> a.merge(b).compute()["mean"]
        tensor([3., 4.], dtype=torch.float64)
        >>> Moments.from_state_dict(a.state_dict()).compute()["count"]
        tensor([3, 3])
    """

    kind: str = ""
    version: int = 1

    @abc.abstractmethod
    def update(self, x: torch.Tensor) -> None:
        """Accumulate a batch on its device, without a host sync."""

    @abc.abstractmethod
    def merge(self, other: "Self") -> "Self":
        """Fold ``other`` (same kind and configuration) into ``self``, in place; returns ``self``."""

    @abc.abstractmethod
    def compute(self) -> Dict[str, Any]:
        """The statistic's results as a dict of tensors (or numbers)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget the accumulated data, keeping the configuration."""

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        """Plain JSON-safe Python (see :mod:`lightwatch.metrics._state` for the encoding)."""

    @classmethod
    @abc.abstractmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "Self":
        """Inverse of :meth:`state_dict`; ``ValueError`` naming the problem on corrupt or foreign state."""

    @abc.abstractmethod
    def to(self, device: Device) -> "Self":
        """Move the state to ``device`` (in place; returns ``self``)."""

    def _check_kind(self, other: Any) -> None:
        if type(other) is not type(self):
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")


class ReducibleStatistic(Statistic):
    """A statistic whose state reduces across ranks through one SUM and one MAX flat buffer.

    The MAX buffer is reduced first (it holds, among others, the shifts the sums are taken around), then the
    SUM buffer is packed against it, so merged means and variances are exact.

    Example:
        Two ranks, with the all-reduces written out by hand:

        >>> import torch
        >>> from lightwatch.metrics import Moments, load_packed, pack_max, pack_sum
        >>> rank0, rank1 = Moments(num_features=2), Moments(num_features=2)
        >>> rank0.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> rank1.update(torch.tensor([[5.0, 6.0]]))
        >>> max_buf = torch.maximum(pack_max([rank0]), pack_max([rank1]))      # all_reduce(MAX)
        >>> sum_buf = pack_sum([rank0], max_buf) + pack_sum([rank1], max_buf)  # all_reduce(SUM)
        >>> load_packed([rank0], sum_buf, max_buf)
        >>> rank0.compute()["mean"]
        tensor([3., 4.], dtype=torch.float64)
    """

    @property
    @abc.abstractmethod
    def sum_size(self) -> int:
        """Length of :meth:`sum_state` (fixed by the configuration, identical on every rank)."""

    @property
    @abc.abstractmethod
    def max_size(self) -> int:
        """Length of :meth:`max_state`."""

    @abc.abstractmethod
    def max_state(self) -> torch.Tensor:
        """Flat float64 buffer of the entries that combine by MAX (never NaN)."""

    @abc.abstractmethod
    def sum_state(self, max_reduced: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Flat float64 buffer of the entries that combine by SUM.

        Args:
            max_reduced: this statistic's slice of the already MAX-reduced buffer; statistics that need
                agreement before summing (``Moments``) use it, the others ignore it.
        """

    @abc.abstractmethod
    def load_reduced(self, sum_buf: torch.Tensor, max_buf: torch.Tensor) -> None:
        """Replace the state by the one described by the reduced buffers (this statistic's slices)."""

    def _check_sizes(self, sum_buf: torch.Tensor, max_buf: torch.Tensor) -> None:
        if sum_buf.numel() != self.sum_size or max_buf.numel() != self.max_size:
            raise ValueError(
                f"{type(self).__name__}.load_reduced: got buffers of {sum_buf.numel()} (sum) and "
                f"{max_buf.numel()} (max) entries, expected {self.sum_size} and {self.max_size}; "
                "were the statistics configured differently on different ranks?"
            )


def _common_device(bufs: Sequence[torch.Tensor]) -> torch.device:
    for b in bufs:
        if b.numel():
            return b.device
    return bufs[0].device if bufs else torch.device("cpu")


def _cat(bufs: List[torch.Tensor]) -> torch.Tensor:
    device = _common_device(bufs)
    if not bufs:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.cat([b.to(device=device, dtype=torch.float64).reshape(-1) for b in bufs])


def _split(buf: torch.Tensor, sizes: Sequence[int], what: str) -> List[torch.Tensor]:
    if buf.numel() != sum(sizes):
        raise ValueError(f"{what} buffer has {buf.numel()} entries, the statistics need {sum(sizes)}")
    return list(torch.split(buf.reshape(-1), list(sizes)))


def _reducible(stats: Sequence[Any]) -> Sequence[ReducibleStatistic]:
    for s in stats:
        if not isinstance(s, ReducibleStatistic):
            raise TypeError(
                f"{type(s).__name__} cannot be reduced with SUM/MAX buffers"
                + ("; use gather_state()/load_gathered()" if hasattr(s, "gather_state") else "")
            )
    return stats


def pack_max(stats: Sequence[ReducibleStatistic]) -> torch.Tensor:
    """Concatenate the ``max_state()`` of ``stats`` into one flat float64 buffer.

    Args:
        stats: reducible statistics, in the same order on every rank.

    Example:
        >>> import torch
        >>> from lightwatch.metrics import Histogram, Moments
        >>> stats = [Moments(num_features=2), Histogram.from_range(0.0, 1.0, bins=4, num_features=2)]
        >>> pack_max(stats).shape
        torch.Size([28])
    """
    return _cat([s.max_state() for s in _reducible(stats)])


def pack_sum(stats: Sequence[ReducibleStatistic], max_reduced: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Concatenate the ``sum_state()`` of ``stats``, giving each its slice of ``max_reduced``.

    Args:
        stats: the statistics given to :func:`pack_max`, in the same order.
        max_reduced: the MAX-all-reduced result of :func:`pack_max`. Without it, ``Moments`` sums are
            only valid if every rank already shares each feature's shift (checked by :func:`load_packed`).

    Example:
        >>> import torch
        >>> from lightwatch.metrics import LabelCounts
        >>> lc = LabelCounts(num_classes=2)
        >>> lc.update(torch.tensor([0, 1, 1, 7]))
        >>> pack_sum([lc], pack_max([lc])).tolist()  # counts, out_of_range, nan, non_integer
        [1.0, 2.0, 1.0, 0.0, 0.0]
    """
    stats = _reducible(stats)
    if max_reduced is None:
        return _cat([s.sum_state() for s in stats])
    parts = _split(max_reduced, [s.max_size for s in stats], "MAX")
    return _cat([s.sum_state(p) for s, p in zip(stats, parts)])


def load_packed(stats: Sequence[ReducibleStatistic], sum_buf: torch.Tensor, max_buf: torch.Tensor) -> None:
    """Give each statistic its slices of the reduced buffers (see :meth:`ReducibleStatistic.load_reduced`).

    Args:
        stats: the statistics given to :func:`pack_max` and :func:`pack_sum`, in the same order.
        sum_buf: the SUM-all-reduced result of :func:`pack_sum`.
        max_buf: the MAX-all-reduced result of :func:`pack_max`.

    Example (two ranks simulated in one process):
        >>> import torch
        >>> from lightwatch.metrics import LabelCounts
        >>> ranks = [LabelCounts(num_classes=2), LabelCounts(num_classes=2)]
        >>> ranks[0].update(torch.tensor([0, 1])); ranks[1].update(torch.tensor([1, 1]))
        >>> max_buf = torch.stack([pack_max([r]) for r in ranks]).amax(0)
        >>> sum_buf = torch.stack([pack_sum([r], max_buf) for r in ranks]).sum(0)
        >>> load_packed([ranks[0]], sum_buf, max_buf)
        >>> ranks[0].counts.tolist()
        [1, 3]
    """
    stats = _reducible(stats)
    sums = _split(sum_buf, [s.sum_size for s in stats], "SUM")
    maxes = _split(max_buf, [s.max_size for s in stats], "MAX")
    for s, a, b in zip(stats, sums, maxes):
        s.load_reduced(a, b)


AllReduce = Callable[[torch.Tensor, str], Optional[torch.Tensor]]


def _default_all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    if op == "sum":
        all_reduce_flat(t, None)
    else:
        all_reduce_flat(None, t)
    return t


def all_reduce_statistics(stats: Sequence[ReducibleStatistic], all_reduce: Optional[AllReduce] = None) -> None:
    """Reduce ``stats`` across ranks with one MAX then one SUM collective; every rank gets the result.

    Args:
        stats: reducible statistics, in the same order on every rank.
        all_reduce: ``all_reduce(buffer, op)`` with ``op`` in ``{"max", "sum"}``, reducing in place or
            returning the reduced tensor, e.g. ``lambda t, op: trainer.strategy.reduce(t, reduce_op=op)``.
            Defaults to ``lightwatch.metrics.reduce.all_reduce_flat`` (a no-op on one process). The buffers
            are on the statistics' device; move them for backends that need it (NCCL needs CUDA).

    Example:
        >>> import torch
        >>> from lightwatch.metrics import Moments
        >>> m = Moments(num_features=1)
        >>> m.update(torch.tensor([[1.0], [3.0]]))
        >>> all_reduce_statistics([m], lambda t, op: t)  # one process: identity
        >>> m.compute()["mean"].tolist()
        [2.0]
    """
    reduce = all_reduce or _default_all_reduce
    max_buf = pack_max(stats)
    out = reduce(max_buf, "max")
    max_buf = out if out is not None else max_buf
    sum_buf = pack_sum(stats, max_buf)
    out = reduce(sum_buf, "sum")
    sum_buf = out if out is not None else sum_buf
    load_packed(stats, sum_buf, max_buf)
