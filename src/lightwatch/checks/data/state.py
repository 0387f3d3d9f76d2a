"""What the data monitor keeps in a checkpoint: the learned schema, layout, edges, classes and ranges, the
once-per-run flags (scale checked, padding looked for, scan done), and the profile so far.

The state is plain JSON-safe Python (lists, floats, strings), so a checkpoint loads with ``weights_only=True``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict

import torch

from lightwatch.checks.data.fields import Schema
from lightwatch.checks.data.padding_in_loss import PaddingInLoss
from lightwatch.core.alerts import SEVERITIES
from lightwatch.profile import DataProfile, ProfileError, dtype_name, parse_dtype

__all__ = ["LearnedState"]

logger = logging.getLogger("lightwatch")


class LearnedState:
    """The part of :class:`~lightwatch.callbacks.DataQualityMonitor` that saves and restores what it learned.

    Ranges learned from data are restored as bounds and rebuilt on the first batch of the resumed run, on its
    device; the profile is restored without sample hashes.

    Example:
        >>> import torch
        >>> class Base:
        ...     def load_state_dict(self, state):
        ...         pass
        >>> class Probe(LearnedState, Base):
        ...     pass
        >>> probe = Probe()
        >>> probe.load_state_dict({"data_version": 1, "edges": {"x": [[0.0, 1.0]]}, "learned": True})
        >>> probe._edges["x"].tolist(), probe._learned, probe._scale_checked
        ([[0.0, 1.0]], True, True)
    """

    def state_dict(self) -> Dict[str, Any]:
        """The callback's state plus what the data monitor learned (JSON-safe; version ``data_version`` 1)."""
        state = super().state_dict()
        state.update({
            "data_version": 1,
            "edges": {k: v.tolist() for k, v in self._edges.items()},
            "schemas": {k: {"dtype": dtype_name(v.dtype), "dims": list(v.dims), "frozen": v.frozen, "source": v.source}
                        for k, v in self._schemas.items()},
            "layout": {k: int(v) for k, v in self._layout.items()},
            "classes": dict(self._classes),
            "class_source": dict(self._class_source),
            "label_max": {k: float(v) for k, v in self._label_max.items() if math.isfinite(v)},
            "learned_ranges": {k: {"bounds": [list(b) for b in r.bounds], "n_ref": int(r.n_ref), "source": r.source}
                               for k, r in self._ranges.items() if not r.hard and r.bounds},
            "learned": bool(self._learned),
            "scale_checked": bool(self._scale_checked),
            "padding_batches_left": int(self._padding_batches_left),
            "reported": sorted(f"{a}|{b}" for a, b in self._reported),
            "scan_done": bool(self._scan_done),
            "scan_alerts": dict(self._scan_alerts),
            "profile": self._profile.to_dict(with_hashes=False),
        })
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; a state of another version restores the callback's part only."""
        super().load_state_dict(state_dict)
        if state_dict.get("data_version") != 1:
            return
        self._edges = {k: torch.tensor(v, dtype=torch.float64) for k, v in state_dict.get("edges", {}).items()}
        self._schemas = {k: Schema(parse_dtype(v["dtype"]), list(v["dims"]), bool(v["frozen"]), str(v["source"]))
                         for k, v in state_dict.get("schemas", {}).items()}
        self._layout = {k: int(v) for k, v in dict(state_dict.get("layout", {})).items()}
        self._classes = {k: int(v) for k, v in state_dict.get("classes", {}).items()}
        self._class_source = {k: str(v) for k, v in state_dict.get("class_source", {}).items()}
        self._label_max = {k: float(v) for k, v in state_dict.get("label_max", {}).items()}
        self._restored_ranges = {str(k): dict(v) for k, v in state_dict.get("learned_ranges", {}).items()}
        self._learned = bool(state_dict.get("learned", False))
        self._scale_checked = bool(state_dict.get("scale_checked", self._learned))
        self._padding_batches_left = int(state_dict.get("padding_batches_left", 0 if self._learned else
                                                        PaddingInLoss.max_batches))
        self._reported = {tuple(x.split("|", 1)) for x in state_dict.get("reported", [])}  # type: ignore[misc]
        self._scan_done = bool(state_dict.get("scan_done", False))
        self._scan_alerts = {str(k): str(v) for k, v in dict(state_dict.get("scan_alerts", {})).items()
                             if v in SEVERITIES}
        try:
            self._profile = DataProfile.from_dict(state_dict.get("profile", {}), "<checkpoint>")
        except ProfileError as err:
            logger.warning("lightwatch: DataQualityMonitor could not restore its profile from the checkpoint: %s", err)
