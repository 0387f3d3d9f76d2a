"""``out_of_range``: values outside given, reference or learned per-feature ranges."""
from __future__ import annotations

import math
from typing import Any, List, Tuple

from lightwatch.checks.data.base import CheckContext, DataCheck

__all__ = ["OutOfRange"]


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class OutOfRange(DataCheck):
    """Values outside the per-feature ranges of a numeric field.

    Per-batch tier. Given ranges (``ranges=``) are hard: any value outside is reported. Ranges from a reference
    profile or learned over the first training epoch are widened by ``margin`` x their width, and a field is
    reported when more than ``tolerance`` of its values (at least 10 per reference sample count) fall outside.

    Example:
        >>> check = OutOfRange(margin=0.5)
        >>> check.widen(([0.0], [1.0]))
        [(-0.5, 1.5)]
    """

    name = "out_of_range"
    tier = "batch"
    defaults = {"margin": 0.1, "tolerance": 1e-3}
    bounds = {"margin": (0.0, math.inf, True), "tolerance": (0.0, 1.0, True)}

    def widen(self, minmax: Tuple[List[float], List[float]]) -> List[Tuple[float, float]]:
        """Per-feature ``(lo, hi)`` from observed minima and maxima, widened by ``margin`` x the width."""
        bounds = []
        for lo, hi in zip(*minmax):
            if not (math.isfinite(lo) and math.isfinite(hi)):
                bounds.append((-math.inf, math.inf))  # no finite reference value: nothing to check against
                continue
            pad = self["margin"] * (hi - lo)
            bounds.append((lo - pad, hi + pad))
        return bounds

    def tolerance_for(self, ranges: Any) -> float:
        """The share of values that may fall outside ``ranges`` before an alert (0 for hard ranges)."""
        return 0.0 if ranges.hard else max(self["tolerance"], 10.0 / max(ranges.n_ref, 1))

    def judge_field(self, ctx: CheckContext, spec: Any, counts: List[float], frac: float, tolerance: float,
                    ranges: Any, where: str, at: int) -> None:
        """Alert on the per-feature ``counts`` of values of ``spec`` outside ``ranges`` (``frac`` of all)."""
        if not self.enabled:
            return
        bad = sorted(((c, j) for j, c in enumerate(counts) if c > 0), reverse=True)
        listed = ", ".join(
            f"{spec.label(j)} ({int(c)} outside [{_fmt(ranges.bounds[j][0])}, {_fmt(ranges.bounds[j][1])}])"
            for c, j in bad[:4]) + (" ..." if len(bad) > 4 else "")
        self.alert(ctx, subject=f"{ctx.split}/{spec.label(bad[0][1])}", value=frac, threshold=tolerance, step=at,
                   message=(f"{100 * frac:.3g}% of the values of {ctx.split} {spec.role} {spec.name!r} are outside "
                            f"the ranges from {ranges.source}, {where}: {listed}. Unnormalised or differently scaled "
                            f"data (0-255 vs 0-1, other units) is the usual cause."))
