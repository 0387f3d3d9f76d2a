"""``nonfinite``: NaN or Inf values in a batch field, counted per feature."""
from __future__ import annotations

from typing import Any, List

from lightwatch.checks.data.base import CheckContext, DataCheck

__all__ = ["NonFinite"]


class NonFinite(DataCheck):
    """Non-finite values (NaN/Inf) per feature of every floating field, with the first step holding one.

    Per-batch tier: the monitor counts them on the device for every batch and judges the counts, reduced
    over the ranks, at each logged step.

    Example:
        >>> check = NonFinite(action="stop")
        >>> check.rule, check.tier, check.severity
        ('data_nonfinite', 'batch', 'error')
    """

    name = "nonfinite"
    tier = "batch"
    severity = "error"

    def judge_field(self, ctx: CheckContext, spec: Any, counts: List[float], where: str, at: int,
                    loose: float = 0.0) -> None:
        """Alert on the non-finite ``counts`` (one per feature) of field ``spec``; ``loose``: those found in
        batches whose variable feature dimension had another size, which belong to no single feature."""
        if not self.enabled:
            return
        bad = sorted(((c, j) for j, c in enumerate(counts) if c > 0), reverse=True)
        listed = ", ".join(f"{spec.label(j)} ({int(c)})" for c, j in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if loose > 0:  # no per-feature attribution for these
            listed = (listed + ", " if listed else "") + f"{int(loose)} in batches of another length along " \
                f"dimension {spec.feature_dim}"
        subject = f"{ctx.split}/{spec.label(bad[0][1])}" if bad else f"{ctx.split}/{spec.name}"
        self.alert(ctx, subject=subject, value=sum(counts) + loose, step=at, message=(
            f"{int(sum(counts) + loose)} non-finite value(s) (NaN/Inf) in {ctx.split} {spec.role} {spec.name!r}, "
            f"{where}; feature(s): {listed}. Check the data source and the transforms (a division by zero, a log "
            f"of 0, a failed normalisation, or missing values read as NaN)."))
