"""Reshaping a batch of any layout into a ``[n_values, F]`` feature matrix on its device."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["to_feature_matrix"]


def to_feature_matrix(x: Any, feature_dim: int = -1) -> torch.Tensor:
    """View or copy ``x`` as ``[n_values, F]`` with the ``F`` entries of ``feature_dim`` as columns.

    Every other dimension (batch, time, height, width...) is folded into rows, so per-feature statistics
    of tabular ``[N, F]`` batches use ``feature_dim=-1`` and per-channel statistics of images
    ``[N, C, H, W]`` use ``feature_dim=1``. A 0-d or 1-d input is one feature: ``[N] -> [N, 1]``.
    Only shape metadata is read, so there is no host sync; a copy is made only when moving the feature
    dimension last requires one.

    Args:
        x: a tensor (anything ``torch.as_tensor`` accepts) of any shape.
        feature_dim: the dimension holding the features; ignored for 0-d and 1-d inputs.

    Returns:
        A 2-D tensor on ``x``'s device with ``x``'s dtype.

    Example:
        >>> import torch
        >>> to_feature_matrix(torch.zeros(8, 3, 4, 4), feature_dim=1).shape
        torch.Size([128, 3])
        >>> to_feature_matrix(torch.arange(5)).shape
        torch.Size([5, 1])
    """
    x = torch.as_tensor(x)
    if x.dim() <= 1:
        return x.reshape(-1, 1)
    dim = feature_dim if feature_dim >= 0 else x.dim() + feature_dim
    if not 0 <= dim < x.dim():
        raise ValueError(f"feature_dim={feature_dim} is out of range for a {x.dim()}-d batch of shape {tuple(x.shape)}")
    return torch.movedim(x, dim, -1).reshape(-1, x.shape[dim])
