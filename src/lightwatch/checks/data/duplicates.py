"""``duplicates``: exact copies of an earlier sample of the same epoch, within a split."""
from __future__ import annotations

from typing import Any, Mapping

from lightwatch.checks.data.base import CheckContext, DataCheck

__all__ = ["Duplicates"]


class Duplicates(DataCheck):
    """The share of a split's samples that repeat an earlier one (64-bit hashes of the inputs; ids excluded).

    Epoch tier; ``info`` above ``threshold``, the check's severity above ``warn_above``.

    Example:
        >>> check = Duplicates()
        >>> check["threshold"], check["warn_above"]
        (0.01, 0.5)
    """

    name = "duplicates"
    tier = "epoch"
    defaults = {"threshold": 0.01, "warn_above": 0.5}
    bounds = {"threshold": (0.0, 1.0, True), "warn_above": (0.0, 1.0, True)}

    def judge_split(self, ctx: CheckContext, d: Mapping[str, Any]) -> None:
        """Alert on the duplicate counts ``d`` (``samples``, ``duplicates``, ``duplicate_fraction``) of the split."""
        if not (self.enabled and d["samples"] and d["duplicate_fraction"] > self["threshold"]):
            return
        strong = d["duplicate_fraction"] > self["warn_above"]
        self.alert(ctx, subject=f"{ctx.split}/_all", value=float(d["duplicate_fraction"]),
                   threshold=self["warn_above"] if strong else self["threshold"], severity=self.graded(strong),
                   message=(f"{d['duplicates']} of the {d['samples']} {ctx.split} samples "
                            f"({100 * d['duplicate_fraction']:.3g}%) are exact copies of an earlier sample of the "
                            f"same epoch. Deduplicate the dataset, or check for an oversampling or indexing bug."))
