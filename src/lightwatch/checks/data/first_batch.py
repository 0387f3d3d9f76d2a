"""The checks of the first training batches: ``unnormalised`` and ``padding_in_loss``.

Both are measured on the device when the batch arrives and read once (under DDP after one MAX over the ranks,
so every rank raises the same alert): the input scale at the first logged step, the padding on the first batch
that has any (at most :attr:`~lightwatch.checks.data.padding_in_loss.PaddingInLoss.max_batches` batches).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from lightwatch.checks.data.buffers import SplitState
from lightwatch.checks.data.padding_in_loss import PaddingInLoss
from lightwatch.core.reduce import agree_max

__all__ = ["FirstBatchChecks"]


class FirstBatchChecks:
    """The part of :class:`~lightwatch.callbacks.DataQualityMonitor` that drives the first-batch checks.

    It keeps ``_scale_probe`` (the measured scale until it is read), ``_scale_checked`` and
    ``_padding_batches_left`` on the monitor, so a resumed run does not check again.

    Example:
        >>> from lightwatch.checks.data.unnormalised import Unnormalised
        >>> class Probe(FirstBatchChecks):
        ...     checks = {"unnormalised": Unnormalised(enabled=False)}
        ...     _scale_checked = False
        >>> probe = Probe()
        >>> probe._check_scale(None, None, SplitState("train", "step"), None, 0)
        >>> probe._scale_checked
        True
    """

    def _check_scale(self, trainer: Any, pl_module: Any, sp: SplitState, batch: Any, step: int) -> None:
        """``unnormalised``: |mean| and std of every floating input field of the first training batch.

        Computed on the device at the first batch and read at the first logged step (one small copy and, under
        DDP, one MAX over ranks, once per run).
        """
        check = self.checks["unnormalised"]
        if not check.enabled or sp.specs is None:
            self._scale_checked = True
            return
        if self._scale_probe is None:
            names, rows = [], []
            for s in sp.specs:
                if s.role != "input" or s.kind != "numeric" or not s.floating:
                    continue
                t = self.selector.get(batch, s.field)
                if not isinstance(t, torch.Tensor) or t.numel() == 0:
                    continue
                names.append(s.name)
                rows.append(check.measure(t))
            if not rows:
                self._scale_checked = True
                return
            self._scale_probe = (names, torch.stack(rows), step)
        if not self.sampled:
            return  # no host read on a step that is not logged
        names, probe, first = self._scale_probe
        self._scale_probe, self._scale_checked = None, True
        # ranks see different first batches: the largest |mean| and std decide, so every rank raises the same
        # alert (and takes the same action); one MAX, once per run
        values = agree_max(probe).tolist()
        check.judge_inputs(self._context(trainer, pl_module, "train", first, {}), trainer, names, values, first)

    def _check_padding(self, trainer: Any, pl_module: Any, sp: SplitState, batch: Any, step: int) -> None:
        """``padding_in_loss``: per-token labels at padded positions that the loss counts (not ``ignore_index``).

        One small host read per batch with a mask beside same-shaped labels (under DDP one MAX first, so every
        rank stops at the same batch); nothing once a batch with padding was seen.
        """
        check = self.checks["padding_in_loss"]
        if not check.enabled or sp.specs is None or not isinstance(batch, Mapping):
            self._padding_batches_left = 0
            return
        mask = PaddingInLoss.mask_of(batch)
        labels = [(s, self.selector.get(batch, s.field)) for s in sp.specs if s.role == "target" and s.kind == "labels"]
        labels = [(s, t) for s, t in labels
                  if isinstance(t, torch.Tensor) and mask is not None and t.shape == mask.shape and t.dim() >= 2]
        if not labels or self.ignore_index is None:
            self._padding_batches_left = 0
            return
        self._padding_batches_left -= 1
        probe = PaddingInLoss.probe(mask, [t for _, t in labels], self.ignore_index)
        values = agree_max(probe).tolist()  # the rank with the most padding speaks for all, alike on every rank
        if all(n_pad == 0 for n_pad, _ in values):
            return  # no padding in this batch: look at the next one
        self._padding_batches_left = 0
        check.judge_labels(self._context(trainer, pl_module, "train", step, {}), [s.name for s, _ in labels],
                           values, self.ignore_index)
