"""Exact-duplicate and train/eval leakage detection from 64-bit sample hashes."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from lightwatch.metrics._state import StateReader, encode_b64
from lightwatch.metrics.base import Device, Statistic
from lightwatch.metrics.hashing import hash_rows

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["SampleHasher"]

_I64 = torch.int64
Batch = Union[torch.Tensor, Sequence[torch.Tensor]]


def _cat_cpu(parts: List[torch.Tensor]) -> torch.Tensor:
    # One device-to-host copy per device rather than one per batch.
    if not parts:
        return torch.zeros(0, dtype=_I64)
    if all(p.device == parts[0].device for p in parts):
        return torch.cat(parts).cpu()
    return torch.cat([p.cpu() for p in parts])


class SampleHasher(Statistic):
    """Hashes every sample to 64 bits to find exact duplicates within a split and leakage between splits.

    ``update`` hashes the rows of the batch on its device (:func:`~lightwatch.metrics.hash_rows`: raw bit
    patterns of any dtype, so ``-0.0`` and ``0.0`` differ, as do equal values in different dtypes) and
    only appends the hash tensor to a list: no host sync. The list is folded into host tensors lazily by
    :meth:`fold`, :meth:`compute`, :meth:`merge` and the leak methods. Hash un-augmented data: random
    augmentation makes every view unique.

    Repeated samples that are not duplicates in the data (DistributedSampler pads every rank to the same
    length by repeating indices; several epochs repeat everything) must be handled by the caller: pass
    ``sample_ids`` (global dataset indices, >= 0) and every row whose id was already seen is ignored.
    Without ids such repeats count as duplicates.

    Across ranks the state is gathered, not summed: :meth:`gather_state` gives an int64 ``[rows, 3]``
    tensor (hash, id or -1, valid flag) padded to a common length for ``all_gather``, and
    :meth:`load_gathered` replaces the state with the union. The rows to pad to can be agreed with a MAX
    all-reduce of :attr:`num_rows` (known on the host without a sync).

    Args:
        seed: hash seed; only hashers with the same seed can be compared or merged.

    Example:
        >>> import torch
        >>> train, val = SampleHasher(), SampleHasher()
        >>> train.update(torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]]))
        >>> val.update(torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
        >>> train.compute()["duplicates"], val.leak_fraction(train)
        (1, 0.5)
    """

    kind = "sample_hasher"
    version = 1

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._pending: List[Tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        self._hashes = torch.zeros(0, dtype=_I64)
        self._ids = torch.zeros(0, dtype=_I64)

    @property
    def num_rows(self) -> int:
        """Samples hashed so far (including ignored repeats); read from shapes, so no host sync."""
        return int(self._hashes.numel()) + sum(int(h.shape[0]) for h, _ in self._pending)

    @property
    def device(self) -> torch.device:
        """Always the host: folded hashes live there (pending ones stay on their batch's device)."""
        return torch.device("cpu")

    def to(self, device: Device) -> "Self":
        """Folded state always lives on the host; this is a no-op kept for the common interface."""
        return self

    def reset(self) -> None:
        self._pending.clear()
        self._hashes = torch.zeros(0, dtype=_I64)
        self._ids = torch.zeros(0, dtype=_I64)

    def update(self, x: Batch, sample_ids: Optional[Any] = None) -> None:
        """Hash a batch's samples (rows along dim 0) on their device; no host sync.

        Args:
            x: a tensor ``[N, ...]`` or a sequence of tensors hashed jointly (e.g. ``(inputs, targets)``).
            sample_ids: optional ``N`` integer ids (>= 0, e.g. dataset indices); a row whose id was seen
                before is ignored by every result.
        """
        h = hash_rows(x, self.seed)
        ids = None
        if sample_ids is not None:
            ids = torch.as_tensor(sample_ids).reshape(-1)
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise TypeError(f"sample_ids must be integers, got {ids.dtype}")
            if ids.numel() != h.numel():
                raise ValueError(f"got {ids.numel()} sample_ids for {h.numel()} samples")
            ids = ids.to(_I64)
        self._pending.append((h, ids))

    def fold(self) -> None:
        """Move pending device hashes to the host state (one sync); called lazily by the readers."""
        if not self._pending:
            return
        hashes = _cat_cpu([h for h, _ in self._pending])
        with_ids = [i for _, i in self._pending if i is not None]
        if len(with_ids) == len(self._pending):
            ids = _cat_cpu(with_ids)
        else:
            ids = torch.cat([i.cpu() if i is not None else torch.full((h.numel(),), -1, dtype=_I64)
                             for h, i in self._pending])
        self._hashes = torch.cat([self._hashes, hashes])
        self._ids = torch.cat([self._ids, ids])
        self._pending.clear()

    def _kept(self) -> torch.Tensor:
        """Mask of rows that count: no id, or the first row with their id."""
        self.fold()
        keep = self._ids < 0
        with_id = torch.nonzero(~keep).reshape(-1)
        if with_id.numel():
            uniq, inverse = torch.unique(self._ids[with_id], return_inverse=True)
            first = torch.full((uniq.numel(),), with_id.numel(), dtype=_I64)
            first.scatter_reduce_(0, inverse, torch.arange(with_id.numel()), reduce="amin")
            keep[with_id[first]] = True
        return keep

    def hashes(self, unique_ids: bool = True) -> torch.Tensor:
        """Host int64 tensor of the sample hashes, without rows of repeated ids unless ``unique_ids=False``."""
        self.fold()
        return self._hashes[self._kept()] if unique_ids else self._hashes.clone()

    def compute(self) -> Dict[str, Any]:
        """``samples`` (counted rows), ``unique``, ``duplicates`` (= samples whose hash was seen before),
        ``duplicate_fraction`` and ``ignored_repeated_ids``, as Python numbers."""
        kept = self.hashes()
        n = int(kept.numel())
        unique = int(torch.unique(kept).numel())
        return {
            "samples": n,
            "unique": unique,
            "duplicates": n - unique,
            "duplicate_fraction": (n - unique) / n if n else 0.0,
            "ignored_repeated_ids": int(self._hashes.numel()) - n,
        }

    def _check_seed(self, other: "SampleHasher") -> None:
        self._check_kind(other)
        if other.seed != self.seed:
            raise ValueError(f"hashers use different seeds ({self.seed} vs {other.seed}); hashes are not comparable")

    def leak_count(self, other: "SampleHasher") -> int:
        """Number of this split's (counted) samples whose hash also occurs in ``other``."""
        self._check_seed(other)
        return int(torch.isin(self.hashes(), other.hashes(unique_ids=False)).sum())

    def leak_fraction(self, other: "SampleHasher") -> float:
        """Fraction of this split's (counted) samples whose hash also occurs in ``other`` (e.g. train).

        Example:
            >>> import torch
            >>> a, b = SampleHasher(), SampleHasher()
            >>> a.update(torch.arange(4).reshape(4, 1)); b.update(torch.arange(3, 10).reshape(7, 1))
            >>> a.leak_fraction(b), b.leak_fraction(a)
            (0.25, 0.14285714285714285)
        """
        n = int(self._kept().sum())
        return self.leak_count(other) / n if n else 0.0

    def merge(self, other: "SampleHasher") -> "SampleHasher":
        """Append ``other``'s rows after this one's; returns ``self``.

        Results do not depend on the order unless one id was given to rows with different content.
        """
        self._check_seed(other)
        other.fold()
        self.fold()
        self._hashes = torch.cat([self._hashes, other._hashes])
        self._ids = torch.cat([self._ids, other._ids])
        return self

    # -- cross-rank gather -----------------------------------------------------------------------------
    def gather_state(self, pad_to: Optional[int] = None, device: Device = None) -> torch.Tensor:
        """Rows ``[hash, id (-1: none), valid]`` as int64 ``[pad_to or num_rows, 3]`` for ``all_gather``.

        Args:
            pad_to: total rows (>= :attr:`num_rows`); padding rows have ``valid == 0``.
            device: where to put the tensor (NCCL needs the CUDA device).
        """
        self.fold()
        n = int(self._hashes.numel())
        rows = n if pad_to is None else int(pad_to)
        if rows < n:
            raise ValueError(f"pad_to={rows} is smaller than the {n} rows held")
        out = torch.zeros(rows, 3, dtype=_I64)
        out[:n, 0] = self._hashes
        out[:n, 1] = self._ids
        out[:n, 2] = 1
        return out.to(device) if device is not None else out

    def load_gathered(self, gathered: Union[torch.Tensor, Sequence[torch.Tensor]]) -> None:
        """Replace the state by the valid rows of gathered :meth:`gather_state` tensors (in order).

        Args:
            gathered: ``[world, rows, 3]`` from ``all_gather``, or a list of ``[rows, 3]`` tensors.
        """
        parts = [gathered] if isinstance(gathered, torch.Tensor) else list(gathered)
        flat = []
        for p in parts:
            if p.shape[-1] != 3:
                raise ValueError(f"gathered rows must have 3 columns (hash, id, valid), got shape {tuple(p.shape)}")
            flat.append(p.detach().cpu().to(_I64).reshape(-1, 3))
        rows = torch.cat(flat) if flat else torch.zeros(0, 3, dtype=_I64)
        valid = rows[:, 2] == 1
        self._pending.clear()
        self._hashes = rows[valid, 0].clone()
        self._ids = rows[valid, 1].clone()

    # -- serialisation ---------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """JSON-safe state; ``hashes`` and ``ids`` are base64 of little-endian int64 (exact, compact)."""
        self.fold()
        return {"kind": self.kind, "version": self.version, "seed": self.seed,
                "num_rows": int(self._hashes.numel()), "encoding": "base64-int64-le",
                "hashes": encode_b64(self._hashes), "ids": encode_b64(self._ids)}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "SampleHasher":
        """Rebuild from :meth:`state_dict` output; ``ValueError`` names any problem."""
        r = StateReader(state, "SampleHasher", cls.kind, cls.version, ("seed", "num_rows", "encoding", "hashes", "ids"))
        if r["encoding"] != "base64-int64-le":
            raise r.error(f"unknown encoding {r['encoding']!r}, expected 'base64-int64-le'")
        n = r.int_value("num_rows", minimum=0)
        seed = r.int_value("seed")
        assert seed is not None
        out = cls(seed=seed)
        out._hashes = r.b64("hashes", _I64, n)
        out._ids = r.b64("ids", _I64, n)
        return out
