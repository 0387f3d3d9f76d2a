"""``drift``: per-feature drift of an evaluation split against this run's training split (PSI and binned KS).

``info`` when significant; the check's severity only when a feature has both PSI > ``psi_warn`` and
KS > ``ks_warn`` (healthy val vs train of small splits reaches PSI 0.14 and KS 0.13; duplicated or imbalanced
training data moves PSI to 0.4 at most, a real covariate shift to 5 and more).
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch

from lightwatch.checks.data.base import CheckContext, DataCheck
from lightwatch.metrics import ks_binned, psi, psi_threshold

__all__ = ["Drift", "DriftResult"]

#: ``(psi per feature, ks per feature, psi threshold, ks threshold, flagged features)``
DriftResult = Tuple[List[float], List[float], float, float, List[int]]


def counted_share(field: Any) -> float:
    """Share of a numeric field profile's values that its histogram counted: the histogram's total over the
    moments' total, 1 when every value was counted.

    The data monitor counts the histogram of a wide field (more than ``HIST_VALUES_PER_SAMPLE`` values per
    sample) on a content-chosen share of its samples; the drift thresholds then take the samples counted.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> from lightwatch.metrics import Histogram, Moments
        >>> m, h = Moments(num_features=1), Histogram([0.0, 1.0], num_features=1)
        >>> m.update(torch.rand(8)); h.update(torch.rand(2))
        >>> counted_share(SimpleNamespace(moments=m, histogram=h))
        0.25
    """
    if getattr(field, "moments", None) is None or getattr(field, "histogram", None) is None:
        return 1.0
    values = float(field.moments.compute()["total"].sum())
    counted = float(field.histogram.compute()["total"].sum())
    return 1.0 if values <= 0 else min(1.0, counted / values)


class Drift(DataCheck):
    """Features of a split whose histogram moved away from another split's (PSI or KS above its threshold).

    Epoch tier. The thresholds account for both sample sizes and the number of features (Bonferroni over
    features at ``alpha``), never below ``psi_floor`` and ``ks_floor``.

    Example:
        >>> check = Drift()
        >>> check.rule, check["psi_warn"], check["ks_warn"]
        ('data_drift', 0.5, 0.3)
    """

    name = "drift"
    tier = "epoch"
    defaults = {"alpha": 0.01, "psi_floor": 0.1, "ks_floor": 0.1, "psi_warn": 0.5, "ks_warn": 0.3}
    bounds = {"alpha": (0.0, 1.0, False), "psi_floor": (0.0, math.inf, True), "ks_floor": (0.0, 1.0, True),
              "psi_warn": (0.0, math.inf, True), "ks_warn": (0.0, 1.0, True)}
    #: the suffix of its scalars (``psi``, ``ks``) and what the split is compared with
    suffix = ""

    def measure(self, cur: Any, ref: Any, n_cur: int, n_ref: int) -> Optional[DriftResult]:
        """PSI and binned KS per feature of field profiles ``cur`` and ``ref``, with thresholds from the sample sizes.

        The sizes are numbers of samples, not of values: values of one sample (pixels of an image) are not
        independent, so counting samples keeps the thresholds conservative. PSI is taken between bucket
        counts expressed in samples with half a sample added to every bucket: a bucket empty on one side
        then adds a bounded amount instead of ``q ln(q / eps)``, and the null distribution stays close to
        the chi-square one :func:`~lightwatch.metrics.psi_threshold` assumes (measured: at most 1% false
        alarms at alpha 1% with 40 to 5000 samples, continuous and discrete data; without the half sample,
        26% to 54% with 50 to 96 evaluation samples).
        """
        if cur.histogram is None or ref.histogram is None:
            return None
        # a histogram that counted a share of the samples (wide fields, see `counted_share`) holds that many
        n_cur, n_ref = n_cur * counted_share(cur), n_ref * counted_share(ref)
        if n_cur < 2 or n_ref < 2:
            return None
        if cur.histogram.edges.shape != ref.histogram.edges.shape or not torch.equal(
                cur.histogram.edges.cpu(), ref.histogram.edges.cpu()):
            return None
        rc = ref.histogram.binned_counts().to(torch.float64).cpu()
        cc = cur.histogram.binned_counts().to(torch.float64).cpu()
        valid = (rc.sum(1) > 0) & (cc.sum(1) > 0)
        if not bool(valid.any()):
            return None
        nan = float("nan")
        p_all = [nan] * rc.shape[0]
        d_all = [nan] * rc.shape[0]
        idx = torch.nonzero(valid).reshape(-1).tolist()
        smoothed_r = rc[valid] / rc[valid].sum(1, keepdim=True) * n_ref + 0.5
        smoothed_c = cc[valid] / cc[valid].sum(1, keepdim=True) * n_cur + 0.5
        p = psi(smoothed_r, smoothed_c, eps=0.0).tolist()
        d = ks_binned(rc[valid], cc[valid]).statistic.tolist()
        alpha = self["alpha"] / len(idx)
        psi_thr = psi_threshold(n_ref, n_cur, bins=rc.shape[1], alpha=alpha, floor=self["psi_floor"])
        n_eff = n_ref * n_cur / (n_ref + n_cur)
        ks_thr = max(self["ks_floor"], math.sqrt(-math.log(alpha / 2.0) / 2.0) / math.sqrt(n_eff))
        flagged = []
        for j, pj, dj in zip(idx, p, d):
            p_all[j], d_all[j] = pj, dj
            if pj > psi_thr or dj > ks_thr:
                flagged.append(j)
        return p_all, d_all, float(psi_thr), float(ks_thr), flagged

    def judge_field(self, ctx: CheckContext, spec: Any, result: DriftResult, n_cur: int, n_other: int,
                    what: str) -> None:
        """Alert on the flagged features of ``result`` (from :meth:`measure`) of field ``spec``."""
        p, d, psi_thr, ks_thr, flagged = result
        if not flagged or not self.enabled:
            return
        worst = sorted(flagged, key=lambda j: -p[j])
        listed = ", ".join(f"{spec.label(j)} (PSI {p[j]:.3g}, KS {d[j]:.3g})" for j in worst[:5])
        strong = any(p[j] > self["psi_warn"] and d[j] > self["ks_warn"] for j in flagged)
        self.alert(ctx, subject=f"{ctx.split}/{spec.label(worst[0])}", value=p[worst[0]], threshold=psi_thr,
                   severity=self.graded(strong), message=(
                       f"{len(flagged)} of the {spec.num_features} feature(s) of {ctx.split} {spec.role} "
                       f"{spec.name!r} drifted from {what} ({n_cur} vs {n_other} samples; thresholds PSI "
                       f"{psi_thr:.3g}, KS {ks_thr:.3g}): {listed}"
                       f"{' ...' if len(flagged) > 5 else ''}. A changed preprocessing step or data source, "
                       f"or splits drawn from different populations."))
