"""``class_imbalance``: the rarest class of the training labels far below a uniform share, and no accident.

The rarest class below ``ratio`` of a uniform share (healthy digits: >= 0.87; harmful imbalance: 0.06), and
rarer than a balanced sample of that size would make it (chance < ``alpha`` over the C classes). Judged only
for classification targets, one label per sample: per-token or per-pixel labels are Zipfian or
background-heavy by nature, and their positions are no independent samples.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from lightwatch.checks.data.base import CheckContext, DataCheck

__all__ = ["ClassImbalance", "rarest_class_chance"]


def rarest_class_chance(count: int, total: float, classes: int) -> float:
    """Chance that a balanced sample of ``total`` labels over ``classes`` classes has a class with at most ``count``
    labels: ``C * P(Poisson(total / C) <= count)`` (a union bound, capped at 1). With many classes and few labels
    per class a rare class is expected (1,000 classes, 5 labels each: some class has none about 99% of the
    time); a class made rare on purpose or by a bug is far below that.

    Example:
        >>> round(rarest_class_chance(0, 5000, 1000), 2)
        1.0
        >>> rarest_class_chance(3, 1000, 10) < 1e-30
        True
    """
    lam = total / classes
    if lam <= 0:
        return 1.0
    log_terms = [-lam + i * math.log(lam) - math.lgamma(i + 1) for i in range(count + 1)]
    top = max(log_terms)
    cdf = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, classes * cdf)


class ClassImbalance(DataCheck):
    """A training split whose rarest class holds less than ``ratio`` of a uniform share, with chance below ``alpha``.

    Epoch tier; judged once per target, on the first training epoch (or the scan).

    Example:
        >>> check = ClassImbalance()
        >>> check["ratio"], check["alpha"]
        (0.2, 0.001)
    """

    name = "class_imbalance"
    tier = "epoch"
    defaults = {"ratio": 0.2, "alpha": 1e-3}
    bounds = {"ratio": (0.0, 1.0, False), "alpha": (0.0, 1.0, False)}

    def judge_field(self, ctx: CheckContext, spec: Any, counts: torch.Tensor, total: float, classes: int,
                    class_source: str) -> None:
        """Alert when the rarest of ``classes`` classes in ``counts`` (``total`` labels) is too rare."""
        freq = counts / total
        rarest = int(torch.argmin(freq))
        chance = rarest_class_chance(int(counts[rarest]), total, classes)
        if not (self.enabled and float(freq[rarest]) < self["ratio"] / classes and chance < self["alpha"]):
            return
        self.alert(ctx, subject=f"{ctx.split}/{spec.name}", value=float(freq[rarest]),
                   threshold=self["ratio"] / classes, message=(
                       f"class {rarest} of {ctx.split} target {spec.name!r} has {100 * float(freq[rarest]):.3g}% of "
                       f"the labels ({int(counts[rarest])} of {int(total)}), less than {self['ratio']:g} of "
                       f"a uniform share over {classes} classes, and rarer than a balanced sample of "
                       f"{int(total)} labels makes its rarest class (chance {chance:.2g}). Consider class "
                       f"weights or resampling, and per-class metrics." + (
                           f" The class count was inferred from the largest label ({classes - 1}) and class "
                           f"{rarest} never occurs: a label above the real class range (see "
                           f"data_label_range) gives this too."
                           if counts[rarest] == 0 and "inferred" in class_source else "")))
