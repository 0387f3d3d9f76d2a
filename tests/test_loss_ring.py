"""The per-step loss ring: losses kept between reads give the same blocks and scores as losses written at once."""
from __future__ import annotations

import torch

from lightwatch.core.loss_ring import LossRing


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
                    assert torch.allclose(a[key], b[key], equal_nan=True), (step, key)
            assert torch.allclose(lazy.block(), eager.block())
            assert lazy.take_block() == eager.take_block()
    assert lazy.count == eager.count == 700


def test_a_long_interval_keeps_memory_bounded() -> None:
    ring = LossRing(interval=10 ** 9)  # a check that never comes: the kept losses go into the ring as it fills
    for _ in range(10_000):
        ring.remember(torch.tensor(1.0))
    assert len(ring._pending) < ring.ring.numel() == 50 + 4096
