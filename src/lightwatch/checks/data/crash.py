"""What the data looked like when training failed: the labels of the last batch, and the pending counters.

``on_exception`` of the data monitor checks the batch the model was given last (its labels against the class
count: an out-of-range label crashes cross-entropy) and reads this rank's pending per-batch counters without a
collective (the other ranks may be elsewhere), recording what they show before the error propagates.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch

from lightwatch.checks.data.buffers import SplitState
from lightwatch.core.alerts import Alert, MonitorError, alert_log, severity_at_least
from lightwatch.core.runtime import is_global_zero, logging_step

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["CrashReport"]

logger = logging.getLogger("lightwatch")


class CrashReport:
    """The part of :class:`~lightwatch.callbacks.DataQualityMonitor` that explains a failed run from its data.

    Example:
        >>> class Probe(CrashReport):
        ...     _last_batch = None
        >>> Probe()._explain_crash(None, None, IndexError("Target 12 is out of bounds."))  # no batch: nothing to say
    """

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """Say what the data looked like before the failure: check the batch the model was given last (labels
        against the class count), read this rank's pending counters (no collective: the other ranks may be
        elsewhere) and record what they show, before the error propagates."""
        if isinstance(exception, Exception) and not isinstance(exception, MonitorError):
            try:
                self._explain_crash(trainer, pl_module, exception)
            except Exception as err:  # never mask the original failure
                logger.warning("lightwatch: DataQualityMonitor could not check the last batch: %s", err)
        if not isinstance(exception, MonitorError):
            for sp in self._splits.values():
                if sp.specs is not None and sp.pending:
                    try:
                        self._emergency_report(trainer, pl_module, sp)
                    except Exception as err:  # never mask the original failure
                        logger.warning("lightwatch: DataQualityMonitor could not report pending counters: %s", err)
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._last_batch = None  # do not keep a batch (device memory) alive after the run
        super().teardown(trainer, pl_module, stage)

    def _crash_classes(self, trainer: Any, pl_module: Any, split: str, name: str,
                       exception: BaseException) -> Tuple[Optional[int], str]:
        """The class count a crashing batch's labels are checked against, and where it comes from.

        Known counts first (``num_classes``, the module's ``num_classes``, the reference, the first training
        epoch; for evaluation splits the largest training label so far plus one). Failing those, and only when
        the error reads like an index error (a label out of bounds crashes cross-entropy with ``IndexError`` /
        "Target 12 is out of bounds" on CPU, a device-side assert on CUDA), the width of the module's last
        linear layer: a classifier's logits. A label at or above it is what the loss cannot index.
        """
        sp = self._splits.get(split)
        classes = self._classes_for(sp, name) if sp is not None else None
        if classes is None:
            classes = self._known_classes(name)
        if classes is None and split != "train":
            largest = self._label_max.get(name)
            if largest is not None and math.isfinite(largest) and largest >= 0:
                classes = int(largest) + 1
        if classes is not None:
            return classes, self._class_source.get(name, "the largest training label so far, plus one")
        text = f"{type(exception).__name__}: {exception}".lower()
        if not (isinstance(exception, IndexError) or any(k in text for k in ("out of bounds", "device-side assert",
                                                                              "index"))):
            return None, ""
        width = None
        for module in pl_module.modules() if isinstance(pl_module, torch.nn.Module) else []:
            out = getattr(module, "out_features", None)
            if isinstance(out, int) and not isinstance(out, bool) and out > 0:
                width = out
        if width is None:
            return None, ""
        return width, f"the width of the model's last linear layer, {width} outputs"

    def _explain_crash(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """``data_label_range`` for the batch the model was given last, when its labels explain the crash."""
        if self._last_batch is None or not self.checks["label_range"].enabled:
            return
        split, marker, batch, sanity = self._last_batch
        try:
            fields = self.selector.resolve(batch)
        except Exception:
            return
        for f in fields.targets:
            y = self.selector.get(batch, f)
            if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool \
                    or y.numel() == 0:
                continue
            classes, source = self._crash_classes(trainer, pl_module, split, f.name, exception)
            y = y.detach()
            bad = y < 0
            if self.ignore_index is not None:
                bad &= y != self.ignore_index
            if classes is not None:
                bad |= y >= classes
            if not bool(bad.any()):
                continue
            values = torch.unique(y[bad]).tolist()
            count = int(bad.sum())
            where = (f"{split} batch {marker} of the sanity check (validation before training)" if sanity else
                     f"{split} batch {marker}" if split != "train" else f"the train batch of step {marker}")
            valid = f"[0, {classes}) ({source})" if classes is not None else "non-negative values"
            listed = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
            self._explained.add(f"{split}/{f.name}")
            self._record_only = True
            try:
                self.checks["label_range"].judge_crash(self._context(trainer, pl_module, split, logging_step(trainer),
                                                                     {}), f.name, count, valid, where, listed,
                                                       exception, classes)
            finally:
                self._record_only = False

    def _emergency_report(self, trainer: Any, pl_module: Any, sp: SplitState) -> None:
        self._fold(sp)
        sum_buf, max_buf, meta = self._counter_buffers(sp)
        values = torch.cat([sum_buf, max_buf]).tolist()
        recorded: List[Alert] = []
        log = alert_log(trainer)

        def listener(alert: Alert) -> None:
            recorded.append(alert)

        # Record only: the actions of a crashing run do not matter any more, and must not raise again.
        self._record_only = True
        log.subscribe(listener)
        try:
            step = logging_step(trainer)
            self._publish_counters(trainer, pl_module, sp, values[:meta["sum_size"]], values[meta["sum_size"]:], meta,
                                   step, {})
        finally:
            log.unsubscribe(listener)
            self._record_only = False
        if not is_global_zero(trainer):  # rank 0 writes the file; say it here too so nothing goes unreported
            for alert in recorded:
                if severity_at_least(alert.severity, "warning"):
                    logger.error("[rank %s] %s step %d: %s", getattr(trainer, "global_rank", "?"), alert.rule,
                                 alert.step, alert.message)
        self._reset_counters(sp)
