"""``padding_in_loss``: per-token labels at padded positions that the loss counts.

A collate that copies input_ids into labels without masking the padding gives a share of 1.0; HF's collators
and a correct collate give 0. Above ``threshold`` the model is also trained to predict padding.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch

from lightwatch.checks.data.base import CheckContext, DataCheck

__all__ = ["PaddingInLoss"]

_MASK_KEYS = ("attention_mask",)


class PaddingInLoss(DataCheck):
    """The share of padded positions (``attention_mask`` 0) whose label is not ``ignore_index``.

    First-batch tier: the monitor looks at the first training batches (at most ``max_batches``) until one
    holds padding, a batch mapping with an ``attention_mask`` that has zeros beside a label field of the same
    shape.

    Example:
        >>> import torch
        >>> batch = {"attention_mask": torch.tensor([[1, 1, 0]]), "labels": torch.tensor([[5, 6, 0]])}
        >>> PaddingInLoss.probe(batch["attention_mask"], [batch["labels"]], ignore_index=-100).tolist()
        [[1.0, 1.0]]
    """

    name = "padding_in_loss"
    tier = "first_batch"
    defaults = {"threshold": 0.5}
    bounds = {"threshold": (0.0, 1.0, True)}
    #: training batches looked at, at most, for one with padding
    max_batches = 16

    @staticmethod
    def mask_of(batch: Any) -> Optional[torch.Tensor]:
        """The batch's attention mask, if it is a mapping that holds one."""
        if not isinstance(batch, Mapping):
            return None
        return next((batch[k] for k in _MASK_KEYS if isinstance(batch.get(k), torch.Tensor)), None)

    @staticmethod
    def probe(mask: torch.Tensor, labels: Sequence[torch.Tensor], ignore_index: int) -> torch.Tensor:
        """``[padded positions, padded positions the loss counts]`` per label tensor (on the device)."""
        padded = mask == 0
        rows = []
        for t in labels:
            counted = (t != ignore_index) & padded
            rows.append(torch.stack([padded.sum().float(), counted.sum().float()]))
        return torch.stack(rows)

    def judge_labels(self, ctx: CheckContext, names: List[str], values: List[Tuple[float, float]],
                     ignore_index: Optional[int]) -> None:
        """Alert on each label field whose share of counted padded positions is above ``threshold``."""
        step = ctx.step
        for name, (n_pad, counted) in zip(names, values):
            share = counted / n_pad if n_pad > 0 else 0.0
            if share > self["threshold"]:
                self.alert(ctx, subject=f"train/{name}", value=share, threshold=self["threshold"], message=(
                    f"{100 * share:.3g}% of the padded positions (attention_mask 0) of training batch at "
                    f"step {step} have a label in {name!r} other than ignore_index "
                    f"{ignore_index}: the loss counts the padding, so the model is also trained to "
                    f"predict pad tokens and the loss reads better than the model is. Set the labels "
                    f"of padded positions to {ignore_index} in the collate (HF's "
                    f"DataCollatorForLanguageModeling does), or pass ignore_index to the loss."))
