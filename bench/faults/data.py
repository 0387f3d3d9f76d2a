"""scikit-learn's 8x8 digits as train/val/test splits, with data faults applied as declared settings.

Every fault that lives in the data is a field of :class:`DataSpec` (label shuffling, label noise,
duplicates, train/val leakage, class imbalance, covariate shift, NaN, missing normalisation). The test
split is never touched: it is the clean yardstick the harm of a fault is measured on.

The order of operations is fixed so that the same seed gives the same data in every run:

1. split 1797 images into test (297), val (300) and train (1200) with the run's seed;
2. train-side label and sample faults: shuffled labels, label noise, class imbalance, duplicates;
3. leakage: val rows replaced by exact copies of (final) train rows;
4. scaling: per-pixel standardisation with the train statistics (constant pixels stay 0), or the raw
   0-16 pixels times ``input_scale`` when ``standardize`` is off;
5. covariate shift of the val split, in train standard deviations, on ``shift_features``;
6. NaN in ``nan_fraction`` of the train rows, at pixel ``nan_feature``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["CLASSES", "FEATURES", "DataSpec", "DigitsData", "load_digits_tensors"]

CLASSES = 10
FEATURES = 64
_N_TEST = 297
_N_VAL = 300

# The 4x4 centre of the 8x8 image: where the digits' strokes are, so a shift there matters.
CENTRE_FEATURES: Tuple[int, ...] = tuple(r * 8 + c for r in range(2, 6) for c in range(2, 6))


@functools.lru_cache(maxsize=1)
def load_digits_tensors() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(x [1797, 64] float32 in 0..16, y [1797] int64)`` (shipped with scikit-learn)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.tensor(digits.data, dtype=torch.float32), torch.tensor(digits.target, dtype=torch.long)


@dataclass(frozen=True)
class DataSpec:
    """What the data of a run looks like; the defaults are the healthy data.

    Args:
        batch_size: training (and evaluation) batch size.
        standardize: per-pixel standardisation with train statistics; off leaves raw pixels (0..16).
        input_scale: multiplier on the inputs after scaling (1 = none).
        label_shuffle: fraction of train labels permuted among themselves (1.0: unlearnable labels).
        label_noise: fraction of train labels replaced by a uniformly drawn class.
        duplicate_fraction: fraction of train rows replaced by copies of the other train rows.
        leak_fraction: fraction of val rows replaced by exact copies of train rows.
        minority_keep: share of the samples of classes ``minority_classes`` kept in train (1 = balanced).
        minority_classes: the classes made rare by ``minority_keep``.
        shift: covariate shift of the val split, in train standard deviations, added to ``shift_features``.
        shift_features: pixel indices shifted (the image centre by default).
        nan_fraction: fraction of train rows holding a NaN.
        nan_feature: pixel index set to NaN in those rows.
    """

    batch_size: int = 32
    standardize: bool = True
    input_scale: float = 1.0
    label_shuffle: float = 0.0
    label_noise: float = 0.0
    duplicate_fraction: float = 0.0
    leak_fraction: float = 0.0
    minority_keep: float = 1.0
    minority_classes: Tuple[int, ...] = (5, 6, 7, 8, 9)
    shift: float = 0.0
    shift_features: Tuple[int, ...] = CENTRE_FEATURES
    nan_fraction: float = 0.0
    nan_feature: int = 36

    def __post_init__(self) -> None:
        for name in ("label_shuffle", "label_noise", "duplicate_fraction", "leak_fraction", "nan_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"DataSpec: {name} must be in [0, 1], got {value!r}.")
        if not 0.0 < self.minority_keep <= 1.0:
            raise ValueError(f"DataSpec: minority_keep must be in (0, 1], got {self.minority_keep!r}.")
        if self.batch_size < 1:
            raise ValueError(f"DataSpec: batch_size must be >= 1, got {self.batch_size!r}.")
        if not 0 <= self.nan_feature < FEATURES:
            raise ValueError(f"DataSpec: nan_feature must be a pixel index in [0, {FEATURES}), got {self.nan_feature}.")


def _take(g: torch.Generator, n: int, fraction: float) -> torch.Tensor:
    """``round(fraction * n)`` distinct indices in ``[0, n)``."""
    k = int(round(fraction * n))
    return torch.randperm(n, generator=g)[:k]


def build_splits(spec: DataSpec, seed: int) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor]], Dict[str, Any]]:
    """The three splits ``{"train", "val", "test"}: (x, y)`` for ``seed``, and facts about what was planted."""
    x, y = load_digits_tensors()
    g = torch.Generator().manual_seed(10_000 + int(seed))
    order = torch.randperm(len(x), generator=g)
    test_idx, val_idx, train_idx = order[:_N_TEST], order[_N_TEST:_N_TEST + _N_VAL], order[_N_TEST + _N_VAL:]
    xt, yt = x[train_idx].clone(), y[train_idx].clone()
    xv, yv = x[val_idx].clone(), y[val_idx].clone()
    xs, ys = x[test_idx].clone(), y[test_idx].clone()
    planted: Dict[str, Any] = {}

    if spec.label_shuffle > 0:
        rows = _take(g, len(yt), spec.label_shuffle)
        yt[rows] = yt[rows[torch.randperm(len(rows), generator=g)]]
        planted["labels_shuffled"] = int(len(rows))
    if spec.label_noise > 0:
        rows = _take(g, len(yt), spec.label_noise)
        yt[rows] = torch.randint(0, CLASSES, (len(rows),), generator=g)
        planted["labels_noised"] = int(len(rows))
    if spec.minority_keep < 1.0:
        minority = torch.isin(yt, torch.tensor(spec.minority_classes))
        keep = ~minority | (torch.rand(len(yt), generator=g) < spec.minority_keep)
        planted["minority_dropped"] = int((~keep).sum())
        xt, yt = xt[keep], yt[keep]
    if spec.duplicate_fraction > 0:
        n = len(xt)
        k = int(round(spec.duplicate_fraction * n))
        k = min(k, n - 1)
        perm = torch.randperm(n, generator=g)
        unique, replaced = perm[: n - k], perm[n - k:]
        sources = unique[torch.randint(0, len(unique), (k,), generator=g)]
        xt[replaced], yt[replaced] = xt[sources], yt[sources]
        planted["train_duplicates"] = int(k)
    if spec.leak_fraction > 0:
        rows = _take(g, len(xv), spec.leak_fraction)
        sources = torch.randint(0, len(xt), (len(rows),), generator=g)
        xv[rows], yv[rows] = xt[sources], yt[sources]
        planted["val_rows_leaked"] = int(len(rows))

    if spec.standardize:
        mean, std = xt.mean(0), xt.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        xt, xv, xs = ((v - mean) / std for v in (xt, xv, xs))
    else:
        std = torch.ones(FEATURES)
        planted["raw_pixels"] = True
    if spec.input_scale != 1.0:
        xt, xv, xs = (v * spec.input_scale for v in (xt, xv, xs))
        planted["input_scale"] = spec.input_scale
    if spec.shift != 0.0:
        cols = torch.tensor(spec.shift_features)
        # in train standard deviations of the (scaled) inputs, so the shift means the same at any scale
        unit = xt[:, cols].std(0).clamp_min(1e-6)
        xv[:, cols] += spec.shift * unit
        planted["val_shifted_features"] = list(spec.shift_features)
    if spec.nan_fraction > 0:
        rows = _take(g, len(xt), spec.nan_fraction)
        rows = rows if len(rows) else torch.tensor([0])
        xt[rows, spec.nan_feature] = float("nan")
        planted["train_nan_rows"] = int(len(rows))
    return {"train": (xt, yt), "val": (xv, yv), "test": (xs, ys)}, planted


class DigitsData(pl.LightningDataModule):
    """The digits splits of one run as ``(x, y)`` batches (x: 64 float features, y: class 0-9).

    The splits are built at construction (not in ``setup``) so that a test or the evaluation can inspect
    exactly what the model will see. Training batches are shuffled with a generator of their own, so the
    data order depends on the seed only, never on what else consumed the global RNG.

    Args:
        spec: the data settings (healthy by default).
        seed: split, fault and order seed.

    Example:
        >>> dm = DigitsData(DataSpec(leak_fraction=0.5), seed=0)
        >>> dm.planted["val_rows_leaked"]
        150
    """

    def __init__(self, spec: Optional[DataSpec] = None, seed: int = 0) -> None:
        super().__init__()
        self.spec = spec or DataSpec()
        self.seed = int(seed)
        splits, self.planted = build_splits(self.spec, self.seed)
        self.train_set = TensorDataset(*splits["train"])
        self.val_set = TensorDataset(*splits["val"])
        self.test_set = TensorDataset(*splits["test"])

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(20_000 + self.seed)
        return DataLoader(self.train_set, batch_size=self.spec.batch_size, shuffle=True, generator=g)

    def first_nonfinite_step(self, max_steps: int) -> Optional[int]:
        """The first optimizer step whose training batch holds a NaN/Inf input, or ``None`` (one batch a step).

        Replays the training loader exactly as the fit loop reads it (same generator, same epochs), so the
        step is known before training: the onset of a NaN-in-data fault.
        """
        step = 0
        while step < max_steps:
            for x, _ in self.train_dataloader():
                if step >= max_steps:
                    return None
                if not bool(torch.isfinite(x).all()):
                    return step
                step += 1
        return None

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=100)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=100)
