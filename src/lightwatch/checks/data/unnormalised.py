"""``unnormalised``: inputs far from zero mean and unit scale, judged once on the first training batch.

Standardised digits: |mean| <= 0.05, RMS <= 1.2; raw 0..16 pixels: |mean| 4.7, RMS 7.6; images in [0, 1]
(|mean| 0.5, RMS 0.58) train well and stay below ``min_rms``. The severity follows the measured harm, which
depends on the optimizer: plain gradient steps (SGD) scale with the inputs' second moment (digits MLP, SGD: raw
pixels x 0.3, RMS 2.3, cost 2 to 8 points of test accuracy; N(3, 2^2)-like, RMS 3.5, 10 points; x 1, RMS 7.8,
74 points) -> the check's severity; adaptive optimizers (Adam, RMSprop, Adagrad...) normalise the step per
weight, and only an offset that dominates the spread hurts (Adam: raw pixels at any scale, |mean| / std 0.8,
cost nothing; N(3, 2^2), 1.65, 1.6 points; |mean| / std 2.2, 4.4 points; 3.3, 8 points) -> the check's
severity when |mean| > ``offset_ratio`` x std, else ``info``.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence

import torch

from lightwatch.checks.data.base import CheckContext, DataCheck

__all__ = ["Unnormalised", "adaptive_optimizer", "optimizer_names"]

# Optimizers that scale each parameter's step by a running estimate of its gradient's size (or use its sign):
# the scale of the inputs then changes the first layer's updates far less than with plain gradient steps.
_ADAPTIVE_OPTIMIZERS = ("adam", "adamw", "adamax", "nadam", "radam", "sparseadam", "rmsprop", "adagrad",
                        "adadelta", "adafactor", "lion", "lamb", "sophia", "adan", "shampoo", "soap", "prodigy")


def _optimizer_list(trainer: Any) -> List[Any]:
    try:
        return list(getattr(trainer, "optimizers", None) or [])
    except Exception:  # a strategy that is not set up yet
        return []


def optimizer_names(trainer: Any) -> str:
    """The class names of the run's optimizers, sorted and comma-separated."""
    return ", ".join(sorted({type(getattr(o, "optimizer", o)).__name__ for o in _optimizer_list(trainer)}))


def adaptive_optimizer(trainer: Any) -> Optional[str]:
    """The name of the run's optimizer when every optimizer is adaptive (Adam, RMSprop, Adagrad, ... by class name,
    so fused and 8-bit variants count too), else ``None`` (SGD, an unknown optimizer, or none configured)."""
    optimizers = _optimizer_list(trainer)
    if not optimizers:
        return None
    names = []
    for opt in optimizers:
        cls = type(getattr(opt, "optimizer", opt))  # Lightning may wrap it
        stems = [c.__name__.lower() for c in cls.__mro__]
        if not any(stem.replace("fused", "").replace("8bit", "").replace("paged", "").replace("_", "")
                   .startswith(_ADAPTIVE_OPTIMIZERS) for stem in stems):
            return None
        names.append(cls.__name__)
    return ", ".join(sorted(set(names)))


class Unnormalised(DataCheck):
    """Floating inputs of the first training batch with ``|mean| > max_abs_mean`` and RMS ``> min_rms``.

    First-batch tier: :meth:`measure` runs on the device at the first batch, the monitor reads the result at
    the first logged step (under DDP the largest value over the ranks) and :meth:`judge_inputs` grades it by
    the optimizer (see the module's notes).

    Example:
        >>> import torch
        >>> check = Unnormalised()
        >>> [round(v, 3) for v in check.measure(torch.full((4, 2), 3.0)).tolist()]
        [3.0, 0.0]
    """

    name = "unnormalised"
    tier = "first_batch"
    defaults = {"max_abs_mean": 0.5, "min_rms": 2.0, "offset_ratio": 2.0}
    bounds = {"max_abs_mean": (0.0, math.inf, False), "min_rms": (0.0, math.inf, True),
              "offset_ratio": (0.0, math.inf, True)}

    @staticmethod
    def measure(x: torch.Tensor) -> torch.Tensor:
        """``[|mean|, std]`` of the finite values of ``x`` (on its device, no host read)."""
        x = x.detach().to(torch.float32)
        finite = torch.where(torch.isfinite(x), x, torch.nan)  # a NaN is data_nonfinite's business
        mean = torch.nanmean(finite)
        std = torch.nanmean((finite - mean).square()).sqrt()
        return torch.stack([mean.abs(), std])

    def judge_inputs(self, ctx: CheckContext, trainer: Any, names: Sequence[str], values: Sequence[Sequence[float]],
                     first: int) -> None:
        """Alert on each input whose ``(|mean|, std)`` (reduced over the ranks) is too far from standardised."""
        limit, min_rms, ratio = self["max_abs_mean"], self["min_rms"], self["offset_ratio"]
        adaptive = adaptive_optimizer(trainer)
        for name, (abs_mean, std) in zip(names, values):
            rms = math.sqrt(abs_mean ** 2 + std ** 2)
            if not (math.isfinite(rms) and abs_mean > limit and rms > min_rms):
                continue
            if adaptive is None:
                strong = True
                why = (f"with {optimizer_names(trainer) or 'this optimizer'}, whose steps scale with the "
                       f"inputs' second moment, raw pixels or raw units slow or stall training")
            else:
                strong = abs_mean > ratio * std
                why = (f"{adaptive} normalises each weight's step, so the scale itself costs little, " + (
                    f"but an offset of more than {ratio:g} x the spread (here {abs_mean / max(std, 1e-12):.3g}) "
                    f"dominates the first layer and slows training" if strong else
                    f"and the offset is within {ratio:g} x the spread (here {abs_mean / max(std, 1e-12):.3g}); "
                    f"a mild cost at most"))
            self.alert(ctx, subject=f"train/{name}", value=abs_mean, threshold=limit, step=first,
                       severity=self.graded(strong), message=(
                           f"inputs are not standardised: mean |x| = {abs_mean:.3g} (std {std:.3g}, RMS "
                           f"{rms:.3g}) over the first training batch (step {first}) of input {name!r}, above "
                           f"|mean| {limit:g} and RMS {min_rms:g}: {why}; normalise the inputs (e.g. z-score "
                           f"per feature with the training statistics)."))
