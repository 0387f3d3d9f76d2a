"""The data checks of :class:`~lightwatch.callbacks.DataQualityMonitor`, one small class each.

:class:`DataCheck` is the protocol (settings, per-batch observation, states reduced across ranks, judgement,
alert); :data:`BUILTIN_CHECKS` names the built-in ones. The monitor's machinery lives beside them: the fields
of a batch (:mod:`.fields`, :mod:`.discovery`), buffers and per-split state (:mod:`.buffers`), the per-batch counters
(:mod:`.counters`), the first-batch checks (:mod:`.first_batch`), the distribution tier and the profile
(:mod:`.distribution`), the scan before training (:mod:`.scan`), custom checks (:mod:`.custom`), the
explanation of a crash (:mod:`.crash`) and the state kept in checkpoints (:mod:`.state`).
"""
from lightwatch.checks.data.base import CheckContext, DataCheck
from lightwatch.checks.data.registry import BUILTIN_CHECKS, builtin_check, check_table, parse_checks

__all__ = ["BUILTIN_CHECKS", "CheckContext", "DataCheck", "builtin_check", "check_table", "parse_checks"]
