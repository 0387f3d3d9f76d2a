"""``label_range``: integer labels outside ``[0, num_classes)`` (or negative), ``ignore_index`` excluded."""
from __future__ import annotations

import math
from typing import Any, Optional

from lightwatch.checks.data.base import CheckContext, DataCheck

__all__ = ["LabelRange"]


class LabelRange(DataCheck):
    """Labels outside the class range, counted per batch; also names the labels of a batch that crashed the loss.

    Per-batch tier. The class count is ``num_classes``, the module's, the reference's, or inferred from the
    first training epoch (evaluation splits before then: the largest training label so far plus one).

    Example:
        >>> LabelRange().rule, LabelRange.severity
        ('data_label_range', 'error')
    """

    name = "label_range"
    tier = "batch"
    severity = "error"

    def judge_field(self, ctx: CheckContext, spec: Any, count: float, classes: Optional[int], source: str,
                    ignore_index: Optional[int], largest: Optional[float], where: str, at: int) -> None:
        """Alert on ``count`` labels of target ``spec`` outside ``[0, classes)`` (``source``: where it comes from)."""
        if not self.enabled:
            return
        valid = f"[0, {classes})" if classes is not None else "non-negative values"
        source = f" ({source})" if classes is not None else ""
        ignore = f", ignore_index {ignore_index} excluded" if ignore_index is not None else ""
        seen = f" Largest label seen: {int(largest)}." if largest is not None and math.isfinite(largest) else ""
        self.alert(ctx, subject=f"{ctx.split}/{spec.name}", value=count, step=at,
                   threshold=None if classes is None else float(classes), message=(
                       f"{int(count)} label(s) of {ctx.split} target {spec.name!r} outside {valid}{source}{ignore}, "
                       f"{where}.{seen} Out-of-range labels crash cross-entropy on the CPU and trigger device-side "
                       f"asserts on CUDA; check the label encoding and num_classes."))

    def judge_crash(self, ctx: CheckContext, target: str, count: int, valid: str, where: str, listed: str,
                    exception: BaseException, classes: Optional[int]) -> None:
        """Alert on the labels of the batch the model was given when training failed with ``exception``."""
        self.alert(ctx, subject=f"{ctx.split}/{target}", value=float(count),
                   threshold=None if classes is None else float(classes), message=(
                       f"{count} label(s) of {ctx.split} target {target!r} outside {valid} in {where}, the "
                       f"batch the model was given when training failed ({type(exception).__name__}: "
                       f"{str(exception)[:160]}): label value(s) {listed}. An out-of-range label "
                       f"crashes cross-entropy on the CPU and triggers a device-side assert on CUDA; "
                       f"check the label encoding of the {ctx.split} data and num_classes."))
