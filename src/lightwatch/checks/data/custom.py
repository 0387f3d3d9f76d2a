"""Checks that implement the protocol in the data monitor: fed every batch, reduced across ranks, judged, reset.

These are the custom checks passed in ``checks=``, and built-in checks that keep states of their own
(:meth:`~lightwatch.checks.data.base.DataCheck.implements_protocol`). Each split keeps a copy of every such
check (made on the split's first batch, states on its device). The monitor calls
:meth:`~lightwatch.checks.data.base.DataCheck.update` with the batch's fields, and judges the checks of tier
``batch`` at each logged step and those of both tiers at the end of each epoch of the split (and of the scan
before training). Their states are reduced in one SUM and one MAX all-reduce per judgement.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from lightwatch.checks.data.base import DataCheck
from lightwatch.checks.data.buffers import SplitState
from lightwatch.core.reduce import all_reduce_flat

__all__ = ["CustomChecks", "reduce_states"]

_F64 = torch.float64


def reduce_states(checks: Sequence[DataCheck], device: Any) -> List[Dict[str, torch.Tensor]]:
    """The states of ``checks``, reduced over the ranks with each state's reduction, as host tensors.

    Every rank must call it with the same checks (states of the same shapes): it runs one SUM and one MAX
    all-reduce (``min`` states travel negated in the MAX).

    Example:
        >>> import torch
        >>> class Count(DataCheck):
        ...     name = "count"
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.add_state("rows", torch.zeros(()), reduce="sum")
        ...         self.add_state("low", torch.full((), float("inf")), reduce="min")
        >>> check = Count()
        >>> check.rows += 5
        >>> check.low = torch.tensor(2.0)
        >>> {k: float(v) for k, v in reduce_states([check], "cpu")[0].items()}
        {'rows': 5.0, 'low': 2.0}
    """
    entries = [(i, name, getattr(check, name), op) for i, check in enumerate(checks)
               for name, op in check.states.items()]

    def flat(ops: Sequence[str]) -> torch.Tensor:
        parts = [(-t if op == "min" else t).detach().to(device=device, dtype=_F64).reshape(-1)
                 for _, _, t, op in entries if op in ops]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=_F64, device=device)

    sums, maxes = flat(("sum",)), flat(("max", "min"))
    all_reduce_flat(sums, maxes)
    host = {"sum": sums.cpu(), "max": maxes.cpu()}
    offsets = {"sum": 0, "max": 0}
    out: List[Dict[str, torch.Tensor]] = [{} for _ in checks]
    for i, name, t, op in entries:
        key = "sum" if op == "sum" else "max"
        n = t.numel()
        value = host[key][offsets[key]:offsets[key] + n].reshape(t.shape)
        offsets[key] += n
        out[i][name] = (-value if op == "min" else value).to(t.dtype)
    return out


class CustomChecks:
    """The part of :class:`~lightwatch.callbacks.DataQualityMonitor` that feeds and judges the checks that
    implement the protocol (custom checks passed in ``checks=``, built-in checks with states of their own).

    Example:
        >>> import torch
        >>> from lightwatch.checks.data.buffers import SplitState
        >>> split = SplitState("train", "step")  # no custom checks: nothing to judge, no collective
        >>> CustomChecks()._judge_custom(None, None, split, ("batch",), 0, None)
    """

    def _update_custom(self, sp: SplitState, parts: Sequence[Optional[torch.Tensor]]) -> None:
        """Feed one batch's usable fields (the rows that are data) to the split's custom checks."""
        fields = {s.name: p for s, p in zip(sp.specs or [], parts) if p is not None}
        for check in sp.driven:
            if check.enabled:
                check.update(sp.name, fields)

    def _judge_custom(self, trainer: Any, pl_module: Any, sp: SplitState, tiers: Sequence[str], step: int,
                   scalars: Optional[Dict[str, float]]) -> None:
        """Reduce, judge and reset the split's custom checks of ``tiers``; their scalars go into ``scalars`` (or are
        written at ``step`` when it is ``None``)."""
        checks = [c for c in sp.driven if c.enabled and c.tier in tiers]
        if not checks:
            return
        found: Dict[str, float] = {} if scalars is None else scalars
        for check, state in zip(checks, reduce_states(checks, sp.device or torch.device("cpu"))):
            ctx = self._context(trainer, pl_module, sp.name, step, found)
            ctx.state = state
            try:
                check.judge(ctx)
            finally:
                check.reset()
        if scalars is None and found and self._scan is None:
            self.writer.write_scalars(trainer, found, step)
