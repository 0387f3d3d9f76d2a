"""Budget checks: on steps that are not sampled lightwatch adds no host sync, no write, and no tensor op
beyond the documented per-step global gradient norm. Counted, not timed."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any, Dict, List

import pytest
import pytorch_lightning as pl
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.tensorboard.writer import FileWriter

from conftest import Classifier, make_loader, make_trainer
from lightwatch import ActivationStatsMonitor, GradientStatsMonitor

SYNC_OPS = {"_local_scalar_dense", "item"}
ADD_EVENT = FileWriter.add_event


class OpsPerStep(TorchDispatchMode):
    """Counts every aten op, and every event-file write, by training step."""

    def __init__(self) -> None:
        super().__init__()
        self.step = -1
        self.ops: Dict[int, Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[self.step][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class StepMarker(pl.Callback):
    def __init__(self, counter: OpsPerStep) -> None:
        self.counter = counter

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self.counter.step = trainer.fit_loop.epoch_loop._batches_that_stepped


def run(tmp_path: Any, monitors: List[Any], monkeypatch: Any) -> OpsPerStep:
    pl.seed_everything(0)
    counter = OpsPerStep()
    writes: Dict[int, int] = defaultdict(int)

    def counting_add_event(self: Any, event: Any, *a: Any, **k: Any) -> Any:
        writes[counter.step] += 1
        return ADD_EVENT(self, event, *a, **k)

    monkeypatch.setattr(FileWriter, "add_event", counting_add_event)
    trainer = make_trainer(tmp_path, [StepMarker(counter)] + monitors, max_steps=20, log_every_n_steps=10)
    model, loader = Classifier(depth=2), make_loader(n=320)
    with counter:
        trainer.fit(model, loader)
    counter.writes = writes  # type: ignore[attr-defined]
    return counter


@pytest.mark.parametrize("norm_every_step", [False, True])
def test_unsampled_steps_cost_nothing_but_the_documented_norm(tmp_path: Any, monkeypatch: Any,
                                                             norm_every_step: bool) -> None:
    bare = run(tmp_path / "bare", [], monkeypatch)
    watched = run(tmp_path / "watched", [GradientStatsMonitor(every_n_steps=5, norm_every_step=norm_every_step),
                                         ActivationStatsMonitor(every_n_steps=5)], monkeypatch)
    sampled = {4, 9, 14, 19}
    for step in range(1, 20):
        extra = watched.ops[step] - bare.ops[step]
        missing = bare.ops[step] - watched.ops[step]
        assert not missing, f"step {step}: ops disappeared {missing}"
        assert not (set(extra) & SYNC_OPS) or step in sampled, f"host sync on unsampled step {step}: {extra}"
        if step in sampled:
            assert extra, f"step {step} is sampled but computed nothing"
            # the one device-to-host read per monitor and sampled step is a tolist(), never an item() per value
            assert extra["_local_scalar_dense"] == 0, extra
            continue
        if norm_every_step:
            # the per-step global norm: one fused foreach norm, a stack, a square, a sum, a store
            assert set(extra) <= {"_foreach_norm", "stack", "pow", "sum", "copy_", "select", "zeros", "fill_",
                                  "index_put_", "square"}, f"step {step}: {extra}"
            assert extra["_foreach_norm"] == 1
        else:
            assert not extra, f"step {step}: unexpected ops {extra}"
        assert watched.writes[step] == bare.writes[step], f"step {step}: extra event-file writes"
    assert sum(watched.writes[s] - bare.writes[s] for s in sampled) > 0


def default_policy_monitors(interval: int) -> List[Any]:
    from hydra import compose, initialize_config_module

    from lightwatch.hydra import instantiate_monitors

    with initialize_config_module(config_module="lightwatch.conf", version_base="1.3"):
        cfg = compose(config_name="monitor/default", overrides=[f"monitor.every_n_steps={interval}"])
    return instantiate_monitors(cfg.monitor)


def test_full_default_policy_unsampled_steps_no_sync_and_bounded_ops(tmp_path: Any, monkeypatch: Any) -> None:
    """All five callbacks of ``monitor=default``: an unsampled step copies the batch's fields and the loss, and
    does nothing else (no reduction, no host sync, no write)."""
    bare = run(tmp_path / "bare", [], monkeypatch)
    watched = run(tmp_path / "watched", default_policy_monitors(5), monkeypatch)
    sampled = {4, 9, 14, 19}
    fields = 2  # the batch's x and y
    for step in range(1, 20):
        extra = watched.ops[step] - bare.ops[step]
        assert not bare.ops[step] - watched.ops[step], f"step {step}: ops disappeared"
        if step in sampled:
            continue
        assert not set(extra) & SYNC_OPS, f"host sync on unsampled step {step}: {extra}"
        # the data monitor's copy of each field into its staging buffer, MetricMonitor's copy of the loss: no
        # reduction, no compute
        assert set(extra) <= {"detach", "clone", "copy_", "view", "slice", "alias"}, f"step {step}: {extra}"
        assert extra["clone"] + extra["copy_"] <= fields + 1 and sum(extra.values()) <= 4 * fields + 4, \
            f"step {step}: {extra}"
        assert watched.writes[step] == bare.writes[step], f"step {step}: extra event-file writes"


@pytest.mark.ddp
def test_full_default_policy_makes_no_collective_on_unsampled_steps(tmp_path: Any) -> None:
    """Two CPU processes (gloo), the five callbacks of ``monitor=default``: every ``torch.distributed``
    collective lightwatch makes is counted by step."""
    from test_ddp_stats import torchrun

    torchrun("budget_ddp.py", str(tmp_path))
    sampled = {0, 4, 9, 14, 19}
    for rank in (0, 1):
        record = json.load(open(tmp_path / f"rank{rank}.json"))
        assert record["global_step"] == 20
        per_step = {int(k): v for k, v in record["collectives"].items()}
        unsampled = {s: v for s, v in per_step.items() if s >= 0 and s not in sampled}
        assert not unsampled, f"rank {rank}: collectives on unsampled steps {unsampled}"
        assert any(per_step.get(s) for s in sampled), per_step  # the counting is live
    # the healthy twin of the straggler fault (tests/test_hang_watchdog.py): two equal ranks, nothing to act on
    from conftest import read_alerts

    loud = [a for a in read_alerts(str(tmp_path)) if a["severity"] != "info"]
    assert not loud, loud
