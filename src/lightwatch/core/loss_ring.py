"""Every step's training loss in a ring on its device, and the scores computed from it once per check.

:class:`~lightwatch.callbacks.metric_monitor.MetricMonitor` writes one value per optimizer step (one small device
copy, no host read) and, at a check, reads three scores and the block of losses since the previous check, all
computed on the device and read together with the check's other values (on the CPU, where a read waits for
nothing, the losses are read at the check and the same scores computed on host numbers):

- ``step_z``: the largest robust z of the steps since the last check against the median/MAD of the 50 steps
  before them (a spike). On the fault suite's healthy runs the largest z over a run was 1.3 to 8.1 (MAD floored
  at 1% of the median); a learning rate x30 for two steps gave 28 to 77. A step counts only when its excess
  over the median is twice the largest excess in the window: a spike is a step far outside the recent range,
  not one more hard batch like those the window already holds.
- ``shift_z``: the median loss of the recent steps (at least 10) against the median and MAD (plus 1% of the
  median) of the 50 steps before them. A single hard batch does not move a median of ten; a spike that damages
  the model does, for tens of steps. On the fault suite: 100 healthy runs at most 1.86 over a whole run, a
  learning rate x30 for two steps 9.6 to 22 at the first check after it.
- ``regress``: the median of the last 50 steps over the lowest such median since the learning rate last rose
  (:meth:`LossRing.new_phase`). On the fault suite's 100 healthy runs no two consecutive checks both read above
  0.94; a learning rate 3x too high read >= 1.5 at two checks in a row in 4 of 5 seeds.

``shift_z`` and ``regress`` count only while the level is at least 10% of the first step's loss: healthy runs
of 1,000 steps fit the training set to a loss of ~0.01, where Adam's late blips (0.009 to 0.11) score z up to
31 without costing anything; a real setback lifts the loss back to a sizeable share of it. Non-finite losses
count as missing, never as a spike: they are ``loss_nonfinite``'s business.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from lightwatch.core.runtime import local_tensor
from lightwatch.metrics.base import may_read_values

__all__ = ["LossRing", "STEP_SPIKE_WINDOW", "global_grad_norm", "unscaled_loss"]

STEP_SPIKE_WINDOW = 50
_STEP_SPIKE_NOVELTY = 2.0
_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
_SHIFT_RECENT_MIN = 10
_RECENT_MAX = 4096  # with longer intervals the scores look at the last 4,096 steps before a check
_REGRESS_WINDOW = 50
_LOSS_FLOOR = 0.1  # of the first step's loss: below it, changes are noise at the floor of a fitted loss

Scalar = Optional[Union[torch.Tensor, float]]


def unscaled_loss(loss: torch.Tensor, scaler: Any = None) -> torch.Tensor:
    """The step's loss as one float32 device scalar, divided back by the ``GradScaler`` scale under fp16 AMP
    (Lightning hands ``on_before_backward`` the scaled loss). No host sync.

    Example:
        >>> unscaled_loss(torch.tensor([1.0, 2.0], dtype=torch.float16)).item()
        3.0
    """
    value = loss.detach()
    if value.numel() != 1:
        value = value.sum()
    if value.dtype != torch.float32:
        value = value.float()
    scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
    if isinstance(scale, torch.Tensor):
        value = value / scale.to(value.device)
    return value


def global_grad_norm(params: Iterable[torch.nn.Parameter], squared: bool = False) -> Optional[torch.Tensor]:
    """The global L2 norm of the gradients of ``params`` (their local shards), or its square (to be summed over
    ranks first under a sharded strategy); None when no parameter has a gradient. One fused call, no host sync.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> global_grad_norm([w]).item(), global_grad_norm([w], squared=True).item()
        (5.0, 25.0)
    """
    grads = [local_tensor(p.grad.detach()) for p in params if p.grad is not None]
    if not grads:
        return None
    total = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
    return total if squared else total.sqrt()


def _chronological(ring: torch.Tensor, count: int, n: int) -> torch.Tensor:
    """The last ``n`` values written, oldest first."""
    return ring[torch.arange(count - n, count, device=ring.device) % ring.numel()]


def _robust_center(base: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Median and MAD of the finite values of ``base`` (NaN when there are none); no boolean indexing."""
    finite = torch.where(torch.isfinite(base), base, torch.full_like(base, float("nan")))
    median = finite.nanmedian()
    return median, (finite - median).abs().nanmedian()


def _lower_median(values: List[float]) -> float:
    """``torch.median``'s median on the host: the lower of the two middle values; NaN when empty."""
    if not values:
        return math.nan
    values.sort()
    return values[(len(values) - 1) // 2]


def _host_center(base: Sequence[float]) -> Tuple[float, float]:
    """:func:`_robust_center` on host numbers: median and MAD of the finite values (NaN when there are none)."""
    finite = [v for v in base if math.isfinite(v)]
    median = _lower_median(finite)
    return median, _lower_median([abs(v - median) for v in finite])


class LossRing:
    """The per-step losses of one run on their device, with the spike, shift and regression scores.

    Args:
        interval: steps between checks: the ring keeps at least that many recent steps (at most 4,096) beyond
            the 50-step window the scores compare with.

    Example:
        >>> ring = LossRing(interval=10)
        >>> for step in range(80):
        ...     ring.remember(torch.tensor(1.0 + 0.01 * (step % 3) + (5.0 if step == 75 else 0.0)))
        >>> round(float(ring.scores()["step_z"]))  # step 75: far outside the 50 steps before it
        337
        >>> ring.take_block()  # the steps since the last block the ring still holds (50 + the interval)
        60
    """

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.ring: Optional[torch.Tensor] = None
        self.count = 0  # values written
        self._checked = 0  # `count` at the previous scores
        self._scores_at: Optional[Tuple[int, Dict[str, Scalar]]] = None
        self._block_taken = 0  # `count` when the last block was taken: the steps since then are the next block
        self._block_at: Optional[Tuple[int, Any]] = None
        self._phase_start = 0  # `count` when this learning-rate phase began: its windows start after it
        # the first step's loss and the lowest 50-step median of this phase (device scalars, or host floats just
        # after a resume); kept across a reset: the scale of the run, not of its restart
        self.initial_loss: Scalar = None
        self.best_level: Scalar = None
        self._pending: List[torch.Tensor] = []  # losses of the steps since the last read, not yet in the ring
        # on the CPU the ring's values are kept as host numbers (see _host_values), decided when the ring is made
        self._on_host = False
        self._host_ring: List[float] = []

    def reset(self) -> None:
        """Forget the history (end of a fit, or a rollback: the steps before are not this run's)."""
        self.ring, self.count, self._checked, self._scores_at = None, 0, 0, None
        self._on_host, self._host_ring = False, []
        self._block_taken, self._block_at, self._phase_start = 0, None, 0
        self._pending = []

    def new_phase(self) -> None:
        """The learning rate rose (a warmup, a restart, layers unfrozen): the loss may rise with it, by design."""
        self.best_level, self._phase_start = None, self.count

    def remember(self, loss: torch.Tensor) -> None:
        """Keep this step's loss (a device scalar): appended to a list, written into the ring with one op at
        the next read (:meth:`block`, :meth:`scores`), so a step costs no tensor op and no host read."""
        if self.ring is None or self.ring.device != loss.device:
            recent = min(max(self.interval, _SHIFT_RECENT_MIN), _RECENT_MAX)
            self.ring = torch.zeros(STEP_SPIKE_WINDOW + recent, device=loss.device)
            self._on_host = may_read_values(self.ring)
            self._host_ring = [0.0] * self.ring.numel() if self._on_host else []
            self.count = self._checked = self._phase_start = self._block_taken = 0
            self._block_at = self._scores_at = None
            self._pending = []
        self._pending.append(loss)
        self.count += 1
        if len(self._pending) >= self.ring.numel():  # memory stays bounded whatever the interval
            self._write_pending()
        if self.initial_loss is None:
            self.initial_loss = loss.detach().reshape(()).clone()

    def _write_pending(self) -> None:
        """The kept losses into their ring slots: one stack and one indexed copy."""
        pending, self._pending = self._pending, []
        if not pending or self.ring is None:
            return
        n = len(pending)
        if self._on_host:  # one read per loss, at a check: host numbers in float32, like the device ring
            host, size = self._host_ring, len(self._host_ring)
            for i, p in zip(range(self.count - n, self.count), pending):
                host[i % size] = p.item() if p.dtype == torch.float32 else float(p.float())
            return
        slots = torch.arange(self.count - n, self.count, device=self.ring.device) % self.ring.numel()
        self.ring[slots] = torch.stack([p.reshape(()) for p in pending]).to(self.ring.dtype)

    def _host_values(self, n: int) -> Optional[List[float]]:
        """The last ``n`` values written, oldest first, as host numbers: on the CPU only (``None`` elsewhere).

        On the CPU reading a loss waits for nothing, and the scores' few dozen operations on a vector of 60
        values cost ~10 us each inside a training step (~0.7 ms a check, ~0.4 ms more to write the losses into
        the ring) where the same arithmetic on host numbers takes microseconds; on an accelerator the ring and
        the scores stay on the device (no host sync). The losses are read at a check, never in a step.
        """
        if self.ring is None or not self._on_host:
            return None
        values, size = self._host_ring, len(self._host_ring)
        return [values[i % size] for i in range(self.count - n, self.count)]

    def block(self) -> Optional[Union[torch.Tensor, Tuple[float, float]]]:
        """Mean and mean square of the losses since the last block (on the device; host numbers on the CPU),
        None without new steps.

        A longer interval than the ring's length gives its last 4,096 steps.
        """
        self._write_pending()
        new = min(self.count - self._block_taken, self.ring.numel()) if self.ring is not None else 0
        if new <= 0:
            return None
        if self._block_at is None or self._block_at[0] != self.count:
            host = self._host_values(new)
            if host is not None:
                block: Any = (sum(host) / new, sum(v * v for v in host) / new)
            else:
                values = _chronological(self.ring, self.count, new)
                block = torch.stack([values.mean(), values.square().mean()])
            self._block_at = (self.count, block)
        return self._block_at[1]

    def take_block(self) -> int:
        """Close the current block; returns how many steps it held (those :meth:`block` summarised)."""
        self._write_pending()
        count = min(self.count - self._block_taken, self.ring.numel()) if self.ring is not None else 0
        self._block_taken, self._block_at = self.count, None
        return count

    def scores(self) -> Dict[str, Scalar]:
        """``step_z``, ``shift_z`` and ``regress`` of this check, computed once on the device (no host read);
        on the CPU from the ring read once (host numbers, the same arithmetic).

        Each is ``None`` until a full window of earlier steps exists.
        """
        self._write_pending()
        count = self.count
        if self._scores_at is not None and self._scores_at[0] == count:
            return self._scores_at[1]
        new = count - self._checked
        self._checked = count
        scores: Dict[str, Scalar] = {"step_z": None, "shift_z": None, "regress": None}
        if self.ring is not None and new > 0:
            if self._on_host:
                scores["step_z"] = self._host_step_spike_score(new)
                scores["shift_z"] = self._host_shift_score(new)
                scores["regress"] = self._host_regress_score()
            else:
                scores["step_z"] = self._step_spike_score(new)
                scores["shift_z"] = self._shift_score(new)
                scores["regress"] = self._regress_score()
        self._scores_at = (count, scores)
        return scores

    def _step_spike_score(self, new: int) -> Optional[torch.Tensor]:
        ring, count = self.ring, self.count
        new = min(new, ring.numel() - STEP_SPIKE_WINDOW)
        if count - new < STEP_SPIKE_WINDOW:
            return None
        values = _chronological(ring, count, new + STEP_SPIKE_WINDOW)
        base, recent = values[:STEP_SPIKE_WINDOW], values[STEP_SPIKE_WINDOW:]
        median, mad = _robust_center(base)
        scale = torch.maximum(_MAD_TO_SIGMA * mad, 0.01 * median.abs()).clamp_min(1e-12)
        z = (recent - median) / scale
        top = torch.where(torch.isfinite(base), base, torch.full_like(base, -float("inf"))).max()
        novel = (recent - median) > _STEP_SPIKE_NOVELTY * (top - median)
        # NaN/Inf is loss_nonfinite's business; a step within the window's own range is no spike: both score 0
        z = torch.where(torch.isfinite(z) & novel, z, torch.zeros_like(z))
        return z.max()

    def _shift_score(self, new: int) -> Optional[torch.Tensor]:
        ring, count = self.ring, self.count
        recent_n = min(max(new, _SHIFT_RECENT_MIN), ring.numel() - STEP_SPIKE_WINDOW)
        if count - recent_n < STEP_SPIKE_WINDOW:
            return None
        values = _chronological(ring, count, recent_n + STEP_SPIKE_WINDOW)
        base, recent = values[:STEP_SPIKE_WINDOW], values[STEP_SPIKE_WINDOW:]
        median, mad = _robust_center(base)
        level, _ = _robust_center(recent)
        z = (level - median) / (_MAD_TO_SIGMA * mad + 0.01 * median.abs() + 1e-12)
        if self.initial_loss is not None:  # a jump that stays under 10% of the first loss is not a setback
            initial = torch.as_tensor(self.initial_loss, dtype=level.dtype, device=level.device)
            z = torch.where(level >= _LOSS_FLOOR * initial.abs(), z, torch.zeros_like(z))
        return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)

    def _regress_score(self) -> Optional[torch.Tensor]:
        ring, count = self.ring, self.count
        if count < _REGRESS_WINDOW or ring.numel() < _REGRESS_WINDOW or self.initial_loss is None:
            return None
        if count - self._phase_start < _REGRESS_WINDOW:  # the window still holds steps of the previous phase
            return torch.zeros((), device=ring.device)
        level, _ = _robust_center(_chronological(ring, count, _REGRESS_WINDOW))
        initial = torch.as_tensor(self.initial_loss, dtype=level.dtype, device=level.device)
        best = self.best_level
        if best is None:
            score = torch.zeros_like(level)
            self.best_level = level
        else:
            best = torch.as_tensor(best, dtype=level.dtype, device=level.device)
            ratio = level / best
            meaningful = (level >= _LOSS_FLOOR * initial.abs()) & (best > 0) & torch.isfinite(ratio)
            score = torch.where(meaningful, ratio, torch.zeros_like(ratio))
            self.best_level = torch.fmin(best, level)  # fmin: a NaN median never becomes the best
        return score

    # The same three scores from host numbers (the CPU path of :meth:`scores`): each line mirrors its device
    # twin above, NaN included (a comparison with NaN is false, as torch.where's condition is).
    def _host_window(self, recent_n: int) -> Optional[Tuple[List[float], List[float]]]:
        """The 50 steps before the last ``recent_n`` and those ``recent_n`` (None until they exist)."""
        if self.count - recent_n < STEP_SPIKE_WINDOW:
            return None
        values = self._host_values(recent_n + STEP_SPIKE_WINDOW)
        assert values is not None
        return values[:STEP_SPIKE_WINDOW], values[STEP_SPIKE_WINDOW:]

    def _host_step_spike_score(self, new: int) -> Optional[float]:
        assert self.ring is not None
        window = self._host_window(min(new, self.ring.numel() - STEP_SPIKE_WINDOW))
        if window is None:
            return None
        base, recent = window
        median, mad = _host_center(base)
        if math.isnan(median):  # no finite value in the window: no z (the device path's NaNs score 0)
            return 0.0
        scale = max(_MAD_TO_SIGMA * mad, 0.01 * abs(median), 1e-12)
        top = max((v if math.isfinite(v) else -math.inf) for v in base)
        best = 0.0
        for r in recent:
            z = (r - median) / scale
            if math.isfinite(z) and (r - median) > _STEP_SPIKE_NOVELTY * (top - median):
                best = max(best, z)
        return best

    def _host_shift_score(self, new: int) -> Optional[float]:
        assert self.ring is not None
        window = self._host_window(min(max(new, _SHIFT_RECENT_MIN), self.ring.numel() - STEP_SPIKE_WINDOW))
        if window is None:
            return None
        base, recent = window
        median, mad = _host_center(base)
        level, _ = _host_center(recent)
        z = (level - median) / (_MAD_TO_SIGMA * mad + 0.01 * abs(median) + 1e-12)
        if self.initial_loss is not None and not level >= _LOSS_FLOOR * abs(float(self.initial_loss)):
            z = 0.0
        return z if math.isfinite(z) else 0.0

    def _host_regress_score(self) -> Optional[float]:
        assert self.ring is not None
        if self.count < _REGRESS_WINDOW or self.ring.numel() < _REGRESS_WINDOW or self.initial_loss is None:
            return None
        if self.count - self._phase_start < _REGRESS_WINDOW:
            return 0.0
        values = self._host_values(_REGRESS_WINDOW)
        assert values is not None
        level, _ = _host_center(values)
        best = self.best_level
        if best is None:
            self.best_level = level
            return 0.0
        best = float(best)
        meaningful = level >= _LOSS_FLOOR * abs(float(self.initial_loss)) and best > 0
        ratio = level / best if best > 0 else math.nan
        if not math.isnan(level) and (math.isnan(best) or level < best):  # fmin: NaN never becomes the best
            self.best_level = level
        else:
            self.best_level = best
        return ratio if meaningful and math.isfinite(ratio) else 0.0
