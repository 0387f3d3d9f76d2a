"""What checkpointing reads from a running Trainer and does through it, the same on every rank.

Everything here goes through what ``pytorch_lightning`` and ``lightning.pytorch`` share (duck-typed), so the
checkpoint callback bound to either package uses it unchanged.
"""
from __future__ import annotations

import errno as _errno
import os
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.nn.parameter import is_lazy

from lightwatch.core.checkpoint.integrity import check_recorded
from lightwatch.core.checkpoint.naming import FileNamer, metric_values, utc_now
from lightwatch.core.checkpoint.selection import CheckpointSelection, Item
from lightwatch.core.checkpoint.store import CheckpointStore
from lightwatch.core.lightning import package_of
from lightwatch.core.reduce import agree_max, all_reduce_flat
from lightwatch.core.runtime import distributed_ready, is_global_zero, is_sharded_strategy, local_tensor

__all__ = [
    "agree_before_save",
    "check_fit_setup",
    "direct_write",
    "error_code",
    "export_best",
    "fitting",
    "guard_checkpoint_loads",
    "monitor_problem",
    "param_bytes",
    "params_finite",
    "read_rank0_values",
    "reconcile",
    "resolve_dirpath",
    "save_round",
    "saves_on_train_epoch_end",
    "write_and_commit",
]


def fitting(trainer: Any) -> bool:
    """Whether ``trainer`` runs ``fit`` (not validate, test or predict)."""
    return str(getattr(trainer.state.fn, "value", trainer.state.fn)) == "fit"


def resolve_dirpath(trainer: Any) -> str:
    """The default checkpoint directory: ``<logger dir>/checkpoints``, as Lightning's ``ModelCheckpoint``."""
    loggers = list(getattr(trainer, "loggers", None) or [])
    if loggers:
        save_dir = loggers[0].save_dir or trainer.default_root_dir
        version = loggers[0].version
        version = version if isinstance(version, str) else f"version_{version}"
        path = os.path.join(str(save_dir), str(loggers[0].name), version, "checkpoints")
    else:
        path = os.path.join(str(trainer.default_root_dir), "checkpoints")
    return os.path.realpath(path)


def saves_on_train_epoch_end(trainer: Any, setting: Optional[bool]) -> bool:
    """Whether epoch checks run at the end of the training epoch (else after validation).

    The same rule as ``ModelCheckpoint``: after validation when it runs every epoch, else at epoch end;
    ``setting`` (the callback's ``save_on_train_epoch_end``) decides when given.
    """
    if setting is not None:
        return bool(setting)
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        return False
    if trainer.check_val_every_n_epoch != 1:
        return False
    num_val = trainer.num_val_batches
    num_val = sum(num_val) if isinstance(num_val, list) else num_val
    if num_val == 0:
        return True
    return trainer.val_check_interval == 1.0


def check_fit_setup(trainer: Any, pl_module: Any, dirpath: str, other_dirpaths: Sequence[Optional[str]],
                    export: Optional[str]) -> None:
    """A ``ValueError`` for a setup a checkpoint callback writing to ``dirpath`` cannot save safely in (at
    ``setup("fit")``); ``other_dirpaths`` are those of the Trainer's other ``MetricCheckpoint`` callbacks."""
    for other in other_dirpaths:
        if other and os.path.realpath(other) == os.path.realpath(dirpath):
            raise ValueError(f"MetricCheckpoint: two MetricCheckpoint callbacks write to {dirpath!r}; each needs "
                             "its own dirpath (they keep separate manifests).")
    io_name = type(getattr(trainer.strategy, "checkpoint_io", None)).__name__
    if io_name == "AsyncCheckpointIO":
        raise ValueError("MetricCheckpoint writes synchronously so that it can fsync, hash and commit each file "
                         "before it is recorded; remove AsyncCheckpointIO from the Trainer's plugins.")
    if export == "onnx" and getattr(pl_module, "example_input_array", None) is None:
        raise ValueError("MetricCheckpoint(export='onnx') needs pl_module.example_input_array (an example input "
                         "for tracing); set it in the LightningModule's __init__.")


def read_rank0_values(trainer: Any, keys: Sequence[str]) -> Dict[str, float]:
    """Rank 0's values of the metrics ``keys`` (from ``trainer.callback_metrics``), on every rank: one SUM
    collective under DDP. Keys without a scalar value are left out.

    Deciding on rank 0's values makes every rank take the same decision even when a metric was logged
    without ``sync_dist`` (the classic ``ModelCheckpoint`` hang).
    """
    metrics, device = trainer.callback_metrics, trainer.strategy.root_device
    present, vals = [], []
    for key in keys:
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
    n = len(keys)
    return {k: flat[n + i] for i, k in enumerate(keys) if flat[i] > 0.5}


def param_bytes(trainer: Any, pl_module: Any) -> int:
    """The model's size in bytes, the free-space estimate before the first save (the whole model under a sharded
    strategy, where every rank holds a shard); parameters not materialised yet do not count.

    Example:
        >>> class Trainer:
        ...     world_size = 1
        >>> param_bytes(Trainer(), torch.nn.Linear(2, 1))
        12
    """
    # lazy parameters (LazyLinear before its first forward) have no size yet: the first save measures it
    size = sum(p.numel() * p.element_size() for p in pl_module.parameters() if not is_lazy(p))
    return size * max(1, int(trainer.world_size)) if is_sharded_strategy(trainer) else size


def params_finite(pl_module: Any) -> bool:
    """Whether every parameter (this rank's shard of it) is finite.

    Example:
        >>> params_finite(torch.nn.Linear(2, 1))
        True
    """
    params = [local_tensor(p.detach()) for p in pl_module.parameters() if p.numel()]
    if not params:
        return True
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all().item())


def agree_before_save(trainer: Any, store: CheckpointStore, pl_module: Any) -> Tuple[bool, bool]:
    """Whether there is room for the save and the parameters are finite, agreed by every rank under a sharded
    strategy (every rank holds a shard, and writes it); this rank's own answer for the parameters otherwise."""
    nonfinite = 0.0 if params_finite(pl_module) else 1.0
    space_ok = True
    if is_sharded_strategy(trainer) and distributed_ready():
        flags = torch.tensor([store.space_problem(), nonfinite], dtype=torch.float64,
                             device=trainer.strategy.root_device)
        agree_max(flags)
        space_ok, nonfinite = flags[0].item() == 0, flags[1].item()
    return space_ok, not nonfinite


def direct_write(trainer: Any) -> bool:
    """Whether rank 0 may stream ``torch.save`` straight into the temporary file.

    True for Lightning's default ``TorchCheckpointIO`` with a strategy that does not override saving: it
    avoids that plugin's staging of the whole file in RAM and in the system temp directory. Other
    plugins and strategies (sharded ones) write through ``strategy.save_checkpoint`` to the temporary path.
    """
    strategy = trainer.strategy
    io = getattr(strategy, "checkpoint_io", None)
    return (type(strategy).save_checkpoint is package_of(trainer).strategies.Strategy.save_checkpoint
            and io is not None and type(io).__name__ == "TorchCheckpointIO"
            and type(io).__module__.startswith(("lightning_fabric", "lightning.fabric")))


def error_code(exc: BaseException) -> int:
    """The ``errno`` behind ``exc``: its own, or that of an ``OSError`` it was raised from (torch.save wraps
    the writer's errors), or ``ENOSPC`` when its text says so; -1 when there is none.

    Example:
        >>> try:
        ...     try:
        ...         raise OSError(_errno.ENOSPC, "No space left on device")
        ...     except OSError as inner:
        ...         raise RuntimeError("file write failed") from inner
        ... except RuntimeError as outer:
        ...     error_code(outer) == _errno.ENOSPC
        True
    """
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return int(current.errno)
        current = current.__cause__ or current.__context__
    return _errno.ENOSPC if "No space left on device" in str(exc) else -1


def write_and_commit(trainer: Any, store: CheckpointStore, plan: Mapping[str, Any], weights_only: bool,
                     space_ok: bool = True, own_prefix: Optional[str] = None,
                     error_context: Optional[Mapping[str, Any]] = None) -> None:
    """Dump the Trainer's state, write it (every rank its part, rank 0 the file) and commit ``plan``.

    Every rank then agrees on the outcome: a failure on any rank raises the same
    :class:`~lightwatch.core.checkpoint.errors.CheckpointSaveError` on every rank (no rank is left waiting),
    with nothing committed.

    Args:
        trainer: the running Trainer.
        store: the checkpoint directory.
        plan: from :meth:`~lightwatch.core.checkpoint.selection.CheckpointSelection.plan`.
        weights_only: dump only the weights.
        space_ok: every rank has room for its shard (decided together before).
        own_prefix: metric keys left out of the recorded metrics (the callback's own counters).
        error_context: ``best``, ``last`` and ``latest_healthy`` paths for the error message.
    """
    rank0, sharded, direct = is_global_zero(trainer), is_sharded_strategy(trainer), direct_write(trainer)
    tmp = store.temp_path(plan["new"][0])
    failure: Optional[BaseException] = None
    code = 0
    temps: List[str] = [tmp]
    try:
        if not space_ok:
            raise OSError(_errno.ENOSPC, "not enough free space on a rank for its shard")
        with trainer.profiler.profile("save_checkpoint"):
            # trainer.save_checkpoint() would also write, then wait at a barrier that a rank whose write
            # failed never reaches (the hang this avoids), so the dump and the write are done separately and
            # every rank meets at the agreement below instead.
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only)
            if direct:
                if rank0:
                    store.check_space()
                    store.write_file(checkpoint, tmp)
            else:
                if rank0 and not sharded:
                    store.check_space()
                trainer.strategy.save_checkpoint(checkpoint, tmp)
            del checkpoint
        if rank0:
            temps += store.commit(plan, tmp, metric_values(trainer.callback_metrics, skip_prefix=own_prefix))
    except Exception as exc:
        failure = exc
        code = error_code(exc)
        if code < 0 and (rank0 or sharded) and store.space_problem():
            # torch.save reports a full disk as RuntimeError("... file write failed"): name the cause
            code = _errno.ENOSPC
        if rank0:
            store.discard(temps)
    flags = torch.tensor([1.0 if failure else 0.0, float(code), float(trainer.global_rank if failure else -1)],
                         dtype=torch.float64, device=trainer.strategy.root_device)
    agree_max(flags)
    failed, code, failed_rank = int(flags[0].item()), int(flags[1].item()), int(flags[2].item())
    if failed:
        context = dict(error_context or {})
        error = store.save_error(plan, code, failed_rank, context.get("best", ""), context.get("last", ""),
                                 context.get("latest_healthy"))
        if failure is not None:
            raise error from failure
        raise error


def save_round(trainer: Any, pl_module: Any, selection: CheckpointSelection, store: CheckpointStore,
               items: Sequence[Item], values: Mapping[str, float], namer: FileNamer, weights_only: bool,
               own_prefix: Optional[str] = None, error_context: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Save one checkpoint for ``items`` (several reasons share one file's content): plan it (pure bookkeeping,
    identical on every rank), write and commit it (:func:`write_and_commit`), then take it into the records on
    every rank. Returns the plan."""
    space_ok, finite = agree_before_save(trainer, store, pl_module)
    plan = selection.plan(items, values, int(trainer.global_step), int(trainer.current_epoch), namer,
                          store.taken | set(store.garbage), params_finite=finite, now=utc_now())
    write_and_commit(trainer, store, plan, weights_only, space_ok, own_prefix=own_prefix, error_context=error_context)
    selection.apply(plan)
    store.finish(plan, writes=is_global_zero(trainer))
    return plan


def monitor_problem(trainer: Any, monitor: Optional[str], issue: str, value: Optional[float]) -> Tuple[str, str]:
    """The rule and message of a warning about the monitored metric (``issue`` from
    :meth:`CheckpointSelection.scheduled`: ``"missing"`` or ``"nonfinite"``)."""
    if issue == "missing":
        return "checkpoint_monitor_missing", (
            f"MetricCheckpoint: monitored metric {monitor!r} is not among the logged metrics "
            f"({', '.join(sorted(map(str, trainer.callback_metrics))) or 'none'}); no top-k checkpoint "
            f"at step {trainer.global_step}. Did you self.log({monitor!r}, ...)?")
    return "checkpoint_monitor_nonfinite", (
        f"MetricCheckpoint: monitored metric {monitor!r} is {value} at step {trainer.global_step}; a non-finite "
        "value is never saved as top-k or best.")


def export_best(trainer: Any, pl_module: Any, store: CheckpointStore, fmt: str, best: Mapping[str, Any]) -> str:
    """Export ``pl_module`` as ONNX (``pl_module.example_input_array`` is the example input) or TorchScript (traced
    with it when there is one, else scripted) to ``best.onnx`` / ``best.pt`` on rank 0, and record it in the
    manifest with the ``best`` entry it matches. Returns what went wrong (an export problem must not end training;
    the checkpoint itself is safe), or ``""``. Sharded models are not exported."""
    if not is_global_zero(trainer) or is_sharded_strategy(trainer):
        return ""
    try:
        if fmt == "onnx":
            final = store.write_export(fmt, lambda p: pl_module.to_onnx(p, pl_module.example_input_array))
        else:
            example = getattr(pl_module, "example_input_array", None)
            method = "trace" if example is not None else "script"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted = pl_module.to_torchscript(method=method, example_inputs=example)
                final = store.write_export(fmt, lambda p: torch.jit.save(scripted, p))
    except Exception as exc:
        return f"MetricCheckpoint: exporting the best model as {fmt} failed: {exc}"
    store.record_export(fmt, final, best)
    return ""


def guard_checkpoint_loads(trainer: Any, store: CheckpointStore) -> Callable[[], None]:
    """Check every file the Trainer is about to load (``ckpt_path`` of fit, validate, test, "best" and "last"
    included) against ``store``'s manifest *before* a byte of it is unpickled: a file the manifest records must
    still match its size and SHA-256, else :class:`CheckpointIntegrityError`. Returns the undo function.

    The check wraps the strategy's ``checkpoint_io.load_checkpoint`` of this Trainer only (an instance
    attribute, removed by the undo function); strategies that load without it are checked after the load in
    ``on_load_checkpoint``.
    """
    io = getattr(getattr(trainer, "strategy", None), "checkpoint_io", None)
    original = getattr(io, "load_checkpoint", None)
    if io is None or not callable(original):
        return lambda: None

    def load_checkpoint(path: Any, *args: Any, **kwargs: Any) -> Any:
        check_recorded(store, str(path))
        return original(path, *args, **kwargs)

    had_own = "load_checkpoint" in getattr(io, "__dict__", {})
    try:
        io.load_checkpoint = load_checkpoint
    except AttributeError:  # a checkpoint_io that forbids it: on_load_checkpoint still checks after the load
        return lambda: None

    def undo() -> None:
        if io.__dict__.get("load_checkpoint") is load_checkpoint:
            if had_own:
                io.load_checkpoint = original
            else:
                del io.load_checkpoint

    return undo


def reconcile(trainer: Any, store: CheckpointStore, resuming: bool) -> Dict[str, Any]:
    """Rank 0 reads and checks the manifest, every rank adopts the result (one broadcast, at train start).

    Returns the payload (``dropped`` and ``archived`` hold the warnings to give).
    """
    payload: Optional[Dict[str, Any]] = None
    if is_global_zero(trainer):
        try:
            payload = store.read_and_verify(resuming)
        except Exception as exc:  # told to every rank, so none waits for a broadcast that never comes
            payload = {"error": f"{type(exc).__name__}: {exc}"}
    payload = trainer.strategy.broadcast(payload, src=0)
    assert payload is not None
    if "error" in payload:
        raise RuntimeError(f"MetricCheckpoint could not read or prepare {store.dirpath} on rank 0: "
                           f"{payload['error']}. Check that dirpath is a writable local directory.")
    store.adopt(payload)
    return payload
