"""Is a weight tensor still a fresh uniform random initialisation? A statistical test, for frozen layers.

PyTorch's default initialisations of ``Linear``, ``Conv*``, ``RNN``/``GRU``/``LSTM`` and of biases, and
``xavier_uniform_`` / ``kaiming_uniform_``, all draw every element independently from ``U(-b, b)``. Such a
tensor has two properties that training destroys within a few steps:

- ``|w|`` is uniform on ``[0, b]``: a Kolmogorov-Smirnov distance from ``U(0, max|w|)`` of order ``1/sqrt(n)``;
- the edge at ``b`` is sharp: about 30 of ``n`` values lie within ``30/n`` of the maximum, where the smeared
  tail of a trained tensor leaves one or two.

Pretrained weights are neither (they are bell-shaped or heavy-tailed), so a frozen layer that passes both
tests is a fixed random projection: frozen by mistake, or frozen before its pretrained weights were loaded.
Normal initialisations (``nn.Embedding``, ``trunc_normal_``, ``orthogonal_``) cannot be told from trained
weights this way and are never named.

A frozen *copy* of a trainable tensor is fresh by design, not by mistake: the target network of DQN, the
momentum encoder of MoCo and BYOL, a mean teacher, all start as copies of the network they follow.
:func:`fingerprints` and :func:`copies` find them (sums of ``w``, ``w^2`` and ``|w|``, and the size, equal to
one part in 10^5), so they can be left out.

Tensors of fewer than 1,024 values (a first convolution over RGB: 16 x 3 x 3 x 3 = 432 values) carry too
few values for the edge test, but their shape says where a fresh draw's edge must be: PyTorch's default
initialisation of ``Linear``/``Conv*`` draws from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, ``xavier_uniform_``
from ``sqrt(6 / (fan_in + fan_out))``, ``kaiming_uniform_`` from ``sqrt(6 / fan_in)``, recurrent layers from
``1/sqrt(hidden)``. A weight of at least 64 values (two or more dimensions) reads as fresh when it passes the
KS and mean tests and its largest magnitude lies within ``7/k`` below one of these bounds (and not above it):
a fresh draw misses that window with probability ``exp(-7)``, and a pretrained tensor lands in it only by
coincidence of its scale with its shape's init bound to a few percent.

Thresholds, measured by ``bench/init_signature.py``: over 1,800 freshly initialised tensors (Linear, Conv2d,
GRU, LSTM, xavier and kaiming uniform), ``KS * sqrt(k)`` was at most 2.00 and the edge count at least 16; the
weight tensors of at least 1,024 values of the fault suite's five healthy base models (20 seeds) no longer
read as fresh after 5 optimizer steps, and after 20 steps read ``KS * sqrt(k) >= 7.3`` and an edge count of
at most 6 (after 100 steps: >= 14 and <= 2).
Weights of 64 to 1,023 values (Conv2d(1|3, 16, 3), Conv1d(4, 8, 5), Linear(8, 16), small GRU/LSTM, xavier and
kaiming uniform; 2,700 tensors) read as fresh in 2,694 cases; the same models' weights of that size read as
fresh in none after 20 optimizer steps (2 of 12 after 5 steps).
"""
from __future__ import annotations

import math
from typing import Any, List, Sequence

import torch
from torch.nn.parameter import is_lazy

__all__ = ["MIN_ELEMENTS", "SMALL_MIN_ELEMENTS", "copies", "fingerprints", "init_bounds", "reads_as_uniform_init",
           "uniform_init_evidence", "uniform_init_votes"]

# Smaller tensors are never judged: too few values to tell a fresh initialisation from a lightly trained one.
MIN_ELEMENTS = 1024
# Weights of SMALL_MIN_ELEMENTS..MIN_ELEMENTS values are judged against the init bounds of their shape instead of
# the edge count; smaller ones never.
SMALL_MIN_ELEMENTS = 64
# Fresh small tensor: max|w| within BOUND_WINDOW / k below a bound of its shape (a fresh draw misses: ~e^-7).
BOUND_WINDOW = 7.0
# ... and not above it by more than float rounding.
BOUND_ROUNDING = 1e-4
# The test reads an evenly strided sample of at most this many values: bounded cost on any tensor.
SAMPLE_MAX = 65536
# Fresh: KS distance * sqrt(k) at most this (a fresh tensor exceeds 2.5 with probability ~1e-5).
KS_SCALED_MAX = 2.5
# Fresh: at least EDGE_MIN of the k values within EDGE_WINDOW / k of the maximum (Poisson(30) <= 7: ~1e-6).
EDGE_WINDOW = 30.0
EDGE_MIN = 8
# Fresh: the mean within this many standard errors of zero (a uniform init is centred).
MEAN_Z_MAX = 5.0


def uniform_init_evidence(tensor: torch.Tensor) -> torch.Tensor:
    """``[KS * sqrt(k), edge count, |mean| / standard error, k]`` of one tensor, as a float32 vector on its device.

    Reads a strided sample of at most ``SAMPLE_MAX`` values; makes no host sync (the caller reads many rows
    at once). A tensor of all zeros reads ``inf`` for the KS term.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> fresh = uniform_init_evidence(torch.nn.Linear(64, 64).weight)
        >>> reads_as_uniform_init(fresh.tolist())
        True
        >>> reads_as_uniform_init(uniform_init_evidence(torch.randn(64, 64)).tolist())
        False
    """
    flat = tensor.detach().reshape(-1)
    stride = max(1, math.ceil(flat.numel() / SAMPLE_MAX))
    sample = flat[::stride].float()
    k = sample.numel()
    if k == 0:
        return torch.tensor([math.inf, 0.0, math.inf, 0.0], device=tensor.device)
    magnitude = sample.abs()
    top = magnitude.max()
    scaled = (magnitude / top).sort().values  # 0/0 = nan for an all-zero tensor: mapped to inf below
    rank = torch.arange(1, k + 1, device=sample.device, dtype=torch.float32)
    ks = torch.maximum(rank / k - scaled, scaled - (rank - 1) / k).max() * math.sqrt(k)
    ks = torch.where(top > 0, ks, torch.full_like(ks, math.inf))
    edge = (magnitude >= top * (1.0 - EDGE_WINDOW / k)).sum().float()
    mean_z = sample.mean().abs() / (top / math.sqrt(3.0 * k))
    mean_z = torch.where(top > 0, mean_z, torch.full_like(mean_z, math.inf))
    return torch.stack([ks, edge, mean_z, torch.tensor(float(k), device=sample.device)])


def init_bounds(shape: Sequence[int]) -> List[float]:
    """The bounds ``b`` of the uniform initialisations a weight of this shape may have been drawn from.

    PyTorch's default ``Linear``/``Conv*`` init (``1/sqrt(fan_in)``, also ``fan_out``), ``xavier_uniform_``,
    ``kaiming_uniform_`` for ReLU (``sqrt(6/fan)``), and recurrent layers (``1/sqrt(hidden)`` with 1, 3 or 4
    gates stacked along the first dimension). Empty for fewer than two dimensions (a bias's fan-in is not in
    its shape).

    Example:
        >>> [round(b, 4) for b in init_bounds((16, 1, 3, 3))][:2]
        [0.3333, 0.0833]
    """
    if len(shape) < 2 or any(d <= 0 for d in shape):
        return []
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    bounds = [1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_out), math.sqrt(6.0 / (fan_in + fan_out)),
              math.sqrt(6.0 / fan_in), math.sqrt(6.0 / fan_out)]
    bounds += [1.0 / math.sqrt(shape[0] // gates) for gates in (3, 4) if len(shape) == 2 and shape[0] % gates == 0]
    return bounds


def _matches_a_bound(top: torch.Tensor, bounds: Sequence[float], k: int) -> torch.Tensor:
    """Whether ``top`` (max |w|, a device scalar) lies just below one of ``bounds``; no host sync."""
    hit = torch.zeros((), dtype=torch.bool, device=top.device)
    for b in bounds:
        hit = hit | ((top <= b * (1.0 + BOUND_ROUNDING)) & (top >= b * (1.0 - BOUND_WINDOW / k)))
    return hit


def _passes(ks: Any, edge: Any, mean_z: Any) -> Any:
    """The three thresholds, on host floats or device scalars alike."""
    return (ks <= KS_SCALED_MAX) & (edge >= EDGE_MIN) & (mean_z <= MEAN_Z_MAX)


def reads_as_uniform_init(evidence: Sequence[float]) -> bool:
    """Whether one row of :func:`uniform_init_evidence`, read to the host, says "fresh uniform initialisation"."""
    ks, edge, mean_z, k = (float(v) for v in evidence[:4])
    return bool(k >= MIN_ELEMENTS and _passes(ks, edge, mean_z))


def uniform_init_votes(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per tensor, an objection and a vote for "fresh uniform initialisation", as ``[2, len(tensors)]`` on ``device``.

    Row 0 is 1 where the tensor (or this rank's shard of it) is judged and fails the test; row 1 is 1 where it
    passes. Tensors of at least ``MIN_ELEMENTS`` values take the KS, edge and mean tests; weights of at least
    ``SMALL_MIN_ELEMENTS`` values with two or more dimensions take the KS and mean tests and the bound of their
    shape (:func:`init_bounds`). Others abstain (0 in both rows). Under a sharded
    strategy the caller takes the element-wise MAX over ranks: a tensor reads as fresh when some rank's shard
    passed and no rank's shard failed. No host sync.
    """
    votes = torch.zeros(2, len(tensors), device=device)
    for i, t in enumerate(tensors):
        if is_lazy(t) or not t.is_floating_point() or t.device.type == "meta":
            continue
        bounds = init_bounds(tuple(t.shape)) if t.numel() < MIN_ELEMENTS else []
        if t.numel() < MIN_ELEMENTS and (t.numel() < SMALL_MIN_ELEMENTS or not bounds):
            continue
        ks, edge, mean_z, _ = uniform_init_evidence(t).to(device)
        if bounds:
            top = t.detach().abs().max().float().to(device)
            fresh = (ks <= KS_SCALED_MAX) & (mean_z <= MEAN_Z_MAX) & _matches_a_bound(top, bounds, t.numel())
        else:
            fresh = _passes(ks, edge, mean_z)
        votes[0, i] = (~fresh).float()
        votes[1, i] = fresh.float()
    return votes


# Two tensors whose fingerprints agree to this relative difference are copies; two independent draws of the same
# init differ by about 1/sqrt(n) in their sum of squares (1.6% at n = 4,096), far above it.
COPY_TOLERANCE = 1e-5


def fingerprints(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``[sum w, sum w^2, sum |w|, numel]`` per tensor, float64, ``[len(tensors), 4]`` on ``device``; no host sync.

    Sums over shards add up to the whole tensor's, so under a sharded strategy a SUM over ranks gives each
    tensor's fingerprint whatever the sharding. A lazy parameter (no values yet) reads ``numel = -1``.
    """
    rows = torch.zeros(len(tensors), 4, dtype=torch.float64, device=device)
    for i, t in enumerate(tensors):
        if is_lazy(t) or t.device.type == "meta" or not t.is_floating_point():
            rows[i, 3] = -1.0
            continue
        w = t.detach().reshape(-1)  # reductions accumulate in float64 without a float64 copy of the tensor
        rows[i, 0] = w.sum(dtype=torch.float64).to(device)
        rows[i, 1] = torch.linalg.vector_norm(w, 2, dtype=torch.float64).square().to(device)
        rows[i, 2] = torch.linalg.vector_norm(w, 1, dtype=torch.float64).to(device)
        rows[i, 3] = float(w.numel())
    return rows


def copies(candidates: Sequence[Sequence[float]], others: Sequence[Sequence[float]]) -> List[bool]:
    """For each candidate fingerprint, whether one of ``others`` (read to the host) is the same tensor's.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(64, 64).weight, torch.nn.Linear(64, 64).weight
        >>> rows = fingerprints([a, a.detach().clone(), b], torch.device("cpu")).tolist()
        >>> copies(rows[:1], rows[1:2]), copies(rows[:1], rows[2:])
        ([True], [False])
    """
    def same(x: Sequence[float], y: Sequence[float]) -> bool:
        if x[3] != y[3] or x[3] <= 0:
            return False
        return all(abs(u - v) <= COPY_TOLERANCE * max(abs(u), abs(v), 1e-30) for u, v in zip(x[:3], y[:3]))

    return [any(same(c, o) for o in others) for c in candidates]
