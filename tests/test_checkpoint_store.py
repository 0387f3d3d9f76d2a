"""The parts of MetricCheckpoint on their own, without a Trainer: selection, store, names, the checkpoint action."""
from __future__ import annotations

import errno
import json
import os
import random
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch

from lightwatch.core.action_context import ActionContext
from lightwatch.core.actions import BUILTIN_ACTIONS, registered_actions
from lightwatch.core.alerts import Alert
from lightwatch.core.atomic import temp_path_for
from lightwatch.core.checkpoint import CheckpointTarget, CheckpointWarning, checkpoint_targets, request_checkpoint
from lightwatch.core.checkpoint.naming import FileNamer, json_safe, template_fields
from lightwatch.core.checkpoint.schedule import CheckpointSchedule
from lightwatch.core.checkpoint.selection import CheckpointSelection
from lightwatch.core.checkpoint.store import MANIFEST_NAME, CheckpointStore, load_manifest, local_dirpath
from lightwatch.core.rng import capture_rng_state, collect_rng_state, restore_rng, restore_rng_state

NAMER = FileNamer("{step}")


def save(sel: CheckpointSelection, store: Optional[CheckpointStore], items: List[Tuple[str, Dict[str, Any]]],
         step: int, values: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """One save as the callback makes it: plan, write, commit, apply, finish (the store is optional)."""
    taken = set() if store is None else store.taken | set(store.garbage)
    plan = sel.plan(items, values or {}, step=step, epoch=0, namer=NAMER, taken=taken)
    if store is not None:
        tmp = store.temp_path(plan["new"][0])
        store.write_file({"global_step": step}, tmp)
        store.commit(plan, tmp, metrics={"loss": float(step)})
    sel.apply(plan)
    if store is not None:
        store.finish(plan, writes=True)
    return plan


def files(sel: CheckpointSelection) -> List[str]:
    return [e["file"] for e in sel.entries]


# ------------------------------------------------------------------------------------------- selection
def test_top_k_keeps_the_best_and_ranks_ties_by_age() -> None:
    sel = CheckpointSelection(monitor="loss", mode="min", save_top_k=2)
    for step, score in ((1, 3.0), (2, 2.0), (3, 2.0), (4, 1.0)):
        items, issue = sel.scheduled({"loss": score})
        assert issue is None
        if items:
            save(sel, None, items, step)
    # 3.0 was evicted by the second 2.0; 1.0 then evicted the newer of the two 2.0s.
    assert files(sel) == ["step=2.ckpt", "step=4.ckpt"]
    assert [e["file"] for e in sel.ranked_top_k()] == ["step=4.ckpt", "step=2.ckpt"]
    assert sel.scheduled({"loss": 5.0})[0] == []


def test_a_missing_or_nonfinite_monitor_is_never_saved_as_top_k() -> None:
    sel = CheckpointSelection(monitor="loss", save_last=True)
    assert sel.scheduled({}) == ([("last", {})], ("missing", None))
    items, issue = sel.scheduled({"loss": float("nan")})
    assert items == [("last", {})] and issue is not None and issue[0] == "nonfinite"


def test_thresholds_fire_once_per_crossing_at_float32_precision() -> None:
    sel = CheckpointSelection(save_top_k=0, thresholds={"acc90": {"metric": "acc", "above": 0.9}})
    logged = float(np.float32(0.9))  # what Lightning logs for 0.9
    fired = [bool(sel.scheduled({"acc": v})[0]) for v in (0.5, logged, 0.95, 0.8, 0.91)]
    assert fired == [False, True, False, False, True]


def test_requests_are_merged_and_alert_saves_cooled_down() -> None:
    sel = CheckpointSelection(save_top_k=0, alert_save_cooldown_steps=5)
    alert = Alert("Probe", "spike", "error", "loss spike", value=float("inf"), step=3)
    sel.request("alert", alert)
    sel.request("alert", alert)
    items = sel.with_requests([], step=3)
    assert items == [("alert", {"alert": {"rule": "spike", "source": "Probe", "severity": "error", "step": 3,
                                          "subject": None, "value": None}})]
    sel.request("alert")
    assert sel.with_requests([], step=6) == []  # within the cooldown
    sel.request("alert")
    assert sel.with_requests([], step=8) == [("alert", {})]
    with pytest.raises(ValueError, match="reason must be one of"):
        sel.request("top_k")
    off = CheckpointSelection(save_on_alert=False)
    off.request("alert")
    assert off.requests == []


def test_the_newest_healthy_checkpoint_is_pinned_until_a_newer_healthy_one() -> None:
    sel = CheckpointSelection(save_top_k=0, save_last=True)
    save(sel, None, [("last", {})], 4)
    sel.count_error()
    plan = save(sel, None, [("last", {})], 8)
    # The unhealthy last.ckpt takes the name; the healthy one keeps its content under a new name, pinned.
    assert plan["relinks"] == [("last.ckpt", "last-healthy.ckpt")] and not plan["healthy"]
    assert [(e["file"], e["step"], bool(e.get("pinned"))) for e in sel.entries] == [
        ("last-healthy.ckpt", 4, True), ("last.ckpt", 8, False)]
    assert sel.newest_healthy(sel.entries)["step"] == 4
    plan = save(sel, None, [("last", {})], 12)  # healthy again: the pinned one is released
    assert [e["file"] for e in plan["deleted"]] == ["last-healthy.ckpt"]
    assert files(sel) == ["last.ckpt"] and sel.newest_healthy(sel.entries)["step"] == 12


def test_weights_only_files_are_never_rollback_points() -> None:
    sel = CheckpointSelection(save_top_k=-1, save_weights_only=True)
    save(sel, None, [("interval", {})], 1)
    assert sel.entries[0]["weights_only"] and sel.newest_healthy(sel.entries) is None


def test_names_never_reuse_a_taken_file() -> None:
    sel = CheckpointSelection(save_top_k=-1)
    plan = sel.plan([("interval", {}), ("alert", {"alert": {"rule": "r/1"}})], {}, step=5, epoch=0, namer=NAMER,
                    taken={"step=5.ckpt", "step=5-v1.ckpt"})
    assert [e["file"] for e in plan["new"]] == ["step=5-v2.ckpt", "alert-r_1-step=5.ckpt"]


def test_selection_state_round_trips() -> None:
    sel = CheckpointSelection(monitor="loss", thresholds={"t": {"metric": "acc", "below": 0.1}})
    save(sel, None, [("top_k", {"score": 1.0})], 3)
    sel.scheduled({"loss": 2.0, "acc": 0.05})
    sel.count_error()
    other = CheckpointSelection(monitor="loss", thresholds={"t": {"metric": "acc", "below": 0.1}})
    other.load_state_dict(json.loads(json.dumps(sel.state_dict())))
    assert (other.seq, other.saves, other.errors_since_save, other.armed) == (1, 1, 1, {"t": False})


@pytest.mark.parametrize("kwargs, match", [({"mode": "up"}, "mode must be"), ({"save_top_k": -2}, "save_top_k"),
                                           ({"thresholds": {"t": {"metric": "a"}}}, "exactly one of"),
                                           ({"keep_alert_checkpoints": 1.5}, "keep_alert_checkpoints")])
def test_selection_settings_are_checked(kwargs: Dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CheckpointSelection(**kwargs)


# ------------------------------------------------------------------------------------------- names
def test_file_names_are_safe_and_templates_checked() -> None:
    namer = FileNamer("{epoch:02d}-{val/acc:.2f}", auto_insert_metric_name=False)
    assert namer.render(namer.template, {"val/acc": 0.912}, step=1, epoch=3) == "03-0.91"
    with pytest.raises(ValueError, match="path separator"):
        template_fields("runs/{epoch}", "here")
    assert json_safe({"x": np.float32(1.5), "t": torch.tensor([1, 2])}) == {"x": 1.5, "t": [1, 2]}


# ------------------------------------------------------------------------------------------- store
def test_commits_are_recorded_and_evicted_files_deleted(tmp_path: Any) -> None:
    sel = CheckpointSelection(monitor="loss", save_top_k=1)
    store = CheckpointStore(sel, str(tmp_path))
    save(sel, store, [("top_k", {"score": 2.0})], 1)
    save(sel, store, [("top_k", {"score": 1.0})], 2)
    doc = load_manifest(os.path.join(str(tmp_path), MANIFEST_NAME))
    assert doc["best"] == "step=2.ckpt" and [e["file"] for e in doc["checkpoints"]] == ["step=2.ckpt"]
    assert "garbage" not in doc and "pending" not in doc
    assert sorted(os.listdir(str(tmp_path))) == [MANIFEST_NAME, "step=2.ckpt"]
    entry = doc["checkpoints"][0]
    assert entry["bytes"] == os.path.getsize(tmp_path / "step=2.ckpt") and len(entry["sha256"]) == 64
    assert entry["metrics"] == {"loss": 2.0} and store.verify_entry(entry) == ""


def test_resume_drops_altered_files_promotes_pending_ones_and_removes_leftovers(tmp_path: Any) -> None:
    sel = CheckpointSelection(save_top_k=-1)
    store = CheckpointStore(sel, str(tmp_path))
    save(sel, store, [("interval", {})], 1)
    save(sel, store, [("interval", {})], 2)
    with open(tmp_path / "step=1.ckpt", "ab") as fh:
        fh.write(b"tampered")
    # A crash right after a rename: the file is committed on disk but still "pending" in the manifest.
    pending = dict(sel.entries[-1], file="step=3.ckpt", seq=3)
    os.link(tmp_path / "step=2.ckpt", tmp_path / "step=3.ckpt")
    store.write_manifest(pending=[pending])
    open(temp_path_for(str(tmp_path / "step=4.ckpt")), "wb").close()  # a partial write

    fresh = CheckpointSelection(save_top_k=-1)
    again = CheckpointStore(fresh, str(tmp_path))
    again.run = store.run
    payload = again.read_and_verify(resuming=True)
    assert [e["file"] for e in payload["entries"]] == ["step=2.ckpt", "step=3.ckpt"]
    assert len(payload["dropped"]) == 1 and "step=1.ckpt" in payload["dropped"][0] and "size" in payload["dropped"][0]
    assert not [n for n in os.listdir(str(tmp_path)) if ".tmp-" in n]
    again.adopt(payload)
    assert fresh.seq == 3 and "step=1.ckpt" in again.taken


def test_a_new_run_moves_an_earlier_manifest_aside(tmp_path: Any) -> None:
    sel = CheckpointSelection(save_top_k=-1)
    store = CheckpointStore(sel, str(tmp_path))
    save(sel, store, [("interval", {})], 1)
    payload = CheckpointStore(CheckpointSelection(), str(tmp_path)).read_and_verify(resuming=False)
    assert payload["entries"] == [] and "earlier run" in payload["archived"]
    assert os.path.exists(tmp_path / f"manifest-{store.run[:8]}.json") and os.path.exists(tmp_path / "step=1.ckpt")


def test_save_errors_say_what_failed_and_what_is_intact(tmp_path: Any) -> None:
    sel = CheckpointSelection()
    store = CheckpointStore(sel, str(tmp_path))
    plan = sel.plan([("interval", {})], {}, step=7, epoch=1, namer=NAMER, taken=set())
    err = store.save_error(plan, errno.ENOSPC, 1, best="", last="/c/last.ckpt", latest_healthy=None)
    assert err.errno == errno.ENOSPC and "on rank 1" in str(err) and "Free disk space" in str(err)
    assert "last: /c/last.ckpt" in str(err)


def test_store_checks_paths_and_events(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="not on a local filesystem"):
        local_dirpath("s3://bucket/ckpt")
    store = CheckpointStore(CheckpointSelection(), str(tmp_path))
    store.add_event("rollback", 12, {"restored_step": torch.tensor(8)})
    assert store.events[0]["step"] == 12 and store.events[0]["restored_step"] == 8
    with pytest.raises(ValueError, match="kind must be a non-empty string"):
        store.add_event("", None, {})


# ------------------------------------------------------------------------------------------- action
class _Saver:
    def __init__(self) -> None:
        self.calls: List[Tuple[str, Any]] = []

    def request_save(self, reason: str = "alert", alert: Optional[Alert] = None) -> None:
        self.calls.append((reason, alert))

    def latest_healthy(self) -> Optional[str]:
        return None


class _Trainer:
    is_global_zero = True

    def __init__(self, callbacks: List[Any]) -> None:
        self.callbacks = callbacks


def test_the_checkpoint_action_asks_every_checkpoint_callback() -> None:
    saver, alert = _Saver(), Alert("Probe", "spike", "warning", "spike")
    trainer = _Trainer([object(), saver])
    assert checkpoint_targets(trainer) == [saver] and isinstance(saver, CheckpointTarget)
    request_checkpoint(ActionContext(trainer, None, alert))
    assert saver.calls == [("alert", alert)]

    bare = _Trainer([])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            request_checkpoint(ActionContext(bare, None, alert))
    assert [w.category for w in caught] == [CheckpointWarning]


def test_built_in_actions_are_one_table() -> None:
    names = [spec.name for spec in BUILTIN_ACTIONS]
    assert names == ["log", "warn", "stop", "raise", "checkpoint", "skip_step", "rollback"]
    assert all(registered_actions()[n].handler is s.handler for n, s in zip(names, BUILTIN_ACTIONS))


# ------------------------------------------------------------------------------------------- RNG
def test_rng_states_restore_in_both_encodings() -> None:
    for capture, restore in ((collect_rng_state, restore_rng_state), (capture_rng_state, restore_rng)):
        state = capture()
        first = (random.random(), float(np.random.rand()), torch.rand(1).item())
        restore(state)
        assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == first


# ------------------------------------------------------------------------------------------- schedule
def test_the_schedule_checks_every_n_steps_or_epochs_once() -> None:
    steps = CheckpointSchedule(every_n_train_steps=3)
    due = []
    for gs in range(1, 10):
        steps.batch_started(gs - 1)
        if steps.stepped(gs) and steps.step_due(gs):
            steps.mark("step", gs, 0)
            due.append(gs)
    assert due == [3, 6, 9] and not steps.epoch_due(epoch=0, global_step=9)
    steps.batch_started(9)
    assert not steps.stepped(9)  # inside an accumulation window: not a safe point

    epochs = CheckpointSchedule(every_n_epochs=2)
    assert [e for e in range(6) if epochs.epoch_due(e, global_step=10)] == [1, 3, 5]
    epochs.mark("epoch", 10, 1)
    assert not epochs.epoch_due(1, 10)
    resumed = CheckpointSchedule(every_n_epochs=2)
    resumed.load_state_dict(epochs.state_dict())
    assert resumed.last_epoch_checked == 1 and CheckpointSchedule().epochs == 1
    with pytest.raises(ValueError, match="every_n_train_steps must be an integer >= 0"):
        CheckpointSchedule(every_n_train_steps=-1)


# ------------------------------------------------------------------------------------------ report
class _RankOneTrainer:
    """What the report functions read of a Trainer (rank 1: nothing is written to files or loggers)."""

    is_global_zero, global_step, current_epoch, sanity_checking = False, 5, 0, False
    loggers: List[Any] = []

    def __init__(self) -> None:
        self.callback_metrics: Dict[str, Any] = {}

        class State:
            fn = "fit"
        self.state = State()


def test_checkpoint_warnings_are_rate_limited_per_rule_and_count_what_they_held_back() -> None:
    from lightwatch.core.alerts import AlertCooldown
    from lightwatch.core.checkpoint.report import SOURCE, publish_warning
    from lightwatch.core.writer import MonitorWriter

    trainer, writer, cooldown = _RankOneTrainer(), MonitorWriter("monitor"), AlertCooldown(100)
    first = publish_warning(trainer, writer, cooldown, "ckpt", "val/loss", "checkpoint_dropped", "dropped a.ckpt",
                            value=2)
    assert first is not None and (first.source, first.subject, first.value, first.action) == (
        SOURCE, "val/loss", 2.0, "log")
    assert publish_warning(trainer, writer, cooldown, "ckpt", "val/loss", "checkpoint_dropped", "b") is None
    assert publish_warning(trainer, writer, cooldown, "ckpt", None, "checkpoint_export_failed", "c") is not None
    trainer.global_step = 105
    later = publish_warning(trainer, writer, cooldown, "ckpt", "val/loss", "checkpoint_dropped", "dropped c.ckpt")
    assert later is not None and later.message == "dropped c.ckpt (1 similar alert(s) suppressed.)"
    trainer.is_global_zero = True  # the Python warning is rank 0's, and is given even when the record is held back
    with pytest.warns(CheckpointWarning, match="dropped d.ckpt"):
        publish_warning(trainer, writer, cooldown, "ckpt", None, "checkpoint_dropped", "dropped d.ckpt",
                        python_warning=True)


def test_a_save_reports_its_counters_and_an_exception_is_saved_only_where_it_is_safe() -> None:
    from lightwatch.core.checkpoint.report import exception_item, exception_save, write_save
    from lightwatch.core.writer import MonitorWriter

    trainer = _RankOneTrainer()
    sel = CheckpointSelection(monitor="loss", save_top_k=1)
    save(sel, None, [("top_k", {"score": 0.25})], step=4)
    assert write_save(trainer, MonitorWriter("monitor"), "ckpt", sel, sel.entries) == {
        "monitor.ckpt/ckpt/saves": 1.0, "monitor.ckpt/ckpt/best": 0.25}
    assert set(trainer.callback_metrics) == {"monitor.ckpt/ckpt/saves", "monitor.ckpt/ckpt/best"}
    assert exception_save(trainer, RuntimeError("boom")) == (True, "")
    assert exception_item(RuntimeError("x" * 600)) == ("exception", {"error": "RuntimeError: " + "x" * 486})
    trainer.sanity_checking = True
    assert exception_save(trainer, RuntimeError("boom")) == (False, "")
    trainer.sanity_checking, trainer.global_step = False, 0
    assert exception_save(trainer, RuntimeError("boom")) == (False, "")
