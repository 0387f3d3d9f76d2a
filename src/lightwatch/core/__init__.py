"""Shared machinery of the lightwatch callbacks: gate, buffers, reductions, writing, alerts, actions."""
from lightwatch.core.actions import ActionContext, MonitorWarning, register_action, registered_actions
from lightwatch.core.alerts import SEVERITIES, Alert, AlertCooldown, MonitorError, alert_log
from lightwatch.core.callback import MonitorCallback
from lightwatch.core.reduce import agree_max, all_reduce_flat
from lightwatch.core.selection import Selection, top_k_subjects
from lightwatch.core.writer import MonitorWriter

__all__ = [
    "ActionContext",
    "Alert",
    "AlertCooldown",
    "MonitorCallback",
    "MonitorError",
    "MonitorWarning",
    "MonitorWriter",
    "SEVERITIES",
    "Selection",
    "agree_max",
    "alert_log",
    "all_reduce_flat",
    "register_action",
    "registered_actions",
    "top_k_subjects",
]
