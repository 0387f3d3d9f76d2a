"""``loss_not_learning`` and ``loss_slow``: is the training loss going down, judged on its own noise.

Every step's loss (while the check is open) is in the device ring of :mod:`lightwatch.core.loss_ring`; the
mean and mean square of the steps since the previous check (a *block*) travel with that check's read, reduced
over ranks, so every rank decides alike. At the first check at or after step 50 outside a warmup (then at
steps 100, 200, 400, ...: each evaluation doubles the step of the one before), with t the current step:

- the level L of the steps in the last quarter, (3t/4, t], against the level of the first steps (the blocks up
  to step 10): at or below 85% of it the run learns, and the check is closed for good;
- else the decline from the second quarter (t/4, t/2] to the last one, in standard errors of the
  batch-to-batch noise (pooled within-block variance): at or above 3 the loss is still falling (a slow
  learner, ``loss_slow`` at ``info`` once): judged again at the next evaluation;
- else the loss is flat on its own noise. Flat at two evaluations in a row (a plateau lasting as long as the
  whole run before it) is ``loss_not_learning`` (warning).

Measured (per-step curves, 5 seeds each, 400 steps): healthy recurrent classifiers with clipping sit on an
initial plateau at 97-99% of the first level up to step ~60 (decline z 1.9-11 at step 50) and are at 68-80% by
step 100; a slow teacher-student MLP is at 83-88% at step 50 with z >= 4.7; shuffled labels read 98-100% at
step 50 and memorise slowly (z 2-9): no model-free loss statistic tells an early plateau from labels that do not
belong to their inputs before step ~100. So a flat loss at the first evaluation is named at once only when an
earlier finding explains it (:data:`CAUSES`: frozen layers, missing gradients, tiny updates, probabilities fed to
the loss, labels no nearer their neighbours' labels than chance): two independent signals agree.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from lightwatch.checks.finding import Finding
from lightwatch.core.runtime import lr_rising

__all__ = ["CAUSES", "FIRST_STEP", "LearningCheck", "NOT_LEARNING", "RATIO", "SLOW"]

NOT_LEARNING = "loss_not_learning"
SLOW = "loss_slow"
FIRST_STEP = 50
RATIO = 0.85
EARLY_STEPS = 10  # the first steps' level: the blocks up to this step
DECLINE_Z = 3.0
MAX_BLOCKS = 512  # older blocks are merged pairwise beyond this: memory stays bounded on long runs
#: earlier findings that explain a loss that does not go down, most specific first: the alert takes one's name
CAUSES = ("frozen_at_init", "frozen_parameters", "grad_missing", "update_ratio_low", "output_probabilities",
          "data_labels_unrelated")

Block = Tuple[int, int, int, float, float]  # first step, last step, count, mean, mean square


def _merge(a: Block, b: Block) -> Block:
    """Two adjacent blocks of losses as one: counts add, means and mean squares are count-weighted."""
    n = a[2] + b[2]
    return a[0], b[1], n, (a[2] * a[3] + b[2] * b[3]) / n, (a[2] * a[4] + b[2] * b[4]) / n


class LearningCheck:
    """The blocks of losses seen so far and the verdict on them.

    Args:
        metric: the loss's name, the subject of the alerts.

    Example:
        >>> check = LearningCheck("train/loss")
        >>> def run_to(end):  # a loss flat at 2.3 with batch noise 0.1, one block of 5 steps per check
        ...     for step in range(len(check.blocks) * 5, end, 5):
        ...         check.remember(step, step + 4, 5, 2.3, 2.3 ** 2 + 0.01, lrs=[0.1])
        >>> run_to(60); check.judge(59)  # flat once: could be a slow start
        ({'ratio': 1.0, 'decline_z': 0.0}, None)
        >>> run_to(120); readings, finding = check.judge(119)  # flat for as long as the run before it
        >>> finding.rule, finding.severity
        ('loss_not_learning', 'warning')
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.blocks: List[Block] = []
        self.next_evaluation = FIRST_STEP
        self.flat_evaluations = 0
        self.slow_reported = False
        self.recent_lrs: List[List[float]] = []  # learning rates of every param group at the last checks
        self.checked = False  # decided: closed for good

    def remember(self, first: int, step: int, count: int, mean: float, square: float, lrs: List[float]) -> None:
        """Keep one check's block (steps ``first..step``; ``count`` losses, their mean and mean square).

        A block with no steps or a non-finite mean is not kept (NaN is ``loss_nonfinite``'s business).
        """
        self.recent_lrs = (self.recent_lrs + [lrs])[-3:]
        if count <= 0 or not math.isfinite(mean) or not math.isfinite(square):
            return
        self.blocks.append((first, step, count, mean, square))
        if len(self.blocks) > MAX_BLOCKS:  # merge the oldest pairs, keeping the first steps' blocks
            keep = [b for b in self.blocks if b[1] <= EARLY_STEPS]
            rest = self.blocks[len(keep):]
            self.blocks = keep + [_merge(rest[i], rest[i + 1]) if i + 1 < len(rest) else rest[i]
                                  for i in range(0, len(rest), 2)]

    def warming_up(self) -> bool:
        """Whether the learning rate rose over the last checks: a warmup, during which a flat loss is expected."""
        return len(self.recent_lrs) >= 2 and lr_rising(self.recent_lrs[0], self.recent_lrs[-1])

    def evidence(self, step: int) -> Optional[Tuple[float, float, float, float]]:
        """``(early level, recent level, recent / early, decline z)``, or None without enough steps.

        The decline is the second quarter's level minus the last quarter's, in standard errors of the
        batch-to-batch noise (the pooled variance within blocks): half a run apart, so a steady decline shows
        twice as many standard errors as between adjacent quarters.
        """
        early = [b for b in self.blocks if b[1] <= EARLY_STEPS] or self.blocks[:1]
        second = [b for b in self.blocks if step / 4 < b[1] <= step / 2 and b not in early]
        last = [b for b in self.blocks if b[1] > 3 * step / 4 and b not in early]
        if not early or not second or not last:
            return None

        def level(blocks: Sequence[Block]) -> Tuple[float, int]:
            n = sum(b[2] for b in blocks)
            return sum(b[2] * b[3] for b in blocks) / n, n

        (first, _), (middle, n_mid), (recent, n_last) = level(early), level(second), level(last)
        pooled = [(b[2], max(b[4] - b[3] * b[3], 0.0)) for b in second + last if b[2] > 1]
        dof = sum(n - 1 for n, _ in pooled)
        variance = sum(n * v for n, v in pooled) / dof if dof > 0 else 0.0
        se = math.sqrt(variance * (1.0 / n_mid + 1.0 / n_last))
        # a noiseless loss (one fixed batch, say): any decline at all beyond rounding counts
        floor = 1e-6 * max(abs(middle), abs(recent), 1e-12)
        z = (middle - recent) / max(se, floor)
        ratio = recent / first if first > 0 else math.nan
        return first, recent, ratio, z

    def recent_level(self, step: int) -> Optional[Tuple[float, float]]:
        """``(level, standard error)`` of the loss over the last quarter of the run, ``(3t/4, t]``, or None.

        The standard error is the batch-to-batch noise within those blocks over the square root of their steps.
        """
        last = [b for b in self.blocks if b[1] > 3 * step / 4 and b[1] > EARLY_STEPS]
        n = sum(b[2] for b in last)
        if n == 0:
            return None
        level = sum(b[2] * b[3] for b in last) / n
        dof = sum(b[2] - 1 for b in last if b[2] > 1)
        variance = sum(b[2] * max(b[4] - b[3] * b[3], 0.0) for b in last if b[2] > 1) / dof if dof > 0 else 0.0
        return level, math.sqrt(variance / n)

    def judge(self, step: int, cause: Callable[[], Optional[Any]] = lambda: None
              ) -> Tuple[Optional[Dict[str, float]], Optional[Finding]]:
        """The readings of an evaluation at ``step`` (``ratio``, ``decline_z``; None when none is due) and the finding.

        Args:
            step: the current optimizer step.
            cause: returns the most specific earlier alert that explains a flat loss (with ``rule``,
                ``subject``, ``step``, ``source``, ``message``), or None.
        """
        if self.checked or step < self.next_evaluation or self.warming_up():
            return None, None  # too early, or the learning rate is still warming up: judged at a later check
        evidence = self.evidence(step)
        if evidence is None:
            return None, None
        first, recent, ratio, z = evidence
        readings = {"ratio": ratio, "decline_z": z}
        first_evaluation = self.next_evaluation == FIRST_STEP
        self.next_evaluation = 2 * step
        if not math.isfinite(ratio) or ratio <= RATIO:
            self.checked = True  # it learns (or the loss is not a positive quantity): closed for good
            return readings, None
        quarter = f"steps {3 * step // 4 + 1}-{step}"
        head = (f"the training loss has not gone down: {recent:.4g} over {quarter} against {first:.4g} over the "
                f"first steps ({ratio:.0%} of it)")
        if first_evaluation:
            found = cause()
            if found is not None:
                self.checked = True
                return readings, self._named_after(found, head, ratio)
        if z >= DECLINE_Z:
            self.flat_evaluations = 0
            if self.slow_reported:
                return readings, None
            self.slow_reported = True
            return readings, Finding(
                SLOW, "info", self.metric, ratio, threshold=RATIO, message=(
                    f"the training loss falls slowly: {recent:.4g} over {quarter}, {ratio:.0%} of the first "
                    f"steps' {first:.4g}, still declining ({z:.1f} standard errors of its batch noise from the "
                    f"second to the last quarter of the run). Judged again at step {self.next_evaluation}."))
        self.flat_evaluations += 1
        if self.flat_evaluations < 2:
            return readings, None  # flat once: a plateau must last as long as the run before it to count
        self.checked = True
        found = cause()
        if found is not None:
            return readings, self._named_after(found, f"{head}, flat on its own noise since step {step // 2}", ratio)
        return readings, Finding(
            NOT_LEARNING, "warning", self.metric, ratio, threshold=RATIO, action="warn", message=(
                f"{head}, and it has been flat on its own batch-to-batch noise since step {step // 2} (decline "
                f"{z:.1f} standard errors; below {DECLINE_Z:g} is flat). Gradients, update sizes and data "
                f"checks raised nothing that explains it, so the labels may not be learnable from the inputs "
                f"(shuffled, misaligned with their inputs, or very noisy), or the model or learning rate is far too "
                f"small for the task. Check that inputs and labels are paired correctly; if the loss is expected "
                f"to stay flat (fine-tuning a converged model), drop the check with "
                f"rules={{'{NOT_LEARNING}': None}}."))

    @staticmethod
    def _named_after(cause: Any, head: str, ratio: float) -> Finding:
        """The not-learning verdict under the name of the earlier finding that explains it, at ``warning``."""
        return Finding(
            cause.rule, "warning", cause.subject, ratio, threshold=RATIO, action="warn", message=(
                f"{head}, and at step {cause.step} {cause.source} found: {cause.message} That is the likely cause."))

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps (the keys the callback's state has always used)."""
        return {"loss_blocks": [list(b) for b in self.blocks], "next_evaluation": self.next_evaluation,
                "flat_evaluations": self.flat_evaluations, "slow_reported": self.slow_reported,
                "recent_lrs": [list(x) for x in self.recent_lrs], "learning_checked": self.checked}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` kept; missing keys keep their defaults."""
        self.blocks = [(int(b[0]), int(b[1]), int(b[2]), float(b[3]), float(b[4]))
                       for b in state.get("loss_blocks", [])]
        self.next_evaluation = int(state.get("next_evaluation", FIRST_STEP))
        self.flat_evaluations = int(state.get("flat_evaluations", 0))
        self.slow_reported = bool(state.get("slow_reported", False))
        self.recent_lrs = [[float(v) for v in x] for x in state.get("recent_lrs", [])]
        self.checked = bool(state.get("learning_checked", False))
