"""The fresh-uniform-initialisation test behind ``frozen_at_init``: fresh inits pass, trained or normal ones fail."""
from __future__ import annotations

from typing import Callable, List

import pytest
import torch
from torch import nn

from lightwatch.core.init_signature import (MIN_ELEMENTS, SAMPLE_MAX, copies, fingerprints, reads_as_uniform_init,
                                            uniform_init_evidence, uniform_init_votes)
from lightwatch.core.reduce import agree_max


def fresh(t: torch.Tensor) -> bool:
    return reads_as_uniform_init(uniform_init_evidence(t).tolist())


UNIFORM_INITS: List[Callable[[], torch.Tensor]] = [
    lambda: nn.Linear(64, 64).weight,
    lambda: nn.Linear(512, 256).weight,
    lambda: nn.Conv2d(16, 32, 3).weight,
    lambda: nn.GRU(16, 64).weight_hh_l0,
    lambda: nn.LSTM(32, 32).weight_ih_l0,
    lambda: nn.init.xavier_uniform_(torch.empty(128, 64)),
    lambda: nn.init.kaiming_uniform_(torch.empty(128, 64), nonlinearity="relu"),
    lambda: nn.Linear(256, 256).weight.to(torch.bfloat16),
]


@pytest.mark.parametrize("make", UNIFORM_INITS)
def test_fresh_uniform_initialisations_read_as_fresh(make: Callable[[], torch.Tensor]) -> None:
    for seed in range(20):
        torch.manual_seed(seed)
        assert fresh(make()), seed


@pytest.mark.parametrize("make", [
    lambda: torch.randn(128, 64),
    lambda: nn.init.trunc_normal_(torch.empty(128, 64), std=0.02),
    lambda: nn.init.orthogonal_(torch.empty(128, 64)),
    lambda: nn.Embedding(1000, 16).weight,
    lambda: torch.zeros(128, 64),
    lambda: torch.ones(128, 64),
    lambda: nn.Linear(64, 64).weight + 0.5,  # not centred
])
def test_normal_constant_or_shifted_tensors_do_not(make: Callable[[], torch.Tensor]) -> None:
    torch.manual_seed(0)
    assert not fresh(make())


def test_training_smears_the_sharp_edge_of_a_uniform_initialisation() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    x = torch.randn(512, 64)
    target = x @ torch.randn(64, 64) * 0.1
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    readings = []
    for step in range(20):
        optimizer.zero_grad()
        nn.functional.mse_loss(layer(x), target).backward()
        optimizer.step()
        readings.append(fresh(layer.weight))
    assert readings[-1] is False and not any(readings[10:])
    ks, edge, _, _ = uniform_init_evidence(layer.weight).tolist()
    assert ks > 5 and edge < 8


def test_large_tensors_are_read_through_a_bounded_sample() -> None:
    torch.manual_seed(0)
    big = torch.empty(3000, 1000).uniform_(-0.02, 0.02)
    evidence = uniform_init_evidence(big).tolist()
    assert evidence[3] <= SAMPLE_MAX and reads_as_uniform_init(evidence)


def test_votes_abstain_on_small_tensors_and_agree_across_shards() -> None:
    torch.manual_seed(0)
    weight = nn.Linear(128, 64).weight.detach()
    small = torch.empty(MIN_ELEMENTS - 1).uniform_(-1, 1)
    votes = uniform_init_votes([weight, small, torch.randn(64, 64), torch.zeros(0)], torch.device("cpu"))
    assert votes.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]  # objections, then votes for "fresh"
    # two ranks, each holding half of every tensor: the element-wise MAX the monitor takes under FSDP
    halves = [weight[:32], weight[32:]]
    trained = torch.cat([weight[:32], torch.randn(32, 128) * 0.05])
    shards = [[halves[r], trained[32 * r:32 * (r + 1)], small[:10]] for r in range(2)]
    agreed = torch.stack([uniform_init_votes(s, torch.device("cpu")) for s in shards]).amax(0)
    assert agreed.tolist() == [[0, 1, 0], [1, 1, 0]]  # fresh; one rank objects -> not fresh; abstained
    flags = uniform_init_votes(shards[0], torch.device("cpu"))
    assert torch.equal(agree_max(flags.view(-1)).view(2, -1), flags)  # one process: the MAX is the identity


def test_copies_are_found_by_fingerprint_whatever_the_sharding() -> None:
    torch.manual_seed(0)
    online, other = nn.Linear(64, 64).weight.detach(), nn.Linear(64, 64).weight.detach()
    target = online.clone()
    cpu = torch.device("cpu")
    rows = fingerprints([target, online, other, nn.Linear(32, 128).weight], cpu).tolist()
    assert copies(rows[:1], rows[1:]) == [True]
    assert copies(rows[2:3], [rows[0], rows[3]]) == [False]  # same size, independent draw
    # two ranks holding different pieces of each tensor: the SUM over ranks is the whole tensor's fingerprint
    flat_t, flat_o = target.reshape(-1), online.reshape(-1)
    rank0 = fingerprints([flat_t[:1000], flat_o[:3000]], cpu)
    rank1 = fingerprints([flat_t[1000:], flat_o[3000:]], cpu)
    summed = (rank0 + rank1).tolist()
    assert copies(summed[:1], summed[1:]) == [True]
    assert summed[0] == pytest.approx(rows[0], rel=1e-12)
    small_change = target.clone()
    small_change[0, 0] += 1e-3  # a copy that has moved is no longer a copy
    assert copies(fingerprints([small_change], cpu).tolist(), rows[1:2]) == [False]


def test_small_weights_are_judged_against_the_init_bound_of_their_shape() -> None:
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 16, 3)  # 144 values: too few for the edge test, judged against 1/sqrt(fan_in) = 1/3
    fresh_votes = uniform_init_votes([conv.weight, nn.Linear(8, 16).weight], cpu)
    assert fresh_votes.tolist() == [[0, 0], [1, 1]]
    # the same values at another scale: uniform, but not at any init bound of the shape (a trained layer's scale)
    rescaled = conv.weight.detach() * 1.7
    assert uniform_init_votes([rescaled], cpu).tolist() == [[1], [0]]
    # trained for 20 steps: no longer fresh
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.5)
    x, target = torch.randn(32, 1, 8, 8), torch.randn(32, 16, 6, 6)
    for _ in range(20):
        optimizer.zero_grad()
        nn.functional.mse_loss(conv(x), target).backward()
        optimizer.step()
    assert uniform_init_votes([conv.weight], cpu).tolist() == [[1], [0]]
    # a bias (its fan-in is not in its shape) and a weight of fewer than 64 values abstain
    assert uniform_init_votes([nn.Linear(64, 128).bias, nn.Linear(4, 8).weight], cpu).tolist() == [[0, 0], [0, 0]]
