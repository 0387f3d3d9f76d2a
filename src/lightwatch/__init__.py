"""lightwatch: PyTorch Lightning callbacks that watch a training run and act on what they see."""
from lightwatch.callbacks import ActivationStatsMonitor, GradientStatsMonitor, MetricCheckpoint, MetricMonitor
from lightwatch.core.actions import register_action
from lightwatch.core.alerts import Alert, MonitorError, alert_log

__version__ = "0.1.0"

__all__ = [
    "ActivationStatsMonitor",
    "Alert",
    "GradientStatsMonitor",
    "MetricCheckpoint",
    "MetricMonitor",
    "MonitorError",
    "alert_log",
    "register_action",
    "__version__",
]
