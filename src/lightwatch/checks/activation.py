"""The diagnoses of :class:`~lightwatch.callbacks.activation_stats.ActivationStatsMonitor`, judged on host numbers.

Every check has the same shape:

- what it observes: a :class:`LayerReading` per sampled layer at a sampled step (:class:`LayerCheck`), or the
  model's output once, at the first sampled step (:class:`OutputCheck`);
- the state it keeps: only :class:`PersistentLayerCheck` keeps any (how many checks in a row each layer has
  been over the bound), saved with the callback;
- when it is judged: :meth:`LayerCheck.judge` / :meth:`OutputCheck.judge` are called at every sampled step the
  callback reads back; a check that looks only at the initialised model returns ``None`` at other steps;
- what it raises: an :class:`ActivationAlert` (rule, severity, action, subject, value, threshold, message,
  step), or ``None``.

A :class:`LayerCheck` may also have a *reading* (:meth:`LayerCheck.reading`): the number it judges, written
under ``monitor.diag/<name>/<stat>`` every sampled step so its healthy range can be read back from any run.

The callback reduces the module outputs (on the device, across ranks) and hands the checks plain floats; the
functions at the end of this module say what some checks observe on the device (which outputs count as
saturated, which rows as probability vectors), computed by the callback on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from lightwatch.checks.finding import Finding

__all__ = [
    "ActivationAlert",
    "ActivationCheck",
    "DeadUnitsCheck",
    "GrowthCheck",
    "LayerCheck",
    "LayerReading",
    "NllOnLogitsCheck",
    "NonFiniteOutputCheck",
    "OutputCheck",
    "OutputReading",
    "PersistentLayerCheck",
    "ProbabilityOutputCheck",
    "SaturationCheck",
    "probability_rows",
    "saturation_mask",
    "selective_rows",
    "unnormalised_rows",
]

_LAST = 1 << 30  # forward position of a layer that did not run


class LayerReading(NamedTuple):
    """What the callback read from one watched layer's output at one sampled step (reduced over ranks).

    A named tuple (immutable; a third of a frozen dataclass's cost to build, and one is built per watched
    module every sampled step).

    Attributes:
        name: the module's name in the model.
        position: its place in forward order at this step (0 runs first).
        mean: mean of the output.
        std: standard deviation of the output.
        nonfinite: the output held a NaN or an Inf.
        activation: the module is an element-wise activation function (ReLU, GELU, Tanh, ...).
        dead_frac: share of units that were zero for every sample (rectifiers only, else ``None``).
        samples_per_unit: output values per unit in the batch, next to ``dead_frac`` (else ``None``).
        saturation: share of outputs within 1% of a bound (bounded activations only, else ``None``).

    Example:
        >>> r = LayerReading("net.1", position=1, mean=0.3, std=0.4, dead_frac=0.2, samples_per_unit=32.0)
        >>> r.rms
        0.5
    """

    name: str
    position: int
    mean: float
    std: float
    nonfinite: bool = False
    activation: bool = False
    dead_frac: Optional[float] = None
    samples_per_unit: Optional[float] = None
    saturation: Optional[float] = None

    @property
    def rms(self) -> float:
        """Root mean square of the output, from its mean and standard deviation."""
        return math.sqrt(self.std ** 2 + self.mean ** 2)


@dataclass(frozen=True)
class OutputReading:
    """The model's output at the first sampled step: the last module to run, and shares of its rows.

    Attributes:
        name: the module whose output is the model's output (the last to run in the forward pass).
        probability_share: share of rows that are probability vectors (in [0, 1], summing to 1).
        selective_share: share of the loss gradient's rows at that output with exactly one non-zero entry.
        unnormalised_share: share of rows that are not log-probabilities (their logsumexp is not 0).

    Example:
        >>> OutputReading("head", probability_share=1.0, selective_share=0.0, unnormalised_share=1.0).name
        'head'
    """

    name: str
    probability_share: float
    selective_share: float
    unnormalised_share: float


#: What an activation check raises: the shared :class:`~lightwatch.checks.finding.Finding`.
ActivationAlert = Finding


class ActivationCheck:
    """What every activation check shares: the rule it raises, with which severity and action.

    Example:
        >>> class Loud(ActivationCheck):
        ...     rule = "loud"
        >>> Loud().alert("net.0", 3.0, 1.0, "too loud", step=5).severity
        'warning'
    """

    rule: ClassVar[str] = ""
    severity: str = "warning"
    action: str = "log"

    def alert(self, subject: str, value: float, threshold: Optional[float], message: str,
              step: Optional[int] = None) -> ActivationAlert:
        """An alert of this check's rule, severity and action."""
        return Finding(self.rule, self.severity, subject, value, message, threshold=threshold, step=step,
                       action=self.action)


class LayerCheck(ActivationCheck):
    """A check that observes every sampled layer at each sampled step.

    ``reading_tag`` is ``(name, stat)`` of the reading written under ``monitor.diag/<name>/<stat>``, or
    ``None`` when the check has no reading.

    Example:
        >>> class Wide(LayerCheck):
        ...     rule = "wide"
        ...     def judge(self, layers, step, interval):
        ...         wide = [r for r in layers if r.std > 5]
        ...         return self.alert(wide[0].name, wide[0].std, 5.0, "wide", step) if wide else None
        >>> Wide().judge([LayerReading("net.0", 0, mean=0.0, std=9.0)], step=10, interval=10).subject
        'net.0'
    """

    reading_tag: ClassVar[Optional[Tuple[str, str]]] = None

    def reading(self, layers: Sequence[LayerReading], step: int) -> Optional[float]:
        """The number this check judges at ``step`` (``None``: nothing to write)."""
        return None

    def judge(self, layers: Sequence[LayerReading], step: int, interval: int) -> Optional[ActivationAlert]:
        """Update the state with the readings of ``step`` and return the alert to raise, if any.

        Args:
            layers: one reading per watched layer that ran at ``step``.
            step: the sampled step (0: the model as initialised, before any update).
            interval: steps between two sampled steps.
        """
        raise NotImplementedError(f"{type(self).__name__}: a layer check must define judge().")


class OutputCheck(ActivationCheck):
    """A check that observes the model's output once, at the first sampled step.

    Example:
        >>> class Flat(OutputCheck):
        ...     rule = "flat"
        ...     def judge(self, output):
        ...         return None
        >>> Flat().action
        'warn'
    """

    action = "warn"

    def judge(self, output: OutputReading) -> Optional[ActivationAlert]:
        """The alert to raise for this output, if any."""
        raise NotImplementedError(f"{type(self).__name__}: an output check must define judge().")


class PersistentLayerCheck(LayerCheck):
    """A per-layer share over ``bound`` at ``checks`` sampled steps in a row; one reading suffices at step 0.

    At step 0 the model is as initialised: nothing has moved yet, so one reading counts as the whole streak
    (and is not reported again at the next checks). When several layers complete their streak at once, the
    first in forward order is named. The state is the streak of each layer currently over the bound.

    Subclasses say which share they judge (:meth:`value_of`), and describe it (``what``) and its usual
    causes and fixes (``fix``) for the message.

    Args:
        bound: the share above which a layer counts.
        checks: sampled steps in a row a layer must stay above ``bound``.

    Example:
        >>> class Sparse(PersistentLayerCheck):
        ...     rule, what, fix = "sparse", "of its outputs are zero", "less dropout"
        ...     def value_of(self, layer):
        ...         return layer.dead_frac
        >>> check = Sparse(bound=0.5, checks=2)
        >>> layers = [LayerReading("net.1", 0, mean=0.1, std=0.1, dead_frac=0.7)]
        >>> check.judge(layers, step=10, interval=10) is None
        True
        >>> print(check.judge(layers, step=20, interval=10).message)  # doctest: +NORMALIZE_WHITESPACE
        module 'net.1': 70% of its outputs are zero, for 2 checks in a row (since step 10) (1 module(s)
        affected; the first in forward order is named). Likely: less dropout.
    """

    what: ClassVar[str] = ""
    fix: ClassVar[str] = ""

    def __init__(self, bound: float, checks: int) -> None:
        if checks < 1:
            raise ValueError(f"{type(self).__name__}: checks must be at least 1, got {checks!r}.")
        self.bound = float(bound)
        self.checks = int(checks)
        self.streaks: Dict[str, int] = {}
        # whether any step was judged: a saved state lists only the checks that were
        self.judged = False

    def value_of(self, layer: LayerReading) -> Optional[float]:
        """The share this check judges for ``layer`` (``None``: not judged for this layer)."""
        raise NotImplementedError(f"{type(self).__name__}: a persistent check must define value_of().")

    def reading(self, layers: Sequence[LayerReading], step: int) -> Optional[float]:
        """The largest share over the layers (``None`` when no layer has one)."""
        values = [v for v in (self.value_of(r) for r in layers) if v is not None]
        return max(values) if values else None

    def judge(self, layers: Sequence[LayerReading], step: int, interval: int) -> Optional[ActivationAlert]:
        self.judged = True
        initial = step == 0
        over = [(r.name, v) for r in layers if (v := self.value_of(r)) is not None and v > self.bound]
        current = {name for name, _ in over}
        for name in [n for n in self.streaks if n not in current]:
            del self.streaks[name]
        hits = []
        for name, value in over:
            self.streaks[name] = self.checks if initial else self.streaks.get(name, 0) + 1
            if self.streaks[name] == self.checks:
                hits.append((name, value))
        if not hits:
            return None
        position = {r.name: r.position for r in layers}
        name, value = min(hits, key=lambda h: position.get(h[0], _LAST))
        since = max(step - (self.checks - 1) * interval, 0)
        when = ("at initialisation (step 0, before any update)" if initial
                else f"for {self.checks} checks in a row (since step {since})")
        return self.alert(name, value, self.bound, step=step, message=(
            f"module '{name}': {100 * value:.0f}% {self.what}, {when} "
            f"({len(hits)} module(s) affected; the first in forward order is named). Likely: {self.fix}."))

    def state_dict(self) -> Dict[str, int]:
        """Layer name -> current streak."""
        return dict(self.streaks)

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        """Restore what :meth:`state_dict` returned; ``None``: as new (never judged)."""
        self.judged = state is not None
        self.streaks = {str(n): int(c) for n, c in dict(state or {}).items()}


class DeadUnitsCheck(PersistentLayerCheck):
    """``act_dead``: a rectifier (ReLU, ...) with more than 60% of its units zero for every sample, 3 checks in a row.

    A unit counts as dead when it is zero for every sample of the batch; with fewer than
    ``min_samples_per_unit`` samples per unit, a live ReLU unit (zero for about half its inputs) reads dead by
    chance (1 in 2 with one sample), so such layers are not judged and not in the reading. Healthy runs of the
    fault suite stay at or below 16%.

    Args:
        bound: share of dead units above which a layer counts.
        checks: sampled steps in a row.
        min_samples_per_unit: fewest samples per unit for a layer to be judged.

    Example:
        >>> check = DeadUnitsCheck()
        >>> layers = [LayerReading("net.1", 1, mean=0.0, std=0.1, dead_frac=0.9, samples_per_unit=64.0),
        ...           LayerReading("net.3", 3, mean=0.0, std=0.1, dead_frac=0.95, samples_per_unit=2.0)]
        >>> check.reading(layers, step=0)
        0.9
        >>> alert = check.judge(layers, step=0, interval=50)
        >>> alert.rule, alert.subject, alert.threshold
        ('act_dead', 'net.1', 0.6)
    """

    rule = "act_dead"
    reading_tag = ("act_dead", "max")
    what = "of its units output zero for every sample"
    fix = ("a learning rate too high, a large negative bias, or poor init; try a lower learning rate, "
           "LeakyReLU/GELU, or normalisation")

    def __init__(self, bound: float = 0.6, checks: int = 3, min_samples_per_unit: float = 8) -> None:
        super().__init__(bound, checks)
        self.min_samples_per_unit = min_samples_per_unit

    def value_of(self, layer: LayerReading) -> Optional[float]:
        thin = layer.samples_per_unit is not None and layer.samples_per_unit < self.min_samples_per_unit
        return None if thin else layer.dead_frac


class SaturationCheck(PersistentLayerCheck):
    """``act_saturated``: a bounded activation with more than 50% of its outputs within 1% of a bound, 2 checks in
    a row.

    Healthy runs of the fault suite stay at or below 10%.

    Args:
        bound: share of saturated outputs above which a layer counts.
        checks: sampled steps in a row.

    Example:
        >>> check = SaturationCheck()
        >>> layers = [LayerReading("net.1", 1, mean=0.0, std=0.99, activation=True, saturation=0.8)]
        >>> check.judge(layers, step=50, interval=50) is None, check.judge(layers, step=100, interval=50).value
        (True, 0.8)
    """

    rule = "act_saturated"
    reading_tag = ("act_saturated", "max")
    what = "of its outputs sit at the bounds of the activation"
    fix = ("inputs to the activation are too large (weights too large, inputs not normalised); rescale the "
           "init or inputs, or add normalisation before it")

    def __init__(self, bound: float = 0.5, checks: int = 2) -> None:
        super().__init__(bound, checks)

    def value_of(self, layer: LayerReading) -> Optional[float]:
        return layer.saturation


class GrowthCheck(LayerCheck):
    """``act_exploding``: at initialisation (step 0), activations grow through depth: weights too large per layer.

    The reading (``act_growth/ratio``, step 0 only) is the RMS of the last activation layer's output over the
    first one's, in forward order, over the finite ones; there is none with fewer than ``min_layers``
    activation layers (with two, the ratio says more about the input scale than about depth) or a first RMS
    of 0. The check fires when the ratio is above ``bound``.

    Args:
        bound: ratio above which the check fires.
        min_layers: fewest activation layers for a ratio.

    Example:
        >>> layers = [LayerReading(f"net.{i}", i, mean=0.0, std=4.0 ** i, activation=True) for i in range(3)]
        >>> check = GrowthCheck()
        >>> check.reading(layers, step=0), check.reading(layers, step=50)
        (16.0, None)
        >>> check.judge(layers, step=0, interval=50).subject
        'net.2'
    """

    rule = "act_exploding"
    reading_tag = ("act_growth", "ratio")

    def __init__(self, bound: float = 10.0, min_layers: int = 3) -> None:
        self.bound = float(bound)
        self.min_layers = int(min_layers)

    def growth(self, layers: Sequence[LayerReading]) -> Optional[Tuple[float, str, str, int]]:
        """The ratio, the first and last activation layers and their count; ``None`` when there is no ratio."""
        found: List[LayerReading] = sorted((r for r in layers if r.activation and not r.nonfinite),
                                           key=lambda r: r.position)
        if len(found) < self.min_layers or not found[0].rms > 0 or not math.isfinite(found[-1].rms):
            return None
        return found[-1].rms / found[0].rms, found[0].name, found[-1].name, len(found)

    def reading(self, layers: Sequence[LayerReading], step: int) -> Optional[float]:
        found = self.growth(layers) if step == 0 else None
        return None if found is None else found[0]

    def judge(self, layers: Sequence[LayerReading], step: int, interval: int) -> Optional[ActivationAlert]:
        found = self.growth(layers) if step == 0 else None
        if found is None or not found[0] > self.bound:
            return None
        growth, first, last, count = found
        per_layer = growth ** (1.0 / (count - 1))
        return self.alert(last, growth, self.bound, step=0, message=(
            f"at initialisation the activations grow through depth: the RMS of '{last}' is {growth:.3g}x that "
            f"of '{first}' ({count} activation layers, x{per_layer:.3g} per layer; a stable init keeps it "
            f"near 1). Gradients grow the same way backwards and the first updates blow up: use the layers' "
            f"default or a He/Xavier init with gain 1, or add normalisation layers."))


class NonFiniteOutputCheck(LayerCheck):
    """``act_nonfinite``: a layer's output held NaN or Inf; the first such layer in forward order is named.

    Judged at every sampled step (it is not one of the switchable diagnoses).

    Args:
        severity: severity of the alert.
        action: action of the alert.

    Example:
        >>> layers = [LayerReading("net.2", 2, mean=float("nan"), std=float("nan"), nonfinite=True),
        ...           LayerReading("net.1", 1, mean=float("inf"), std=float("nan"), nonfinite=True)]
        >>> alert = NonFiniteOutputCheck().judge(layers, step=7, interval=1)
        >>> alert.subject, alert.value, alert.severity, alert.action
        ('net.1', 2.0, 'error', 'warn')
    """

    rule = "act_nonfinite"

    def __init__(self, severity: str = "error", action: str = "warn") -> None:
        self.severity = severity
        self.action = action

    def judge(self, layers: Sequence[LayerReading], step: int, interval: int) -> Optional[ActivationAlert]:
        flagged = [r for r in layers if r.nonfinite]
        if not flagged:
            return None
        in_order = [r.name for r in sorted(flagged, key=lambda r: r.position)]
        first = in_order[0]
        return self.alert(first, float(len(flagged)), None, step=step, message=(
            f"module '{first}' is the first in forward order whose output is non-finite "
            f"({len(flagged)} module(s) affected: {', '.join(in_order[:5])}"
            f"{' ...' if len(in_order) > 5 else ''}). Check its weights and its input: a NaN "
            f"weight, an overflow, or a log/sqrt/div of a bad value there."))


class NllOnLogitsCheck(OutputCheck):
    """``nll_on_logits``: the loss picks one output per row and is linear in it, on outputs that are not
    log-probabilities (NLL applied to raw logits): such a loss has no lower bound and diverges.

    Fires when both the share of one-entry gradient rows and the share of rows that are not
    log-probabilities are above ``bound``.

    Args:
        bound: share above which each reading counts.

    Example:
        >>> out = OutputReading("head", probability_share=0.0, selective_share=1.0, unnormalised_share=1.0)
        >>> NllOnLogitsCheck().judge(out).value
        1.0
    """

    rule = "nll_on_logits"

    def __init__(self, bound: float = 0.9) -> None:
        self.bound = float(bound)

    def judge(self, output: OutputReading) -> Optional[ActivationAlert]:
        selective, unnormalised = output.selective_share, output.unnormalised_share
        if not (selective > self.bound and unnormalised > self.bound):
            return None
        return self.alert(output.name, selective, self.bound, (
            f"the loss picks one output per row and is linear in it (its gradient at the model's output, "
            f"module '{output.name}', has one non-zero entry in {selective:.0%} of the rows), but the outputs are "
            f"not log-probabilities ({unnormalised:.0%} of the rows do not log-sum-exp to 0): NLL applied "
            f"to raw logits (or to probabilities without the log). Such a loss has no lower bound on logits: "
            f"it goes negative and diverges. Use F.cross_entropy on the logits, or F.nll_loss on "
            f"F.log_softmax of them."))


class ProbabilityOutputCheck(OutputCheck):
    """``output_probabilities``: the model's output rows are probability vectors (a softmax before a loss that
    expects logits).

    Args:
        bound: share of probability rows above which the check fires.

    Example:
        >>> out = OutputReading("head", probability_share=1.0, selective_share=0.0, unnormalised_share=1.0)
        >>> ProbabilityOutputCheck().judge(out).threshold
        0.5
    """

    rule = "output_probabilities"

    def __init__(self, bound: float = 0.5) -> None:
        self.bound = float(bound)

    def judge(self, output: OutputReading) -> Optional[ActivationAlert]:
        share = output.probability_share
        if not share > self.bound:
            return None
        return self.alert(output.name, share, self.bound, (
            f"the model's output (module '{output.name}', the last to run in the forward pass) is a probability "
            f"distribution in {share:.0%} of its rows (every value in [0, 1], each row summing to 1): a softmax "
            f"before a loss that expects logits (F.cross_entropy, nn.CrossEntropyLoss) caps how low the loss "
            f"can go and shrinks the gradients. Return logits and let the loss apply log_softmax; if your loss "
            f"takes probabilities on purpose, this is fine but numerically weaker than logits."))


# ------------------------------------------------------------------- what the checks observe, on the device
def saturation_mask(module: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """For bounded activations: a function marking values within 1% of a bound (what ``act_saturated`` counts).

    ``None`` for modules whose outputs are not bounded.

    Example:
        >>> mask = saturation_mask(nn.Tanh())
        >>> mask(torch.tensor([0.5, -0.995, 0.999])).tolist(), saturation_mask(nn.ReLU())
        ([False, True, True], None)
    """
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return lambda y: y.abs() > 0.99
    if isinstance(module, nn.Sigmoid):
        return lambda y: (y < 0.01) | (y > 0.99)
    if isinstance(module, nn.Hardsigmoid):
        return lambda y: (y <= 0.0) | (y >= 1.0)
    if isinstance(module, nn.ReLU6):
        return lambda y: y >= 6.0
    if isinstance(module, nn.Hardtanh):
        lo, hi = float(module.min_val), float(module.max_val)
        return lambda y: (y <= lo) | (y >= hi)
    return None


def probability_rows(y: torch.Tensor, max_rows: int = 1024) -> torch.Tensor:
    """Share of the rows (last dimension) of ``y`` that are probability vectors: in [0, 1], summing to 1.

    Example:
        >>> float(probability_rows(torch.tensor([[0.2, 0.8], [1.5, -0.5]])))
        0.5
    """
    rows = y.reshape(-1, y.shape[-1])[:max_rows].float()
    in_range = ((rows >= 0) & (rows <= 1)).all(-1)
    sums_to_one = (rows.sum(-1) - 1).abs() <= 1e-3
    return (in_range & sums_to_one).float().mean()


def selective_rows(grad: torch.Tensor, max_rows: int = 1024) -> torch.Tensor:
    """Share of the rows of a loss gradient with exactly one non-zero entry: a loss that picks one output per row
    and is linear in it (NLL), whose gradient does not depend on the outputs at all.

    Example:
        >>> float(selective_rows(torch.tensor([[0.0, -0.5], [0.1, -0.1]])))
        0.5
    """
    rows = grad.detach().reshape(-1, grad.shape[-1])[:max_rows]
    return ((rows != 0).sum(-1) == 1).float().mean()


def unnormalised_rows(y: torch.Tensor, max_rows: int = 1024) -> torch.Tensor:
    """Share of the rows of ``y`` that are not log-probabilities (their logsumexp is not 0).

    Example:
        >>> float(unnormalised_rows(torch.log_softmax(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), -1)))
        0.0
    """
    rows = y.detach().reshape(-1, y.shape[-1])[:max_rows].float()
    return (torch.logsumexp(rows, -1).abs() > 0.1).float().mean()
