"""Checkpoint file names from templates such as ``"{epoch}-{val/loss:.3f}"``, and the JSON-safe values recorded
beside them.

Example:
    >>> namer = FileNamer("{epoch}-{val/loss:.3f}")
    >>> namer.render(namer.template, {"val/loss": 0.41234}, step=40, epoch=2)
    'epoch=2-val_loss=0.412'
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import re
import string
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

__all__ = ["FileNamer", "finite_or_none", "json_safe", "metric_values", "plain", "safe_name_part", "template_fields",
           "utc_now"]

_SAFE_CHARS = re.compile(r"[^A-Za-z0-9_.=+\-]")


def utc_now() -> str:
    """The current UTC time as ISO-8601 text with milliseconds (the manifest's ``time`` fields)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def finite_or_none(value: Any) -> Optional[float]:
    """``value`` as a float, or ``None`` when it is missing or not finite.

    Example:
        >>> finite_or_none(float("nan")) is None, finite_or_none(2)
        (True, 2.0)
    """
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def json_safe(obj: Any) -> Any:
    """Plain JSON values: non-finite floats become ``None``, tensors numbers or lists, anything else text.

    Example:
        >>> json_safe({"loss": torch.tensor(0.5), "nan": float("nan"), "shape": (2, 3)})
        {'loss': 0.5, 'nan': None, 'shape': [2, 3]}
    """
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.item() if obj.numel() == 1 else obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return str(obj)


def safe_name_part(text: str) -> str:
    """A metric name or value as a piece of a file name: path separators and odd characters become ``_``.

    Example:
        >>> safe_name_part("val/acc")
        'val_acc'
    """
    return _SAFE_CHARS.sub("_", str(text)) or "_"


def _format_value(value: float, spec: str, integral: bool) -> str:
    if integral and not spec:
        return str(int(value))
    if not spec:
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    try:
        return format(value, spec)
    except ValueError:
        # An integer spec ("03d") on a float metric: use the integer when it is one, else drop the spec.
        if math.isfinite(value) and float(value).is_integer():
            return format(int(value), spec)
        return str(value)


def template_fields(template: str, where: str) -> List[str]:
    """The field names of a file-name template; a ``ValueError`` naming ``where`` when it is not a valid one.

    Example:
        >>> template_fields("{epoch}-{val/loss:.3f}", "MetricCheckpoint")
        ['epoch', 'val/loss']
    """
    fields: List[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{where}: filename template {template!r} is malformed ({exc}); use e.g. "
                         f"'{{epoch}}-{{val/loss:.3f}}'.") from None
    for literal, field, _spec, _conv in parsed:
        if any(sep in literal for sep in ("/", "\\", os.sep)):
            raise ValueError(f"{where}: filename {template!r} contains a path separator; it is a name template, "
                             "not a path. Put directories in dirpath.")
        if field is not None:
            if not field:
                raise ValueError(f"{where}: filename {template!r} has an empty '{{}}'; name a metric, e.g. "
                                 "'{val/loss:.3f}'.")
            fields.append(field)
    return fields


@dataclass(frozen=True)
class FileNamer:
    """How checkpoint files are named: the template, the name of ``last``, the separator and the extension.

    Args:
        template: file-name template of top-k and interval checkpoints, e.g. ``"{epoch}-{val/loss:.3f}"``.
        last_name: template of the ``last`` checkpoint.
        join_char: between the parts of a name (``alert-<rule>-<name>``, version suffixes ``-v1``).
        extension: appended to every name.
        starting_version: the first version suffix when a name is taken.
        auto_insert_metric_name: write ``name=value`` for every field.

    Example:
        >>> FileNamer("{epoch}").base_name({"reason": "threshold", "threshold": "acc/90"}, {}, step=7, epoch=1)
        'threshold-acc_90-epoch=1'
    """

    template: str
    last_name: str = "last"
    join_char: str = "-"
    extension: str = ".ckpt"
    starting_version: int = 1
    auto_insert_metric_name: bool = True

    def render(self, template: str, values: Mapping[str, float], step: int, epoch: int) -> str:
        """``template`` filled with ``values`` (``step`` and ``epoch`` as integers), made file-name safe."""
        out: List[str] = []
        for literal, field, spec, _conv in string.Formatter().parse(template):
            out.append(literal)
            if field is None:
                continue
            if field == "step":
                text = _format_value(float(step), spec or "", integral=True)
            elif field == "epoch":
                text = _format_value(float(epoch), spec or "", integral=True)
            else:
                text = _format_value(float(values.get(field, float("nan"))), spec or "", integral=False)
            text = safe_name_part(text)
            out.append(f"{safe_name_part(field)}={text}" if self.auto_insert_metric_name else text)
        return "".join(out)

    def base_name(self, entry: Mapping[str, Any], values: Mapping[str, float], step: int, epoch: int) -> str:
        """The name (without extension) of a new manifest ``entry``: its reason decides the prefix."""
        reason = entry["reason"]
        if reason == "last":
            return self.render(self.last_name, values, step, epoch)
        name = self.render(self.template, values, step, epoch)
        if reason in ("top_k", "interval"):
            return name
        tag = reason
        if reason == "threshold":
            tag = f"threshold{self.join_char}{safe_name_part(entry['threshold'])}"
        elif reason == "alert" and entry.get("alert"):
            tag = f"alert{self.join_char}{safe_name_part(entry['alert']['rule'])}"
        return self.join_char.join([tag, name])

    def checkpoint_name(self, metrics: Mapping[str, Any], template: Optional[str] = None, ver: Optional[int] = None,
                        prefix: Optional[str] = None) -> str:
        """The file name for ``metrics`` (tensors or numbers; ``epoch`` and ``step`` among them), as Lightning's
        ``format_checkpoint_name``: ``[prefix-]<template filled>[-v<ver>]<extension>``.

        Example:
            >>> FileNamer("{epoch}-{val/loss:.3f}").checkpoint_name({"epoch": 2, "val/loss": torch.tensor(0.41234)})
            'epoch=2-val_loss=0.412.ckpt'
        """
        template = template or self.template
        template_fields(template, "MetricCheckpoint")
        values = {str(k): float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()
                  if isinstance(v, (int, float, torch.Tensor)) and (not isinstance(v, torch.Tensor) or v.numel() == 1)}
        name = self.render(template, values, int(values.get("step", 0)), int(values.get("epoch", 0)))
        if prefix:
            name = self.join_char.join([safe_name_part(prefix), name])
        if ver is not None:
            name = self.join_char.join([name, f"v{ver}"])
        return name + self.extension

    def versioned(self, base: str, version: int) -> str:
        """``base`` with a version suffix and the extension: ``epoch=3-v1.ckpt``."""
        return f"{base}{self.join_char}v{version}{self.extension}"


def plain(obj: Any) -> Any:
    """OmegaConf containers (or any mapping / sequence) as plain dicts and lists.

    Example:
        >>> plain({"acc": ("val/acc", 0.9)})
        {'acc': ['val/acc', 0.9]}
    """
    if isinstance(obj, Mapping) or (hasattr(obj, "items") and hasattr(obj, "keys")):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or (hasattr(obj, "__iter__") and type(obj).__name__ == "ListConfig"):
        return [plain(v) for v in obj]
    return obj


def metric_values(metrics: Mapping[str, Any], skip_prefix: Optional[str] = None) -> Dict[str, Optional[float]]:
    """The scalar entries of ``metrics`` (tensors of one element or numbers) as floats, non-finite ones ``None``.

    Args:
        metrics: e.g. ``trainer.callback_metrics``.
        skip_prefix: keys starting with it are left out (a callback's own counters).

    Example:
        >>> metric_values({"loss": torch.tensor(0.25), "flag": True, "hist": torch.zeros(3)})
        {'loss': 0.25}
    """
    out: Dict[str, Optional[float]] = {}
    for key, value in metrics.items():
        if skip_prefix and str(key).startswith(skip_prefix):
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[str(key)] = finite_or_none(value.item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = finite_or_none(value)
    return out
