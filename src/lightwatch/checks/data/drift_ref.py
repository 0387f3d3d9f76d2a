"""``drift_ref``: per-feature drift of any split against the reference profile."""
from __future__ import annotations

from lightwatch.checks.data.drift import Drift

__all__ = ["DriftRef"]


class DriftRef(Drift):
    """:class:`~lightwatch.checks.data.drift.Drift` against the reference profile (``reference=``), for every split.

    Example:
        >>> DriftRef().rule, DriftRef.suffix
        ('data_drift_ref', '_ref')
    """

    name = "drift_ref"
    suffix = "_ref"
