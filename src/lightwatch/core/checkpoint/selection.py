"""Which checkpoints to save and which to keep: top-k, ``last``, thresholds, alert saves, healthy marks.

:class:`CheckpointSelection` holds the manifest records (entries) of the committed checkpoints and decides, from
metric values and save requests, what a save writes, under which names, and which older files it evicts. It is
pure bookkeeping, computed identically on every rank; :class:`~lightwatch.core.checkpoint.store.CheckpointStore`
does the disk work.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from lightwatch.core.alerts import Alert
from lightwatch.core.checkpoint.naming import FileNamer, finite_or_none, json_safe, plain

__all__ = ["REASONS", "REQUESTABLE_REASONS", "CheckpointSelection", "Item", "check_int", "parse_thresholds"]

REASONS: Tuple[str, ...] = ("top_k", "last", "threshold", "interval", "alert", "exception")
REQUESTABLE_REASONS: Tuple[str, ...] = ("alert", "interval", "last", "exception")

#: One thing to save: its reason and the fields recorded with it (``score``, ``alert``, ``threshold``, ...).
Item = Tuple[str, Dict[str, Any]]
Entry = Dict[str, Any]


def check_int(value: Any, name: str, minimum: int, allow_none: bool = False) -> Optional[int]:
    """``value`` as an ``int`` if it is an integer ``>= minimum`` (or ``None`` when allowed), else a ``ValueError``.

    Example:
        >>> check_int(3, "save_top_k", -1)
        3
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"MetricCheckpoint: {name} must be an integer >= {minimum}"
                         f"{' (or None)' if allow_none else ''}, got {value!r}.")
    return int(value)


def parse_thresholds(thresholds: Any) -> Dict[str, Dict[str, Any]]:
    """``{name: {"metric": str, "above" | "below": float}}`` as ``{name: {"metric", "kind", "bound"}}``, checked.

    Example:
        >>> parse_thresholds({"acc90": {"metric": "val/acc", "above": 0.9}})
        {'acc90': {'metric': 'val/acc', 'kind': 'above', 'bound': 0.9}}
    """
    if thresholds is None:
        return {}
    thresholds = plain(thresholds)
    if not isinstance(thresholds, dict):
        raise ValueError("MetricCheckpoint: thresholds must map a name to {'metric': str, 'above': float} or "
                         f"{{'metric': str, 'below': float}}, got {type(thresholds).__name__}.")
    out: Dict[str, Dict[str, Any]] = {}
    for name, spec in thresholds.items():
        where = f"MetricCheckpoint threshold {name!r}"
        if not isinstance(spec, dict) or not isinstance(spec.get("metric"), str) or not spec["metric"]:
            raise ValueError(f"{where}: give {{'metric': <logged metric name>, 'above': <bound>}} (or 'below'), "
                             f"got {spec!r}.")
        unknown = set(spec) - {"metric", "above", "below"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed are metric, above, below.")
        bounds = [k for k in ("above", "below") if spec.get(k) is not None]
        if len(bounds) != 1:
            raise ValueError(f"{where}: give exactly one of 'above' (save when value >= bound) or 'below' "
                             f"(save when value <= bound), got {spec!r}.")
        try:
            bound = float(spec[bounds[0]])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {bounds[0]} must be a number, got {spec[bounds[0]]!r}.") from None
        if not math.isfinite(bound):
            raise ValueError(f"{where}: {bounds[0]} must be finite, got {bound}.")
        out[str(name)] = {"metric": spec["metric"], "kind": bounds[0], "bound": bound}
    return out


class CheckpointSelection:
    """The committed checkpoints' records, and the decisions of what to save and what to evict.

    Args:
        monitor: metric to rank top-k checkpoints by; ``None`` saves ``interval`` checkpoints instead.
        mode: ``"min"`` or ``"max"``.
        save_top_k: top-k (or interval) checkpoints kept (``-1`` all, ``0`` none).
        save_last: save ``last`` at every scheduled check.
        thresholds: ``{name: {"metric": str, "above" | "below": float}}``: save once per crossing.
        keep_threshold_checkpoints: threshold checkpoints kept (newest first; ``-1`` all).
        save_on_alert: honour ``alert`` requests.
        alert_save_cooldown_steps: at most one alert save in this many steps.
        keep_alert_checkpoints: alert checkpoints kept (newest first; ``-1`` all).
        save_weights_only: the files hold weights only (they are then never rollback points).

    A checkpoint is *healthy* when no error was counted (:meth:`count_error`) since the previous save and the
    parameters were finite; the newest healthy one is never evicted before a newer healthy one is committed (it
    is *pinned* instead, and renamed when its name is needed).

    Example:
        >>> sel = CheckpointSelection(monitor="val/loss", mode="min", save_top_k=1)
        >>> items, issue = sel.scheduled({"val/loss": 0.5})
        >>> items, issue
        ([('top_k', {'score': 0.5})], None)
        >>> plan = sel.plan(items, {"val/loss": 0.5}, step=10, epoch=0, namer=FileNamer("{step}"), taken=set())
        >>> sel.apply(plan)
        >>> [e["file"] for e in sel.entries], sel.best_entry()["score"]
        (['step=10.ckpt'], 0.5)
        >>> sel.scheduled({"val/loss": 0.7})[0]  # worse than the one kept: nothing to save
        []
    """

    def __init__(self, monitor: Optional[str] = None, mode: str = "min", save_top_k: int = 1, save_last: bool = False,
                 thresholds: Optional[Dict[str, Dict[str, Any]]] = None, keep_threshold_checkpoints: int = -1,
                 save_on_alert: bool = True, alert_save_cooldown_steps: int = 10, keep_alert_checkpoints: int = 3,
                 save_weights_only: bool = False) -> None:
        self.check_target(monitor, mode)
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = check_int(save_top_k, "save_top_k", -1)
        self.save_last = bool(save_last)
        self.thresholds = parse_thresholds(thresholds)
        self.keep_threshold_checkpoints = check_int(keep_threshold_checkpoints, "keep_threshold_checkpoints", -1)
        self.save_on_alert = bool(save_on_alert)
        self.alert_save_cooldown_steps = check_int(alert_save_cooldown_steps, "alert_save_cooldown_steps", 0)
        self.keep_alert_checkpoints = check_int(keep_alert_checkpoints, "keep_alert_checkpoints", -1)
        self.save_weights_only = bool(save_weights_only)
        # Entries are the manifest's "checkpoints" records, in commit order.
        self.entries: List[Entry] = []
        self.seq = 0
        self.saves = 0
        self.errors_since_save = 0
        self.armed: Dict[str, bool] = {n: True for n in self.thresholds}
        self.last_alert_save_step: Optional[int] = None
        self.requests: List[Tuple[str, Optional[Dict[str, Any]]]] = []
        self.current_score: Optional[torch.Tensor] = None

    @staticmethod
    def check_target(monitor: Any, mode: Any) -> None:
        """A ``ValueError`` unless ``mode`` is ``"min"``/``"max"`` and ``monitor`` a metric name or ``None``."""
        if mode not in ("min", "max"):
            raise ValueError(f"MetricCheckpoint: mode must be 'min' or 'max', got {mode!r}.")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"MetricCheckpoint: monitor must be a metric name (str) or None, got {monitor!r}.")

    # ------------------------------------------------------------------------------------ reading
    def pool(self, reason: str) -> List[Entry]:
        """The entries saved for ``reason``, oldest first, without the pinned ones (kept outside every pool)."""
        return [e for e in self.entries if e["reason"] == reason and not e.get("pinned")]

    def rank(self, entries: Iterable[Entry]) -> List[Entry]:
        """Top-k entries best first; among equal scores the older one ranks first (as in ``ModelCheckpoint``)."""
        sign = 1.0 if self.mode == "min" else -1.0
        return sorted(entries, key=lambda e: (sign * float(e["score"]), int(e.get("seq", 0))))

    def ranked_top_k(self) -> List[Entry]:
        return self.rank(self.pool("top_k"))

    def best_entry(self) -> Optional[Entry]:
        """The best top-k entry, or the newest interval one without ``monitor``."""
        if self.monitor is not None:
            ranked = self.ranked_top_k()
            return ranked[0] if ranked else None
        interval = self.pool("interval")
        return interval[-1] if interval else None

    @staticmethod
    def newest_healthy(entries: Iterable[Entry]) -> Optional[Entry]:
        """The newest healthy entry that is a full checkpoint (a rollback point), or ``None``."""
        candidates = [e for e in entries if e.get("healthy") and not e.get("weights_only")]
        return max(candidates, key=lambda e: (int(e["step"]), int(e.get("seq", 0)))) if candidates else None

    def best_and_last(self, entries: Sequence[Entry]) -> Tuple[Optional[str], Optional[str]]:
        """The files the manifest names ``best`` and ``last`` among ``entries``."""
        if self.monitor is not None:
            ranked = self.rank([e for e in entries if e["reason"] == "top_k" and not e.get("pinned")])
            best = ranked[0]["file"] if ranked else None
        else:
            interval = [e for e in entries if e["reason"] == "interval" and not e.get("pinned")]
            best = interval[-1]["file"] if interval else None
        lasts = [e for e in entries if e["reason"] == "last" and not e.get("pinned")]
        return best, (lasts[-1]["file"] if lasts else None)

    def improves(self, score: float) -> bool:
        """Whether a finite ``score`` earns a place among the top k."""
        if self.save_top_k == -1:
            return True
        pool = self.ranked_top_k()
        if len(pool) < self.save_top_k:
            return True
        worst = float(pool[-1]["score"])
        return score < worst if self.mode == "min" else score > worst

    # ------------------------------------------------------------------------------------ deciding
    def request(self, reason: str = "alert", alert: Optional[Alert] = None) -> None:
        """Ask for a save of ``reason`` at the next safe point; several requests of one reason make one save."""
        if reason not in REQUESTABLE_REASONS:
            raise ValueError(f"MetricCheckpoint.request_save: reason must be one of {', '.join(REQUESTABLE_REASONS)}"
                             f", got {reason!r}.")
        if not self.save_on_alert and reason == "alert":
            return
        if any(r == reason for r, _ in self.requests):
            return
        info = None
        if alert is not None:
            info = {"rule": alert.rule, "source": alert.source, "severity": alert.severity, "step": alert.step,
                    "subject": alert.subject, "value": finite_or_none(alert.value)}
        self.requests.append((reason, info))

    def count_error(self) -> None:
        """An error was published: the next save is not healthy."""
        self.errors_since_save += 1

    def scheduled(self, values: Mapping[str, float]) -> Tuple[List[Item], Optional[Tuple[str, Optional[float]]]]:
        """What a scheduled check saves for these metric ``values``, and a problem with the monitored metric:
        ``("missing", None)`` or ``("nonfinite", value)`` (such a value is never saved as top-k or best)."""
        items: List[Item] = []
        issue: Optional[Tuple[str, Optional[float]]] = None
        if self.monitor is not None and self.save_top_k != 0:
            current = values.get(self.monitor)
            if current is None:
                issue = ("missing", None)
            elif not math.isfinite(current):
                self.current_score = torch.tensor(current)
                issue = ("nonfinite", current)
            else:
                self.current_score = torch.tensor(current)
                if self.improves(current):
                    items.append(("top_k", {"score": current}))
        elif self.monitor is None and self.save_top_k != 0:
            items.append(("interval", {}))
        if self.save_last:
            items.append(("last", {}))
        for name, spec in self.thresholds.items():
            value = values.get(spec["metric"])
            if value is None or math.isnan(value):
                continue
            # Lightning logs float32: 0.9 logged reads 0.89999998, so the bound is also taken at that precision.
            bound, bound32 = spec["bound"], float(np.float32(spec["bound"]))
            reached = value >= min(bound, bound32) if spec["kind"] == "above" else value <= max(bound, bound32)
            if reached and self.armed[name]:
                self.armed[name] = False
                items.append(("threshold", {"threshold": name, "metric": spec["metric"], "bound": spec["bound"],
                                            "value": value}))
            elif not reached:
                self.armed[name] = True
        return items, issue

    def with_requests(self, items: List[Item], step: int) -> List[Item]:
        """``items`` plus the pending requests (alert saves within the cooldown dropped); the requests are cleared."""
        items = list(items)
        for reason, info in self.requests:
            if reason == "alert":
                last = self.last_alert_save_step
                if last is not None and 0 <= step - last < self.alert_save_cooldown_steps:
                    continue
                self.last_alert_save_step = step
            if reason == "last" and any(r == "last" for r, _ in items):
                continue
            items.append((reason, {"alert": info} if info else {}))
        self.requests.clear()
        return items

    def plan(self, items: Sequence[Item], values: Mapping[str, float], step: int, epoch: int, namer: FileNamer,
             taken: Set[str], params_finite: bool = True, now: str = "") -> Dict[str, Any]:
        """The new entries for ``items`` (one file's content), their names, and what they evict, pin and rename.

        Args:
            items: what to save.
            values: metric values for the names.
            step: global step of the save.
            epoch: epoch of the save.
            namer: the file names.
            taken: names in the directory that no new file may take.
            params_finite: the parameters are finite (else the save is not healthy).
            now: the ``time`` recorded.

        Returns:
            ``{"step", "epoch", "new", "overwritten", "deleted", "pinned", "relinks", "healthy"}``: ``relinks``
            pairs a pinned file's current name with its new one; ``overwritten`` files are replaced by a new
            file of the same name.
        """
        healthy = self.errors_since_save == 0 and params_finite and not any(r == "exception" for r, _ in items)
        new: List[Entry] = []
        for reason, extra in items:
            self.seq += 1
            entry: Entry = {
                "file": "", "step": step, "epoch": epoch, "metrics": {}, "score": None, "reason": reason,
                "sha256": None, "bytes": None, "healthy": healthy, "time": now, "seq": self.seq,
            }
            if reason == "top_k":
                entry["score"] = float(extra["score"])
            if self.save_weights_only:
                entry["weights_only"] = True
            for k, v in extra.items():
                if k != "score":
                    entry[k] = json_safe(v)
            new.append(entry)
        evicted = self._evicted(new)

        # Never lose the newest rollback point to rotation before a newer healthy one exists.
        pinned_now: List[Entry] = []
        released: List[Entry] = []
        newest_healthy = self.newest_healthy(self.entries)
        if healthy and not self.save_weights_only:
            released = [e for e in self.entries if e.get("pinned")]
        elif newest_healthy is not None and newest_healthy in evicted:
            evicted.remove(newest_healthy)
            pinned_now.append(newest_healthy)
        overwritten, relinks = self._name(new, evicted, pinned_now, values, step, epoch, namer, taken)
        deleted = [e for e in evicted if e not in overwritten] + released
        return {"step": step, "epoch": epoch, "new": new, "overwritten": overwritten, "deleted": deleted,
                "pinned": pinned_now, "relinks": relinks, "healthy": healthy}

    def _evicted(self, new: List[Entry]) -> List[Entry]:
        """What each pool evicts once the ``new`` entries are in."""
        evicted: List[Entry] = []
        for reason, keep in (("top_k", self.save_top_k), ("interval", self.save_top_k), ("last", 1),
                             ("alert", self.keep_alert_checkpoints), ("threshold", self.keep_threshold_checkpoints)):
            fresh = [e for e in new if e["reason"] == reason]
            if not fresh or keep < 0:
                continue
            pool = self.pool(reason)
            if reason == "top_k":
                ranked = self.rank(pool + fresh)
                evicted += [e for e in ranked[keep:] if e in pool]
            else:
                evicted += pool[: max(0, len(pool) + len(fresh) - keep)]
        return evicted

    def _name(self, new: List[Entry], evicted: List[Entry], pinned_now: List[Entry], values: Mapping[str, float],
              step: int, epoch: int, namer: FileNamer, taken: Set[str]) -> Tuple[List[Entry], List[Tuple[str, str]]]:
        """Name the ``new`` entries: overwrite an evicted entry's file when the template gives the same name
        (``last.ckpt``), else take a name no file in the directory has (``-v1``, ``-v2``, ... as ModelCheckpoint)."""
        evicted_by_file = {e["file"]: e for e in evicted}
        pinned_files = {e["file"]: e for e in pinned_now}
        taken = {e["file"] for e in self.entries} | set(taken)
        overwritten: List[Entry] = []
        relinks: List[Tuple[str, str]] = []  # (pinned entry's current file, its new name)
        for entry in new:
            base = namer.base_name(entry, values, step, epoch)
            name, ver = base + namer.extension, namer.starting_version
            while True:
                if name in evicted_by_file and name not in [o["file"] for o in overwritten]:
                    overwritten.append(evicted_by_file[name])
                    break
                if name in pinned_files:
                    # The pinned file keeps its content under a new name; the new entry takes this name.
                    pinned_name, pver = base + "-healthy" + namer.extension, namer.starting_version
                    while pinned_name in taken or pinned_name in {n for _, n in relinks}:
                        pinned_name = namer.versioned(f"{base}-healthy", pver)
                        pver += 1
                    relinks.append((name, pinned_name))
                    del pinned_files[name]
                    break
                if name not in taken and name not in [e["file"] for e in new]:
                    break
                name = namer.versioned(base, ver)
                ver += 1
            entry["file"] = name
        return overwritten, relinks

    def apply(self, plan: Mapping[str, Any]) -> None:
        """Take a committed ``plan`` into the records (on every rank, once every rank agreed the save succeeded)."""
        renamed = dict(plan["relinks"])
        dropped = {id(e) for e in plan["overwritten"]} | {id(e) for e in plan["deleted"]}
        pinned = {id(e) for e in plan["pinned"]}
        entries = []
        for e in self.entries:
            if id(e) in dropped:
                continue
            if e["file"] in renamed:
                e["file"] = renamed[e["file"]]
                e["pinned"] = True
            elif id(e) in pinned:
                e["pinned"] = True
            entries.append(e)
        self.entries = entries + list(plan["new"])
        self.saves += 1
        self.errors_since_save = 0

    @staticmethod
    def describe(entries: Iterable[Entry]) -> str:
        """One line on saved ``entries``: file, reason, step, health and score of each.

        Example:
            >>> CheckpointSelection.describe([{"file": "last.ckpt", "reason": "last", "step": 4, "healthy": True}])
            'saved `last.ckpt` (last, step 4, healthy)'
        """
        return "saved " + "; ".join(
            f"`{e['file']}` ({e['reason']}, step {e['step']}, {'healthy' if e['healthy'] else 'unhealthy'}"
            + (f", score {e['score']:.6g}" if e.get("score") is not None else "") + ")" for e in entries)

    def last_is_stale(self, step: int) -> bool:
        """Whether ``last.ckpt`` is kept and does not hold ``step`` yet (checked at the end of training).

        Example:
            >>> CheckpointSelection(save_last=True).last_is_stale(8), CheckpointSelection().last_is_stale(8)
            (True, False)
        """
        lasts = self.pool("last")
        return bool(self.save_last) and (not lasts or lasts[-1]["step"] != step)

    def value_keys(self, template_fields: Iterable[str]) -> List[str]:
        """The metrics a check reads: those of the file-name template, the thresholds' and ``monitor``, sorted,
        so that every rank packs them in the same order.

        Example:
            >>> CheckpointSelection(monitor="val/loss").value_keys(["epoch", "val/acc", "step"])
            ['val/acc', 'val/loss']
        """
        fields = [f for f in template_fields if f not in ("epoch", "step")]
        thresholds = [t["metric"] for t in self.thresholds.values()]
        return sorted(set(fields + thresholds + ([self.monitor] if self.monitor else [])))

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {
            "seq": int(self.seq),
            "saves": int(self.saves),
            "entries": [dict(e) for e in self.entries],
            "errors_since_save": int(self.errors_since_save),
            "armed": {k: bool(v) for k, v in self.armed.items()},
            "last_alert_save_step": -1 if self.last_alert_save_step is None else int(self.last_alert_save_step),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Counters and threshold arms from :meth:`state_dict` (the entries are the caller's to reconcile)."""
        self.seq = int(state.get("seq", 0))
        self.saves = int(state.get("saves", 0))
        self.errors_since_save = int(state.get("errors_since_save", 0))
        armed = dict(state.get("armed", {}))
        self.armed = {n: bool(armed.get(n, True)) for n in self.thresholds}
        last_alert = int(state.get("last_alert_save_step", -1))
        self.last_alert_save_step = None if last_alert < 0 else last_alert
