"""``leakage``: evaluation samples that also occur in the training split (identical inputs)."""
from __future__ import annotations

from typing import Tuple

import torch

from lightwatch.checks.data.base import CheckContext, DataCheck

__all__ = ["Leakage"]


class Leakage(DataCheck):
    """Samples of an evaluation split whose input hash is among the training split's (this run's, the reference's).

    Epoch tier; reported when more than ``threshold`` of the split leaked.

    Example:
        >>> import torch
        >>> Leakage.measure(torch.tensor([1, 2, 3, 4]), torch.tensor([3, 9]))
        (1, 0.25)
    """

    name = "leakage"
    tier = "epoch"
    defaults = {"threshold": 0.0}
    bounds = {"threshold": (0.0, 1.0, True)}

    @staticmethod
    def measure(mine: torch.Tensor, references: torch.Tensor) -> Tuple[int, float]:
        """``(count, fraction)`` of the hashes ``mine`` found among ``references``."""
        count = int(torch.isin(mine, references).sum()) if mine.numel() else 0
        fraction = count / mine.numel() if mine.numel() else 0.0
        return count, fraction

    def judge_split(self, ctx: CheckContext, count: int, total: int, fraction: float, source: str) -> None:
        """Alert on ``count`` of ``total`` samples of the split also found in ``source``."""
        if not (self.enabled and count > 0 and fraction > self["threshold"]):
            return
        self.alert(ctx, subject=f"{ctx.split}/_all", value=fraction, threshold=self["threshold"], message=(
            f"{count} of the {total} {ctx.split} samples ({100 * fraction:.3g}%) also occur in "
            f"{source} (identical inputs): {ctx.split} metrics overstate generalisation. Split the "
            f"data before augmenting and deduplicate across splits."))
