"""Gradient statistics of many parameters read on their device in a few fused calls, with no host sync."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from lightwatch.core.histogram import HIST_BINS, histogram_row
from lightwatch.core.runtime import local_tensor

__all__ = ["GradientReader", "fused_norms", "group_stats", "ring_summary"]


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

    def gradient_rows(self) -> torch.Tensor:
        """[4, P]: squared norm, absmax, non-finite count, present flag of each parameter's gradient."""
        device = self.params[0].device
        rows = torch.zeros(4, len(self.params), device=device, dtype=torch.float32)
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not present:
            return rows
        grads = [local_tensor(self.params[i].grad.detach()) for i in present]
        index = self._index(present, device)
        norms = fused_norms(grads)
        if device.type == "cuda":
            absmax = fused_norms(grads, float("inf"))
        else:  # on the CPU ord=inf is ~10x slower than one aminmax pass
            extremes = [torch.aminmax(g) if g.numel() else (g.new_zeros(()), g.new_zeros(())) for g in grads]
            absmax = torch.maximum(torch.stack([lo for lo, _ in extremes]).float().neg(),
                                   torch.stack([hi for _, hi in extremes]).float())
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
    for name, idx in groups:
        if not any(present[i] for i in idx):
            continue
        before = math.sqrt(sum(before_sq[i] for i in idx))
        delta = math.sqrt(sum(delta_sq[i] for i in idx))
        subjects.append((name, {
            "grad.norm": math.sqrt(sum(grad_sq[i] for i in idx)),
            "grad.absmax": max(absmax[i] for i in idx),
            "grad.nonfinite": sum(nonfinite[i] for i in idx),
            "param.norm": math.sqrt(sum(p_sq[i] for i in idx)),
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
