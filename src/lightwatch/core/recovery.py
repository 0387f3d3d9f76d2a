"""Actions that save a run: ``skip_step`` drops one optimizer update, ``rollback`` returns to the last healthy state.

Both are built-in actions of :mod:`lightwatch.core.actions`, so any rule or check can name them.

``skip_step``
    Every ``.grad`` is set to ``None`` in ``on_before_optimizer_step``: optimizers skip parameters without a
    gradient, so neither the parameters nor the optimizer state (momentum, Adam moments, step counts) move.
    It must be decided before the update: a rule checked after the optimizer step can no longer drop it, and
    says so in a warning. Under gradient accumulation the whole accumulated update is dropped. With AMP's
    ``GradScaler`` the scaler has already unscaled and checked the gradients (Lightning does both before
    ``on_before_optimizer_step``), ``scaler.step`` finds nothing to update, and ``scaler.update`` still backs
    the scale off after an overflow, as it should. The step still counts: ``global_step`` and step-interval
    LR schedulers advance as if the update had been made, so the schedule stays aligned with the data.

``rollback``
    Restores model, optimizer, LR scheduler, precision-plugin (``GradScaler``) and RNG state from
    ``MetricCheckpoint.latest_healthy()`` when a ``MetricCheckpoint`` is in ``trainer.callbacks``, or from an
    in-memory ring of snapshots otherwise, then continues with the next batch: the batches seen since the
    restored state are not replayed (PaLM and BLOOM skip them in the same way). The step counter keeps going
    forward; the LR scheduler returns to its restored state. The learning rate can be multiplied by
    ``lr_factor`` at each rollback. After ``max_rollbacks`` rollbacks a further request stops training.
    Restores happen at a safe point: at once from ``on_train_batch_end``, validation or epoch hooks, and at the
    end of the same training batch when requested from inside the optimizer step. Every rank loads the same
    state, so the weights stay identical under DDP.

The in-memory ring costs one copy of the model and optimizer state per snapshot (on the parameters' device
unless ``snapshot_device`` says otherwise) and one copy's worth of time each time a snapshot is taken.
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from lightwatch.core.action_context import ActionContext, MonitorWarning
from lightwatch.core.alerts import Alert, alert_log, severity_at_least
from lightwatch.core.reduce import agree_max
from lightwatch.core.rng import capture_rng_state, restore_rng
from lightwatch.core.runtime import distributed_ready, is_global_zero, is_sharded_strategy, logging_step

__all__ = [
    "Recovery",
    "Snapshot",
    "SnapshotRing",
    "capture_rng_state",
    "checkpoint_callback",
    "drop_gradients",
    "install_recovery",
    "recovery_for",
    "request_rollback",
    "restore_rng",
    "scale_learning_rate",
    "skip_step",
]

logger = logging.getLogger("lightwatch")

# Hooks where a rollback would land in the middle of a step: the restore waits for the end of the batch.
_INSIDE_STEP = {"training_step", "on_before_backward", "backward", "on_after_backward", "on_before_optimizer_step",
                "optimizer_step", "on_before_zero_grad", "optimizer_zero_grad", "configure_gradient_clipping"}
# Hooks before the optimizer update of the current step: a skip requested there is applied at the update.
_BEFORE_UPDATE = {"on_train_batch_start", "training_step", "on_before_backward", "backward", "on_after_backward",
                  "on_before_zero_grad", "optimizer_zero_grad"}
# Group keys that some schedulers (OneCycleLR, CyclicLR) read the learning rate from.
_LR_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "base_lr")


# ------------------------------------------------------------------- gradients, learning rates, sizes
def checkpoint_callback(trainer: Any) -> Optional[Any]:
    """The ``MetricCheckpoint`` of ``trainer`` (any callback with ``latest_healthy()``), or ``None``."""
    for cb in list(getattr(trainer, "callbacks", None) or []):
        if callable(getattr(cb, "latest_healthy", None)):
            return cb
    return None


def _optimizer_params(trainer: Any, pl_module: Any) -> List[torch.Tensor]:
    params: Dict[int, torch.Tensor] = {}
    for opt in list(getattr(trainer, "optimizers", None) or []):
        for group in opt.param_groups:
            for p in group["params"]:
                params[id(p)] = p
    if pl_module is not None:
        for p in pl_module.parameters():
            params[id(p)] = p
    return list(params.values())


def drop_gradients(trainer: Any, pl_module: Any) -> None:
    """Set every gradient to ``None`` so that the coming optimizer step changes nothing.

    With a ``GradScaler`` whose optimizer was not unscaled yet (fused optimizers, manual loops), the gradients
    are unscaled first, so the scaler has its overflow check recorded and ``scaler.step`` does not fail.
    """
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        for opt in list(getattr(trainer, "optimizers", None) or []):
            try:
                from torch.amp.grad_scaler import OptState

                if scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY:
                    scaler.unscale_(opt)
            except (AttributeError, ImportError, KeyError, RuntimeError):  # other scaler versions: nothing to do
                pass
    for p in _optimizer_params(trainer, pl_module):
        p.grad = None


def _scale_scheduler(scheduler: Any, factor: float) -> None:
    for attr in ("base_lrs", "_last_lr", "max_lrs"):
        values = getattr(scheduler, attr, None)
        if isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values):
            setattr(scheduler, attr, [v * factor for v in values])
    for inner in getattr(scheduler, "_schedulers", None) or []:  # SequentialLR, ChainedScheduler
        _scale_scheduler(inner, factor)


def scale_learning_rate(trainer: Any, factor: float) -> None:
    """Multiply the learning rate of every optimizer and the bounds schedulers compute it from by ``factor``."""
    if factor == 1.0:
        return
    for opt in list(getattr(trainer, "optimizers", None) or []):
        for group in opt.param_groups:
            for key in _LR_GROUP_KEYS:
                value = group.get(key)
                if isinstance(value, torch.Tensor):
                    value.mul_(factor)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    group[key] = value * factor
    for config in list(getattr(trainer, "lr_scheduler_configs", None) or []):
        _scale_scheduler(config.scheduler, factor)


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _to_device(obj: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------- snapshots
@dataclass
class Snapshot:
    """Model, optimizer, scheduler, precision and RNG state after ``step`` optimizer steps.

    Example:
        >>> Snapshot(step=10, epoch=0, state={}, lr_scale=1.0, rng={}, nbytes=0).used
        False
    """

    step: int
    epoch: int
    state: Dict[str, Any]
    lr_scale: float
    rng: Dict[str, Any]
    nbytes: int
    used: bool = False


class SnapshotRing:
    """The last ``size`` healthy states, kept in memory for ``rollback`` when no checkpoint callback exists.

    Memory: one copy of the model's ``state_dict`` plus the optimizer state per snapshot (Adam: about three
    times the parameter bytes), on ``device`` (default: where the tensors are).

    Example:
        >>> ring = SnapshotRing(size=2)
        >>> ring.size, len(ring)
        (2, 0)
    """

    def __init__(self, size: int, device: Optional[str] = None) -> None:
        if isinstance(size, bool) or int(size) != size or size < 0:
            raise ValueError(f"SnapshotRing: size must be an integer >= 0, got {size!r}.")
        self.size = int(size)
        self.device = None if device is None else torch.device(device)
        self.snapshots: List[Snapshot] = []
        self.captures = 0

    def __len__(self) -> int:
        return len(self.snapshots)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.snapshots)

    def capture(self, trainer: Any, pl_module: Any, step: int, lr_scale: float) -> Snapshot:
        """Copy the current training state (call between steps, never inside one)."""
        model = {k: v.detach().to(self.device or v.device, copy=True) for k, v in pl_module.state_dict().items()}
        optimizers = [_to_device(copy.deepcopy(trainer.strategy.optimizer_state(opt)), self.device)
                      for opt in trainer.optimizers]
        schedulers = [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs]
        precision = copy.deepcopy(trainer.precision_plugin.state_dict())
        state = {"state_dict": model, "optimizer_states": optimizers, "lr_schedulers": schedulers,
                 "precision": precision}
        snap = Snapshot(int(step), int(getattr(trainer, "current_epoch", 0)), state, float(lr_scale),
                        capture_rng_state(), _tensor_bytes(model) + _tensor_bytes(optimizers))
        self.snapshots.append(snap)
        del self.snapshots[:-self.size]
        self.captures += 1
        return snap

    def take(self) -> Optional[Snapshot]:
        """The newest snapshot to restore. One already restored once, after which training failed again before
        a newer snapshot was taken, is dropped: the next rollback goes further back."""
        while self.snapshots and self.snapshots[-1].used:
            self.snapshots.pop()
        if not self.snapshots:
            return None
        snap = self.snapshots[-1]
        snap.used = True
        return snap

    def clear(self) -> None:
        self.snapshots.clear()


# ---------------------------------------------------------------------------------------- recovery
@dataclass
class _Request:
    rule: str
    source: str
    step: int
    writer: Any = None


@dataclass
class RollbackRecord:
    """What one rollback did (kept in :attr:`Recovery.history`).

    Example:
        >>> RollbackRecord(step=120, restored_step=100, source="snapshot", rule="loss_nonfinite", lr_scale=0.5,
        ...                count=1).restored_step
        100
    """

    step: int
    restored_step: int
    source: str
    rule: str
    lr_scale: float
    count: int
    extra: Dict[str, Any] = field(default_factory=dict)


class Recovery:
    """Per-Trainer state of ``skip_step`` and ``rollback``: counters, pending requests and the snapshot ring.

    ``MetricMonitor`` creates one with its settings and installs it on the Trainer (:func:`install_recovery`);
    any other callback's ``skip_step`` or ``rollback`` action then uses it through :func:`recovery_for`.

    Args:
        max_rollbacks: rollbacks allowed in one run; a further request stops training (``trainer.should_stop``).
        lr_factor: multiply the learning rate by this at each rollback (1.0: unchanged; OPT used 0.9).
        snapshots: size of the in-memory ring (0: off, rely on a ``MetricCheckpoint``).
        snapshot_device: where snapshots are kept (``None``: next to the tensors; ``"cpu"`` saves accelerator
            memory at the cost of a copy through the host for each snapshot).

    Example:
        >>> rec = Recovery(max_rollbacks=2, lr_factor=0.5)
        >>> rec.rollbacks, rec.lr_scale
        (0, 1.0)
    """

    def __init__(self, max_rollbacks: int = 3, lr_factor: float = 1.0, snapshots: int = 0,
                 snapshot_device: Optional[str] = None) -> None:
        if isinstance(max_rollbacks, bool) or int(max_rollbacks) != max_rollbacks or max_rollbacks < 0:
            raise ValueError(f"Recovery: max_rollbacks must be an integer >= 0, got {max_rollbacks!r}.")
        if isinstance(lr_factor, bool) or not isinstance(lr_factor, (int, float)) or not 0 < lr_factor <= 1e6 \
                or not math.isfinite(lr_factor):
            raise ValueError(f"Recovery: lr_factor must be a positive finite number, got {lr_factor!r}.")
        self.max_rollbacks = int(max_rollbacks)
        self.lr_factor = float(lr_factor)
        self.ring = SnapshotRing(snapshots, snapshot_device)
        self.rollbacks = 0
        self.skipped_steps = 0
        self.lr_scale = 1.0
        self.history: List[RollbackRecord] = []
        self.unhealthy = False  # an alert since the last snapshot decision made the state suspect
        self._pending: Optional[_Request] = None
        self._skip_step: Optional[int] = None  # logging step whose update is being dropped
        self._skip_pending: Optional[int] = None  # logging step whose update must be dropped when it comes
        self._late_warned: set = set()
        self._last_rollback_step: Optional[int] = None
        self._after_rollback: List[Callable[[RollbackRecord], None]] = []

    # ---------------------------------------------------------------------------- wiring
    def attach(self, trainer: Any) -> None:
        alert_log(trainer).subscribe(self._on_alert)

    def detach(self, trainer: Any) -> None:
        alert_log(trainer).unsubscribe(self._on_alert)
        self.ring.clear()
        self._pending = None

    def on_rollback(self, fn: Callable[[RollbackRecord], None]) -> None:
        """Call ``fn`` after each rollback (``MetricMonitor`` rewinds its rule state there)."""
        if fn not in self._after_rollback:
            self._after_rollback.append(fn)

    def _on_alert(self, alert: Alert) -> None:
        if severity_at_least(alert.severity, "error") or alert.action in ("skip_step", "rollback", "stop", "raise"):
            self.unhealthy = True

    @property
    def pending(self) -> bool:
        return self._pending is not None

    # ---------------------------------------------------------------------------- skip_step
    def skip(self, ctx: ActionContext) -> None:
        trainer, pl_module = ctx.trainer, ctx.pl_module
        step = logging_step(trainer)
        hook = getattr(pl_module, "_current_fx_name", None)
        if hook == "on_before_optimizer_step":
            self.drop(trainer, pl_module, step)
        elif hook in _BEFORE_UPDATE:
            self._skip_pending = step
        else:
            key = (ctx.alert.source, ctx.alert.rule)
            if key not in self._late_warned and is_global_zero(trainer):
                self._late_warned.add(key)
                msg = (f"lightwatch: skip_step was requested by {ctx.alert.source} rule {ctx.alert.rule!r} in "
                       f"{hook or 'an unknown hook'}, after the optimizer update of step {step}: nothing was "
                       f"skipped. Check the rule before the update: MetricMonitor rules with "
                       f"check_on: [every_step].")
                warnings.warn(msg, MonitorWarning, stacklevel=2)
                logger.warning(msg)

    def drop(self, trainer: Any, pl_module: Any, step: int) -> None:
        """Drop the update of ``step`` (every optimizer stepping in it)."""
        drop_gradients(trainer, pl_module)
        if self._skip_step != step:
            self._skip_step = step
            self.skipped_steps += 1

    def apply_pending_skip(self, trainer: Any, pl_module: Any) -> bool:
        """In ``on_before_optimizer_step``: drop the update if a skip was asked for earlier in this step, or if
        another optimizer of this step was skipped already."""
        step = logging_step(trainer)
        if self._skip_pending == step or self._skip_step == step:
            self._skip_pending = None
            self.drop(trainer, pl_module, step)
            return True
        return False

    # ---------------------------------------------------------------------------- rollback
    def request_rollback(self, ctx: ActionContext) -> None:
        trainer = ctx.trainer
        step = logging_step(trainer)
        writer = getattr(ctx.source, "writer", None)
        if self._last_rollback_step == step:
            return  # this step was rolled back (or stopped) already: several rules asked for it
        if self.rollbacks >= self.max_rollbacks:
            self._last_rollback_step = step
            trainer.should_stop = True
            self._record(trainer, Alert(
                source=ctx.alert.source, rule="rollback_limit", severity="critical", action="stop",
                subject=ctx.alert.rule, value=float(self.rollbacks), threshold=float(self.max_rollbacks), step=step,
                epoch=int(getattr(trainer, "current_epoch", 0)),
                message=(f"rule {ctx.alert.rule!r} asked for a rollback, but the run already rolled back "
                         f"{self.rollbacks} time(s) (max_rollbacks={self.max_rollbacks}): stopping. The fault "
                         f"keeps coming back; lower the learning rate or inspect the data around step {step}.")),
                writer)
            return
        if self._pending is None:
            self._pending = _Request(ctx.alert.rule, ctx.alert.source, step, writer)
        hook = getattr(ctx.pl_module, "_current_fx_name", None)
        if hook in _INSIDE_STEP:
            # Restored state must not meet this step's update: drop it now, restore at the end of the batch.
            if hook == "on_before_optimizer_step":
                drop_gradients(trainer, ctx.pl_module)
            return
        self.perform(trainer, ctx.pl_module)

    def perform(self, trainer: Any, pl_module: Any) -> Optional[RollbackRecord]:
        """Carry out a pending rollback now (at a safe point; on every rank together)."""
        request, self._pending = self._pending, None
        if request is None:
            return None
        step = logging_step(trainer)
        epoch = int(getattr(trainer, "current_epoch", 0))
        ckpt_cb = checkpoint_callback(trainer)
        loaded, problem = self._load_checkpoint(trainer, ckpt_cb)
        if loaded is None:
            loaded = self._load_snapshot()
        if loaded is None:
            trainer.should_stop = True
            if problem:
                where = f"{problem}, and the in-memory ring is empty"
            elif ckpt_cb is not None:
                where = "MetricCheckpoint.latest_healthy() returned no checkpoint and the in-memory ring is empty"
            else:
                where = "there is no MetricCheckpoint in trainer.callbacks and no in-memory snapshot yet"
            self._record(trainer, Alert(
                source=request.source, rule="rollback_failed", severity="critical", action="stop",
                subject=request.rule, step=step, epoch=epoch,
                message=(f"rule {request.rule!r} asked for a rollback at step {request.step}, but {where}: "
                         f"stopping. Add a MetricCheckpoint, or give MetricMonitor(snapshots=...) time to take a "
                         f"healthy snapshot (one per every_n_steps).")), request.writer)
            return None
        state, source, restored_step, saved_scale, rng, from_file = loaded
        self._restore(trainer, state)
        if rng is not None:
            restore_rng(rng, from_checkpoint=from_file)
        self.rollbacks += 1
        self._last_rollback_step = step
        target_scale = self.lr_scale * self.lr_factor
        scale_learning_rate(trainer, target_scale / saved_scale if saved_scale > 0 else self.lr_factor)
        self.lr_scale = target_scale
        record = RollbackRecord(step, restored_step, source, request.rule, self.lr_scale, self.rollbacks)
        self.history.append(record)
        lr_note = f" The learning rate is now {self.lr_scale:g} x its schedule." if self.lr_factor != 1.0 else ""
        self._record(trainer, Alert(
            source=request.source, rule="rollback", severity="warning", action="rollback", subject=request.rule,
            value=float(restored_step), threshold=None, step=step, epoch=epoch,
            message=(f"rolled back after rule {request.rule!r} at step {request.step}: model, optimizer, LR "
                     f"scheduler and RNG restored from {source} (state after step {restored_step}); "
                     f"{max(0, int(trainer.global_step) - restored_step)} step(s) undone, the batches in between are "
                     f"not replayed. "
                     f"Rollback {self.rollbacks} of at most {self.max_rollbacks}.{lr_note}")), request.writer)
        if ckpt_cb is not None and callable(getattr(ckpt_cb, "record_event", None)):
            ckpt_cb.record_event("rollback", step=step, epoch=epoch, restored_step=restored_step, source=source,
                                 rule=request.rule, rollbacks=self.rollbacks, lr_scale=self.lr_scale)
        for fn in list(self._after_rollback):
            fn(record)
        self.unhealthy = False  # the restored state is a healthy one, whatever was recorded on the way
        return record

    def _load_checkpoint(self, trainer: Any, ckpt_cb: Any) -> Tuple[Optional[tuple], Optional[str]]:
        """The newest healthy checkpoint's state, or ``None`` and why (decided alike on every rank)."""
        if ckpt_cb is None:
            return None, None
        path, skipped = self._rollback_point(trainer, ckpt_cb)
        if distributed_ready():  # every rank must load the same file
            path, skipped = trainer.strategy.broadcast((path, skipped), src=0)
        if skipped:
            logger.warning("lightwatch: rollback passed over checkpoint(s) that no longer match the manifest: %s",
                           "; ".join(skipped))
        if not path:
            return None, ("no healthy checkpoint matches its manifest record (" + "; ".join(skipped) + ")"
                          if skipped else None)
        problem = None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            ckpt["state_dict"]
        except Exception as err:  # unreadable here: fall back to the ring (or stop), never half-restore
            problem = f"checkpoint {path} could not be loaded ({type(err).__name__}: {err})"
        failed = torch.tensor([0.0 if problem is None else 1.0])
        if distributed_ready():  # one rank's read error must not leave the others restoring alone
            device = getattr(trainer.strategy, "root_device", torch.device("cpu"))
            failed = agree_max(failed.to(device)).cpu()
        if failed.item() > 0:
            return None, problem or f"checkpoint {path} could not be loaded on another rank"
        restored = int(ckpt.get("global_step", 0))
        saved_scale = 1.0
        for key, cb_state in dict(ckpt.get("callbacks", {}) or {}).items():
            if str(key).startswith("MetricMonitor") and isinstance(cb_state, Mapping):
                saved_scale = float(dict(cb_state.get("recovery", {}) or {}).get("lr_scale", 1.0))
                break
        precision = ckpt.get(type(trainer.precision_plugin).__qualname__)
        state = {"state_dict": ckpt["state_dict"], "optimizer_states": ckpt.get("optimizer_states", []),
                 "lr_schedulers": ckpt.get("lr_schedulers", []), "precision": precision}
        rng = (ckpt.get("lightwatch") or {}).get("rng")
        return (state, str(path), restored, saved_scale, rng, True), None

    @staticmethod
    def _rollback_point(trainer: Any, ckpt_cb: Any) -> Tuple[Optional[str], List[str]]:
        """The checkpoint to restore (verified against its recorded hash where the callback can) and the newer
        healthy files passed over; hashed on global rank 0 only (the others take its answer)."""
        pick = getattr(ckpt_cb, "verified_rollback_point", None)
        if not callable(pick):
            return ckpt_cb.latest_healthy(), []
        if distributed_ready() and not getattr(trainer, "is_global_zero", True):
            return None, []
        path, skipped = pick()
        return path, list(skipped)

    def _load_snapshot(self) -> Optional[tuple]:
        snap = self.ring.take()
        if snap is None:
            return None
        # The ring keeps its copy: optimizers and schedulers would otherwise share (and move) its tensors.
        state = dict(snap.state)
        state["optimizer_states"] = copy.deepcopy(snap.state["optimizer_states"])
        state["lr_schedulers"] = copy.deepcopy(snap.state["lr_schedulers"])
        state["precision"] = copy.deepcopy(snap.state["precision"])
        return state, f"the in-memory snapshot of step {snap.step}", snap.step, snap.lr_scale, snap.rng, False

    @staticmethod
    def _restore(trainer: Any, state: Mapping[str, Any]) -> None:
        strategy = trainer.strategy
        strategy.load_model_state_dict({"state_dict": state["state_dict"]}, strict=True)
        if state.get("optimizer_states"):
            strategy.load_optimizer_state_dict({"optimizer_states": state["optimizer_states"]})
        for config, sched_state in zip(trainer.lr_scheduler_configs, state.get("lr_schedulers") or []):
            config.scheduler.load_state_dict(sched_state)
        if state.get("precision"):
            trainer.precision_plugin.load_state_dict(state["precision"])

    def _record(self, trainer: Any, alert: Alert, writer: Any) -> None:
        # Recovery events are never rate-limited: each one is written.
        alert_log(trainer).publish(alert, writer)

    # ---------------------------------------------------------------------------- snapshots
    def maybe_snapshot(self, trainer: Any, pl_module: Any, step: int, healthy: bool) -> bool:
        """Take a snapshot after ``step`` optimizer steps if the state is healthy and nothing is pending."""
        if self.ring.size == 0 or not healthy or self._pending is not None:
            return False
        self.ring.capture(trainer, pl_module, step, self.lr_scale)
        return True

    def check_supported(self, trainer: Any) -> None:
        if self.ring.size and is_sharded_strategy(trainer):
            raise ValueError(
                "MetricMonitor: in-memory snapshots for rollback are not supported under sharded strategies "
                f"({type(trainer.strategy).__name__}); add a MetricCheckpoint to trainer.callbacks and set "
                "MetricMonitor(snapshots=0).")

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        return {"rollbacks": int(self.rollbacks), "skipped_steps": int(self.skipped_steps),
                "lr_scale": float(self.lr_scale),
                "history": [{"step": r.step, "restored_step": r.restored_step, "source": r.source, "rule": r.rule,
                             "lr_scale": r.lr_scale, "count": r.count} for r in self.history[-100:]]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rollbacks = int(state.get("rollbacks", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.history = [RollbackRecord(int(r["step"]), int(r["restored_step"]), str(r["source"]), str(r["rule"]),
                                       float(r["lr_scale"]), int(r["count"])) for r in state.get("history", [])]


_RECOVERIES: "weakref.WeakKeyDictionary[Any, Recovery]" = weakref.WeakKeyDictionary()


def install_recovery(trainer: Any, recovery: Recovery) -> Recovery:
    """Make ``recovery`` the one ``trainer``'s actions use; returns the one in use (the first installed wins)."""
    current = _RECOVERIES.get(trainer)
    if current is None:
        _RECOVERIES[trainer] = current = recovery
        recovery.attach(trainer)
    return current


def uninstall_recovery(trainer: Any, recovery: Recovery) -> None:
    if _RECOVERIES.get(trainer) is recovery:
        del _RECOVERIES[trainer]
        recovery.detach(trainer)


def recovery_for(trainer: Any) -> Recovery:
    """The :class:`Recovery` of ``trainer`` (a default one, without snapshots, if no ``MetricMonitor`` set one)."""
    current = _RECOVERIES.get(trainer)
    if current is None:
        current = install_recovery(trainer, Recovery())
    return current


def skip_step(ctx: ActionContext) -> None:
    """The ``skip_step`` action: drop the optimizer update of this step (see the module docstring)."""
    recovery_for(ctx.trainer).skip(ctx)


def request_rollback(ctx: ActionContext) -> None:
    """The ``rollback`` action: return to the last healthy state at the next safe point (see the module docstring)."""
    recovery_for(ctx.trainer).request_rollback(ctx)
