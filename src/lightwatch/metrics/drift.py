"""Drift measures between two binned distributions, and the null distributions that calibrate them.

Every measure accepts torch tensors, numpy arrays or lists of counts (or probabilities where noted),
``[B]`` for one feature or ``[F, B]`` for ``F`` features at once, and returns float64 tensors: 0-d for
``[B]`` input, ``[F]`` for ``[F, B]`` input. Counts are normalised per row; a row of all zeros gives NaN.
Empty bins are handled per measure: :func:`psi` smooths proportions with ``eps`` (documented there),
:func:`jensen_shannon` and :func:`linf` are finite without smoothing, :func:`chi_squared` drops bins that
are empty in both samples (and their degrees of freedom), and :func:`ks_binned` needs nothing.

Chi-square p-values come from the regularised incomplete gamma function (``torch.special.gammaincc``,
exact). Chi-square quantiles use ``scipy.stats.chi2.ppf`` when scipy is importable and otherwise the
Wilson-Hilferty approximation (within ~1% for dof >= 2, ~2.5% at dof = 1).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Tuple, Union

import numpy as np
import torch

__all__ = [
    "psi",
    "psi_threshold",
    "ks_binned",
    "KSResult",
    "jensen_shannon",
    "chi_squared",
    "ChiSquaredResult",
    "linf",
    "chi2_quantile",
    "chi2_sf",
    "kolmogorov_sf",
]

_F64 = torch.float64
Numeric = Union[float, int, np.ndarray, torch.Tensor]


def _as_f64(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(_F64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _pair(a: Any, b: Any, name: str, counts: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    ta, tb = _as_f64(a), _as_f64(b)
    tb = tb.to(ta.device)
    if ta.shape != tb.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(ta.shape)} vs {tuple(tb.shape)}")
    if ta.dim() not in (1, 2) or ta.shape[-1] < 1:
        raise ValueError(f"{name}: expected [B] or [F, B] with B >= 1, got shape {tuple(ta.shape)}")
    for t in (ta, tb):
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{name}: {'counts' if counts else 'probabilities'} must be finite and >= 0")
    return ta, tb


def _normalise(t: torch.Tensor) -> torch.Tensor:
    return t / t.sum(-1, keepdim=True)


def psi(ref_counts: Any, cur_counts: Any, eps: float = 1e-4) -> torch.Tensor:
    """Population stability index ``sum_i (q_i - p_i) * ln(q_i / p_i)`` between binned counts.

    ``p`` and ``q`` are the reference and current proportions, smoothed so empty bins stay finite:
    ``p_i = (r_i / R + eps) / (1 + B * eps)`` (likewise ``q``). With ``eps = 1e-4`` a bin empty in the
    reference but holding 1% of the current data contributes about 0.046. PSI is symmetric and 0 for
    identical proportions; rules of thumb read < 0.1 as stable and > 0.25 as a major shift, but its null
    size depends on the sample sizes: use :func:`psi_threshold`.

    Args:
        ref_counts: reference counts ``[B]`` or ``[F, B]`` (include the tail buckets, e.g.
            :meth:`Histogram.binned_counts`).
        cur_counts: current counts, same shape.
        eps: smoothing added to every proportion.

    Example:
        >>> round(float(psi([10, 20, 30, 40], [10, 20, 30, 40])), 6)
        0.0
        >>> round(float(psi([25, 25, 25, 25], [10, 20, 30, 40])), 3)
        0.228
    """
    r, c = _pair(ref_counts, cur_counts, "psi")
    b = r.shape[-1]
    p = (_normalise(r) + eps) / (1.0 + b * eps)
    q = (_normalise(c) + eps) / (1.0 + b * eps)
    return ((q - p) * torch.log(q / p)).sum(-1)


def _is_scalar(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) or (isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim == 0)
               for v in values)


def normal_quantile(q: Numeric) -> torch.Tensor:
    """The standard normal quantile (``torch.special.ndtri``) as float64."""
    return torch.special.ndtri(_as_f64(q))


def _scipy_chi2() -> Any:
    try:
        from scipy.stats import chi2  # optional: not a dependency
    except Exception:
        return None
    return chi2


def chi2_quantile(q: Numeric, dof: Numeric, method: str = "auto") -> Union[float, torch.Tensor]:
    """The ``q`` quantile of the chi-square distribution with ``dof`` degrees of freedom.

    Args:
        q: probability in (0, 1), e.g. ``1 - alpha``.
        dof: degrees of freedom (> 0); ``q`` and ``dof`` broadcast.
        method: ``"scipy"``, ``"wilson_hilferty"`` (``dof * (1 - 2/(9 dof) + z_q sqrt(2/(9 dof)))**3``,
            ``z_q`` the normal quantile), or ``"auto"``: scipy when importable, else Wilson-Hilferty.

    Returns:
        A float for scalar inputs, else a float64 tensor.

    Example:
        >>> round(chi2_quantile(0.95, 9, method="wilson_hilferty"), 2)  # exact: 16.92
        16.9
    """
    if method not in ("auto", "scipy", "wilson_hilferty"):
        raise ValueError(f"method must be 'auto', 'scipy' or 'wilson_hilferty', got {method!r}")
    scalar = _is_scalar(q, dof)
    qt, kt = torch.broadcast_tensors(_as_f64(q), _as_f64(dof))
    if bool(((qt <= 0) | (qt >= 1)).any()) or bool((kt <= 0).any()):
        raise ValueError("chi2_quantile needs 0 < q < 1 and dof > 0")
    chi2 = _scipy_chi2() if method != "wilson_hilferty" else None
    if method == "scipy" and chi2 is None:
        raise ImportError("chi2_quantile(method='scipy') needs scipy")
    if chi2 is not None:
        out = torch.as_tensor(np.asarray(chi2.ppf(qt.cpu().numpy(), kt.cpu().numpy()), dtype=np.float64))
    else:
        h = 2.0 / (9.0 * kt)
        out = (kt * (1.0 - h + normal_quantile(qt) * torch.sqrt(h)) ** 3).clamp_min(0.0)
    return float(out) if scalar else out


def chi2_sf(x: Numeric, dof: Numeric) -> torch.Tensor:
    """Chi-square survival function ``P(X > x)`` (p-value), exact via ``gammaincc(dof/2, x/2)``.

    ``dof <= 0`` (a single non-empty bin) gives 1.

    Args:
        x: the statistic (number or tensor).
        dof: degrees of freedom; broadcast with ``x``.

    Example:
        >>> round(float(chi2_sf(3.841459, 1)), 6)
        0.05
    """
    xt, kt = torch.broadcast_tensors(_as_f64(x), _as_f64(dof))
    safe_k = kt.clamp_min(1.0)
    p = torch.special.gammaincc(safe_k / 2.0, xt.clamp_min(0.0) / 2.0)
    return torch.where(kt > 0, p, torch.ones_like(p))


def psi_threshold(n_ref: Numeric, n_cur: Numeric, bins: int, alpha: float = 0.05, floor: float = 0.1,
                  method: str = "auto") -> Union[float, torch.Tensor]:
    """A sample-size-aware PSI alarm threshold with false-positive rate about ``alpha``.

    Under the null (both samples from one distribution) PSI is approximately
    ``(1/n_ref + 1/n_cur) * chi2(B - 1)``, so its expected value is ``(B - 1)(1/n_ref + 1/n_cur)`` and its
    ``1 - alpha`` quantile ``(1/n_ref + 1/n_cur) * chi2_{B-1, 1-alpha}``. The threshold is the larger of
    that and ``floor`` (the customary 0.1), so large samples do not alarm on practically tiny drifts.

    Args:
        n_ref: reference sample size (number, or tensor per feature).
        n_cur: current sample size.
        bins: number of buckets ``B`` compared by :func:`psi` (tails included).
        alpha: tolerated false-positive rate.
        floor: minimum threshold; 0 for the pure statistical test.
        method: chi-square quantile method, see :func:`chi2_quantile`.

    Example:
        >>> round(psi_threshold(2000, 2000, bins=10, floor=0.0, method="wilson_hilferty"), 4)
        0.0169
        >>> psi_threshold(2000, 2000, bins=10)
        0.1
    """
    if bins < 2:
        raise ValueError(f"psi_threshold needs bins >= 2, got {bins}")
    scalar = _is_scalar(n_ref, n_cur)
    scale = 1.0 / _as_f64(n_ref) + 1.0 / _as_f64(n_cur)
    out = torch.clamp(scale * chi2_quantile(1.0 - alpha, bins - 1, method=method), min=floor)
    return float(out) if scalar else out


class KSResult(NamedTuple):
    """:func:`ks_binned` results (float64 tensors).

    Example:
        >>> import torch
        >>> result = ks_binned(torch.tensor([10.0, 10.0, 10.0]), torch.tensor([0.0, 5.0, 25.0]))
        >>> round(result.statistic.item(), 3), bool(result.statistic > result.critical_value)
        (0.5, True)
    """

    statistic: torch.Tensor
    pvalue: torch.Tensor
    critical_value: torch.Tensor
    n_eff: torch.Tensor


def kolmogorov_sf(lam: Numeric) -> torch.Tensor:
    """Survival function of the Kolmogorov distribution, ``Q(lam) = 2 sum_k (-1)^(k-1) exp(-2 k^2 lam^2)``.

    For ``lam < 1`` the equivalent theta-function form ``1 - sqrt(2 pi)/lam sum_k exp(-(2k-1)^2 pi^2 /
    (8 lam^2))`` is used, which converges fast where the alternating series does not.

    Args:
        lam: ``sqrt(n) * D`` (number or tensor); values <= 0 give 1.

    Example:
        >>> round(float(kolmogorov_sf(1.3581)), 4)
        0.05
    """
    lam = _as_f64(lam)
    k = torch.arange(1, 101, dtype=_F64, device=lam.device)
    big = lam.clamp_min(1.0).unsqueeze(-1)
    sign = torch.where(k % 2 == 1, 1.0, -1.0)
    q_big = 2.0 * (sign * torch.exp(-2.0 * k * k * big * big)).sum(-1)
    small = lam.clamp(1e-3, 1.0).unsqueeze(-1)
    odd = 2.0 * k[:20] - 1.0
    cdf_small = math.sqrt(2.0 * math.pi) / small[..., 0] * torch.exp(-odd * odd * math.pi ** 2 / (8.0 * small * small)).sum(-1)
    out = torch.where(lam >= 1.0, q_big, 1.0 - cdf_small)
    return torch.where(lam <= 0, torch.ones_like(out), out).clamp(0.0, 1.0)


def ks_binned(ref_counts: Any, cur_counts: Any, alpha: float = 0.05) -> KSResult:
    """Two-sample Kolmogorov-Smirnov test on binned data.

    The statistic is ``max_i |CDF_ref(i) - CDF_cur(i)|`` over cumulative bin fractions. Binning can only
    hide CDF differences inside bins, so this is a lower bound of the unbinned statistic (equal to it when
    every distinct value has its own bin) and the test is conservative. The p-value is the asymptotic
    Kolmogorov tail ``Q(sqrt(n_eff) * D)`` with ``n_eff = n_ref n_cur / (n_ref + n_cur)``, and the critical
    value is ``sqrt(-ln(alpha / 2) / 2) / sqrt(n_eff)``.

    Args:
        ref_counts: reference counts ``[B]`` or ``[F, B]``, bins in increasing order.
        cur_counts: current counts, same shape.
        alpha: level of ``critical_value``.

    Returns:
        :class:`KSResult` ``(statistic, pvalue, critical_value, n_eff)``.

    Example:
        >>> res = ks_binned([5, 5, 0], [0, 5, 5])
        >>> float(res.statistic), float(res.n_eff), round(float(res.pvalue), 4), round(float(res.critical_value), 4)
        (0.5, 5.0, 0.1641, 0.6074)
    """
    r, c = _pair(ref_counts, cur_counts, "ks_binned")
    n_ref, n_cur = r.sum(-1), c.sum(-1)
    d = (torch.cumsum(r, -1) / n_ref.unsqueeze(-1) - torch.cumsum(c, -1) / n_cur.unsqueeze(-1)).abs().amax(-1)
    n_eff = n_ref * n_cur / (n_ref + n_cur)
    pvalue = kolmogorov_sf(torch.sqrt(n_eff) * d)
    critical = math.sqrt(-math.log(alpha / 2.0) / 2.0) / torch.sqrt(n_eff)
    return KSResult(d, pvalue, critical, n_eff)


def jensen_shannon(p: Any, q: Any) -> torch.Tensor:
    """Jensen-Shannon divergence in bits, in ``[0, 1]`` (its square root is a metric).

    ``JS = (KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2``; terms with ``p_i = 0`` are 0, so
    empty bins need no smoothing. Inputs are counts or probabilities (normalised per row).

    Args:
        p: ``[B]`` or ``[F, B]``.
        q: same shape.

    Example:
        >>> float(jensen_shannon([1, 0], [0, 1])), float(jensen_shannon([1, 2], [2, 4]))
        (1.0, 0.0)
    """
    a, b = _pair(p, q, "jensen_shannon", counts=False)
    a, b = _normalise(a), _normalise(b)
    m = 0.5 * (a + b)

    def kl(x: torch.Tensor) -> torch.Tensor:
        ratio = torch.where(x > 0, x / m, torch.ones_like(x))
        return (x * torch.log2(ratio)).sum(-1)

    return (0.5 * (kl(a) + kl(b))).clamp(0.0, 1.0)


class ChiSquaredResult(NamedTuple):
    """:func:`chi_squared` results: statistic (float64), dof (int64) and pvalue (float64) tensors.

    Example:
        >>> import torch
        >>> result = chi_squared(torch.tensor([10.0, 10.0, 10.0]), torch.tensor([0.0, 5.0, 25.0]))
        >>> round(result.statistic.item(), 2), int(result.dof), bool(result.pvalue < 1e-3)
        (18.1, 2, True)
    """

    statistic: torch.Tensor
    dof: torch.Tensor
    pvalue: torch.Tensor


def chi_squared(ref_counts: Any, cur_counts: Any) -> ChiSquaredResult:
    """Two-sample chi-square test of homogeneity on binned counts (unequal totals allowed).

    ``X2 = sum_i (sqrt(S/R) r_i - sqrt(R/S) s_i)^2 / (r_i + s_i)`` over bins non-empty in either sample
    (``R``, ``S`` the totals): the Pearson statistic of the ``2 x B`` contingency table. Degrees of freedom
    are the number of such bins minus 1, and the p-value is :func:`chi2_sf`.

    Args:
        ref_counts: reference counts ``[B]`` or ``[F, B]`` (e.g. :class:`LabelCounts` counts).
        cur_counts: current counts, same shape.

    Example:
        >>> res = chi_squared([50, 50], [30, 70])
        >>> round(float(res.statistic), 4), int(res.dof), round(float(res.pvalue), 4)
        (8.3333, 1, 0.0039)
    """
    r, c = _pair(ref_counts, cur_counts, "chi_squared")
    big_r, big_s = r.sum(-1, keepdim=True), c.sum(-1, keepdim=True)
    both = r + c
    used = both > 0
    terms = (torch.sqrt(big_s / big_r) * r - torch.sqrt(big_r / big_s) * c) ** 2 / torch.where(used, both, 1.0)
    stat = torch.where(used, terms, torch.zeros_like(terms)).sum(-1)
    dof = used.sum(-1) - 1
    return ChiSquaredResult(stat, dof, chi2_sf(stat, dof))


def linf(p: Any, q: Any) -> torch.Tensor:
    """Largest absolute difference of proportions, ``max_i |p_i - q_i|`` (e.g. label distributions).

    Args:
        p: counts or probabilities ``[B]`` or ``[F, B]`` (normalised per row).
        q: same shape.

    Example:
        >>> round(float(linf([50, 30, 20], [40, 40, 20])), 6)
        0.1
    """
    a, b = _pair(p, q, "linf", counts=False)
    return (_normalise(a) - _normalise(b)).abs().amax(-1)
