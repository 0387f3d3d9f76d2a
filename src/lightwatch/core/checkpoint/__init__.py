"""Checkpointing, in parts that need no Lightning import and can be tested alone:

- :mod:`~lightwatch.core.checkpoint.selection`: what to save and keep (top-k, last, thresholds, alert saves,
  healthy marks and pinned rollback points);
- :mod:`~lightwatch.core.checkpoint.schedule`: when a check is due;
- :mod:`~lightwatch.core.checkpoint.store`: how files and ``manifest.json`` are committed, verified and deleted;
- :mod:`~lightwatch.core.checkpoint.integrity`: a file checked against its record before it is loaded, a
  ``dirpath`` checked at construction;
- :mod:`~lightwatch.core.checkpoint.naming`: file names from templates;
- :mod:`~lightwatch.core.checkpoint.trainer`: the steps of a save taken through a running Trainer (duck-typed);
- :mod:`~lightwatch.core.checkpoint.report`: the callback's warnings (alert records), the scalars and text of a
  save, and whether a save may follow an exception;
- :mod:`~lightwatch.core.checkpoint.action`: the ``checkpoint`` action and the :class:`CheckpointTarget` protocol;
- :mod:`~lightwatch.core.checkpoint.attributes`: attributes kept by a part, or computed unless assigned.

``lightwatch.callbacks.MetricCheckpoint`` is the Lightning adapter over these parts.
"""
from lightwatch.core.checkpoint.action import CheckpointTarget, checkpoint_targets, request_checkpoint
from lightwatch.core.checkpoint.errors import CheckpointIntegrityError, CheckpointSaveError, CheckpointWarning

__all__ = ["CheckpointIntegrityError", "CheckpointSaveError", "CheckpointTarget", "CheckpointWarning", "checkpoint_targets",
           "request_checkpoint"]
