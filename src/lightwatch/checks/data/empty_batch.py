"""``empty_batch``: batches with no samples."""
from __future__ import annotations

from lightwatch.checks.data.base import CheckContext, DataCheck

__all__ = ["EmptyBatch"]


class EmptyBatch(DataCheck):
    """Batches with 0 samples (a sampler, a filtering dataset or collate_fn, ``drop_last``).

    Per-batch tier, on the host.

    Example:
        >>> EmptyBatch().rule, EmptyBatch.severity
        ('data_empty_batch', 'warning')
    """

    name = "empty_batch"
    tier = "batch"

    def judge_split(self, ctx: CheckContext, count: float, where: str, at: int) -> None:
        """Alert on ``count`` empty batches of the split."""
        if not self.enabled:
            return
        self.alert(ctx, subject=f"{ctx.split}/_all", value=count, step=at,
                   message=f"{int(count)} {ctx.split} empty batch(es) (0 samples). Check the sampler, filtering in "
                           f"the dataset or collate_fn, and drop_last. ({where}.)")
