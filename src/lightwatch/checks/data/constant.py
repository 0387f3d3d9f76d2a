"""``constant``: features that are constant in a split but vary in the split it is compared with."""
from __future__ import annotations

from typing import Any, List

import torch

from lightwatch.checks.data.base import CheckContext, DataCheck

__all__ = ["Constant"]


class Constant(DataCheck):
    """Features constant over a split's samples that vary in the training split or the reference, when no accident.

    Epoch tier. If the other split's fullest bin holds a share ``p`` of its values, ``n`` samples all landing in
    one bin has probability at most ``p ** (n - 1)``; only features below ``alpha`` are reported.

    Example:
        >>> Constant()["alpha"]
        0.001
    """

    name = "constant"
    tier = "epoch"
    defaults = {"alpha": 1e-3}
    bounds = {"alpha": (0.0, 1.0, False)}

    @staticmethod
    def constant_features(moments: Any, num_features: int) -> List[int]:
        """The features of computed ``moments`` with at least two values, all equal."""
        return [j for j in range(num_features)
                if int(moments["count"][j]) >= 2 and float(moments["max"][j]) == float(moments["min"][j])]

    def judge_field(self, ctx: CheckContext, spec: Any, constant: List[int], cur: Any, ofp: Any, what: str) -> None:
        """Alert on the ``constant`` features of ``spec`` in split profile ``cur`` that vary in field profile
        ``ofp``."""
        if not self.enabled or ofp.moments is None or ofp.histogram is None:
            return
        om = ofp.moments.compute()
        counts = ofp.histogram.binned_counts().to(torch.float64)
        share = (counts.max(1).values / counts.sum(1).clamp_min(1.0)).tolist()
        flagged = [j for j in constant if float(om["max"][j]) > float(om["min"][j])
                   and share[j] ** max(cur.samples - 1, 0) < self["alpha"]]
        if not flagged:
            return
        value = float(cur.fields[spec.name].moments.compute()["min"][flagged[0]])
        listed = ", ".join(spec.label(j) for j in flagged[:8]) + (" ..." if len(flagged) > 8 else "")
        self.alert(ctx, subject=f"{ctx.split}/{spec.label(flagged[0])}", value=value, message=(
            f"{len(flagged)} feature(s) of {ctx.split} {spec.role} {spec.name!r} are constant over "
            f"{cur.samples} samples but vary in {what}: {listed}. A dead sensor or column, a "
            f"blank image channel, or a preprocessing step that zeroes the feature."))


