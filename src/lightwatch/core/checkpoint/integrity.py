"""Checks that keep a damaged file from being used: a checkpoint against the manifest's record of it before it is
loaded (resume, ``ckpt_path="best"``, rollback), and a ``dirpath`` that can never hold checkpoints at construction.

A file the manifest records must still have its size and SHA-256 (the size only with ``verify_on_resume=False``);
one that does not raises :class:`~lightwatch.core.checkpoint.errors.CheckpointIntegrityError` naming the newest
file that still matches, and a rollback passes over it to the previous healthy one that does.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from lightwatch.core.atomic import path_size, sha256_path
from lightwatch.core.checkpoint.errors import CheckpointIntegrityError
from lightwatch.core.checkpoint.store import MANIFEST_NAME, CheckpointStore, load_manifest

__all__ = ["check_dirpath", "check_recorded", "recorded_entries", "verified_rollback_point", "verify_recorded"]


def check_dirpath(dirpath: Optional[str], owner: str = "MetricCheckpoint") -> None:
    """A ``ValueError`` now, at construction, when ``dirpath`` can never hold checkpoints: it (or the nearest
    part of it that exists) is a file, or that part is on a read-only filesystem or not writable.

    Example:
        >>> import tempfile
        >>> check_dirpath(os.path.join(tempfile.mkdtemp(), "not", "made", "yet"))
        >>> try:
        ...     check_dirpath(__file__)
        ... except ValueError as err:
        ...     print("not a directory" in str(err))
        True
    """
    if dirpath is None:
        return
    existing = dirpath
    while not os.path.lexists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            return
        existing = parent
    if not os.path.isdir(existing):
        where = "" if existing == dirpath else f" (its part {existing!r} is a file)"
        raise ValueError(f"{owner}: dirpath {dirpath!r} is not a directory{where}. Give a directory path, or "
                         "remove the file that is in the way.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{owner}: dirpath {dirpath!r} is not writable ({existing!r} is read-only or not writable "
                         "by this user). Choose a writable directory, or fix its permissions.")
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    if read_only:  # root passes os.access, not a read-only mount
        raise ValueError(f"{owner}: dirpath {dirpath!r} is not writable ({existing!r} is on a read-only "
                         "filesystem). Choose a directory on a writable filesystem.")


def recorded_entries(store: CheckpointStore, path: str) -> List[Dict[str, Any]]:
    """The manifest's records of the file at ``path``, read from disk: the committed one first, then pending
    ones (a kill between a save's pending manifest and its rename leaves the old file under a name the new
    record already holds). Empty when ``path`` is not in this directory, the manifest is unreadable, or it
    does not name the file."""
    if not store.dirpath or not path or os.path.realpath(os.path.dirname(os.path.abspath(str(path)))) != \
            os.path.realpath(store.dirpath):
        return []
    try:
        manifest = load_manifest(os.path.join(store.dirpath, MANIFEST_NAME))
    except (OSError, ValueError):
        return []
    name = os.path.basename(str(path))
    return [dict(e) for e in list(manifest["checkpoints"]) + list(manifest.get("pending") or [])
            if isinstance(e, dict) and e.get("file") == name]


def verify_recorded(store: CheckpointStore, path: str) -> str:
    """What is wrong with ``path`` against the manifest's records of it (``""``: it matches one of them, or
    the manifest does not track it). The hash is checked unless ``verify_on_resume`` is off (size only)."""
    entries = recorded_entries(store, path)
    problems = [store.verify_entry(e) for e in entries]
    if not entries or not all(problems):
        return ""
    entry, problem = entries[0], problems[0]
    try:
        manifest = load_manifest(os.path.join(store.dirpath or ".", MANIFEST_NAME))
        records = [e for e in list(manifest["checkpoints"]) + list(manifest.get("pending") or [])
                   if isinstance(e, dict) and e.get("file")]
        others = [e for e in manifest["checkpoints"] if isinstance(e, dict) and e.get("file") != entry["file"]]
        committed = any(isinstance(e, dict) and e.get("file") == entry["file"] for e in manifest["checkpoints"])
    except (OSError, ValueError):
        records, others, committed = [], [], True
    if not committed and os.path.exists(str(path)) and _matches_any(store, str(path), records):
        # A kill inside a save can leave a committed checkpoint under a name only a pending record holds (the old
        # last.ckpt, its record moved to a pinned name): that content is verified, so it may load. A name with a
        # committed record must match that record: another checkpoint's content there is a replacement.
        return ""
    good = [e for e in reversed(others) if not store.verify_entry(e, full_hash=True)]
    hint = (f"The newest checkpoint that still matches its record is {store.abs(good[0]['file'])} (step "
            f"{good[0].get('step')}): resume from it" if good else
            "No other checkpoint in the manifest matches its record: start afresh")
    return (f"MetricCheckpoint: {path} does not match manifest.json ({problem}); it was truncated, altered or "
            f"replaced after step {entry.get('step')} was committed, and is not loaded. {hint}, or delete the "
            "file's entry from manifest.json if you replaced it on purpose.")


def _matches_any(store: CheckpointStore, path: str, records: List[Dict[str, Any]]) -> bool:
    """Whether the file at ``path`` has the size (and, unless ``verify_on_resume`` is off, the SHA-256) of one
    of ``records``."""
    size = path_size(path)
    same_size = [e for e in records if e.get("bytes") is not None and int(e["bytes"]) == size]
    if not same_size:
        return False
    if not store.verify_on_resume:
        return True
    digest = sha256_path(path)
    return any(e.get("sha256") == digest for e in same_size)


def check_recorded(store: CheckpointStore, path: str) -> None:
    """A :class:`CheckpointIntegrityError` unless ``path`` matches the manifest's record of it."""
    problem = verify_recorded(store, path)
    if problem:
        raise CheckpointIntegrityError(problem)


def verified_rollback_point(store: CheckpointStore) -> Tuple[Optional[str], List[str]]:
    """The newest healthy full checkpoint whose file still matches its size and SHA-256, and what is wrong
    with each newer one that was passed over (``(None, problems)`` when none matches)."""
    healthy = [e for e in store.selection.entries if e.get("healthy") and not e.get("weights_only")]
    healthy.sort(key=lambda e: (int(e["step"]), int(e.get("seq", 0))), reverse=True)
    skipped: List[str] = []
    for entry in healthy:
        problem = store.verify_entry(entry, full_hash=True)
        if not problem:
            return store.abs(entry["file"]), skipped
        skipped.append(f"{entry['file']} (step {entry.get('step')}): {problem}")
    return None, skipped
