"""``label_shift``: the label distribution of an evaluation split against this run's training split."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from lightwatch.checks.data.base import CheckContext, DataCheck
from lightwatch.metrics import chi_squared, linf

__all__ = ["LabelShift"]


class LabelShift(DataCheck):
    """A label distribution that moved: total variation above ``floor`` *and* a chi-square p-value below ``alpha``.

    Epoch tier; judged only for classification targets, one label per sample.

    Example:
        >>> import torch
        >>> check = LabelShift()
        >>> shift, largest, pvalue, _, _ = check.compare(torch.tensor([50., 50.]), torch.tensor([90., 10.]))
        >>> round(shift, 2), round(largest, 2), pvalue < 1e-3
        (0.4, 0.4, True)
    """

    name = "label_shift"
    tier = "epoch"
    defaults = {"alpha": 1e-3, "floor": 0.1}
    bounds = {"alpha": (0.0, 1.0, False), "floor": (0.0, 1.0, True)}
    #: the suffix of its scalar (``label_shift``)
    suffix = ""

    @staticmethod
    def compare(other: torch.Tensor, mine: torch.Tensor) -> Tuple[float, float, float, torch.Tensor, torch.Tensor]:
        """``(total variation, largest class difference, chi-square p-value, other, mine)`` of two count vectors.

        The effect size is the share of label mass that moved (total variation distance), so a shift spread
        over many classes counts as much as one concentrated in a single class.
        """
        shift = 0.5 * float((other / other.sum() - mine / mine.sum()).abs().sum())
        largest = float(linf(other, mine))
        test = chi_squared(other, mine)
        return shift, largest, float(test.pvalue), other, mine

    def counts_against(self, counts: torch.Tensor, classes: int, ofp: Any) -> Optional[Tuple[torch.Tensor,
                                                                                              torch.Tensor]]:
        """``(other, mine)``: the label counts of field profile ``ofp`` and ``counts``, over the wider class range."""
        if ofp.labels is None:
            return None
        width = max(classes, ofp.num_classes or 0)
        other = torch.zeros(width, dtype=torch.float64)
        oc = ofp.labels.counts.to(torch.float64)[:width]
        other[:oc.numel()] = oc
        mine = torch.zeros(width, dtype=torch.float64)
        mine[:classes] = counts
        if float(other.sum()) <= 0:
            return None
        return other, mine

    def judge_field(self, ctx: CheckContext, spec: Any, compared: Tuple[float, float, float, torch.Tensor,
                                                                         torch.Tensor], what: str) -> None:
        """Alert on the result of :meth:`compare` for target ``spec`` against ``what``."""
        shift, largest, pvalue, other, mine = compared
        if not (self.enabled and shift > self["floor"] and pvalue < self["alpha"]):
            return
        width = other.numel()
        of, mf = (other / other.sum()).tolist(), (mine / mine.sum()).tolist()
        worst = sorted(range(width), key=lambda c: -abs(mf[c] - of[c]))[:4]
        listed = ", ".join(f"class {c}: {100 * mf[c]:.3g}% vs {100 * of[c]:.3g}%" for c in worst)
        self.alert(ctx, subject=f"{ctx.split}/{spec.name}", value=shift, threshold=self["floor"], message=(
            f"the label distribution of {ctx.split} target {spec.name!r} differs from {what}: "
            f"{100 * shift:.3g}% of the label mass moved (largest class difference "
            f"{100 * largest:.3g} points, chi-square p={pvalue:.3g}); {listed}. A "
            f"non-stratified or filtered split, or labels encoded differently."))
