"""Faults planted in three model families of the calibration corpus, each one a piece of data.

A :class:`Case` is one run ready to fit: the family's healthy :class:`bench.calibration.families.Built`
(model, loaders, Trainer arguments, validation metric) with one fault applied to it, and what the
evaluation needs to score it: the onset step, the location, the rule-name fragments that count as naming
the cause, and ``evaluate_clean`` (the family's validation metric measured the way the model will be used:
for the missing causal mask, with the mask put back).

Families (all run in the main ``.venv``: no torchvision, no timm):

- ``gpt2_hf``: the calibration corpus' HF GPT-2 (2 layers, d 64, vocab 200) on padded Markov sequences,
  AdamW + warmup/decay, 150 steps; metric ``val_loss`` (nats per token, lower is better);
- ``cnn_bn``: a small conv net with BatchNorm2d defined here (conv 16-32-32, BN after each conv, global
  average pooling, linear head) on digits upsampled to 16x16x1, SGD 0.05 momentum 0.9, 150 steps;
  metric ``val_acc``;
- ``rnn_clip``: the corpus' LSTM (even seeds) / GRU (odd seeds) reading digits row by row, Adam 3e-3,
  ``gradient_clip_val=1.0``, 200 steps; metric ``val_acc``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.calibration.families import (
    FAMILIES as CALIBRATION_FAMILIES,
    Built,
    _accuracy,
    _base_trainer,
    _Classifier,
    _gen,
    _loader,
    digits_images,
    pad_collate,
)
from bench.faults.suite import Location

__all__ = ["FAMILIES", "FAULTS", "HARM_RULE", "Case", "FamilyFault", "FamilySpec", "build_case", "fault_names",
           "faults_for"]

HARM_RULE = ("harmful = the validation metric worse than the healthy run of the same seed by at least 3 points "
             "of accuracy (val_acc) or by at least 5% of the loss (val_loss), or not finite")


# ------------------------------------------------------------------------------------------ cnn_bn
class BNConvNet(nn.Module):
    """conv1-bn1-relu, conv2-bn2-relu, maxpool, conv3-bn3-relu, global average pool, head (16x16x1 in)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("bn1", nn.BatchNorm2d(16)), ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("bn2", nn.BatchNorm2d(32)), ("relu2", nn.ReLU()),
            ("pool", nn.MaxPool2d(2)),
            ("conv3", nn.Conv2d(32, 32, 3, padding=1)), ("bn3", nn.BatchNorm2d(32)), ("relu3", nn.ReLU()),
            ("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()),
        ]))
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_cnn_bn(seed: int, max_steps: int) -> Built:
    xt, yt, xv, yv = digits_images(seed, 16, channels=1)
    net = BNConvNet()

    def opt(m: _Classifier) -> Any:
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    model = _Classifier(net, opt)
    train = _loader(TensorDataset(xt, yt), 32, True, seed, drop_last=True)
    val = _loader(TensorDataset(xv, yv), 128, False, seed)
    return Built(model, train, val, _base_trainer(max_steps), "val_acc", True, lambda m: _accuracy(m, val),
                 notes="BN conv net on digits 16x16x1")


# --------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class FamilySpec:
    name: str
    build: Callable[[int, int], Built]
    steps: int
    kind: str                     # "lm" (dict batches of token ids) or "classifier" ((x, y) float batches)
    first_layer: Tuple[str, ...]  # module names of "the first layer" (frozen / zero-init faults)
    description: str


FAMILIES: Dict[str, FamilySpec] = {
    "gpt2_hf": FamilySpec("gpt2_hf", CALIBRATION_FAMILIES["gpt2_hf"].build, 150, "lm",
                          ("model.transformer.h.0",),
                          "transformer LM: HF GPT2LMHeadModel (2 layers, d 64, 2 heads, vocab 200), dynamic padding, "
                          "labels -100 at padding, AdamW 1e-3 + warmup 20/linear decay, batch 16"),
    "cnn_bn": FamilySpec("cnn_bn", build_cnn_bn, 150, "classifier", ("net.features.conv1",),
                         "CNN with BatchNorm: conv 16-32-32 each + BatchNorm2d + ReLU, GAP, linear head; digits "
                         "16x16x1; SGD 0.05 momentum 0.9 wd 5e-4, batch 32"),
    "rnn_clip": FamilySpec("rnn_clip", CALIBRATION_FAMILIES["rnn_clip"].build, 200, "classifier", ("net.rnn",),
                           "recurrent: LSTM (even seeds) / GRU (odd seeds) of 64 units on digit rows, Adam 3e-3, "
                           "gradient_clip_val 1.0, batch 32"),
}


# ------------------------------------------------------------------------------------------- case
@dataclass
class Case:
    """One run: the family's healthy ``built`` with the fault planted."""

    family: str
    fault: str
    seed: int
    built: Built
    onset: Optional[int]                 # None: read from the probe (first batch that holds a NaN)
    location: Location
    diagnoses: Tuple[str, ...]
    kind: str
    planted: List[str] = field(default_factory=list)
    evaluate_clean: Optional[Callable[[pl.LightningModule], float]] = None
    checks: Dict[str, Any] = field(default_factory=dict)  # what the planting check reads (tests)

    def names_cause(self, source: str, rule: str) -> bool:
        text = f"{source}:{rule}".lower()
        return any(fragment in text for fragment in self.diagnoses)

    def evaluate(self) -> float:
        return float((self.evaluate_clean or self.built.evaluate)(self.built.model))


@dataclass(frozen=True)
class FamilyFault:
    name: str
    kind: str                                        # data | structure | dynamic | none
    summary: str
    families: Tuple[str, ...]
    diagnoses: Tuple[str, ...]
    apply: Callable[[Case], None]
    location: Callable[[str], Location] = lambda family: Location()


# ------------------------------------------------------------------------------------------ helpers
def _subclass(model: nn.Module, name: str, **methods: Any) -> None:
    """Give ``model`` a one-off subclass overriding ``methods`` (keeps its state, hooks and names)."""
    model.__class__ = type(f"{type(model).__name__}_{name}", (type(model),), methods)


def _scale_lr(result: Any, factor: float) -> Any:
    """Multiply every learning rate of a ``configure_optimizers`` result (schedulers' base_lrs too)."""
    opts, scheds = [], []

    def walk(x: Any) -> None:
        if isinstance(x, torch.optim.Optimizer):
            opts.append(x)
        elif isinstance(x, dict):
            for k in ("optimizer", "lr_scheduler", "scheduler"):
                if k in x:
                    walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif hasattr(x, "base_lrs"):
            scheds.append(x)

    walk(result)
    for o in opts:
        for g in o.param_groups:
            g["lr"] *= factor
            if "initial_lr" in g:
                g["initial_lr"] *= factor
    for s in scheds:
        s.base_lrs = [b * factor for b in s.base_lrs]
    return result


def _modules(case: Case) -> Dict[str, nn.Module]:
    return dict(case.built.model.named_modules())


def _reloader(loader: DataLoader, seed: int, dataset: Any = None, collate_fn: Any = None) -> DataLoader:
    """The same train loader (batch size, shuffling generator seed, drop_last), with another dataset/collate:
    the same batches in the same order as the healthy run, up to the fault."""
    return DataLoader(dataset if dataset is not None else loader.dataset, batch_size=loader.batch_size,
                      shuffle=True, generator=_gen(seed), num_workers=0, drop_last=loader.drop_last,
                      collate_fn=collate_fn if collate_fn is not None else loader.collate_fn)


def _train_tensors(case: Case) -> Tuple[torch.Tensor, torch.Tensor]:
    ds = case.built.train.dataset
    assert isinstance(ds, TensorDataset), type(ds)
    return ds.tensors[0], ds.tensors[1]


# ------------------------------------------------------------------------------------------ generic
def _lr(factor: float) -> Callable[[Case], None]:
    def apply(case: Case) -> None:
        model = case.built.model
        original = type(model).configure_optimizers
        if hasattr(model, "lr") and isinstance(model.lr, float):   # gpt2_hf: the HF module keeps its lr
            model.lr = model.lr * factor
        else:
            _subclass(model, "lr", configure_optimizers=lambda self: _scale_lr(original(self), factor))
        case.planted.append(f"learning rate x{factor:g}")
        case.checks["lr_factor"] = factor
    return apply


def _shuffled_labels(case: Case) -> None:
    if FAMILIES[case.family].kind == "lm":
        # labels permuted within each sequence (over its real tokens): the next-token relation is gone, the
        # unigram distribution is kept
        base = case.built.train.collate_fn
        g = torch.Generator().manual_seed(10_000 + case.seed)

        def collate(items: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
            out = base(items)
            labels = out["labels"].clone()
            for i in range(len(labels)):
                n = int(out["attention_mask"][i].sum())
                labels[i, :n] = labels[i, :n][torch.randperm(n, generator=g)]
            out["labels"] = labels
            return out

        case.built.train = _reloader(case.built.train, case.seed, collate_fn=collate)
        case.planted.append("train labels permuted within each sequence")
    else:
        x, y = _train_tensors(case)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(10_000 + case.seed))
        case.built.train = _reloader(case.built.train, case.seed, dataset=TensorDataset(x, y[perm]))
        case.planted.append("train labels permuted across the split")
        case.checks["labels_changed"] = float((y[perm] != y).float().mean())


NAN_FRACTION = 0.01


def _nan_inputs(case: Case) -> None:
    x, y = _train_tensors(case)
    x = x.clone()
    g = torch.Generator().manual_seed(20_000 + case.seed)
    rows = torch.randperm(len(x), generator=g)[: max(1, int(round(NAN_FRACTION * len(x))))]
    flat = x.view(len(x), -1)
    feature = flat.shape[1] // 2 + 4  # a central pixel
    flat[rows, feature] = float("nan")
    case.built.train = _reloader(case.built.train, case.seed, dataset=TensorDataset(x, y))
    case.planted.append(f"{len(rows)} train rows ({NAN_FRACTION:.0%}) with NaN at input feature {feature}")
    case.checks["nan_rows"] = len(rows)
    case.onset = None  # the first batch holding one: read from the probe


def _frozen_first(case: Case) -> None:
    mods = _modules(case)
    names = []
    for layer in FAMILIES[case.family].first_layer:
        for n, p in mods[layer].named_parameters():
            p.requires_grad_(False)
            names.append(f"{layer}.{n}")
    case.planted.append(f"requires_grad=False on {', '.join(FAMILIES[case.family].first_layer)} at its random init")
    case.checks["frozen"] = names


def _zero_grad_forgotten(case: Case) -> None:
    def optimizer_zero_grad(self: Any, epoch: int, batch_idx: int, optimizer: Any) -> None:
        pass

    _subclass(case.built.model, "nozerograd", optimizer_zero_grad=optimizer_zero_grad)
    case.planted.append("optimizer_zero_grad overridden to do nothing")


ZERO_INIT_LAYER = {"gpt2_hf": "model.transformer.wte", "cnn_bn": "net.features.conv1", "rnn_clip": "net.rnn"}


def _zero_init(case: Case) -> None:
    layer = ZERO_INIT_LAYER[case.family]
    with torch.no_grad():
        for p in _modules(case)[layer].parameters():
            p.zero_()
    case.planted.append(f"every parameter of {layer} set to 0")
    case.checks["zero_layer"] = layer


# ---------------------------------------------------------------------------------- transformer
def _no_causal_mask(case: Case) -> None:
    """The model's forward passes a 4D padding-only attention mask: every token attends to every real token,
    the future included (a bidirectional mask built from the padding mask, as a hand-made 4D mask would be)."""
    model = case.built.model
    original = type(model).forward

    def forward(self: Any, batch: Dict[str, torch.Tensor]) -> Any:
        if getattr(self, "_causal_restored", False):
            return original(self, batch)
        am = batch["attention_mask"]
        length = am.shape[1]
        mask4 = am.bool()[:, None, None, :].expand(-1, 1, length, -1)
        return self.model(**{**batch, "attention_mask": mask4})

    _subclass(model, "nocausal", forward=forward)
    evaluate = case.built.evaluate

    def evaluate_clean(m: Any) -> float:
        m._causal_restored = True
        try:
            return float(evaluate(m))
        finally:
            m._causal_restored = False

    case.evaluate_clean = evaluate_clean
    case.planted.append("attention mask = padding mask only (4D, bidirectional): no causal mask")


def _padding_not_ignored(case: Case) -> None:
    """Labels at padded positions are the pad id (0), not -100: the loss trains on padding."""
    base = pad_collate(0, True)

    def collate(items: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        out = base(items)
        out["labels"] = out["input_ids"].clone()
        return out

    case.built.train = _reloader(case.built.train, case.seed, collate_fn=collate)
    case.planted.append("labels = input_ids at padded positions (pad id 0), not -100")


ATTN_Q_SCALE = 30.0


def _attn_logits_large(case: Case) -> None:
    d = case.built.model.model.config.n_embd
    with torch.no_grad():
        for block in case.built.model.model.transformer.h:
            block.attn.c_attn.weight[:, :d].mul_(ATTN_Q_SCALE)   # Conv1D: (in, 3*d), query first
            block.attn.c_attn.bias[:d].mul_(ATTN_Q_SCALE)
    case.planted.append(f"query weights of every attention layer x{ATTN_Q_SCALE:g}")


# ----------------------------------------------------------------------------------------------- cnn
def _bn_eval(case: Case) -> None:
    original = _Classifier.training_step

    def training_step(self: Any, batch: Any, batch_idx: int) -> Any:
        self.net.eval()  # the stray call: BatchNorm layers now use running statistics that are never collected
        return original(self, batch, batch_idx)

    _subclass(case.built.model, "bneval", training_step=training_step)
    case.planted.append("self.net.eval() at the start of training_step: BatchNorm in eval mode on fresh stats")


def _not_in_optimizer(case: Case) -> None:
    def configure_optimizers(self: Any) -> Any:
        return torch.optim.SGD(self.net.features.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    _subclass(case.built.model, "subopt", configure_optimizers=configure_optimizers)
    case.planted.append("optimizer built from net.features.parameters(): net.head never updated")


# ----------------------------------------------------------------------------------------------- rnn
NO_CLIP_LR = 30.0


def _no_clip_high_lr(case: Case) -> None:
    case.built.trainer_kwargs = {k: v for k, v in case.built.trainer_kwargs.items() if k != "gradient_clip_val"}
    _lr(NO_CLIP_LR)(case)
    case.planted.insert(0, "gradient_clip_val removed")


# ------------------------------------------------------------------------------------------ registry
def _first_layer(family: str) -> Location:
    return Location(layers=FAMILIES[family].first_layer)


def _train_x(family: str) -> Location:
    return Location(split="train", features=("x",))


def _train_y(family: str) -> Location:
    return Location(split="train", features=("y", "labels"))


_ALL = ("gpt2_hf", "cnn_bn", "rnn_clip")
_FLOAT = ("cnn_bn", "rnn_clip")

FAULTS: Dict[str, FamilyFault] = {f.name: f for f in [
    FamilyFault("healthy", "none", "no fault", _ALL, (), lambda case: None),
    FamilyFault("lr_x100", "dynamic", "learning rate x100", _ALL,
                ("lr_", "learning_rate", "update_ratio", "diverg"), _lr(100.0)),
    FamilyFault("lr_div1000", "dynamic", "learning rate /1000", _ALL,
                ("lr_", "learning_rate", "update_ratio", "not_learning", "stall"), _lr(1e-3)),
    FamilyFault("shuffled_labels", "data", "train labels permuted (LM: within each sequence)", _ALL,
                ("label", "not_learning", "chance", "stall"), _shuffled_labels, _train_y),
    FamilyFault("nan_inputs", "data", f"NaN in one input feature of {NAN_FRACTION:.0%} of the train rows", _FLOAT,
                ("data_nonfinite", "input_nonfinite", "nan_in"), _nan_inputs, _train_x),
    FamilyFault("frozen_first_layer", "structure", "the first layer frozen at its random init", _ALL,
                ("frozen", "requires_grad", "grad_none", "no_grad", "unused"), _frozen_first, _first_layer),
    FamilyFault("forgotten_zero_grad", "structure", "optimizer.zero_grad never called", _ALL,
                ("zero_grad", "stale", "accumul"), _zero_grad_forgotten),
    FamilyFault("zero_init", "structure", "one layer initialised to zero (" + ", ".join(
                f"{k}: {v}" for k, v in ZERO_INIT_LAYER.items()) + ")", _ALL,
                ("init", "symmetr", "zero_grad_frac", "dead"), _zero_init,
                lambda family: Location(layers=(ZERO_INIT_LAYER[family],))),
    FamilyFault("no_causal_mask", "structure", "no causal mask: every position attends to future tokens",
                ("gpt2_hf",), ("causal", "mask", "future", "leak", "lookahead"), _no_causal_mask,
                lambda family: Location(layers=("model.transformer.h",))),
    FamilyFault("padding_not_ignored", "data", "labels at padded positions = pad id, not -100", ("gpt2_hf",),
                ("pad", "ignore_index", "-100"), _padding_not_ignored,
                lambda family: Location(split="train", features=("labels",))),
    FamilyFault("attn_logits_large", "structure", f"query weights x{ATTN_Q_SCALE:g}: attention logits too large",
                ("gpt2_hf",), ("attn", "attention", "logit", "saturat", "init_large", "entropy"), _attn_logits_large,
                lambda family: Location(layers=tuple(f"model.transformer.h.{i}.attn" for i in range(2)))),
    FamilyFault("bn_eval_mode", "structure", "a stray .eval() in training_step: BatchNorm in eval mode on "
                "fresh statistics", ("cnn_bn",), ("batchnorm", "bn_eval", "eval_mode"), _bn_eval,
                lambda family: Location(layers=("net.features.bn1", "net.features.bn2", "net.features.bn3"))),
    FamilyFault("layer_not_in_optimizer", "structure", "optimizer built from net.features only: the head is "
                "never updated", ("cnn_bn",), ("not_in_optimizer", "optimizer", "orphan", "frozen"),
                _not_in_optimizer, lambda family: Location(layers=("net.head",))),
    FamilyFault("no_clip_high_lr", "dynamic", f"gradient clipping removed and learning rate x{NO_CLIP_LR:g}",
                ("rnn_clip",), ("clip", "explod", "grad_norm", "lr_", "update_ratio", "diverg", "grad_nonfinite"),
                _no_clip_high_lr),
]}


def faults_for(family: str) -> List[str]:
    return [n for n, f in FAULTS.items() if family in f.families]


def fault_names() -> List[str]:
    return list(FAULTS)


def build_case(family: str, fault: str, seed: int, max_steps: Optional[int] = None) -> Case:
    """Seed everything, build the family's healthy run, plant ``fault``."""
    spec = FAMILIES[family]
    f = FAULTS[fault]
    if family not in f.families:
        raise ValueError(f"fault {fault!r} does not apply to family {family!r} (it applies to {f.families})")
    pl.seed_everything(seed, workers=True, verbose=False)
    built = spec.build(seed, int(max_steps or spec.steps))
    case = Case(family, fault, seed, built, 0, f.location(family), f.diagnoses, f.kind)
    f.apply(case)
    return case
