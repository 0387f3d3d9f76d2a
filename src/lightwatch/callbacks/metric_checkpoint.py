"""``MetricCheckpoint``: checkpoints on metrics and on events that a crash, a full disk or a resume cannot lose.

It is a Lightning :class:`~pytorch_lightning.callbacks.Checkpoint`, so the Trainer treats it as *the*
checkpoint callback (no default ``ModelCheckpoint`` is added, ``trainer.test(ckpt_path="best")`` uses it).
Every file is committed atomically (temporary name in the same directory, fsync, ``os.replace``, directory
fsync), recorded in ``manifest.json`` with its SHA-256 and size, and an older file is deleted only after the
newer one is committed and recorded. See the README section on ``MetricCheckpoint`` for the guarantees and the format.

The callback adapts the parts of :mod:`lightwatch.core.checkpoint` to the Trainer's hooks: when to check
(:class:`~lightwatch.core.checkpoint.schedule.CheckpointSchedule`), what to save and keep
(:class:`~lightwatch.core.checkpoint.selection.CheckpointSelection`), the directory and its manifest
(:class:`~lightwatch.core.checkpoint.store.CheckpointStore`), the file names
(:class:`~lightwatch.core.checkpoint.naming.FileNamer`), the collective steps of a save
(:mod:`lightwatch.core.checkpoint.trainer`) and what it reports (:mod:`lightwatch.core.checkpoint.report`).
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from weakref import proxy

from lightwatch.core.alerts import Alert, AlertCooldown, alert_log, severity_at_least
from lightwatch.core.checkpoint.attributes import AssignedAttribute, PartAttribute
from lightwatch.core.checkpoint.errors import CheckpointIntegrityError, CheckpointSaveError, CheckpointWarning
from lightwatch.core.checkpoint.naming import FileNamer, finite_or_none, safe_name_part, template_fields
from lightwatch.core.checkpoint.report import SOURCE as _SOURCE
from lightwatch.core.checkpoint.report import (
    exception_item,
    exception_save,
    publish_save_failure,
    publish_warning,
    write_save,
)
from lightwatch.core.checkpoint.schedule import CheckpointSchedule
from lightwatch.core.checkpoint.selection import REASONS, REQUESTABLE_REASONS, CheckpointSelection, Item
from lightwatch.core.checkpoint.integrity import check_dirpath, verified_rollback_point, verify_recorded
from lightwatch.core.checkpoint.store import MANIFEST_NAME, MANIFEST_VERSION, CheckpointStore, local_dirpath
from lightwatch.core.checkpoint.trainer import (
    check_fit_setup,
    export_best,
    fitting,
    guard_checkpoint_loads,
    monitor_problem,
    param_bytes,
    read_rank0_values,
    reconcile,
    resolve_dirpath,
    save_round,
    saves_on_train_epoch_end,
)
from lightwatch.core.lightning import bind, default_package
from lightwatch.core.rng import collect_rng_state, restore_rng_state
from lightwatch.core.runtime import is_global_zero
from lightwatch.core.writer import MonitorWriter

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = [
    "MetricCheckpoint",
    "CheckpointIntegrityError",
    "CheckpointSaveError",
    "CheckpointWarning",
    "REASONS",
    "REQUESTABLE_REASONS",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "collect_rng_state",
    "restore_rng_state",
    "safe_name_part",
]

logger = logging.getLogger("lightwatch")


def _no_guard() -> None:
    """Nothing to undo (no load guard installed)."""


class _MetricCheckpoint:
    """Save checkpoints on a monitored metric (top-k), thresholds, intervals, alerts and exceptions, safely.

    Each file is recorded in ``manifest.json`` with its ``reason`` (``top_k``, ``last``, ``threshold``,
    ``interval``, ``alert``, ``exception``), committed atomically, and deleted only after a newer one is
    committed; a failed write raises the same :class:`CheckpointSaveError` on every rank and keeps every earlier
    file. A checkpoint is *healthy* when no alert of severity ``error`` or worse was published since the previous
    save and the parameters are finite; :meth:`latest_healthy` returns the newest healthy one. What is saved
    when is in the guide (``docs/callbacks/metric-checkpoint.md``); the guarantees and the manifest's format in
    ``docs/checkpoints.md``.

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

    # Settings and state kept by the parts, read and set here as the callback's own.
    monitor = PartAttribute("_selection")
    mode = PartAttribute("_selection")
    save_top_k = PartAttribute("_selection")
    save_last = PartAttribute("_selection")
    thresholds = PartAttribute("_selection")
    keep_threshold_checkpoints = PartAttribute("_selection")
    save_on_alert = PartAttribute("_selection")
    alert_save_cooldown_steps = PartAttribute("_selection")
    keep_alert_checkpoints = PartAttribute("_selection")
    save_weights_only = PartAttribute("_selection")
    current_score = PartAttribute("_selection")
    _armed = PartAttribute("_selection", "armed")
    dirpath = PartAttribute("_store")
    verify = PartAttribute("_store")
    verify_on_resume = PartAttribute("_store")
    every_n_train_steps = PartAttribute("_schedule")
    every_n_epochs = PartAttribute("_schedule")
    _every_n_train_steps = PartAttribute("_schedule", "steps")
    _every_n_epochs = PartAttribute("_schedule", "epochs")

    # The attributes Lightning reads and assigns on a checkpoint callback, as on ModelCheckpoint.
    best_model_score = AssignedAttribute(lambda self: self._store.best_score())
    last_model_path = AssignedAttribute(lambda self: self._store.last_path(), lambda v: str(v or ""))
    best_k_models = AssignedAttribute(lambda self: self._store.best_k(), dict)
    kth_best_model_path = AssignedAttribute(lambda self: self._store.kth_path(), lambda v: str(v or ""))
    kth_value = AssignedAttribute(lambda self: self._store.kth_score())

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
        CheckpointSelection.check_target(monitor, mode)
        dirpath = local_dirpath(dirpath)
        check_dirpath(dirpath)
        if export not in (None, "onnx", "torchscript"):
            raise ValueError(f"MetricCheckpoint: export must be None, 'onnx' or 'torchscript', got {export!r}.")
        self.filename = filename or "{epoch}" + self.CHECKPOINT_JOIN_CHAR + "{step}"
        self._template_fields = template_fields(self.filename, "MetricCheckpoint")
        template_fields(self.CHECKPOINT_NAME_LAST, "MetricCheckpoint (CHECKPOINT_NAME_LAST)")
        self._selection = CheckpointSelection(
            monitor, mode, save_top_k, save_last, thresholds, keep_threshold_checkpoints, save_on_alert,
            alert_save_cooldown_steps, keep_alert_checkpoints, save_weights_only)
        self._store = CheckpointStore(self._selection, dirpath, verify, verify_on_resume)
        self._schedule = CheckpointSchedule(every_n_train_steps, every_n_epochs)
        self.save_on_train_epoch_end = save_on_train_epoch_end
        self.save_on_exception = bool(save_on_exception)
        self.auto_insert_metric_name = bool(auto_insert_metric_name)
        self.export = export
        self.name = str(name)
        self.writer = MonitorWriter(prefix)
        self._cooldown = AlertCooldown(100)
        self._value_keys: List[str] = self._selection.value_keys(self._template_fields)
        # values Lightning (or a user) assigned to the attributes it writes on a checkpoint callback, as on
        # ModelCheckpoint; they stand until the next commit changes the entries they were derived from
        self._assigned: Dict[str, Any] = {}
        self._state_loaded = False
        self._ready = False
        self._saving = False
        self._trainer_ref: Optional[Any] = None
        self._unguard: Callable[[], None] = _no_guard  # removes the hash check around the Trainer's loads

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, name=self.name,
                                        every_n_train_steps=self._every_n_train_steps,
                                        every_n_epochs=self._every_n_epochs)

    def record_event(self, kind: str, **fields: Any) -> None:
        """Append an event (e.g. ``kind="rollback", step=120, restored="…ckpt", reason="loss spike"``) to the
        ``"events"`` list of ``manifest.json`` and rewrite it atomically (global rank 0 writes).

        A ``rollback`` event also clears the count of errors since the last save: the restored state is the
        healthy one, so the next checkpoint is healthy unless new errors occur.
        """
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        self._store.add_event(kind, None if trainer is None else trainer.global_step, fields)
        if kind == "rollback":
            self._selection.errors_since_save = 0
        if self._ready and trainer is not None and is_global_zero(trainer):
            self._store.write_manifest()

    @property
    def manifest_path(self) -> Optional[str]:
        return self._store.manifest_path

    @property
    def checkpoints(self) -> List[Dict[str, Any]]:
        """Copies of the manifest records of the committed checkpoints, oldest first, with an absolute ``path``."""
        return self._store.records()

    @property
    def best_model_path(self) -> str:
        """Path of the best top-k checkpoint (the newest interval one without ``monitor``), or ``""``."""
        return self._assigned.get("best_model_path", self._store.best_path())

    @best_model_path.setter
    def best_model_path(self, value: str) -> None:
        # Lightning sets it in the main process after `ddp_spawn` trained in workers: this instance then has
        # no entries of its own, so it reads the manifest the workers committed beside that file
        value = str(value or "")
        if value and not self._selection.entries:
            self._store.adopt_manifest(os.path.dirname(value))
        if not self._store.is_best(value):
            self._assigned["best_model_path"] = value

    @property
    def _last_checkpoint_saved(self) -> str:  # read by Lightning loggers (e.g. WandbLogger)
        return self._store.newest_path()

    def latest_healthy(self) -> Optional[str]:
        """Path of the newest committed checkpoint marked healthy (a rollback point), or ``None``.

        Every file it can return was hashed when it was committed (and again on resume), and rotation never
        deletes it before a newer healthy checkpoint is committed. Weights-only files are not rollback points.
        """
        return self._store.latest_healthy()

    def verified_rollback_point(self) -> Tuple[Optional[str], List[str]]:
        """The newest healthy checkpoint whose file still matches the SHA-256 recorded at its commit, and what
        is wrong with each newer healthy one passed over; a rollback restores from it (called on rank 0)."""
        return verified_rollback_point(self._store)

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
        self._selection.request(reason, alert)

    def format_checkpoint_name(self, metrics: Mapping[str, Any], filename: Optional[str] = None,
                               ver: Optional[int] = None, prefix: Optional[str] = None) -> str:
        """The file name for ``metrics`` (tensors or numbers; ``epoch`` and ``step`` among them), as Lightning's.

        Returned relative to ``dirpath`` when it is not known yet, else as an absolute path.
        """
        name = self._namer().checkpoint_name(metrics, filename, ver, prefix)
        return os.path.join(self.dirpath, name) if self.dirpath else name

    def _namer(self) -> FileNamer:
        return FileNamer(self.filename, self.CHECKPOINT_NAME_LAST, self.CHECKPOINT_JOIN_CHAR, self.FILE_EXTENSION,
                         self.STARTING_VERSION, self.auto_insert_metric_name)

    # --------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._trainer_ref = weakref.ref(trainer)
        alert_log(trainer).subscribe(self._on_alert)
        dirpath = trainer.strategy.broadcast(self.dirpath or resolve_dirpath(trainer))
        self.dirpath = dirpath
        self._unguard()
        self._unguard = guard_checkpoint_loads(trainer, self._store)
        if stage != "fit":
            return
        others = [cb.dirpath for cb in trainer.callbacks if isinstance(cb, _MetricCheckpoint) and cb is not self]
        check_fit_setup(trainer, pl_module, dirpath, others, self.export)
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
        self._store.param_bytes = param_bytes(trainer, pl_module)
        self._reconcile(trainer)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._schedule.batch_started(trainer.global_step)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # A safe point only once the optimizer has stepped (not inside a gradient-accumulation window).
        if not self._schedule.stepped(trainer.global_step) or not self._ready:
            return
        due = self._schedule.step_due(trainer.global_step)
        if due or self._selection.requests:
            self._check(trainer, pl_module, trigger="step" if due else None)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._ready:
            self._epoch_check(trainer, pl_module, at_train_epoch_end=True)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._ready and not trainer.sanity_checking and fitting(trainer):
            self._epoch_check(trainer, pl_module, at_train_epoch_end=False)

    def _epoch_check(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", at_train_epoch_end: bool) -> None:
        # epoch checks run at one of the two points, decided as ModelCheckpoint does; requests at both
        due = (saves_on_train_epoch_end(trainer, self.save_on_train_epoch_end) == at_train_epoch_end
               and self._schedule.epoch_due(trainer.current_epoch, trainer.global_step))
        if due or self._selection.requests:
            self._check(trainer, pl_module, trigger="epoch" if due else None)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._ready:
            return
        if trainer.global_step > 0 and self._selection.last_is_stale(trainer.global_step):
            self.request_save("last")
        if self._selection.requests:
            self._check(trainer, pl_module, trigger=None)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._selection.requests.clear()
        self.writer.flush(trainer)
        if not (self.save_on_exception and self._ready) or self._saving or isinstance(exception, CheckpointSaveError):
            return
        allowed, why_not = exception_save(trainer, exception)
        if why_not:
            self._warn(trainer, "exception_not_saved", why_not)
        if not allowed:
            return
        try:
            values = read_rank0_values(trainer, self._value_keys) if self._value_keys else {}
            self._save_round(trainer, pl_module, [exception_item(exception)], values)
        except Exception as exc:  # never hide the exception that ended training
            logger.error("MetricCheckpoint: the exception checkpoint could not be saved: %s", exc)

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        # Every full checkpoint this Trainer writes carries the RNG states a rollback restores.
        checkpoint.setdefault("lightwatch", {})["rng"] = collect_rng_state()

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        # Second line behind the load guard (strategies that load without checkpoint_io): the first hook after
        # Lightning read `ckpt_path`, before training or evaluation uses it.
        path = getattr(trainer, "ckpt_path", None)
        problem = verify_recorded(self._store, str(path)) if path and is_global_zero(trainer) else ""
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise CheckpointIntegrityError(problem)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._ready = False  # a later fit() re-reads the manifest
        alert_log(trainer).unsubscribe(self._on_alert)
        self._unguard()
        self._unguard = _no_guard
        self.writer.flush(trainer)

    def state_dict(self) -> Dict[str, Any]:
        paths = {"best_model_path": self.best_model_path, "best_model_score": finite_or_none(self.best_model_score),
                 "last_model_path": self.last_model_path}
        return self._store.state_dict(self._schedule.state_dict(), paths)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._state_loaded = True
        self._store.load_state_dict(state_dict)
        self._schedule.load_state_dict(state_dict)

    # ------------------------------------------------------------------------------- checks / saves
    def _check(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", trigger: Optional[str]) -> None:
        """Decide what to save at this safe point (identically on every rank) and save it.

        ``trigger`` is ``"step"`` or ``"epoch"`` for a scheduled check, ``None`` when only requests are due.
        """
        if not fitting(trainer) or trainer.sanity_checking or bool(getattr(trainer, "fast_dev_run", False)):
            self._selection.requests.clear()
            return
        step = int(trainer.global_step)
        items: List[Item] = []
        values = read_rank0_values(trainer, self._value_keys) if (trigger and self._value_keys) else {}
        self._schedule.mark(trigger, step, int(trainer.current_epoch))
        if trigger and step > 0:
            items, issue = self._selection.scheduled(values)
            if issue is not None:
                self._warn(trainer, *monitor_problem(trainer, self.monitor, *issue), value=issue[1])
        items = self._selection.with_requests(items, step)
        if items:
            if not values and self._value_keys:
                values = read_rank0_values(trainer, self._value_keys)
            self._save_round(trainer, pl_module, items, values)

    def _save_round(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", items: Sequence[Item],
                    values: Mapping[str, float]) -> None:
        """Write one checkpoint for ``items`` (several reasons share one file's content), commit it, report it."""
        self._saving = True
        try:
            context = {"best": self.best_model_path, "last": self.last_model_path,
                       "latest_healthy": self.latest_healthy()}
            try:
                plan = save_round(trainer, pl_module, self._selection, self._store, items, values, self._namer(),
                                  self.save_weights_only, own_prefix=f"{self.writer.prefix}.ckpt/",
                                  error_context=context)
            except CheckpointSaveError as exc:
                publish_save_failure(trainer, self.writer, self.monitor, exc)
                raise
            self._assigned.clear()
            self._after_save(trainer, pl_module, plan)
        finally:
            self._saving = False

    def _after_save(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", plan: Dict[str, Any]) -> None:
        write_save(trainer, self.writer, self.name, self._selection, plan["new"])
        if is_global_zero(trainer):
            for lg in list(getattr(trainer, "loggers", None) or []):
                lg.after_save_checkpoint(proxy(self))
        best = self._selection.best_entry()
        if self.export and best is not None and any(e is best for e in plan["new"]) and best["reason"] == "top_k":
            problem = export_best(trainer, pl_module, self._store, self.export, best)
            if problem:
                self._warn(trainer, "checkpoint_export_failed", problem)

    def _reconcile(self, trainer: "pl.Trainer") -> None:
        """Adopt the checked manifest (read on rank 0, broadcast) and warn about what it dropped or moved aside."""
        payload = reconcile(trainer, self._store, bool(getattr(trainer, "ckpt_path", None)) or self._state_loaded)
        self._assigned.clear()
        self._ready = True
        for message in payload["dropped"]:
            self._warn(trainer, "checkpoint_dropped", message, python_warning=True)
        if payload["archived"]:
            self._warn(trainer, "checkpoint_manifest_archived", payload["archived"], python_warning=True)

    # ------------------------------------------------------------------------------------- small parts
    def _on_alert(self, alert: Alert) -> None:
        # Healthy marks: errors from training checks count, this callback's own bookkeeping alerts do not.
        if alert.source != _SOURCE and severity_at_least(alert.severity, "error"):
            self._selection.count_error()

    def _warn(self, trainer: "pl.Trainer", rule: str, message: str, value: Optional[float] = None,
              python_warning: bool = False) -> None:
        """An alert record (warning) from this callback; rate-limited per rule."""
        publish_warning(trainer, self.writer, self._cooldown, self.name, self.monitor, rule, message, value,
                        python_warning)


#: The class to add to ``Trainer(callbacks=[...])``: the implementation above bound to the installed
#: Lightning package (``pytorch_lightning``, else ``lightning.pytorch``; ``lightwatch.lightning`` binds it to
#: the latter).
MetricCheckpoint = bind(_MetricCheckpoint, default_package(), "checkpoint", module=__name__)
