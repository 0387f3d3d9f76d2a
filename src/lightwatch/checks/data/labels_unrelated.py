"""``labels_unrelated``: training labels no nearer to their inputs' nearest neighbours' labels than chance.

Leave-one-out 1-NN agreement on the scanned training batches, z against chance below ``min_z`` over at least
``min_rows`` rows. Healthy digits z ~100, shuffled labels |z| < 3, 70% label noise z ~11. ``info``: inputs whose
raw distances mean little (raw audio, say) read near chance too; the not-learning check raises it when the
loss stays up.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from lightwatch.checks.data.base import CheckContext, DataCheck

__all__ = ["LabelsUnrelated"]


class LabelsUnrelated(DataCheck):
    """Labels that look unrelated to their inputs (shuffled or misaligned), from the scan before training only.

    Scan tier: the monitor samples rows of the first floating input and the class labels while it scans,
    reduces the agreement sums over the ranks, and judges the score once.

    Example:
        >>> check = LabelsUnrelated()
        >>> check.severity, check.action, check["min_z"]
        ('info', 'log', 3.0)
    """

    name = "labels_unrelated"
    tier = "scan"
    action = "log"
    severity = "info"
    defaults = {"min_z": 3.0, "min_rows": 200}
    bounds = {"min_z": (0.0, math.inf, True), "min_rows": (10.0, 1e6, True)}

    def judge_score(self, ctx: CheckContext, found: Mapping[str, Any]) -> None:
        """Alert when the agreement score ``found`` (rows, agreement, chance, z) is no better than chance."""
        if found["rows"] < self["min_rows"] or not found["z"] < self["min_z"]:
            return
        self.alert(ctx, subject="train/_all", value=found["z"], threshold=self["min_z"], step=0, message=(
            f"the training labels look unrelated to the inputs: the nearest neighbour (standardised inputs) "
            f"of a training sample carries the same label for {found['agreement']:.1%} of "
            f"{int(found['rows'])} scanned samples, which is chance ({found['chance']:.1%}; z = "
            f"{found['z']:.2g}). Likely: labels shuffled or misaligned with their inputs (a sort or a "
            f"shuffle applied to one of them, a join on the wrong key). Fine for inputs whose raw "
            f"distances mean little (token ids, raw audio); if the loss then does not fall, this is the "
            f"first thing to check."))
