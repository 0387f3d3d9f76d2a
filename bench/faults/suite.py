"""The fault suite: healthy controls and injectable faults, each one a piece of data.

A :class:`Fault` says what is broken (``name``, ``kind``), where it lives (:class:`Location`), how hard
(``severity`` with a default and what the knob means) and what harm it does, and turns a seed into a
:class:`FaultRun`: the model, the datamodule and the Trainer arguments of one short CPU run. The runs are
built from a :class:`Recipe`, the healthy settings of one of five base models, which each fault edits.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from torch import nn

from .data import CENTRE_FEATURES, DataSpec, DigitsData
from .injections import LRSpike
from .models import DigitsClassifier, build_net

__all__ = [
    "BASES",
    "FAULTS",
    "HEALTHY",
    "KINDS",
    "Fault",
    "FaultRun",
    "Location",
    "Recipe",
    "base_recipe",
    "get_fault",
    "healthy_base",
]

KINDS = ("data", "structure", "dynamic", "none")


# ------------------------------------------------------------------------------------------ recipe
@dataclass(frozen=True)
class Recipe:
    """Every setting of one run; the defaults are the healthy ReLU MLP.

    Args:
        model: ``mlp``, ``cnn``, ``gru`` or ``deep`` (see :func:`bench.faults.models.build_net`).
        hidden: hidden widths of ``mlp``.
        activation: ``relu``, ``tanh`` or ``sigmoid``.
        depth: hidden layers of ``deep``.
        width: hidden width of ``deep``.
        norm: LayerNorm in ``deep``.
        optimizer: ``sgd`` (with ``momentum``) or ``adam``.
        lr: learning rate.
        momentum: SGD momentum.
        loss: ``ce`` or ``nll_raw`` (NLL on raw logits).
        loss_weight: share of the wrong loss.
        softmax_weight: > 0 puts a (partial) softmax after the output layer.
        zero_grad_every: zero the gradients only every this many steps.
        init_scale: every parameter multiplied by this after PyTorch's default initialisation.
        layer_scale: ``(module name, factor)`` pairs multiplying one layer's weights.
        kill_units: ``(Linear module name, fraction, bias)``: that fraction of its output units get zero
            weights and the bias, so the ReLU after them never fires.
        frozen: module names whose parameters are set ``requires_grad=False``.
        data: the data settings.
        max_steps: optimizer steps of the run.
        log_every_n_steps: Lightning's logging interval (the monitors sample at it).
        lr_spike: ``(step, factor, steps)`` of a transient learning-rate spike, or ``None``.
    """

    model: str = "mlp"
    hidden: Tuple[int, ...] = (64, 32)
    activation: str = "relu"
    depth: int = 8
    width: int = 64
    norm: bool = False
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    loss: str = "ce"
    loss_weight: float = 1.0
    softmax_weight: float = 0.0
    zero_grad_every: int = 1
    init_scale: float = 1.0
    layer_scale: Tuple[Tuple[str, float], ...] = ()
    kill_units: Optional[Tuple[str, float, float]] = None
    frozen: Tuple[str, ...] = ()
    data: DataSpec = field(default_factory=DataSpec)
    max_steps: int = 200
    log_every_n_steps: int = 10
    lr_spike: Optional[Tuple[int, float, int]] = None

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def replace_data(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **changes))

    def build_model(self) -> DigitsClassifier:
        """The LightningModule with its initialisation faults applied (uses the global RNG: seed first)."""
        net = build_net(self.model, self.hidden, self.activation, self.depth, self.width, self.norm,
                        self.softmax_weight)
        module = DigitsClassifier(net, self.optimizer, self.lr, self.momentum, self.loss, self.loss_weight,
                                  self.zero_grad_every)
        modules = dict(module.named_modules())
        with torch.no_grad():
            if self.init_scale != 1.0:
                for p in module.parameters():
                    p.mul_(self.init_scale)
            for name, factor in self.layer_scale:
                _module(modules, name, "layer_scale").weight.mul_(factor)
            if self.kill_units is not None:
                name, fraction, bias = self.kill_units
                linear = _module(modules, name, "kill_units")
                k = max(1, int(round(fraction * linear.weight.shape[0])))
                linear.weight[:k].zero_()
                linear.bias[:k] = bias
        for name in self.frozen:
            for p in _module(modules, name, "frozen").parameters():
                p.requires_grad_(False)
        return module

    def callbacks(self) -> List[pl.Callback]:
        """Callbacks that plant dynamic faults (put them before any monitor)."""
        if self.lr_spike is None:
            return []
        step, factor, steps = self.lr_spike
        return [LRSpike(step, factor, steps)]


def _module(modules: Dict[str, nn.Module], name: str, what: str) -> nn.Module:
    if name not in modules:
        raise ValueError(f"Recipe.{what}: no module named {name!r}; modules: {sorted(n for n in modules if n)}.")
    return modules[name]


#: The healthy settings of the five base models (each trains to >= 90% test accuracy in 200 steps).
BASES: Dict[str, Recipe] = {
    "mlp": Recipe(),
    "mlp_tanh": Recipe(activation="tanh"),
    "cnn": Recipe(model="cnn", lr=0.02),
    "gru": Recipe(model="gru", optimizer="adam", lr=0.01),
    "deep": Recipe(model="deep", depth=8, width=64, norm=True, optimizer="adam", lr=2e-3),
}


def base_recipe(name: str) -> Recipe:
    if name not in BASES:
        raise ValueError(f"unknown base model {name!r}; use one of {', '.join(BASES)}.")
    return BASES[name]


def healthy_base(seed: int) -> Tuple[str, Recipe]:
    """The base model and batch size a healthy control uses for ``seed``: all five bases, 32 and 64."""
    names = list(BASES)
    name = names[seed % len(names)]
    batch = (32, 64)[(seed // len(names)) % 2]
    return name, BASES[name].replace_data(batch_size=batch)


# ---------------------------------------------------------------------------------------- location
_INT = re.compile(r"\d+")


# The training loss under its names: the module's `self.log("train/loss")`, the value lightwatch's MetricMonitor
# reads itself from the loss handed to backward, and that monitor's scores of it (spike and level shift).
_TRAINING_LOSS = ("train/loss", "monitor.step/loss", "monitor.step/loss_shift_z", "monitor.step/loss_step_z")


@dataclass(frozen=True)
class Location:
    """Where a fault lives, so the evaluation can check that an alert names it.

    Args:
        layers: module names (``net.fc2``); a parameter ``net.fc2.weight`` is inside layer ``net.fc2``.
        split: ``train``, ``val`` or ``test``.
        features: batch fields (``x`` inputs, ``y`` labels) or pixel indices (``"36"``).
        metric: a logged metric (``train/loss``).

    An alert names the location when its subject matches any one of these: it is inside one of the
    layers, has the split as a path component, names one of the fields or pixel indices, or is the metric.

    Example:
        >>> Location(layers=("net.fc2", "net.act2")).matches("net.fc2.weight")
        True
        >>> Location(split="val").matches("train/x")
        False
    """

    layers: Tuple[str, ...] = ()
    split: Optional[str] = None
    features: Tuple[str, ...] = ()
    metric: Optional[str] = None

    @property
    def empty(self) -> bool:
        return not (self.layers or self.split or self.features or self.metric)

    def describe(self) -> str:
        parts = []
        if self.layers:
            parts.append("layer " + "/".join(self.layers))
        if self.split:
            parts.append(f"split {self.split}")
        if self.features:
            shown = list(self.features[:3]) + (["..."] if len(self.features) > 3 else [])
            parts.append("feature " + ",".join(shown))
        if self.metric:
            parts.append(f"metric {self.metric}")
        return "; ".join(parts) or "-"

    def matches(self, subject: Optional[str]) -> Optional[bool]:
        """Whether an alert subject names this location; ``None`` when there is nothing to check."""
        if self.empty:
            return None
        if not subject:
            return False
        s = str(subject)
        if any(s == layer or s.startswith(layer + ".") for layer in self.layers):
            return True
        parts = [p for p in re.split(r"[/.:\[\]\s]+", s) if p]
        if self.split and self.split in parts:
            return True
        if self.metric and (s == self.metric or s.endswith(self.metric)):
            return True
        if self.metric in _TRAINING_LOSS and s in _TRAINING_LOSS:  # the training loss, logged or read by lightwatch
            return True
        names = {f for f in self.features if not f.isdigit()}
        if names & set(parts):
            return True
        pixels = {f for f in self.features if f.isdigit()}
        if pixels and pixels & set(_INT.findall(s)):
            return True
        return False


# -------------------------------------------------------------------------------------------- runs
@dataclass
class FaultRun:
    """One run of the suite, ready to train.

    Attributes:
        fault: the fault's name (``healthy`` for a control).
        seed: the seed (model init, split, data order).
        severity: the severity used.
        base: the base model name.
        recipe: every setting.
        model: the LightningModule (initialised, faults applied).
        datamodule: the data (faults applied; ``planted`` says what was done).
        trainer_kwargs: ``pytorch_lightning.Trainer`` arguments (``callbacks`` holds the fault's own
            callbacks; add yours after them).
        onset: first optimizer step at which the fault is present (0: from the start; for NaN in the data,
            the step whose batch first holds one; ``max_steps`` if it never shows up in the run).
        location: where the fault lives.
    """

    fault: str
    seed: int
    severity: float
    base: str
    recipe: Recipe
    model: DigitsClassifier
    datamodule: DigitsData
    trainer_kwargs: Dict[str, Any]
    onset: int
    location: Location

    @property
    def planted(self) -> Dict[str, Any]:
        return dict(self.datamodule.planted)

    def trainer(self, default_root_dir: str, callbacks: Sequence[pl.Callback] = (), **overrides: Any) -> pl.Trainer:
        """A Trainer for this run: the fault's callbacks first, then ``callbacks``; ``overrides`` win."""
        kwargs = dict(self.trainer_kwargs)
        kwargs["callbacks"] = list(kwargs.get("callbacks", [])) + list(callbacks)
        kwargs.setdefault("default_root_dir", default_root_dir)
        kwargs.update(overrides)
        return pl.Trainer(**kwargs)


# ------------------------------------------------------------------------------------------- fault
Transform = Callable[[Recipe, float], Recipe]


@dataclass(frozen=True)
class Fault:
    """One injectable fault (or the healthy control), as data.

    Args:
        name: identifier (``lr_too_high``).
        kind: ``data`` (in the batches or splits), ``structure`` (model, loss or training code, present
            from the first step), ``dynamic`` (in the optimisation, visible as it runs) or ``none``.
        summary: what is planted, in one line.
        harm: what it does to training, in one line.
        location: where it lives.
        severity: the default severity.
        severity_doc: what the severity knob is.
        transform: ``(healthy recipe, severity) -> faulty recipe``.
        base: the base model it is planted in.
        harm_metric: how the evaluation measures harm: ``test_acc`` (accuracy on the clean test split
            drops), ``val_optimism`` (val accuracy above test accuracy), ``val_drop`` (val accuracy below
            test accuracy), ``loss`` (the training loss curve is broken) or ``spike`` (the loss jumps).
        onset: the first optimizer step with the fault: an int (static faults: 0), or a callable
            ``(severity, datamodule, recipe) -> step`` for faults whose onset depends on the data order.
        diagnoses: lower-case fragments of the alert rules that name this fault's cause (matched against
            ``"<source>:<rule>"``); an alert of another rule detects the fault without diagnosing it.
        worse_when_lower: a lower severity is the worse fault (a scale shrunk towards 0, a share of samples
            kept); dose-response tables read "mildest" the other way round for it.

    Example:
        >>> from bench.faults import get_fault
        >>> run = get_fault("lr_too_high").build(seed=0)
        >>> run.model.lr > 1.0
        True
    """

    name: str
    kind: str
    summary: str
    harm: str
    location: Location
    severity: float
    severity_doc: str
    transform: Transform
    base: str = "mlp"
    harm_metric: str = "test_acc"
    onset: Any = 0
    diagnoses: Tuple[str, ...] = ()
    worse_when_lower: bool = False

    def names_cause(self, source: str, rule: str) -> bool:
        """Whether an alert of ``rule`` (raised by ``source``) names this fault's cause."""
        text = f"{source}:{rule}".lower()
        return any(fragment in text for fragment in self.diagnoses)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Fault {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}.")

    def recipe(self, seed: int, severity: Optional[float] = None) -> Tuple[str, Recipe]:
        """``(base model name, recipe)`` of this fault for ``seed`` (healthy controls pick a base by seed)."""
        severity = self.severity if severity is None else float(severity)
        if self.kind == "none":
            return healthy_base(seed)
        return self.base, self.transform(base_recipe(self.base), severity)

    def build(self, seed: int, severity: Optional[float] = None, max_steps: Optional[int] = None) -> FaultRun:
        """Seed everything, then build the run (model, data and Trainer arguments) for ``seed``.

        Args:
            seed: the seed; the same seed gives the same initial weights, split and data order.
            severity: the severity (``None``: the default).
            max_steps: shorten or lengthen the run (``None``: the recipe's).
        """
        severity = self.severity if severity is None else float(severity)
        base, recipe = self.recipe(seed, severity)
        if max_steps is not None:
            recipe = recipe.replace(max_steps=int(max_steps))
        pl.seed_everything(seed, workers=True, verbose=False)
        model = recipe.build_model()
        datamodule = DigitsData(recipe.data, seed)
        trainer_kwargs: Dict[str, Any] = dict(
            max_steps=recipe.max_steps,
            log_every_n_steps=recipe.log_every_n_steps,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=recipe.callbacks(),
        )
        onset = self.onset(severity, datamodule, recipe) if callable(self.onset) else self.onset
        return FaultRun(self.name, int(seed), severity, base, recipe, model, datamodule, trainer_kwargs,
                        int(recipe.max_steps if onset is None else onset), self.location)


# ------------------------------------------------------------------------------------------- suite
def _lr_spike(r: Recipe, s: float) -> Recipe:
    return r.replace(lr_spike=(100, s, 2))


def _explode(r: Recipe, s: float) -> Recipe:
    # PyTorch's default Linear init has std 1/sqrt(3 fan_in); He's is sqrt(2/fan_in): sqrt(6) times more
    gain = s * math.sqrt(6.0)
    layers = tuple((f"net.fc{i}", gain) for i in range(1, 11)) + (("net.out", gain),)
    return r.replace(model="deep", activation="relu", norm=False, depth=10, width=64, layer_scale=layers)


def _freeze(r: Recipe, s: float) -> Recipe:
    linears = [f"net.fc{i}" for i in range(1, len(r.hidden) + 1)]
    return r.replace(frozen=tuple(linears[: max(1, min(int(s), len(linears)))]))


HEALTHY = Fault(
    "healthy", "none", "no fault: one of five base models (MLP, tanh MLP, CNN, GRU, deep LayerNorm MLP) by seed, "
    "batch 32 or 64", "none", Location(), 0.0, "none", lambda r, s: r, base="mlp",
)

# Rule-name fragments that count as the right diagnosis of each fault (the evaluation's "diagnosed" column).
_DIAGNOSES: Dict[str, Tuple[str, ...]] = {
    "lr_too_high": ("lr_", "learning_rate", "update_ratio", "diverg"),
    "lr_too_low": ("lr_", "learning_rate", "update_ratio", "not_learning", "stall"),
    "zero_init": ("init", "symmetr", "zero_grad_frac", "dead"),
    "huge_init": ("init",),
    "vanishing_gradients": ("vanish",),
    "exploding_gradients": ("explod", "grad_norm", "grad_nonfinite"),
    "dead_relu": ("dead",),
    "saturated_activations": ("saturat",),
    "wrong_loss": ("negative", "loss_sign", "loss_range", "wrong_loss", "loss_below", "nll_on_logits"),
    "softmax_before_loss": ("softmax", "prob", "logit"),
    "shuffled_labels": ("label", "not_learning", "chance", "stall"),
    "label_noise": ("label", "noise", "not_learning", "stall"),
    "unnormalised_inputs": ("normali", "input_scale", "input_range", "out_of_range", "data_scale"),
    "nan_in_data": ("data_nonfinite", "input_nonfinite", "nan_in"),
    "frozen_parameters": ("frozen", "requires_grad", "grad_none", "no_grad", "unused"),
    "forgotten_zero_grad": ("zero_grad", "stale", "accumul"),
    "train_val_leakage": ("leak",),
    "duplicated_samples": ("duplicate",),
    "class_imbalance": ("imbalance",),
    "covariate_shift": ("drift", "shift", "out_of_range"),
    "loss_spike": ("spike", "loss_shift"),
}

FAULTS: Dict[str, Fault] = {f.name: dataclasses.replace(f, diagnoses=_DIAGNOSES[f.name]) for f in [
    Fault("lr_too_high", "dynamic", "SGD learning rate multiplied by the severity (0.05 -> 5)",
          "the loss diverges or sticks far above the healthy loss; accuracy near chance",
          Location(), 100.0, "learning-rate multiplier",
          lambda r, s: r.replace(lr=r.lr * s)),
    Fault("lr_too_low", "dynamic", "SGD learning rate divided by the severity (0.05 -> 5e-5)",
          "the loss barely moves from ln(10); accuracy far below healthy after the budget",
          Location(), 1000.0, "learning-rate divisor",
          lambda r, s: r.replace(lr=r.lr / s)),
    Fault("zero_init", "structure", "every parameter multiplied by the severity after init (0: all zeros)",
          "hidden units stay identical/zero; only the output bias learns: chance accuracy",
          Location(), 0.0, "scale of the initial parameters",
          lambda r, s: r.replace(init_scale=s), worse_when_lower=True),
    Fault("huge_init", "structure", "every parameter multiplied by the severity after init",
          "initial loss far above ln(10), huge gradients; training unstable or diverges",
          Location(), 30.0, "scale of the initial parameters",
          lambda r, s: r.replace(init_scale=s)),
    Fault("vanishing_gradients", "structure", "a deep sigmoid MLP without normalisation; severity = depth",
          "the first layers get gradients orders of magnitude below the last; the loss stays near ln(10)",
          Location(layers=("net.fc1", "net.act1")), 10.0, "number of sigmoid layers",
          lambda r, s: r.replace(model="deep", activation="sigmoid", norm=False, depth=int(s), width=32),
          base="mlp"),
    Fault("exploding_gradients", "structure", "a 10-layer ReLU MLP without normalisation, weights at the "
          "severity times He initialisation",
          "activations and gradients grow layer by layer; the loss is huge and goes non-finite within steps",
          Location(), 1.5, "per-layer gain over He initialisation", _explode),
    Fault("dead_relu", "structure", "a fraction (severity) of fc2's units get zero weights and bias -10: "
          "their ReLU (act2) never fires",
          "capacity lost for good: lower accuracy (all units dead: chance)",
          Location(layers=("net.fc2", "net.act2")), 0.9, "fraction of units killed",
          lambda r, s: r.replace(kill_units=("net.fc2", s, -10.0))),
    Fault("saturated_activations", "structure", "tanh MLP with fc1's weights multiplied by the severity: "
          "act1 sits at +-1",
          "the first layer stops learning (tanh' ~ 0); slower, worse training",
          Location(layers=("net.fc1", "net.act1")), 30.0, "weight multiplier of fc1",
          lambda r, s: r.replace(layer_scale=(("net.fc1", s),)), base="mlp_tanh"),
    Fault("wrong_loss", "structure", "F.nll_loss on raw logits instead of cross-entropy (severity = share "
          "of the wrong loss)",
          "the loss is -logit[y]: negative and unbounded below; logits grow without limit",
          Location(layers=("net.out",), metric="train/loss"), 1.0, "weight of the wrong loss",
          lambda r, s: r.replace(loss="nll_raw", loss_weight=s), harm_metric="loss"),
    Fault("softmax_before_loss", "structure", "a softmax as the last layer in front of cross-entropy "
          "(severity = blend weight of the softmax)",
          "the loss cannot go below ~1.46 and its gradients are squashed: slow learning",
          Location(layers=("net.softmax",), metric="train/loss"), 1.0, "blend weight of the softmax",
          lambda r, s: r.replace(softmax_weight=s), harm_metric="loss"),
    Fault("shuffled_labels", "data", "a fraction (severity) of the train labels permuted",
          "nothing learnable: val/test accuracy at chance",
          Location(split="train", features=("y",)), 1.0, "fraction of train labels permuted",
          lambda r, s: r.replace_data(label_shuffle=s)),
    Fault("label_noise", "data", "a fraction (severity) of the train labels replaced by random classes",
          "the training loss stays high; test accuracy lower",
          Location(split="train", features=("y",)), 0.7, "fraction of train labels randomised",
          lambda r, s: r.replace_data(label_noise=s)),
    Fault("unnormalised_inputs", "data", "raw 0..16 pixels (no standardisation) times the severity",
          "large pre-activations and gradients; unstable, worse training",
          Location(split="train", features=("x",)), 1.0, "multiplier on the raw pixels",
          lambda r, s: r.replace_data(standardize=False, input_scale=s)),
    Fault("nan_in_data", "data", "pixel 36 set to NaN in a fraction (severity) of the train rows",
          "the first batch holding one makes the loss, gradients and then every weight NaN",
          Location(split="train", features=("x", "36")), 0.01, "fraction of train rows with a NaN",
          lambda r, s: r.replace_data(nan_fraction=s), harm_metric="loss",
          onset=lambda s, dm, r: dm.first_nonfinite_step(r.max_steps)),
    Fault("frozen_parameters", "structure", "requires_grad=False on the first severity Linear layers",
          "only the head learns, on random features: lower accuracy",
          Location(layers=("net.fc1", "net.fc2")), 2.0, "number of Linear layers frozen from the input",
          _freeze),
    Fault("forgotten_zero_grad", "structure", "optimizer.zero_grad() called only every severity steps",
          "gradients accumulate across steps: the effective learning rate grows until training diverges",
          Location(), 1000.0, "steps between zero_grad calls",
          lambda r, s: r.replace(zero_grad_every=int(s))),
    Fault("train_val_leakage", "data", "a fraction (severity) of the val rows are exact copies of train rows",
          "val accuracy overstates generalisation (val above the clean test accuracy)",
          Location(split="val"), 0.5, "fraction of val rows copied from train",
          lambda r, s: r.replace_data(leak_fraction=s), harm_metric="val_optimism"),
    Fault("duplicated_samples", "data", "a fraction (severity) of the train rows replaced by copies of others",
          "fewer distinct samples: lower test accuracy, faster overfitting",
          Location(split="train"), 0.9, "fraction of train rows that are duplicates",
          lambda r, s: r.replace_data(duplicate_fraction=s)),
    Fault("class_imbalance", "data", "classes 5-9 keep only a fraction (severity) of their train samples",
          "rare classes are rarely predicted: lower test accuracy on a balanced test split",
          Location(split="train", features=("y",)), 0.05, "share of minority-class samples kept",
          lambda r, s: r.replace_data(minority_keep=s), worse_when_lower=True),
    Fault("covariate_shift", "data", "the 16 centre pixels of the val split shifted by severity standard "
          "deviations", "val accuracy drops below the clean test accuracy: val no longer measures the model",
          Location(split="val", features=tuple(str(i) for i in CENTRE_FEATURES)), 2.0,
          "shift in train standard deviations",
          lambda r, s: r.replace_data(shift=s), harm_metric="val_drop"),
    Fault("loss_spike", "dynamic", "learning rate multiplied by the severity for 2 steps at step 100",
          "the loss jumps for a few steps, then recovers (partly)",
          Location(metric="train/loss"), 30.0, "learning-rate multiplier during the spike",
          _lr_spike, harm_metric="spike", onset=100),
]}


def get_fault(name: str) -> Fault:
    """The fault (or ``healthy``) called ``name``; an unknown name lists the known ones."""
    if name == HEALTHY.name:
        return HEALTHY
    if name not in FAULTS:
        raise KeyError(f"unknown fault {name!r}; known: healthy, {', '.join(FAULTS)}.")
    return FAULTS[name]
