"""Tests of lightwatch.metrics against direct numpy computations, on real random data (no mocks)."""
from __future__ import annotations

import doctest
import importlib
import itertools
import json
import math
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from lightwatch.metrics import (
    CardinalitySketch,
    Histogram,
    LabelCounts,
    Moments,
    SampleHasher,
    all_reduce_statistics,
    chan_merge,
    chi2_quantile,
    chi2_sf,
    chi_squared,
    cpu_shortcuts,
    hash_rows,
    jensen_shannon,
    kolmogorov_sf,
    ks_binned,
    linf,
    load_packed,
    pack_max,
    pack_sum,
    psi,
    psi_threshold,
    to_feature_matrix,
)

torch.set_num_threads(1)

NAN, INF = float("nan"), float("inf")


# -- helpers ---------------------------------------------------------------------------------------------
def json_round_trip(state: Dict[str, Any]) -> Dict[str, Any]:
    # allow_nan=False proves no bare NaN/Infinity literal leaks into the JSON.
    return json.loads(json.dumps(state, allow_nan=False))


def simulate_all_reduce(ranks: List[List[Any]]) -> None:
    """What one MAX then one SUM all-reduce does to every rank's statistics, in one process."""
    max_buf = torch.stack([pack_max(stats) for stats in ranks]).amax(0)
    sum_buf = torch.stack([pack_sum(stats, max_buf) for stats in ranks]).sum(0)
    for stats in ranks:
        load_packed(stats, sum_buf, max_buf)


def rel_close(a: torch.Tensor, b: Any, rtol: float = 1e-10) -> bool:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    return bool(torch.allclose(a, b, rtol=rtol, atol=0.0, equal_nan=True))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values, NaN equal to NaN."""
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))


def planted_tabular(rng: np.random.Generator, n: int = 600, f: int = 4) -> np.ndarray:
    x = rng.normal(3.0, 2.0, size=(n, f)).astype(np.float32)
    x[rng.random((n, f)) < 0.05] = np.nan
    x[rng.random((n, f)) < 0.02] = np.inf
    x[rng.random((n, f)) < 0.02] = -np.inf
    x[:, 3] = np.nan  # a feature with no finite value at all
    return x


def finite_col(x: np.ndarray, j: int) -> np.ndarray:
    col = x[:, j].astype(np.float64)
    return col[np.isfinite(col)]


# -- to_feature_matrix -----------------------------------------------------------------------------------
def test_to_feature_matrix_layouts() -> None:
    img = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    m = to_feature_matrix(img, feature_dim=1)
    assert m.shape == (40, 3)
    assert torch.equal(m[:, 1].sort().values, img[:, 1].reshape(-1).sort().values)
    assert to_feature_matrix(torch.zeros(7, 2)).shape == (7, 2)
    assert to_feature_matrix(torch.zeros(7)).shape == (7, 1)
    assert to_feature_matrix(torch.tensor(3.0)).shape == (1, 1)
    with pytest.raises(ValueError, match="feature_dim"):
        to_feature_matrix(torch.zeros(2, 3), feature_dim=4)


# -- Moments ---------------------------------------------------------------------------------------------
def test_moments_match_numpy_and_count_nonfinite() -> None:
    rng = np.random.default_rng(0)
    x = planted_tabular(rng)
    m = Moments(num_features=4)
    for chunk in np.array_split(x, 7):
        m.update(torch.from_numpy(chunk))
    out = m.compute()
    out1 = m.compute(ddof=1)
    for j in range(4):
        col, fin = x[:, j], finite_col(x, j)
        assert int(out["count"][j]) == fin.size
        assert int(out["nan_count"][j]) == int(np.isnan(col).sum())
        assert int(out["posinf_count"][j]) == int(np.isposinf(col).sum())
        assert int(out["neginf_count"][j]) == int(np.isneginf(col).sum())
        assert int(out["total"][j]) == x.shape[0]
        if fin.size:
            assert float(out["min"][j]) == fin.min() and float(out["max"][j]) == fin.max()
            assert rel_close(out["mean"][j], fin.mean())
            assert rel_close(out["var"][j], fin.var())
            assert rel_close(out1["var"][j], fin.var(ddof=1))
            assert rel_close(out["std"][j], fin.std())
        else:
            assert all(math.isnan(float(out[k][j])) for k in ("min", "max", "mean", "var"))
    assert int(out["nan_count"][3]) == x.shape[0]


def test_moments_images_per_channel_and_int_input() -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(size=(6, 3, 5, 5)) * np.array([1.0, 10.0, 0.1])[None, :, None, None]
    m = Moments(feature_dim=1)
    m.update(torch.from_numpy(img[:4]))
    m.update(torch.from_numpy(img[4:]))
    per_channel = img.transpose(1, 0, 2, 3).reshape(3, -1)
    assert rel_close(m.compute()["mean"], per_channel.mean(1))
    assert rel_close(m.compute()["var"], per_channel.var(1))
    ints = Moments()
    ints.update(torch.tensor([[1, 2], [3, 4], [5, 9]]))
    assert ints.compute()["mean"].tolist() == [3.0, 5.0]


def test_moments_shard_merges_in_any_order_equal_single_pass() -> None:
    rng = np.random.default_rng(2)
    x = planted_tabular(rng, n=800)
    x[400:, 0] += 50.0  # the shards see different locations, so their shifts differ
    single = Moments(num_features=4)
    single.update(torch.from_numpy(x))
    expected = single.compute()

    def shard_moments() -> List[Moments]:
        out = []
        for s in np.array_split(x, 4):
            mm = Moments(num_features=4)
            mm.update(torch.from_numpy(s))
            out.append(mm)
        return out

    merged = []
    for order in [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)]:
        parts = shard_moments()
        acc = parts[order[0]]
        for i in order[1:]:
            acc.merge(parts[i])
        merged.append(acc)
    a, b, c, d = shard_moments()
    merged.append(a.merge(b).merge(c.merge(d)))  # tree-shaped
    for got in (mm.compute() for mm in merged):
        for k in ("count", "nan_count", "posinf_count", "neginf_count", "total"):
            assert torch.equal(got[k], expected[k])
        for k in ("min", "max", "mean", "var", "std"):
            assert rel_close(got[k], expected[k]), k


def test_chan_merge_and_shifted_sums_are_stable_where_naive_fails() -> None:
    rng = np.random.default_rng(3)
    # N(0, 1e-2) read as variance 1e-2 (std 0.1): float32's spacing at 1e6 is 0.0625, so a smaller std
    # would leave (almost) no variance in the float32 values at all.
    x32 = (1e6 + rng.normal(0.0, 0.1, size=200_000)).astype(np.float32)
    exact = x32.astype(np.float64).var()  # two-pass in float64 on the very same float32 values
    assert abs(exact / 1e-2 - 1) < 0.05

    naive_t = torch.from_numpy(x32)
    naive = float((naive_t * naive_t).mean() - naive_t.mean() ** 2)  # E[x^2] - E[x]^2 in float32
    assert abs(naive - exact) / exact > 1.0

    m = Moments(num_features=1)
    for chunk in np.array_split(x32, 50):
        m.update(torch.from_numpy(chunk))
    assert rel_close(m.compute()["var"], [exact], rtol=1e-9)
    assert abs(float(m.compute()["var"][0]) / 1e-2 - 1) < 0.05

    # Chan's merge of per-shard (n, mean, M2), in several orders
    shards = np.array_split(x32.astype(np.float64), 4)
    summaries = [(s.size, s.mean(), ((s - s.mean()) ** 2).sum()) for s in shards]
    for order in itertools.islice(itertools.permutations(range(4)), 0, 24, 5):
        n, mean, m2 = summaries[order[0]]
        for i in order[1:]:
            n, mean, m2 = chan_merge(n, mean, m2, *summaries[i])
        assert abs(float(m2 / n) / exact - 1) < 1e-9
        assert abs(float(mean) - x32.astype(np.float64).mean()) < 1e-9

    # ranks that froze different shifts still reduce exactly through the MAX-then-SUM recipe
    ranks = []
    for i, s in enumerate(np.array_split(x32, 3)):
        mm = Moments(num_features=1)
        mm.update(torch.from_numpy(s[: 10 + i]))  # tiny first batches: three different shifts
        mm.update(torch.from_numpy(s[10 + i:]))
        ranks.append([mm])
    assert len({float(r[0].shift[0]) for r in ranks}) == 3
    simulate_all_reduce(ranks)
    for r in ranks:
        assert rel_close(r[0].compute()["var"], [exact], rtol=1e-9)


def test_chan_merge_handles_empty_sides() -> None:
    n, mean, m2 = chan_merge(0, NAN, 0.0, 3, 2.0, 8.0)
    assert (float(n), float(mean), float(m2)) == (3.0, 2.0, 8.0)
    n, mean, m2 = chan_merge(0, NAN, 0.0, 0, NAN, 0.0)
    assert float(n) == 0 and math.isnan(float(mean)) and float(m2) == 0


def test_moments_reduction_equals_merge_and_detects_unaligned_shifts() -> None:
    rng = np.random.default_rng(4)
    shards = [planted_tabular(rng, n=300) + off for off in (0.0, 5.0)]
    ranks = []
    for s in shards:
        mm = Moments(num_features=4)
        mm.update(torch.from_numpy(s))
        ranks.append(mm)
    merged = Moments.from_state_dict(ranks[0].state_dict()).merge(Moments.from_state_dict(ranks[1].state_dict()))

    # without re-centring and with different shifts the sums would be wrong: refused
    bad = [Moments.from_state_dict(r.state_dict()) for r in ranks]
    max_buf = torch.stack([b.max_state() for b in bad]).amax(0)
    sum_buf = torch.stack([b.sum_state() for b in bad]).sum(0)
    with pytest.raises(ValueError, match="different shifts"):
        bad[0].load_reduced(sum_buf, max_buf)

    simulate_all_reduce([[r] for r in ranks])
    want = merged.compute()
    for r in ranks:
        got = r.compute()
        for k in ("count", "nan_count", "posinf_count", "neginf_count"):
            assert torch.equal(got[k], want[k])
        assert same(got["min"], want["min"]) and same(got["max"], want["max"])
        assert rel_close(got["mean"], want["mean"]) and rel_close(got["var"], want["var"])
    assert same(ranks[0].shift, ranks[1].shift)

    # a shared shift (from a reference) needs no re-centring; reset() keeps the now-common shift
    ref_shift = merged.compute()["mean"]
    aligned = [Moments(num_features=4, shift=ref_shift) for _ in shards]
    for a, s in zip(aligned, shards):
        a.update(torch.from_numpy(s))
    max_buf = torch.stack([a.max_state() for a in aligned]).amax(0)
    sum_buf = torch.stack([a.sum_state() for a in aligned]).sum(0)
    aligned[0].load_reduced(sum_buf, max_buf)
    assert rel_close(aligned[0].compute()["var"], want["var"])
    for r in ranks:
        r.reset()
    assert same(ranks[0].shift, ranks[1].shift) and int(ranks[0].count.sum()) == 0
    assert rel_close(merged.empty_like().shift, want["mean"])


# -- Histogram -------------------------------------------------------------------------------------------
def test_histogram_matches_numpy_with_tails_and_nan() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1000, 2)).astype(np.float32)
    x[:5, 0] = [-3.0, 3.0, np.nan, np.inf, -np.inf]  # both edges, NaN, +-inf
    edges = np.linspace(-3.0, 3.0, 13)
    h = Histogram(edges, num_features=2)
    for chunk in np.array_split(x, 3):
        h.update(torch.from_numpy(chunk))
    out = h.compute()
    for j in range(2):
        col = x[:, j].astype(np.float64)
        np_counts, _ = np.histogram(col[np.isfinite(col)], bins=edges)
        assert out["counts"][j].tolist() == np_counts.tolist()
        assert int(out["underflow"][j]) == int((col < -3.0).sum())  # includes -inf
        assert int(out["overflow"][j]) == int((col > 3.0).sum())  # includes +inf
        assert int(out["nan_count"][j]) == int(np.isnan(col).sum())
        assert int(out["total"][j]) == 1000
    tails = h.binned_counts()
    assert tails.shape == (2, 14) and int(tails[0, 0]) == int(out["underflow"][0])


def test_histogram_per_feature_edges_images_and_merge_by_summation() -> None:
    rng = np.random.default_rng(6)
    img = rng.normal(size=(8, 3, 4, 4)) * np.array([1.0, 5.0, 0.5])[None, :, None, None]
    h = Histogram.from_range([-2.0, -10.0, -1.0], [2.0, 10.0, 1.0], bins=8, feature_dim=1)
    assert h.edges.shape == (3, 9)
    full = Histogram.from_range([-2.0, -10.0, -1.0], [2.0, 10.0, 1.0], bins=8, feature_dim=1)
    full.update(torch.from_numpy(img))
    for j in range(3):
        col = img[:, j].reshape(-1)
        np_counts, _ = np.histogram(col, bins=full.edges[j].numpy())
        inside = (col >= full.edges[j, 0].item()) & (col <= full.edges[j, -1].item())
        assert full.counts[j].tolist() == np_counts.tolist() and int(full.counts[j].sum()) == int(inside.sum())
    shards = np.array_split(img, 4)
    for order in [(0, 1, 2, 3), (3, 1, 0, 2)]:
        parts = []
        for i in order:
            p = full.empty_like()
            p.update(torch.from_numpy(shards[i]))
            parts.append(p)
        acc = parts[0]
        for p in parts[1:]:
            acc.merge(p)
        assert torch.equal(acc.binned_counts(), full.binned_counts())
        assert torch.equal(acc.compute()["nan_count"], full.compute()["nan_count"])
    other = Histogram.from_range(-1.0, 1.0, bins=8, num_features=3)
    with pytest.raises(ValueError, match="different bin edges"):
        full.merge(other)


def test_histogram_reduction_and_edge_disagreement() -> None:
    rng = np.random.default_rng(7)
    data = [torch.from_numpy(rng.normal(size=(200, 2))) for _ in range(2)]
    ranks = []
    for d in data:
        h = Histogram.from_range(-2.0, 2.0, bins=10, num_features=2)
        h.update(d)
        ranks.append([h])
    merged = Histogram.from_range(-2.0, 2.0, bins=10, num_features=2)
    merged.update(torch.cat(data))
    simulate_all_reduce(ranks)
    for r in ranks:
        assert torch.equal(r[0].binned_counts(), merged.binned_counts())
        assert torch.equal(r[0].compute()["nan_count"], merged.compute()["nan_count"])
    a = Histogram.from_range(-2.0, 2.0, bins=10, num_features=2)
    b = Histogram.from_range(-2.0, 2.1, bins=10, num_features=2)
    with pytest.raises(ValueError, match="different bin edges"):
        simulate_all_reduce([[a], [b]])


def test_histogram_from_quantiles() -> None:
    rng = np.random.default_rng(8)
    ref = torch.from_numpy(rng.normal(size=(5000, 2)))
    h = Histogram.from_quantiles(ref, bins=10)
    h.update(ref)
    counts = h.counts
    assert int(counts.min()) >= 490 and int(counts.max()) <= 510  # equal-frequency bins
    assert int(h.compute()["underflow"].sum() + h.compute()["overflow"].sum()) == 0
    discrete = torch.tensor([[0.0], [0.0], [0.0], [1.0]])
    hd = Histogram.from_quantiles(discrete, bins=4)
    assert bool((hd.edges[0, 1:] > hd.edges[0, :-1]).all())
    hd.update(discrete)
    assert int(hd.counts.sum()) == 4


def test_histogram_rejects_bad_edges() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram([0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        Histogram([0.0, INF])


# -- LabelCounts -----------------------------------------------------------------------------------------
def test_label_counts_against_bincount_and_bad_labels() -> None:
    rng = np.random.default_rng(9)
    y = rng.integers(-2, 7, size=1000)
    lc = LabelCounts(num_classes=5)
    for chunk in np.array_split(y, 4):
        lc.update(torch.from_numpy(chunk))
    inside = y[(y >= 0) & (y < 5)]
    assert lc.counts.tolist() == np.bincount(inside, minlength=5).tolist()
    assert int(lc.out_of_range) == int(((y < 0) | (y >= 5)).sum())

    lf = LabelCounts(num_classes=3)
    lf.update(torch.tensor([0.0, 1.0, 2.0, 2.0, 3.0, -1.0, 0.5, NAN, INF, -INF, 1e30]))
    out = lf.compute()
    assert out["counts"].tolist() == [1, 1, 2]
    assert int(out["out_of_range"]) == 5 and int(out["non_integer"]) == 1 and int(out["nan_count"]) == 1
    assert int(out["total"]) == 11 and int(out["in_range"]) == 4
    lb = LabelCounts(num_classes=2)
    lb.update(torch.tensor([True, False, True]))
    assert lb.counts.tolist() == [1, 2]

    other = LabelCounts(num_classes=3)
    other.update(torch.tensor([2, 2, 9]))
    lf.merge(other)
    assert lf.counts.tolist() == [1, 1, 4] and int(lf.out_of_range) == 6
    with pytest.raises(ValueError, match="classes"):
        lf.merge(LabelCounts(num_classes=4))


# -- SampleHasher ----------------------------------------------------------------------------------------
def test_sample_hasher_finds_planted_duplicates_and_leaks() -> None:
    rng = np.random.default_rng(10)
    base = torch.from_numpy(rng.normal(size=(1000, 6)).astype(np.float32))
    dup_idx = torch.from_numpy(rng.choice(1000, size=50, replace=False))
    train_x = torch.cat([base, base[dup_idx]])[torch.from_numpy(rng.permutation(1050))]
    fresh = torch.from_numpy(rng.normal(size=(170, 6)).astype(np.float32))
    leaked = base[torch.from_numpy(rng.choice(1000, size=30, replace=False))]
    val_x = torch.cat([fresh, leaked])

    train, val = SampleHasher(), SampleHasher()
    for chunk in train_x.split(64):
        train.update(chunk)
    for chunk in val_x.split(32):
        val.update(chunk)
    res = train.compute()
    assert res == {"samples": 1050, "unique": 1000, "duplicates": 50, "duplicate_fraction": 50 / 1050,
                   "ignored_repeated_ids": 0}
    assert val.compute()["duplicates"] == 0
    assert val.leak_count(train) == 30 and val.leak_fraction(train) == 30 / 200
    # a single flipped bit is a different sample; -0.0 vs 0.0 are different bit patterns
    flipped = base[:1].clone()
    flipped.view(torch.int32)[0, 3] ^= 1
    assert int(hash_rows(flipped)[0]) != int(hash_rows(base[:1])[0])
    assert int(hash_rows(torch.tensor([[0.0]]))[0]) != int(hash_rows(torch.tensor([[-0.0]]))[0])
    # joint hashing of (inputs, targets): same inputs with a different label is not a duplicate
    y = torch.zeros(2, dtype=torch.int64)
    y[1] = 1
    joint = SampleHasher()
    joint.update((torch.stack([base[0], base[0]]), y))
    assert joint.compute()["duplicates"] == 0


def test_hash_rows_has_no_collisions_on_many_close_rows() -> None:
    n = 200_000
    rows = torch.stack([torch.arange(n), torch.arange(n) % 7, torch.zeros(n, dtype=torch.int64)], 1)
    assert torch.unique(hash_rows(rows)).numel() == n
    floats = torch.arange(n, dtype=torch.float32).reshape(-1, 1) * 1e-3
    assert torch.unique(hash_rows(floats)).numel() == torch.unique(floats).numel()


def test_sample_hasher_ignores_repeated_ids_across_ranks() -> None:
    # DistributedSampler over 11 samples on 2 ranks pads to 12 by repeating index 0.
    rng = np.random.default_rng(11)
    data = torch.from_numpy(rng.normal(size=(11, 3)))
    indices = list(range(11)) + [0]
    per_rank = [indices[0::2], indices[1::2]]
    with_ids, without_ids = [], []
    for idx in per_rank:
        a, b = SampleHasher(), SampleHasher()
        a.update(data[idx], sample_ids=torch.tensor(idx))
        b.update(data[idx])
        with_ids.append(a)
        without_ids.append(b)
    pad_to = max(h.num_rows for h in with_ids)  # a MAX all-reduce of num_rows under DDP
    gathered = torch.stack([h.gather_state(pad_to=pad_to) for h in with_ids])  # what all_gather returns
    for h in with_ids:
        h.load_gathered(gathered)
    res = with_ids[0].compute()
    assert res["samples"] == 11 and res["duplicates"] == 0 and res["ignored_repeated_ids"] == 1
    assert without_ids[0].merge(without_ids[1]).compute()["duplicates"] == 1
    # ids also work within one process across epochs
    h = SampleHasher()
    for _ in range(3):
        h.update(data, sample_ids=list(range(11)))
    assert h.compute()["samples"] == 11 and h.compute()["ignored_repeated_ids"] == 22
    with pytest.raises(ValueError, match="sample_ids"):
        h.update(data, sample_ids=[1, 2])
    with pytest.raises(TypeError):
        pack_max([h])


# -- CardinalitySketch -----------------------------------------------------------------------------------
def test_cardinality_sketch_within_3_percent_and_merges_exactly() -> None:
    rng = np.random.default_rng(12)
    distinct = torch.from_numpy(rng.normal(size=(50_000, 4)).astype(np.float32))
    stream = distinct[torch.from_numpy(rng.integers(0, 50_000, size=30_000))]
    data = torch.cat([distinct, stream])
    exact = torch.unique(hash_rows(data)).numel()
    assert exact == 50_000
    single = CardinalitySketch(p=14)
    single.update(data)
    assert abs(float(single.estimate()) / exact - 1) < 0.03
    shards = list(data.split(17_000))
    for order in [(0, 1, 2, 3, 4), (4, 2, 0, 3, 1)]:
        acc = CardinalitySketch(p=14)
        for i in order:
            part = CardinalitySketch(p=14)
            part.update(shards[i])
            acc.merge(part)
        assert torch.equal(acc.registers, single.registers)
    ranks = []
    for s in data.split(40_000):
        sk = CardinalitySketch(p=14)
        sk.update(s)
        ranks.append([sk])
    simulate_all_reduce(ranks)
    assert torch.equal(ranks[0][0].registers, single.registers) and torch.equal(ranks[1][0].registers, single.registers)
    empty = CardinalitySketch(p=12)
    assert float(empty.estimate()) == 0.0


def test_cardinality_sketch_per_feature() -> None:
    rng = np.random.default_rng(13)
    n = 40_000
    cols = [rng.integers(0, 10, n), rng.integers(0, 3000, n), rng.normal(size=n)]
    x = torch.from_numpy(np.stack(cols, 1).astype(np.float64))
    x[:100, 0] = -0.0  # equal to 0.0 as a value
    sk = CardinalitySketch(p=13, per_feature=True)
    sk.update(x[:25_000])
    sk.update(x[25_000:])
    est = sk.estimate()
    exact = [np.unique(c).size for c in cols]
    assert est.shape == (3,)
    for e, t in zip(est.tolist(), exact):
        assert abs(e / t - 1) < 0.03


# -- drift measures --------------------------------------------------------------------------------------
def np_psi(r: np.ndarray, c: np.ndarray, eps: float = 1e-4) -> float:
    b = r.size
    p = (r / r.sum() + eps) / (1 + b * eps)
    q = (c / c.sum() + eps) / (1 + b * eps)
    return float(np.sum((q - p) * np.log(q / p)))


def test_psi_matches_numpy_per_feature_and_handles_empty_bins() -> None:
    rng = np.random.default_rng(14)
    ref = rng.integers(0, 100, size=(5, 8)).astype(np.float64)
    cur = rng.integers(0, 100, size=(5, 8)).astype(np.float64)
    ref[0, 2] = 0.0
    cur[1, 5] = 0.0
    got = psi(torch.from_numpy(ref), cur)  # tensor and numpy mixed
    assert got.shape == (5,)
    for i in range(5):
        assert abs(float(got[i]) - np_psi(ref[i], cur[i])) < 1e-12
        assert abs(float(psi(ref[i].tolist(), cur[i].tolist())) - np_psi(ref[i], cur[i])) < 1e-12
    assert float(psi(ref[0], ref[0])) == 0.0
    assert math.isfinite(float(psi([10, 0], [0, 10])))
    with pytest.raises(ValueError, match="shapes"):
        psi([1, 2], [1, 2, 3])


def test_psi_threshold_false_positive_rate_and_power() -> None:
    rng = np.random.default_rng(15)
    n, draws, alpha = 2000, 200, 0.05
    inner = np.array([-1.2816, -0.8416, -0.5244, -0.2533, 0.0, 0.2533, 0.5244, 0.8416, 1.2816])  # N(0,1) deciles
    edges = np.concatenate([[-np.inf], inner, [np.inf]])

    def counts(shift: float) -> np.ndarray:
        return np.stack([np.histogram(rng.normal(shift, 1.0, n), bins=edges)[0] for _ in range(draws)])

    ref, null, shifted = counts(0.0), counts(0.0), counts(0.5)
    pure = psi_threshold(n, n, bins=10, alpha=alpha, floor=0.0)
    expected_null_mean = 9 * (2 / n)
    null_psi = psi(ref, null)
    assert abs(float(null_psi.mean()) / expected_null_mean - 1) < 0.2
    assert float((null_psi > pure).double().mean()) <= alpha + 0.05
    assert float((null_psi > psi_threshold(n, n, bins=10)).double().mean()) == 0.0
    assert float((psi(ref, shifted) > psi_threshold(n, n, bins=10)).double().mean()) >= 0.95
    per_feature = psi_threshold(torch.tensor([100.0, 1e6]), torch.tensor([100.0, 1e6]), bins=10, floor=0.0)
    assert per_feature.shape == (2,) and float(per_feature[0]) > float(per_feature[1])


def test_chi2_quantile_wilson_hilferty_against_tables() -> None:
    table = [(0.95, 1, 3.841459), (0.95, 2, 5.991465), (0.95, 9, 16.918978), (0.99, 10, 23.209251),
             (0.95, 100, 124.342113), (0.05, 9, 3.325113)]
    for q, k, want in table:
        wh = chi2_quantile(q, k, method="wilson_hilferty")
        tol = 0.03 if k == 1 else (0.002 if k >= 9 and q > 0.5 else 0.01)
        assert abs(wh / want - 1) < tol, (q, k, wh, want)
        # the survival function is exact, so it inverts the table values
        assert abs(float(chi2_sf(want, k)) - (1 - q)) < 1e-6
    try:
        import scipy.stats  # noqa: F401
    except ImportError:
        assert chi2_quantile(0.95, 9) == chi2_quantile(0.95, 9, method="wilson_hilferty")
    else:
        assert abs(chi2_quantile(0.95, 9) - 16.918978) < 1e-5
    vec = chi2_quantile(torch.tensor([0.9, 0.95]), torch.tensor([3.0, 9.0]), method="wilson_hilferty")
    assert vec.shape == (2,)
    with pytest.raises(ValueError):
        chi2_quantile(1.5, 3)


def test_ks_binned_equals_exact_ks_on_integer_data() -> None:
    rng = np.random.default_rng(16)
    a = rng.binomial(9, 0.5, size=700)
    b = rng.binomial(9, 0.55, size=400)
    pts = np.arange(10)
    cdf_a = np.searchsorted(np.sort(a), pts, side="right") / a.size
    cdf_b = np.searchsorted(np.sort(b), pts, side="right") / b.size
    d_exact = np.abs(cdf_a - cdf_b).max()
    res = ks_binned(np.bincount(a, minlength=10), np.bincount(b, minlength=10))
    assert abs(float(res.statistic) - d_exact) < 1e-12
    n_eff = 700 * 400 / 1100
    assert abs(float(res.n_eff) - n_eff) < 1e-9
    lam = math.sqrt(n_eff) * d_exact
    series = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 200))
    assert abs(float(res.pvalue) - min(max(series, 0.0), 1.0)) < 1e-9
    assert abs(float(res.critical_value) - math.sqrt(-math.log(0.025) / 2) / math.sqrt(n_eff)) < 1e-12
    two = ks_binned(np.stack([np.bincount(a, minlength=10)] * 2), np.stack([np.bincount(b, minlength=10)] * 2))
    assert two.statistic.shape == (2,) and torch.equal(two.statistic, torch.stack([res.statistic] * 2))


def test_kolmogorov_sf_known_values() -> None:
    known = {0.3: 0.9999906941986655, 0.5: 0.9639452436648751, 1.0: 0.26999967167735456,
             1.2238: 0.1000, 1.3581: 0.0500, 1.6276: 0.0100, 2.0: 0.0006709252557796953}
    for lam, want in known.items():
        assert abs(float(kolmogorov_sf(lam)) - want) < 1e-4, lam
    assert float(kolmogorov_sf(0.0)) == 1.0
    assert float(kolmogorov_sf(0.999)) > float(kolmogorov_sf(1.001))


def test_jensen_shannon_chi_squared_linf_against_numpy() -> None:
    rng = np.random.default_rng(17)
    r = rng.integers(0, 50, size=(4, 6)).astype(np.float64)
    c = rng.integers(0, 50, size=(4, 6)).astype(np.float64)
    r[0, 1] = c[0, 1] = 0.0  # a bin empty in both samples
    r[1, 2] = 0.0
    js = jensen_shannon(r, c)
    chi = chi_squared(r, c)
    lin = linf(r, c)
    for i in range(4):
        p, q = r[i] / r[i].sum(), c[i] / c[i].sum()
        m = (p + q) / 2
        kl = lambda x: np.sum(x[x > 0] * np.log2(x[x > 0] / m[x > 0]))  # noqa: E731
        assert abs(float(js[i]) - 0.5 * (kl(p) + kl(q))) < 1e-12
        assert abs(float(lin[i]) - np.abs(p - q).max()) < 1e-12
        table = np.stack([r[i], c[i]])
        table = table[:, table.sum(0) > 0]
        expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
        stat = ((table - expected) ** 2 / expected).sum()
        assert abs(float(chi.statistic[i]) - stat) < 1e-9 * stat
        assert int(chi.dof[i]) == table.shape[1] - 1
        assert abs(float(chi.pvalue[i]) - float(chi2_sf(stat, table.shape[1] - 1))) < 1e-12
    assert float(jensen_shannon([1, 0, 0], [0, 0, 1])) == 1.0
    assert float(jensen_shannon([3, 1], [6, 2])) == 0.0
    res = chi_squared([50, 50], [30, 70])
    assert abs(float(res.statistic) - 25 / 3) < 1e-12 and abs(float(res.pvalue) - 0.0038924171227) < 1e-9
    lc_a, lc_b = LabelCounts(3), LabelCounts(3)
    lc_a.update(torch.tensor([0, 0, 1, 2]))
    lc_b.update(torch.tensor([0, 1, 1, 2]))
    assert float(linf(lc_a.counts, lc_b.counts)) == 0.25


# -- serialisation ---------------------------------------------------------------------------------------
def filled_statistics() -> List[Any]:
    rng = np.random.default_rng(18)
    x = torch.from_numpy(planted_tabular(rng, n=300))
    m = Moments(num_features=4)
    m.update(x)
    h = Histogram.from_range(-1.0, 7.0, bins=5, num_features=4)
    h.update(x)
    lc = LabelCounts(num_classes=4)
    lc.update(torch.tensor([0.0, 1.0, 3.0, 7.0, 0.5, NAN]))
    sh = SampleHasher(seed=3)
    sh.update(x[:, :3], sample_ids=torch.arange(300))
    sh.update(x[:10, :3])
    sk = CardinalitySketch(p=10)
    sk.update(x)
    skf = CardinalitySketch(p=8, per_feature=True)
    skf.update(x)
    return [m, h, lc, sh, sk, skf]


def test_state_dict_json_round_trip_is_exact() -> None:
    for stat in filled_statistics():
        state = stat.state_dict()
        assert state["kind"] == stat.kind and state["version"] == 1
        back = type(stat).from_state_dict(json_round_trip(state))
        assert back.state_dict() == state, type(stat).__name__
        got, want = back.compute(), stat.compute()
        for k, v in want.items():
            if isinstance(v, torch.Tensor):
                assert same(got[k], v), k
            else:
                assert got[k] == v, k
    m = filled_statistics()[0]
    text = json.dumps(m.state_dict(), allow_nan=False)
    assert '"nan"' in text and '"inf"' in text and "NaN" not in text and "Infinity" not in text
    # a reloaded statistic keeps accumulating
    again = Moments.from_state_dict(json_round_trip(m.state_dict()))
    again.update(torch.ones(3, 4))
    assert int(again.count[0]) == int(m.count[0]) + 3
    # statistics that never saw data also round trip
    for stat in (Moments(), Histogram([0.0, 1.0]), CardinalitySketch(per_feature=True), SampleHasher()):
        state = json_round_trip(stat.state_dict())
        assert type(stat).from_state_dict(state).state_dict() == stat.state_dict()


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: "not a dict", "expected a dict"),
    (lambda s: {**s, "kind": "histogram"}, "kind 'histogram', expected 'moments'"),
    (lambda s: {**s, "version": 99}, "unsupported version 99"),
    (lambda s: {k: v for k, v in s.items() if k != "shifted_sum_sq"}, r"missing keys \['shifted_sum_sq'\]"),
    (lambda s: {**s, "count": s["count"][:-1]}, "'count' has 3 entries, expected 4"),
    (lambda s: {**s, "shift": ["nan", "oops", 1.0, 2.0]}, "'shift'.*'oops'"),
    (lambda s: {**s, "count": [1, -2, 3, 4]}, "'count' must hold integers >= 0"),
    (lambda s: {**s, "num_features": "four"}, "'num_features' must be an int"),
])
def test_corrupt_moments_state_raises_helpful_value_error(corrupt: Any, message: str) -> None:
    state = filled_statistics()[0].state_dict()
    with pytest.raises(ValueError, match=r"Moments\.from_state_dict: .*" + message):
        Moments.from_state_dict(corrupt(json_round_trip(state)))


def test_corrupt_states_of_other_statistics() -> None:
    _, h, lc, sh, sk, skf = filled_statistics()
    hs = json_round_trip(h.state_dict())
    with pytest.raises(ValueError, match=r"Histogram.*'counts'\[1\] has 4 entries, expected 5"):
        Histogram.from_state_dict({**hs, "counts": [row if i != 1 else row[:4] for i, row in enumerate(hs["counts"])]})
    with pytest.raises(ValueError, match=r"Histogram.*'edges'.*strictly increasing"):
        Histogram.from_state_dict({**hs, "edges": [sorted(row, reverse=True) for row in hs["edges"]]})
    with pytest.raises(ValueError, match=r"Histogram.*kind 'moments'"):
        Histogram.from_state_dict(json_round_trip(filled_statistics()[0].state_dict()))
    with pytest.raises(ValueError, match=r"LabelCounts.*'counts' has 3 entries, expected 4"):
        LabelCounts.from_state_dict({**lc.state_dict(), "counts": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"SampleHasher.*'hashes' has"):
        SampleHasher.from_state_dict({**sh.state_dict(), "num_rows": 3})
    with pytest.raises(ValueError, match=r"SampleHasher.*not valid base64"):
        SampleHasher.from_state_dict({**sh.state_dict(), "hashes": "***"})
    with pytest.raises(ValueError, match=r"CardinalitySketch.*'registers' has"):
        CardinalitySketch.from_state_dict({**sk.state_dict(), "p": 12})
    with pytest.raises(ValueError, match=r"CardinalitySketch.*'registers' has"):
        CardinalitySketch.from_state_dict({**skf.state_dict(), "num_features": 3})
    with pytest.raises(ValueError, match=r"CardinalitySketch.*missing keys \['registers'\]"):
        CardinalitySketch.from_state_dict({k: v for k, v in sk.state_dict().items() if k != "registers"})


# -- cross-rank reduction of many statistics -------------------------------------------------------------
def test_packed_reduction_of_mixed_statistics_equals_merge() -> None:
    rng = np.random.default_rng(19)

    def build(seed_shift: float) -> List[Any]:
        x = torch.from_numpy(planted_tabular(rng, n=250) + seed_shift)
        y = torch.from_numpy(rng.integers(-1, 4, size=250))
        stats = [Moments(num_features=4), Histogram.from_range(-2.0, 8.0, bins=6, num_features=4),
                 LabelCounts(num_classes=3), CardinalitySketch(p=10)]
        for s in stats[:2]:
            s.update(x)
        stats[2].update(y)
        stats[3].update(x)
        return stats

    ranks = [build(0.0), build(1.5)]
    expected = [type(a).from_state_dict(a.state_dict()).merge(type(b).from_state_dict(b.state_dict()))
                for a, b in zip(*ranks)]
    assert pack_max(ranks[0]).numel() == sum(s.max_size for s in ranks[0])
    assert pack_sum(ranks[0]).numel() == sum(s.sum_size for s in ranks[0])
    simulate_all_reduce(ranks)
    for stats in ranks:
        m, h, lc, sk = stats
        em, eh, elc, esk = expected
        assert torch.equal(m.count, em.count) and torch.equal(m.nan_count, em.nan_count)
        assert rel_close(m.compute()["mean"], em.compute()["mean"]) and rel_close(m.compute()["var"], em.compute()["var"])
        assert torch.equal(h.binned_counts(), eh.binned_counts())
        assert lc.state_dict() == elc.state_dict()
        assert torch.equal(sk.registers, esk.registers)
    # one process: the default all-reduce is the identity
    before = [s.state_dict() for s in ranks[0]]
    all_reduce_statistics(ranks[0])
    assert [s.state_dict() for s in ranks[0]][1:] == before[1:]
    assert rel_close(ranks[0][0].compute()["var"], expected[0].compute()["var"])
    with pytest.raises(ValueError, match="entries"):
        load_packed(ranks[0], torch.zeros(3, dtype=torch.float64), pack_max(ranks[0]))
    with pytest.raises(ValueError, match="num_features"):
        pack_max([Moments()])


# -- examples and devices --------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["features", "hashing", "base", "moments", "histogram", "labels", "duplicates",
                                    "sketch", "drift"])
def test_docstring_examples_run(module: str) -> None:
    mod = importlib.import_module(f"lightwatch.metrics.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_updates_on_cuda_do_not_sync_and_match_cpu() -> None:
    rng = np.random.default_rng(20)
    x = torch.from_numpy(planted_tabular(rng, n=512))
    y = torch.from_numpy(rng.integers(-1, 4, size=512))

    def make() -> List[Any]:
        return [Moments(num_features=4), Histogram.from_range(-2.0, 8.0, bins=6, num_features=4), LabelCounts(3),
                CardinalitySketch(p=10), SampleHasher()]

    cpu, gpu = make(), make()
    xs, ys = x.split(128), y.split(128)
    for stats, dev in ((cpu, "cpu"), (gpu, "cuda")):
        for i, (xb, yb) in enumerate(zip(xs, ys)):
            xb, yb = xb.to(dev), yb.to(dev)
            if dev == "cuda" and i >= 1:  # batch 0 moves the empty state to the GPU
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                stats[0].update(xb)
                stats[1].update(xb)
                stats[2].update(yb)
                stats[3].update(xb)
                stats[4].update(xb)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(cpu, gpu):
        sa, sb = a.state_dict(), b.state_dict()
        if isinstance(a, Moments):
            assert sa["count"] == sb["count"] and rel_close(b.compute()["var"].cpu(), a.compute()["var"], 1e-9)
        else:
            assert sa == sb, type(a).__name__


# ----------------------------------------------------------------------------- NeighbourLabelAgreement
def test_label_agreement_is_calibrated_on_labels_unrelated_to_the_inputs() -> None:
    from lightwatch.metrics import NeighbourLabelAgreement

    zs = []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        signal = NeighbourLabelAgreement()
        signal.update(torch.randn(800, 6, generator=g), torch.randint(0, 4, (800,), generator=g))
        out = signal.compute()
        assert out["chance"] == pytest.approx(0.25, abs=0.02)
        zs.append(out["z"])
    # mutual nearest neighbours and shared neighbours make the events dependent; the variance accounts for it
    assert abs(float(np.mean(zs))) < 0.5 and 0.6 < float(np.std(zs)) < 1.5 and max(zs) < 4


def test_label_agreement_finds_labels_that_depend_on_the_inputs_through_a_projection() -> None:
    from lightwatch.metrics import NeighbourLabelAgreement

    g = torch.Generator().manual_seed(0)
    images = torch.randn(600, 3, 16, 16, generator=g)  # 768 features: projected to 64 dimensions
    labels = (images[:, 0].mean((1, 2)) > 0).long()
    images[:, 0] += 2.0 * (labels.float() - 0.5)[:, None, None]  # class shifts channel 0
    signal = NeighbourLabelAgreement(max_rows=500)
    signal.update(images[:300], labels[:300])
    bad = images[300:].clone()
    bad[0, 0, 0, 0] = float("nan")  # rows with a non-finite value are left out
    signal.update(bad, labels[300:])
    out = signal.compute()
    assert out["rows"] == 500 and out["z"] > 10 and out["agreement"] > 0.8
    # sums of two halves combine like one process (the DDP reduction is a SUM of these four numbers)
    half = [NeighbourLabelAgreement(), NeighbourLabelAgreement()]
    half[0].update(images[:300], labels[:300])
    half[1].update(images[300:], labels[300:])
    summed = NeighbourLabelAgreement.score(half[0].sums() + half[1].sums())
    assert summed["rows"] == 600 and summed["z"] > 10


# ------------------------------------------------------------------------------ CPU shortcuts
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_shortcuts_give_the_accelerator_paths_results_bit_for_bit(dtype: torch.dtype) -> None:
    """Moments and Histogram count finite CPU batches without masks or searchsorted; the results are those of
    the branch-free path an accelerator takes, bit for bit, with values on the edges and a row mask."""
    g = torch.Generator().manual_seed(0)
    edges = torch.sort(torch.randn(5, 9, generator=g, dtype=torch.float64), dim=1).values
    batches = [torch.randn(300, 5, generator=g).to(dtype) * 2 for _ in range(3)]
    batches[1][:9] = edges[:, :9].T.to(dtype)  # values on the edges (the last one closes the last bin)
    batches.append(batches[0] + 1e6)  # far from the first shift
    rows = torch.rand(300, generator=g) < 0.3
    results = []
    for shortcuts in (True, False):
        with cpu_shortcuts(shortcuts):
            m, h, hm = Moments(num_features=5), Histogram(edges, _trusted=True), Histogram(edges, _trusted=True)
            for b in batches:
                m.update(b)
                h.update(b)
                hm.update(b, rows=rows)
        results.append((m.state_dict(), h.compute(), hm.compute()))
    (m1, h1, hm1), (m2, h2, hm2) = results
    assert m1 == m2
    for key in h1:
        assert torch.equal(h1[key], h2[key]) and torch.equal(hm1[key], hm2[key]), key
    assert int(hm1["total"][0]) == 4 * int(rows.sum())


def test_a_batch_with_non_finite_values_takes_the_masked_path_on_the_cpu_too() -> None:
    x = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0], [3.0, 4.0]])
    m, h = Moments(num_features=2), Histogram([0.0, 2.0, 4.0], num_features=2)
    m.update(x)
    h.update(x)
    out = m.compute()
    assert out["nan_count"].tolist() == [0, 1] and out["posinf_count"].tolist() == [1, 0]
    assert out["min"].tolist() == [1.0, 2.0] and out["max"].tolist() == [3.0, 4.0]
    assert h.compute()["nan_count"].tolist() == [0, 1] and h.compute()["overflow"].tolist() == [1, 0]
