"""Helpers the benchmarks share for their records: JSON without NaN, and numbers read back from it."""
from __future__ import annotations

import math
from typing import Any

__all__ = ["json_safe", "num"]


def json_safe(value: Any) -> Any:
    """Non-finite floats as the strings "nan", "inf", "-inf" (strict JSON has no NaN), through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def num(value: Any) -> float:
    """A number written by :func:`json_safe` as a float; NaN for anything that is not a number."""
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return float(value) if isinstance(value, (int, float)) else float("nan")
