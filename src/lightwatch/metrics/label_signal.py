"""Whether labels depend on the inputs at all: nearest-neighbour label agreement against chance.

A model can only learn labels that depend on its inputs. Before any training, one model-free test of
that is the leave-one-out nearest-neighbour agreement: for each sampled row, does its nearest other row
(Euclidean, on standardised features) carry the same label? When labels are independent of the inputs
(shuffled, or paired with the wrong rows), the agreement equals the chance that two random rows share a
label, ``q = sum_c n_c (n_c - 1) / (n (n - 1))``; on any learnable task it is far above it (scikit-learn's
digits: 0.98 against 0.10). The score is the z-statistic of the observed agreements against that chance,
``(agree - n q) / sqrt(var)``, where the variance counts that the agreements are not independent (mutual
nearest neighbours are one event counted twice; two rows with the same neighbour share its label).

Heavy but partial label noise keeps the agreement above chance (70% random labels on digits: ~0.36), so
this finds labels *unrelated* to the inputs, not noisy ones. Inputs whose raw distances mean little
(token ids, raw audio) can also read near chance, which is why lightwatch reports it at ``info`` and lets
the not-learning check raise it.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

__all__ = ["NeighbourLabelAgreement"]


class NeighbourLabelAgreement:
    """Leave-one-out 1-nearest-neighbour label agreement of a bounded sample of ``(x, y)`` rows.

    Rows are flattened; with at most ``max_dims`` features they are kept as they are and standardised per
    feature at :meth:`compute`, with more they are first mapped to ``max_dims`` dimensions by a fixed random
    Gaussian projection (distances are kept approximately). Rows with a non-finite value or a label that is
    not a non-negative integer are left out. Work happens at :meth:`compute`: an ``n x n`` distance matrix
    in blocks, ``n <= max_rows``.

    Args:
        max_rows: rows kept (the first ones seen).
        max_dims: features kept before projecting.
        seed: seed of the projection.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(600, 5, generator=g)
        >>> y = (x[:, 0] > 0).long()                       # labels that depend on the inputs
        >>> signal = NeighbourLabelAgreement()
        >>> signal.update(x, y)
        >>> out = signal.compute()
        >>> out["agreement"] > 0.7 and out["z"] > 10
        True
        >>> shuffled = NeighbourLabelAgreement()
        >>> shuffled.update(x, y[torch.randperm(600, generator=g)])
        >>> abs(shuffled.compute()["z"]) < 4
        True
    """

    def __init__(self, max_rows: int = 2048, max_dims: int = 64, seed: int = 0) -> None:
        if int(max_rows) < 10 or int(max_dims) < 1:
            raise ValueError(f"NeighbourLabelAgreement: max_rows must be >= 10 and max_dims >= 1, got "
                             f"{max_rows!r}, {max_dims!r}.")
        self.max_rows, self.max_dims, self.seed = int(max_rows), int(max_dims), int(seed)
        self._rows: List[torch.Tensor] = []
        self._labels: List[torch.Tensor] = []
        self._projection: Optional[torch.Tensor] = None
        self._features: Optional[int] = None
        self.rows = 0

    @property
    def full(self) -> bool:
        return self.rows >= self.max_rows

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the rows of a batch: ``x`` of shape ``[B, ...]`` (floating point), ``y`` of ``B`` class labels."""
        if self.full or x.dim() == 0 or not x.is_floating_point() or y.numel() != x.shape[0]:
            return
        x = x.detach().reshape(x.shape[0], -1).float().cpu()
        y = y.detach().reshape(-1).cpu()
        if self._features is None:
            self._features = x.shape[1]
            if self._features > self.max_dims:
                g = torch.Generator().manual_seed(self.seed)
                self._projection = torch.randn(self._features, self.max_dims, generator=g) / math.sqrt(self.max_dims)
        if x.shape[1] != self._features:
            return  # a batch of another shape: not comparable rows
        labels_ok = (y == y.round()) & (y >= 0) if y.is_floating_point() else (y >= 0)
        keep = torch.isfinite(x).all(1) & labels_ok & torch.isfinite(y.float())
        x, y = x[keep], y[keep].long()
        take = min(x.shape[0], self.max_rows - self.rows)
        if take <= 0:
            return
        x, y = x[:take], y[:take]
        if self._projection is not None:
            x = x @ self._projection
        self._rows.append(x)
        self._labels.append(y)
        self.rows += take

    def sums(self) -> torch.Tensor:
        """``[agreements, rows, expected agreements under independence, their variance]`` (float64).

        Sums over ranks combine exactly: each rank's neighbours are within its own sample.
        """
        if self.rows < 3:
            return torch.zeros(4, dtype=torch.float64)
        x = torch.cat(self._rows).double()
        y = torch.cat(self._labels)
        std = x.std(0)
        x = (x[:, std > 0] - x[:, std > 0].mean(0)) / std[std > 0]
        n = x.shape[0]
        nearest = torch.empty(n, dtype=torch.long)
        for start in range(0, n, 512):  # blocks keep the distance matrix small
            d = torch.cdist(x[start:start + 512], x)
            d[torch.arange(d.shape[0]), torch.arange(start, start + d.shape[0])] = float("inf")
            nearest[start:start + 512] = d.argmin(1)
        agree = float((y[nearest] == y).sum())
        counts = torch.bincount(y).double()
        chance = float((counts * (counts - 1)).sum()) / (n * (n - 1))
        share = counts / n
        triple = float(share.pow(3).sum())  # two agreements that share a row both hold: sum of p^3
        # The n agreement events are not independent: a mutual pair (each the other's nearest) is one event
        # counted twice, and two events that share a row are correlated through its label. Their covariances
        # under independent labels: q(1 - q) for a mutual pair, sum p^3 - q^2 for one shared row.
        incident = 1.0 + torch.bincount(nearest, minlength=n).double()  # edges at each row: its own, and in-edges
        sharing = float((incident * (incident - 1)).sum())  # ordered pairs of edges meeting at a row
        mutual = float((nearest[nearest] == torch.arange(n)).sum())  # ordered mutual pairs (met at both rows)
        var = (n + mutual) * chance * (1 - chance) + (sharing - 2 * mutual) * max(triple - chance ** 2, 0.0)
        return torch.tensor([agree, float(n), n * chance, var], dtype=torch.float64)

    @staticmethod
    def score(sums: torch.Tensor) -> Dict[str, float]:
        """``rows``, ``agreement``, ``chance`` and ``z`` from (possibly rank-summed) :meth:`sums`."""
        agree, n, expected, var = (float(v) for v in sums)
        if n < 3:
            return {"rows": n, "agreement": float("nan"), "chance": float("nan"), "z": float("nan")}
        z = (agree - expected) / math.sqrt(var) if var > 0 else (0.0 if agree == expected else float("inf"))
        return {"rows": n, "agreement": agree / n, "chance": expected / n, "z": z}

    def compute(self) -> Dict[str, float]:
        """This process's ``rows``, ``agreement``, ``chance`` and ``z``."""
        return self.score(self.sums())
