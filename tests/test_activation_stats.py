"""ActivationStatsMonitor in a real Trainer, checked against outputs captured independently."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from conftest import Classifier, make_loader, make_trainer, read_alerts, read_events, scalars
from lightwatch import ActivationStatsMonitor
from lightwatch.callbacks import activation_stats


@pytest.fixture(params=["stacked", "in the hook"])
def small_outputs(request: Any, monkeypatch: Any) -> str:
    """Both ways a small output is reduced: copied in its hook and reduced with the others of its shape (the
    default on the CPU), or reduced in its hook, as larger outputs are."""
    if request.param == "in the hook":
        monkeypatch.setattr(activation_stats, "_SMALL_OUTPUT", 0)
    return str(request.param)


class OutputRecorder(pl.Callback):
    """Captures every leaf module's output of the sampled steps with its own forward hooks."""

    def __init__(self, steps: List[int]) -> None:
        self.steps = steps
        self.outputs: Dict[int, Dict[str, torch.Tensor]] = {}
        self._step = -1

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for name, module in pl_module.named_modules():
            if name and not list(module.children()):
                module.register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self._step in self.steps and isinstance(output, torch.Tensor):
                self.outputs.setdefault(self._step, {})[name] = output.detach().clone()
        return hook

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self._step = trainer.fit_loop.epoch_loop._batches_that_stepped

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self._step = -1


def test_values_match_direct_computation(tmp_path: Any, seed: int, small_outputs: str) -> None:
    recorder = OutputRecorder(steps=[0, 4, 9])
    monitor = ActivationStatsMonitor(histogram_every_n_steps=10)
    trainer = make_trainer(tmp_path, [recorder, monitor], max_steps=10, log_every_n_steps=5)
    trainer.fit(Classifier(depth=2), make_loader())
    acc = read_events(trainer.log_dir)
    for step in (0, 4, 9):  # step 0: the initialised model, sampled before the first optimizer step
        for name, y in recorder.outputs[step].items():
            assert scalars(acc, f"monitor.act/{name}/mean")[step] == pytest.approx(y.mean().item(), abs=1e-6)
            assert scalars(acc, f"monitor.act/{name}/std")[step] == pytest.approx(y.std(unbiased=False).item(),
                                                                                 rel=1e-4)
            assert scalars(acc, f"monitor.act/{name}/absmax")[step] == pytest.approx(y.abs().max().item(), rel=1e-6)
            assert scalars(acc, f"monitor.act/{name}/zero_frac")[step] == pytest.approx((y == 0).float().mean().item())
            if isinstance(trainer.lightning_module.get_submodule(name), nn.ReLU):  # dead units: rectifiers only
                dead = (y == 0).all(dim=0).float().mean().item()
                assert scalars(acc, f"monitor.act/{name}/dead_frac")[step] == pytest.approx(dead)
            else:
                assert f"monitor.act/{name}/dead_frac" not in acc.Tags()["scalars"]
            assert scalars(acc, f"monitor.act/{name}/nonfinite")[step] == 0.0
    hist = acc.Histograms("monitor.act_hist/net.1")
    assert [h.step for h in hist] == [9]
    assert hist[0].histogram_value.num == recorder.outputs[9]["net.1"].numel()
    # Nothing is sampled during validation or on other steps.
    assert sorted(scalars(acc, "monitor.act/net.0/mean")) == [0, 4, 9]


class SharedAndHalf(Classifier):
    """One Linear applied twice per step (a shared layer) and a branch whose output is bfloat16."""

    def __init__(self) -> None:
        super().__init__(in_features=8, hidden=16, depth=1)
        self.shared = nn.Linear(8, 8)
        self.low = nn.Linear(8, 8).to(torch.bfloat16)
        self.calls: Dict[str, List[torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.shared(x)
        second = self.shared(torch.tanh(first))
        branch = self.low(x.to(torch.bfloat16)).float()
        for name, y in (("shared", first), ("shared", second), ("low", branch)):
            self.calls.setdefault(name, []).append(y.detach().clone())
        return self.net(second + branch)


def test_a_shared_layer_merges_its_calls_and_low_precision_outputs_are_read(tmp_path: Any, seed: int,
                                                                          small_outputs: str) -> None:
    model = SharedAndHalf()
    monitor = ActivationStatsMonitor(every_n_steps=3, histogram_every_n_steps=0, include=["shared", "low"])
    recorder = _StepCalls(model)
    trainer = make_trainer(tmp_path, [monitor, recorder], max_steps=6, log_every_n_steps=3)
    trainer.fit(model, make_loader())
    acc = read_events(trainer.log_dir)
    for step in (0, 2, 5):
        both = torch.cat([y.reshape(-1) for y in recorder.outputs[step]["shared"]])  # the two calls together
        assert scalars(acc, "monitor.act/shared/mean")[step] == pytest.approx(both.mean().item(), abs=1e-6)
        assert scalars(acc, "monitor.act/shared/std")[step] == pytest.approx(both.std(unbiased=False).item(), rel=1e-4)
        assert scalars(acc, "monitor.act/shared/absmax")[step] == pytest.approx(both.abs().max().item(), rel=1e-6)
        assert scalars(acc, "monitor.act/shared/zero_frac")[step] == 0.0
        (low,) = recorder.outputs[step]["low"]
        assert scalars(acc, "monitor.act/low/absmax")[step] == pytest.approx(low.abs().max().item(), rel=1e-6)
        assert scalars(acc, "monitor.act/low/mean")[step] == pytest.approx(low.mean().item(), abs=1e-5)


class _StepCalls(pl.Callback):
    """The outputs ``SharedAndHalf`` kept, by step."""

    def __init__(self, model: SharedAndHalf) -> None:
        self.model = model
        self.outputs: Dict[int, Dict[str, List[torch.Tensor]]] = {}

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self.model.calls = self.outputs[trainer.fit_loop.epoch_loop._batches_that_stepped] = {}


class InPlaceStack(Classifier):
    """Eight blocks; every second Linear's output is overwritten in place by ReLU(inplace=True)."""

    def __init__(self) -> None:
        super().__init__(in_features=8, hidden=16, depth=1)
        layers: List[nn.Module] = []
        for k in range(8):
            layers += [nn.Linear(16, 16), nn.ReLU(inplace=k % 2 == 0), nn.LayerNorm(16)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.blocks(self.net[1](self.net[0](x))))


def test_an_output_overwritten_in_place_later_reports_its_own_values(tmp_path: Any, seed: int,
                                                                     small_outputs: str) -> None:
    """A Linear whose output a ReLU(inplace=True) overwrites reports the output it returned, at every sampled
    step (the statistics are read when the module returns, not later)."""
    recorder = OutputRecorder(steps=[0, 2, 5, 8])
    monitor = ActivationStatsMonitor(every_n_steps=3, histogram_every_n_steps=0)
    trainer = make_trainer(tmp_path, [recorder, monitor], max_steps=10, log_every_n_steps=3)
    trainer.fit(InPlaceStack(), make_loader())
    acc = read_events(trainer.log_dir)
    checked = 0
    for step in (0, 2, 5, 8):
        for name, y in recorder.outputs[step].items():
            if isinstance(trainer.lightning_module.get_submodule(name), nn.ReLU):
                continue  # an in-place ReLU's output is its input's tensor: the recorder's clone is of the input
            assert scalars(acc, f"monitor.act/{name}/mean")[step] == pytest.approx(y.mean().item(), abs=1e-5), name
            assert scalars(acc, f"monitor.act/{name}/std")[step] == pytest.approx(y.std(unbiased=False).item(),
                                                                                 rel=1e-4), name
            assert scalars(acc, f"monitor.act/{name}/absmax")[step] == pytest.approx(y.abs().max().item(),
                                                                                    rel=1e-6), name
            assert scalars(acc, f"monitor.act/{name}/zero_frac")[step] == pytest.approx(
                (y == 0).float().mean().item()), name
            checked += 1
    assert checked >= 4 * 17


def test_dead_units_and_saturation(tmp_path: Any, seed: int) -> None:
    model = Classifier(depth=1, hidden=8, activation="relu")
    with torch.no_grad():  # units 0..3 can never fire: zero weights, negative bias
        model.net[0].weight[:4] = 0.0
        model.net[0].bias[:4] = -1.0
    tanh_model = Classifier(depth=1, hidden=8, activation="tanh")
    with torch.no_grad():
        tanh_model.net[0].weight.mul_(1000.0)
    for m, name in ((model, "relu"), (tanh_model, "tanh")):
        monitor = ActivationStatsMonitor(every_n_steps=2, histogram_every_n_steps=0)
        trainer = make_trainer(tmp_path / name, [monitor], max_steps=2, log_every_n_steps=2)
        trainer.fit(m, make_loader())
        acc = read_events(trainer.log_dir)
        if name == "relu":
            assert scalars(acc, "monitor.act/net.1/dead_frac")[1] == pytest.approx(0.5)
            assert "monitor.act/net.1/saturation" not in acc.Tags()["scalars"]
        else:
            assert scalars(acc, "monitor.act/net.1/saturation")[1] > 0.9


def test_first_nonfinite_module_in_forward_order_is_named(tmp_path: Any, seed: int, small_outputs: str) -> None:
    model = Classifier(depth=3)

    class PoisonWeights(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if trainer.fit_loop.epoch_loop._batches_that_stepped == 9:  # the sampled step: nothing upstream is NaN yet
                with torch.no_grad():
                    pl_module.net[2].weight[1, 1] = float("nan")

    monitor = ActivationStatsMonitor(nonfinite_action="log")
    trainer = make_trainer(tmp_path, [PoisonWeights(), monitor], max_steps=10, log_every_n_steps=5)
    trainer.fit(model, make_loader())
    alerts = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "act_nonfinite"]
    assert len(alerts) == 1
    assert alerts[0]["subject"] == "net.2" and alerts[0]["step"] == 9
    assert alerts[0]["value"] == 5.0  # net.2 .. net.6 all non-finite downstream
    acc = read_events(trainer.log_dir)
    assert scalars(acc, "monitor.act/net.0/nonfinite")[9] == 0.0
    assert scalars(acc, "monitor.act/net.2/nonfinite")[9] == 1.0


class Structured(pl.LightningModule):
    """Modules returning a tuple, a dict and a non-tensor, as real models do (LSTM, attention, HF)."""

    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> Any:
            return self.lin(x), "aux"

    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(8))

        def forward(self, x: torch.Tensor) -> Any:
            return {"mask": x > 0, "hidden": x * self.scale}

    class NoTensor(nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            return None

    def __init__(self) -> None:
        super().__init__()
        self.a = self.TupleOut()
        self.b = self.DictOut()
        self.c = self.NoTensor()
        self.head = nn.Linear(8, 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h, _ = self.a(x)
        h = self.b(h)["hidden"]
        self.c(h)
        return nn.functional.cross_entropy(self.head(h), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_tuple_and_dict_outputs_are_read_and_non_tensors_skipped(tmp_path: Any, seed: int) -> None:
    monitor = ActivationStatsMonitor(every_n_steps=1, exclude=[r"^a\.lin$"])
    trainer = make_trainer(tmp_path, [monitor], max_steps=3, log_every_n_steps=1)
    trainer.fit(Structured(), make_loader())
    tags = read_events(trainer.log_dir).Tags()["scalars"]
    assert "monitor.act/b/mean" in tags and "monitor.act/head/mean" in tags
    assert not any(t.startswith("monitor.act/c/") for t in tags)


def test_patterns_that_select_nothing_fail_clearly(tmp_path: Any) -> None:
    trainer = make_trainer(tmp_path, [ActivationStatsMonitor(module_types=["Conv2d"])], max_steps=2)
    with pytest.raises(ValueError, match=r"Conv2d.*select no modules.*net\.0"):
        trainer.fit(Classifier(), make_loader())


def test_hooks_do_nothing_outside_sampled_training_steps(tmp_path: Any, seed: int) -> None:
    monitor = ActivationStatsMonitor(every_n_steps=5)
    calls: List[int] = []
    original = monitor._sums.record
    monitor._sums.record = lambda *a, **k: (calls.append(1), original(*a, **k))  # count, then do the real work
    trainer = make_trainer(tmp_path, [monitor], max_steps=10, log_every_n_steps=5, limit_val_batches=2,
                           val_check_interval=5)
    trainer.fit(Classifier(depth=1), make_loader(), make_loader(n=32))
    assert len(calls) == 3 * 3  # steps 0, 4 and 9 x three leaf modules, none in validation


def test_hooks_work_under_torch_compile_without_recompiling_each_sample(tmp_path: Any, seed: int) -> None:
    import torch._dynamo

    class Compiled(Classifier):
        def configure_model(self) -> None:  # runs after the callbacks' setup registered their hooks
            self.net = torch.compile(self.net, backend="aot_eager")

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    trainer = make_trainer(tmp_path, [ActivationStatsMonitor(every_n_steps=5)], max_steps=30, log_every_n_steps=5)
    trainer.fit(Compiled(), make_loader(n=640))
    acc = read_events(trainer.log_dir)
    assert sorted(scalars(acc, "monitor.act/net.1/mean")) == [0, 4, 9, 14, 19, 24, 29]
    counters = torch._dynamo.utils.counters
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] <= 3  # gated off, gated on: not one graph per sampled step


def test_hooks_are_on_the_modules_only_during_sampled_steps_unless_compiled(tmp_path: Any, seed: int) -> None:
    from torch.nn.modules.module import _global_forward_hooks

    seen: List[Tuple[int, int]] = []

    class Probe(pl.Callback):  # after the monitor: sees the hooks as the forward pass saw them
        def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
            seen.append((len(pl_module.net[0]._forward_hooks), len(_global_forward_hooks)))

    monitor = ActivationStatsMonitor(every_n_steps=5)
    trainer = make_trainer(tmp_path, [monitor, Probe()], max_steps=10, log_every_n_steps=5)
    model = Classifier(depth=1)
    trainer.fit(model, make_loader())
    # one global hook during steps 0 (the initialised model), 4 and 9, the sampled ones; none on the modules
    assert seen == [(0, 1), (0, 0), (0, 0), (0, 0), (0, 1), (0, 0), (0, 0), (0, 0), (0, 0), (0, 1)]
    assert all(not m._forward_hooks for m in model.modules()) and not _global_forward_hooks  # none left behind
    assert sorted(scalars(read_events(trainer.log_dir), "monitor.act/net.0/mean")) == [0, 4, 9]


def test_zero_fraction_of_a_wide_output_sees_every_unit(tmp_path: Any, seed: int) -> None:
    """On an output larger than the zero count's sample (64 x 256 values), units dead in every other column
    are counted at their share: the sample's stride walks across the columns (a stride of 4 would read only
    the dead or only the live ones)."""
    model = Classifier(in_features=8, hidden=256, depth=1)
    with torch.no_grad():
        model.net[0].bias[::2] = -100.0  # even units never fire; odd units fire on about half the samples
    recorder = OutputRecorder(steps=[0, 3])
    monitor = ActivationStatsMonitor(every_n_steps=4, histogram_every_n_steps=0, module_types=["ReLU"])
    trainer = make_trainer(tmp_path, [recorder, monitor], max_steps=5, log_every_n_steps=4)
    trainer.fit(model, make_loader(n=256, batch_size=64))
    acc = read_events(trainer.log_dir)
    for step in (0, 3):
        y = recorder.outputs[step]["net.1"]
        assert y.numel() == 64 * 256
        exact = (y == 0).float().mean().item()
        assert 0.6 < exact < 0.9
        assert scalars(acc, "monitor.act/net.1/zero_frac")[step] == pytest.approx(exact, abs=0.03)
        assert scalars(acc, "monitor.act/net.1/dead_frac")[step] == pytest.approx(
            (y == 0).all(dim=0).float().mean().item())
