"""Per-feature fixed-bin histograms with underflow/overflow/NaN buckets, counted on the device."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Union

import torch

from lightwatch.metrics._state import StateReader, encode_floats, encode_ints
from lightwatch.metrics.base import Device, ReducibleStatistic, may_read_values
from lightwatch.metrics.features import to_feature_matrix

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Histogram", "quantile_edges", "strictly_increasing"]

_F64 = torch.float64
FloatLike = Union[float, Sequence[float], torch.Tensor]


def _check_edges(edges: torch.Tensor) -> None:
    if edges.dim() not in (1, 2) or edges.shape[-1] < 2:
        raise ValueError(f"edges must be [bins + 1] or [F, bins + 1] with bins >= 1, got shape {tuple(edges.shape)}")
    if not bool(torch.isfinite(edges).all()):
        raise ValueError("edges must be finite (values beyond them go to the underflow/overflow buckets)")
    if not bool((edges[..., 1:] > edges[..., :-1]).all()):
        raise ValueError("edges must be strictly increasing along the last dimension")


def strictly_increasing(edges: torch.Tensor) -> torch.Tensor:
    """Raise each edge to at least one ulp above its left neighbour, in place, on the edges' device.

    No host read: the ``+inf`` direction is a device scalar, so this is safe in a CUDA step.
    """
    inf = torch.full((), float("inf"), dtype=edges.dtype, device=edges.device)
    for j in range(1, edges.shape[-1]):
        edges[..., j] = torch.maximum(edges[..., j], torch.nextafter(edges[..., j - 1], inf))
    return edges


def quantile_edges(x: torch.Tensor, bins: int, feature_dim: int = -1) -> torch.Tensor:
    """``[F, bins + 1]`` float64 edges at the ``bins``-quantiles of each feature of ``x``, on ``x``'s device.

    Non-finite values are ignored; a feature with no finite value gets ``0, 1/B, ..., 1``. The edges are
    strictly increasing. Nothing is read to the host (used inside a CUDA training step).

    Example:
        >>> quantile_edges(torch.arange(101.0), bins=4).tolist()
        [[0.0, 25.0, 50.0, 75.0, 100.0]]
    """
    xm = to_feature_matrix(x, feature_dim).to(_F64)
    n, f = xm.shape
    qs = torch.arange(bins + 1, dtype=_F64, device=xm.device) / bins
    default = qs.unsqueeze(0).expand(f, -1)
    if n == 0:
        return strictly_increasing(default.clone())
    finite = torch.isfinite(xm)
    ordered = torch.sort(torch.where(finite, xm, float("nan")), dim=0).values  # NaN sorts last
    nf = finite.sum(0)
    pos = qs.unsqueeze(1) * (nf - 1).clamp_min(0).to(_F64)  # [B + 1, F]
    lo, hi = pos.floor().long(), pos.ceil().long()
    frac = pos - lo.to(_F64)
    vals = torch.gather(ordered, 0, lo) * (1 - frac) + torch.gather(ordered, 0, hi) * frac
    return strictly_increasing(torch.where((nf > 0).unsqueeze(1), vals.T, default).contiguous())


class Histogram(ReducibleStatistic):
    """Per-feature counts in fixed bins, plus underflow, overflow and NaN counts; merges by summation.

    Bins follow ``numpy.histogram``: ``[e_0, e_1), ..., [e_{B-1}, e_B]`` (the last bin includes its right
    edge). Values below ``e_0`` (including ``-inf``) are underflow, above ``e_B`` (including ``+inf``)
    overflow, and NaNs are counted apart. Counting uses ``searchsorted`` and ``scatter_add_`` on the
    input's device, so ``update`` never syncs with an accelerator; on the CPU a batch of finite values is
    counted with one comparison per edge instead (same counts, several times faster). Edges are frozen at
    construction: given, :meth:`from_range`, :meth:`from_quantiles` of reference data, or :meth:`empty_like`
    of a reference histogram (e.g. one rebuilt with :meth:`from_state_dict` from a saved profile).

    Args:
        edges: ``[B + 1]`` edges shared by all features or ``[F, B + 1]`` per feature; finite, strictly
            increasing.
        num_features: ``F`` for shared 1-D edges (``None``: from the first batch).
        feature_dim: the dimension of a batch holding the features (``-1`` tabular, ``1`` images).
        device: where the (empty) state starts; it follows the first batch's device anyway.

    Example:
        >>> import torch
        >>> h = Histogram([0.0, 1.0, 2.0], num_features=1)
        >>> h.update(torch.tensor([-1.0, 0.5, 1.0, 2.0, 7.0, float("nan")]))
        >>> out = h.compute()
        >>> out["counts"].tolist(), out["underflow"].tolist(), out["overflow"].tolist(), out["nan_count"].tolist()
        ([[1, 2]], [1], [1], [1])
    """

    kind = "histogram"
    version = 1

    def __init__(self, edges: Union[Sequence[float], Sequence[Sequence[float]], torch.Tensor],
                 num_features: Optional[int] = None, feature_dim: int = -1, device: Device = None,
                 *, _trusted: bool = False) -> None:
        e = torch.as_tensor(edges, dtype=_F64).detach().clone()
        if not _trusted:
            _check_edges(e)  # reads the edges to the host
        self.feature_dim = feature_dim
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._num_features: Optional[int] = None
        self._edges = e
        if e.dim() == 2:
            if num_features is not None and num_features != e.shape[0]:
                raise ValueError(f"edges are for {e.shape[0]} features but num_features is {num_features}")
            self._allocate(e)
        elif num_features is not None:
            self._allocate(e.expand(int(num_features), -1).clone())

    @classmethod
    def from_range(cls, lo: FloatLike, hi: FloatLike, bins: int, num_features: Optional[int] = None,
                   feature_dim: int = -1, device: Device = None) -> "Histogram":
        """``bins`` equal-width bins between ``lo`` and ``hi`` (scalars, or one per feature).

        Args:
            lo: lowest edge, a scalar or ``F`` values.
            hi: highest edge (> ``lo``), a scalar or ``F`` values.
            bins: number of bins ``B``.
            num_features: ``F`` when ``lo`` and ``hi`` are scalars (``None``: from the first batch).
            feature_dim: the dimension of a batch holding the features.
            device: where the (empty) state starts.

        Example:
            >>> Histogram.from_range(0.0, 1.0, bins=4).edges.tolist()
            [0.0, 0.25, 0.5, 0.75, 1.0]
        """
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        lo_t = torch.as_tensor(lo, dtype=_F64).reshape(-1, 1)
        hi_t = torch.as_tensor(hi, dtype=_F64).reshape(-1, 1)
        steps = torch.arange(bins + 1, dtype=_F64) / bins
        edges = lo_t + (hi_t - lo_t) * steps
        edges[:, -1] = hi_t[:, 0]
        if edges.shape[0] == 1 and lo_t.numel() == 1 and hi_t.numel() == 1:
            edges = edges[0]
        return cls(edges, num_features=num_features, feature_dim=feature_dim, device=device)

    @classmethod
    def from_quantiles(cls, x: Any, bins: int, feature_dim: int = -1, device: Device = None) -> "Histogram":
        """Per-feature edges at the ``0, 1/B, ..., 1`` quantiles of the finite values of a reference batch.

        Equal-frequency bins are the usual choice for PSI. Repeated quantiles (discrete data) are nudged
        apart by one ulp so edges stay strictly increasing; features with no finite value get ``[0, 1]``.

        Args:
            x: reference data, features along ``feature_dim``.
            bins: number of bins ``B``.

        Example:
            >>> import torch
            >>> Histogram.from_quantiles(torch.arange(101.0), bins=4).edges.tolist()
            [[0.0, 25.0, 50.0, 75.0, 100.0]]
        """
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        edges = quantile_edges(x, bins, feature_dim)
        return cls(edges.cpu(), feature_dim=feature_dim, device=device)

    def _allocate(self, edges: torch.Tensor) -> None:
        self._edges = edges.to(self._device, _F64).contiguous()
        self._num_features = int(edges.shape[0])
        # Layout per feature: [underflow, bin_0 .. bin_{B-1}, overflow, nan].
        self._counts = torch.zeros(self._num_features, self.bins + 3, dtype=torch.int64, device=self._device)
        self._offsets = torch.arange(self._num_features, device=self._device).unsqueeze(1) * (self.bins + 3)

    @property
    def bins(self) -> int:
        """Number of in-range bins ``B``."""
        return int(self._edges.shape[-1]) - 1

    @property
    def num_features(self) -> Optional[int]:
        """Number of features ``F`` (``None`` until the first batch when not given)."""
        return self._num_features

    @property
    def device(self) -> torch.device:
        """Device of the state (follows the batches)."""
        return self._device

    @property
    def edges(self) -> torch.Tensor:
        """``[F, B + 1]`` edges, or the shared ``[B + 1]`` edges before ``F`` is known."""
        return self._edges

    def to(self, device: Device) -> "Self":
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._edges = self._edges.to(self._device)
        if self._num_features is not None:
            self._counts = self._counts.to(self._device)
            self._offsets = self._offsets.to(self._device)
        return self

    def _require_features(self, what: str) -> int:
        if self._num_features is None:
            raise ValueError(f"Histogram.{what}: the number of features is unknown; pass num_features= or "
                             "[F, bins + 1] edges (every rank must build buffers of the same size)")
        return self._num_features

    def reset(self) -> None:
        if self._num_features is not None:
            self._counts.zero_()

    def empty_like(self) -> "Histogram":
        """An empty histogram with the same (frozen) edges."""
        return Histogram(self._edges.clone(), feature_dim=self.feature_dim, device=self._device)

    def update(self, x: Any, rows: Optional[torch.Tensor] = None) -> None:
        """Count a batch (features along ``feature_dim``) on its device, no host sync.

        Args:
            x: a real or bool tensor.
            rows: optional bool mask over the rows of the ``[values, F]`` feature matrix: only those are
                counted (a sample of the batch; the mask costs no host sync either).

        Example:
            >>> import torch
            >>> h = Histogram([0.0, 1.0, 2.0], num_features=1)
            >>> h.update(torch.tensor([0.5, 1.5, 1.5]), rows=torch.tensor([True, False, True]))
            >>> h.compute()["counts"].tolist()
            [[1, 1]]
        """
        x = to_feature_matrix(x, self.feature_dim)
        if rows is not None and rows.shape != x.shape[:1]:
            raise ValueError(f"Histogram.update: rows has shape {tuple(rows.shape)}, expected ({x.shape[0]},)")
        if x.is_complex():
            raise TypeError("Histogram does not support complex tensors")
        f = x.shape[1]
        if self._num_features is None:
            self._device = x.device
            self._allocate(self._edges.expand(f, -1).clone())
        elif f != self._num_features:
            raise ValueError(f"Histogram: batch has {f} features, expected {self._num_features}")
        if x.device != self._device:
            self.to(x.device)
        if x.shape[0] == 0:
            return
        b = self.bins
        if may_read_values(x):  # on the CPU boolean indexing reads the mask for free
            if rows is not None:
                x = x[rows.to(x.device)]
                rows = None
            if bool(torch.isfinite(x.sum(dtype=_F64))):
                self._update_finite(x.to(_F64))
                return
        xt = x.to(_F64).T.contiguous()  # [F, n]: searchsorted wants matching leading dims
        idx = torch.searchsorted(self._edges, xt, right=True)  # 0: underflow, b + 1: overflow
        idx = torch.where(xt == self._edges[:, -1:], torch.full_like(idx, b), idx)
        idx = torch.where(torch.isnan(xt), torch.full_like(idx, b + 2), idx)
        flat = (idx + self._offsets).reshape(-1)
        ones = torch.ones_like(flat) if rows is None else rows.to(flat).expand_as(idx).reshape(-1)
        self._counts.view(-1).scatter_add_(0, flat, ones)

    def _update_finite(self, x: torch.Tensor) -> None:
        # Finite values on the CPU (a host read waits for nothing there): one comparison per edge and a count
        # per feature, instead of a binary search per value and a scatter. Four times faster at 10 bins on
        # 3,200 x 64 values, and the same counts: a value is in bin j when e_j <= x < e_{j+1}, in the last bin
        # when e_{B-1} <= x <= e_B.
        # The comparisons go into one reused bool buffer and are counted as bytes into int32 rows: counting a
        # fresh bool tensor into int64 took as long as the comparison itself.
        b = self.bins
        n = x.shape[0]
        edges = self._edges.T.contiguous()  # [B + 1, F]
        flags = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        as_bytes = flags.view(torch.uint8)
        at = torch.empty((b + 1, x.shape[1]), dtype=torch.int32, device=x.device)  # at[j]: values >= e_j
        for j in range(b):
            torch.ge(x, edges[j], out=flags)
            torch.sum(as_bytes, 0, dtype=torch.int32, out=at[j])
        torch.gt(x, edges[b], out=flags)
        torch.sum(as_bytes, 0, dtype=torch.int32, out=at[b])  # at[b]: values > e_B
        at_least = at.T.to(torch.int64)  # [F, B + 1]
        c = self._counts
        c[:, 0] += n - at_least[:, 0]
        c[:, 1:b] += at_least[:, :b - 1] - at_least[:, 1:b]
        c[:, b] += at_least[:, b - 1] - at_least[:, b]
        c[:, b + 1] += at_least[:, b]

    @property
    def counts(self) -> torch.Tensor:
        """In-range counts ``[F, B]``."""
        self._require_features("counts")
        return self._counts[:, 1:self.bins + 1]

    def binned_counts(self, include_tails: bool = True) -> torch.Tensor:
        """Counts ``[F, B + 2]`` as ``[underflow, bins..., overflow]`` (or ``[F, B]`` without tails).

        This is what drift measures such as :func:`~lightwatch.metrics.psi` should compare: mass that
        moves outside the reference range lands in the tails and is not lost.
        """
        self._require_features("binned_counts")
        return self._counts[:, :self.bins + 2].clone() if include_tails else self.counts.clone()

    def merge(self, other: "Histogram") -> "Histogram":
        """Add ``other``'s counts (its edges must be identical); returns ``self``."""
        self._check_kind(other)
        if other._num_features is None:
            return self
        if self._num_features is None:
            if self.bins != other.bins or not torch.equal(self._edges.to(other.device).expand_as(other.edges),
                                                          other.edges):
                raise ValueError("cannot merge histograms with different bin edges")
            self._allocate(other.edges.to(self._device))
        if other.edges.shape != self._edges.shape or not torch.equal(other.edges.to(self._device), self._edges):
            raise ValueError("cannot merge histograms with different bin edges")
        self._counts += other._counts.to(self._device)
        return self

    def compute(self) -> Dict[str, torch.Tensor]:
        """``edges [F, B+1]``, ``counts [F, B]``, ``underflow``, ``overflow``, ``nan_count``, ``total`` ``[F]``."""
        self._require_features("compute")
        b = self.bins
        return {
            "edges": self._edges.clone(),
            "counts": self.counts.clone(),
            "underflow": self._counts[:, 0].clone(),
            "overflow": self._counts[:, b + 1].clone(),
            "nan_count": self._counts[:, b + 2].clone(),
            "total": self._counts.sum(1),
        }

    # -- cross-rank reduction --------------------------------------------------------------------------
    @property
    def sum_size(self) -> int:
        """``F (B + 3)``: underflow, bins, overflow and NaN counts per feature."""
        return self._require_features("sum_size") * (self.bins + 3)

    @property
    def max_size(self) -> int:
        """``2 F (B + 1)``: the edges and their negation."""
        return 2 * self._require_features("max_size") * (self.bins + 1)

    def sum_state(self, max_reduced: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All bucket counts as float64 (exact below 2**53)."""
        self._require_features("sum_state")
        return self._counts.reshape(-1).to(_F64)

    def max_state(self) -> torch.Tensor:
        """``[edges, -edges]``: after the MAX they are equal iff every rank used the same edges."""
        self._require_features("max_state")
        e = self._edges.reshape(-1)
        return torch.cat([e, -e])

    def load_reduced(self, sum_buf: torch.Tensor, max_buf: torch.Tensor) -> None:
        """Set counts from the SUM-reduced buffer; ``ValueError`` if ranks' edges differed."""
        f = self._require_features("load_reduced")
        self._check_sizes(sum_buf, max_buf)
        m = max_buf.reshape(-1).to(self._device, _F64)
        half = m.numel() // 2
        if not torch.equal(m[:half], -m[half:]) or not torch.equal(m[:half], self._edges.reshape(-1)):
            raise ValueError("Histogram.load_reduced: ranks used different bin edges; freeze the edges from a "
                             "shared source (from_range, a reference profile) before counting")
        self._counts = sum_buf.reshape(f, self.bins + 3).to(self._device, _F64).round().to(torch.int64)

    # -- serialisation ---------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """JSON-safe state; ``edges`` is ``[F][B+1]`` (or ``[B+1]`` before ``F`` is known)."""
        out: Dict[str, Any] = {"kind": self.kind, "version": self.version, "num_features": self._num_features,
                               "feature_dim": self.feature_dim, "bins": self.bins}
        if self._num_features is None:
            out.update(edges=encode_floats(self._edges), counts=[], underflow=[], overflow=[], nan_count=[])
            return out
        b = self.bins
        out.update(
            edges=encode_floats(self._edges),
            counts=encode_ints(self.counts),
            underflow=encode_ints(self._counts[:, 0]),
            overflow=encode_ints(self._counts[:, b + 1]),
            nan_count=encode_ints(self._counts[:, b + 2]),
        )
        return out

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "Histogram":
        """Rebuild from :meth:`state_dict` output (on CPU); ``ValueError`` names any problem."""
        keys = ("num_features", "feature_dim", "bins", "edges", "counts", "underflow", "overflow", "nan_count")
        r = StateReader(state, "Histogram", cls.kind, cls.version, keys)
        f = r.int_value("num_features", minimum=1, allow_none=True)
        b = r.int_value("bins", minimum=1)
        feature_dim = r.int_value("feature_dim")
        assert b is not None and feature_dim is not None
        edges = r.floats("edges", (b + 1,) if f is None else (f, b + 1))
        try:
            out = cls(edges, feature_dim=feature_dim)
        except ValueError as exc:
            raise r.error(f"field 'edges': {exc}") from None
        if f is None:
            return out
        counts = torch.zeros(f, b + 3, dtype=torch.int64)
        counts[:, 1:b + 1] = r.ints("counts", (f, b))
        counts[:, 0] = r.ints("underflow", (f,))
        counts[:, b + 1] = r.ints("overflow", (f,))
        counts[:, b + 2] = r.ints("nan_count", (f,))
        out._counts = counts
        return out
