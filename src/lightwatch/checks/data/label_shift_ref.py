"""``label_shift_ref``: the label distribution of any split against the reference profile."""
from __future__ import annotations

from lightwatch.checks.data.label_shift import LabelShift

__all__ = ["LabelShiftRef"]


class LabelShiftRef(LabelShift):
    """:class:`~lightwatch.checks.data.label_shift.LabelShift` against the reference profile, for every split.

    Example:
        >>> LabelShiftRef().rule, LabelShiftRef.suffix
        ('data_label_shift_ref', '_ref')
    """

    name = "label_shift_ref"
    suffix = "_ref"
