"""lightwatch: PyTorch Lightning callbacks that watch a training run and act on what they see.

Names are imported on first use, so that merely importing ``lightwatch`` (as Hydra's plugin discovery does
for every app once lightwatch is installed) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, Tuple

from lightwatch._version import __version__

_EXPORTS: Dict[str, Tuple[str, str]] = {
    "ActivationStatsMonitor": ("lightwatch.callbacks", "ActivationStatsMonitor"),
    "DataQualityMonitor": ("lightwatch.callbacks", "DataQualityMonitor"),
    "GradientStatsMonitor": ("lightwatch.callbacks", "GradientStatsMonitor"),
    "MetricCheckpoint": ("lightwatch.callbacks", "MetricCheckpoint"),
    "MetricMonitor": ("lightwatch.callbacks", "MetricMonitor"),
    "SliceMonitor": ("lightwatch.callbacks", "SliceMonitor"),
    "SystemMonitor": ("lightwatch.callbacks", "SystemMonitor"),
    "HangWatchdog": ("lightwatch.callbacks", "HangWatchdog"),
    "PrometheusExporter": ("lightwatch.callbacks", "PrometheusExporter"),
    "Alert": ("lightwatch.core.alerts", "Alert"),
    "MonitorError": ("lightwatch.core.alerts", "MonitorError"),
    "CheckpointIntegrityError": ("lightwatch.core.checkpoint", "CheckpointIntegrityError"),
    "alert_log": ("lightwatch.core.alerts", "alert_log"),
    "register_action": ("lightwatch.core.actions", "register_action"),
    "instantiate_monitors": ("lightwatch.hydra", "instantiate_monitors"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from lightwatch.callbacks import (ActivationStatsMonitor, DataQualityMonitor, GradientStatsMonitor,
                                      HangWatchdog, MetricCheckpoint, MetricMonitor, PrometheusExporter,
                                      SliceMonitor, SystemMonitor)
    from lightwatch.core.actions import register_action
    from lightwatch.core.alerts import Alert, MonitorError, alert_log
    from lightwatch.core.checkpoint import CheckpointIntegrityError
    from lightwatch.hydra import instantiate_monitors


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'lightwatch' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(list(globals()) + list(_EXPORTS))
