"""Counts per class of integer labels, with out-of-range, NaN and non-integer labels counted apart."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

from lightwatch.metrics._state import StateReader, encode_ints
from lightwatch.metrics.base import Device, ReducibleStatistic

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["LabelCounts"]

_EXTRA = ("out_of_range", "nan_count", "non_integer")


class LabelCounts(ReducibleStatistic):
    """Per-class counts of labels in ``[0, num_classes)``; everything else is counted, never dropped.

    Integer (and bool) labels outside ``[0, num_classes)`` are ``out_of_range``. Float labels are accepted
    when integer valued (``2.0`` is class 2); a NaN is ``nan_count``, ``+-inf`` is ``out_of_range`` and
    any other fractional value is ``non_integer``. Pass class indices (``argmax`` one-hot targets first);
    every element of the batch is one label. Updates run on the device with no host sync.

    Args:
        num_classes: number of classes ``C``.
        device: where the (empty) state starts; it follows the first batch's device anyway.

    Example:
        >>> import torch
        >>> lc = LabelCounts(num_classes=3)
        >>> lc.update(torch.tensor([0, 2, 2, 5, -1]))
        >>> lc.update(torch.tensor([1.0, 1.5, float("nan")]))
        >>> out = lc.compute()
        >>> out["counts"].tolist(), int(out["out_of_range"]), int(out["non_integer"]), int(out["nan_count"])
        ([1, 1, 2], 2, 1, 1)
    """

    kind = "label_counts"
    version = 1

    def __init__(self, num_classes: int, device: Device = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    @property
    def device(self) -> torch.device:
        """Device of the state (follows the batches)."""
        return self._device

    def reset(self) -> None:
        self.counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self._device)
        # [out_of_range, nan_count, non_integer]
        self._extra = torch.zeros(3, dtype=torch.int64, device=self._device)

    def to(self, device: Device) -> "Self":
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.counts = self.counts.to(self._device)
        self._extra = self._extra.to(self._device)
        return self

    def empty_like(self) -> "LabelCounts":
        """An empty ``LabelCounts`` with the same ``num_classes``."""
        return LabelCounts(self.num_classes, device=self._device)

    def update(self, y: Any) -> None:
        """Count a batch of labels (any shape; each element is a label) on its device.

        Args:
            y: an integer, bool or float tensor of class indices.
        """
        y = torch.as_tensor(y).reshape(-1)
        if y.is_complex():
            raise TypeError("LabelCounts does not support complex labels")
        if y.device != self._device:
            self.to(y.device)
        if y.dtype == torch.bool:
            y = y.to(torch.int64)
        c = self.num_classes
        if y.is_floating_point():
            finite = torch.isfinite(y)
            integral = finite & (y == torch.trunc(y))
            valid = integral & (y >= 0) & (y < c)
            extra = torch.stack([(torch.isinf(y) | (integral & ~valid)).sum(), torch.isnan(y).sum(),
                                 (finite & ~integral).sum()])
        else:
            valid = (y >= 0) & (y < c)
            zero = torch.zeros((), dtype=torch.int64, device=y.device)
            extra = torch.stack([(~valid).sum(), zero, zero])
        # Invalid entries are replaced before the cast: casting huge or NaN floats to int is undefined.
        idx = torch.where(valid, y, torch.zeros_like(y)).to(torch.int64)
        self.counts.scatter_add_(0, idx, valid.to(torch.int64))
        self._extra += extra

    @property
    def out_of_range(self) -> torch.Tensor:
        """0-d count of labels outside ``[0, num_classes)`` (including ``+-inf``)."""
        return self._extra[0]

    @property
    def nan_count(self) -> torch.Tensor:
        """0-d count of NaN labels."""
        return self._extra[1]

    @property
    def non_integer(self) -> torch.Tensor:
        """0-d count of finite fractional float labels."""
        return self._extra[2]

    def distribution(self) -> torch.Tensor:
        """Class proportions among in-range labels (NaN when there are none)."""
        counts = self.counts.to(torch.float64)
        return counts / counts.sum()

    def merge(self, other: "LabelCounts") -> "LabelCounts":
        """Add ``other``'s counts (same ``num_classes``); returns ``self``."""
        self._check_kind(other)
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge LabelCounts of {other.num_classes} classes into {self.num_classes}")
        self.counts = self.counts + other.counts.to(self._device)
        self._extra = self._extra + other._extra.to(self._device)
        return self

    def compute(self) -> Dict[str, torch.Tensor]:
        """``counts [C]``, ``distribution [C]``, ``in_range``, ``out_of_range``, ``nan_count``,
        ``non_integer`` and ``total`` (0-d tensors)."""
        in_range = self.counts.sum()
        return {
            "counts": self.counts.clone(),
            "distribution": self.distribution(),
            "in_range": in_range,
            "out_of_range": self.out_of_range.clone(),
            "nan_count": self.nan_count.clone(),
            "non_integer": self.non_integer.clone(),
            "total": in_range + self._extra.sum(),
        }

    # -- cross-rank reduction --------------------------------------------------------------------------
    @property
    def sum_size(self) -> int:
        """``C + 3``."""
        return self.num_classes + 3

    @property
    def max_size(self) -> int:
        """0: nothing combines by MAX."""
        return 0

    def sum_state(self, max_reduced: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[counts..., out_of_range, nan_count, non_integer]`` as float64."""
        return torch.cat([self.counts, self._extra]).to(torch.float64)

    def max_state(self) -> torch.Tensor:
        """An empty buffer."""
        return torch.zeros(0, dtype=torch.float64, device=self._device)

    def load_reduced(self, sum_buf: torch.Tensor, max_buf: torch.Tensor) -> None:
        """Set the counts from this statistic's slice of the SUM-reduced buffer."""
        self._check_sizes(sum_buf, max_buf)
        s = sum_buf.reshape(-1).to(self._device, torch.float64).round().to(torch.int64)
        self.counts = s[:self.num_classes].clone()
        self._extra = s[self.num_classes:].clone()

    # -- serialisation ---------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """JSON-safe state: ``num_classes``, ``counts`` and the three extra counts, as ints."""
        extra = encode_ints(self._extra)
        out: Dict[str, Any] = {"kind": self.kind, "version": self.version, "num_classes": self.num_classes,
                               "counts": encode_ints(self.counts)}
        out.update(zip(_EXTRA, extra))
        return out

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "LabelCounts":
        """Rebuild from :meth:`state_dict` output (on CPU); ``ValueError`` names any problem."""
        r = StateReader(state, "LabelCounts", cls.kind, cls.version, ("num_classes", "counts") + _EXTRA)
        c = r.int_value("num_classes", minimum=1)
        assert c is not None
        out = cls(c)
        out.counts = r.ints("counts", (c,))
        out._extra = torch.stack([r.ints(k, ()) for k in _EXTRA])
        return out
