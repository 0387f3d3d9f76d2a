"""``MetricMonitor`` in a real Trainer: when rules read values, what they write, and what it costs."""
from __future__ import annotations

import math
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence

import pytest
import pytorch_lightning as pl
import torch

from conftest import Classifier, WarmedUpClassifier, make_loader, make_trainer, read_alerts, read_events, scalars
from lightwatch.callbacks import MetricMonitor
from lightwatch.core.actions import MonitorWarning

torch.set_num_threads(1)
NAN = float("nan")


class Scripted(Classifier):
    """Logs ``series[name][step]`` under ``name`` at each training step (``None``: not logged that step)."""

    def __init__(self, series: Dict[str, Sequence[Optional[float]]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.series = series

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        step = self.trainer.global_step
        for name, values in self.series.items():
            if step < len(values) and values[step] is not None:
                self.log(name, float(values[step]))
        return loss


def alert_steps(directory: str, rule: str) -> List[int]:
    return [a["step"] for a in read_alerts(directory) if a["rule"] == rule]


def noise(n: int, seed: int, level: float = 1.0, scale: float = 0.02) -> List[float]:
    g = torch.Generator().manual_seed(seed)
    return (level + scale * torch.randn(n, generator=g)).tolist()


RULES = {
    "thr": {"metric": "s/thr", "kind": "threshold", "above": 10.0, "action": "log"},
    "nf": {"metric": "s/nf", "kind": "nonfinite", "action": "log"},
    "pl": {"metric": "s/pl", "kind": "plateau", "patience": 5, "min_delta": 0.01, "action": "log", "cooldown": 100},
    "sp": {"metric": "s/sp", "kind": "spike", "action": "log"},
    "tr": {"metric": "s/tr", "kind": "trend", "checks": 5, "action": "log", "cooldown": 100},
    "gap": {"metric": "s/val", "reference": "s/train", "kind": "gap", "above": 0.5, "action": "log"},
}


def scripted_series(faults: bool, n: int = 45) -> Dict[str, List[Optional[float]]]:
    thr = [1.0] * n
    nf = noise(n, 1)
    pl_ = [3.0 - 0.1 * i for i in range(n)]  # keeps improving by more than min_delta
    sp = noise(n, 2)
    tr = [1.0] * n
    val, train = [1.0] * n, [0.8] * n
    if faults:
        thr[7], thr[20] = 15.0, 12.0
        nf[12] = NAN
        pl_ = [3.0 - 0.1 * i if i < 15 else 1.6 for i in range(n)]  # best at 14; flat from 15: 5 checks at 19
        sp[25] = 3.0
        tr = [1.0 if i < 30 else 1.1 ** (i - 29) for i in range(n)]
        val[40] = 1.5
    return {"s/thr": thr, "s/nf": nf, "s/pl": pl_, "s/sp": sp, "s/tr": tr, "s/val": val, "s/train": train}


def test_each_kind_fires_exactly_when_it_should_in_a_trainer(tmp_path: Any, seed: int) -> None:
    monitor = MetricMonitor(rules=RULES, builtin_rules=False, every_n_steps=1, alert_cooldown_steps=0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=45)
    trainer.fit(Scripted(scripted_series(faults=True)), make_loader(n=45 * 16))
    assert alert_steps(str(tmp_path), "thr") == [7, 20]
    assert alert_steps(str(tmp_path), "nf") == [12]
    assert alert_steps(str(tmp_path), "pl") == [19]
    assert alert_steps(str(tmp_path), "sp") == [25]
    assert alert_steps(str(tmp_path), "tr") == [31]  # window [1, 1, 1, 1.1, 1.21]: tau 0.7, rise 0.2
    assert alert_steps(str(tmp_path), "gap") == [40]
    record = next(a for a in read_alerts(str(tmp_path)) if a["rule"] == "thr")
    assert record["subject"] == "s/thr" and record["value"] == 15.0 and record["threshold"] == 10.0
    assert record["source"] == "MetricMonitor" and record["action"] == "log" and record["severity"] == "warning"


def test_no_alert_on_healthy_sequences(tmp_path: Any, seed: int) -> None:
    monitor = MetricMonitor(rules=RULES, every_n_steps=1, alert_cooldown_steps=0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=45)
    trainer.fit(Scripted(scripted_series(faults=False)), make_loader(n=45 * 16))
    assert read_alerts(str(tmp_path)) == []
    # loss_shift needs 60 steps of per-step losses before its first score, loss_regressed 50; this run has 45
    assert all(r.seen for r in monitor.rules.rules if r.name not in ("loss_shift", "loss_regressed"))


def test_no_arguments_on_a_plain_classifier_is_quiet_and_cheap(tmp_path: Any, seed: int) -> None:
    monitor = MetricMonitor()
    trainer = make_trainer(tmp_path, [monitor], max_steps=60, log_every_n_steps=5)
    trainer.fit(Classifier(lr=0.2), labelled_loader(shuffle_labels=False, n=512))  # labels it can learn
    assert [r.name for r in monitor.rules.rules] == ["loss_nonfinite", "loss_spike", "loss_shift", "loss_regressed"]
    assert read_alerts(str(tmp_path)) == []
    assert monitor.interval == 5  # follows Trainer(log_every_n_steps)
    assert monitor.host_reads == 12 and monitor.collectives == 0  # one read per sampled step, nothing else
    acc = read_events(os.path.join(str(tmp_path), "tb", "version_0"))
    steps = sorted(scalars(acc, "monitor.rule/loss_spike/score"))
    assert steps == [54, 59]  # after min_history (10) checks; on the steps of the train/loss curve
    assert set(steps) <= set(scalars(acc, "train/loss"))


def test_nonfinite_loss_stops_the_run_by_default(tmp_path: Any, seed: int) -> None:
    class Poisoned(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            if self.trainer.global_step == 12:
                x = x * NAN
            return super().training_step((x, y), batch_idx)

    monitor = MetricMonitor(every_n_steps=5)
    trainer = make_trainer(tmp_path, [monitor], max_steps=60)
    trainer.fit(Poisoned(), make_loader(n=1024))
    (alert,) = read_alerts(str(tmp_path))
    assert (alert["rule"], alert["step"], alert["severity"], alert["action"]) == ("loss_nonfinite", 14, "error", "stop")
    assert alert["subject"] == "monitor.step/loss" and alert["value"] is None and "NaN" in alert["message"]
    assert trainer.global_step == 15  # stopped right after the check


class EpochLogs(Classifier):
    """Validation metrics, and a value logged in ``on_train_epoch_end`` (after ordinary callbacks ran)."""

    def on_train_epoch_end(self) -> None:
        self.log("late", float(self.current_epoch + 1))


def test_each_value_is_read_once_at_its_check_point(tmp_path: Any, seed: int) -> None:
    rules = {
        # lr=0: val/loss repeats exactly; with step checks every step it must still count once per validation
        "val_plateau": {"metric": "val/loss", "kind": "plateau", "patience": 2, "action": "log"},
        "late_trend": {"metric": "late", "kind": "trend", "checks": 3, "action": "log"},
        "train_epoch_only": {"metric": "train/loss", "kind": "threshold", "above": 1e9, "check_on": ["epoch"]},
    }
    monitor = MetricMonitor(rules=rules, builtin_rules=False, every_n_steps=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=-1, max_epochs=4, limit_train_batches=4,
                           limit_val_batches=2, num_sanity_val_steps=2)
    trainer.fit(EpochLogs(lr=0.0), make_loader(n=64), make_loader(n=32, seed=1))
    plateau = monitor.rules.by_name["val_plateau"]
    assert plateau.wait == 3 and plateau.fired == 1  # validations 2, 3, 4 did not improve on the first
    assert alert_steps(str(tmp_path), "val_plateau") == [11]  # at the end of the third validation (epoch 2)
    late = monitor.rules.by_name["late_trend"]
    assert late.values == [2.0, 3.0, 4.0] and late.steps[-1] == 16  # one value per epoch, the last at train end
    assert late.last_point == "epoch_late" and alert_steps(str(tmp_path), "late_trend") == [12]
    assert monitor.rules.by_name["train_epoch_only"].last_point == "epoch"


def test_missing_metric_warns_once_naming_what_exists(tmp_path: Any, seed: int) -> None:
    rules = {"typo": {"metric": "val/los", "kind": "plateau", "patience": 2}}
    monitor = MetricMonitor(rules=rules, every_n_steps=5)
    trainer = make_trainer(tmp_path, [monitor], max_steps=-1, max_epochs=3, limit_train_batches=10,
                           limit_val_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Classifier(), make_loader(n=160), make_loader(n=32, seed=1))
    mine = [w for w in caught if issubclass(w.category, MonitorWarning)]
    assert len(mine) == 1
    text = str(mine[0].message)
    assert "'typo'" in text and "'val/los'" in text and "Did you mean 'val/loss'?" in text
    assert "Metrics that exist:" in text and "train/loss" in text
    records = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "metric_missing"]
    assert len(records) == 1 and records[0]["subject"] == "val/los" and records[0]["step"] == 10


def test_warmup_and_cooldown_hold_in_a_trainer(tmp_path: Any, seed: int) -> None:
    rules = {"always": {"metric": "monitor.step/loss", "kind": "threshold", "above": -1.0, "action": "log",
                        "warmup": 10, "cooldown": 20, "check_on": ["step"]}}
    monitor = MetricMonitor(rules=rules, builtin_rules=False, every_n_steps=1, alert_cooldown_steps=0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=60)
    trainer.fit(Classifier(), make_loader(n=1024))
    assert alert_steps(str(tmp_path), "always") == [10, 30, 50]


def test_requires_gate_in_a_trainer(tmp_path: Any, seed: int) -> None:
    # AUTOTRAINER's gate: the gradient alarm only counts while the loss is not improving
    rules = {"stuck": {"metric": "s/loss", "kind": "plateau", "patience": 2, "silent": True},
             "grad": {"metric": "monitor.step/grad_norm", "kind": "threshold", "above": 0.0, "requires": "stuck",
                      "action": "log", "check_on": ["step"]}}
    monitor = MetricMonitor(rules=rules, builtin_rules=False, every_n_steps=1, alert_cooldown_steps=0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=10)
    loss = [3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    trainer.fit(Scripted({"s/loss": loss}), make_loader(n=160))
    assert alert_steps(str(tmp_path), "grad") == [4, 5, 8, 9]  # the loss stalled for 2 checks at 4-5 and 8-9
    assert monitor.rules.by_name["stuck"].fired == 0  # silent: a condition, never an alert


def test_every_step_rules_cost_one_read_per_step(tmp_path: Any, seed: int) -> None:
    def fit(rules: Optional[Dict[str, Any]]) -> MetricMonitor:
        monitor = MetricMonitor(rules=rules, every_n_steps=5)
        trainer = make_trainer(tmp_path, [monitor], max_steps=40, limit_val_batches=2, val_check_interval=20)
        trainer.fit(Classifier(), make_loader(n=640), make_loader(n=32, seed=1))
        return monitor

    sampled = fit(None)
    assert sampled.host_reads == 8  # 40 steps / 5; validations have no rule due: no read
    per_step = fit({"nan_skip": {"metric": "monitor.step/loss", "kind": "nonfinite", "action": "skip_step"},
                    "val_nan": {"metric": "val/loss", "kind": "nonfinite", "check_on": ["validation"]}})
    assert per_step.host_reads == 40 + 8 + 2  # every step, every sampled step, each of the 2 validations


def test_alerts_and_scores_reach_tensorboard(tmp_path: Any, seed: int) -> None:
    rules = {"loss_high": {"metric": "monitor.step/loss", "kind": "threshold", "above": 0.5, "action": "log",
                           "check_on": ["step"], "message": "Lower the learning rate."}}
    monitor = MetricMonitor(rules=rules, every_n_steps=5)
    trainer = make_trainer(tmp_path, [monitor], max_steps=20)
    trainer.fit(Classifier(), make_loader(n=512))
    acc = read_events(os.path.join(str(tmp_path), "tb", "version_0"))
    assert "monitor.alert/loss_high/text_summary" in acc.Tags()["tensors"]  # add_text's tag
    values = scalars(acc, "monitor.alert/loss_high/value")
    assert list(values) == [4] and values[4] > 0.5
    loss = scalars(acc, "monitor.rule/loss_high/score")
    assert sorted(loss) == [4, 9, 14, 19] and all(v > 0.5 for v in loss.values())
    (record,) = read_alerts(str(tmp_path))
    assert record["message"].endswith("Lower the learning rate.")
    assert float(trainer.callback_metrics["monitor.rule/loss_high/score"]) == pytest.approx(loss[19])


def test_bad_constructor_arguments_say_what_and_where() -> None:
    with pytest.raises(ValueError, match="rules must be a mapping"):
        MetricMonitor(rules=["val/loss"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rule 'x': key 'kind'"):
        MetricMonitor(rules={"x": {"metric": "m", "kind": "spikes"}})
    with pytest.raises(ValueError, match="snapshots"):
        MetricMonitor(snapshots=-1)
    with pytest.raises(ValueError, match="lr_factor"):
        MetricMonitor(lr_factor=0.0)
    monitor = MetricMonitor(rules={"loss_spike": None}, builtin_rules=True)
    assert [r.name for r in monitor.rules.rules] == ["loss_nonfinite", "loss_shift", "loss_regressed"]


def test_checkpoint_action_asks_metric_checkpoint_to_save(tmp_path: Any, seed: int) -> None:
    import json

    from lightwatch.callbacks import MetricCheckpoint

    rules = {"thr": {"metric": "s/thr", "kind": "threshold", "above": 10.0, "action": "checkpoint"}}
    ckpt = MetricCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=100)
    monitor = MetricMonitor(rules=rules, builtin_rules=False, every_n_steps=1)
    trainer = make_trainer(tmp_path, [monitor, ckpt], max_steps=12, enable_checkpointing=True)
    trainer.fit(Scripted({"s/thr": [1.0] * 7 + [15.0] + [1.0] * 4}), make_loader(n=12 * 16))
    with open(ckpt.manifest_path) as fh:
        saved = [(c["reason"], c["step"]) for c in json.load(fh)["checkpoints"]]
    assert ("alert", 8) in saved  # saved at the end of the step whose check fired (global step 8)


class RawLogitsNLL(Classifier):
    """``F.nll_loss`` on raw logits instead of log-probabilities: the loss goes negative and keeps falling."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.nll_loss(self(x), y)
        self.log("train/loss", loss)
        return loss


def test_a_negative_loss_is_a_warning_that_names_the_likely_cause(tmp_path: Any) -> None:
    monitor = MetricMonitor(every_n_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MonitorWarning)
        trainer = make_trainer(tmp_path / "nll", [monitor], max_steps=30)
        trainer.fit(RawLogitsNLL(), make_loader(n=512))
    alerts = [a for a in read_alerts(str(tmp_path / "nll")) if a["rule"] == "loss_negative"]
    assert alerts, "a negative loss raised no loss_negative alert"
    first = alerts[0]
    assert (first["severity"], first["action"], first["subject"]) == ("warning", "warn", "monitor.step/loss")
    assert first["value"] < 0 and first["threshold"] == 0.0 and first["step"] % 5 == 4
    assert "log_softmax" in first["message"] and f"first seen negative at step {first['step']}" in first["message"]
    assert trainer.global_step == 30  # a warning: training goes on
    assert monitor.state_dict()["negative_since"] == first["step"]


def test_healthy_losses_and_a_switched_off_check_raise_no_negative_loss_alert(tmp_path: Any) -> None:
    trainer = make_trainer(tmp_path / "healthy", [MetricMonitor(every_n_steps=5)], max_steps=30)
    trainer.fit(Classifier(), make_loader(n=512))
    assert [a for a in read_alerts(str(tmp_path / "healthy")) if a["rule"] == "loss_negative"] == []
    monitor = MetricMonitor(every_n_steps=5, rules={"loss_negative": None})
    assert not monitor.negative_loss_check
    assert sorted(r.name for r in monitor.rules.rules) == ["loss_nonfinite", "loss_regressed", "loss_shift",
                                                           "loss_spike"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MonitorWarning)
        trainer = make_trainer(tmp_path / "off", [monitor], max_steps=30)
        trainer.fit(RawLogitsNLL(), make_loader(n=512))
    assert [a for a in read_alerts(str(tmp_path / "off")) if a["rule"] == "loss_negative"] == []


def test_the_negative_loss_check_runs_without_any_loss_rule(tmp_path: Any) -> None:
    monitor = MetricMonitor(every_n_steps=5, rules={"loss_nonfinite": None, "loss_spike": None, "loss_shift": None,
                                                    "loss_regressed": None})
    assert monitor.negative_loss_check and len(monitor.rules) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MonitorWarning)
        make_trainer(tmp_path, [monitor], max_steps=20).fit(RawLogitsNLL(), make_loader(n=512))
    assert any(a["rule"] == "loss_negative" for a in read_alerts(str(tmp_path)))
    assert monitor.host_reads == 4  # one read per check (steps 4, 9, 14, 19), none in between


class SpikeAt(Classifier):
    """The loss of one optimizer step multiplied by ``factor`` (a transient spike between two checks)."""

    def __init__(self, at: Optional[int], factor: float = 20.0) -> None:
        super().__init__()
        self.at, self.factor = at, factor

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * self.factor if self.trainer.global_step == self.at else loss


STEP_SPIKE = {"loss_step_spike": {"metric": "monitor.step/loss_step_z", "kind": "threshold", "above": 15,
                                   "check_on": ["step"]}}


def test_the_per_step_spike_score_catches_a_one_step_loss_spike_between_checks(tmp_path: Any) -> None:
    # per-step losses are kept only when a rule reads a per-step score: the default loss_shift and loss_regressed do
    assert MetricMonitor().step_spike_check
    assert not MetricMonitor(rules={"loss_shift": None, "loss_regressed": None}).step_spike_check
    monitor = MetricMonitor(every_n_steps=10, rules=STEP_SPIKE)
    assert monitor.step_spike_check
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MonitorWarning)
        make_trainer(tmp_path / "spike", [monitor], max_steps=100, log_every_n_steps=10).fit(
            SpikeAt(76), make_loader(n=2048, batch_size=32, seed=1))
    alerts = read_alerts(str(tmp_path / "spike"))
    (alert,) = [a for a in alerts if a["rule"] == "loss_step_spike"]
    assert (alert["step"], alert["severity"], alert["subject"]) == (79, "warning", "monitor.step/loss_step_z")
    assert alert["value"] >= 15 and alert["threshold"] == 15
    assert monitor.host_reads == 10  # still one read per check: the per-step losses stay on the device
    # the check-level rule reads one value per check and does not see a spike that falls between checks
    assert not any(a["rule"] == "loss_spike" for a in alerts)
    acc = read_events(os.path.join(str(tmp_path / "spike"), "tb", "version_0"))
    scores = scalars(acc, "monitor.rule/loss_step_spike/score")
    assert min(scores) == 59 and scores[79] >= 15  # after a full window of 50 steps
    assert max(v for k, v in scores.items() if k != 79) < 15

    # random labels do not learn, which is loss_not_learning's business, not this test's
    healthy = MetricMonitor(every_n_steps=10, rules={**STEP_SPIKE, "loss_not_learning": None})
    make_trainer(tmp_path / "healthy", [healthy], max_steps=100, log_every_n_steps=10).fit(
        SpikeAt(None), make_loader(n=2048, batch_size=32, seed=1))
    assert read_alerts(str(tmp_path / "healthy")) == []


# ------------------------------------------------------------------------------- loss_not_learning
def labelled_loader(shuffle_labels: bool, n: int = 256, seed: int = 0) -> Any:
    """A learnable task (the label is the largest of the first three features), 16 steps an epoch."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x[:, :3].argmax(1)
    if shuffle_labels:  # the fault: labels no longer belong to their inputs
        y = y[torch.randperm(n, generator=g)]
    return DataLoader(TensorDataset(x, y), batch_size=16)


def not_learning_alerts(tmp_path: Any, model: pl.LightningModule, shuffle_labels: bool, callbacks: Sequence[Any] = (),
                        max_steps: int = 80, info: bool = False, **monitor_kwargs: Any) -> List[dict]:
    trainer = make_trainer(tmp_path, [*callbacks, MetricMonitor(every_n_steps=5, **monitor_kwargs)],
                           max_steps=max_steps)
    trainer.fit(model, labelled_loader(shuffle_labels))
    return [a for a in read_alerts(str(tmp_path)) if info or a["severity"] != "info"]


def test_a_loss_flat_on_its_own_noise_for_as_long_as_the_run_before_it_is_not_learning(tmp_path: Any,
                                                                                        seed: int) -> None:
    # evaluations at the first checks at or after steps 50 and 2 x 54: flat at both (checks at 4, 9, ..., 54, ...)
    (alert,) = not_learning_alerts(tmp_path, Classifier(lr=0.2), shuffle_labels=True, max_steps=120)
    assert (alert["rule"], alert["severity"], alert["subject"]) == ("loss_not_learning", "warning", "monitor.step/loss")
    assert alert["step"] == 109 and alert["value"] >= 0.85
    assert "labels may not be learnable" in alert["message"] and "flat on its own batch-to-batch noise since step 54" \
        in alert["message"]


def test_one_flat_evaluation_is_not_enough(tmp_path: Any, seed: int) -> None:
    # an early plateau (recurrent nets sit on one for tens of steps before they learn) is not judged at step 54
    assert not_learning_alerts(tmp_path, Classifier(lr=0.2), shuffle_labels=True, max_steps=100) == []


def test_a_learning_run_and_a_switched_off_check_stay_quiet(tmp_path: Any, seed: int) -> None:
    assert not_learning_alerts(tmp_path / "healthy", Classifier(lr=0.2), shuffle_labels=False, max_steps=240) == []
    off = not_learning_alerts(tmp_path / "off", Classifier(lr=0.2), shuffle_labels=True, max_steps=240,
                              rules={"loss_not_learning": None})
    assert off == []


def test_a_slow_but_steady_decline_is_info_and_judged_again_later(tmp_path: Any, seed: int) -> None:
    # SGD at 0.02: 93% of the first level at step 109, still falling by more than 3 standard errors
    alerts = not_learning_alerts(tmp_path, Classifier(lr=0.02), shuffle_labels=False, max_steps=400, info=True)
    assert [(a["rule"], a["severity"]) for a in alerts] == [("loss_slow", "info")]
    assert "Judged again at step" in alerts[0]["message"]


def test_a_flat_loss_during_a_learning_rate_warmup_is_judged_after_the_warmup(tmp_path: Any, seed: int) -> None:
    trainer = make_trainer(tmp_path, [MetricMonitor(every_n_steps=5)], max_steps=240)
    trainer.fit(WarmedUpClassifier(warmup=100, lr=0.2), labelled_loader(shuffle_labels=True))
    (alert,) = [a for a in read_alerts(str(tmp_path)) if a["severity"] != "info"]
    # the learning rate rises until step 100: the checks up to 104 see it rise over their last three checks,
    # the first evaluation is at 109 (flat), the second at the first check at or after 218
    assert (alert["rule"], alert["step"]) == ("loss_not_learning", 219)


class OffsetLoss(Classifier):
    """Cross-entropy plus 10: it learns, yet never reaches 85% of its first level, so the check stays open."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + 10.0


def test_the_loss_blocks_stay_bounded_on_a_long_run(tmp_path: Any, seed: int) -> None:
    monitor = MetricMonitor(every_n_steps=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=700, log_every_n_steps=1)
    trainer.fit(OffsetLoss(lr=0.2), labelled_loader(shuffle_labels=False))
    assert not monitor.state_dict()["learning_checked"]
    blocks = monitor.state_dict()["loss_blocks"]
    assert 256 <= len(blocks) <= 512 + 11
    assert sum(b[2] for b in blocks) == 700  # every step's loss is in exactly one block
    assert all(a[1] < b[0] for a, b in zip(blocks, blocks[1:]))  # in order, not overlapping


def test_not_learning_takes_the_name_of_an_earlier_finding_that_explains_it(tmp_path: Any, seed: int) -> None:
    from lightwatch import GradientStatsMonitor

    model = Classifier(lr=0.2)
    for name, p in model.named_parameters():
        if name != "net.4.bias":
            p.requires_grad_(False)  # the bug: everything but the last bias frozen
    alerts = not_learning_alerts(tmp_path, model, shuffle_labels=False,
                                 callbacks=[GradientStatsMonitor(every_n_steps=5)])
    (alert,) = [a for a in alerts if a["source"] == "MetricMonitor"]
    # the frozen layers still hold their random init (small ones too), the most specific cause on record
    assert (alert["rule"], alert["subject"], alert["step"]) == ("frozen_at_init", "net.0.weight", 54)
    assert "That is the likely cause" in alert["message"]


# ------------------------------------------------------------------------------------- loss_shift
class LevelShiftAt(Classifier):
    """From ``step`` on, the loss is five times higher: a spike that set training back, not one hard batch."""

    def __init__(self, step: Optional[int]) -> None:
        super().__init__(lr=0.2)
        self.shift_step = step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.shift_step is not None and self.global_step >= self.shift_step:
            loss = loss * 5
        return loss


def test_a_lasting_loss_jump_is_a_loss_shift_and_one_hard_batch_is_not(tmp_path: Any, seed: int) -> None:
    monitor = MetricMonitor(every_n_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MonitorWarning)
        make_trainer(tmp_path / "shift", [monitor], max_steps=90).fit(LevelShiftAt(70), labelled_loader(False, 1024))
    (alert,) = [a for a in read_alerts(str(tmp_path / "shift")) if a["rule"] == "loss_shift"]
    # the median of the last 10 steps moves once more than half of them are up: at the check of step 79
    assert (alert["step"], alert["subject"], alert["severity"]) == (79, "monitor.step/loss_shift_z", "warning")
    assert alert["value"] >= 4 and monitor.host_reads == 18  # the ring adds no read: one per check
    acc = read_events(os.path.join(str(tmp_path / "shift"), "tb", "version_0"))
    scores = scalars(acc, "monitor.rule/loss_shift/score")
    assert min(scores) == 59  # after 50 + 10 steps of history

    healthy = MetricMonitor(every_n_steps=5)
    make_trainer(tmp_path / "healthy", [healthy], max_steps=90).fit(LevelShiftAt(None), labelled_loader(False, 1024))
    assert read_alerts(str(tmp_path / "healthy")) == []


# ----------------------------------------------------------------------------------- loss_regressed
class ScriptedLoss(pl.LightningModule):
    """Training loss ``levels(step)`` exactly (a zero-weighted parameter term keeps it differentiable)."""

    def __init__(self, levels: Any, restart_at: Optional[int] = None, unfreeze_at: Optional[int] = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.backbone = torch.nn.Parameter(torch.zeros(1))  # joins the optimizer at `unfreeze_at`, if given
        self.levels, self.restart_at, self.unfreeze_at = levels, restart_at, unfreeze_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.unfreeze_at and batch_idx == self.unfreeze_at:
            self.optimizers().optimizer.add_param_group({"params": [self.backbone], "lr": 0.001})
        return (self.w * 0 + self.backbone * 0).sum() + float(self.levels(self.global_step))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD([self.w], lr=0.01)
        if self.restart_at is None:
            return optimizer
        restart = self.restart_at  # a warm restart: the rate jumps up 10x and stays there
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 10.0 if s >= restart else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def falls_then_rises(step: int) -> float:
    return 2.0 - 1.5 * step / 60 if step < 60 else (0.5 if step < 100 else 1.2)  # best 0.5, then 2.4x that


def regressions(tmp_path: Any, module: pl.LightningModule, max_steps: int = 200) -> List[dict]:
    monitor = MetricMonitor(every_n_steps=10)
    make_trainer(tmp_path, [monitor], max_steps=max_steps).fit(module, make_loader(n=max_steps * 16))
    return [a for a in read_alerts(str(tmp_path)) if a["rule"] == "loss_regressed"]


def test_a_loss_that_goes_back_up_and_stays_is_a_regression(tmp_path: Any, seed: int) -> None:
    (alert,) = regressions(tmp_path, ScriptedLoss(falls_then_rises))
    # checks at 9, 19, ...: the median of the last 50 steps turns to 1.2 once 26 of them are, at the check of 129;
    # the second check in a row (139) fires
    assert (alert["step"], alert["subject"], alert["severity"]) == (139, "monitor.step/loss_regress", "warning")
    assert alert["value"] == pytest.approx(2.4) and alert["threshold"] == 1.5
    assert "since step 129" in alert["message"] and "learning rate too high" in alert["message"]


def test_a_rise_with_the_learning_rate_or_at_the_floor_of_the_loss_is_not(tmp_path: Any, seed: int) -> None:
    # a warm restart at step 100 lifts the loss with the rate: a new phase, judged on its own
    assert regressions(tmp_path / "restart", ScriptedLoss(falls_then_rises, restart_at=100)) == []
    # so does a new param group (layers unfrozen for fine-tuning)
    assert regressions(tmp_path / "unfreeze", ScriptedLoss(falls_then_rises, unfreeze_at=100)) == []
    # 3x a fitted loss, but under 10% of the first step's: noise at the floor, not a setback
    def tiny(step: int) -> float:
        return 2.0 if step == 0 else (0.004 if step < 100 else 0.012)

    assert regressions(tmp_path / "floor", ScriptedLoss(tiny)) == []
    # and the regression is kept across a resume
    monitor = MetricMonitor(every_n_steps=10)
    make_trainer(tmp_path / "state", [monitor], max_steps=120).fit(ScriptedLoss(falls_then_rises),
                                                                   make_loader(n=120 * 16))
    state = monitor.state_dict()
    assert state["best_level"] == pytest.approx(0.5) and state["initial_loss"] == pytest.approx(2.0)
    resumed = MetricMonitor(every_n_steps=10)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["best_level"] == pytest.approx(0.5)


def test_a_jump_at_the_floor_of_a_fitted_loss_is_no_setback(tmp_path: Any, seed: int) -> None:
    def jump(low: float) -> Any:  # 2.0 at the first step, `low` until step 100, then 12x `low`; +-20% wiggle
        return lambda step: 2.0 if step == 0 else (low if step < 100 else 12 * low) * (1 + 0.2 * math.sin(1.7 * step))

    def setbacks(path: Any, low: float) -> List[str]:
        make_trainer(path, [MetricMonitor(every_n_steps=10)], max_steps=160).fit(ScriptedLoss(jump(low)),
                                                                                 make_loader(n=2560))
        return [a["rule"] for a in read_alerts(str(path)) if a["rule"] in ("loss_shift", "loss_regressed")]

    assert setbacks(tmp_path / "floor", 0.01) == []  # 0.01 -> 0.12: under 10% of the first loss
    assert sorted(set(setbacks(tmp_path / "setback", 0.1))) == ["loss_regressed", "loss_shift"]  # 0.1 -> 1.2
