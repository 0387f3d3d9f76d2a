"""Per-feature moments (count, non-finite counts, min, max, mean, variance) that merge exactly.

Why shifted sums: the naive ``E[x^2] - E[x]^2`` loses every digit on data like ``1e6 + N(0, 1e-2)``, and
Chan's pairwise ``(n, mean, M2)`` merge, though stable, is not a sum, so it cannot ride a SUM all-reduce.
:class:`Moments` therefore keeps, per feature, a ``shift`` ``c`` and the float64 sums ``S1 = sum(x - c)``
and ``S2 = sum((x - c)^2)`` over finite values. Sums with the same shift merge by plain addition (exact
up to float64 rounding, associative, order independent), and ``M2 = S2 - S1^2 / n`` is stable because
``c`` is close to the mean, so ``S1`` is small.

The shift of a feature is frozen the first time the feature gets a finite value (the batch mean of
those values) unless given up front (``shift=``, e.g. a reference profile's means, or
:meth:`Moments.empty_like`). Ranks must agree on the shift before their sums are added; the MAX
buffer carries every rank's shift and :meth:`Moments.sum_state` re-centres its sums on the largest one
(``S1' = S1 + n d``, ``S2' = S2 + 2 d S1 + n d^2`` with ``d = c_rank - c``, exact up to rounding and
free of cancellation) before the SUM, so no separate agreement step is needed. After
:meth:`Moments.load_reduced` all ranks hold the same shift, and :meth:`Moments.reset` keeps it.

Across runs, :meth:`Moments.merge` uses Chan's pairwise merge (:func:`chan_merge`) on ``(n, mean, M2)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple, Union

import torch

from lightwatch.metrics._state import StateReader, encode_floats, encode_ints
from lightwatch.metrics.base import Device, ReducibleStatistic, may_read_values
from lightwatch.metrics.features import to_feature_matrix

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Moments", "chan_merge"]

_F64 = torch.float64
_INF = float("inf")
Number = Union[float, int, torch.Tensor]


def chan_merge(
    n_a: Number, mean_a: Number, m2_a: Number, n_b: Number, mean_b: Number, m2_b: Number
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s pairwise merge of ``(count, mean, M2)`` summaries, elementwise.

    ``M2`` is the sum of squared deviations from the mean. Empty sides (count 0) are ignored, so their
    mean may be NaN. The merge is exact in real arithmetic, and stable in floating point because it
    only combines deviations (``delta = mean_b - mean_a``), never raw second moments.

    Args:
        n_a, mean_a, m2_a: the first summary (numbers or tensors; broadcast together).
        n_b, mean_b, m2_b: the second summary.

    Returns:
        ``(n, mean, m2)`` as float64 tensors; ``mean`` is NaN where ``n == 0``.

    Example:
        >>> n, mean, m2 = chan_merge(2, 2.0, 2.0, 1, 5.0, 0.0)  # [1, 3] and [5]
        >>> float(n), float(mean), float(m2 / n)
        (3.0, 3.0, 2.6666666666666665)
    """
    n_a, mean_a, m2_a, n_b, mean_b, m2_b = (torch.as_tensor(v, dtype=_F64) for v in (n_a, mean_a, m2_a, n_b, mean_b, m2_b))
    n = n_a + n_b
    has_a, has_b = n_a > 0, n_b > 0
    ma = torch.where(has_a, mean_a, torch.zeros_like(mean_a))
    mb = torch.where(has_b, mean_b, torch.zeros_like(mean_b))
    m2a = torch.where(has_a, m2_a, torch.zeros_like(m2_a))
    m2b = torch.where(has_b, m2_b, torch.zeros_like(m2_b))
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    delta = mb - ma
    mean = ma + delta * (n_b / safe_n)
    m2 = m2a + m2b + delta * delta * (n_a * n_b / safe_n)
    # Exact pass-through when one side is empty, and NaN mean for no data at all.
    mean = torch.where(has_a & has_b, mean, torch.where(has_a, ma, mb))
    mean = torch.where(n > 0, mean, torch.full_like(mean, float("nan")))
    return n, mean, m2


class Moments(ReducibleStatistic):
    """Per-feature count, NaN/+Inf/-Inf counts, min, max, mean and variance of finite values.

    Non-finite values are excluded from min/max/mean/variance and counted separately. Updates run on the
    input's device with no host sync; state is float64 (counts int64). See the module docstring for the
    shifted-sum scheme that makes SUM all-reduces exact and stable.

    Args:
        num_features: number of features ``F``; ``None`` takes it from the first batch (then
            :meth:`sum_state` and friends need at least one update on every rank, so pass it under DDP).
        feature_dim: the dimension of a batch holding the features (``-1`` tabular, ``1`` images); see
            :func:`~lightwatch.metrics.to_feature_matrix`.
        shift: optional per-feature shift (``F`` values, NaN = choose from data), e.g. reference means.
        device: where the (empty) state starts; it follows the first batch's device anyway.

    Example:
        >>> import torch
        >>> m = Moments(num_features=2)
        >>> m.update(torch.tensor([[1.0, 10.0], [3.0, float("nan")], [5.0, float("inf")]]))
        >>> out = m.compute()
        >>> out["mean"].tolist(), out["var"].tolist(), out["nan_count"].tolist(), out["posinf_count"].tolist()
        ([3.0, 10.0], [2.6666666666666665, 0.0], [0, 1], [0, 1])
    """

    kind = "moments"
    version = 1

    def __init__(
        self,
        num_features: Optional[int] = None,
        feature_dim: int = -1,
        shift: Optional[Union[Sequence[float], torch.Tensor]] = None,
        device: Device = None,
    ) -> None:
        self.feature_dim = feature_dim
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._num_features: Optional[int] = None
        shift_t = None
        if shift is not None:
            shift_t = torch.as_tensor(shift, dtype=_F64).reshape(-1)
            if num_features is not None and shift_t.numel() != num_features:
                raise ValueError(f"shift has {shift_t.numel()} entries but num_features is {num_features}")
            num_features = shift_t.numel()
        if num_features is not None:
            self._allocate(int(num_features))
            if shift_t is not None:
                self.shift = shift_t.to(self._device)

    # -- state -----------------------------------------------------------------------------------------
    def _allocate(self, num_features: int) -> None:
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        f, dev = num_features, self._device
        self._num_features = f
        self.count = torch.zeros(f, dtype=torch.int64, device=dev)
        self.nan_count = torch.zeros(f, dtype=torch.int64, device=dev)
        self.posinf_count = torch.zeros(f, dtype=torch.int64, device=dev)
        self.neginf_count = torch.zeros(f, dtype=torch.int64, device=dev)
        self.shift = torch.full((f,), float("nan"), dtype=_F64, device=dev)
        self.shifted_sum = torch.zeros(f, dtype=_F64, device=dev)
        self.shifted_sum_sq = torch.zeros(f, dtype=_F64, device=dev)
        self.min = torch.full((f,), _INF, dtype=_F64, device=dev)
        self.max = torch.full((f,), -_INF, dtype=_F64, device=dev)

    _TENSORS = ("count", "nan_count", "posinf_count", "neginf_count", "shift", "shifted_sum", "shifted_sum_sq",
                "min", "max")

    @property
    def num_features(self) -> Optional[int]:
        """Number of features ``F`` (``None`` until the first batch when not given)."""
        return self._num_features

    @property
    def device(self) -> torch.device:
        """Device of the state (follows the batches)."""
        return self._device

    def to(self, device: Device) -> "Self":
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        if self._num_features is not None:
            for name in self._TENSORS:
                setattr(self, name, getattr(self, name).to(self._device))
        return self

    def _require_features(self, what: str) -> int:
        if self._num_features is None:
            raise ValueError(f"Moments.{what}: the number of features is unknown; pass num_features= "
                             "(every rank must build buffers of the same size)")
        return self._num_features

    def reset(self, keep_shift: bool = True) -> None:
        """Forget the data. The shift is kept by default so ranks stay aligned epoch after epoch."""
        if self._num_features is None:
            return
        shift = self.shift
        self._allocate(self._num_features)
        if keep_shift:
            self.shift = shift

    def empty_like(self) -> "Moments":
        """An empty ``Moments`` with the same configuration, shifted to this one's means (where known).

        Deterministic in the state, so ranks holding the same reduced state build aligned statistics.
        """
        f = self._require_features("empty_like")
        out = Moments(num_features=f, feature_dim=self.feature_dim, device=self._device)
        mean = self.compute()["mean"]
        out.shift = torch.where(torch.isnan(mean), self.shift, mean)
        return out

    def recenter(self, shift: Union[Sequence[float], torch.Tensor]) -> None:
        """Re-express the sums around a new per-feature ``shift`` (NaN entries keep the current shift)."""
        f = self._require_features("recenter")
        new = torch.as_tensor(shift, dtype=_F64).reshape(-1).to(self._device)
        if new.numel() != f:
            raise ValueError(f"shift has {new.numel()} entries, expected {f}")
        new = torch.where(torch.isnan(new), self.shift, new)
        self.shifted_sum, self.shifted_sum_sq = self._recentred(new)
        self.shift = new

    def _recentred(self, new_shift: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # Unset shifts (no data yet) and unset targets move nothing: their sums are zero.
        d = torch.where(torch.isnan(self.shift) | ~torch.isfinite(new_shift),
                        torch.zeros_like(self.shift), self.shift - new_shift)
        n = self.count.to(_F64)
        s1 = self.shifted_sum + n * d
        s2 = self.shifted_sum_sq + 2.0 * d * self.shifted_sum + n * d * d
        return s1, s2

    # -- accumulation ----------------------------------------------------------------------------------
    def update(self, x: Any) -> None:
        """Accumulate a batch (any layout; features along ``feature_dim``) on its device, no host sync.

        Args:
            x: a real or bool tensor.
        """
        x = to_feature_matrix(x, self.feature_dim)
        if x.is_complex():
            raise TypeError("Moments does not support complex tensors")
        f = x.shape[1]
        if self._num_features is None:
            self._device = x.device
            self._allocate(f)
        elif f != self._num_features:
            raise ValueError(f"Moments: batch has {f} features, expected {self._num_features}")
        if x.device != self._device:
            self.to(x.device)
        if x.shape[0] == 0:
            return
        xf = x.to(_F64)
        if may_read_values(xf) and bool(torch.isfinite(xf.sum())):
            self._update_finite(xf)
            return
        finite = torch.isfinite(xf)
        self.nan_count += torch.isnan(xf).sum(0)
        self.posinf_count += (xf == _INF).sum(0)
        self.neginf_count += (xf == -_INF).sum(0)
        n_b = finite.sum(0)
        xz = torch.where(finite, xf, 0.0)
        batch_mean = xz.sum(0) / n_b.clamp_min(1)
        self.shift = torch.where(torch.isnan(self.shift) & (n_b > 0), batch_mean, self.shift)
        d = torch.where(finite, xf - self.shift, 0.0)
        self.shifted_sum += d.sum(0)
        self.shifted_sum_sq += (d * d).sum(0)
        self.count += n_b
        self.min = torch.minimum(self.min, torch.where(finite, xf, _INF).amin(0))
        self.max = torch.maximum(self.max, torch.where(finite, xf, -_INF).amax(0))

    def _update_finite(self, xf: torch.Tensor) -> None:
        # The same sums as the masked update with every mask true (bit for bit), without building the masks:
        # on the CPU a host read waits for nothing, and a batch whose sum is finite has only finite values.
        n_b = torch.full_like(self.count, xf.shape[0])
        self.shift = torch.where(torch.isnan(self.shift), xf.sum(0) / n_b.clamp_min(1), self.shift)
        d = xf - self.shift
        self.shifted_sum += d.sum(0)
        self.shifted_sum_sq += d.square_().sum(0)
        self.count += n_b
        self.min = torch.minimum(self.min, xf.amin(0))
        self.max = torch.maximum(self.max, xf.amax(0))

    def chan_state(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(n, mean, M2)`` per feature as float64 tensors (mean NaN where ``n == 0``)."""
        self._require_features("chan_state")
        n = self.count.to(_F64)
        safe_n = n.clamp_min(1.0)
        mean = torch.where(n > 0, self.shift + self.shifted_sum / safe_n, torch.full_like(n, float("nan")))
        m2 = torch.where(n > 0, self.shifted_sum_sq - self.shifted_sum * self.shifted_sum / safe_n,
                         torch.zeros_like(n)).clamp_min(0.0)
        return n, mean, m2

    def merge(self, other: "Moments") -> "Moments":
        """Fold ``other`` in with Chan's merge (exact, order independent up to rounding); returns ``self``."""
        self._check_kind(other)
        if other._num_features is None:
            return self
        if self._num_features is None:
            self._allocate(other._num_features)
        if other._num_features != self._num_features:
            raise ValueError(f"cannot merge Moments of {other._num_features} features into {self._num_features}")
        dev = self._device
        o = {name: getattr(other, name).to(dev) for name in self._TENSORS}
        n_b = o["count"].to(_F64)
        safe_b = n_b.clamp_min(1.0)
        mean_b = o["shift"] + o["shifted_sum"] / safe_b
        m2_b = (o["shifted_sum_sq"] - o["shifted_sum"] ** 2 / safe_b).clamp_min(0.0)
        n, mean, m2 = chan_merge(*self.chan_state(), n_b, mean_b, m2_b)
        fallback = torch.where(torch.isnan(self.shift), o["shift"], self.shift)
        self.shift = torch.where(n > 0, mean, fallback)
        self.shifted_sum = torch.zeros_like(m2)
        self.shifted_sum_sq = torch.where(n > 0, m2, torch.zeros_like(m2))
        for name in ("count", "nan_count", "posinf_count", "neginf_count"):
            setattr(self, name, getattr(self, name) + o[name])
        self.min = torch.minimum(self.min, o["min"])
        self.max = torch.maximum(self.max, o["max"])
        return self

    def compute(self, ddof: int = 0) -> Dict[str, torch.Tensor]:
        """Per-feature results (tensors ``[F]`` on the state's device).

        Args:
            ddof: delta degrees of freedom of ``var``/``std`` (0: population, 1: unbiased sample).

        Returns:
            ``count`` (finite values), ``nan_count``, ``posinf_count``, ``neginf_count``, ``total``, and
            ``min``, ``max``, ``mean``, ``var``, ``std`` over finite values (NaN without enough data).
        """
        self._require_features("compute")
        n, mean, m2 = self.chan_state()
        nan = torch.full_like(n, float("nan"))
        var = torch.where(n > ddof, m2 / (n - ddof).clamp_min(1.0), nan)
        has = self.count > 0
        return {
            "count": self.count.clone(),
            "nan_count": self.nan_count.clone(),
            "posinf_count": self.posinf_count.clone(),
            "neginf_count": self.neginf_count.clone(),
            "total": self.count + self.nan_count + self.posinf_count + self.neginf_count,
            "min": torch.where(has, self.min, nan),
            "max": torch.where(has, self.max, nan),
            "mean": mean,
            "var": var,
            "std": var.sqrt(),
        }

    # -- cross-rank reduction --------------------------------------------------------------------------
    @property
    def sum_size(self) -> int:
        """``6 F + 1``."""
        return 6 * self._require_features("sum_size") + 1

    @property
    def max_size(self) -> int:
        """``4 F``."""
        return 4 * self._require_features("max_size")

    def max_state(self) -> torch.Tensor:
        """``[max, -min, shift, -shift]`` (each ``F``); an unset shift is ``-inf`` so it never wins."""
        self._require_features("max_state")
        unset = torch.isnan(self.shift)
        ninf = torch.full_like(self.shift, -_INF)
        return torch.cat([self.max, -self.min, torch.where(unset, ninf, self.shift),
                          torch.where(unset, ninf, -self.shift)])

    def sum_state(self, max_reduced: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[count, nan, +inf, -inf, S1, S2]`` (each ``F``) and one "not re-centred" flag.

        Args:
            max_reduced: this statistic's slice of the MAX-reduced buffer. When given, ``S1``/``S2`` are
                re-centred on the largest shift over ranks, so ranks that froze different shifts still sum
                exactly. When omitted, the local shift is used and the flag is set, and
                :meth:`load_reduced` raises if the ranks' shifts turn out to differ.
        """
        f = self._require_features("sum_state")
        if max_reduced is not None:
            if max_reduced.numel() != 4 * f:
                raise ValueError(f"Moments.sum_state: max_reduced has {max_reduced.numel()} entries, expected {4 * f}")
            common = max_reduced.reshape(-1)[2 * f:3 * f].to(self._device, _F64)
            s1, s2 = self._recentred(common)
            flag = torch.zeros(1, dtype=_F64, device=self._device)
        else:
            s1, s2 = self.shifted_sum, self.shifted_sum_sq
            flag = torch.ones(1, dtype=_F64, device=self._device)
        counts = torch.cat([self.count, self.nan_count, self.posinf_count, self.neginf_count]).to(_F64)
        return torch.cat([counts, s1, s2, flag])

    def load_reduced(self, sum_buf: torch.Tensor, max_buf: torch.Tensor) -> None:
        """Set the state from this statistic's slices of the SUM- and MAX-reduced buffers.

        Raises:
            ValueError: if some rank summed without re-centring while ranks' shifts differed.
        """
        f = self._require_features("load_reduced")
        self._check_sizes(sum_buf, max_buf)
        s = sum_buf.reshape(-1).to(self._device, _F64)
        m = max_buf.reshape(-1).to(self._device, _F64)
        common, neg = m[2 * f:3 * f], m[3 * f:]
        if bool(s[-1] > 0) and bool((torch.isfinite(common) & (common != -neg)).any()):
            raise ValueError(
                "Moments.load_reduced: ranks accumulated around different shifts and at least one rank "
                "summed without re-centring; pass the MAX-reduced buffer to sum_state()/pack_sum(), or give "
                "every rank the same shift (shift=..., empty_like(), or a previous load_reduced)")
        counts = s[:4 * f].round().to(torch.int64).reshape(4, f)
        self.count, self.nan_count, self.posinf_count, self.neginf_count = (c.clone() for c in counts)
        self.shifted_sum = s[4 * f:5 * f].clone()
        self.shifted_sum_sq = s[5 * f:6 * f].clone()
        self.max = m[:f].clone()
        self.min = -m[f:2 * f]
        self.shift = torch.where(torch.isfinite(common), common, torch.full_like(common, float("nan")))

    # -- serialisation ---------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """JSON-safe state: ints for counts, floats (``"nan"``/``"inf"``/``"-inf"`` strings) otherwise."""
        out: Dict[str, Any] = {"kind": self.kind, "version": self.version, "num_features": self._num_features,
                               "feature_dim": self.feature_dim}
        for name in self._TENSORS:
            if self._num_features is None:
                out[name] = []
            elif name.endswith("count"):
                out[name] = encode_ints(getattr(self, name))
            else:
                out[name] = encode_floats(getattr(self, name))
        return out

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "Moments":
        """Rebuild from :meth:`state_dict` output (on CPU); ``ValueError`` names any problem."""
        r = StateReader(state, "Moments", cls.kind, cls.version, ("num_features", "feature_dim") + cls._TENSORS)
        f = r.int_value("num_features", minimum=1, allow_none=True)
        feature_dim = r.int_value("feature_dim")
        assert feature_dim is not None
        out = cls(num_features=f, feature_dim=feature_dim)
        if f is None:
            return out
        for name in cls._TENSORS:
            if name.endswith("count"):
                setattr(out, name, r.ints(name, (f,)))
            else:
                setattr(out, name, r.floats(name, (f,)))
        return out
