"""Writing statistics: one batched write per logged step, on global rank 0, on Lightning's step axis.

Scalars go to every logger through ``logger.log_metrics`` in one call per logged step. For TensorBoard
loggers the same values are written as one ``Summary`` protobuf holding every value (under 1 µs a value,
see :class:`SummaryEncoder`, instead of ~60 µs through ``add_scalar``); the logger's own ``prefix`` is
applied the way ``log_metrics`` would. Histograms and text go only to loggers whose experiment is a
TensorBoard ``SummaryWriter``. Every value is also put into ``trainer.callback_metrics`` on every rank, so
Lightning's ``EarlyStopping`` and ``ModelCheckpoint`` can monitor lightwatch statistics.
"""
from __future__ import annotations

import itertools
import math
import re
import sys
from array import array
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import torch

from lightwatch.core.histogram import HistogramData
from lightwatch.core import tensorboard_crc
from lightwatch.core.runtime import is_global_zero, tensorboard_writers

__all__ = ["MonitorWriter", "SummaryEncoder", "safe_tag_part"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/]")


def safe_tag_part(name: str) -> str:
    """Keep a tag component to ``[A-Za-z0-9_.-/]`` (TensorBoard and regex friendly)."""
    return _UNSAFE.sub("_", name) or "_"


def _tensorboard_fast_path(lg: Any) -> Any:
    """The ``FileWriter`` of a Lightning ``TensorBoardLogger`` (duck-typed), or ``None``."""
    exp = getattr(lg, "experiment", None)
    get_writer = getattr(exp, "_get_file_writer", None)
    if get_writer is None or not hasattr(lg, "LOGGER_JOIN_CHAR"):
        return None
    try:
        return get_writer()
    except Exception:  # a closed or foreign writer: use the public path instead
        return None


def _callback_metrics(trainer: Any) -> Any:
    """The dict behind ``trainer.callback_metrics``.

    The public property first merges every value logged in the current step into that dict (~80 us a call
    in a training step, five calls a sampled step with the default policy); the dict it returns is the
    logger connector's own, so writing into it directly is the same write. Falls back to the property.
    """
    connector = getattr(trainer, "_logger_connector", None)
    metrics = getattr(connector, "_callback_metrics", None)
    return metrics if isinstance(metrics, dict) else getattr(trainer, "callback_metrics", None)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


class SummaryEncoder:
    """TensorBoard ``Event`` protos of scalar values, serialized from bytes encoded once per tag.

    A ``Summary.Value`` holding a tag and a ``simple_value`` is the same bytes every step but for its last
    four (the float32 value): those headers are encoded once, and a step's summary is their concatenation
    with the values' bytes, parsed once into an ``Event`` (C code) instead of built value by value in Python
    (about 2x cheaper for hundreds of values). The wire format is protobuf's: ``Value`` = field 1 (tag,
    length-delimited) + field 2 (float, fixed32); ``Summary`` = repeated field 1; ``Event.summary`` = field 5.

    Example:
        >>> from array import array
        >>> event = SummaryEncoder().event(["a/b", "c"], array("f", [1.5, 2.0]))
        >>> [(v.tag, v.simple_value) for v in event.summary.value]
        [('a/b', 1.5), ('c', 2.0)]
    """

    def __init__(self) -> None:
        self._heads: Dict[str, bytes] = {}
        # (prefix, tags) -> the tags' headers: a callback writes the same tags in the same order step after step
        self._runs: Dict[Tuple[str, Tuple[str, ...]], List[bytes]] = {}

    def _head(self, tag: str) -> bytes:
        head = self._heads.get(tag)
        if head is None:
            raw = tag.encode("utf-8")
            body = 1 + len(_varint(len(raw))) + len(raw) + 1 + 4  # tag field, then the float field
            head = b"\x0a" + _varint(body) + b"\x0a" + _varint(len(raw)) + raw + b"\x15"
            if len(self._heads) < 65536:
                self._heads[tag] = head
        return head

    def event(self, tags: Iterable[str], floats: "array[float]", prefix: str = "") -> Any:
        """An ``Event`` whose summary holds ``tags`` (each after ``prefix``) with the float32 ``floats``."""
        from tensorboard.compat.proto.event_pb2 import Event

        data = floats.tobytes() if sys.byteorder == "little" else _swapped(floats)
        key = (prefix, tuple(tags))
        heads = self._runs.get(key)
        if heads is None:
            head = self._head
            heads = [head(prefix + tag if prefix else tag) for tag in key[1]]
            if len(self._runs) < 256:
                self._runs[key] = heads
        values = [data[i:i + 4] for i in range(0, 4 * len(heads), 4)]
        summary = b"".join(itertools.chain.from_iterable(zip(heads, values)))
        return Event.FromString(b"\x2a" + _varint(len(summary)) + summary)


def _swapped(floats: "array[float]") -> bytes:
    copy = array("f", floats)
    copy.byteswap()  # protobuf's fixed32 is little-endian
    return copy.tobytes()


class MonitorWriter:
    """Writes a callback's statistics under ``<prefix>.<family>/<subject>/<stat>``.

    Args:
        prefix: first part of every tag (``monitor`` by default); TensorBoard groups by what comes before
            the first ``/``, so each family gets its own section.

    Attributes:
        scalar_writes: number of batched scalar writes made (one per logged step); tests read it.

    Example:
        >>> w = MonitorWriter("monitor")
        >>> w.tag("grad", "fc.weight", "norm")
        'monitor.grad/fc.weight/norm'
    """

    def __init__(self, prefix: str = "monitor") -> None:
        if not prefix or "/" in prefix:
            raise ValueError(f"MonitorWriter: prefix must be non-empty and contain no '/', got {prefix!r}.")
        self.prefix = prefix
        self.scalar_writes = 0
        # a logged step names hundreds of tags, the same ones every time: each is built (and cleaned) once
        self._tags: Dict[Tuple[str, str, str], str] = {}
        self._summaries = SummaryEncoder()

    def tag(self, family: str, subject: str, stat: str = "") -> str:
        key = (family, subject, stat)
        tag = self._tags.get(key)
        if tag is None:
            tag = f"{self.prefix}.{family}/{safe_tag_part(subject)}"
            tag = f"{tag}/{stat}" if stat else tag
            if len(self._tags) < 65536:  # subjects are module and parameter names: a bounded set
                self._tags[key] = tag
        return tag

    def write_scalars(self, trainer: Any, values: Mapping[str, float], step: int) -> None:
        """Write ``values`` (tag -> float) at ``step``: callback metrics on every rank, loggers on rank 0."""
        if not values:
            return
        self.scalar_writes += 1
        # float32 (out-of-range values become inf); anything with __float__ converts in C, without a float() call
        floats = array("f", values.values())
        callback_metrics = _callback_metrics(trainer)
        if isinstance(callback_metrics, dict):
            # views of a tensor that owns its memory: a third cheaper to make than views of one that wraps the
            # array's buffer (~0.6 us a value warm; hundreds of values a sampled step)
            as_tensor = torch.frombuffer(floats, dtype=torch.float32).clone()
            callback_metrics.update(zip(values.keys(), as_tensor.unbind(0)))
        if not is_global_zero(trainer):
            return
        tensorboard_crc.install()  # once: the event files' checksums in C (see lightwatch.core.tensorboard_crc)
        for lg in list(getattr(trainer, "loggers", None) or []):
            file_writer = _tensorboard_fast_path(lg)
            if file_writer is None:
                lg.log_metrics(dict(values), step=step)
                continue
            prefix = getattr(lg, "_prefix", "") or ""
            join = getattr(lg, "LOGGER_JOIN_CHAR", "-")
            file_writer.add_event(self._summaries.event(values.keys(), floats, f"{prefix}{join}" if prefix else ""),
                                  step)

    def write_histograms(self, trainer: Any, histograms: Mapping[str, HistogramData], step: int) -> None:
        """Write raw histograms (tag -> :class:`HistogramData`) to TensorBoard loggers on rank 0."""
        tensorboard_crc.install()
        for exp in tensorboard_writers(trainer):
            for tag, h in histograms.items():
                if h.num <= 0 or not (math.isfinite(h.min) and math.isfinite(h.max)):
                    continue
                exp.add_histogram_raw(
                    tag,
                    min=h.min,
                    max=h.max,
                    num=int(h.num),
                    sum=h.sum,
                    sum_squares=h.sum_squares,
                    bucket_limits=h.bucket_limits,
                    bucket_counts=h.counts,
                    global_step=step,
                )

    def write_text(self, trainer: Any, tag: str, text: str, step: int) -> None:
        tensorboard_crc.install()
        for exp in tensorboard_writers(trainer):
            exp.add_text(tag, text, global_step=step)

    def write_alert(self, trainer: Any, alert: Any) -> None:
        """TensorBoard text ``<prefix>.alert/<rule>`` and scalar ``<prefix>.alert/<rule>/value``."""
        tag = f"{self.prefix}.alert/{safe_tag_part(alert.rule)}"
        subject = f" `{alert.subject}`" if alert.subject else ""
        text = (
            f"**{alert.severity}** step {alert.step} epoch {alert.epoch}{subject}: {alert.message} "
            f"(value={alert.value}, threshold={alert.threshold}, action={alert.action})"
        )
        self.write_text(trainer, tag, text, alert.step)
        if alert.value is not None and is_global_zero(trainer):
            value = float(alert.value)
            for lg in list(getattr(trainer, "loggers", None) or []):
                lg.log_metrics({f"{tag}/value": value}, step=alert.step)

    def flush(self, trainer: Any) -> None:
        for exp in tensorboard_writers(trainer):
            flush = getattr(exp, "flush", None)
            if callable(flush):
                flush()
