"""The per-step loss ring: losses kept between reads give the same blocks and scores as losses written at once,
and the CPU's host-number path gives the device path's scores."""
from __future__ import annotations

import math
import random
from typing import Any, List, Optional

import pytest
import torch

from lightwatch.core.loss_ring import LossRing
from lightwatch.metrics import cpu_shortcuts


def test_losses_kept_between_reads_give_the_same_scores_as_losses_written_each_step() -> None:
    g = torch.Generator().manual_seed(0)
    losses = (2.0 * torch.exp(-torch.arange(700) / 300.0) + 0.05 * torch.rand(700, generator=g)).tolist()
    losses[400] = 9.0  # a spike
    lazy, eager = LossRing(interval=10), LossRing(interval=10)
    for step, value in enumerate(losses):
        lazy.remember(torch.tensor(value))
        eager.remember(torch.tensor(value))
        eager.block()  # a read every step writes every loss into the ring at once
        if step % 10 == 9:
            a, b = lazy.scores(), eager.scores()
            for key in ("step_z", "shift_z", "regress"):
                assert (a[key] is None) == (b[key] is None)
                if a[key] is not None:
                    assert torch.allclose(torch.as_tensor(a[key]), torch.as_tensor(b[key]), equal_nan=True), (step, key)
            assert torch.allclose(torch.as_tensor(lazy.block()), torch.as_tensor(eager.block()))
            assert lazy.take_block() == eager.take_block()
    assert lazy.count == eager.count == 700


def test_a_long_interval_keeps_memory_bounded() -> None:
    ring = LossRing(interval=10 ** 9)  # a check that never comes: the kept losses go into the ring as it fills
    for _ in range(10_000):
        ring.remember(torch.tensor(1.0))
    assert len(ring._pending) < ring.ring.numel() == 50 + 4096


def _checks(losses: List[float], shortcuts: bool, interval: int = 10) -> List[Any]:
    ring = LossRing(interval=interval)
    out = []
    with cpu_shortcuts(shortcuts):
        for step, value in enumerate(losses):
            ring.remember(torch.tensor(value))
            if step % interval == interval - 1:
                scores, block = ring.scores(), ring.block()
                out.append(([None if scores[k] is None else float(scores[k]) for k in ("step_z", "shift_z", "regress")],
                            None if block is None else [float(block[0]), float(block[1])], ring.take_block()))
    return out


def _same(a: Optional[float], b: Optional[float]) -> bool:
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize("fault", ["none", "spike", "nan_steps", "shift", "inf_start", "constant"])
def test_the_cpu_host_path_gives_the_device_paths_scores(fault: str) -> None:
    """On the CPU the scores are computed from the ring read once (host numbers); the device path (run here
    with the CPU shortcuts off) must give the same scores, blocks and block sizes, NaN and Inf included."""
    rng = random.Random(0)
    losses = [2.0 * math.exp(-i / 150) + 0.05 * rng.random() for i in range(400)]
    if fault == "spike":
        losses[200] = 9.0
    elif fault == "nan_steps":
        losses[120:140] = [float("nan")] * 20
    elif fault == "shift":
        losses[250:] = [v + 1.0 for v in losses[250:]]
    elif fault == "inf_start":
        losses[:60] = [float("inf")] * 60
    elif fault == "constant":
        losses = [1.0] * 400
    host, device = _checks(losses, True), _checks(losses, False)
    assert len(host) == len(device) == 40
    for (h_scores, h_block, h_n), (d_scores, d_block, d_n) in zip(host, device):
        assert all(_same(a, b) for a, b in zip(h_scores, d_scores)), (h_scores, d_scores)
        assert h_n == d_n and (h_block is None) == (d_block is None)
        if h_block is not None:
            assert all(_same(a, b) for a, b in zip(h_block, d_block)), (h_block, d_block)
    if fault == "spike":  # the check after step 200 sees it, on both paths
        assert max(s[0][0] or 0.0 for s in host[20:21]) > 100
