"""The TensorBoard custom-scalars layout: an overview of lightwatch's charts, written once per run.

TensorBoard's scalars dashboard shows lightwatch's tags in one alphabetical section per family, a few
hundred charts for a modest model. The custom-scalars plugin lets a run carry a *layout*: named panels of
charts, each chart drawing every tag that matches a regular expression (``re.match``, anchored at the
start). lightwatch writes one at fit start with four panels: the loss and alerts, the global gradient
norm and update ratio, the worst layers, and data quality. The charts are regular expressions, so the
layout never has to know the model's layer names, and a tag that is never written leaves its chart empty.

The layout goes through the logger's own writer (no second ``SummaryWriter``), on global rank 0 only, and
only to TensorBoard loggers; several lightwatch callbacks in one Trainer write it once.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple

from lightwatch.core.runtime import is_global_zero

__all__ = ["LAYOUT_TAG", "layout_panels", "layout_proto", "layout_summary", "write_layout_once"]

#: the tag TensorBoard's custom-scalars plugin reads the layout from
LAYOUT_TAG = "custom_scalars__config__"

#: set on a logger's ``SummaryWriter`` once the layout is in its event file
_WRITTEN_FLAG = "_lightwatch_layout_written"

#: (panel title, closed at first, [(chart title, [tag regex, ...]), ...]); ``{p}`` is the escaped prefix
_PANELS: Tuple[Tuple[str, bool, Tuple[Tuple[str, Tuple[str, ...]], ...]], ...] = (
    ("lightwatch: loss and alerts", False, (
        ("loss (training and validation)", (r"(?!{p}\.).*loss",)),
        ("alerts (value at each alert, by rule)", (r"{p}\.alert/[^/]+/value$",)),
        ("loss as lightwatch reads it every step", (r"{p}\.step/loss",)),
    )),
    ("lightwatch: gradients and updates", False, (
        ("global gradient norm", (r"{p}\.grad/_total/norm(_max)?$",)),
        ("update ratio |dw|/|w| (median over layers)", (r"{p}\.diag/update_ratio/median$",)),
        ("steps with a non-finite gradient norm (norm_every_step)", (r"{p}\.grad/_total/nonfinite_steps$",)),
    )),
    ("lightwatch: layers", True, (
        ("gradient norm per parameter", (r"{p}\.grad/(?!_total/)[^/]+/norm$",)),
        ("update ratio per parameter", (r"{p}\.param/[^/]+/update_ratio$",)),
        ("dead and saturated fraction per activation", (r"{p}\.act/[^/]+/(dead_frac|saturation)$",)),
        ("non-finite values per layer", (r"{p}\.(grad|act)/(?!_total/)[^/]+/nonfinite$",)),
    )),
    ("lightwatch: data quality", True, (
        ("drift (PSI) per feature", (r"{p}\.data/[^/]+/[^/]+/psi(_ref)?$",)),
        ("drift (binned KS) per feature", (r"{p}\.data/[^/]+/[^/]+/ks(_ref)?$",)),
        ("non-finite and out-of-range values", (r"{p}\.data/[^/]+/[^/]+/(nonfinite|out_of_range)$",)),
        ("duplicates, leakage and label shift", (r"{p}\.data/[^/]+/[^/]+/(dup_frac|leak_frac|label_shift(_ref)?)$",)),
    )),
)


def layout_panels(prefix: str = "monitor", logger_prefix: str = "") -> List[Dict[str, Any]]:
    """The panels of the layout as plain data: ``[{"title", "closed", "charts": [{"title", "tags"}]}]``.

    Args:
        prefix: the monitors' tag prefix (``monitor`` by default).
        logger_prefix: what the logger puts before every tag (``TensorBoardLogger(prefix="x")`` writes
            ``x-monitor.grad/...``): ``"x-"``; empty for none.

    Example:
        >>> panels = layout_panels()
        >>> [p["title"] for p in panels][:2]
        ['lightwatch: loss and alerts', 'lightwatch: gradients and updates']
        >>> import re
        >>> chart = panels[1]["charts"][0]
        >>> bool(re.match(chart["tags"][0], "monitor.grad/_total/norm"))
        True
    """
    p, lp = re.escape(prefix), re.escape(logger_prefix)
    return [{"title": title, "closed": closed,
             "charts": [{"title": name, "tags": [lp + t.replace("{p}", p) for t in tags]} for name, tags in charts]}
            for title, closed, charts in _PANELS]


def layout_proto(prefix: str = "monitor", logger_prefix: str = "") -> Any:
    """The layout as TensorBoard's ``tensorboard.Layout`` protobuf.

    Example:
        >>> [c.title for c in layout_proto().category][-1]
        'lightwatch: data quality'
    """
    from tensorboard.plugins.custom_scalar import layout_pb2

    categories = []
    for panel in layout_panels(prefix, logger_prefix):
        charts = [layout_pb2.Chart(title=c["title"], multiline=layout_pb2.MultilineChartContent(tag=c["tags"]))
                  for c in panel["charts"]]
        categories.append(layout_pb2.Category(title=panel["title"], chart=charts, closed=panel["closed"]))
    return layout_pb2.Layout(category=categories)


def layout_summary(prefix: str = "monitor", logger_prefix: str = "") -> Any:
    """A ``Summary`` protobuf holding the layout under :data:`LAYOUT_TAG`, as the custom-scalars plugin reads it.

    Example:
        >>> layout_summary().value[0].metadata.plugin_data.plugin_name
        'custom_scalars'
    """
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    tensor = TensorProto(dtype="DT_STRING", string_val=[layout_proto(prefix, logger_prefix).SerializeToString()],
                         tensor_shape=TensorShapeProto())
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
    return Summary(value=[Summary.Value(tag=LAYOUT_TAG, tensor=tensor, metadata=metadata)])


def write_layout_once(trainer: Any, prefix: str = "monitor") -> int:
    """Write the layout to each TensorBoard logger of ``trainer`` that does not have it yet; rank 0 only.

    The mark is kept on the logger's ``SummaryWriter``: it lives exactly as long as the event file it
    writes, so a second monitor of the same fit finds it, and a new logger (a new run) gets its layout.

    Returns:
        the number of event files the layout was written to now.
    """
    written = 0
    if not is_global_zero(trainer):
        return 0
    for lg in list(getattr(trainer, "loggers", None) or []):
        experiment = getattr(lg, "experiment", None)
        if experiment is None or getattr(experiment, _WRITTEN_FLAG, False):
            continue
        get_file_writer = getattr(experiment, "_get_file_writer", None)
        if get_file_writer is None:  # not torch's SummaryWriter: nothing to write the protobuf through
            continue
        tag_prefix = getattr(lg, "_prefix", "") or ""
        logger_prefix = f"{tag_prefix}{getattr(lg, 'LOGGER_JOIN_CHAR', '-')}" if tag_prefix else ""
        get_file_writer().add_summary(layout_summary(prefix, logger_prefix), 0)
        setattr(experiment, _WRITTEN_FLAG, True)
        written += 1
    return written
