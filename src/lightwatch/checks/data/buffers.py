"""Per-split state of the data monitor: buffered batches waiting to be folded, counters, statistics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from lightwatch.checks.data.base import DataCheck
from lightwatch.checks.data.fields import FieldSpec
from lightwatch.core.batch import Field
from lightwatch.metrics import SampleHasher

__all__ = ["BUFFER_BYTES", "Buffer", "Pending", "SplitState", "SteadyBatch", "row_limit"]

_NEG_INF = float("-inf")
#: Batches are buffered for the distribution tier up to this many bytes per split, then folded in one go.
BUFFER_BYTES = 8 << 20


@dataclass
class Pending:
    """One buffered batch: a copy of each field (``None`` where the field was unusable), its marker (the
    training step, or the batch index of an evaluation epoch), its sample count and its sample ids.

    Example:
        >>> import torch
        >>> Pending([torch.zeros(4, 2)], marker=7, rows=4, ids=None).marker
        7
    """

    parts: List[Optional[torch.Tensor]]
    marker: int
    rows: int
    ids: Optional[torch.Tensor]
    # fields of this batch whose feature dimension is variable and has another size than the field's layout:
    # checked for non-finite values as a whole, left out of the per-feature statistics
    loose: Dict[int, torch.Tensor] = field(default_factory=dict)
    # field -> first row of this batch in the buffer's staging tensor of that field (fields copied there)
    staged: Dict[int, int] = field(default_factory=dict)


class Buffer:
    """Copies of recent batches, waiting to be checked and folded into the statistics in one go.

    Counting non-finite values, range and label violations, updating moments, histograms and label counts,
    and hashing samples costs a few dozen small tensor operations whatever the batch size, and on small
    batches that per-operation cost (dispatch, kernel launches, cold caches right after the backward pass) is
    nearly all of it. So each batch only leaves a copy of its fields here (a copy, because training code may
    change the batch in place), and the work is done on all of them at the next logged step, at the end of
    the epoch, or when the buffer holds ``BUFFER_BYTES``. Per-row markers keep the step of each value, so
    the first bad step is exact.

    The copies go into one staging tensor per field, allocated once and reused fold after fold, row after
    row: the buffered batches of a field are then already one tensor (:meth:`joined` is a view, not a
    concatenation), and no step allocates memory of the batch's size. A field whose sample shape, dtype or
    device changes (sequences padded per batch) is cloned instead, batch by batch, from then on.

    Example:
        >>> import torch
        >>> buf = Buffer()
        >>> buf.add(Pending([torch.zeros(4, 2)], marker=0, rows=4, ids=None), copy=True)
        >>> buf.add(Pending([torch.ones(3, 2)], marker=1, rows=3, ids=None), copy=True)
        >>> buf.fits([torch.zeros(3, 2)]), buf.fits([torch.zeros(3, 5)]), buf.nbytes
        (True, False, 56)
        >>> buf.joined(0, buf.batches).sum().item()  # one view of both batches' rows
        6.0
    """

    def __init__(self) -> None:
        self.batches: List[Pending] = []
        self.shapes: Optional[List[Optional[Tuple[int, ...]]]] = None
        self.nbytes = 0
        self._stage: Dict[int, torch.Tensor] = {}
        self._fill: Dict[int, int] = {}
        self._stage_rows: Optional[int] = None
        self._slots: Dict[int, Tuple[int, Dict[int, torch.Tensor]]] = {}  # field -> (rows, first row -> view)
        self._variable: Set[int] = set()  # fields whose sample shape varies: cloned, not staged
        # batches of the steady layout (see add_steady): first row -> (every field's view there, staged rows)
        self._steady: Dict[int, Tuple[List[torch.Tensor], Dict[int, int]]] = {}

    def fits(self, parts: List[Optional[torch.Tensor]]) -> bool:
        """Whether these fields can be concatenated with the buffered ones (same sample shapes)."""
        if self.shapes is None:
            return True
        return all(p is None or old is None or tuple(p.shape[1:]) == old for p, old in zip(parts, self.shapes))

    def add(self, pending: Pending, copy: bool = False) -> None:
        """Buffer a batch; with ``copy``, its fields are copied (into the staging tensors) first."""
        if copy:
            if self._stage_rows is None:
                row_bytes = sum(p[0].numel() * p.element_size() for p in pending.parts if p is not None)
                self._stage_rows = BUFFER_BYTES // max(1, row_bytes) + pending.rows
            pending.staged = {}
            for i, p in enumerate(pending.parts):
                if p is not None:
                    pending.parts[i] = self._copy(i, p, pending)
        self.batches.append(pending)
        if self.shapes is None:
            self.shapes = [None if p is None else tuple(p.shape[1:]) for p in pending.parts]
        elif None in self.shapes:
            self.shapes = [tuple(p.shape[1:]) if old is None and p is not None else old
                           for old, p in zip(self.shapes, pending.parts)]
        self.nbytes += sum(p.numel() * p.element_size() for p in pending.parts if p is not None)

    def add_steady(self, tensors: List[torch.Tensor], marker: int, rows: int, nbytes: int) -> bool:
        """Buffer a batch of the layout the last batch had, every field staged: each field copied into the
        next rows of its staging tensor, through views made once per row.

        The caller has compared the fields' shapes, dtypes and devices with a batch that :meth:`add` staged
        (every field in the staging tensors). Returns ``False``, buffering nothing, where the staging
        tensors cannot take it (full, or a field no longer staged): :meth:`add` then takes it.
        """
        fill = self._fill.get(0, 0)
        slot = self._steady.get(fill)
        if slot is None:  # this row's views, made once (making a view costs as much as copying a small batch)
            views = []
            for i in range(len(tensors)):
                stage = self._stage.get(i)
                if (stage is None or i in self._variable or self._fill.get(i, 0) != fill
                        or fill + rows > stage.shape[0]):
                    return False
                views.append(stage.narrow(0, fill, rows))
            slot = self._steady[fill] = (views, dict.fromkeys(range(len(tensors)), fill))
        # one copy_ each: in a training step this costs less than one _foreach_copy_ (and its no_grad, needed
        # there); the steady layout holds no field that requires grad
        for view, t in zip(slot[0], tensors):
            view.copy_(t)
        if self.shapes is None:  # the first batch since a fold
            self.shapes = [tuple(t.shape[1:]) for t in tensors]
        # the views and the staged rows are shared by every batch at this slot: neither changes after
        self.batches.append(Pending(list(slot[0]), marker, rows, None, {}, slot[1]))
        end = fill + rows
        for i in range(len(tensors)):
            self._fill[i] = end
        self.nbytes += nbytes
        return True

    def _copy(self, i: int, p: torch.Tensor, pending: Pending) -> torch.Tensor:
        if i in self._variable:
            return p.clone()
        stage, fill, n = self._stage.get(i), self._fill.get(i, 0), p.shape[0]
        assert self._stage_rows is not None
        if stage is not None and (stage.shape[1:] != p.shape[1:] or stage.dtype != p.dtype or stage.device != p.device):
            # A field whose sample shape varies (sequences padded per batch) would need a new staging tensor
            # for every batch; its batches are cloned from now on (rows still waiting in the old staging
            # tensor keep it alive until the fold).
            self._variable.add(i)
            del self._stage[i]
            self._slots.pop(i, None)
            self._steady.clear()
            return p.clone()
        if stage is None:
            stage = torch.empty((max(self._stage_rows, n),) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device)
            self._stage[i] = stage
        if fill + n > stage.shape[0]:
            return p.clone()
        # batches of one size (the usual case) land in fixed slots whose views are made once: making a view
        # costs as much as copying a small batch
        slots = self._slots.get(i)
        if slots is None or slots[0] != n:
            slots = self._slots[i] = (n, {})
            self._steady.clear()
        view = slots[1].get(fill) if fill % n == 0 else None
        if view is None:
            view = stage.narrow(0, fill, n)
            if fill % n == 0:
                slots[1][fill] = view
        view.copy_(p)
        pending.staged[i] = fill
        self._fill[i] = fill + n
        return view

    def joined(self, i: int, batches: List[Pending]) -> torch.Tensor:
        """Field ``i`` of ``batches`` (all holding it) as one tensor: a view of the staging tensor when the
        batches' rows lie there one after the other, else a concatenation."""
        if len(batches) == 1:
            part = batches[0].parts[i]
            assert part is not None
            return part
        start = batches[0].staged.get(i)
        row = start
        for b in batches:
            if row is None or b.staged.get(i) != row:
                return torch.cat([b.parts[i] for b in batches])  # type: ignore[misc]
            row += b.rows
        assert start is not None and row is not None
        return self._stage[i].narrow(0, start, row - start)

    def clear(self) -> None:
        self.batches = []
        self.shapes = None
        self.nbytes = 0
        self._fill.clear()


class SteadyBatch:
    """The layout of a split's last batch that took the full path cleanly, so the next batches of that very
    layout can skip it (:meth:`~lightwatch.checks.data.counters.BatchCounters._observe`).

    The full path compares each field's dtype and shape with the expected schema and copies each field into
    its staging tensor: ~100 us a batch in a training step, most of it Python. A batch whose fields have the
    shapes, dtypes, devices and ``requires_grad`` of a batch that passed the schema check with no problem,
    every field staged, passes it again with the same result (the schema only changes when a batch differs
    from it), so the steady path compares the layout and copies the fields into the next slot.

    Args:
        tensors: the batch's fields, in the split's field order.
        schemas: the monitor's schema dict the batch was checked against (a restored state replaces it).

    Example:
        >>> import torch
        >>> schemas = {}
        >>> steady = SteadyBatch([torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)], schemas)
        >>> steady.rows, steady.values, steady.nbytes
        (4, [12, 4], 80)
        >>> steady.matches([torch.ones(4, 3), torch.ones(4, dtype=torch.long)], schemas)
        True
        >>> steady.matches([torch.ones(5, 3), torch.ones(5, dtype=torch.long)], schemas)  # another batch size
        False
    """

    __slots__ = ("layout", "rows", "values", "nbytes", "schemas")

    def __init__(self, tensors: List[torch.Tensor], schemas: Dict[str, Any]) -> None:
        self.layout = self.layout_of(tensors)
        self.rows = int(tensors[0].shape[0])
        self.values = [t.numel() for t in tensors]
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.schemas = schemas

    @staticmethod
    def layout_of(tensors: List[torch.Tensor]) -> List[Tuple[Any, ...]]:
        # the device as its index (-1: CPU): building a torch.device per field and batch costs more
        return [(t.shape, t.dtype, t.get_device(), t.requires_grad) for t in tensors]

    def matches(self, tensors: List[torch.Tensor], schemas: Dict[str, Any]) -> bool:
        if schemas is not self.schemas or len(tensors) != len(self.layout):
            return False
        for t, (shape, dtype, device, requires_grad) in zip(tensors, self.layout):
            if t.dtype is not dtype or t.shape != shape or t.requires_grad or t.get_device() != device:
                return False
        return True


class SplitState:
    """Everything the monitor keeps for one split (``train``, ``val``, ``test``...).

    Example:
        >>> sp = SplitState("val", "batch")
        >>> sp.name, sp.specs, sp.buffer.batches
        ('val', None, [])
    """

    def __init__(self, name: str, marker_word: str) -> None:
        self.name = name
        self.marker_word = marker_word  # "step" for training, "batch" for evaluation
        self.specs: Optional[List[FieldSpec]] = None
        self.sample_ids: Optional[Field] = None
        self.device: Optional[torch.device] = None
        # per-batch tier: device SUM and MAX vectors, plus host counters
        self.counts: Optional[torch.Tensor] = None
        self.first: Optional[torch.Tensor] = None
        self.label_max: Optional[torch.Tensor] = None
        self.immediate: Optional[torch.Tensor] = None
        self.reset_host_counters()
        # distribution tier: local since the last reduction, and reduced over the epoch so far
        self.acc: Dict[str, Any] = {}
        self.glob: Dict[str, Any] = {}
        self.hasher = SampleHasher()
        self.seen = SampleHasher()
        self.buffer = Buffer()
        self.steady: Optional[SteadyBatch] = None
        self.epoch_samples = 0  # local, since the last reduction
        self.epoch_batches = 0
        self.glob_samples = 0  # reduced, this epoch so far
        self.glob_batches = 0
        # DistributedSampler padding: samples of this rank that are real in this epoch
        self.rows_seen = 0
        self.row_limit: Optional[int] = None
        self.limit_known = False
        self.batches_in_epoch = 0
        # a copy of each check the loop feeds and judges (custom ones, built-in ones with states of their own),
        # with its states on the split's device
        self.driven: List[DataCheck] = []

    def reset_host_counters(self) -> None:
        self.batches = 0
        self.samples = 0
        self.empty = 0
        self.schema_errors = 0
        self.first_empty = _NEG_INF
        self.first_schema = _NEG_INF
        self.schema_notes: Dict[str, str] = {}
        self.values: List[int] = [0] * (len(self.specs) if self.specs else 0)
        self.pending = False

    def reset_epoch(self) -> None:
        for stat in list(self.acc.values()) + list(self.glob.values()):
            stat.reset()
        self.buffer.clear()
        self.steady = None  # the first batch of an epoch takes the full path (the sampler's padding is read anew)
        self.hasher.reset()
        self.seen.reset()
        self.epoch_samples = self.epoch_batches = self.glob_samples = self.glob_batches = 0
        self.rows_seen = 0
        self.limit_known = False
        self.batches_in_epoch = 0
        for check in self.driven:
            check.reset()


def row_limit(loader: Any) -> Optional[int]:
    """Samples of this rank that are real when a ``DistributedSampler`` pads the ranks to equal length."""
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for candidate in (sampler, getattr(batch_sampler, "sampler", None)):
        needed = ("num_replicas", "rank", "total_size", "dataset")
        if candidate is None or not all(hasattr(candidate, a) for a in needed):
            continue
        try:
            n = len(candidate.dataset)
        except TypeError:
            return None
        if getattr(candidate, "drop_last", False) or candidate.total_size <= n:
            return None
        return len(range(int(candidate.rank), n, int(candidate.num_replicas)))
    return None
