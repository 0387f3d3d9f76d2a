"""The update ratio ‖Δw‖/‖w‖ from a bounded snapshot of the weights: its error against the full copy, and the
memory it holds."""
from __future__ import annotations

from typing import Any, Callable, List

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from conftest import Classifier, make_loader, make_trainer
from lightwatch import GradientStatsMonitor
from lightwatch.core.gradient_reader import WeightSnapshot


def _models() -> List[Callable[[], nn.Module]]:
    return [
        lambda: nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)),
        lambda: nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.LazyLinear(10)),
        lambda: nn.Sequential(nn.Embedding(2000, 64), nn.Flatten(), nn.Linear(64 * 8, 10)),
    ]


def _inputs(i: int, g: torch.Generator) -> torch.Tensor:
    if i == 0:
        return torch.randn(32, 64, generator=g)
    if i == 1:
        return torch.randn(8, 3, 12, 12, generator=g)
    return torch.randint(0, 2000, (32, 8), generator=g)


@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize("model_index", [0, 1, 2])
def test_sampled_ratio_is_within_a_few_percent_of_the_full_copy(opt: str, model_index: int) -> None:
    torch.manual_seed(model_index)
    g = torch.Generator().manual_seed(1)
    model = _models()[model_index]()
    model(_inputs(model_index, g))  # materialise lazy modules
    params = [p for p in model.parameters() if p.dim() > 1]
    optimizer = (torch.optim.Adam(model.parameters(), lr=1e-3) if opt == "adam"
                 else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    sampled, exact = WeightSnapshot(), WeightSnapshot(fraction=1.0)
    errors: List[float] = []
    for step in range(12):
        out = model(_inputs(model_index, g))
        loss = nn.functional.cross_entropy(out, torch.randint(0, 10, (out.shape[0],), generator=g))
        optimizer.zero_grad()
        loss.backward()
        sampled.take(params)
        exact.take(params)
        optimizer.step()
        est_before, est_delta = sampled.norms_sq(params)
        true_before, true_delta = exact.norms_sq(params)
        ratio_est, ratio_true = (est_delta / est_before).sqrt(), (true_delta / true_before).sqrt()
        if step >= 2:  # after the first steps, whose Adam updates are uniform in size
            errors += ((ratio_est - ratio_true).abs() / ratio_true).tolist()
        # the scaled squared norms estimate the whole tensors' sums
        assert torch.allclose(est_before, true_before, rtol=0.2)
    assert max(errors) < 0.1, f"largest relative error {max(errors):.3f}"
    assert sorted(errors)[len(errors) // 2] < 0.03
    assert sampled.kept_elements <= _bound(params)


def _bound(params: List[torch.Tensor]) -> float:
    """What a snapshot may hold: small tensors whole, at most about twice max(1,024, 1%) of a larger one."""
    return sum(min(p.numel(), 2 * max(1024, 0.01 * p.numel())) for p in params)


def test_small_tensors_are_copied_whole_and_exact() -> None:
    w = nn.Parameter(torch.randn(30, 30))
    snap = WeightSnapshot()
    snap.take([w])
    assert snap.kept_elements == 900
    with torch.no_grad():
        w.add_(0.5)
    before_sq, delta_sq = snap.norms_sq([w])
    assert float(delta_sq) == pytest.approx(0.25 * 900, rel=1e-5)
    with pytest.raises(RuntimeError, match="take"):
        snap.norms_sq([w])


@pytest.mark.parametrize("fraction, minimum", [(0.0, 10), (1.5, 10), (0.5, 0)])
def test_bad_arguments_are_named(fraction: float, minimum: int) -> None:
    with pytest.raises(ValueError, match="WeightSnapshot"):
        WeightSnapshot(fraction=fraction, min_elements=minimum)


class _Wide(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 4))


class _Kept(pl.Callback):
    """Reads how many elements the monitor's snapshot holds while it holds them (between the hooks)."""

    def __init__(self, monitor: Any) -> None:
        self.monitor, self.kept = monitor, []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        snapshot = self.monitor._snapshot
        if snapshot.pending:
            self.kept.append(snapshot.kept_elements)


def test_monitor_holds_about_one_percent_of_the_watched_weights(tmp_path: Any) -> None:
    pl.seed_everything(0)
    monitor = GradientStatsMonitor(every_n_steps=2)
    reader = _Kept(monitor)
    trainer = make_trainer(tmp_path, [monitor, reader], max_steps=6)
    model = _Wide()
    trainer.fit(model, make_loader(n=96, in_features=16, classes=4, batch_size=16))
    watched = sum(p.numel() for p in monitor._params)
    assert reader.kept and max(reader.kept) <= _bound(monitor._params)
    assert max(reader.kept) < 0.2 * watched  # a full copy would be all of it
    ratios = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("/update_ratio")}
    assert ratios and all(0 < r < 1 for r in ratios.values())


def test_weights_in_another_memory_layout_are_read_where_they_live() -> None:
    """A ``channels_last`` weight is sampled in its own layout, a weight whose elements are not one dense block of
    memory is copied whole: both see the optimizer's in-place update (a flat copy of either would not)."""
    conv = nn.Parameter(torch.randn(64, 32, 3, 3).to(memory_format=torch.channels_last))
    base = torch.randn(64, 64)
    strided = base.t()[:, :40]  # a view that is neither contiguous nor dense
    snap = WeightSnapshot()
    snap.take([conv, strided])
    assert snap.kept_elements < conv.numel() + strided.numel()
    with torch.no_grad():
        conv.mul_(1.01)
        base.mul_(1.02)  # moves the strided view's elements too
    before_sq, delta_sq = snap.norms_sq([conv, strided])
    assert (delta_sq / before_sq).sqrt().tolist() == pytest.approx([0.01, 0.02], rel=1e-4)


class _ChannelsLastConv(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).relu().mean((2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class _TrueConvRatio(pl.Callback):
    """The conv layer's update ratio from a full copy of its parameters, on the steps the monitor samples."""

    def __init__(self) -> None:
        self.before: List[torch.Tensor] = []
        self.ratios: List[float] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.before = [p.detach().clone() for p in pl_module.conv.parameters()]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        now = list(pl_module.conv.parameters())
        delta = sum(float((p.detach() - b).square().sum()) for p, b in zip(now, self.before))
        before = sum(float(b.square().sum()) for b in self.before)
        self.ratios.append((delta / before) ** 0.5)


def test_monitor_reads_the_update_of_channels_last_weights(tmp_path: Any) -> None:
    pl.seed_everything(0)
    model = _ChannelsLastConv().to(memory_format=torch.channels_last)
    assert not model.conv.weight.is_contiguous()
    monitor = GradientStatsMonitor(every_n_steps=4, group_by="module")
    truth = _TrueConvRatio()
    trainer = make_trainer(tmp_path, [monitor, truth], max_steps=4, log_every_n_steps=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 10, 10, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randint(0, 4, (64,), generator=g)),
                                         batch_size=16)
    trainer.fit(model, loader)
    logged = float(trainer.callback_metrics["monitor.param/conv/update_ratio"])
    assert logged == pytest.approx(truth.ratios[3], rel=0.1)  # the last step was sampled
