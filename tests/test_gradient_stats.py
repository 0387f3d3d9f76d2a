"""GradientStatsMonitor in a real Trainer, checked against an independent torch computation."""
from __future__ import annotations

import math
from typing import Any, Dict, List

import pytest
import pytorch_lightning as pl
import torch

from conftest import Classifier, make_loader, make_trainer, read_alerts, read_events, scalars
from lightwatch import GradientStatsMonitor


class GradientRecorder(pl.Callback):
    """Records gradients and parameters around every optimizer step, independently of lightwatch."""

    def __init__(self) -> None:
        self.grads: Dict[int, Dict[str, torch.Tensor]] = {}
        self.before: Dict[int, Dict[str, torch.Tensor]] = {}
        self.after: Dict[int, Dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.grads[step] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.before[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.after[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_values_match_independent_computation(tmp_path: Any, seed: int) -> None:
    recorder = GradientRecorder()
    monitor = GradientStatsMonitor(histogram_every_n_steps=10, norm_every_step=True)
    trainer = make_trainer(tmp_path, [recorder, monitor], max_steps=20, log_every_n_steps=5)
    trainer.fit(Classifier(), make_loader())
    acc = read_events(trainer.log_dir)

    logged_steps = [0, 4, 9, 14, 19]  # step 0: the initialised model, before the first optimizer step
    assert sorted(scalars(acc, "monitor.grad/_total/norm")) == logged_steps
    assert sorted(scalars(acc, "train/loss")) == logged_steps[1:]  # same step axis as self.log
    for previous, step in zip([-1] + logged_steps, logged_steps):
        grads, before, after = recorder.grads[step], recorder.before[step], recorder.after[step]
        for name, g in grads.items():
            assert scalars(acc, f"monitor.grad/{name}/norm")[step] == pytest.approx(g.norm().item(), rel=1e-5)
            assert scalars(acc, f"monitor.grad/{name}/absmax")[step] == pytest.approx(g.abs().max().item(), rel=1e-6)
            assert scalars(acc, f"monitor.grad/{name}/nonfinite")[step] == 0.0
            assert scalars(acc, f"monitor.param/{name}/norm")[step] == pytest.approx(after[name].norm().item(), rel=1e-5)
            ratio = (after[name] - before[name]).norm().item() / before[name].norm().item()
            assert scalars(acc, f"monitor.param/{name}/update_ratio")[step] == pytest.approx(ratio, rel=1e-4)
        total = math.sqrt(sum(g.norm().item() ** 2 for g in grads.values()))
        assert scalars(acc, "monitor.grad/_total/norm")[step] == pytest.approx(total, rel=1e-5)
        interval = [math.sqrt(sum(g.norm().item() ** 2 for g in recorder.grads[s].values()))
                    for s in range(previous + 1, step + 1)]  # the steps since the previous sample
        assert scalars(acc, "monitor.grad/_total/norm_max")[step] == pytest.approx(max(interval), rel=1e-5)

    # Histograms only every 10 steps (a multiple of the interval), with every gradient value counted.
    hist = acc.Histograms("monitor.grad_hist/net.0.weight")
    assert [h.step for h in hist] == [9, 19]
    assert hist[0].histogram_value.num == recorder.grads[9]["net.0.weight"].numel()
    assert hist[0].histogram_value.max == pytest.approx(recorder.grads[9]["net.0.weight"].max().item(), rel=1e-6)
    assert [h.step for h in acc.Histograms("monitor.param_hist/net.4.bias")] == [9, 19]
    # Values are also in callback_metrics for Lightning's own callbacks.
    assert "monitor.grad/_total/norm" in trainer.callback_metrics


def test_per_step_norm_is_off_by_default_on_the_cpu(tmp_path: Any, seed: int) -> None:
    trainer = make_trainer(tmp_path, [GradientStatsMonitor()], max_steps=5, log_every_n_steps=5)
    trainer.fit(Classifier(), make_loader())
    tags = read_events(trainer.log_dir).Tags()["scalars"]
    assert "monitor.grad/_total/norm" in tags and "monitor.grad/_total/norm_max" not in tags


def test_norm_max_catches_a_spike_between_samples(tmp_path: Any, seed: int) -> None:
    class SpikeAtStep(pl.Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            if trainer.fit_loop.epoch_loop._batches_that_stepped == 6:  # not a sampled step
                for p in pl_module.parameters():
                    p.grad.mul_(1000.0)

    recorder = GradientRecorder()
    monitor = GradientStatsMonitor(track_update_ratio=False, norm_every_step=True)
    trainer = make_trainer(tmp_path, [SpikeAtStep(), recorder, monitor], max_steps=10, log_every_n_steps=5)
    trainer.fit(Classifier(lr=1e-4), make_loader())
    acc = read_events(trainer.log_dir)
    spike = math.sqrt(sum(g.norm().item() ** 2 for g in recorder.grads[6].values()))
    assert scalars(acc, "monitor.grad/_total/norm_max")[9] == pytest.approx(spike, rel=1e-5)
    assert scalars(acc, "monitor.grad/_total/norm")[9] < spike / 100


def test_nonfinite_gradient_names_its_parameter(tmp_path: Any, seed: int) -> None:
    class PoisonGrad(pl.Callback):
        def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
            if trainer.fit_loop.epoch_loop._batches_that_stepped == 9:
                pl_module.net[2].weight.grad[0, :3] = float("nan")

    monitor = GradientStatsMonitor(nonfinite_action="log", norm_every_step=True)
    trainer = make_trainer(tmp_path, [PoisonGrad(), monitor], max_steps=10, log_every_n_steps=5)
    trainer.fit(Classifier(), make_loader())
    alerts = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "grad_nonfinite"]
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert["subject"] == "net.2.weight" and alert["step"] == 9 and alert["value"] == 3.0
    assert alert["severity"] == "error" and alert["source"] == "GradientStatsMonitor"
    assert "net.2.weight" in alert["message"]
    acc = read_events(trainer.log_dir)
    assert scalars(acc, "monitor.grad/net.2.weight/nonfinite")[9] == 3.0
    assert scalars(acc, "monitor.grad/_total/nonfinite_steps")[9] == 1.0
    assert "monitor.alert/grad_nonfinite/text_summary" in acc.Tags()["tensors"]


def test_raise_action_stops_with_monitor_error(tmp_path: Any, seed: int) -> None:
    from lightwatch import MonitorError

    class PoisonGrad(pl.Callback):
        def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
            pl_module.net[0].bias.grad[0] = float("inf")

    trainer = make_trainer(tmp_path, [PoisonGrad(), GradientStatsMonitor(nonfinite_action="raise")], max_steps=10,
                           log_every_n_steps=5)
    with pytest.raises(MonitorError, match=r"grad_nonfinite.*step 0.*net\.0\.bias"):  # step 0 is checked too
        trainer.fit(Classifier(), make_loader())


def test_top_k_and_module_grouping(tmp_path: Any, seed: int) -> None:
    recorder = GradientRecorder()
    monitor = GradientStatsMonitor(group_by="module", top_k=1, histogram_every_n_steps=0)
    trainer = make_trainer(tmp_path, [recorder, monitor], max_steps=5, log_every_n_steps=5)
    trainer.fit(Classifier(), make_loader())
    acc = read_events(trainer.log_dir)
    grad_norm_tags = [t for t in acc.Tags()["scalars"] if t.startswith("monitor.grad/") and t.endswith("/norm")
                      and "_total" not in t]
    grads = recorder.grads[4]
    module_norms = {m: math.sqrt(grads[f"{m}.weight"].norm() ** 2 + grads[f"{m}.bias"].norm() ** 2)
                    for m in ("net.0", "net.2", "net.4")}
    worst = max(module_norms, key=module_norms.get)
    assert grad_norm_tags == [f"monitor.grad/{worst}/norm"]
    assert scalars(acc, grad_norm_tags[0])[4] == pytest.approx(module_norms[worst], rel=1e-5)
    assert acc.Tags()["histograms"] == []


def test_top_k_writes_every_nonfinite_parameter_too(tmp_path: Any, seed: int) -> None:
    """A parameter whose gradient holds NaN/Inf is written however small its finite part (non-finite norms rank
    first), then the largest finite norms up to ``top_k``; the alert counts the bad values of all of them."""
    class PoisonGrad(pl.Callback):
        def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
            if trainer.fit_loop.epoch_loop._batches_that_stepped == 4:
                pl_module.net[0].bias.grad[:2] = float("nan")
                pl_module.net[4].bias.grad[0] = float("inf")

    recorder = GradientRecorder()
    monitor = GradientStatsMonitor(top_k=3, exclude=[], nonfinite_action="log", histogram_every_n_steps=0)
    trainer = make_trainer(tmp_path, [recorder, PoisonGrad(), monitor], max_steps=5, log_every_n_steps=5)
    trainer.fit(Classifier(), make_loader())
    acc = read_events(trainer.log_dir)
    written = {t.split("/")[1] for t in acc.Tags()["scalars"] if t.startswith("monitor.grad/") and t.endswith("/norm")
               and "_total" not in t and 4 in scalars(acc, t)}
    finite = {name: float(g.norm()) for name, g in recorder.grads[4].items() if torch.isfinite(g).all()}
    assert written == {max(finite, key=finite.get), "net.0.bias", "net.4.bias"}
    assert scalars(acc, "monitor.grad/net.0.bias/nonfinite")[4] == 2.0
    (alert,) = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "grad_nonfinite"]
    assert alert["step"] == 4 and alert["value"] == 3.0


def test_patterns_that_select_nothing_fail_clearly(tmp_path: Any) -> None:
    monitor = GradientStatsMonitor(include=[r"^encoder\."])
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    with pytest.raises(ValueError, match=r"encoder.*select no parameters.*net\.0\.weight"):
        trainer.fit(Classifier(), make_loader())


@pytest.mark.parametrize("bad", [dict(every_n_steps=0), dict(group_by="layer"), dict(top_k=0),
                                 dict(nonfinite_action="explode"), dict(include=["("])])
def test_bad_arguments_fail_at_construction(bad: Dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="GradientStatsMonitor"):
        GradientStatsMonitor(**bad)


def test_a_very_long_interval_keeps_the_per_step_buffers_small(tmp_path: Any, seed: int) -> None:
    from lightwatch import MetricMonitor

    sizes: List[int] = []

    class Probe(pl.Callback):  # the buffers as they are during training (teardown frees them)
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            sizes.extend([grads._ring.numel(), metrics._losses.ring.numel()])

    grads = GradientStatsMonitor(every_n_steps=10 ** 9, norm_every_step=True)
    metrics = MetricMonitor(every_n_steps=10 ** 9)  # the default loss_shift rule keeps every step's loss
    trainer = make_trainer(tmp_path, [grads, metrics, Probe()], max_steps=3, log_every_n_steps=1)
    trainer.fit(Classifier(), make_loader())
    # one float per step of the interval would be 4 GB each; they are bounded at 4,096 recent steps
    assert sizes == [4096, 50 + 4096]


def test_a_model_with_lazy_layers_trains_under_every_callback(tmp_path: Any, seed: int) -> None:
    # LazyLinear parameters have no shape until the first forward, which comes after fit start
    from lightwatch import ActivationStatsMonitor, DataQualityMonitor, MetricCheckpoint, MetricMonitor

    class LazyClassifier(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.LazyLinear(16), torch.nn.ReLU(), torch.nn.LazyLinear(3))

    callbacks = [GradientStatsMonitor(every_n_steps=5), ActivationStatsMonitor(every_n_steps=5),
                 DataQualityMonitor(scan_before_fit=4), MetricMonitor(every_n_steps=5),
                 MetricCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="train/loss", every_n_train_steps=5)]
    trainer = make_trainer(tmp_path, callbacks, max_steps=10, enable_checkpointing=True)
    trainer.fit(LazyClassifier(), make_loader(n=256))
    assert trainer.global_step == 10
    assert [a["rule"] for a in read_alerts(str(tmp_path)) if a["severity"] != "info"] == []
    events = read_events(str(tmp_path / "tb" / "version_0"))
    assert "monitor.grad/net.0.weight/norm" in events.Tags()["scalars"]
    assert list((tmp_path / "ckpt").glob("*.ckpt"))


def test_manual_optimization_with_two_optimizers_is_read_once_per_step(tmp_path: Any, seed: int) -> None:
    from lightwatch import ActivationStatsMonitor, DataQualityMonitor, MetricCheckpoint, MetricMonitor

    class TwoOptimizers(pl.LightningModule):
        """GAN-shaped: two parts, two optimizers, one manual backward, both stepped every batch."""

        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
            self.head = torch.nn.Linear(16, 3)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            optimizers = self.optimizers()
            loss = torch.nn.functional.cross_entropy(self.head(self.encoder(x)), y)
            for optimizer in optimizers:
                optimizer.zero_grad()
            self.manual_backward(loss)
            for optimizer in optimizers:
                optimizer.step()
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self) -> List[torch.optim.Optimizer]:
            return [torch.optim.SGD(self.encoder.parameters(), lr=0.1), torch.optim.SGD(self.head.parameters(), lr=0.1)]

    callbacks = [GradientStatsMonitor(every_n_steps=5), ActivationStatsMonitor(every_n_steps=5),
                 DataQualityMonitor(scan_before_fit=4), MetricMonitor(every_n_steps=5),
                 MetricCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="train/loss", every_n_train_steps=10)]
    trainer = make_trainer(tmp_path, callbacks, max_steps=40, enable_checkpointing=True)
    trainer.fit(TwoOptimizers(), make_loader(n=256))
    assert trainer.global_step == 40  # Lightning counts every optimizer step: 20 batches
    assert read_alerts(str(tmp_path)) == []
    events = read_events(str(tmp_path / "tb" / "version_0"))
    # one reading per batch (the logging step), not one per optimizer
    assert [e.step for e in events.Scalars("monitor.grad/encoder.0.weight/norm")] == [0, 4, 9, 14, 19]
    for part in ("encoder.0.weight", "head.weight"):  # both optimizers' updates are measured
        assert all(e.value > 1e-3 for e in events.Scalars(f"monitor.param/{part}/update_ratio"))
    assert list((tmp_path / "ckpt").glob("*.ckpt"))


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bfloat16_training_is_watched_without_false_alarms(tmp_path: Any, seed: int, precision: str) -> None:
    from lightwatch import ActivationStatsMonitor, DataQualityMonitor, MetricMonitor

    callbacks = [GradientStatsMonitor(every_n_steps=5), ActivationStatsMonitor(every_n_steps=5),
                 DataQualityMonitor(scan_before_fit=4), MetricMonitor(every_n_steps=5)]
    trainer = make_trainer(tmp_path, callbacks, max_steps=60, precision=precision)
    trainer.fit(Classifier(hidden=64, lr=0.2), make_loader(n=256))
    assert read_alerts(str(tmp_path)) == []
    events = read_events(str(tmp_path / "tb" / "version_0"))
    norms = [e.value for e in events.Scalars("monitor.grad/net.0.weight/norm")]
    assert len(norms) == 13 and all(0 < v < 10 for v in norms)  # step 0, then every 5 steps
    assert all(0 <= e.value < 0.6 for e in events.Scalars("monitor.act/net.1/dead_frac"))
