"""lightwatch's callbacks for ``import lightning as L`` (``lightning.pytorch``).

The same five callbacks as :mod:`lightwatch.callbacks`, bound to ``lightning.pytorch``'s ``Callback`` and
``Checkpoint`` instead of ``pytorch_lightning``'s: a ``lightning.pytorch.Trainer`` accepts only its own
package's callbacks, and counts only its own ``Checkpoint`` subclasses as checkpoint callbacks (resume paths,
``ckpt_path="best"``, ``dirpath`` handling). One implementation serves both; checkpoints written with one
flavour resume with the other (the state keys are the class names).

Example:
    >>> import lightning as L
    >>> from lightwatch.lightning import GradientStatsMonitor, MetricCheckpoint
    >>> isinstance(GradientStatsMonitor(), L.Callback)
    True
    >>> isinstance(MetricCheckpoint(monitor="val/loss"), L.pytorch.callbacks.Checkpoint)
    True
"""
from __future__ import annotations

from lightwatch.callbacks.activation_stats import _ActivationStatsMonitor
from lightwatch.callbacks.data_quality import _DataQualityMonitor
from lightwatch.callbacks.gradient_stats import _GradientStatsMonitor
from lightwatch.callbacks.hang_watchdog import _HangWatchdog
from lightwatch.callbacks.prometheus_exporter import _PrometheusExporter
from lightwatch.callbacks.metric_checkpoint import _MetricCheckpoint
from lightwatch.callbacks.metric_monitor import _MetricMonitor
from lightwatch.callbacks.slice_monitor import _SliceMonitor
from lightwatch.callbacks.system_monitor import _SystemMonitor
from lightwatch.core.callback import MonitorCallback as _MonitorCallback
from lightwatch.core.lightning import bind

__all__ = ["ActivationStatsMonitor", "DataQualityMonitor", "GradientStatsMonitor", "MetricCheckpoint", "MetricMonitor",
           "MonitorCallback", "SliceMonitor", "SystemMonitor", "HangWatchdog", "PrometheusExporter"]

_PACKAGE = "lightning.pytorch"

ActivationStatsMonitor = bind(_ActivationStatsMonitor, _PACKAGE, module=__name__)
DataQualityMonitor = bind(_DataQualityMonitor, _PACKAGE, module=__name__)
GradientStatsMonitor = bind(_GradientStatsMonitor, _PACKAGE, module=__name__)
MetricCheckpoint = bind(_MetricCheckpoint, _PACKAGE, "checkpoint", module=__name__)
MetricMonitor = bind(_MetricMonitor, _PACKAGE, module=__name__)
MonitorCallback = bind(_MonitorCallback, _PACKAGE, module=__name__)
SliceMonitor = bind(_SliceMonitor, _PACKAGE, module=__name__)
SystemMonitor = bind(_SystemMonitor, _PACKAGE, module=__name__)
HangWatchdog = bind(_HangWatchdog, _PACKAGE, module=__name__)
PrometheusExporter = bind(_PrometheusExporter, _PACKAGE, module=__name__)
