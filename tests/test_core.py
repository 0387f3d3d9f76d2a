"""The shared machinery on its own: alerts, cooldown, actions, selection, histograms, the writer."""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from conftest import Classifier, make_loader, make_trainer, read_events, scalars
from lightwatch import Alert, GradientStatsMonitor, MonitorError
from lightwatch.core import AlertCooldown, Selection, registered_actions, top_k_subjects
from lightwatch.core.actions import check_action
from lightwatch.core.histogram import decode_histogram_row, histogram_row


def test_alert_record_has_the_contract_keys_and_strict_json() -> None:
    alert = Alert("MetricMonitor", "loss_nan", "critical", "loss is NaN", subject="train/loss",
                  value=float("nan"), threshold=1.0, action="stop", step=7, epoch=1)
    record = alert.to_record()
    assert list(record) == ["time", "step", "epoch", "source", "rule", "severity", "subject", "value", "threshold",
                            "action", "message"]
    assert record["value"] is None and record["threshold"] == 1.0
    json.dumps(record, allow_nan=False)  # strict JSON: readable by jq and every other parser
    assert record["time"].endswith("+00:00")
    err = MonitorError(alert)
    assert "loss_nan" in str(err) and "train/loss" in str(err) and "step 7" in str(err)


def test_cooldown_limits_records_and_reports_what_it_suppressed() -> None:
    c = AlertCooldown(steps=10)
    got = [c.allow("r", "fc", s) for s in (0, 3, 6, 10, 25)]
    assert got == [(True, 0), (False, 0), (False, 0), (True, 2), (True, 0)]
    assert c.allow("r", "other", 11) == (True, 0)  # per subject
    restored = AlertCooldown(10)
    restored.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert restored.allow("r", "fc", 26) == (False, 0)


def test_unknown_action_and_severity_are_named() -> None:
    assert {"log", "warn", "stop", "raise"} <= set(registered_actions())
    with pytest.raises(ValueError, match=r"my_rule.*unknown action 'halt'.*stop"):
        check_action("halt", "my_rule")
    with pytest.raises(ValueError, match=r"nonfinite_severity.*'fatal'.*critical"):
        GradientStatsMonitor(nonfinite_severity="fatal")


def test_selection_by_regex_and_type() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3), nn.Tanh()), nn.Linear(3, 1))
    assert [n for n, _ in Selection(exclude=[r"bias$"]).parameters(model)] == ["0.weight", "2.0.weight", "3.weight"]
    assert [n for n, _ in Selection(module_types=[nn.Linear]).modules(model)] == ["0", "2.0", "3"]
    assert [n for n, _ in Selection(module_types=["torch.nn.modules.activation.Tanh"]).modules(model)] == ["2.1"]
    assert [n for n, _ in Selection(module_types=["Linear"], include=["^2"]).parameters(model)] == [
        "2.0.weight", "2.0.bias"]
    with pytest.raises(ValueError, match=r"nothing_here.*Available modules: 0, 1, 2.0"):
        Selection(include=["nothing_here"], where="X").modules(model)
    assert top_k_subjects(["a", "b", "c", "d"], [1.0, float("nan"), 5.0, 2.0], k=2) == ["b", "c"]


def test_histogram_row_matches_numpy_and_counts_nonfinite() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g)
    x[:5] = float("nan")
    x[5] = float("inf")
    h = decode_histogram_row(histogram_row(x, bins=16).tolist())
    finite = x[torch.isfinite(x)].numpy()
    counts, _ = np.histogram(finite, bins=16, range=(finite.min(), finite.max()))
    assert h.nonfinite == 6 and h.num == finite.size == sum(h.counts)
    assert np.abs(np.array(h.counts) - counts).sum() <= 2  # float edge rounding may move a value by one bucket
    assert h.min == pytest.approx(finite.min()) and h.max == pytest.approx(finite.max())
    assert h.sum == pytest.approx(finite.sum(), rel=1e-4)
    big = decode_histogram_row(histogram_row(torch.randn(200_000, generator=g), max_values=65536).tolist())
    assert big.num <= 65536  # strided sample, not the whole tensor


def test_scalars_reach_every_logger_once_per_logged_step(tmp_path: Any, seed: int) -> None:
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0, prefix="exp")
    csv = CSVLogger(str(tmp_path), name="csv", version=0)
    monitor = GradientStatsMonitor(every_n_steps=5, prefix="watch", check_first_step=False)
    trainer = make_trainer(tmp_path, [monitor], max_steps=10, log_every_n_steps=5, logger=[tb, csv])
    trainer.fit(Classifier(), make_loader())
    assert monitor.writer.scalar_writes == 2
    acc = read_events(tb.log_dir)
    assert sorted(scalars(acc, "exp-watch.grad/_total/norm")) == [4, 9]  # the logger's own prefix is honoured
    lines = open(f"{csv.log_dir}/metrics.csv").read().splitlines()
    header = lines[0].split(",")
    assert "watch.grad/_total/norm" in header
    column = header.index("watch.grad/_total/norm")
    steps = [int(row.split(",")[header.index("step")]) for row in lines[1:] if row.split(",")[column]]
    assert steps == [4, 9]


def test_shape_plan_matches_each_tensor_reduced_alone() -> None:
    """Norms and largest magnitudes from stacks by shape equal the per-tensor values: many small tensors of
    one shape (more than one stack), large ones, bfloat16, an empty tensor, and a NaN that must propagate."""
    from lightwatch.core.gradient_reader import ShapePlan

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(64, 64, generator=g) for _ in range(70)]  # 70 x 4,096 values: two stacks
    tensors += [torch.randn(64, generator=g) for _ in range(5)]
    tensors += [torch.randn(300, 300, generator=g), torch.randn(128, 128, generator=g).to(torch.bfloat16)]
    tensors += [torch.randn(300, 300, generator=g).to(torch.bfloat16), torch.empty(0), torch.randn(64, 64, generator=g)]
    tensors[-1][3, 7] = float("nan")
    norms, absmax = ShapePlan(tensors).reduce(tensors, with_absmax=True)
    assert absmax is not None
    for j, t in enumerate(tensors):
        expected_norm = torch.linalg.vector_norm(t.float()).item() if t.numel() else 0.0
        expected_max = t.float().abs().max().item() if t.numel() else 0.0
        if j == len(tensors) - 1:
            assert math.isnan(norms[j].item()) and math.isnan(absmax[j].item())
            continue
        assert norms[j].item() == pytest.approx(expected_norm, rel=1e-5), j
        assert absmax[j].item() == pytest.approx(expected_max, rel=1e-6), j
    # without absmax, the same norms
    assert torch.equal(ShapePlan(tensors).reduce(tensors)[0][:-1], norms[:-1])


class _Sharded(torch.Tensor):
    """A tensor subclass with ``to_local``, as a DTensor has: its local shard is its first half."""

    def to_local(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)[: self.shape[0] // 2]


def test_local_tensors_keeps_plain_lists_and_takes_shards_of_the_others():
    from lightwatch.core.runtime import local_tensor, local_tensors

    plain = [torch.zeros(4), torch.nn.Parameter(torch.ones(2))]
    assert local_tensors(plain) is plain  # no new list, no call per tensor
    mixed = [torch.zeros(4), torch.arange(6.0).as_subclass(_Sharded)]
    out = local_tensors(mixed)
    assert out is not mixed and out[0] is mixed[0]
    assert out[1].tolist() == [0.0, 1.0, 2.0] == local_tensor(mixed[1]).tolist()
