"""Gradient statistics of many parameters read on their device in a few fused calls, with no host sync."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from lightwatch.core.histogram import HIST_BINS, histogram_row
from lightwatch.core.runtime import dense_flat_view, local_tensor, local_tensors

__all__ = ["GradientReader", "ShapePlan", "WeightSnapshot", "fused_norms", "group_norms", "group_stats",
           "ring_summary"]

# Tensors up to this many elements are reduced on the CPU from stacks of tensors of one shape (see `ShapePlan`):
# copying them costs less than a call each. The stacks hold at most _SMALL_GROUP elements, so the memory they
# take is bounded (1 MiB of float32) whatever the model.
_SMALL = 1 << 14
_SMALL_GROUP = 1 << 18


def fused_norms(tensors: List[torch.Tensor], order: float = 2.0) -> torch.Tensor:
    """Norms of many tensors in one fused call, as one float32 vector.

    ``dtype=float32`` is only asked for when some tensor is not float32: it takes a slower path otherwise.

    Example:
        >>> fused_norms([torch.ones(4), torch.full((2,), 3.0)]).tolist()
        [2.0, 4.242640495300293]
    """
    if all(t.dtype == torch.float32 for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, order))
    return torch.stack(torch._foreach_norm(tensors, order, dtype=torch.float32))


class ShapePlan:
    """Norms (and largest magnitudes) of many tensors on the CPU, small ones stacked by shape.

    On the CPU a reduction call costs a few microseconds whatever its size, and ``_foreach`` ops are a loop of
    such calls: on a model of many small layers (773 tensors of at most 4,096 values) two reductions per
    tensor took 4 ms. Tensors of at most ``_SMALL`` values that share a shape and dtype are copied into one
    stack, in chunks of at most ``_SMALL_GROUP`` values (1 MiB of float32), and reduced along its rows: a
    handful of calls per shape (1 ms there). Large tensors get one call each (their bytes dominate).

    Built once for a list of tensor shapes; :meth:`reduce` takes tensors of those shapes, in that order.

    Example:
        >>> tensors = [torch.full((2, 2), 3.0), torch.ones(3), torch.full((2, 2), -4.0)]
        >>> norms, absmax = ShapePlan(tensors).reduce(tensors, with_absmax=True)
        >>> norms.tolist(), absmax.tolist()
        ([6.0, 1.7320507764816284, 8.0], [3.0, 1.0, 4.0])
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.size = len(tensors)
        self.device = tensors[0].device if tensors else torch.device("cpu")
        groups: Dict[Tuple[Any, ...], List[int]] = {}
        self.large: List[int] = []
        for j, t in enumerate(tensors):  # an empty tensor is in neither: its norm and absmax stay 0
            n = t.numel()
            if n == 0:
                continue
            if n <= _SMALL:
                groups.setdefault((tuple(t.shape), t.dtype), []).append(j)
            else:
                self.large.append(j)
        self.chunks: List[Tuple[List[int], torch.Tensor]] = []
        for (shape, _), members in groups.items():
            per = max(1, _SMALL_GROUP // max(math.prod(shape), 1))
            for start in range(0, len(members), per):
                chunk = members[start:start + per]
                self.chunks.append((chunk, torch.tensor(chunk, device=self.device)))
        self.large_index = torch.tensor(self.large, device=self.device, dtype=torch.long)
        # the large tensors' norm, min and max are written into one buffer made once, through 0-d views made
        # once (a view costs about a microsecond, three per tensor); what `reduce` returns is copied out of it
        self._rows = torch.empty(len(self.large), 3, dtype=torch.float32, device=self.device)
        self._slots = [tuple(row.unbind(0)) for row in self._rows]

    def reduce(self, tensors: Sequence[torch.Tensor], with_absmax: bool = False
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(norms, absmax or None)``, float32 vectors on the tensors' device; NaN propagates to both."""
        norms = torch.zeros(self.size, dtype=torch.float32, device=self.device)
        absmax = torch.zeros(self.size, dtype=torch.float32, device=self.device) if with_absmax else None
        for chunk, index in self.chunks:
            # reshape, not view: a stack of channels_last tensors keeps their layout
            stacked = torch.stack([tensors[j] for j in chunk]).reshape(len(chunk), -1)
            float32 = stacked.dtype == torch.float32
            norms.index_copy_(0, index, torch.linalg.vector_norm(stacked, dim=1) if float32 else
                              torch.linalg.vector_norm(stacked, dim=1, dtype=torch.float32))
            if absmax is not None:
                absmax.index_copy_(0, index, stacked.abs_().amax(dim=1).float())  # the stack is ours: in place
        if self.large:
            # one norm, one min and one max each, written into one buffer (out=: no result tensors to stack)
            rows = self._rows
            for (norm, lo, hi), j in zip(self._slots, self.large):
                t = tensors[j]
                if t.dtype == torch.float32:
                    torch.linalg.vector_norm(t, out=norm)
                    if absmax is not None:  # amin and amax apart: 20-40% cheaper than aminmax past 16K values
                        torch.amin(t, dim=(), out=lo)
                        torch.amax(t, dim=(), out=hi)
                else:  # out= must match the input's dtype
                    norm.copy_(torch.linalg.vector_norm(t, dtype=torch.float32))
                    if absmax is not None:
                        low, high = torch.aminmax(t)
                        lo.copy_(low)
                        hi.copy_(high)
            norms.index_copy_(0, self.large_index, rows[:, 0])
            if absmax is not None:
                absmax.index_copy_(0, self.large_index, torch.maximum(rows[:, 1].neg(), rows[:, 2]))
        return norms, absmax


class WeightSnapshot:
    """The watched weights before a sampled optimizer step, kept within a memory bound, for ‖Δw‖ / ‖w‖ after it.

    A full copy of the watched weights would cost as much memory as the weights themselves, at the step's peak.
    A tensor of at most ``min_elements`` elements is copied whole (exact); a larger one keeps every ``s``-th
    element of its flat view, ``s <= n // k`` with ``k = max(min_elements, fraction * n)`` and ``s`` coprime with
    the row length (so every column of every row is visited): about ``fraction`` of its bytes, at least
    ``min_elements``. The squared norms of the kept elements are scaled by ``n / k'``
    (``k'`` kept), so that sums over several tensors (a module's weight and bias, all layers) stay estimates
    of the whole tensors' sums.

    The ratio of a sampled tensor is the ratio of two sums over the same ``k'`` elements, so its relative
    error is about ``cv / sqrt(k')``, where ``cv`` is the coefficient of variation of the per-element ratios
    ``Δw_i² / w_i²`` weighted by ``w_i²``; on trained weights after Adam and SGD steps this is within a few
    percent at ``k' >= 1024`` (``tests/test_update_ratio.py`` measures it against the full copy). Elements are
    taken at a fixed stride across the whole flat tensor, so every row (unit) of a weight matrix contributes.

    The kept elements are views of the parameters' memory, made once and reused while a parameter keeps its
    storage. A parameter in another memory layout (``channels_last`` weights) is read in its layout; one
    whose elements do not fill one dense block of memory is copied whole.

    Blocks of neighbouring elements (one cache line each) would make the two copies of a sampled step about
    0.3-0.5 ms cheaper on a deep MLP's 128 tensors, but they are worth fewer independent elements: on a
    convolution and an embedding after SGD steps the largest error doubled (0.06 -> 0.13), so single
    elements are kept.

    Args:
        fraction: share of a large tensor's elements kept (``1.0``: copy everything, exact).
        min_elements: tensors up to this size are copied whole; larger ones keep at least this many elements.

    Example:
        >>> w = torch.arange(1.0, 10001.0)
        >>> snap = WeightSnapshot(fraction=0.01, min_elements=1000)
        >>> snap.take([w])
        >>> snap.kept_elements
        1000
        >>> with torch.no_grad():
        ...     _ = w.mul_(1.01)
        >>> before_sq, delta_sq = snap.norms_sq([w])
        >>> round(float((delta_sq / before_sq).sqrt()), 6)  # every element moved by 1%
        0.01
    """

    def __init__(self, fraction: float = 0.01, min_elements: int = 1024) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"WeightSnapshot: fraction must be in (0, 1], got {fraction!r}.")
        if min_elements < 1:
            raise ValueError(f"WeightSnapshot: min_elements must be >= 1, got {min_elements!r}.")
        self.fraction = float(fraction)
        self.min_elements = int(min_elements)
        self._strides: Optional[List[int]] = None
        self._scale: Optional[torch.Tensor] = None
        self._kept: Any = None  # one flat tensor, or one tensor per parameter
        self._views: List[torch.Tensor] = []
        self._view_storages: Optional[List[int]] = None
        self._lengths: Optional[torch.Tensor] = None
        self._flat = False
        #: elements held by the last snapshot (its memory is this times the element size)
        self.kept_elements = 0

    def _stride(self, t: torch.Tensor) -> int:
        n = t.numel()
        keep = max(self.min_elements, int(math.ceil(self.fraction * n)))
        if n <= keep or dense_flat_view(t) is None:
            return 1
        # coprime with the row length, so the kept elements run through every column of every row: a stride
        # that divides it would keep a few input columns only, whose updates need not be typical
        row = n // t.shape[0] if t.dim() >= 2 and t.shape[0] > 0 else 1
        stride = n // keep
        while stride > 1 and math.gcd(stride, row) != 1:
            stride -= 1
        return stride

    @staticmethod
    def _view(t: torch.Tensor, stride: int) -> torch.Tensor:
        """A flat view of the kept elements of ``t``'s memory (``t`` itself where its elements are not one
        dense block of memory: copied whole). A view, never a copy: it must see the optimizer's update."""
        flat = dense_flat_view(local_tensor(t.detach()))
        if flat is None:
            return local_tensor(t.detach())
        return flat if stride == 1 else flat[stride // 2::stride]

    def _views_of(self, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The kept elements of ``params`` as views, built once and reused while the parameters keep their
        storage (optimizers update in place; a moved or re-created parameter gets new views)."""
        # where each parameter's data starts: a moved or re-created parameter starts elsewhere (a tensor's own
        # data_ptr costs a fraction of building its storage object, which matters on hundreds of parameters)
        storages = [p.data_ptr() for p in local_tensors(params)]
        if self._strides is None or len(self._strides) != len(params):
            self._strides = [self._stride(local_tensor(p)) for p in params]
            self._scale = self._lengths = None
            self._view_storages = None
        if storages != self._view_storages:
            self._views = [self._view(p, s) for p, s in zip(params, self._strides)]
            self._view_storages = storages
            self._flat = bool(self._views) and all(v.dtype == torch.float32 and v.device == self._views[0].device
                                                   and v.dim() == 1 for v in self._views)
        return self._views

    def take(self, params: Sequence[torch.Tensor]) -> None:
        """Copy the kept elements of ``params`` (before the optimizer step)."""
        views = self._views_of(params)
        # float32 on one device: one flat copy, reduced per tensor with two segment sums after the step;
        # otherwise one fused copy per tensor (mixed dtypes cannot share a buffer)
        self._kept = torch.cat(views) if self._flat else (torch._foreach_mul(views, 1.0) if views else [])
        self.kept_elements = sum(v.numel() for v in views)

    @property
    def pending(self) -> bool:
        """Whether a snapshot is waiting for :meth:`norms_sq`."""
        return self._kept is not None

    def norms_sq(self, params: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(‖w_before‖², ‖w_after − w_before‖²)`` per parameter (estimates for sampled tensors), on the device.

        Frees the snapshot; call once after the optimizer step with the same parameters as :meth:`take`.
        """
        if self._kept is None or self._strides is None:
            raise RuntimeError("WeightSnapshot.norms_sq: no snapshot was taken; call take(params) before the step.")
        kept, self._kept = self._kept, None
        views = self._views_of(params)
        device = views[0].device
        if self._scale is None or self._scale.device != device:
            sizes = [v.numel() for v in views]
            scale = [local_tensor(p).numel() / max(k, 1) for p, k in zip(params, sizes)]
            self._scale = torch.tensor(scale, dtype=torch.float32, device=device)
            self._lengths = torch.tensor(sizes, dtype=torch.long, device=device)
        if isinstance(kept, torch.Tensor):
            before_sq = torch.segment_reduce(kept * kept, "sum", lengths=self._lengths)
            kept.sub_(torch.cat(views))  # in place: the copy becomes -Δw
            delta_sq = torch.segment_reduce(kept * kept, "sum", lengths=self._lengths)
        else:
            before_sq = fused_norms(kept).square()
            torch._foreach_sub_(kept, views)  # in place: the copy becomes -Δw, no second allocation
            delta_sq = fused_norms(kept).square()
        return before_sq * self._scale, delta_sq * self._scale


class GradientReader:
    """Per-parameter gradient rows and histograms of a fixed list of parameters (their local shards).

    Args:
        params: the watched parameters; their gradients are read where they live.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> w.grad = torch.tensor([1.0, -2.0, 2.0])
        >>> GradientReader([w]).gradient_rows()[:, 0].tolist()  # squared norm, absmax, non-finite, present
        [9.0, 2.0, 0.0, 1.0]
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        # counting non-finite values is cheap on an accelerator, where reading the norms first would stall
        self.counts_on_device = bool(self.params) and self.params[0].device.type == "cuda"
        self._index_cache: Optional[Tuple[Tuple[int, ...], torch.Tensor]] = None
        self._plan_cache: Optional[Tuple[Tuple[int, ...], ShapePlan]] = None
        self._param_plan: Optional[ShapePlan] = None

    def _plan(self, present: List[int], grads: Sequence[torch.Tensor]) -> "ShapePlan":
        """The CPU reduction plan of the gradients present (cached: the same ones step after step)."""
        key = tuple(present)
        if self._plan_cache is None or self._plan_cache[0] != key or self._plan_cache[1].device != grads[0].device:
            self._plan_cache = (key, ShapePlan(grads))
        return self._plan_cache[1]

    @torch.no_grad()
    def parameter_norms(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The norm of each of ``params`` (the watched parameters' local tensors, in order), float32 on their
        device: fused kernels on CUDA, stacks by shape on the CPU (see :class:`ShapePlan`)."""
        if params[0].device.type == "cuda":
            return fused_norms(list(params))
        if self._param_plan is None or self._param_plan.device != params[0].device:
            self._param_plan = ShapePlan(params)
        return self._param_plan.reduce(params)[0]

    @torch.no_grad()
    def gradient_rows(self) -> torch.Tensor:
        """[4, P]: squared norm, absmax, non-finite count, present flag of each parameter's gradient."""
        device = self.params[0].device
        rows = torch.zeros(4, len(self.params), device=device, dtype=torch.float32)
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not present:
            return rows
        params = self.params
        grads = local_tensors([params[i].grad for i in present])  # read under no_grad: no detach needed
        index = self._index(present, device)
        if device.type == "cuda":  # fused multi-tensor kernels: a few launches whatever the count
            norms = fused_norms(grads)
            absmax = fused_norms(grads, float("inf"))
        else:  # ord=inf norms are ~10x slower than one pass on the CPU, and each call costs microseconds
            norms, absmax = self._plan(present, grads).reduce(grads, with_absmax=True)
        rows[0].index_copy_(0, index, norms.square())
        rows[1].index_copy_(0, index, absmax)
        if self.counts_on_device:
            counts = torch.stack([(~torch.isfinite(g)).sum().float() for g in grads])
        else:
            # On the CPU a full isfinite pass costs ~10x a norm, while reading the norms costs nothing (no
            # device to wait for): count only the gradients whose norm says there is something to count.
            counts = torch.zeros(len(grads))
            for j, norm in enumerate(norms.tolist()):
                if not math.isfinite(norm):
                    counts[j] = float((~torch.isfinite(grads[j])).sum())
        rows[2].index_copy_(0, index, counts.to(device))
        rows[3].index_fill_(0, index, 1.0)
        return rows

    def _index(self, present: List[int], device: torch.device) -> torch.Tensor:
        """Index tensor of the gradients present, cached: building it is a host-to-device copy."""
        key = tuple(present)
        if self._index_cache is None or self._index_cache[0] != key or self._index_cache[1].device != device:
            self._index_cache = (key, torch.tensor(present, device=device))
        return self._index_cache[1]

    def histogram_rows(self, tensors: Iterable[Optional[torch.Tensor]]) -> torch.Tensor:
        """One histogram row (:func:`lightwatch.core.histogram.histogram_row`) per tensor; zeros for None."""
        device = self.params[0].device
        rows = []
        for t in tensors:
            if t is None:
                rows.append(torch.zeros(6 + HIST_BINS, device=device))
            else:
                rows.append(histogram_row(local_tensor(t.detach()), HIST_BINS).to(device))
        return torch.stack(rows)


def group_norms(groups: Sequence[Tuple[str, List[int]]], grad_sq: Sequence[float], nonfinite: Sequence[float],
                present: Sequence[float]) -> List[Tuple[str, float, float]]:
    """``(name, gradient norm, non-finite count)`` of each group with a gradient: what picks the groups that
    are written (the largest norms, and every non-finite one) before :func:`group_stats` builds their rows.

    Example:
        >>> group_norms([("net.0", [0, 1]), ("net.1", [2])], [9.0, 16.0, 1.0], [0.0, 0.0, 2.0], [1.0, 1.0, 0.0])
        [('net.0', 5.0, 0.0)]
    """
    sqrt = math.sqrt
    out: List[Tuple[str, float, float]] = []
    for name, idx in groups:
        if len(idx) == 1:  # per-parameter grouping, the default: no inner loop
            i = idx[0]
            if present[i]:
                out.append((name, sqrt(grad_sq[i]), nonfinite[i]))
        elif any(present[i] for i in idx):
            out.append((name, sqrt(sum(grad_sq[i] for i in idx)), sum(nonfinite[i] for i in idx)))
    return out


def group_stats(groups: Sequence[Tuple[str, List[int]]], grad_sq: Sequence[float], absmax: Sequence[float],
                nonfinite: Sequence[float], present: Sequence[float], p_sq: Sequence[float],
                before_sq: Sequence[float], delta_sq: Sequence[float]) -> List[Tuple[str, Dict[str, float]]]:
    """Per group of parameters (host numbers, reduced over ranks): the statistics written as scalars.

    Norms combine over the group's tensors; groups without any gradient are left out.

    Example:
        >>> [(name, stats["grad.norm"]) for name, stats in group_stats(
        ...     [("net.0", [0, 1])], [9.0, 16.0], [2.0, 3.0], [0, 0], [1, 1], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0])]
        [('net.0', 5.0)]
    """
    subjects: List[Tuple[str, Dict[str, float]]] = []
    sqrt = math.sqrt
    for name, idx in groups:
        # one pass over the group's tensors (a sampled step goes through every watched module here)
        seen = False
        g = bad = p = before = delta = 0.0
        a = -math.inf
        for i in idx:
            seen = seen or bool(present[i])
            g += grad_sq[i]
            a = absmax[i] if absmax[i] > a or absmax[i] != absmax[i] else a
            bad += nonfinite[i]
            p += p_sq[i]
            before += before_sq[i]
            delta += delta_sq[i]
        if not seen:
            continue
        before, delta = sqrt(before), sqrt(delta)
        subjects.append((name, {
            "grad.norm": sqrt(g),
            "grad.absmax": a,
            "grad.nonfinite": bad,
            "param.norm": sqrt(p),
            "param.update_ratio": delta / before if before > 0 else (0.0 if delta == 0 else float("inf")),
        }))
    return subjects


def ring_summary(ring: Sequence[float]) -> Tuple[float, float]:
    """The largest global gradient norm of the steps in the ring (squared norms; NaN counts as largest) and how
    many steps had a non-finite one.

    Example:
        >>> ring_summary([4.0, 0.0, 9.0])
        (3.0, 0.0)
    """
    filled = [v for v in ring if v != 0.0]
    norm_max = math.sqrt(max(filled, key=lambda v: float("inf") if v != v else v)) if filled else 0.0
    return norm_max, float(sum(1 for v in ring if not math.isfinite(v)))
