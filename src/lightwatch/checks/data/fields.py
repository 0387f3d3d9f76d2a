"""The fields of a batch as the data monitor sees them: schema, layout, ranges, label tallies.

A field is an input or a target tensor picked by the monitor's selectors. Numeric fields have features (the
last dimension of ``[N, F]`` and ``[N, T, F]``, the channels of ``[N, C, H, W]``, one feature for ``[N]``);
integer targets are class labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from lightwatch.core.batch import Field
from lightwatch.metrics import LabelCounts
from lightwatch.profile import dtype_name, parse_dtype

__all__ = ["LABEL_CAPACITY", "FieldSpec", "LabelTally", "Ranges", "Schema", "default_feature_dim", "feature_matrix",
           "parse_schema", "token_like"]

#: Label counts are kept for this many classes when the number of classes is not known up front.
LABEL_CAPACITY = 1024


@dataclass
class Schema:
    """Expected dtype and sample shape of a field; dimensions are learned until ``frozen``.

    Example:
        >>> import torch
        >>> Schema(torch.float32, [3, None], True, "schema argument").describe()
        "float32 [3, '*']"
    """

    dtype: torch.dtype
    dims: List[Optional[int]]
    frozen: bool
    source: str

    def describe(self) -> str:
        return f"{dtype_name(self.dtype)} {['*' if d is None else d for d in self.dims]}"


@dataclass
class FieldSpec:
    """A field of one split as the monitor sees it: where it is, what it is, where its counters live.

    Example:
        >>> spec = FieldSpec(Field("x", (0,)), "input", "numeric", 2, 1, 3, True, 0, 6, (0,), names=["a", "b", "c"])
        >>> spec.name, spec.label(1)
        ('x', 'x.b')
    """

    field: Field
    role: str  # "input" | "target"
    kind: str  # "numeric" | "labels"
    ndim: int
    feature_dim: Optional[int]  # dimension of the batch tensor holding the features; None: one feature
    num_features: int
    floating: bool
    offset: int  # first slot in the split's counter vector
    width: int  # slots: 2F (non-finite, out-of-range) for numeric, 1 for labels
    sum_dims: Optional[Tuple[int, ...]]
    names: Optional[List[str]] = None
    zeros: Optional[torch.Tensor] = None
    # one more counter slot (floating fields with a feature dimension): non-finite values of batches whose
    # feature dimension has another size than the field's layout (a dimension learned to be variable)
    loose_slot: bool = False

    @property
    def name(self) -> str:
        return self.field.name

    def label(self, j: int) -> str:
        if self.num_features == 1 and not self.names:
            return self.name
        return f"{self.name}.{self.names[j] if self.names else j}"


@dataclass
class Ranges:
    """Per-feature bounds of a numeric field: given (``hard``), from a reference profile, or learned.

    Example:
        >>> import torch
        >>> r = Ranges(torch.zeros(1, 2), torch.ones(1, 2), hard=True, source="given ranges", n_ref=0)
        >>> r.hard, r.source
        (True, 'given ranges')
    """

    lo: torch.Tensor  # broadcastable against the field, float64
    hi: torch.Tensor
    hard: bool  # given by the user: any value outside is reported
    source: str
    n_ref: int
    bounds: List[Tuple[float, float]] = field(default_factory=list)


class LabelTally(LabelCounts):
    """``LabelCounts`` that leaves out labels equal to ``ignore_index`` (padding, masked positions).

    Example:
        >>> import torch
        >>> tally = LabelTally(3, ignore_index=-100)
        >>> tally.update(torch.tensor([0, 2, 2, -100, 7]))
        >>> tally.counts.tolist()
        [1, 0, 2]
    """

    def __init__(self, num_classes: int, ignore_index: Optional[int], device: Any = None) -> None:
        super().__init__(num_classes, device=device)
        self.ignore_index = ignore_index

    def update(self, y: Any) -> None:
        y = torch.as_tensor(y).reshape(-1)
        if y.device != self.device:
            self.to(y.device)
        valid = (y >= 0) & (y < self.num_classes)
        bad = ~valid
        if self.ignore_index is not None:
            keep = y != self.ignore_index
            valid &= keep
            bad &= keep
        idx = torch.where(valid, y, torch.zeros_like(y)).to(torch.int64)
        self.counts.scatter_add_(0, idx, valid.to(torch.int64))
        self._extra[0] += bad.sum()

    def empty_like(self) -> "LabelTally":
        return LabelTally(self.num_classes, self.ignore_index, device=self.device)


_SEQUENCE_INT_DTYPES = (torch.int16, torch.int32, torch.int64)


def token_like(t: torch.Tensor) -> bool:
    """Integer ids with a sequence dimension (``[N, T]`` token ids, attention masks, per-token labels): int16/32/64
    tensors of two or more dimensions. Their last dimension is a sequence (padded to each batch's longest one by
    a dynamic-padding collate), not a set of features. ``uint8`` (raw images) and ``bool`` are not ids."""
    return t.dtype in _SEQUENCE_INT_DTYPES and t.dim() >= 2


def default_feature_dim(ndim: int) -> Optional[int]:
    # [N] one feature; [N, F] and [N, T, F] features last; [N, C, H, W] (and 3-d volumes) channels first.
    if ndim <= 1:
        return None
    return ndim - 1 if ndim <= 3 else 1


def feature_matrix(x: torch.Tensor, feature_dim: Optional[int], cap: int) -> torch.Tensor:
    """``[values, F]``: per sample at most ``cap`` evenly strided values of each feature (views where possible).

    The same positions of every sample are taken, so the result does not depend on how samples are
    grouped into batches (or ranks). The stride is odd so that on power-of-two image sizes it still walks
    across columns rather than down one.
    """
    n = x.shape[0]
    if feature_dim is None:
        xm = x.reshape(n, 1, -1)
    else:
        xm = x.movedim(feature_dim, 1)
        xm = xm.reshape(n, xm.shape[1], -1)
    per_sample = xm.shape[2]
    if per_sample > cap:
        stride = -(-per_sample // cap)
        stride += 1 - stride % 2
        xm = xm[:, :, ::stride]
    return xm.transpose(1, 2).reshape(-1, xm.shape[1])


def parse_schema(schema: Optional[Mapping[str, Mapping[str, Any]]], where: str) -> Dict[str, Schema]:
    """The ``schema=`` argument as :class:`Schema` per field (frozen); ``ValueError`` naming ``where`` otherwise."""
    out: Dict[str, Schema] = {}
    for name, spec in dict(schema or {}).items():
        if not isinstance(spec, Mapping) or "dtype" not in spec or "shape" not in spec:
            raise ValueError(f"{where}(schema={{{name!r}: ...}}): expected {{'dtype': 'float32', 'shape': [...]}}, "
                             f"got {spec!r}.")
        try:
            dtype = parse_dtype(spec["dtype"])
        except ValueError as err:
            raise ValueError(f"{where}(schema={{{name!r}: ...}}): {err}.") from None
        dims = list(spec["shape"])
        if any(d is not None and (isinstance(d, bool) or int(d) != d or d < 0) for d in dims):
            raise ValueError(f"{where}(schema={{{name!r}: ...}}): shape must list sizes >= 0 or None, got "
                             f"{dims!r}.")
        out[str(name)] = Schema(dtype, [None if d is None else int(d) for d in dims], True, "schema argument")
    return out
