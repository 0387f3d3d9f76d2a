"""Reading what a monitored run left on disk: event files, ``alerts.jsonl``, the data profile, manifests.

Event files are read through TensorBoard's own ``EventAccumulator``, so any log a TensorBoard can open is
read the same way here, whichever lightwatch version wrote the tags. What cannot be read (a missing or
corrupt file, a profile of a newer format, a half-written alert line) is never an exception: it is kept
in :attr:`RunLog.problems`, worded for the person reading the report.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

__all__ = ["RunLog", "ManifestReading", "LogDirError", "find_runs", "read_run", "read_alerts", "EVENT_FILE_MARK"]

#: the part of the name every TensorBoard event file has
EVENT_FILE_MARK = "tfevents"
ALERTS_NAME = "alerts.jsonl"
PROFILE_NAME = "data_profile.json"
MANIFEST_NAME = "manifest.json"  # the same name as lightwatch.core.checkpoint.store.MANIFEST_NAME
_MAX_DEPTH = 4


class LogDirError(ValueError):
    """A log directory that does not exist or holds no run lightwatch can read."""


@dataclass
class ManifestReading:
    """A checkpoint manifest and what checking its files found.

    Args:
        path: the manifest's path.
        manifest: its content (``{}`` when it could not be read).
        checks: per file named in it: ``{"file", "exists", "size_ok", "sha256_ok", "problem"}``.
        problem: why the manifest itself could not be read (``""``: it could).
    """

    path: str
    manifest: Dict[str, Any] = field(default_factory=dict)
    checks: List[Dict[str, Any]] = field(default_factory=list)
    problem: str = ""


@dataclass
class RunLog:
    """Everything read from one run directory.

    Args:
        path: the run directory (where the event files are).
        scalars: ``tag -> [(step, value), ...]`` in step order.
        alerts: the records of ``alerts.jsonl`` in file order.
        profile: the run's :class:`~lightwatch.profile.DataProfile`, if there is a readable one.
        manifests: the checkpoint manifests found in the run directory and below.
        checkpoint_files: ``.ckpt`` files found in the run directory and below (with or without a manifest).
        event_files: the event files read.
        alerts_file: whether there is an ``alerts.jsonl`` (a run writes one only when something happened).
        problems: what could not be read, one sentence each.
    """

    path: str
    scalars: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)
    alerts: List[Dict[str, Any]] = field(default_factory=list)
    profile: Any = None
    manifests: List[ManifestReading] = field(default_factory=list)
    checkpoint_files: List[str] = field(default_factory=list)
    event_files: List[str] = field(default_factory=list)
    alerts_file: bool = False
    problems: List[str] = field(default_factory=list)

    def series(self, tag: str) -> List[Tuple[int, float]]:
        """The points of ``tag`` (an empty list when the run never wrote it)."""
        return self.scalars.get(tag, [])


def _has_run_files(directory: str) -> bool:
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    return any(EVENT_FILE_MARK in n for n in names) or ALERTS_NAME in names


def find_runs(logdir: str) -> List[str]:
    """The run directories in ``logdir``: itself if it holds event files or ``alerts.jsonl``, else those below.

    Raises:
        LogDirError: ``logdir`` does not exist, or no run is found in it (searched ``_MAX_DEPTH`` levels deep).

    Example:
        >>> import tempfile
        >>> try:
        ...     find_runs(tempfile.mkdtemp())
        ... except LogDirError as err:
        ...     print(str(err).startswith("no lightwatch run found in "))
        True
    """
    root = os.path.abspath(os.path.expanduser(logdir))
    if not os.path.isdir(root):
        raise LogDirError(f"{logdir}: no such directory. Pass the run's log directory (the one with the "
                          f"events.out.tfevents.* files, e.g. lightning_logs/version_0) or a parent of several.")
    if _has_run_files(root):
        return [root]
    found: List[str] = []
    base_depth = root.rstrip(os.sep).count(os.sep)
    for current, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if current.count(os.sep) - base_depth >= _MAX_DEPTH:
            dirs[:] = []
        if current != root and _has_run_files(current):
            found.append(current)
            dirs[:] = [d for d in dirs if d != "checkpoints"]
    if not found:
        raise LogDirError(f"no lightwatch run found in {logdir}: no events.out.tfevents.* file and no {ALERTS_NAME} "
                          f"in it or in the {_MAX_DEPTH} levels below. Is it the Trainer's log directory?")
    return found


def read_alerts(path: str) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The records of an ``alerts.jsonl`` and the problems met; a half-written last line is tolerated.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "alerts.jsonl")
        >>> _ = open(p, "w").write('{"rule": "a", "step": 3, "severity": "warning"}\\n{"rule": "b", "st')
        >>> alerts, problems = read_alerts(p)
        >>> [a["rule"] for a in alerts], problems[0][:41]
        (['a'], 'alerts.jsonl: the last line is incomplete')
    """
    if not os.path.exists(path):
        return [], []
    out: List[Dict[str, Any]] = []
    problems: List[str] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().split("\n")
    except OSError as err:
        return [], [f"{ALERTS_NAME}: cannot be read ({err})."]
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if i == last:
                problems.append(f"{ALERTS_NAME}: the last line is incomplete (the run was still writing it, or "
                                "stopped while writing); it is left out.")
            else:
                problems.append(f"{ALERTS_NAME}: line {i + 1} is not a JSON object; it is left out.")
            continue
        out.append(_normalise_alert(record))
    return out, problems


def _normalise_alert(record: Dict[str, Any]) -> Dict[str, Any]:
    """The alert with every key of the schema present (an older or foreign writer may have left some out)."""
    out = dict(record)
    for key, default in (("step", 0), ("epoch", 0), ("source", "?"), ("rule", "?"), ("severity", "warning"),
                         ("subject", None), ("value", None), ("threshold", None), ("action", "log"),
                         ("message", ""), ("time", None)):
        out.setdefault(key, default)
    try:
        out["step"] = int(out["step"])
    except (TypeError, ValueError):
        out["step"] = 0
    if out["severity"] not in ("info", "warning", "error", "critical"):
        out["severity"] = "warning"
    return out


def _read_scalars(run_dir: str) -> Tuple[Dict[str, List[Tuple[int, float]]], List[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Every scalar point is kept; the other kinds are not needed and are kept to one point each.
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "histograms": 1, "tensors": 1, "images": 1,
                                                   "audio": 1, "compressedHistograms": 1})
    try:
        acc.Reload()
    except Exception as err:  # a truncated or foreign file: say so, keep what was read
        return {}, [f"event files in {run_dir}: cannot be read ({type(err).__name__}: {err})."]
    out: Dict[str, List[Tuple[int, float]]] = {}
    for tag in acc.Tags().get("scalars", []):
        points: Dict[int, float] = {}
        for event in acc.Scalars(tag):
            points[int(event.step)] = float(event.value)  # a resumed run rewrites steps: the last write wins
        out[tag] = sorted(points.items())
    return out, []


def _read_profile(path: str) -> Tuple[Any, List[str]]:
    if not os.path.exists(path):
        return None, []
    from lightwatch.profile import DataProfile, ProfileError

    try:
        return DataProfile.load(path), []
    except (ProfileError, OSError, ValueError) as err:
        return None, [f"{PROFILE_NAME}: cannot be read: {err}"]


def _read_manifest(path: str, verify_hashes: bool) -> ManifestReading:
    from lightwatch.core.atomic import sha256_path

    reading = ManifestReading(path)
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("checkpoints"), list):
            raise ValueError("not a MetricCheckpoint manifest (no 'checkpoints' list)")
    except (OSError, ValueError) as err:
        reading.problem = f"{path}: cannot be read: {err}"
        return reading
    reading.manifest = manifest
    directory = os.path.dirname(path)
    for entry in manifest["checkpoints"]:
        if not isinstance(entry, dict) or not entry.get("file"):
            continue
        file_path = os.path.join(directory, str(entry["file"]))
        check: Dict[str, Any] = {"file": str(entry["file"]), "exists": os.path.exists(file_path), "size_ok": None,
                                 "sha256_ok": None, "problem": ""}
        if not check["exists"]:
            check["problem"] = "missing"
        else:
            if isinstance(entry.get("bytes"), int) and os.path.isfile(file_path):
                check["size_ok"] = os.path.getsize(file_path) == entry["bytes"]
            if verify_hashes and entry.get("sha256"):
                check["sha256_ok"] = sha256_path(file_path) == entry["sha256"]
            if check["size_ok"] is False or check["sha256_ok"] is False:
                check["problem"] = "does not match the manifest (size or SHA-256)"
        reading.checks.append(check)
    return reading


def read_run(run_dir: str, verify_hashes: bool = True) -> RunLog:
    """Read one run directory (see :func:`find_runs`); nothing missing is an error, it is a problem noted.

    Args:
        run_dir: the directory of the run's event files.
        verify_hashes: hash every checkpoint the manifest names (``False``: existence and size only).
    """
    run = RunLog(os.path.abspath(run_dir))
    names = sorted(os.listdir(run.path))
    run.event_files = [os.path.join(run.path, n) for n in names if EVENT_FILE_MARK in n]
    if run.event_files:
        run.scalars, problems = _read_scalars(run.path)
        run.problems += problems
    else:
        run.problems.append("no TensorBoard event file: no curves, layers or drift scalars to read.")
    run.alerts_file = os.path.exists(os.path.join(run.path, ALERTS_NAME))
    run.alerts, problems = read_alerts(os.path.join(run.path, ALERTS_NAME))
    run.problems += problems
    run.profile, problems = _read_profile(os.path.join(run.path, PROFILE_NAME))
    run.problems += problems
    for current, dirs, files in os.walk(run.path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if current == run.path else sorted(dirs)
        if current.count(os.sep) - run.path.count(os.sep) >= 2:
            dirs[:] = []
        if MANIFEST_NAME in files:
            reading = _read_manifest(os.path.join(current, MANIFEST_NAME), verify_hashes)
            run.manifests.append(reading)
            if reading.problem:
                run.problems.append(reading.problem)
        run.checkpoint_files += sorted(os.path.join(current, f) for f in files if f.endswith(".ckpt"))
    return run
