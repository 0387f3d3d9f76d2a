"""``MetricCheckpoint``: checkpoints on metrics and on events that a crash, a full disk or a resume cannot lose.

It is a Lightning :class:`~pytorch_lightning.callbacks.Checkpoint`, so the Trainer treats it as *the*
checkpoint callback (no default ``ModelCheckpoint`` is added, ``trainer.test(ckpt_path="best")`` uses it).
Every file is committed atomically (temporary name in the same directory, fsync, ``os.replace``, directory
fsync), recorded in ``manifest.json`` with its SHA-256 and size, and an older file is deleted only after the
newer one is committed and recorded. See the README section on ``MetricCheckpoint`` for the guarantees and the format.
"""
from __future__ import annotations

import datetime as _dt
import errno as _errno
import json
import logging
import math
import os
import random
import re
import string
import uuid
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple
from weakref import proxy

import numpy as np
import torch
from torch.nn.parameter import is_lazy

from lightwatch.core.lightning import bind, default_package, package_of
from lightwatch.core.actions import ActionContext, register_action
from lightwatch.core.alerts import Alert, AlertCooldown, MonitorError, alert_log, severity_at_least
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
from lightwatch.core.reduce import agree_max, all_reduce_flat
from lightwatch.core.runtime import distributed_ready, is_global_zero, is_sharded_strategy, local_tensor, logging_step
from lightwatch.core.writer import MonitorWriter

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = [
    "MetricCheckpoint",
    "CheckpointSaveError",
    "CheckpointWarning",
    "REASONS",
    "MANIFEST_NAME",
    "collect_rng_state",
    "restore_rng_state",
]

logger = logging.getLogger("lightwatch")

REASONS: Tuple[str, ...] = ("top_k", "last", "threshold", "interval", "alert", "exception")
REQUESTABLE_REASONS: Tuple[str, ...] = ("alert", "interval", "last", "exception")
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_SOURCE = "MetricCheckpoint"
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9_.=+\-]")
# Headroom over the estimated size in the free-space check: a checkpoint grows a little between saves.
_SPACE_MARGIN = 1.05


def _load_manifest(path: str) -> Dict[str, Any]:
    """The manifest at ``path``; OSError when it cannot be read, ValueError when it is not a manifest."""
    with open(path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("checkpoints"), list):
        raise ValueError("not a MetricCheckpoint manifest")
    return manifest


class CheckpointSaveError(OSError):
    """A checkpoint could not be written or committed; raised with the same message on every rank.

    ``errno`` is the operating-system error of the failing rank (``errno.ENOSPC`` for a full disk), or ``None``
    for an error that was not an ``OSError``. The checkpoints committed before are intact.
    """


class CheckpointWarning(UserWarning):
    """Category of the warnings ``MetricCheckpoint`` issues (a dropped file, a missing metric, ...)."""


# ------------------------------------------------------------------------------------------------- RNG
def collect_rng_state() -> Dict[str, Any]:
    """The random-number-generator states of torch (CPU and CUDA), numpy and Python ``random``.

    Encoded with tensors, lists, ints, floats and strings only, so a checkpoint holding it loads with
    ``torch.load(path, weights_only=True)``. :func:`restore_rng_state` sets them back.

    Example:
        >>> state = collect_rng_state()
        >>> a = torch.rand(2); restore_rng_state(state); b = torch.rand(2)
        >>> bool(torch.equal(a, b))
        True
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "state": [int(v) for v in py_state],
                   "gauss_next": None if py_gauss is None else float(py_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the generators back to a state from :func:`collect_rng_state` (or ``checkpoint["lightwatch"]["rng"]``).

    Missing parts are left alone, so a state written on a CPU machine restores on a GPU machine and back.
    """
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda])
    np_state = state.get("numpy")
    if np_state:
        keys = np_state["keys"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((str(np_state["name"]), keys.astype(np.uint32), int(np_state["pos"]),
                             int(np_state["has_gauss"]), float(np_state["cached_gaussian"])))
    py_state = state.get("python")
    if py_state:
        random.setstate((int(py_state["version"]), tuple(int(v) for v in py_state["state"]),
                         py_state.get("gauss_next")))


# ---------------------------------------------------------------------------------------------- helpers
def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _finite_or_none(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json_safe(obj: Any) -> Any:
    """Plain JSON values: non-finite floats become ``None``, tensors numbers or lists, anything else text."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.item() if obj.numel() == 1 else obj.tolist())
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return str(obj)


def _plain(obj: Any) -> Any:
    """OmegaConf containers (or any mapping / sequence) as plain dicts and lists."""
    if isinstance(obj, Mapping) or (hasattr(obj, "items") and hasattr(obj, "keys")):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or (hasattr(obj, "__iter__") and type(obj).__name__ == "ListConfig"):
        return [_plain(v) for v in obj]
    return obj


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


def _template_fields(template: str, where: str) -> List[str]:
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


def _render(template: str, values: Mapping[str, float], step: int, epoch: int, auto_insert_metric_name: bool) -> str:
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
        out.append(f"{safe_name_part(field)}={text}" if auto_insert_metric_name else text)
    return "".join(out)


def _check_int(value: Any, name: str, minimum: int, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"MetricCheckpoint: {name} must be an integer >= {minimum}"
                         f"{' (or None)' if allow_none else ''}, got {value!r}.")
    return int(value)


def _parse_thresholds(thresholds: Any) -> Dict[str, Dict[str, Any]]:
    if thresholds is None:
        return {}
    thresholds = _plain(thresholds)
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


# ----------------------------------------------------------------------------------------- the callback
class _MetricCheckpoint:
    """Save checkpoints on a monitored metric (top-k), thresholds, intervals, alerts and exceptions, safely.

    What it saves, and when (``reason`` in the manifest):

    - ``top_k``: at every check (every ``every_n_epochs`` epochs by default, or every ``every_n_train_steps``
      steps) the monitored metric is compared with the ``save_top_k`` best so far; a better value is saved and
      the worst one deleted after. A NaN, infinite or missing value is never saved as top-k, so it never
      becomes best. Without ``monitor``, checks save ``interval`` checkpoints and keep the ``save_top_k`` newest.
    - ``last``: ``last.ckpt`` is rewritten at every check (and at the end of training), whether or not the
      metric improved.
    - ``threshold``: ``thresholds={"acc90": {"metric": "val/acc", "above": 0.9}}`` saves once when the value
      reaches the bound (``>=``; ``below`` means ``<=``), and again only after it went back across.
    - ``alert``: the ``checkpoint`` action of any lightwatch rule (or :meth:`request_save`) saves at the next
      safe point of the loop (end of the current optimizer step, or of validation), once, on every rank.
    - ``exception``: with ``save_on_exception``, the state when training raised (single process, or a
      ``MonitorError`` raised on every rank).

    Guarantees: a file is written under a temporary name in ``dirpath``, fsynced, renamed onto its final name
    and the directory fsynced; ``manifest.json`` (SHA-256, size, step, metrics, healthy mark of every file) is
    rewritten the same way after every change; older files are deleted only after the newer one is committed
    and recorded. Free space is checked before writing. A failed write removes the partial file, keeps every
    earlier checkpoint and raises the same :class:`CheckpointSaveError` on every rank (no hang). On resume the
    manifest is re-read and every file checked: missing or altered files are dropped with a warning.

    A checkpoint is *healthy* when no alert of severity ``error`` or worse was published since the previous
    save and the parameters are finite; :meth:`latest_healthy` returns the newest healthy one, and rotation
    never deletes it before a newer healthy one exists (it may keep one extra file for that, marked pinned).

    Args:
        dirpath: directory of the checkpoints and ``manifest.json``; default ``<logger dir>/checkpoints`` (as
            Lightning's ``ModelCheckpoint``). Local filesystems only.
        filename: name template, e.g. ``"{epoch}-{val/loss:.3f}"`` -> ``epoch=3-val_loss=0.412.ckpt``. Metric
            names and values are made file-name safe (``/`` becomes ``_``); the literal text may not contain a
            path separator. Default ``"{epoch}-{step}"``.
        monitor: metric to rank checkpoints by (any key of ``trainer.callback_metrics``).
        mode: ``"min"`` or ``"max"``.
        save_top_k: how many top-k checkpoints to keep (``-1`` all, ``0`` none).
        save_last: keep ``last.ckpt``, refreshed at every check and at the end of training.
        every_n_train_steps: check every this many optimizer steps.
        every_n_epochs: check every this many epochs (the default, 1, when neither interval is given).
        save_on_train_epoch_end: check at the end of the training epoch instead of after validation; by
            default decided as Lightning does (after validation when validation runs every epoch).
        thresholds: ``{name: {"metric": str, "above": float}}`` or ``{"below": float}``: save once per crossing.
        keep_threshold_checkpoints: threshold checkpoints kept (newest first; ``-1`` all).
        save_on_alert: honour ``checkpoint`` actions and :meth:`request_save`.
        alert_save_cooldown_steps: at most one alert checkpoint in this many steps (a rule firing every step
            must not write a checkpoint every step).
        keep_alert_checkpoints: alert checkpoints kept (newest first; ``-1`` all).
        save_on_exception: save a checkpoint (marked unhealthy) when training raises.
        save_weights_only: save only the weights (such files are not rollback points).
        auto_insert_metric_name: write ``name=value`` for every template field (as ``ModelCheckpoint``).
        verify: after writing, load the file once (``torch.load(weights_only=True)``) before committing it.
        verify_on_resume: on resume, hash every file named in the manifest (``False``: only existence and
            size are checked, for very large checkpoints).
        export: ``"torchscript"`` or ``"onnx"``: also export the model (``pl_module.example_input_array`` is
            the example input) to ``best.pt`` / ``best.onnx`` when a new best top-k checkpoint is committed.
        name: subject of this callback's TensorBoard tags ``<prefix>.ckpt/<name>/best|saves``.
        prefix: first part of every TensorBoard tag.

    Example:
        >>> from lightwatch.callbacks import MetricCheckpoint
        >>> ckpt = MetricCheckpoint(monitor="val/loss", mode="min", save_top_k=3, save_last=True,
        ...                         filename="{epoch}-{val/loss:.3f}",
        ...                         thresholds={"acc90": {"metric": "val/acc", "above": 0.9}})
        >>> ckpt.format_checkpoint_name({"epoch": 2, "step": 40, "val/loss": 0.41234})
        'epoch=2-val_loss=0.412.ckpt'
    """

    CHECKPOINT_NAME_LAST = "last"
    CHECKPOINT_JOIN_CHAR = "-"
    CHECKPOINT_EQUALS_CHAR = "="
    FILE_EXTENSION = ".ckpt"
    STARTING_VERSION = 1

    def __init__(
        self,
        dirpath: Optional[str] = None,
        filename: Optional[str] = None,
        monitor: Optional[str] = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool = False,
        every_n_train_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = None,
        save_on_train_epoch_end: Optional[bool] = None,
        thresholds: Optional[Dict[str, Dict[str, Any]]] = None,
        keep_threshold_checkpoints: int = -1,
        save_on_alert: bool = True,
        alert_save_cooldown_steps: int = 10,
        keep_alert_checkpoints: int = 3,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        auto_insert_metric_name: bool = True,
        verify: bool = False,
        verify_on_resume: bool = True,
        export: Optional[str] = None,
        name: str = _SOURCE,
        prefix: str = "monitor",
    ) -> None:
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"MetricCheckpoint: mode must be 'min' or 'max', got {mode!r}.")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"MetricCheckpoint: monitor must be a metric name (str) or None, got {monitor!r}.")
        if dirpath is not None:
            dirpath = str(dirpath)
            if "://" in dirpath and not dirpath.startswith("file://"):
                raise ValueError(f"MetricCheckpoint: dirpath {dirpath!r} is not on a local filesystem; atomic "
                                 "commits need rename and fsync. Write locally and sync to remote storage after.")
            dirpath = os.path.realpath(os.path.expanduser(dirpath[len("file://"):] if dirpath.startswith(
                "file://") else dirpath))
        if export not in (None, "onnx", "torchscript"):
            raise ValueError(f"MetricCheckpoint: export must be None, 'onnx' or 'torchscript', got {export!r}.")
        self.dirpath: Optional[str] = dirpath
        self.filename = filename or "{epoch}" + self.CHECKPOINT_JOIN_CHAR + "{step}"
        self._template_fields = _template_fields(self.filename, "MetricCheckpoint")
        _template_fields(self.CHECKPOINT_NAME_LAST, "MetricCheckpoint (CHECKPOINT_NAME_LAST)")
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = _check_int(save_top_k, "save_top_k", -1)
        self.save_last = bool(save_last)
        self.every_n_train_steps = _check_int(every_n_train_steps, "every_n_train_steps", 0, allow_none=True)
        self.every_n_epochs = _check_int(every_n_epochs, "every_n_epochs", 0, allow_none=True)
        if self.every_n_train_steps is None and self.every_n_epochs is None:
            self._every_n_epochs, self._every_n_train_steps = 1, 0
        else:
            self._every_n_epochs = self.every_n_epochs or 0
            self._every_n_train_steps = self.every_n_train_steps or 0
        self.save_on_train_epoch_end = save_on_train_epoch_end
        self.thresholds = _parse_thresholds(thresholds)
        self.keep_threshold_checkpoints = _check_int(keep_threshold_checkpoints, "keep_threshold_checkpoints", -1)
        self.save_on_alert = bool(save_on_alert)
        self.alert_save_cooldown_steps = _check_int(alert_save_cooldown_steps, "alert_save_cooldown_steps", 0)
        self.keep_alert_checkpoints = _check_int(keep_alert_checkpoints, "keep_alert_checkpoints", -1)
        self.save_on_exception = bool(save_on_exception)
        self.save_weights_only = bool(save_weights_only)
        self.auto_insert_metric_name = bool(auto_insert_metric_name)
        self.verify = bool(verify)
        self.verify_on_resume = bool(verify_on_resume)
        self.export = export
        self.name = str(name)
        self.writer = MonitorWriter(prefix)
        self._cooldown = AlertCooldown(100)

        # Metric keys read at each check, in one fixed order so every rank packs the same buffer.
        keys = [f for f in self._template_fields if f not in ("epoch", "step")]
        keys += [t["metric"] for t in self.thresholds.values()]
        if monitor:
            keys.append(monitor)
        self._value_keys: List[str] = sorted(set(keys))

        # Bookkeeping. Entries are the manifest's "checkpoints" records, in commit order.
        self._run = uuid.uuid4().hex
        self._entries: List[Dict[str, Any]] = []
        # values Lightning (or a user) assigned to the attributes it writes on a checkpoint callback, as on
        # ModelCheckpoint; they stand until the next commit changes the entries they were derived from
        self._assigned: Dict[str, Any] = {}
        self._events: List[Dict[str, Any]] = []
        self._export_record: Optional[Dict[str, Any]] = None
        self._garbage: List[str] = []
        self._taken: Set[str] = set()
        self._seq = 0
        self._saves = 0
        self._errors_since_save = 0
        self._armed: Dict[str, bool] = {n: True for n in self.thresholds}
        self._last_check_step = 0
        self._last_epoch_checked = -1
        self._last_alert_save_step: Optional[int] = None
        self._requests: List[Tuple[str, Optional[Dict[str, Any]]]] = []
        self._step_at_batch_start = -1
        self._state_loaded = False
        self._ready = False
        self._saving = False
        self._param_bytes = 0
        self._trainer_ref: Optional[Any] = None
        self._warned: Set[str] = set()
        self.current_score: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------------------------ public API
    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, name=self.name,
                                        every_n_train_steps=self._every_n_train_steps,
                                        every_n_epochs=self._every_n_epochs)

    @property
    def manifest_path(self) -> Optional[str]:
        return os.path.join(self.dirpath, MANIFEST_NAME) if self.dirpath else None

    @property
    def checkpoints(self) -> List[Dict[str, Any]]:
        """Copies of the manifest records of the committed checkpoints, oldest first, with an absolute ``path``."""
        return [dict(e, path=self._abs(e["file"])) for e in self._entries]

    @property
    def best_model_path(self) -> str:
        """Path of the best top-k checkpoint (the newest interval one without ``monitor``), or ``""``."""
        if "best_model_path" in self._assigned:
            return self._assigned["best_model_path"]
        entry = self._best_entry()
        return self._abs(entry["file"]) if entry else ""

    @best_model_path.setter
    def best_model_path(self, value: str) -> None:
        # Lightning sets it in the main process after `ddp_spawn` trained in workers: this instance then has
        # no entries of its own, so it reads the manifest the workers committed beside that file
        value = str(value or "")
        if value and not self._entries:
            self._adopt_manifest(os.path.dirname(value))
        entry = self._best_entry()
        if not (entry and os.path.realpath(self._abs(entry["file"])) == os.path.realpath(value)):
            self._assigned["best_model_path"] = value

    @property
    def best_model_score(self) -> Optional[torch.Tensor]:
        if "best_model_score" in self._assigned:
            return self._assigned["best_model_score"]
        entry = self._best_entry()
        return None if entry is None or entry.get("score") is None else torch.tensor(float(entry["score"]))

    @best_model_score.setter
    def best_model_score(self, value: Optional[torch.Tensor]) -> None:
        self._assigned["best_model_score"] = value

    @property
    def last_model_path(self) -> str:
        if "last_model_path" in self._assigned:
            return self._assigned["last_model_path"]
        entries = self._pool("last")
        return self._abs(entries[-1]["file"]) if entries else ""

    @last_model_path.setter
    def last_model_path(self, value: str) -> None:
        self._assigned["last_model_path"] = str(value or "")

    @property
    def best_k_models(self) -> Dict[str, torch.Tensor]:
        if "best_k_models" in self._assigned:
            return self._assigned["best_k_models"]
        return {self._abs(e["file"]): torch.tensor(float(e["score"])) for e in self._pool("top_k")}

    @best_k_models.setter
    def best_k_models(self, value: Dict[str, torch.Tensor]) -> None:
        self._assigned["best_k_models"] = dict(value)

    @property
    def kth_best_model_path(self) -> str:
        if "kth_best_model_path" in self._assigned:
            return self._assigned["kth_best_model_path"]
        pool = self._ranked_top_k()
        return self._abs(pool[-1]["file"]) if pool else ""

    @kth_best_model_path.setter
    def kth_best_model_path(self, value: str) -> None:
        self._assigned["kth_best_model_path"] = str(value or "")

    @property
    def kth_value(self) -> torch.Tensor:
        if "kth_value" in self._assigned:
            return self._assigned["kth_value"]
        pool = self._ranked_top_k()
        if pool:
            return torch.tensor(float(pool[-1]["score"]))
        return torch.tensor(math.inf if self.mode == "min" else -math.inf)

    @kth_value.setter
    def kth_value(self, value: torch.Tensor) -> None:
        self._assigned["kth_value"] = value

    def _adopt_manifest(self, directory: str) -> None:
        """Take the verified entries of the manifest in ``directory`` (read only; nothing is moved or deleted).

        For an instance that did not train itself: the main process of ``ddp_spawn``, whose workers committed
        the files. Entries whose file is missing or has another size are left out.
        """
        try:
            manifest = _load_manifest(os.path.join(directory, MANIFEST_NAME))
        except (OSError, ValueError):
            return
        if self.dirpath is None:
            self.dirpath = directory
        elif os.path.realpath(self.dirpath) != os.path.realpath(directory):
            return
        entries = [dict(e) for e in manifest["checkpoints"] if isinstance(e, dict) and e.get("file")]
        self._entries = [e for e in entries if not self._verify_entry(e, full_hash=False)]
        self._run = str(manifest.get("run") or self._run)
        self._events = list(manifest.get("events") or [])

    @property
    def _last_checkpoint_saved(self) -> str:  # read by Lightning loggers (e.g. WandbLogger)
        return self._abs(self._entries[-1]["file"]) if self._entries else ""

    def latest_healthy(self) -> Optional[str]:
        """Path of the newest committed checkpoint marked healthy (a rollback point), or ``None``.

        Every file it can return was hashed when it was committed (and again on resume), and rotation never
        deletes it before a newer healthy checkpoint is committed. Weights-only files are not rollback points.
        """
        entry = self._newest_healthy(self._entries)
        return self._abs(entry["file"]) if entry else None

    def request_save(self, reason: str = "alert", alert: Optional[Alert] = None) -> None:
        """Ask for a checkpoint at the next safe point of the training loop; call it on every rank.

        The save happens at the end of the current optimizer step (after ``optimizer.step``; with gradient
        accumulation, at the end of the accumulation window), or at the end of validation, whichever comes
        first; several requests before that point make one save. Under DDP saving is a collective, so the
        request must be made on every rank (lightwatch alerts are decided identically on every rank).

        Args:
            reason: ``alert`` (default), ``interval``, ``last`` or ``exception``; recorded in the manifest.
            alert: the alert that asked for it; its rule, source and severity are recorded with the file.
        """
        if reason not in REQUESTABLE_REASONS:
            raise ValueError(f"MetricCheckpoint.request_save: reason must be one of {', '.join(REQUESTABLE_REASONS)}"
                             f", got {reason!r}.")
        if not self.save_on_alert and reason == "alert":
            return
        if any(r == reason for r, _ in self._requests):
            return
        info = None
        if alert is not None:
            info = {"rule": alert.rule, "source": alert.source, "severity": alert.severity, "step": alert.step,
                    "subject": alert.subject, "value": _finite_or_none(alert.value)}
        self._requests.append((reason, info))

    def record_event(self, kind: str, **fields: Any) -> None:
        """Append an event (e.g. ``kind="rollback", step=120, restored="…ckpt", reason="loss spike"``) to the
        ``"events"`` list of ``manifest.json`` and rewrite it atomically (global rank 0 writes).

        A ``rollback`` event also clears the count of errors since the last save: the restored state is the
        healthy one, so the next checkpoint is healthy unless new errors occur.
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"MetricCheckpoint.record_event: kind must be a non-empty string, got {kind!r}.")
        event: Dict[str, Any] = {"kind": kind, "time": _utc_now()}
        trainer = self._trainer()
        if "step" not in fields and trainer is not None:
            event["step"] = int(trainer.global_step)
        event.update({str(k): _json_safe(v) for k, v in fields.items()})
        self._events.append(event)
        if kind == "rollback":
            self._errors_since_save = 0
        if self._ready and trainer is not None and is_global_zero(trainer):
            self._write_manifest()

    def format_checkpoint_name(self, metrics: Mapping[str, Any], filename: Optional[str] = None,
                               ver: Optional[int] = None, prefix: Optional[str] = None) -> str:
        """The file name for ``metrics`` (tensors or numbers; ``epoch`` and ``step`` among them), as Lightning's.

        Returned relative to ``dirpath`` when it is not known yet, else as an absolute path.
        """
        template = filename or self.filename
        _template_fields(template, "MetricCheckpoint")
        values = {str(k): float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()
                  if isinstance(v, (int, float, torch.Tensor)) and (not isinstance(v, torch.Tensor) or v.numel() == 1)}
        name = _render(template, values, int(values.get("step", 0)), int(values.get("epoch", 0)),
                       self.auto_insert_metric_name)
        if prefix:
            name = self.CHECKPOINT_JOIN_CHAR.join([safe_name_part(prefix), name])
        if ver is not None:
            name = self.CHECKPOINT_JOIN_CHAR.join([name, f"v{ver}"])
        name += self.FILE_EXTENSION
        return os.path.join(self.dirpath, name) if self.dirpath else name

    # --------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._trainer_ref = weakref.ref(trainer)
        alert_log(trainer).subscribe(self._on_alert)
        dirpath = trainer.strategy.broadcast(self._resolve_dirpath(trainer))
        self.dirpath = dirpath
        if stage != "fit":
            return
        others = [cb for cb in trainer.callbacks if isinstance(cb, _MetricCheckpoint) and cb is not self]
        for other in others:
            if other.dirpath and os.path.realpath(other.dirpath) == os.path.realpath(dirpath):
                raise ValueError(f"MetricCheckpoint: two MetricCheckpoint callbacks write to {dirpath!r}; each needs "
                                 "its own dirpath (they keep separate manifests).")
        io_name = type(getattr(trainer.strategy, "checkpoint_io", None)).__name__
        if io_name == "AsyncCheckpointIO":
            raise ValueError("MetricCheckpoint writes synchronously so that it can fsync, hash and commit each file "
                             "before it is recorded; remove AsyncCheckpointIO from the Trainer's plugins.")
        if self.export == "onnx" and getattr(pl_module, "example_input_array", None) is None:
            raise ValueError("MetricCheckpoint(export='onnx') needs pl_module.example_input_array (an example input "
                             "for tracing); set it in the LightningModule's __init__.")
        if is_global_zero(trainer):
            os.makedirs(dirpath, exist_ok=True)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # The callback state of a resumed checkpoint is loaded by now, except for strategies that restore
        # after setup (FSDP, DeepSpeed): those are reconciled in on_train_start.
        if not getattr(trainer.strategy, "restore_checkpoint_after_setup", False):
            self._start(trainer, pl_module)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._ready:
            self._start(trainer, pl_module)

    def _start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # lazy parameters (LazyLinear before its first forward) have no size yet: the first save measures it
        self._param_bytes = sum(p.numel() * p.element_size() for p in pl_module.parameters() if not is_lazy(p))
        if is_sharded_strategy(trainer):
            self._param_bytes *= max(1, int(trainer.world_size))
        self._reconcile(trainer)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # A safe point only once the optimizer has stepped (not inside a gradient-accumulation window).
        if trainer.global_step == self._step_at_batch_start or not self._ready:
            return
        n = self._every_n_train_steps
        due = n > 0 and trainer.global_step % n == 0 and self._last_check_step != trainer.global_step
        if due or self._requests:
            self._check(trainer, pl_module, trigger="step" if due else None)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._ready:
            return
        due = self._should_save_on_train_epoch_end(trainer) and self._epoch_due(trainer)
        if due or self._requests:
            self._check(trainer, pl_module, trigger="epoch" if due else None)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._ready or trainer.sanity_checking or not self._fitting(trainer):
            return
        due = not self._should_save_on_train_epoch_end(trainer) and self._epoch_due(trainer)
        if due or self._requests:
            self._check(trainer, pl_module, trigger="epoch" if due else None)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._ready:
            return
        lasts = self._pool("last")
        stale_last = self.save_last and (not lasts or lasts[-1]["step"] != trainer.global_step)
        if trainer.global_step > 0 and stale_last:
            self.request_save("last")
        if self._requests:
            self._check(trainer, pl_module, trigger=None)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._requests.clear()
        self.writer.flush(trainer)
        if not (self.save_on_exception and self._ready) or self._saving or isinstance(exception, CheckpointSaveError):
            return
        if trainer.sanity_checking or not self._fitting(trainer) or trainer.global_step == 0:
            return
        if distributed_ready() and not isinstance(exception, MonitorError):
            # Saving is a collective: only an exception known to be raised on every rank can be saved safely.
            self._warn(trainer, "exception_not_saved",
                       f"MetricCheckpoint: no exception checkpoint for {type(exception).__name__}: under "
                       "distributed training the other ranks may not be at the same point, and a save would hang.")
            return
        try:
            values = self._read_values(trainer) if self._value_keys else {}
            error = f"{type(exception).__name__}: {exception}"[:500]
            self._save_round(trainer, pl_module, [("exception", {"error": error})], values)
        except Exception as exc:  # never hide the exception that ended training
            logger.error("MetricCheckpoint: the exception checkpoint could not be saved: %s", exc)

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        # Every full checkpoint this Trainer writes carries the RNG states a rollback restores.
        checkpoint.setdefault("lightwatch", {})["rng"] = collect_rng_state()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._ready = False  # a later fit() re-reads the manifest
        alert_log(trainer).unsubscribe(self._on_alert)
        self.writer.flush(trainer)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "run": self._run,
            "dirpath": self.dirpath,
            "monitor": self.monitor,
            "seq": int(self._seq),
            "saves": int(self._saves),
            "entries": [dict(e) for e in self._entries],
            "errors_since_save": int(self._errors_since_save),
            "armed": {k: bool(v) for k, v in self._armed.items()},
            "last_check_step": int(self._last_check_step),
            "last_epoch_checked": int(self._last_epoch_checked),
            "last_alert_save_step": -1 if self._last_alert_save_step is None else int(self._last_alert_save_step),
            "best_model_path": self.best_model_path,
            "best_model_score": _finite_or_none(self.best_model_score),
            "last_model_path": self.last_model_path,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # `trainer.validate/test(ckpt_path="best")` after a fit in this process loads a checkpoint whose copy of
        # the entries predates the file itself (it is committed after it is written): this run's own entries
        # are newer, and stay
        newer = [dict(e) for e in self._entries] if self._entries and state_dict.get("run") == self._run else None
        self._state_loaded = True
        self._run = str(state_dict.get("run", self._run))
        self._seq = int(state_dict.get("seq", 0))
        self._saves = int(state_dict.get("saves", 0))
        self._errors_since_save = int(state_dict.get("errors_since_save", 0))
        armed = dict(state_dict.get("armed", {}))
        self._armed = {n: bool(armed.get(n, True)) for n in self.thresholds}
        self._last_check_step = int(state_dict.get("last_check_step", 0))
        self._last_epoch_checked = int(state_dict.get("last_epoch_checked", -1))
        last_alert = int(state_dict.get("last_alert_save_step", -1))
        self._last_alert_save_step = None if last_alert < 0 else last_alert
        saved_dir = state_dict.get("dirpath")
        if saved_dir and self.dirpath and os.path.realpath(saved_dir) != os.path.realpath(self.dirpath):
            warnings.warn(f"MetricCheckpoint: dirpath changed from {saved_dir!r} to {self.dirpath!r}; the earlier "
                          "checkpoints are not tracked here.", CheckpointWarning, stacklevel=2)
            self._entries = []
        else:
            # Only a fallback: the manifest in dirpath is read on train start and is the record of truth.
            self._entries = newer if newer is not None else [dict(e) for e in state_dict.get("entries", [])]

    # ------------------------------------------------------------------------------- checks / saves
    def _check(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", trigger: Optional[str]) -> None:
        """Decide what to save at this safe point (identically on every rank) and save it.

        ``trigger`` is ``"step"`` or ``"epoch"`` for a scheduled check, ``None`` when only requests are due.
        """
        if not self._fitting(trainer) or trainer.sanity_checking or bool(getattr(trainer, "fast_dev_run", False)):
            self._requests.clear()
            return
        step = int(trainer.global_step)
        items: List[Tuple[str, Dict[str, Any]]] = []
        values = self._read_values(trainer) if (trigger and self._value_keys) else {}
        if trigger == "step":
            self._last_check_step = step
        elif trigger == "epoch":
            self._last_epoch_checked = int(trainer.current_epoch)
        if trigger and step > 0:
            items += self._scheduled_items(trainer, values)
        for reason, info in self._requests:
            if reason == "alert":
                last = self._last_alert_save_step
                if last is not None and 0 <= step - last < self.alert_save_cooldown_steps:
                    logger.debug("MetricCheckpoint: alert checkpoint at step %d skipped (cooldown)", step)
                    continue
                self._last_alert_save_step = step
            if reason == "last" and any(r == "last" for r, _ in items):
                continue
            items.append((reason, {"alert": info} if info else {}))
        self._requests.clear()
        if items:
            if not values and self._value_keys:
                values = self._read_values(trainer)
            self._save_round(trainer, pl_module, items, values)

    def _scheduled_items(self, trainer: "pl.Trainer", values: Mapping[str, float]) -> List[Tuple[str, Dict[str, Any]]]:
        items: List[Tuple[str, Dict[str, Any]]] = []
        if self.monitor is not None and self.save_top_k != 0:
            current = values.get(self.monitor)
            if current is None:
                self._warn(trainer, "checkpoint_monitor_missing",
                           f"MetricCheckpoint: monitored metric {self.monitor!r} is not among the logged metrics "
                           f"({', '.join(sorted(map(str, trainer.callback_metrics))) or 'none'}); no top-k checkpoint "
                           f"at step {trainer.global_step}. Did you self.log({self.monitor!r}, ...)?")
            elif not math.isfinite(current):
                self.current_score = torch.tensor(current)
                self._warn(trainer, "checkpoint_monitor_nonfinite",
                           f"MetricCheckpoint: monitored metric {self.monitor!r} is {current} at step "
                           f"{trainer.global_step}; a non-finite value is never saved as top-k or best.",
                           value=current)
            else:
                self.current_score = torch.tensor(current)
                if self._improves(current):
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
            if reached and self._armed[name]:
                self._armed[name] = False
                items.append(("threshold", {"threshold": name, "metric": spec["metric"], "bound": spec["bound"],
                                            "value": value}))
            elif not reached:
                self._armed[name] = True
        return items

    def _improves(self, score: float) -> bool:
        if self.save_top_k == -1:
            return True
        pool = self._ranked_top_k()
        if len(pool) < self.save_top_k:
            return True
        worst = float(pool[-1]["score"])
        return score < worst if self.mode == "min" else score > worst

    def _read_values(self, trainer: "pl.Trainer") -> Dict[str, float]:
        """Rank 0's values of the metrics the checks need, on every rank (one SUM collective under DDP).

        Deciding on rank 0's values makes every rank take the same decision even when a metric was logged
        without ``sync_dist`` (the classic ``ModelCheckpoint`` hang).
        """
        metrics = trainer.callback_metrics
        device = trainer.strategy.root_device
        present, vals = [], []
        for key in self._value_keys:
            v = metrics.get(key)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                present.append(torch.ones((), dtype=torch.float64, device=device))
                vals.append(v.detach().reshape(()).to(device=device, dtype=torch.float64))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                present.append(torch.ones((), dtype=torch.float64, device=device))
                vals.append(torch.tensor(float(v), dtype=torch.float64, device=device))
            else:
                present.append(torch.zeros((), dtype=torch.float64, device=device))
                vals.append(torch.zeros((), dtype=torch.float64, device=device))
        buf = torch.stack(present + vals)
        if distributed_ready():
            if not is_global_zero(trainer):
                buf.zero_()
            all_reduce_flat(sum_buffer=buf)
        flat = buf.tolist()
        n = len(self._value_keys)
        return {k: flat[n + i] for i, k in enumerate(self._value_keys) if flat[i] > 0.5}

    def _save_round(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                    items: Sequence[Tuple[str, Dict[str, Any]]], values: Mapping[str, float]) -> None:
        """Write one checkpoint for ``items`` (several reasons share one file's content) and commit it."""
        self._saving = True
        try:
            nonfinite = 0.0 if self._params_finite(pl_module) else 1.0
            space_ok = True
            if is_sharded_strategy(trainer) and distributed_ready():
                # Every rank holds a shard (and writes it): agree on both before planning or writing.
                flags = torch.tensor([self._space_problem(), nonfinite], dtype=torch.float64,
                                     device=trainer.strategy.root_device)
                agree_max(flags)
                space_ok, nonfinite = flags[0].item() == 0, flags[1].item()
            plan = self._plan(trainer, items, values, params_finite=not nonfinite)
            self._execute(trainer, pl_module, plan, space_ok)
        finally:
            self._saving = False

    # The plan is pure bookkeeping, computed identically on every rank; only rank 0 touches the disk.
    def _plan(self, trainer: "pl.Trainer", items: Sequence[Tuple[str, Dict[str, Any]]],
              values: Mapping[str, float], params_finite: bool = True) -> Dict[str, Any]:
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        healthy = (self._errors_since_save == 0 and params_finite
                   and not any(r == "exception" for r, _ in items))
        now = _utc_now()
        new: List[Dict[str, Any]] = []
        for reason, extra in items:
            self._seq += 1
            entry: Dict[str, Any] = {
                "file": "", "step": step, "epoch": epoch, "metrics": {}, "score": None, "reason": reason,
                "sha256": None, "bytes": None, "healthy": healthy, "time": now, "seq": self._seq,
            }
            if reason == "top_k":
                entry["score"] = float(extra["score"])
            if self.save_weights_only:
                entry["weights_only"] = True
            for k, v in extra.items():
                if k != "score":
                    entry[k] = _json_safe(v)
            new.append(entry)

        # What each pool evicts once the new entries are in.
        evicted: List[Dict[str, Any]] = []
        for reason, keep in (("top_k", self.save_top_k), ("interval", self.save_top_k), ("last", 1),
                             ("alert", self.keep_alert_checkpoints), ("threshold", self.keep_threshold_checkpoints)):
            fresh = [e for e in new if e["reason"] == reason]
            if not fresh or keep < 0:
                continue
            pool = self._pool(reason)
            if reason == "top_k":
                ranked = self._rank(pool + fresh)
                evicted += [e for e in ranked[keep:] if e in pool]
            else:
                evicted += pool[: max(0, len(pool) + len(fresh) - keep)]

        # Never lose the newest rollback point to rotation before a newer healthy one exists.
        new_is_rollback_point = healthy and not self.save_weights_only
        pinned_now: List[Dict[str, Any]] = []
        released: List[Dict[str, Any]] = []
        newest_healthy = self._newest_healthy(self._entries)
        if new_is_rollback_point:
            released = [e for e in self._entries if e.get("pinned")]
        elif newest_healthy is not None and newest_healthy in evicted:
            evicted.remove(newest_healthy)
            pinned_now.append(newest_healthy)

        # Names: overwrite an evicted entry's file when the template gives the same name (last.ckpt), else a
        # name no file in dirpath has (version counter -v1, -v2, ... as ModelCheckpoint).
        evicted_by_file = {e["file"]: e for e in evicted}
        pinned_files = {e["file"]: e for e in pinned_now}
        taken = {e["file"] for e in self._entries} | set(self._taken) | set(self._garbage)
        overwritten: List[Dict[str, Any]] = []
        relinks: List[Tuple[str, str]] = []  # (pinned entry's current file, its new name)
        for entry in new:
            base = self._base_name(entry, values, step, epoch)
            name, ver = base + self.FILE_EXTENSION, self.STARTING_VERSION
            while True:
                if name in evicted_by_file and name not in [o["file"] for o in overwritten]:
                    overwritten.append(evicted_by_file[name])
                    break
                if name in pinned_files:
                    # The pinned file keeps its content under a new name; the new entry takes this name.
                    pinned_name, pver = base + "-healthy" + self.FILE_EXTENSION, self.STARTING_VERSION
                    while pinned_name in taken or pinned_name in {n for _, n in relinks}:
                        pinned_name = f"{base}-healthy{self.CHECKPOINT_JOIN_CHAR}v{pver}{self.FILE_EXTENSION}"
                        pver += 1
                    relinks.append((name, pinned_name))
                    del pinned_files[name]
                    break
                if name not in taken and name not in [e["file"] for e in new]:
                    break
                name = f"{base}{self.CHECKPOINT_JOIN_CHAR}v{ver}{self.FILE_EXTENSION}"
                ver += 1
            entry["file"] = name
        deleted = [e for e in evicted if e not in overwritten] + released
        return {"step": step, "epoch": epoch, "new": new, "overwritten": overwritten, "deleted": deleted,
                "pinned": pinned_now, "relinks": relinks, "healthy": healthy}

    def _base_name(self, entry: Dict[str, Any], values: Mapping[str, float], step: int, epoch: int) -> str:
        reason = entry["reason"]
        if reason == "last":
            return _render(self.CHECKPOINT_NAME_LAST, values, step, epoch, self.auto_insert_metric_name)
        name = _render(self.filename, values, step, epoch, self.auto_insert_metric_name)
        if reason in ("top_k", "interval"):
            return name
        tag = reason
        if reason == "threshold":
            tag = f"threshold{self.CHECKPOINT_JOIN_CHAR}{safe_name_part(entry['threshold'])}"
        elif reason == "alert" and entry.get("alert"):
            tag = f"alert{self.CHECKPOINT_JOIN_CHAR}{safe_name_part(entry['alert']['rule'])}"
        return self.CHECKPOINT_JOIN_CHAR.join([tag, name])

    def _execute(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", plan: Dict[str, Any],
                 space_ok: bool = True) -> None:
        new: List[Dict[str, Any]] = plan["new"]
        rank0 = is_global_zero(trainer)
        sharded = is_sharded_strategy(trainer)
        direct = self._direct_write(trainer)
        primary = self._abs(new[0]["file"])
        tmp = temp_path_for(primary, f"{self._run[:8]}-{new[0]['seq']}")
        failure: Optional[BaseException] = None
        code = 0
        temps: List[str] = [tmp]
        try:
            if not space_ok:
                raise OSError(_errno.ENOSPC, "not enough free space on a rank for its shard")
            with trainer.profiler.profile("save_checkpoint"):
                # trainer.save_checkpoint() would also write, then wait at a barrier that a rank whose write
                # failed never reaches (the hang this callback avoids), so the dump and the write are done
                # separately and every rank meets at the agreement below instead.
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
                if direct:
                    if rank0:
                        self._check_space()
                        with open(tmp, "wb") as fh:
                            torch.save(checkpoint, fh)
                else:
                    if rank0 and not sharded:
                        self._check_space()
                    trainer.strategy.save_checkpoint(checkpoint, tmp)
                del checkpoint
            if rank0:
                temps += self._commit(trainer, plan, tmp)
        except Exception as exc:
            failure = exc
            code = int(getattr(exc, "errno", None) or -1) if isinstance(exc, OSError) else -1
            if rank0:
                for path in temps:
                    remove_path(path)
        flags = torch.tensor([1.0 if failure else 0.0, float(code), float(trainer.global_rank if failure else -1)],
                             dtype=torch.float64, device=trainer.strategy.root_device)
        agree_max(flags)
        failed, code, failed_rank = int(flags[0].item()), int(flags[1].item()), int(flags[2].item())
        if failed:
            error = self._save_error(plan, code, failed_rank)
            if failure is not None:
                raise error from failure
            raise error
        self._apply(trainer, plan)
        self._after_save(trainer, pl_module, plan)

    def _commit(self, trainer: "pl.Trainer", plan: Dict[str, Any], tmp: str) -> List[str]:
        """Rank 0: fsync, hash, verify, then commit the files and the manifest in a crash-safe order."""
        new: List[Dict[str, Any]] = plan["new"]
        if not os.path.exists(tmp):
            raise FileNotFoundError(_errno.ENOENT, f"the checkpoint writer did not create {tmp!r}")
        fsync_path(tmp)
        digest, size = sha256_path(tmp), path_size(tmp)
        if self.verify:
            self._verify_file(tmp)
        for entry in new:
            entry["sha256"], entry["bytes"] = digest, size
            entry["metrics"] = self._metrics_snapshot(trainer)
        # 1. A pinned file that must give up its name gets a second name (a hard link) first.
        for old_name, pinned_name in plan["relinks"]:
            link_or_copy(self._abs(old_name), self._abs(pinned_name))
        if plan["relinks"]:
            fsync_dir(self.dirpath or ".")
        renamed = dict(plan["relinks"])
        # 2. Manifest: files about to be replaced leave the committed list; the new files are "pending", so a
        #    crash after their rename still finds them (promoted on resume when their hash matches).
        overwritten = {id(e) for e in plan["overwritten"]}
        kept = []
        for e in self._entries:
            if id(e) in overwritten:
                continue
            if e["file"] in renamed:
                e = dict(e, file=renamed[e["file"]], pinned=True)
            elif any(e is p for p in plan["pinned"]):
                e = dict(e, pinned=True)
            kept.append(e)
        self._write_manifest(entries=kept, pending=list(new) + list(plan["overwritten"]))
        # 3. Rename into place: the first name from the temporary, the others hard-linked to it.
        temps: List[str] = []
        commit_path(tmp, self._abs(new[0]["file"]))
        for entry in new[1:]:
            link_tmp = temp_path_for(self._abs(entry["file"]), f"{self._run[:8]}-{entry['seq']}")
            temps.append(link_tmp)
            link_or_copy(self._abs(new[0]["file"]), link_tmp)
            commit_path(link_tmp, self._abs(entry["file"]))
        # 4. Manifest with the new files committed and the evicted ones listed for deletion, then delete them.
        deleted = {id(e) for e in plan["deleted"]}
        final = [e for e in kept if id(e) not in deleted and e["file"] not in {d["file"] for d in plan["deleted"]}]
        garbage = self._garbage + [e["file"] for e in plan["deleted"]]
        self._write_manifest(entries=final + list(new), pending=[], garbage=garbage)
        return temps

    def _apply(self, trainer: "pl.Trainer", plan: Dict[str, Any]) -> None:
        """Every rank: the same in-memory update, after every rank agreed that the save succeeded."""
        renamed = dict(plan["relinks"])
        overwritten = {id(e) for e in plan["overwritten"]}
        deleted = {id(e) for e in plan["deleted"]}
        pinned = {id(e) for e in plan["pinned"]}
        entries = []
        for e in self._entries:
            if id(e) in overwritten or id(e) in deleted:
                continue
            if e["file"] in renamed:
                e["file"] = renamed[e["file"]]
                e["pinned"] = True
            elif id(e) in pinned:
                e["pinned"] = True
            entries.append(e)
        self._entries = entries + list(plan["new"])
        self._assigned.clear()
        self._taken |= {e["file"] for e in plan["new"]} | set(renamed.values())
        self._saves += 1
        self._errors_since_save = 0
        if is_global_zero(trainer):
            self._garbage += [e["file"] for e in plan["deleted"]]
            remaining = []
            for name in self._garbage:
                if name in {e["file"] for e in self._entries}:
                    continue
                try:
                    remove_path(self._abs(name))
                except OSError as exc:  # leave it listed; it is deleted on resume
                    logger.warning("MetricCheckpoint: could not delete %s: %s", name, exc)
                    remaining.append(name)
            self._garbage = remaining
            if plan["deleted"]:
                fsync_dir(self.dirpath or ".")
                self._write_manifest()
        for e in plan["deleted"]:
            self._taken.discard(e["file"])

    def _after_save(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", plan: Dict[str, Any]) -> None:
        new = plan["new"]
        step = logging_step(trainer)
        values: Dict[str, float] = {self.writer.tag("ckpt", self.name, "saves"): float(self._saves)}
        best = self._best_entry()
        if best is not None and best.get("score") is not None:
            values[self.writer.tag("ckpt", self.name, "best")] = float(best["score"])
        self.writer.write_scalars(trainer, values, step)
        if is_global_zero(trainer):
            lines = [f"`{e['file']}` ({e['reason']}, step {e['step']}, "
                     f"{'healthy' if e['healthy'] else 'unhealthy'}"
                     + (f", score {e['score']:.6g}" if e.get("score") is not None else "") + ")" for e in new]
            self.writer.write_text(trainer, self.writer.tag("ckpt", self.name), "saved " + "; ".join(lines), step)
            for lg in list(getattr(trainer, "loggers", None) or []):
                lg.after_save_checkpoint(proxy(self))
        if self.export and best is not None and any(e is best for e in new) and best["reason"] == "top_k":
            self._export_best(trainer, pl_module, best)

    # ------------------------------------------------------------------------------- disk helpers
    def _direct_write(self, trainer: "pl.Trainer") -> bool:
        """Whether rank 0 may stream ``torch.save`` straight into the temporary file.

        True for Lightning's default ``TorchCheckpointIO`` with a strategy that does not override saving: it
        avoids that plugin's staging of the whole file in RAM and in the system temp directory. Other
        plugins and strategies (sharded ones) write through ``strategy.save_checkpoint`` to the temporary path.
        """
        Strategy = package_of(trainer).strategies.Strategy

        strategy = trainer.strategy
        io = getattr(strategy, "checkpoint_io", None)
        return (type(strategy).save_checkpoint is Strategy.save_checkpoint and io is not None
                and type(io).__name__ == "TorchCheckpointIO" and type(io).__module__.startswith(
                    ("lightning_fabric", "lightning.fabric")))

    def _estimated_bytes(self) -> int:
        sizes = [int(e["bytes"]) for e in self._entries if e.get("bytes")]
        return int(max(sizes[-1] if sizes else 0, self._param_bytes) * _SPACE_MARGIN)

    def _space_problem(self) -> float:
        try:
            self._check_space()
        except OSError:
            return 1.0
        return 0.0

    def _check_space(self) -> None:
        check_free_space(self.dirpath or ".", self._estimated_bytes(), "the next checkpoint")

    @staticmethod
    def _verify_file(path: str) -> None:
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

    @staticmethod
    def _params_finite(pl_module: "pl.LightningModule") -> bool:
        params = [local_tensor(p.detach()) for p in pl_module.parameters() if p.numel()]
        if not params:
            return True
        flags = torch.stack([torch.isfinite(p).all() for p in params])
        return bool(flags.all().item())

    def _metrics_snapshot(self, trainer: "pl.Trainer") -> Dict[str, Optional[float]]:
        out: Dict[str, Optional[float]] = {}
        own = f"{self.writer.prefix}.ckpt/"  # this callback's own counters are not training metrics
        for key, value in trainer.callback_metrics.items():
            if str(key).startswith(own):
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                out[str(key)] = _finite_or_none(value.item())
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[str(key)] = _finite_or_none(value)
        return out

    def _save_error(self, plan: Dict[str, Any], code: int, failed_rank: int) -> CheckpointSaveError:
        files = ", ".join(e["file"] for e in plan["new"])
        if code > 0:
            cause = os.strerror(code)
        else:
            cause = "an unexpected error (its traceback is on the failing rank)"
        if code == _errno.ENOSPC:
            hint = "Free disk space or point dirpath to a larger disk, then resume from the last checkpoint."
        elif code in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
            hint = "Make dirpath writable, then resume from the last checkpoint."
        else:
            hint = "Fix the cause, then resume from the last checkpoint."
        best, last = self.best_model_path, self.last_model_path
        message = (f"MetricCheckpoint could not save {files} at step {plan['step']} (epoch {plan['epoch']}) in "
                   f"{self.dirpath}: {cause} on rank {failed_rank}. Nothing was committed; the checkpoints saved "
                   f"before are intact and listed in {MANIFEST_NAME} (best: {best or 'none'}, last: "
                   f"{last or 'none'}, latest healthy: {self.latest_healthy() or 'none'}). {hint}")
        return CheckpointSaveError(code if code > 0 else None, message)

    # ------------------------------------------------------------------------------------ manifest
    def _manifest(self, entries: Optional[List[Dict[str, Any]]] = None, pending: Optional[List[Dict[str, Any]]] = None,
                  garbage: Optional[List[str]] = None) -> Dict[str, Any]:
        entries = self._entries if entries is None else entries
        ranked = self._rank([e for e in entries if e["reason"] == "top_k" and not e.get("pinned")])
        if self.monitor is not None:
            best = ranked[0]["file"] if ranked else None
        else:
            interval = [e for e in entries if e["reason"] == "interval" and not e.get("pinned")]
            best = interval[-1]["file"] if interval else None
        lasts = [e for e in entries if e["reason"] == "last" and not e.get("pinned")]
        doc: Dict[str, Any] = {
            "version": MANIFEST_VERSION,
            "monitor": self.monitor,
            "mode": self.mode,
            "best": best,
            "last": lasts[-1]["file"] if lasts else None,
            "checkpoints": [_json_safe(e) for e in entries],
            "run": self._run,
            "events": _json_safe(self._events),
        }
        if pending:
            doc["pending"] = [_json_safe(e) for e in pending]
        garbage = self._garbage if garbage is None else garbage
        if garbage:
            doc["garbage"] = list(garbage)
        if self._export_record:
            doc["export"] = _json_safe(self._export_record)
        return doc

    def _write_manifest(self, **kwargs: Any) -> None:
        atomic_write_json(self.manifest_path or MANIFEST_NAME, self._manifest(**kwargs))

    def _reconcile(self, trainer: "pl.Trainer") -> None:
        """Rank 0 reads and checks the manifest, every rank adopts the result (one broadcast, at train start)."""
        payload: Optional[Dict[str, Any]] = None
        if is_global_zero(trainer):
            try:
                payload = self._read_and_verify(trainer)
            except Exception as exc:  # told to every rank, so none waits for a broadcast that never comes
                payload = {"error": f"{type(exc).__name__}: {exc}"}
        payload = trainer.strategy.broadcast(payload, src=0)
        assert payload is not None
        if "error" in payload:
            raise RuntimeError(f"MetricCheckpoint could not read or prepare {self.dirpath} on rank 0: "
                               f"{payload['error']}. Check that dirpath is a writable local directory.")
        self._run = payload["run"]
        self._entries = payload["entries"]
        self._assigned.clear()
        self._events = payload["events"]
        self._export_record = payload["export"]
        self._taken = set(payload["taken"])
        self._garbage = []
        self._seq = max([self._seq] + [int(e.get("seq", 0)) for e in self._entries])
        self._ready = True
        for message in payload["dropped"]:
            self._warn(trainer, "checkpoint_dropped", message, python_warning=True)
        if payload["archived"]:
            self._warn(trainer, "checkpoint_manifest_archived", payload["archived"], python_warning=True)

    def _read_and_verify(self, trainer: "pl.Trainer") -> Dict[str, Any]:
        directory = self.dirpath or "."
        os.makedirs(directory, exist_ok=True)
        resuming = bool(getattr(trainer, "ckpt_path", None)) or self._state_loaded
        manifest: Optional[Dict[str, Any]] = None
        archived = ""
        path = self.manifest_path or MANIFEST_NAME
        if os.path.exists(path):
            try:
                manifest = _load_manifest(path)
            except (OSError, ValueError) as exc:
                archived = (f"MetricCheckpoint: {path} could not be read ({exc}); it was renamed aside and the "
                            "checkpoint state restored from the resumed checkpoint (if any).")
                os.replace(path, os.path.join(directory, f"manifest-unreadable-{uuid.uuid4().hex[:8]}.json"))
                manifest = None
        if manifest is not None and not resuming and manifest.get("run") != self._run:
            # A fresh run in a directory used before: keep the old files and record, start a new manifest.
            aside = os.path.join(directory, f"manifest-{str(manifest.get('run') or 'previous')[:8]}.json")
            os.replace(path, aside)
            archived = (f"MetricCheckpoint: {directory} already holds checkpoints of an earlier run; its manifest "
                        f"was moved to {os.path.basename(aside)} and its files are left untouched. This run starts a "
                        "new manifest (resume with trainer.fit(ckpt_path=...) to continue the earlier one).")
            manifest = None

        if manifest is not None:
            entries = [dict(e) for e in manifest.get("checkpoints", []) if isinstance(e, dict) and e.get("file")]
            run = str(manifest.get("run") or self._run)
            events = list(manifest.get("events") or [])
            export = manifest.get("export")
        else:
            entries, run, events, export = [dict(e) for e in self._entries], self._run, list(self._events), None
        dropped: List[str] = []
        verified: List[Dict[str, Any]] = []
        for entry in entries:
            problem = self._verify_entry(entry)
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
                    and not self._verify_entry(entry, full_hash=True):
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
        self._run, self._entries, self._events, self._export_record = run, verified, events, export
        self._garbage = []
        fsync_dir(directory)
        self._write_manifest()
        return {"run": run, "entries": verified, "events": events, "export": export, "taken": taken,
                "dropped": dropped, "archived": archived}

    def _verify_entry(self, entry: Dict[str, Any], full_hash: Optional[bool] = None) -> str:
        path = self._abs(entry["file"])
        if not os.path.exists(path):
            return "the file is missing"
        size = entry.get("bytes")
        if size is not None and path_size(path) != int(size):
            return f"its size is {path_size(path):,} bytes, the manifest says {int(size):,}"
        if (self.verify_on_resume if full_hash is None else full_hash) and entry.get("sha256"):
            if sha256_path(path) != entry["sha256"]:
                return "its SHA-256 does not match the manifest (the file was altered or is corrupt)"
        return ""

    # -------------------------------------------------------------------------------------- export
    def _export_best(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", best: Dict[str, Any]) -> None:
        if not is_global_zero(trainer) or is_sharded_strategy(trainer):
            return
        fmt = self.export
        final = self._abs("best.onnx" if fmt == "onnx" else "best.pt")
        try:
            if fmt == "onnx":
                atomic_save(lambda p: pl_module.to_onnx(p, pl_module.example_input_array), final)
            else:
                example = getattr(pl_module, "example_input_array", None)
                method = "trace" if example is not None else "script"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    scripted = pl_module.to_torchscript(method=method, example_inputs=example)
                    atomic_save(lambda p: torch.jit.save(scripted, p), final)
        except Exception as exc:  # an export problem must not end training; the checkpoint itself is safe
            self._warn(trainer, "checkpoint_export_failed",
                       f"MetricCheckpoint: exporting the best model as {fmt} failed: {exc}")
            return
        self._export_record = {"format": fmt, "file": os.path.basename(final), "source": best["file"],
                               "step": best["step"], "sha256": sha256_path(final), "bytes": path_size(final),
                               "time": _utc_now()}
        self._write_manifest()

    # ------------------------------------------------------------------------------------- small parts
    def _trainer(self) -> Optional[Any]:
        return self._trainer_ref() if self._trainer_ref is not None else None

    def _abs(self, name: str) -> str:
        return os.path.join(self.dirpath, name) if self.dirpath else name

    def _pool(self, reason: str) -> List[Dict[str, Any]]:
        return [e for e in self._entries if e["reason"] == reason and not e.get("pinned")]

    def _rank(self, entries: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
        # Best first; among equal scores the older one ranks first (it got there first, as in ModelCheckpoint).
        sign = 1.0 if self.mode == "min" else -1.0
        return sorted(entries, key=lambda e: (sign * float(e["score"]), int(e.get("seq", 0))))

    def _ranked_top_k(self) -> List[Dict[str, Any]]:
        return self._rank(self._pool("top_k"))

    def _best_entry(self) -> Optional[Dict[str, Any]]:
        if self.monitor is not None:
            ranked = self._ranked_top_k()
            return ranked[0] if ranked else None
        interval = self._pool("interval")
        return interval[-1] if interval else None

    @staticmethod
    def _newest_healthy(entries: Iterable[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        candidates = [e for e in entries if e.get("healthy") and not e.get("weights_only")]
        return max(candidates, key=lambda e: (int(e["step"]), int(e.get("seq", 0)))) if candidates else None

    def _resolve_dirpath(self, trainer: "pl.Trainer") -> str:
        if self.dirpath:
            return self.dirpath
        loggers = list(getattr(trainer, "loggers", None) or [])
        if loggers:
            save_dir = loggers[0].save_dir or trainer.default_root_dir
            version = loggers[0].version
            version = version if isinstance(version, str) else f"version_{version}"
            path = os.path.join(str(save_dir), str(loggers[0].name), version, "checkpoints")
        else:
            path = os.path.join(str(trainer.default_root_dir), "checkpoints")
        return os.path.realpath(path)

    @staticmethod
    def _fitting(trainer: "pl.Trainer") -> bool:
        return str(getattr(trainer.state.fn, "value", trainer.state.fn)) == "fit"

    def _epoch_due(self, trainer: "pl.Trainer") -> bool:
        n = self._every_n_epochs
        return (n >= 1 and (trainer.current_epoch + 1) % n == 0 and trainer.global_step > 0
                and self._last_epoch_checked != trainer.current_epoch)

    def _should_save_on_train_epoch_end(self, trainer: "pl.Trainer") -> bool:
        # The same rule as ModelCheckpoint: after validation when it runs every epoch, else at epoch end.
        if self.save_on_train_epoch_end is not None:
            return bool(self.save_on_train_epoch_end)
        if getattr(trainer, "_val_check_time_interval", None) is not None:
            return False
        if trainer.check_val_every_n_epoch != 1:
            return False
        num_val = trainer.num_val_batches
        num_val = sum(num_val) if isinstance(num_val, list) else num_val
        if num_val == 0:
            return True
        return trainer.val_check_interval == 1.0

    def _on_alert(self, alert: Alert) -> None:
        # Healthy marks: errors from training checks count, this callback's own bookkeeping alerts do not.
        if alert.source != _SOURCE and severity_at_least(alert.severity, "error"):
            self._errors_since_save += 1

    def _warn(self, trainer: "pl.Trainer", rule: str, message: str, value: Optional[float] = None,
              python_warning: bool = False) -> None:
        """An alert record (warning) from this callback; rate-limited per rule."""
        step = logging_step(trainer)
        if python_warning and is_global_zero(trainer):
            warnings.warn(message, CheckpointWarning, stacklevel=3)
        allowed, suppressed = self._cooldown.allow(rule, self.name, step)
        if not allowed:
            return
        if suppressed:
            message += f" ({suppressed} similar alert(s) suppressed.)"
        alert = Alert(source=_SOURCE, rule=rule, severity="warning", message=message, subject=self.monitor,
                      value=None if value is None else float(value), action="log", step=step,
                      epoch=int(getattr(trainer, "current_epoch", 0)))
        alert_log(trainer).publish(alert, self.writer)


# ------------------------------------------------------------------------------- the checkpoint action
_WARNED_NO_CHECKPOINT: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _checkpoint_action(ctx: ActionContext) -> None:
    """The ``checkpoint`` action: ask every ``MetricCheckpoint`` of the Trainer to save at the next safe point."""
    found = [cb for cb in getattr(ctx.trainer, "callbacks", []) if isinstance(cb, _MetricCheckpoint)]
    for cb in found:
        cb.request_save("alert", ctx.alert)
    if not found and ctx.trainer not in _WARNED_NO_CHECKPOINT:
        _WARNED_NO_CHECKPOINT.add(ctx.trainer)
        message = (f"lightwatch: rule {ctx.alert.rule!r} asked for a checkpoint, but the Trainer has no "
                   "MetricCheckpoint callback; add lightwatch.callbacks.MetricCheckpoint(...) to "
                   "Trainer(callbacks=...). (Warned once.)")
        logger.warning(message)
        if is_global_zero(ctx.trainer):
            warnings.warn(message, CheckpointWarning, stacklevel=2)


register_action("checkpoint", _checkpoint_action, changes_control_flow=True,
                description="save a checkpoint with MetricCheckpoint at the next safe point")


#: The class to add to ``Trainer(callbacks=[...])``: the implementation above bound to the installed
#: Lightning package (``pytorch_lightning``, else ``lightning.pytorch``; ``lightwatch.lightning`` binds it to
#: the latter).
MetricCheckpoint = bind(_MetricCheckpoint, default_package(), "checkpoint", module=__name__)
