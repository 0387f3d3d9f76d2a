"""The lightwatch callbacks, one module each, bound to ``pytorch_lightning`` (``lightning.pytorch`` when only
``lightning`` is installed; :mod:`lightwatch.lightning` always binds to the latter).

``MonitorCallback`` is the base of the monitors, bound the same way: subclass it to write a monitor of your
own that shares the sampling gate, the writer and the alerts.
"""
from lightwatch.callbacks.activation_stats import ActivationStatsMonitor
from lightwatch.callbacks.data_quality import DataQualityMonitor
from lightwatch.callbacks.gradient_stats import GradientStatsMonitor
from lightwatch.callbacks.hang_watchdog import HangWatchdog
from lightwatch.callbacks.prometheus_exporter import PrometheusExporter
from lightwatch.callbacks.metric_checkpoint import MetricCheckpoint
from lightwatch.callbacks.metric_monitor import MetricMonitor
from lightwatch.callbacks.slice_monitor import SliceMonitor
from lightwatch.callbacks.system_monitor import SystemMonitor
from lightwatch.core.callback import MonitorCallback as _MonitorCallback
from lightwatch.core.lightning import bind, default_package

MonitorCallback = bind(_MonitorCallback, default_package(), module=__name__)

__all__ = ["ActivationStatsMonitor", "DataQualityMonitor", "GradientStatsMonitor", "MetricCheckpoint", "MetricMonitor",
           "MonitorCallback", "SliceMonitor", "SystemMonitor", "HangWatchdog", "PrometheusExporter"]
