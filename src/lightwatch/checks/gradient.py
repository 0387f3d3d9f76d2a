"""The diagnoses of :class:`~lightwatch.callbacks.gradient_stats.GradientStatsMonitor`, judged on host numbers.

The callback reads gradients, weights and their updates on the device (one fused read per sampled step) and
hands these functions plain floats and names; each returns the :class:`~lightwatch.checks.finding.Finding`
to raise, or ``None``. What each observes and when:

- at fit start (the model as initialised): :func:`init_scale_finding`, :func:`zero_embedding_finding`,
  :func:`frozen_parameters_finding`, :func:`frozen_at_init_finding` (the test is
  :mod:`lightwatch.core.init_signature`);
- at the first sampled step: :func:`missing_gradient_finding`, :func:`orphan_finding`,
  :func:`batchnorm_eval_finding`, and the first update through :class:`UpdateRatioCheck`;
- in the first steps: :func:`stale_gradient_finding` (a forgotten ``zero_grad``);
- at the first sampled step after step 0: :class:`UpdateRatioCheck` (learning rate far too high or too low);
- at every sampled step: :func:`vanishing_finding` on :func:`depth_ratio`.

Thresholds and their measured healthy ranges are next to each constant below.
"""
from __future__ import annotations

import math
import statistics
from typing import List, Optional, Sequence, Tuple

from lightwatch.checks.finding import Finding

__all__ = [
    "FIRST_RATIO_HIGH",
    "RATIO_HIGH",
    "RATIO_MIN_TENSORS",
    "VANISHING",
    "UpdateRatioCheck",
    "batchnorm_eval_finding",
    "depth_ratio",
    "frozen_at_init_finding",
    "frozen_parameters_finding",
    "future_leak_finding",
    "init_scale_finding",
    "median_update",
    "missing_gradient_finding",
    "nonfinite_gradient_finding",
    "orphan_finding",
    "overall_update_ratio",
    "stale_gradient_finding",
    "update_ratios",
    "vanishing_finding",
    "zero_embedding_finding",
]

# update_ratio_high: the median over the weight tensors of ||dW|| / ||W||, at the first check after step 0 (a
# warmup too: with Adam a rate far too high moves every weight ~20% a step early, then the weights' norms grow and
# the ratio falls, so a later check would miss it). Healthy runs: at most 0.046 across the calibration corpus's
# families (the fault suite: 0.058 for the fastest layer); a learning rate x100: at least 0.19 in every layer.
# Single layers of healthy recipes read up to 0.37 (a fresh head of small norm: torchvision resnet18's fc with SGD
# momentum, an LSTM LM's decoder with SGD at lr 20), so one fast layer alone is `info`.
RATIO_HIGH = 0.1
# ... and at step 0 itself (the median over the weight tensors): Adam's first step moves every weight by about the
# learning rate, lr * sqrt(3 * fan_in) of a default-initialised tensor's norm (lr 1e-3: 0.055 at fan-in 1,024, 0.11 at
# 4,096), so step 0 gets a threshold of its own. Healthy first steps across the calibration corpus (14 families,
# seeds 0-2): at most 0.065 (torchvision resnet18, SGD momentum; 0 under a warmup that starts at 0); the three
# fault-suite families at most 0.042 (the recurrent classifier, Adam 3e-3); the digits suite's fastest layer at
# most 0.10. A learning rate x100: 0.49-0.67 (CNN, SGD), 4.2 (Adam); x30 without clipping: 1.25.
FIRST_RATIO_HIGH = 0.3
# update_ratio_low: the fastest weight below this is `info` (fine-tuning moves slowly) ...
RATIO_LOW = 3e-3
# ... and below this `warning`: nothing learns, fine-tuning included (Adam at lr 1e-5 moves ~5e-4 a step)
RATIO_DEAD = 1e-4
# grad_vanishing: the first quarter of the weight layers (its largest gradient norm) over the median layer's.
# Healthy across the calibration families: >= 0.06 (a GAN's generator, 6 layers); the fault suite's 10 sigmoid
# layers: 3.5e-4 to 5.2e-4. 5e-3 sits between, geometrically (x12 / x10).
VANISHING = 5e-3
RATIO_MIN_TENSORS = 3  # the median needs this many weight tensors; with fewer one layer's own scale decides
# init_zero / init_large: a Linear/Conv weight's variance times its fan-in (default inits give 0.33-2)
INIT_SCALE_MIN, INIT_SCALE_MAX = 1e-6, 20.0

Move = Tuple[float, int]  # (||dW|| / ||W||, index of the tensor)


def _listed(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


# ------------------------------------------------------------------------------------------- readings
def update_ratios(matrices: Sequence[int], present: Sequence[float], before_sq: Sequence[float],
                  delta_sq: Sequence[float]) -> List[Move]:
    """``(||dW|| / ||W||, index)`` of every weight tensor in ``matrices`` that has a gradient.

    Example:
        >>> update_ratios([0, 1], present=[1, 1], before_sq=[4.0, 1.0], delta_sq=[0.04, 0.0])
        [(0.1, 0), (0.0, 1)]
    """
    return [(math.sqrt(delta_sq[j] / before_sq[j]), j) for j in matrices
            if present[j] and before_sq[j] > 0 and math.isfinite(delta_sq[j])]


def overall_update_ratio(moves: Sequence[Move], before_sq: Sequence[float],
                         delta_sq: Sequence[float]) -> Optional[float]:
    """||dW|| / ||W|| over the same tensors together: how far one step moves the network."""
    if not moves:
        return None
    return math.sqrt(sum(delta_sq[j] for _, j in moves) / sum(before_sq[j] for _, j in moves))


def median_update(moves: Sequence[Move]) -> Optional[Tuple[float, int]]:
    """The median update ratio over the weight tensors (at least 3), and their count; else None.

    Example:
        >>> median_update([(0.1, 0), (0.02, 1), (0.03, 2)])
        (0.03, 3)
    """
    if len(moves) < RATIO_MIN_TENSORS:
        return None
    return statistics.median(r for r, _ in moves), len(moves)


def depth_ratio(layers: Sequence[int], grad_sq: Sequence[float]) -> Optional[Tuple[float, int]]:
    """The largest gradient norm of the first quarter of the weight layers over the median layer's.

    Vanishing gradients fade through depth everywhere, so the first layers sit far below the middle of the
    network; single early tensors (attention queries and keys at init, embeddings) have small gradients by
    design beside healthy ones in the same block, and a fresh head's gradient can dwarf every other layer's
    late in training (a converged BERT: first quarter / head 1.2e-3, first quarter / median 0.55), so
    neither a single first layer nor the last one is the reference. Returns ``(ratio, k)`` with ``k`` the
    layers per quarter, or None with fewer than two layers.

    Args:
        layers: indices of the weight layers that have a gradient, in registration order.
        grad_sq: squared gradient norm of every selected parameter.

    Example:
        >>> depth_ratio([0, 1, 2, 3], [1e-8, 1.0, 1.0, 4.0])
        (0.0001, 1)
    """
    if len(layers) < 2:
        return None
    k = max(1, len(layers) // 4)
    head = [grad_sq[j] for j in layers[:k] if math.isfinite(grad_sq[j])]
    every = [grad_sq[j] for j in layers if math.isfinite(grad_sq[j])]
    median = statistics.median(every) if every else 0.0
    if not head or median <= 0:
        return None
    return math.sqrt(max(head) / median), k


# ------------------------------------------------------------------------------------------- update ratio
class UpdateRatioCheck:
    """``update_ratio_high`` / ``update_ratio_low``: how far one optimizer step moves the weights.

    Judged at step 0 (the median above :data:`FIRST_RATIO_HIGH`) and once at the first sampled step after it
    (or, while a warmup is still raising the learning rate and updates are small, at the first check after
    the rise). State: whether it has judged, and the largest update of step 0 (a first update that large
    followed by no movement at all is a network the first steps killed).

    Example:
        >>> check = UpdateRatioCheck()
        >>> names = ["a.weight", "b.weight", "c.weight"]
        >>> check.judge(0, [(0.5, 0), (0.6, 1), (0.4, 2)], warming_up=False, names=names).rule
        'update_ratio_high'
        >>> check.judge(9, [(0.01, 0), (0.02, 1), (0.01, 2)], warming_up=False, names=names) is None
        True
    """

    def __init__(self) -> None:
        self.checked = False
        self.first_update: Optional[Move] = None

    def judge(self, step: int, ratios: Sequence[Move], warming_up: bool, names: Sequence[str]) -> Optional[Finding]:
        """The finding of this sampled step's update ratios, if any.

        Args:
            step: the optimizer step the ratios belong to.
            ratios: ``(ratio, index)`` of the weight tensors (:func:`update_ratios`).
            warming_up: the learning rate rose since the previous check.
            names: the selected parameters' names, by index.
        """
        typical = median_update(ratios)
        if step == 0:
            if ratios:
                self.first_update = max(ratios)
            if typical is not None and typical[0] > FIRST_RATIO_HIGH and not self.checked:
                self.checked = True
                return self._first_step_too_large(typical, names[max(ratios)[1]], step)
            return None
        if self.checked:
            return None
        self.checked = True
        if not ratios:
            return None
        ratio, i = max(ratios)
        # how far one step moves most of the network: the median over the weight tensors. A learning rate too
        # high moves every layer fast; a fresh head of small norm, or a layer whose weights shrink towards 0,
        # moves fast alone
        first = self.first_update
        if ratio < RATIO_DEAD and first is not None and first[0] > RATIO_HIGH:
            return self._killed(first, names[first[1]], ratio, step)
        if typical is not None and typical[0] > RATIO_HIGH:
            return Finding(
                "update_ratio_high", "warning", names[i], typical[0], threshold=RATIO_HIGH, step=step,
                message=(f"one optimizer step changes the typical weight tensor by {100 * typical[0]:.3g}% of "
                         f"its norm (the median over {typical[1]} weight tensors; '{names[i]}' "
                         f"{100 * ratio:.3g}%; healthy runs 0.2-5%): the learning rate is likely far too "
                         f"high; lower it about 10x."))
        if ratio < RATIO_LOW and warming_up:  # small steps are the point of a warmup: judge after it
            self.checked = False
            return None
        if ratio > RATIO_HIGH:
            return Finding(
                "update_ratio_high", "info", names[i], ratio, threshold=RATIO_HIGH, step=step,
                message=(f"one optimizer step changes '{names[i]}' by {100 * ratio:.3g}% of its norm" +
                         (f", the typical weight tensor {100 * typical[0]:.3g}%" if typical else "") +
                         ": usual for a freshly initialised layer of small norm (a new head) in its first "
                         "steps; a learning rate too high moves most layers that fast, which is a warning."))
        if ratio < RATIO_LOW:
            severity = "warning" if ratio < RATIO_DEAD else "info"
            return Finding(
                "update_ratio_low", severity, names[i], ratio,
                threshold=RATIO_DEAD if severity == "warning" else RATIO_LOW, step=step,
                message=(f"one optimizer step changes '{names[i]}' by {100 * ratio:.3g}% of its norm "
                         f"(healthy 1-6% early in training): the learning rate is likely far too low, "
                         f"unless this is fine-tuning."))
        return None

    @staticmethod
    def _first_step_too_large(typical: Tuple[float, int], fastest: str, step: int) -> Finding:
        return Finding(
            "update_ratio_high", "warning", fastest, typical[0], threshold=FIRST_RATIO_HIGH, step=step,
            message=(f"the first optimizer step changed the typical weight tensor by {100 * typical[0]:.3g}% "
                     f"of its norm (the median over {typical[1]} weight tensors; healthy first steps move at "
                     f"most 6.5%, Adam's about lr x sqrt(3 x fan-in)): the learning rate is likely far too "
                     f"high; lower it about 10x, or warm it up."))

    @staticmethod
    def _killed(first: Move, name: str, ratio: float, step: int) -> Finding:
        # a first update that large, then nothing moves: the first steps killed the network (every unit dead,
        # no gradient), which reads as tiny updates but is a learning rate far too high
        return Finding(
            "update_ratio_high", "warning", name, first[0], threshold=RATIO_HIGH, step=step, message=(
                f"the first optimizer step changed '{name}' by {100 * first[0]:.3g}% of "
                f"its norm, and by step {step} no weight moves any more ({ratio:.2g}): the first updates "
                f"were so large that they killed the network (units dead, gradients zero). The learning "
                f"rate is far too high; lower it about 10x, or warm it up."))


# ------------------------------------------------------------------------------------------- other findings
def vanishing_finding(depth: Optional[Tuple[float, int]], first_layer: str, step: int) -> Optional[Finding]:
    """``grad_vanishing`` when :func:`depth_ratio` is below :data:`VANISHING`."""
    if depth is None or depth[0] >= VANISHING:
        return None
    ratio, k = depth
    return Finding(
        "grad_vanishing", "warning", first_layer, ratio, threshold=VANISHING, step=step,
        message=(f"the largest gradient among the first {k} weight layer(s) (from "
                 f"'{first_layer}') is {ratio:.2g} of the median layer's: gradients vanish "
                 f"through depth (saturating activations without normalisation); use ReLU-family "
                 f"activations, normalisation layers or residual connections."))


def missing_gradient_finding(missing: Sequence[str], step: int) -> Optional[Finding]:
    """``grad_missing`` (info): parameters of the optimizer being stepped that got no gradient."""
    if not missing:
        return None
    return Finding(
        "grad_missing", "info", missing[0], float(len(missing)), step=step,
        message=(f"{len(missing)} trainable parameter(s) of the optimizer being stepped got no gradient "
                 f"({', '.join(missing[:5])}): unused in the loss, or detached; fine for unused heads, a "
                 f"bug otherwise."))


def orphan_finding(orphans: Sequence[str], step: int) -> Optional[Finding]:
    """``param_not_in_optimizer``: a gradient that no optimizer applies.

    The layer was built after the optimizer, or the optimizer was given a sub-module's parameters; it stays
    as initialised for the whole run.
    """
    if not orphans:
        return None
    return Finding(
        "param_not_in_optimizer", "warning", orphans[0], float(len(orphans)), step=step,
        message=(f"{len(orphans)} parameter(s) get a gradient but are in no optimizer "
                 f"({_listed(orphans)}): they will never "
                 f"be updated. Build the optimizer from self.parameters() (after every layer exists), "
                 f"or set requires_grad=False on them if they are meant to stay fixed."))


def init_scale_finding(name: str, scaled: float) -> Optional[Finding]:
    """``init_zero`` / ``init_large``: a weight's variance times its fan-in far outside default inits (0.33-2).

    Example:
        >>> init_scale_finding("net.0.weight", 0.0).rule, init_scale_finding("net.0.weight", 1.0)
        ('init_zero', None)
    """
    if INIT_SCALE_MIN <= scaled <= INIT_SCALE_MAX:
        return None
    rule = "init_zero" if scaled < INIT_SCALE_MIN else "init_large"
    return Finding(
        rule, "warning", name, scaled, threshold=INIT_SCALE_MIN if rule == "init_zero" else INIT_SCALE_MAX,
        message=(f"'{name}' starts with weight variance x fan-in = {scaled:.3g} (default inits "
                 f"give 0.33-2): weights initialised "
                 f"{'to zero, so units stay identical' if rule == 'init_zero' else 'far too large'}; "
                 f"use the layer's default or a He/Xavier init."))


def zero_embedding_finding(zeros: Sequence[str]) -> Optional[Finding]:
    """``init_zero`` for token embeddings that all start at 0: nothing tells the tokens apart at the input.

    A tied output layer starts from zero logits too; a padding row alone at 0 is the usual case, not this.
    """
    if not zeros:
        return None
    return Finding(
        "init_zero", "warning", zeros[0], 0.0, threshold=0.0,
        message=(f"embedding '{zeros[0]}' starts with every value 0: every token has the same embedding, "
                 f"so nothing tells the tokens apart at the input (and a tied output layer starts from "
                 f"all-zero logits); use nn.Embedding's default or a normal init (std 0.02 in GPT-2)."))


def frozen_parameters_finding(frozen: Sequence[str], total: int) -> Optional[Finding]:
    """``frozen_parameters`` (info): parameters with ``requires_grad=False``."""
    if not frozen:
        return None
    return Finding(
        "frozen_parameters", "info", frozen[0], float(len(frozen)),
        message=(f"{len(frozen)} of {total} parameter tensors do not require grad ({', '.join(frozen[:5])}"
                 f"{' ...' if len(frozen) > 5 else ''}); fine when freezing on purpose, a bug otherwise."))


def frozen_at_init_finding(fresh: Sequence[str]) -> Optional[Finding]:
    """``frozen_at_init``: frozen tensors that still hold a fresh uniform random initialisation.

    Freezing pretrained layers is fine-tuning; freezing a layer nobody trained makes it a fixed random
    projection, which is a mistake (the wrong layers frozen, or the weights loaded after freezing, or not
    at all).
    """
    if not fresh:
        return None
    return Finding(
        "frozen_at_init", "warning", fresh[0], float(len(fresh)),
        message=(f"{len(fresh)} frozen parameter tensor(s) ({_listed(fresh)}) still hold a fresh uniform random "
                 f"initialisation (uniform values with a sharp edge, which a few training steps smear): these "
                 f"layers are fixed random projections and will never learn. Likely cause: the wrong layers "
                 f"frozen, or pretrained weights not loaded before freezing; unfreeze them or load the weights."))


def batchnorm_eval_finding(names: Sequence[str], fresh: Sequence[str], step: int) -> Optional[Finding]:
    """``batchnorm_eval``: BatchNorm layers in eval mode during a training step.

    Eval mode normalises with the running statistics instead of the batch's. With running statistics that
    were never collected (``fresh``: mean 0, variance 1) the layer does not normalise at all, and the model
    is later evaluated with statistics nobody computed: a bug (``warning``; a ``model.eval()`` left in the
    training code). With collected statistics it is how a pretrained backbone is fine-tuned with frozen
    normalisation (``info``).
    """
    if not names:
        return None
    listed = _listed(names)
    if fresh:
        return Finding(
            "batchnorm_eval", "warning", fresh[0], float(len(fresh)), step=step,
            message=(f"{len(names)} BatchNorm layer(s) are in eval mode during training ({listed}), "
                     f"{len(fresh)} of them with running statistics never collected (mean 0, variance 1): they "
                     f"do not normalise, and evaluation will use statistics nobody computed. Likely a "
                     f"model.eval() (or a submodule's .eval()) left in the training code; call .train() there, "
                     f"or use frozen statistics only with a pretrained backbone."))
    return Finding(
        "batchnorm_eval", "info", names[0], float(len(names)), step=step,
        message=(f"{len(names)} BatchNorm layer(s) are in eval mode during training ({listed}) with "
                 f"collected running statistics: frozen normalisation, as when fine-tuning a pretrained "
                 f"backbone; a bug otherwise."))


def stale_gradient_finding(stale: Sequence[str], step: int) -> Optional[Finding]:
    """``grad_stale`` (error): gradients non-zero before backward at the start of a step."""
    if not stale:
        return None
    return Finding(
        "grad_stale", "error", stale[0], float(len(stale)), step=step, message=(
            f"gradients of {len(stale)} parameter(s) ({', '.join(stale[:3])}) are non-zero before "
            f"backward at the start of step {step}: they accumulate across steps. "
            f"zero_grad is not called (check an overridden optimizer_zero_grad or manual loop)."))


def future_leak_finding(where: str, leak: float, threshold: float, step: int) -> Optional[Finding]:
    """``future_leak``: a next-token model whose earlier outputs move when a later token changes."""
    if leak <= threshold:
        return None
    return Finding(
        "future_leak", "warning", where, leak, threshold=threshold, step=step,
        message=(f"the batch is a next-token objective, yet changing one input token changes the outputs "
                 f"of '{where}' at earlier positions ({leak:.3g} of their scale): the model sees the "
                 f"future (no causal attention mask: a padding-only or bidirectional mask). It learns to "
                 f"copy the next token, and its training loss overstates what it can do; pass a causal "
                 f"mask (or the 2D padding mask and let the model add it)."))


def nonfinite_gradient_finding(flagged: Sequence[str], count: float, severity: str, action: str,
                               step: int) -> Optional[Finding]:
    """``grad_nonfinite``: NaN/Inf gradient values in the parameters named (severity and action as configured).

    Example:
        >>> nonfinite_gradient_finding(["net.0.weight"], 3.0, "error", "warn", step=7).subject
        'net.0.weight'
    """
    if not flagged:
        return None
    names = ", ".join(flagged[:10]) + (" ..." if len(flagged) > 10 else "")
    return Finding(
        "grad_nonfinite", severity, flagged[0], count, step=step, action=action,
        message=(f"non-finite gradient values in {len(flagged)} parameter(s): {names}. Likely causes: a "
                 f"learning rate too high, a log/div of zero in the loss, or NaN in the batch; check the "
                 f"first layer named and the data."))
