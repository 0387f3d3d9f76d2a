"""A checkpoint directory and its ``manifest.json``: crash-safe commits, verification, retention and deletion.

Every file is committed atomically (temporary name in the same directory, fsync, ``os.replace``, directory
fsync), recorded in ``manifest.json`` with its SHA-256 and size, and an older file is deleted only after the
newer one is committed and recorded. On resume the manifest is read back and every file checked.
:class:`CheckpointStore` does this work on the process that writes (global rank 0); what to save and keep is
decided by :class:`~lightwatch.core.checkpoint.selection.CheckpointSelection`.
"""
from __future__ import annotations

import errno as _errno
import json
import logging
import math
import os
import uuid
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from lightwatch.core.atomic import (
    atomic_save,
    atomic_write_json,
    check_free_space,
    commit_path,
    fsync_dir,
    fsync_path,
    is_temp_name,
    link_or_copy,
    path_size,
    remove_path,
    sha256_path,
    temp_path_for,
)
from lightwatch.core.checkpoint.errors import CheckpointSaveError, CheckpointWarning, save_error
from lightwatch.core.checkpoint.naming import json_safe, utc_now
from lightwatch.core.checkpoint.selection import CheckpointSelection, Entry

__all__ = ["MANIFEST_NAME", "MANIFEST_VERSION", "CheckpointStore", "load_manifest", "local_dirpath"]

logger = logging.getLogger("lightwatch")

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Headroom over the estimated size in the free-space check: a checkpoint grows a little between saves.
_SPACE_MARGIN = 1.05


def local_dirpath(dirpath: Optional[str]) -> Optional[str]:
    """``dirpath`` as an absolute local path (``file://`` and ``~`` resolved); a ``ValueError`` for a remote URL.

    Example:
        >>> local_dirpath("file:///tmp/ckpt")
        '/tmp/ckpt'
    """
    if dirpath is None:
        return None
    dirpath = str(dirpath)
    if "://" in dirpath and not dirpath.startswith("file://"):
        raise ValueError(f"MetricCheckpoint: dirpath {dirpath!r} is not on a local filesystem; atomic "
                         "commits need rename and fsync. Write locally and sync to remote storage after.")
    return os.path.realpath(os.path.expanduser(dirpath[len("file://"):] if dirpath.startswith("file://") else dirpath))


def load_manifest(path: str) -> Dict[str, Any]:
    """The manifest at ``path``; OSError when it cannot be read, ValueError when it is not a manifest.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), MANIFEST_NAME)
        >>> atomic_write_json(path, {"version": 1, "checkpoints": []})
        >>> load_manifest(path)["checkpoints"]
        []
    """
    with open(path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("checkpoints"), list):
        raise ValueError("not a MetricCheckpoint manifest")
    return manifest


class CheckpointStore:
    """The files of one checkpoint directory and its manifest; the entries are ``selection.entries``.

    Args:
        selection: the records of the committed checkpoints and the ranking the manifest's ``best`` follows.
        dirpath: the directory (``None`` until known; names are then relative).
        verify: load every written file back (``torch.load(weights_only=True)``) before committing it.
        verify_on_resume: hash every file on resume (``False``: existence and size only).

    Example:
        >>> import os, tempfile
        >>> from lightwatch.core.checkpoint.naming import FileNamer
        >>> sel = CheckpointSelection(save_top_k=1)
        >>> store = CheckpointStore(sel, tempfile.mkdtemp())
        >>> plan = sel.plan([("interval", {})], {}, step=5, epoch=0, namer=FileNamer("{step}"), taken=store.taken)
        >>> tmp = store.temp_path(plan["new"][0])
        >>> store.write_file({"global_step": 5}, tmp)
        >>> store.commit(plan, tmp, metrics={"loss": 0.5})
        []
        >>> sel.apply(plan); store.finish(plan, writes=True)
        >>> load_manifest(store.manifest_path)["best"], store.verify_entry(sel.entries[0])
        ('step=5.ckpt', '')
    """

    def __init__(self, selection: CheckpointSelection, dirpath: Optional[str] = None, verify: bool = False,
                 verify_on_resume: bool = True) -> None:
        self.selection = selection
        self.dirpath = dirpath
        self.verify = bool(verify)
        self.verify_on_resume = bool(verify_on_resume)
        self.run = uuid.uuid4().hex
        self.events: List[Dict[str, Any]] = []
        self.export_record: Optional[Dict[str, Any]] = None
        self.garbage: List[str] = []  # evicted files not deleted yet (listed in the manifest until they are)
        self.taken: set = set()  # names in the directory that a new file must not take
        self.param_bytes = 0  # the model's size, the free-space estimate before the first save

    # ------------------------------------------------------------------------------------ paths
    @property
    def manifest_path(self) -> Optional[str]:
        return os.path.join(self.dirpath, MANIFEST_NAME) if self.dirpath else None

    def abs(self, name: str) -> str:
        return os.path.join(self.dirpath, name) if self.dirpath else name

    def temp_path(self, entry: Mapping[str, Any]) -> str:
        """The temporary name the file of ``entry`` is written under before its commit."""
        return temp_path_for(self.abs(entry["file"]), f"{self.run[:8]}-{entry['seq']}")

    # ------------------------------------------------------------------------------------ what is kept
    def records(self) -> List[Dict[str, Any]]:
        """Copies of the committed entries, oldest first, with an absolute ``path``."""
        return [dict(e, path=self.abs(e["file"])) for e in self.selection.entries]

    def best_path(self) -> str:
        """The best top-k checkpoint (the newest interval one without ``monitor``), or ``""``."""
        entry = self.selection.best_entry()
        return self.abs(entry["file"]) if entry else ""

    def best_score(self) -> Optional[torch.Tensor]:
        entry = self.selection.best_entry()
        return None if entry is None or entry.get("score") is None else torch.tensor(float(entry["score"]))

    def last_path(self) -> str:
        entries = self.selection.pool("last")
        return self.abs(entries[-1]["file"]) if entries else ""

    def best_k(self) -> Dict[str, torch.Tensor]:
        """Path -> score of the top-k checkpoints."""
        return {self.abs(e["file"]): torch.tensor(float(e["score"])) for e in self.selection.pool("top_k")}

    def kth_path(self) -> str:
        """The worst of the top-k checkpoints (the next to go), or ``""``."""
        pool = self.selection.ranked_top_k()
        return self.abs(pool[-1]["file"]) if pool else ""

    def kth_score(self) -> torch.Tensor:
        """The score a new checkpoint must beat (infinitely bad while fewer than k are kept)."""
        pool = self.selection.ranked_top_k()
        if pool:
            return torch.tensor(float(pool[-1]["score"]))
        return torch.tensor(math.inf if self.selection.mode == "min" else -math.inf)

    def newest_path(self) -> str:
        entries = self.selection.entries
        return self.abs(entries[-1]["file"]) if entries else ""

    def latest_healthy(self) -> Optional[str]:
        """The newest committed checkpoint marked healthy (a rollback point), or ``None``."""
        entry = self.selection.newest_healthy(self.selection.entries)
        return self.abs(entry["file"]) if entry else None

    def is_best(self, path: str) -> bool:
        """Whether ``path`` is the best checkpoint's file."""
        entry = self.selection.best_entry()
        return bool(entry) and os.path.realpath(self.abs(entry["file"])) == os.path.realpath(path)

    # ------------------------------------------------------------------------------------ manifest
    def manifest(self, entries: Optional[List[Entry]] = None, pending: Optional[List[Entry]] = None,
                 garbage: Optional[List[str]] = None) -> Dict[str, Any]:
        """The manifest document for ``entries`` (default: the committed ones)."""
        entries = self.selection.entries if entries is None else entries
        best, last = self.selection.best_and_last(entries)
        doc: Dict[str, Any] = {
            "version": MANIFEST_VERSION,
            "monitor": self.selection.monitor,
            "mode": self.selection.mode,
            "best": best,
            "last": last,
            "checkpoints": [json_safe(e) for e in entries],
            "run": self.run,
            "events": json_safe(self.events),
        }
        if pending:
            doc["pending"] = [json_safe(e) for e in pending]
        garbage = self.garbage if garbage is None else garbage
        if garbage:
            doc["garbage"] = list(garbage)
        if self.export_record:
            doc["export"] = json_safe(self.export_record)
        return doc

    def write_manifest(self, **kwargs: Any) -> None:
        """Rewrite ``manifest.json`` atomically (keyword arguments as :meth:`manifest`)."""
        atomic_write_json(self.manifest_path or MANIFEST_NAME, self.manifest(**kwargs))

    def verify_entry(self, entry: Mapping[str, Any], full_hash: Optional[bool] = None) -> str:
        """What is wrong with the file of ``entry`` (missing, other size, other hash), or ``""``."""
        path = self.abs(entry["file"])
        if not os.path.exists(path):
            return "the file is missing"
        size = entry.get("bytes")
        if size is not None and path_size(path) != int(size):
            return f"its size is {path_size(path):,} bytes, the manifest says {int(size):,}"
        if (self.verify_on_resume if full_hash is None else full_hash) and entry.get("sha256"):
            if sha256_path(path) != entry["sha256"]:
                return "its SHA-256 does not match the manifest (the file was altered or is corrupt)"
        return ""

    def adopt_manifest(self, directory: str) -> None:
        """Take the verified entries of the manifest in ``directory`` (read only; nothing is moved or deleted).

        For an instance that did not train itself: the main process of ``ddp_spawn``, whose workers committed
        the files. Entries whose file is missing or has another size are left out.
        """
        try:
            manifest = load_manifest(os.path.join(directory, MANIFEST_NAME))
        except (OSError, ValueError):
            return
        if self.dirpath is None:
            self.dirpath = directory
        elif os.path.realpath(self.dirpath) != os.path.realpath(directory):
            return
        entries = [dict(e) for e in manifest["checkpoints"] if isinstance(e, dict) and e.get("file")]
        self.selection.entries = [e for e in entries if not self.verify_entry(e, full_hash=False)]
        self.run = str(manifest.get("run") or self.run)
        self.events = list(manifest.get("events") or [])

    def state_dict(self, schedule: Mapping[str, Any], paths: Mapping[str, Any]) -> Dict[str, Any]:
        """A checkpoint callback's saved state: the run, the directory, the selection's counters and entries,
        ``schedule`` (the schedule's state) and ``paths`` (``best_model_path``, ``best_model_score`` and
        ``last_model_path`` as the callback reports them), in the order the callback has always saved them."""
        sel = self.selection.state_dict()
        return {
            "version": MANIFEST_VERSION, "run": self.run, "dirpath": self.dirpath, "monitor": self.selection.monitor,
            "seq": sel["seq"], "saves": sel["saves"], "entries": sel["entries"],
            "errors_since_save": sel["errors_since_save"], "armed": sel["armed"],
            **schedule,
            "last_alert_save_step": sel["last_alert_save_step"],
            **paths,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The run, counters and entries of a checkpoint callback's saved state; the entries are only a fallback
        until the manifest, the record of truth, is read at train start (:meth:`read_and_verify`)."""
        # `trainer.validate/test(ckpt_path="best")` after a fit in this process loads a checkpoint whose copy of
        # the entries predates the file itself (it is committed after it is written): this run's own entries
        # are newer, and stay
        own = self.selection.entries
        newer = [dict(e) for e in own] if own and state.get("run") == self.run else None
        self.run = str(state.get("run", self.run))
        self.selection.load_state_dict(state)
        saved_dir = state.get("dirpath")
        if saved_dir and self.dirpath and os.path.realpath(saved_dir) != os.path.realpath(self.dirpath):
            warnings.warn(f"MetricCheckpoint: dirpath changed from {saved_dir!r} to {self.dirpath!r}; the earlier "
                          "checkpoints are not tracked here.", CheckpointWarning, stacklevel=3)
            self.selection.entries = []
        else:
            self.selection.entries = newer if newer is not None else [dict(e) for e in state.get("entries", [])]

    def read_and_verify(self, resuming: bool) -> Dict[str, Any]:
        """Rank 0 at train start: read the manifest, check every file, finish an interrupted commit, delete
        leftovers, write the manifest back; returns what every rank adopts with :meth:`adopt`."""
        directory = self.dirpath or "."
        os.makedirs(directory, exist_ok=True)
        manifest: Optional[Dict[str, Any]] = None
        archived = ""
        path = self.manifest_path or MANIFEST_NAME
        if os.path.exists(path):
            try:
                manifest = load_manifest(path)
            except (OSError, ValueError) as exc:
                archived = (f"MetricCheckpoint: {path} could not be read ({exc}); it was renamed aside and the "
                            "checkpoint state restored from the resumed checkpoint (if any).")
                os.replace(path, os.path.join(directory, f"manifest-unreadable-{uuid.uuid4().hex[:8]}.json"))
                manifest = None
        if manifest is not None and not resuming and manifest.get("run") != self.run:
            # A fresh run in a directory used before: keep the old files and record, start a new manifest.
            aside = os.path.join(directory, f"manifest-{str(manifest.get('run') or 'previous')[:8]}.json")
            os.replace(path, aside)
            archived = (f"MetricCheckpoint: {directory} already holds checkpoints of an earlier run; its manifest "
                        f"was moved to {os.path.basename(aside)} and its files are left untouched. This run starts a "
                        "new manifest (resume with trainer.fit(ckpt_path=...) to continue the earlier one).")
            manifest = None

        if manifest is not None:
            entries = [dict(e) for e in manifest.get("checkpoints", []) if isinstance(e, dict) and e.get("file")]
            run = str(manifest.get("run") or self.run)
            events = list(manifest.get("events") or [])
            export = manifest.get("export")
        else:
            entries, run, events, export = [dict(e) for e in self.selection.entries], self.run, list(self.events), None
        dropped: List[str] = []
        verified: List[Entry] = []
        for entry in entries:
            problem = self.verify_entry(entry)
            if problem:
                dropped.append(f"MetricCheckpoint: dropped {entry['file']} ({entry.get('reason')}, step "
                               f"{entry.get('step')}) from the manifest: {problem}. It is no longer a best, last or "
                               "rollback checkpoint.")
            else:
                verified.append(entry)
        files = {e["file"] for e in verified}
        # A crash between a rename and the manifest update: a pending file whose hash matches is committed.
        for entry in (manifest or {}).get("pending", []) or []:
            if isinstance(entry, dict) and entry.get("file") and entry["file"] not in files \
                    and not self.verify_entry(entry, full_hash=True):
                verified.append(dict(entry))
                files.add(entry["file"])
        verified.sort(key=lambda e: int(e.get("seq", 0)))
        for name in (manifest or {}).get("garbage", []) or []:
            if name not in files:
                remove_path(os.path.join(directory, name))
        for name in os.listdir(directory):
            if is_temp_name(name):
                remove_path(os.path.join(directory, name))  # partial writes of a killed run
        taken = sorted(n for n in os.listdir(directory) if not is_temp_name(n))
        self.run, self.selection.entries, self.events, self.export_record = run, verified, events, export
        self.garbage = []
        fsync_dir(directory)
        self.write_manifest()
        return {"run": run, "entries": verified, "events": events, "export": export, "taken": taken,
                "dropped": dropped, "archived": archived}

    def adopt(self, payload: Mapping[str, Any]) -> None:
        """Every rank: take the result of :meth:`read_and_verify` (broadcast from rank 0)."""
        self.run = payload["run"]
        self.selection.entries = payload["entries"]
        self.events = payload["events"]
        self.export_record = payload["export"]
        self.taken = set(payload["taken"])
        self.garbage = []
        self.selection.seq = max([self.selection.seq] + [int(e.get("seq", 0)) for e in self.selection.entries])

    def add_event(self, kind: str, step: Optional[int], fields: Mapping[str, Any]) -> None:
        """Append an event of ``kind`` with ``fields`` (and ``step`` unless a field gives it) to ``events``."""
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"MetricCheckpoint.record_event: kind must be a non-empty string, got {kind!r}.")
        event: Dict[str, Any] = {"kind": kind, "time": utc_now()}
        if "step" not in fields and step is not None:
            event["step"] = int(step)
        event.update({str(k): json_safe(v) for k, v in fields.items()})
        self.events.append(event)

    # ------------------------------------------------------------------------------------ writing
    def check_space(self) -> None:
        """An ``OSError`` (``ENOSPC``) when the directory has no room for a checkpoint of the last one's size."""
        sizes = [int(e["bytes"]) for e in self.selection.entries if e.get("bytes")]
        estimate = int(max(sizes[-1] if sizes else 0, self.param_bytes) * _SPACE_MARGIN)
        check_free_space(self.dirpath or ".", estimate, "the next checkpoint")

    def space_problem(self) -> float:
        """1.0 when :meth:`check_space` fails, else 0.0 (a flag for the ranks to agree on)."""
        try:
            self.check_space()
        except OSError:
            return 1.0
        return 0.0

    @staticmethod
    def write_file(checkpoint: Mapping[str, Any], path: str) -> None:
        """Stream ``checkpoint`` into ``path`` with ``torch.save`` (no staging copy in memory or elsewhere)."""
        with open(path, "wb") as fh:
            torch.save(checkpoint, fh)

    @staticmethod
    def verify_file(path: str) -> None:
        """An ``OSError`` (``EIO``) unless the file at ``path`` loads back with ``torch.load``."""
        if os.path.isdir(path):
            return
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            if "weights_only" in str(exc) or "Unsupported global" in str(exc):
                # Complete, but holds objects outside the weights_only allow-list (e.g. custom hyperparameters).
                warnings.warn(f"MetricCheckpoint: {os.path.basename(path)} does not load with weights_only=True "
                              f"({str(exc).splitlines()[0]}); a rollback will need to allow those types.",
                              CheckpointWarning, stacklevel=2)
                return
            raise OSError(_errno.EIO, f"the written checkpoint does not load back: {exc}") from exc

    def commit(self, plan: Mapping[str, Any], tmp: str, metrics: Mapping[str, Optional[float]]) -> List[str]:
        """Rank 0: fsync, hash, verify, then commit the files of ``plan`` and the manifest in a crash-safe order.

        Returns the temporary names it made (to remove if a later step fails).
        """
        new: List[Entry] = plan["new"]
        if not os.path.exists(tmp):
            raise FileNotFoundError(_errno.ENOENT, f"the checkpoint writer did not create {tmp!r}")
        fsync_path(tmp)
        digest, size = sha256_path(tmp), path_size(tmp)
        if self.verify:
            self.verify_file(tmp)
        for entry in new:
            entry["sha256"], entry["bytes"] = digest, size
            entry["metrics"] = dict(metrics)
        # 1. A pinned file that must give up its name gets a second name (a hard link) first.
        for old_name, pinned_name in plan["relinks"]:
            link_or_copy(self.abs(old_name), self.abs(pinned_name))
        if plan["relinks"]:
            fsync_dir(self.dirpath or ".")
        renamed = dict(plan["relinks"])
        # 2. Manifest: files about to be replaced leave the committed list; the new files are "pending", so a
        #    crash after their rename still finds them (promoted on resume when their hash matches).
        overwritten = {id(e) for e in plan["overwritten"]}
        kept = []
        for e in self.selection.entries:
            if id(e) in overwritten:
                continue
            if e["file"] in renamed:
                e = dict(e, file=renamed[e["file"]], pinned=True)
            elif any(e is p for p in plan["pinned"]):
                e = dict(e, pinned=True)
            kept.append(e)
        self.write_manifest(entries=kept, pending=list(new) + list(plan["overwritten"]))
        # 3. Rename into place: the first name from the temporary, the others hard-linked to it.
        temps: List[str] = []
        commit_path(tmp, self.abs(new[0]["file"]))
        for entry in new[1:]:
            link_tmp = self.temp_path(entry)
            temps.append(link_tmp)
            link_or_copy(self.abs(new[0]["file"]), link_tmp)
            commit_path(link_tmp, self.abs(entry["file"]))
        # 4. Manifest with the new files committed and the evicted ones listed for deletion, then delete them.
        deleted = {id(e) for e in plan["deleted"]}
        final = [e for e in kept if id(e) not in deleted and e["file"] not in {d["file"] for d in plan["deleted"]}]
        garbage = self.garbage + [e["file"] for e in plan["deleted"]]
        self.write_manifest(entries=final + list(new), pending=[], garbage=garbage)
        return temps

    @staticmethod
    def discard(paths: List[str]) -> None:
        """Remove the temporary files of a failed save."""
        for path in paths:
            remove_path(path)

    def finish(self, plan: Mapping[str, Any], writes: bool) -> None:
        """After :meth:`CheckpointSelection.apply`: names taken and freed; the process that ``writes`` deletes
        the evicted files (one it cannot delete stays listed, and is deleted on resume)."""
        self.taken |= {e["file"] for e in plan["new"]} | {n for _, n in plan["relinks"]}
        if writes:
            self.garbage += [e["file"] for e in plan["deleted"]]
            current = {e["file"] for e in self.selection.entries}
            remaining = []
            for name in self.garbage:
                if name in current:
                    continue
                try:
                    remove_path(self.abs(name))
                except OSError as exc:  # leave it listed; it is deleted on resume
                    logger.warning("MetricCheckpoint: could not delete %s: %s", name, exc)
                    remaining.append(name)
            self.garbage = remaining
            if plan["deleted"]:
                fsync_dir(self.dirpath or ".")
                self.write_manifest()
        for e in plan["deleted"]:
            self.taken.discard(e["file"])

    def save_error(self, plan: Mapping[str, Any], code: int, failed_rank: int, best: str, last: str,
                   latest_healthy: Optional[str]) -> CheckpointSaveError:
        """The error every rank raises when the save of ``plan`` failed (``code``: the errno, or -1)."""
        return save_error(plan, self.dirpath, MANIFEST_NAME, code, failed_rank, best, last, latest_healthy)

    def write_export(self, fmt: str, write: Callable[[str], Any]) -> str:
        """Commit an export of the model as ``best.onnx`` (``fmt="onnx"``) or ``best.pt``; ``write(path)`` writes
        it. Returns the final path."""
        final = self.abs("best.onnx" if fmt == "onnx" else "best.pt")
        atomic_save(write, final)
        return final

    def record_export(self, fmt: str, path: str, source: Mapping[str, Any]) -> None:
        """Record the export at ``path`` in the manifest, with the checkpoint entry it was made from."""
        self.export_record = {"format": fmt, "file": os.path.basename(path), "source": source["file"],
                              "step": source["step"], "sha256": sha256_path(path), "bytes": path_size(path),
                              "time": utc_now()}
        self.write_manifest()
