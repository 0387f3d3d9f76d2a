"""The lightwatch callbacks, one module each."""
from lightwatch.callbacks.activation_stats import ActivationStatsMonitor
from lightwatch.callbacks.data_quality import DataQualityMonitor
from lightwatch.callbacks.gradient_stats import GradientStatsMonitor
from lightwatch.callbacks.metric_checkpoint import MetricCheckpoint
from lightwatch.callbacks.metric_monitor import MetricMonitor

__all__ = ["ActivationStatsMonitor", "DataQualityMonitor", "GradientStatsMonitor", "MetricCheckpoint", "MetricMonitor"]
