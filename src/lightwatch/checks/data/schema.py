"""``schema``: batches whose dtype or sample shape differs from the expected schema."""
from __future__ import annotations

from typing import Mapping

from lightwatch.checks.data.base import CheckContext, DataCheck

__all__ = ["SchemaChange"]


class SchemaChange(DataCheck):
    """Batches whose dtype or sample shape differs from the given, reference or learned schema.

    Per-batch tier, on the host (tensor metadata only): the schema is given (``schema=``), read from the
    reference profile, or learned over the first training epoch (dimensions that vary become variable).

    Example:
        >>> SchemaChange().rule
        'data_schema'
    """

    name = "schema"
    tier = "batch"
    severity = "error"

    def judge_split(self, ctx: CheckContext, count: float, notes: Mapping[str, str], where: str, at: int) -> None:
        """Alert on ``count`` batches with schema changes; ``notes``: what changed, per field (this rank)."""
        if not self.enabled:
            return
        what = ("batch(es) whose dtype or sample shape differs from the expected schema: " + (
            "; ".join(f"field {k!r}: {v}" for k, v in notes.items()) or "seen on another rank")
                + ". A changed transform or collate_fn, or a mixed-up dataset, usually causes this.")
        self.alert(ctx, subject=f"{ctx.split}/_all", value=count, step=at,
                   message=f"{int(count)} {ctx.split} {what} ({where}.)")
