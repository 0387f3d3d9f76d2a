"""SliceMonitor: per-slice values that agree with a direct computation (one process and two-process DDP), the
tags and callback metrics it writes, the hidden minority regression caught with its healthy twin silent, and the
actions its rules take."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from typing import Any, Dict, List

import pytest
import pytorch_lightning as pl
import torch
from sklearn.metrics import f1_score, precision_score, recall_score
from torch.utils.data import DataLoader, TensorDataset

from conftest import Classifier, make_trainer, read_alerts, read_events, scalars
from lightwatch.callbacks import MetricCheckpoint, SliceMonitor
from lightwatch.metrics.slices import SliceMetrics, wilson_interval

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.slice_faults import run_once  # noqa: E402

ALERT_KEYS = {"time", "step", "epoch", "source", "rule", "severity", "subject", "value", "threshold", "action",
              "message"}


def direct(preds: List[int], target: List[int], task: str) -> Dict[str, float]:
    """Accuracy, precision, recall and F1 computed directly (scikit-learn) on the same predictions."""
    avg = "binary" if task == "binary" else "macro"
    labels = None if task == "binary" else sorted(set(preds) | set(target))
    kw: Dict[str, Any] = dict(average=avg, zero_division=0, labels=labels)
    return {"acc": sum(p == t for p, t in zip(preds, target)) / len(target),
            "precision": precision_score(target, preds, **kw), "recall": recall_score(target, preds, **kw),
            "f1": f1_score(target, preds, **kw)}


# ------------------------------------------------------------------------------------------ the metric
@pytest.mark.parametrize("task,classes", [("multiclass", 4), ("binary", 2)])
def test_values_agree_with_a_direct_computation_and_merge_exactly(task, classes):
    g = torch.Generator().manual_seed(3)
    n = 301
    scores = torch.randn(n, classes, generator=g)
    target = torch.randint(0, classes, (n,), generator=g)
    groups = torch.randint(0, 5, (n,), generator=g)  # slice 4 stays outside num_slices=4: the "other" row
    metrics = ["acc", "precision", "recall", "f1"]
    whole = SliceMetrics(4, metrics, task=task, num_classes=classes, bootstrap=30)
    halves = [SliceMetrics(4, metrics, task=task, num_classes=classes, bootstrap=30, seed=s) for s in (0, 1)]
    for start in range(0, n, 64):  # odd batch sizes at the end
        part = slice(start, start + 64)
        whole.update(scores[part], target[part], groups[part])
    halves[0].update(scores[:150], target[:150], groups[:150])
    halves[1].update(scores[150:], target[150:], groups[150:])
    out = whole.compute()
    preds = scores.argmax(1)
    for s in range(4):
        mask = groups == s
        expected = direct(preds[mask].tolist(), target[mask].tolist(), task)
        assert out.counts[s] == int(mask.sum())
        for m in metrics:
            assert out.values[m][s].item() == pytest.approx(expected[m], abs=1e-6), (m, s)
        assert out.ci_low["acc"][s] <= out.values["acc"][s] <= out.ci_high["acc"][s]
    overall = direct(preds.tolist(), target.tolist(), task)
    for m in metrics:
        assert out.overall[m] == pytest.approx(overall[m], abs=1e-6)
    assert out.other == int((groups == 4).sum())
    lo, hi = wilson_interval(torch.tensor([float((preds[groups == 0] == target[groups == 0]).sum())]),
                             torch.tensor([float((groups == 0).sum())]))
    assert (out.ci_low["acc"][0], out.ci_high["acc"][0]) == (lo[0], hi[0])
    # two "ranks": their point-estimate sums add up to the whole, exactly
    assert torch.equal(halves[0].table[0] + halves[1].table[0], whole.table[0])


def test_regression_and_outcome_metrics_are_means_with_bootstrap_intervals():
    g = torch.Generator().manual_seed(0)
    preds, target = torch.randn(200, generator=g), torch.randn(200, generator=g)
    groups = torch.arange(200) % 2
    m = SliceMetrics(2, ["mse", "mae", "outcome"], task="regression", bootstrap=100)
    outcome = (preds - target).abs() * 2  # float32, as a per-sample loss would be
    m.update(preds, target, groups, outcome=outcome)
    out = m.compute()
    err = preds.double() - target.double()
    for s in range(2):
        e = err[groups == s]
        assert out.values["mse"][s].item() == pytest.approx((e * e).mean().item(), abs=1e-9)
        assert out.values["mae"][s].item() == pytest.approx(e.abs().mean().item(), abs=1e-9)
        assert out.values["outcome"][s].item() == pytest.approx(outcome[groups == s].double().mean().item(), abs=1e-9)
        assert out.ci_low["mse"][s] < out.values["mse"][s] < out.ci_high["mse"][s]
    assert not out.higher_is_better["mse"]


# --------------------------------------------------------------------------------------- a real fit
class GroupModel(Classifier):
    """``(x, y, group)`` batches; validation_step returns the logits."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch[:2], batch_idx)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0])


def group_loader(n: int, seed: int, small_group: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x[:, :3].argmax(1)
    group = torch.randint(0, 2, (n,), generator=g)
    group[:small_group] = 2  # a slice with too few samples
    return DataLoader(TensorDataset(x, y, group), batch_size=32)


def test_a_fit_writes_every_tag_and_metric_checkpoint_keeps_the_best_worst_slice(tmp_path, seed):
    monitor = SliceMonitor(slice_by={"field": 2, "names": ["a", "b", "tiny"]}, metrics=["acc", "f1"], num_classes=3,
                           min_count=10, bootstrap=20)
    ckpt = MetricCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="monitor.slice/acc/_worst", mode="max",
                            save_top_k=1)
    worst: List[float] = []

    class Probe(pl.Callback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                worst.append(float(trainer.callback_metrics["monitor.slice/acc/_worst"]))

    trainer = make_trainer(tmp_path, [monitor, ckpt, Probe()], max_steps=30, limit_val_batches=None,
                           val_check_interval=10, enable_checkpointing=True)
    trainer.fit(GroupModel(), group_loader(320, 0), group_loader(150, 1))
    acc = read_events(trainer.logger.log_dir)
    tags = set(acc.Tags()["scalars"])
    for name in ("a", "b"):
        for stat in ("", "/n", "/ci_low", "/ci_high"):
            assert f"monitor.slice/acc/{name}{stat}" in tags and f"monitor.slice/f1/{name}{stat}" in tags
    for agg in ("_overall", "_worst", "_gap", "_spread", "_too_few"):
        assert f"monitor.slice/acc/{agg}" in tags
    # too few samples: reported as a count, never as a value
    assert "monitor.slice/acc/tiny/n" in tags and "monitor.slice/acc/tiny" not in tags
    assert set(scalars(acc, "monitor.slice/acc/tiny/n").values()) == {3.0}
    assert set(scalars(acc, "monitor.slice/acc/_too_few").values()) == {1.0}
    # the values line up with self.log's step axis and agree with the last result
    steps = sorted(scalars(acc, "monitor.slice/acc/_worst"))
    assert steps == [9, 19, 29] and len(worst) == 3
    r = monitor.last_result
    assert scalars(acc, "monitor.slice/acc/a")[29] == pytest.approx(r.values["acc"][0].item(), abs=1e-6)
    assert scalars(acc, "monitor.slice/acc/_gap")[29] == pytest.approx(
        r.overall["acc"] - min(r.values["acc"][:2]).item(), abs=1e-6)
    assert ckpt.best_model_score.item() == pytest.approx(max(worst), abs=1e-6)
    with open(tmp_path / "ckpt" / "manifest.json") as fh:
        assert json.load(fh)["monitor"] == "monitor.slice/acc/_worst"
    assert read_alerts(str(tmp_path)) == []  # a healthy run: the groups are random


def test_several_validation_sets_are_slices_and_keys_cross(tmp_path, seed):
    by_loader = SliceMonitor(min_count=5)
    crossed = SliceMonitor(slice_by=["dataloader", {"field": 2, "num_values": 2, "name": "g"}], min_count=5,
                           rules={}, prefix="cross")
    trainer = make_trainer(tmp_path, [by_loader, crossed], max_steps=5, limit_val_batches=None)
    trainer.fit(GroupModel(), group_loader(160, 0, 0), [group_loader(64, 1, 0), group_loader(96, 2, 0)])
    assert by_loader.slice_names == ["dataloader_0", "dataloader_1"]
    assert by_loader.last_result.counts.tolist() == [64.0, 96.0]
    assert crossed.slice_names == ["dataloader_0.g_0", "dataloader_0.g_1", "dataloader_1.g_0", "dataloader_1.g_1"]
    assert sum(crossed.last_result.counts.tolist()) == 160.0
    tags = set(read_events(trainer.logger.log_dir).Tags()["scalars"])
    assert {"monitor.slice/acc/dataloader_1", "cross.slice/acc/dataloader_1.g_0/n"} <= tags


# ------------------------------------------------------------------------------- the hidden regression
def test_a_minority_drop_fires_at_warning_naming_the_slice_and_the_healthy_twin_is_silent(tmp_path):
    faulty = run_once(0, 2, str(tmp_path / "drop"), epochs=4, train_size=3000)
    healthy = run_once(0, None, str(tmp_path / "healthy"), epochs=4, train_size=3000)
    assert healthy["alerts"] == []
    alerts = faulty["alerts"]
    assert alerts and all(set(a) == ALERT_KEYS for a in alerts)
    fired = {a["rule"]: a for a in alerts}
    assert set(fired) == {"slice_gap", "slice_regressed"}
    for a in alerts:
        assert (a["subject"], a["severity"], a["source"], a["action"]) == ("minority", "warning", "SliceMonitor",
                                                                           "warn")
        assert a["epoch"] - 2 + 1 <= 2  # within two evaluations of the drop
        assert "minority" in a["message"]
    # the aggregate rose meanwhile: only the slices show the regression
    history = faulty["history"]
    assert history[2]["overall"] > history[1]["overall"] and history[2]["minority"] < history[1]["minority"] - 0.3


def test_rule_actions_checkpoint_and_stop_are_carried_out(tmp_path):
    rules = {"slice_regressed": {"kind": "slice_regressed", "action": "checkpoint"},
             "slice_gap": {"kind": "slice_gap", "action": "stop", "severity": "error"}}
    ckpt = MetricCheckpoint(dirpath=str(tmp_path / "ckpt"), save_on_alert=True)
    run = run_once(0, 2, str(tmp_path), epochs=6, train_size=3000, rules=rules, extra_callbacks=[ckpt],
                   trainer_kwargs={"enable_checkpointing": True})
    by_rule = {a["rule"]: a for a in run["alerts"]}
    assert by_rule["slice_gap"]["action"] == "stop" and by_rule["slice_gap"]["severity"] == "error"
    assert len(run["history"]) == 4  # stopped at the evaluation the gap rule fired (the 4th), not after 6
    with open(tmp_path / "ckpt" / "manifest.json") as fh:
        reasons = [e["reason"] for e in json.load(fh)["checkpoints"]]
    assert "alert" in reasons


def test_rule_state_survives_a_weights_only_checkpoint(tmp_path):
    monitor = run_once(0, None, str(tmp_path), epochs=2, train_size=1000, val_size=3000)["monitor"]
    path = tmp_path / "state.pt"
    torch.save(monitor.state_dict(), path)
    restored = SliceMonitor(slice_by={"field": "group", "names": ["majority", "minority"]})
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.state_dict() == monitor.state_dict()
    assert restored.rules[1].best["majority"] == monitor.rules[1].best["majority"]


@pytest.mark.parametrize("kwargs,needle", [
    ({"metrics": ["auc"]}, "unknown metric 'auc'"),
    ({"metrics": ["f1"]}, "need num_classes"),
    ({"metrics": ["outcome"]}, "needs outcome="),
    ({"rules": {"r": {"kind": "slice_gapp"}}}, "did you mean 'slice_gap'"),
    ({"rules": {"r": {"kind": "slice_gap", "action": "skip_step"}}}, "no optimizer step is pending"),
    ({"rules": {"r": {"kind": "slice_gap", "marginn": 1}}}, "marginn"),
    ({"slice_by": {"fieldd": "group"}}, "unknown setting"),
    ({"min_count": 0}, "min_count must be >= 1"),
    ({"rule_confidence": 95}, "rule_confidence must be in (0, 1)"),
])
def test_bad_settings_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=None) as info:
        SliceMonitor(**kwargs)
    assert needle in str(info.value)


def test_the_batch_hook_reads_nothing_back_to_the_host(tmp_path, seed):
    """Instrumentation of the real tensors: no .item/.tolist/.cpu/bool while a validation batch is added."""
    reads: List[str] = []
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
    real = {n: getattr(torch.Tensor, n) for n in names}

    class Watched(SliceMonitor):
        def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
            def counted(name: str) -> Any:
                def read(t: torch.Tensor, *a: Any, **k: Any) -> Any:
                    reads.append(name)
                    return real[name](t, *a, **k)
                return read
            for n in names:
                setattr(torch.Tensor, n, counted(n))
            try:
                super().on_validation_batch_end(*args, **kwargs)
            finally:
                for n in names:
                    setattr(torch.Tensor, n, real[n])

    monitor = Watched(slice_by=2, max_values=3, metrics=["acc", "f1"], num_classes=3, min_count=5)
    trainer = make_trainer(tmp_path, [monitor], max_steps=5, limit_val_batches=None, val_check_interval=5)
    trainer.fit(GroupModel(), group_loader(160, 0), group_loader(96, 1))
    assert monitor.evaluations == 1 and reads == []
    assert math.isfinite(monitor.last_result.overall["f1"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_ddp_states_merge_exactly_with_one_state_sync_per_evaluation(tmp_path):
    script = os.path.join(HERE, "scripts", "slice_ddp.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           script, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["records"] == ranks[1]["records"]  # every rank holds the merged values
    assert len(ranks[0]["records"]) == 2
    for epoch, record in enumerate(ranks[0]["records"]):
        rows = ranks[0]["seen"][epoch] + ranks[1]["seen"][epoch]
        assert len(rows) == 37 + 54
        assert record["other"] == 1.0
        for s in range(3):
            mine = [(p, t) for p, t, g in rows if g == s]
            assert record["counts"][s] == len(mine)
            expected = direct([p for p, _ in mine], [t for _, t in mine], "multiclass")
            for m, v in expected.items():
                assert record["values"][m][s] == pytest.approx(v, abs=1e-6), (epoch, m, s)
        overall = direct([p for p, _, _ in rows], [t for _, t, _ in rows], "multiclass")
        for m, v in overall.items():
            assert record["overall"][m] == pytest.approx(v, abs=1e-6)
        # the cost: torchmetrics' sync of the one state tensor (a barrier, an all_gather of its shape, one of
        # the data), nothing per slice or per metric
        assert record["collectives"] == {"all_reduce": 1}  # one collective per evaluation
    assert ranks[0]["batch_hook_collectives"] == ranks[1]["batch_hook_collectives"] == {}
    assert ranks[0]["best_model_score"] == pytest.approx(max(r["worst"] for r in ranks[0]["records"]), abs=1e-6)


def test_the_hydra_component_is_off_by_default_and_configured_by_name():
    from hydra import compose, initialize_config_module

    from lightwatch.hydra import MonitorConfigError, instantiate_monitors

    with initialize_config_module("lightwatch.conf", version_base="1.3"):
        default = compose(overrides=["+monitor=default"])
        cfg = compose(overrides=["+monitor=off", "monitor/slices=group",
                                 "monitor.slices.slice_by={field: group, names: [majority, minority]}",
                                 "monitor.slices.rules.slice_gap.margin=0.02",
                                 "monitor.slices.rules.slice_regressed.action=checkpoint"])
        bad = compose(overrides=["+monitor=off", "monitor/slices=dataloaders",
                                 "monitor.slices.rules.slice_gap.action=skip_step"])
    assert not any(type(cb).__name__ == "SliceMonitor" for cb in instantiate_monitors(default.monitor))
    (monitor,) = instantiate_monitors(cfg.monitor)
    assert isinstance(monitor, SliceMonitor) and monitor.slice_names == ["majority", "minority"]
    gap, regressed = monitor.rules
    assert (gap.kind, gap.margin, gap.consecutive, regressed.action) == ("slice_gap", 0.02, 2, "checkpoint")
    with pytest.raises(MonitorConfigError, match="monitor.slices.*skip_step"):
        instantiate_monitors(bad.monitor)
