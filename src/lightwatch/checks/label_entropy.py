"""``loss_at_label_entropy``: a loss that has come down to the entropy of its labels and stays there.

A model that learned only how often each label occurs (the labels' marginal distribution), and nothing about
which input goes with which label, has a cross-entropy loss at the entropy ``H`` of that marginal; a model that
uses its inputs goes below it. Token language models whose labels were shuffled within each sequence show it:
the loss falls steadily from ``log(vocab)`` to the unigram entropy of the tokens and stops there, which the
not-learning check (:mod:`lightwatch.checks.learning`) reads as a slow learner.

``H`` is the Miller-Madow estimate (plug-in entropy plus ``(K - 1) / 2N`` for ``K`` labels seen in ``N``) from the
integer labels of the first batches (negative labels, e.g. ``-100``, are ignored positions). The labels stay on
the device until the first evaluation, which reads them once. At the learning evaluations (the first check at or
after step 50, then each at twice the step of the one before), with ``L`` the loss level of the last quarter of
the run and ``E`` the level of the first steps:

- ``E`` at or below :data:`ABOVE` x ``H``: the loss did not start above the labels' entropy, so it is not a
  cross-entropy over these labels (or the first steps already learned more than the label frequencies): the
  check does not apply, closed for good;
- ``L`` below ``(1 -`` :data:`BAND` ``) H``: the model uses its inputs, closed for good;
- ``L`` above ``(1 +`` :data:`BAND` ``) H``: not down to ``H`` yet, judged again at the next evaluation;
- else the loss is at ``H``. At ``H`` at two evaluations in a row (as long as the whole run before it) is
  ``loss_at_label_entropy`` (warning).

Measured (``monitor.diag/label_entropy/*``, ``L / H`` at the evaluations at steps 59 and 119, 10 seeds each unless
said): a tiny GPT-2 on Markov-chain tokens (``H`` 5.01-5.08 nats, ``E`` 1.04-1.05 ``H``) is at 0.85-0.86 and
0.70-0.72 (15 runs); with its labels shuffled within each sequence at 0.996-1.004 and 0.990-0.999 (5 of 5 runs;
a little below ``H``, as the sequence's own tokens say something about its shuffled labels, so the band is a
fraction of ``H`` rather than of the batch noise: the shuffled runs are up to 9 standard errors below ``H``).
Lightning's demo LSTM LM sits on the unigram plateau at step 59 (0.98-1.007, flat) and leaves it by step 119
(0.79-0.88): one evaluation at ``H`` is not enough. The demo transformer LM (0.40-0.47), a BERT classifier
(0.52-0.70), a recurrent classifier (0.33-0.41) and a slow teacher-student MLP (0.86-0.91, then 0.68-0.75) are
below the band at once; classifiers of balanced classes start at ``H`` (``E`` 0.96-1.01 ``H``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from lightwatch.checks.finding import Finding
from lightwatch.checks.learning import FIRST_STEP  # judged at the learning check's evaluations
from lightwatch.core.batch import BatchSelector, BatchSelectorError

__all__ = ["ABOVE", "AT_LABEL_ENTROPY", "BAND", "CAUSES", "LabelEntropyCheck", "label_entropy"]

AT_LABEL_ENTROPY = "loss_at_label_entropy"
BATCHES = 8  # labels counted from this many batches
MAX_LABELS = 1 << 16  # at most this many labels kept (memory and one host read stay small)
MAX_CLASSES = 1 << 22  # larger label values are not class indices: the check does not apply
ABOVE = 1.0  # the first steps' level must be above this multiple of H: a cross-entropy from an uninformed model
BAND = 0.03  # "at H": the recent level within this fraction of H, either side
#: earlier findings (warning or worse) that explain a model that cannot use its inputs, most specific first: the
#: alert takes one's name (a zeroed embedding or a learning rate far too high also leaves only the label frequencies)
CAUSES = ("init_zero", "frozen_at_init", "frozen_parameters", "grad_missing", "output_probabilities",
          "update_ratio_high", "update_ratio_low")


def label_entropy(labels: torch.Tensor) -> Optional[Tuple[float, int, int]]:
    """``(H, N, K)``: the Miller-Madow entropy (nats) of the non-negative integer ``labels``, their count and the
    number of distinct values; None without two distinct labels or with values too large to be classes.

    Example:
        >>> h, n, k = label_entropy(torch.tensor([0, 1, 0, 1, -100]))
        >>> round(h, 4), n, k
        (0.8181, 4, 2)
    """
    flat = labels.reshape(-1)
    flat = flat[flat >= 0]
    if flat.numel() == 0 or int(flat.max()) >= MAX_CLASSES:
        return None
    counts = torch.bincount(flat.cpu()).double()
    counts = counts[counts > 0]
    n, k = float(counts.sum()), int(counts.numel())
    if k < 2:
        return None
    p = counts / n
    return float(-(p * p.log()).sum()) + (k - 1) / (2 * n), int(n), k


class LabelEntropyCheck:
    """The labels of the first batches, their entropy ``H``, and the verdict on a loss that stays at it.

    Args:
        metric: the loss's name, the subject of the alert.
        batches: how many batches' labels are counted.

    Example:
        >>> check = LabelEntropyCheck("train/loss")
        >>> labels = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
        >>> check.observe({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels})
        >>> round(check.entropy(), 3)  # four labels, equally often: log 4 plus the finite-count term
        1.574
    """

    def __init__(self, metric: str, batches: int = BATCHES) -> None:
        self.metric = metric
        self.batches = int(batches)
        self.seen_batches = 0
        self.samples: List[torch.Tensor] = []
        self.kept = 0
        self.estimate: Optional[Tuple[float, int, int]] = None
        self.selector = BatchSelector(where="MetricMonitor")
        self.next_evaluation = FIRST_STEP
        self.near = 0  # evaluations in a row that found the loss at H
        self.checked = False  # decided, or does not apply: closed for good

    @property
    def collecting(self) -> bool:
        """Whether the next batch's labels are still wanted."""
        return not self.checked and self.seen_batches < self.batches and self.kept < MAX_LABELS

    def observe(self, batch: Any) -> None:
        """Keep the integer labels of ``batch`` (on its device, no host read). A batch without a single integer
        target field closes the check: it applies to class and token labels only."""
        if not self.collecting:
            return
        try:
            targets = self.selector.resolve(batch).targets
        except (BatchSelectorError, TypeError, ValueError):
            targets = []
        labels = self.selector.get(batch, targets[0]) if len(targets) == 1 else None
        if (not isinstance(labels, torch.Tensor) or labels.layout != torch.strided or labels.dtype == torch.bool
                or labels.is_floating_point() or labels.is_complex()):
            self.checked = True
            self.samples = []
            return
        flat = labels.detach().reshape(-1)[: MAX_LABELS - self.kept]
        self.samples.append(flat.clone())
        self.kept += int(flat.numel())
        self.seen_batches += 1

    def entropy(self) -> Optional[float]:
        """``H`` of the labels kept so far (read from the device once, then cached), or None."""
        if self.estimate is None and self.samples:
            self.estimate = label_entropy(torch.cat([s.to("cpu") for s in self.samples]))
            self.samples = []
        return None if self.estimate is None else self.estimate[0]

    def judge(self, step: int, early: float, recent: float, se: float, decline_z: float,
              cause: Callable[[], Optional[Any]] = lambda: None
              ) -> Tuple[Optional[Dict[str, float]], Optional[Finding]]:
        """The readings at a learning evaluation (None when none is due) and the finding.

        Args:
            step: the current optimizer step.
            early: the loss level of the first steps.
            recent: the loss level of the last quarter of the run.
            se: the standard error of ``recent`` (batch-to-batch noise).
            decline_z: how far the loss fell from the second to the last quarter, in standard errors.
            cause: returns the most specific earlier alert of :data:`CAUSES` (with ``rule``, ``subject``,
                ``step``, ``source``, ``message``), or None.
        """
        if self.checked or step < self.next_evaluation:
            return None, None
        self.next_evaluation = 2 * step
        h = self.entropy()
        if h is None or h <= 0:
            self.checked = not self.collecting
            return None, None
        readings = {"entropy": h, "early_ratio": early / h, "ratio": recent / h,
                    "gap_z": (recent - h) / max(se, 1e-12), "decline_z": decline_z}
        if early <= ABOVE * h or recent < (1.0 - BAND) * h:
            # the loss did not start above H (not a cross-entropy of these labels), or it went below H: the
            # model uses its inputs. Either way closed for good.
            self.checked = True
            return readings, None
        if recent > (1.0 + BAND) * h:
            self.near = 0  # not down to H yet: judged again at the next evaluation
            return readings, None
        self.near += 1
        if self.near < 2:
            return readings, None  # at H once: it may be passing through on its way down
        self.checked = True
        head = (f"the training loss came down from {early:.4g} to the entropy of its labels' marginal distribution "
                f"({h:.4g} nats, estimated from the labels of the first {self.seen_batches} batches) and has stayed "
                f"within {BAND:.0%} of it since step {step // 2}: {recent:.4g} over steps {3 * step // 4 + 1}-{step} "
                f"({recent / h:.1%} of it). A model that learned only how often each label occurs sits there; one "
                f"that uses its inputs goes below.")
        found = cause()
        if found is not None:
            return readings, Finding(
                found.rule, "warning", found.subject, recent / h, threshold=1.0 - BAND, action="warn", message=(
                    f"{head} At step {found.step} {found.source} found: {found.message} That is the likely cause."))
        return readings, Finding(
            AT_LABEL_ENTROPY, "warning", self.metric, recent / h, threshold=1.0 - BAND, action="warn", message=(
                f"{head} The labels likely do not belong to their inputs: shuffled, "
                f"misaligned or shifted the wrong way (for a language model, check that the labels are the inputs "
                f"shifted by one, and that the model or collate function shifts them once). If the task has no "
                f"more to learn than the label frequencies, drop the check with "
                f"rules={{'{AT_LABEL_ENTROPY}': None}}."))

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps: the entropy once known and where the check stands."""
        return {"label_entropy": None if self.estimate is None else list(self.estimate),
                "label_next_evaluation": self.next_evaluation, "label_near": self.near,
                "label_checked": self.checked}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` kept; missing keys keep their defaults."""
        estimate = state.get("label_entropy")
        if estimate is not None:
            self.estimate = (float(estimate[0]), int(estimate[1]), int(estimate[2]))
            self.seen_batches = self.batches
        self.next_evaluation = int(state.get("label_next_evaluation", FIRST_STEP))
        self.near = int(state.get("label_near", 0))
        self.checked = bool(state.get("label_checked", False))
