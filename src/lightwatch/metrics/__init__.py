"""Mergeable data statistics that update on the device and reduce exactly across ranks, plus drift measures.

Statistics (all with ``update``, ``merge``, ``compute``, ``reset``, ``state_dict``/``from_state_dict``):

- :class:`Moments`: per-feature count, NaN/+Inf/-Inf counts, min, max, mean, variance of finite values;
- :class:`Histogram`: per-feature fixed-bin counts with underflow/overflow/NaN buckets;
- :class:`LabelCounts`: class counts with out-of-range, NaN and non-integer labels counted;
- :class:`CardinalitySketch`: HyperLogLog distinct counts of samples or of values per feature;
- :class:`SampleHasher`: exact duplicates within a split and leakage between splits;
- :class:`NeighbourLabelAgreement`: whether labels depend on the inputs at all (1-NN agreement vs chance).

The first four reduce across DDP ranks with one MAX and one SUM all-reduce of flat float64 buffers
(:func:`pack_max`, :func:`pack_sum`, :func:`load_packed`, :func:`all_reduce_statistics`);
:class:`SampleHasher` is gathered (:meth:`SampleHasher.gather_state`). State dicts are JSON-safe:
non-finite floats are the strings ``"nan"``, ``"inf"``, ``"-inf"``; hashes and registers are base64.

Drift measures between binned profiles: :func:`psi` with the sample-size-aware :func:`psi_threshold`,
:func:`ks_binned`, :func:`jensen_shannon`, :func:`chi_squared` and :func:`linf`.
"""
from lightwatch.metrics.base import (
    ReducibleStatistic,
    Statistic,
    all_reduce_statistics,
    cpu_shortcuts,
    load_packed,
    may_read_values,
    pack_max,
    pack_sum,
)
from lightwatch.metrics.drift import (
    ChiSquaredResult,
    KSResult,
    chi2_quantile,
    chi2_sf,
    chi_squared,
    jensen_shannon,
    kolmogorov_sf,
    ks_binned,
    linf,
    psi,
    psi_threshold,
)
from lightwatch.metrics.duplicates import SampleHasher
from lightwatch.metrics.features import to_feature_matrix
from lightwatch.metrics.hashing import hash_rows, hash_values
from lightwatch.metrics.histogram import Histogram
from lightwatch.metrics.label_signal import NeighbourLabelAgreement
from lightwatch.metrics.labels import LabelCounts
from lightwatch.metrics.moments import Moments, chan_merge
from lightwatch.metrics.sketch import CardinalitySketch

__all__ = [
    "CardinalitySketch",
    "ChiSquaredResult",
    "Histogram",
    "KSResult",
    "LabelCounts",
    "Moments",
    "NeighbourLabelAgreement",
    "ReducibleStatistic",
    "SampleHasher",
    "Statistic",
    "all_reduce_statistics",
    "chan_merge",
    "chi2_quantile",
    "chi2_sf",
    "chi_squared",
    "cpu_shortcuts",
    "hash_rows",
    "hash_values",
    "jensen_shannon",
    "kolmogorov_sf",
    "ks_binned",
    "linf",
    "load_packed",
    "may_read_values",
    "pack_max",
    "pack_sum",
    "psi",
    "psi_threshold",
    "to_feature_matrix",
]
