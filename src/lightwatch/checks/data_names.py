"""The built-in data checks of ``DataQualityMonitor`` by name: the one table of them, readable without torch.

Each line names a check and its class, as ``"<module>.<Class>"`` under :mod:`lightwatch.checks.data`. The
registry (:mod:`lightwatch.checks.data.registry`) imports the classes from it, and the Hydra schema
``DataChecksConf`` (:mod:`lightwatch.hydra_schemas`) has one field per name, so a Hydra app reads the names
without importing torch. This module imports nothing, and sits beside the ``lightwatch.checks.data`` package
rather than in it because importing anything in that package runs its ``__init__``, which imports torch.

Example:
    >>> list(BUILTIN_DATA_CHECKS)[:3], BUILTIN_DATA_CHECKS["schema"]
    (['nonfinite', 'label_range', 'out_of_range'], 'schema.SchemaChange')
"""
from __future__ import annotations

from typing import Dict

__all__ = ["BUILTIN_DATA_CHECKS"]

#: Every built-in data check, ``name -> "<module>.<Class>"`` under ``lightwatch.checks.data``: per-batch tier
#: first, in the order they are documented, run and configured.
BUILTIN_DATA_CHECKS: Dict[str, str] = {
    "nonfinite": "nonfinite.NonFinite",
    "label_range": "label_range.LabelRange",
    "out_of_range": "out_of_range.OutOfRange",
    "schema": "schema.SchemaChange",
    "empty_batch": "empty_batch.EmptyBatch",
    "unnormalised": "unnormalised.Unnormalised",
    "drift": "drift.Drift",
    "drift_ref": "drift_ref.DriftRef",
    "label_shift": "label_shift.LabelShift",
    "label_shift_ref": "label_shift_ref.LabelShiftRef",
    "constant": "constant.Constant",
    "duplicates": "duplicates.Duplicates",
    "leakage": "leakage.Leakage",
    "class_imbalance": "class_imbalance.ClassImbalance",
    "labels_unrelated": "labels_unrelated.LabelsUnrelated",
    "padding_in_loss": "padding_in_loss.PaddingInLoss",
}
