"""Helpers the benchmarks share for their records: JSON without NaN, numbers read back from it, the median
and IQR of a series, and Markdown tables and their cells."""
from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, List, Sequence, Tuple

__all__ = ["json_safe", "num", "floats", "median_iqr", "markdown_table", "fmt", "mb", "share"]


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


def floats(value: Any) -> Any:
    """A record read back from JSON: the strings :func:`json_safe` wrote for NaN and infinities as floats."""
    if isinstance(value, dict):
        return {k: floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [floats(v) for v in value]
    return num(value) if value in ("nan", "inf", "-inf") else value


def mb(value: Any) -> str:
    """Bytes as a table cell in MiB with one decimal; "-" for None."""
    return "-" if value is None else f"{value / 2 ** 20:.1f}"


def share(value: Any) -> str:
    """A fraction as a table cell in percent with two decimals; "-" for None."""
    return "-" if value is None else f"{100 * value:.2f}%"


def median_iqr(values: Iterable[float]) -> Tuple[float, float]:
    """``(median, interquartile range)`` of the finite values; NaN for none, IQR 0 for one value."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    if len(finite) == 1:
        return finite[0], 0.0
    q = statistics.quantiles(finite, n=4, method="inclusive")
    return statistics.median(finite), q[2] - q[0]


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers with ``digits`` decimals, NaN and None as "-", anything else as text."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
    """The lines of a Markdown table; cells go through :func:`fmt` unless they are already strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return lines
