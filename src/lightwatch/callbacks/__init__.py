"""The lightwatch callbacks, one module each."""
from lightwatch.callbacks.activation_stats import ActivationStatsMonitor
from lightwatch.callbacks.gradient_stats import GradientStatsMonitor

__all__ = ["ActivationStatsMonitor", "GradientStatsMonitor"]
