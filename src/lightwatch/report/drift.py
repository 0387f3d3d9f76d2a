"""Drift of one profiled field against another: the ``drift`` data check's measure, across runs too.

Within a run every split is binned on the same frozen edges, so the data check's own
:meth:`~lightwatch.checks.data.drift.Drift.measure` applies as it is. Two runs froze their edges each
from their own data: the current field's counts are then moved onto the reference's edges first, assuming
the values spread evenly inside each bin (mass below the first edge stays below, above the last stays
above). Label fields are compared with the chi-square test of homogeneity on their class counts.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch

__all__ = ["field_drift", "rebin_counts", "LABEL_ALPHA", "LABEL_MIN_SHIFT"]

#: a label distribution has shifted when the chi-square p-value is below this ...
LABEL_ALPHA = 1e-3
#: ... and the share of samples that would have to change class (total variation) is at least this
LABEL_MIN_SHIFT = 0.02


class _Binned:
    """The two things :meth:`Drift.measure` reads from a histogram: its edges and its counts with tails."""

    def __init__(self, edges: torch.Tensor, counts: torch.Tensor) -> None:
        self.edges = edges
        self._counts = counts

    def binned_counts(self) -> torch.Tensor:
        return self._counts


class _Field:
    def __init__(self, histogram: Any) -> None:
        self.histogram = histogram


def rebin_counts(edges: np.ndarray, counts: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Counts ``[F, B + 2]`` (underflow, bins, overflow) on ``edges`` ``[F, B + 1]`` moved onto ``target`` edges.

    Example:
        >>> import numpy as np
        >>> rebin_counts(np.array([[0.0, 1.0, 2.0]]), np.array([[0, 10, 10, 0]]), np.array([[0.0, 0.5, 2.0]]))
        array([[ 0.,  5., 15.,  0.]])
    """
    out = np.zeros((target.shape[0], target.shape[1] + 1))
    for f in range(target.shape[0]):
        c = counts[f].astype(np.float64)
        cum = c[0] + np.concatenate([[0.0], np.cumsum(c[1:-1])])
        cdf = np.interp(target[f], edges[f], cum, left=c[0], right=cum[-1])
        out[f, 0] = cdf[0]
        out[f, 1:-1] = np.diff(cdf)
        out[f, -1] = c.sum() - cdf[-1]
    return np.clip(out, 0.0, None)


def _numeric(cur: Any, ref: Any, n_cur: int, n_ref: int) -> Optional[Dict[str, Any]]:
    from lightwatch.checks.data.drift import Drift

    if cur.histogram is None or ref.histogram is None or cur.num_features != ref.num_features:
        return None
    ref_edges = ref.histogram.edges.cpu()
    cur_edges = cur.histogram.edges.cpu()
    rebinned = not (cur_edges.shape == ref_edges.shape and torch.equal(cur_edges, ref_edges))
    cur_hist: Any = cur.histogram
    if rebinned:
        counts = rebin_counts(cur_edges.numpy(), cur.histogram.binned_counts().cpu().numpy(), ref_edges.numpy())
        cur_hist = _Binned(ref_edges, torch.from_numpy(counts))
    result = Drift().measure(_Field(cur_hist), ref, n_cur, n_ref)
    if result is None:
        return None
    p, d, psi_thr, ks_thr, flagged = result
    features = [{"feature": cur.feature_label(j), "psi": _num(p[j]), "ks": _num(d[j]), "drifted": j in flagged}
                for j in range(len(p))]
    return {"kind": "numeric", "rebinned": rebinned, "psi_threshold": psi_thr, "ks_threshold": ks_thr,
            "features": features,
            "drifted_features": [cur.feature_label(j) for j in sorted(flagged, key=lambda j: -p[j])]}


def _labels(cur: Any, ref: Any) -> Optional[Dict[str, Any]]:
    from lightwatch.metrics import chi_squared

    if cur.labels is None or ref.labels is None:
        return None
    a = ref.labels.counts.to(torch.float64).cpu()
    b = cur.labels.counts.to(torch.float64).cpu()
    n = max(a.numel(), b.numel())
    a = torch.nn.functional.pad(a, (0, n - a.numel()))
    b = torch.nn.functional.pad(b, (0, n - b.numel()))
    if a.sum() <= 0 or b.sum() <= 0:
        return None
    test = chi_squared(a, b)
    shift = 0.5 * float((a / a.sum() - b / b.sum()).abs().sum())
    pvalue = float(test.pvalue)
    return {"kind": "labels", "chi2": _num(test.statistic), "pvalue": _num(pvalue), "total_variation": shift,
            "ref_distribution": (a / a.sum()).tolist(), "distribution": (b / b.sum()).tolist(),
            "drifted": bool(pvalue < LABEL_ALPHA and shift >= LABEL_MIN_SHIFT)}


def _num(value: Any) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def field_drift(cur: Any, ref: Any, n_cur: int, n_ref: int) -> Optional[Dict[str, Any]]:
    """Drift of field profile ``cur`` (``n_cur`` samples) against ``ref`` (``n_ref`` samples), or ``None``.

    Returns:
        ``{"field", "kind", "drifted", ...}``: for numeric fields the per-feature PSI and KS, the thresholds
        and ``drifted_features`` (worst first); for label fields the chi-square test and the total variation
        between the class distributions.
    """
    if cur.kind != ref.kind:
        return {"field": cur.name, "kind": cur.kind, "drifted": True, "schema_change":
                f"{ref.kind} in the reference, {cur.kind} here"}
    result = _numeric(cur, ref, n_cur, n_ref) if cur.kind == "numeric" else _labels(cur, ref)
    if result is None:
        return None
    if cur.kind == "numeric":
        result["drifted"] = bool(result["drifted_features"])
    schema: List[str] = []
    if cur.dtype != ref.dtype:
        schema.append(f"dtype {ref.dtype} -> {cur.dtype}")
    if list(cur.shape) != list(ref.shape):
        schema.append(f"shape {ref.shape} -> {cur.shape}")
    return dict(result, field=cur.name, schema_change="; ".join(schema) or None)
