"""Candidate detection signals of one run, from lightwatch's TensorBoard output and a measuring observer.

Two sources, kept apart on purpose:

- **TensorBoard** (:func:`read_scalars`): what lightwatch's monitors logged (gradient norms, update ratios,
  activation statistics, data statistics), read back with ``EventAccumulator(size_guidance=0)``. Signals
  computed from these are what a rule over lightwatch's own values would see.
- **SignalObserver** (:class:`SignalObserver`): **measurement only**. It computes, straight from the model
  and the Trainer, the signals the monitors do not log yet (per-step loss and its spike score, stale
  gradients before backward, parameters whose gradient is always ``None``, windowed zero-gradient and
  dead-unit fractions, pre-activation saturation, input scale, NaN counts, initial loss against ln(C),
  probability-like outputs, and data scans of the splits at fit start). It never raises an alert, never
  changes training and is not part of lightwatch; it exists so that thresholds can be set from data
  before the rules that will use these signals are written.

:func:`run_signals` turns both into one flat ``{"signal.aggregate": value}`` dict per run, the unit the
evaluation compares between healthy and faulty runs (:data:`SIGNALS` lists and documents each signal).
"""
from __future__ import annotations

import collections
import glob
import json
import math
import os
import statistics
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

from .injections import optimizer_step_index

__all__ = [
    "AGGREGATES",
    "model_info",
    "signal_locations",
    "scan_splits",
    "SIGNALS",
    "SignalObserver",
    "SignalSpec",
    "aggregate",
    "read_alerts",
    "read_scalars",
    "run_signals",
]

Series = List[Tuple[int, float]]


# ------------------------------------------------------------------------------------- aggregates
def _finite(values: Iterable[float]) -> List[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _window_extreme(values: List[float], k: int, inner: Any, outer: Any) -> float:
    if len(values) < k:
        return float("nan")
    return outer(inner(values[i:i + k]) for i in range(len(values) - k + 1))


def _first(v: List[float]) -> float:
    return v[0] if v else float("nan")


def _last(v: List[float]) -> float:
    return v[-1] if v else float("nan")


def _min(v: List[float]) -> float:
    f = [x for x in v if not math.isnan(x)]
    return min(f) if f else float("nan")


def _max(v: List[float]) -> float:
    f = [x for x in v if not math.isnan(x)]
    return max(f) if f else float("nan")


def _median(v: List[float]) -> float:
    f = _finite(v)
    return statistics.median(f) if f else float("nan")


AGGREGATES = {
    "first": _first,    # the first check: what a static check at fit start / the first step sees
    "last": _last,      # the last check
    "min": _min,        # the smallest reading: what a "below T at any check" rule sees
    "max": _max,        # the largest reading: what an "above T at any check" rule sees
    "median": _median,  # the typical reading
    # persistence: the rule fires when 3 consecutive checks are all above (p3max) or all below (p3min) T
    "p3max": lambda v: _window_extreme(v, 3, min, max),
    "p3min": lambda v: _window_extreme(v, 3, max, min),
}


def aggregate(series: Series, how: str) -> float:
    """One number for a series of ``(step, value)`` checks (NaN when there is no reading)."""
    values = [float(v) for _, v in sorted(series)]
    return float(AGGREGATES[how](values))


# ---------------------------------------------------------------------------------------- catalogue
@dataclass(frozen=True)
class SignalSpec:
    """One candidate signal: where it comes from, how to read it, and what the literature uses.

    Args:
        name: identifier (``grad_ratio_first_last``).
        source: ``tensorboard`` (lightwatch's logged values), ``observer`` (measured per step or check)
            or ``scan`` (the data splits, once at fit start).
        aggregates: the run-level numbers reported (keys of :data:`AGGREGATES`; scans have ``value``).
        scale: ``log`` (compare as ratios) or ``linear`` (compare as differences).
        description: what it is.
        literature: the published rule and threshold it corresponds to, if any.
        timing: ``early`` (known before or at the first optimizer step), ``online`` (a rule can fire on
            it at any check) or ``outcome`` (only known once the run is over: a gate, not a detector).
        reading: for a ``value`` aggregate, ``point`` (one reading) or ``max`` (the run's largest).
    """

    name: str
    source: str
    aggregates: Tuple[str, ...]
    scale: str
    description: str
    literature: str = ""
    timing: str = "online"
    reading: str = "point"

    def timing_of(self, aggregate_name: str) -> str:
        """``early`` (known at fit start or the first check), ``online`` or ``outcome`` (needs the run)."""
        if self.timing == "outcome":
            return "outcome"
        return "early" if aggregate_name == "first" or self.timing == "early" else "online"

    def rule_directions(self, aggregate_name: str) -> Tuple[str, ...]:
        """Directions in which a rule checking this signal as it comes in would fire on this aggregate.

        A run maximum (``max``, ``p3max``, a ``reading="max"`` value) only says "above T at some check"; a
        run minimum only "below T at some check"; a point reading (``first``, a scan) says both. Medians
        and last values need the whole run: they are gates, not detectors (an empty tuple).
        """
        if self.timing == "outcome":
            return ()
        if aggregate_name in ("first",) or (aggregate_name == "value" and self.reading == "point"):
            return ("above", "below")
        if aggregate_name in ("max", "p3max") or (aggregate_name == "value" and self.reading == "max"):
            return ("above",)
        if aggregate_name in ("min", "p3min"):
            return ("below",)
        return ()


SIGNALS: Tuple[SignalSpec, ...] = (
    # ---- losses (observer, every step)
    SignalSpec("loss_init_over_lnC", "observer", ("value",), "log",
               "loss of the first batch / ln(C)", "TheDeepChecker: initial loss vs its expected value", timing="early"),
    SignalSpec("loss_min", "observer", ("value",), "linear", "smallest training loss of the run",
               "AUTOTRAINER: loss < 0 is an abnormal loss", timing="outcome"),
    SignalSpec("loss_negative_frac", "observer", ("value",), "linear", "share of steps with a negative loss", reading="max"),
    SignalSpec("loss_nonfinite_steps", "observer", ("value",), "linear", "steps with a NaN/Inf loss",
               "Lightning EarlyStopping(check_finite); SMD ExplodingTensor", reading="max"),
    SignalSpec("loss_final_over_lnC", "observer", ("value",), "log",
               "mean loss of the last 20 steps / ln(C) (outcome gate: not learning)",
               "AUTOTRAINER: gate gradient symptoms on bad accuracy", timing="outcome"),
    SignalSpec("loss_at50_over_lnC", "observer", ("value",), "log",
               "mean loss of steps 40-59 / ln(C): still at chance level after 50 steps (a not-learning gate)",
               "AUTOTRAINER: max acc <= 0.7 gate"),
    SignalSpec("loss_at100_over_lnC", "observer", ("value",), "log",
               "mean loss of steps 90-109 / ln(C)"),
    SignalSpec("loss_drop", "observer", ("value",), "linear",
               "1 - mean(last 20 losses) / mean(first 20): how much the loss fell",
               "TheDeepChecker: relative decrease < 5% per period", timing="outcome"),
    SignalSpec("loss_spike_z", "observer", ("value",), "log",
               "max robust z of a loss against the median/MAD of the 50 steps before it (from step 20)",
               "pilot: healthy <= 5.8, faults >= 8; OLMo-core mean + 6 std over 128", reading="max"),
    SignalSpec("loss_spike_ratio", "observer", ("value",), "log",
               "max loss / mean of the 10 losses before it (from step 20)",
               "Lightning SpikeDetection: rtol 2 over a window of 10", reading="max"),
    # ---- gradients and updates (TensorBoard: GradientStatsMonitor)
    SignalSpec("grad_ratio_first_last", "tensorboard", ("first", "min", "max", "median"), "log",
               "||grad first weight|| / ||grad last weight||",
               "AUTOTRAINER: > 70 exploding; < 1e-3 (and first < 1e-4) vanishing"),
    SignalSpec("grad_rms_first", "tensorboard", ("first", "min", "median"), "log",
               "RMS gradient of the first weight (norm / sqrt(numel))", "SMD/DeepDiagnosis: mean|g| < 1e-7"),
    SignalSpec("grad_norm_max", "tensorboard", ("first", "max", "median"), "log",
               "largest global gradient norm in each interval (monitor.grad/_total/norm_max)"),
    SignalSpec("grad_nonfinite", "tensorboard", ("max",), "linear",
               "NaN/Inf gradient values over all parameters at a check"),
    SignalSpec("update_ratio_max", "tensorboard", ("first", "min", "max", "median", "p3min", "p3max"), "log",
               "largest ||dw||/||w|| over weight tensors at a check",
               "TheDeepChecker: log10 ratio > -1 too fast, < -4 too slow; SMD 10 / 1e-8"),
    SignalSpec("update_ratio_median", "tensorboard", ("first", "min", "max", "median"), "log",
               "median ||dw||/||w|| over weight tensors at a check"),
    # ---- gradients (observer)
    SignalSpec("zero_grad_frac", "observer", ("first", "max", "median"), "linear",
               "share of gradient entries exactly 0 over all trainable parameters",
               "AUTOTRAINER dying ReLU: >= 0.7"),
    SignalSpec("zero_grad_window", "observer", ("first", "max", "last"), "linear",
               "worst weight tensor: share of entries whose gradient was 0 at each of the last 5 checks"),
    SignalSpec("stale_grad_frac", "observer", ("max", "median"), "linear",
               "share of trainable tensors holding a non-zero .grad before backward (forgotten zero_grad)"),
    SignalSpec("grad_none_frac", "observer", ("first", "last"), "linear",
               "share of parameter tensors whose .grad has been None at every step so far (frozen or unused)"),
    SignalSpec("frozen_frac", "observer", ("value",), "linear",
               "share of parameter elements with requires_grad=False at fit start", timing="early"),
    SignalSpec("weight_var_min", "observer", ("value",), "log", "smallest weight variance at fit start",
               "DeepDiagnosis: var(W) < 1e-5 poor weight", timing="early"),
    SignalSpec("weight_var_max", "observer", ("value",), "log", "largest weight variance at fit start",
               "DeepDiagnosis: var(W) > 10 poor weight", timing="early"),
    # ---- activations (TensorBoard: ActivationStatsMonitor)
    SignalSpec("act_dead_frac", "tensorboard", ("first", "max", "median", "p3max"), "linear",
               "worst ReLU: share of units zero for the whole sampled batch (monitor.act/*/dead_frac)",
               "SMD: > 50% of units dead; DeepDiagnosis 0.7"),
    SignalSpec("act_zero_frac_relu", "tensorboard", ("first", "max", "median"), "linear",
               "worst ReLU: share of outputs exactly 0", "DeepDiagnosis dead node: ReLU <= 0 share >= 0.7"),
    SignalSpec("act_saturation", "tensorboard", ("first", "max", "median", "p3max"), "linear",
               "worst bounded activation: share of outputs within 1% of a bound",
               "TheDeepChecker: saturation > 0.85 for > 50% of units"),
    SignalSpec("act_absmax", "tensorboard", ("first", "max"), "log", "largest |activation| over modules",
               "AUTOTRAINER: mean |hidden activation| >= 10 abnormal data"),
    SignalSpec("act_nonfinite", "tensorboard", ("max",), "linear", "modules with a NaN/Inf output at a check"),
    # ---- activations (observer)
    SignalSpec("dead_units_window", "observer", ("first", "max", "last"), "linear",
               "worst ReLU: share of units zero for every sample of the last 5 sampled batches",
               "TheDeepChecker: 95th pct |act| < 1e-5 for > 50% of units"),
    SignalSpec("preact_saturation", "observer", ("first", "max", "median"), "linear",
               "worst tanh/sigmoid: share of its inputs with |x| >= 5",
               "DeepDiagnosis: > 50% of inputs beyond +-5"),
    SignalSpec("act_growth", "observer", ("first", "max"), "log",
               "RMS of the last hidden Linear/Conv output / RMS of the first one (growth through depth)",
               "TheDeepChecker: activation std outside [0.5, 2]"),
    SignalSpec("output_prob_like", "observer", ("first", "max"), "linear",
               "share of output rows that look like probabilities (in [0, 1], sum 1): softmax before the loss",
               "AUTOTRAINER: output row-sum check; UMLAUT: missing from_logits"),
    SignalSpec("output_absmax", "observer", ("first", "max"), "log", "largest |model output|"),
    # ---- inputs (observer, every batch)
    SignalSpec("input_nonfinite", "observer", ("value",), "linear", "NaN/Inf input values over the run's batches",
               "UMLAUT NaNInInput; data-quality: n_nan + n_inf > 0", reading="max"),
    SignalSpec("input_absmax", "observer", ("first", "max"), "log", "largest finite |input| in a batch",
               "UMLAUT: outside [-1, 1] (fires on standardised data)"),
    SignalSpec("input_std", "observer", ("first",), "log", "std of the finite inputs of a batch",
               "research notes: std outside ~[0.1, 10]"),
    SignalSpec("input_abs_mean", "observer", ("first",), "log", "|mean| of the finite inputs of a batch",
               "SMD CheckInputImages: |mean| > 0.2"),
    # ---- data scans (observer, once at fit start)
    SignalSpec("train_dup_frac", "scan", ("value",), "linear", "1 - distinct rows / rows of the train split",
               "deepchecks DataDuplicates 5%; research default 1%", timing="early"),
    SignalSpec("val_leak_frac", "scan", ("value",), "linear", "share of val rows that are exact train rows",
               "deepchecks TrainTestSamplesMix <= 5%", timing="early"),
    SignalSpec("label_rarest_vs_uniform", "scan", ("value",), "log",
               "frequency of the rarest train class x C (1 = balanced)", "cleanlab/deepchecks: < 0.1",
               timing="early"),
    SignalSpec("label_shift_linf", "scan", ("value",), "linear",
               "max |p_train(c) - p_val(c)| over classes", "research default: L-inf > 0.05 with chi2 p < 0.01",
               timing="early"),
    SignalSpec("feature_shift_max", "scan", ("value",), "log",
               "max over features of |mean_val - mean_train| / std_train", timing="early"),
    SignalSpec("feature_psi_max", "scan", ("value",), "log",
               "max over features of the PSI between train and val (10 equal bins + 2 tails)",
               "PSI > 0.1 warn, 0.25 severe (null-adjust for n)", timing="early"),
    SignalSpec("split_nonfinite", "scan", ("value",), "linear", "NaN/Inf values in the train and val splits",
               timing="early"),
    # ---- outcomes (measured after the run, for the harm column)
    SignalSpec("test_acc", "outcome", ("value",), "linear", "accuracy on the clean test split after the run",
               timing="outcome"),
    SignalSpec("val_acc", "outcome", ("value",), "linear", "accuracy on the run's val split after the run",
               timing="outcome"),
)


# ------------------------------------------------------------------------------------------ readback
def read_scalars(log_dir: str) -> Dict[str, Series]:
    """Every scalar in the TensorBoard event files under ``log_dir``: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: Dict[str, Series] = {}
    event_dirs = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"),
                                                               recursive=True)})
    for directory in event_dirs:
        acc = EventAccumulator(directory, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((int(e.step), float(e.value)) for e in acc.Scalars(tag))
    for series in out.values():
        series.sort()
    return out


def read_alerts(log_dir: str) -> List[Dict[str, Any]]:
    """Every alert record in the ``alerts.jsonl`` files under ``log_dir``, in file order."""
    records: List[Dict[str, Any]] = []
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "alerts.jsonl"), recursive=True)):
        with open(path, encoding="utf-8") as fh:
            records += [json.loads(line) for line in fh if line.strip()]
    return records


# -------------------------------------------------------------------------------------------- scans
def _row_keys(x: torch.Tensor) -> List[bytes]:
    return [bytes(r) for r in x.detach().cpu().contiguous().view(len(x), -1).numpy().view("uint8")]


def scan_splits(train: Tuple[torch.Tensor, torch.Tensor], val: Optional[Tuple[torch.Tensor, torch.Tensor]],
                classes: int) -> Dict[str, float]:
    """Duplicates, leakage, label balance and shift, feature drift and NaN counts of the splits."""
    from lightwatch.metrics import psi

    xt, yt = train
    out: Dict[str, float] = {}
    keys = _row_keys(torch.cat([xt.reshape(len(xt), -1), yt.reshape(len(yt), -1).to(xt.dtype)], 1))
    out["train_dup_frac"] = 1.0 - len(set(keys)) / max(len(keys), 1)
    counts = torch.bincount(yt.long().clamp(0, classes - 1), minlength=classes).double()
    p_train = counts / counts.sum()
    out["label_rarest_vs_uniform"] = float(p_train.min() * classes)
    nonfinite = float((~torch.isfinite(xt)).sum())
    if val is not None:
        xv, yv = val
        nonfinite += float((~torch.isfinite(xv)).sum())
        train_rows = set(_row_keys(xt))
        out["val_leak_frac"] = sum(k in train_rows for k in _row_keys(xv)) / max(len(xv), 1)
        cv = torch.bincount(yv.long().clamp(0, classes - 1), minlength=classes).double()
        out["label_shift_linf"] = float((p_train - cv / cv.sum()).abs().max())
        ft, fv = xt.reshape(len(xt), -1).double(), xv.reshape(len(xv), -1).double()
        ft = torch.where(torch.isfinite(ft), ft, torch.nan)
        fv = torch.where(torch.isfinite(fv), fv, torch.nan)
        mt, mv = ft.nanmean(0), fv.nanmean(0)
        st = torch.sqrt(((ft - mt) ** 2).nanmean(0))
        live = st > 1e-8  # constant features (a blank border pixel) carry no shift
        shift = ((mv - mt).abs() / st.clamp_min(1e-8))[live]
        out["feature_shift_max"] = float(shift.max()) if shift.numel() else 0.0
        psis = []
        for j in torch.nonzero(live).flatten().tolist():
            a, b = ft[:, j], fv[:, j]
            a, b = a[~torch.isnan(a)], b[~torch.isnan(b)]
            lo, hi = float(a.min()), float(a.max())
            edges = torch.linspace(lo, hi, 11, dtype=torch.float64)[1:-1]
            ca = torch.bincount(torch.bucketize(a, edges), minlength=10).double()
            cb = torch.bincount(torch.bucketize(b, edges), minlength=10).double()
            tails = torch.tensor([float((b < lo).sum()), float((b > hi).sum())], dtype=torch.float64)
            psis.append(float(psi(torch.cat([ca, torch.zeros(2, dtype=torch.float64)]), torch.cat([cb, tails]))))
        out["feature_psi_max"] = max(psis) if psis else 0.0
    out["split_nonfinite"] = nonfinite
    return out


# ----------------------------------------------------------------------------------------- observer
_BOUNDED = (nn.Tanh, nn.Sigmoid)
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SignalObserver(pl.Callback):
    """**Measurement only.** Records candidate detection signals that lightwatch does not log yet.

    It never raises alerts and never changes the run (no RNG, no writes to the model or the batch); the
    evaluation reads :meth:`summary` after ``fit``. Per-step readings (loss, input NaN, stale gradients)
    are taken every step; the rest on sampled steps: step 0 and every ``every_n_steps`` (the monitors'
    cadence). The splits are scanned once at fit start when the datamodule holds ``TensorDataset`` s
    named ``train_set`` / ``val_set``.

    Args:
        every_n_steps: sampling interval (use the monitors' interval).
        window: checks in the zero-gradient and dead-unit windows.
        classes: number of classes C (for ln(C) and label scans).
        saturation_input: |pre-activation| beyond which a tanh/sigmoid counts as saturated.

    Example:
        >>> observer = SignalObserver(every_n_steps=10)
        >>> observer.summary()["losses"]
        []
    """

    def __init__(self, every_n_steps: int = 10, window: int = 5, classes: int = 10,
                 saturation_input: float = 5.0) -> None:
        self.every_n_steps = int(every_n_steps)
        self.window = int(window)
        self.classes = int(classes)
        self.saturation_input = float(saturation_input)
        self.losses: List[float] = []
        self.series: Dict[str, Series] = collections.defaultdict(list)
        self.static: Dict[str, float] = {}
        self.where: Dict[str, str] = {}
        self.first_input_nonfinite_step: Optional[int] = None
        self._input_nonfinite = 0.0
        self._sampled = False
        self._step = 0
        self._handles: List[Any] = []
        self._zero_masks: Dict[str, Deque[torch.Tensor]] = {}
        self._alive: Dict[str, Deque[torch.Tensor]] = {}
        self._had_grad: Dict[str, bool] = {}
        self._step_buffers: Dict[str, List[Tuple[str, float]]] = collections.defaultdict(list)
        self._where_series: Dict[str, List[Tuple[int, str]]] = collections.defaultdict(list)
        self._layer_rms: List[Tuple[str, float]] = []

    # ------------------------------------------------------------------------------------ fit start
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        params = list(pl_module.named_parameters())
        total = sum(p.numel() for _, p in params)
        frozen = [n for n, p in params if not p.requires_grad]
        self.static["frozen_frac"] = sum(p.numel() for n, p in params if not p.requires_grad) / max(total, 1)
        if frozen:
            self.where["frozen_frac"] = frozen[0]
        variances = {n: float(p.detach().float().var()) for n, p in params if p.dim() >= 2}
        if variances:
            lo, hi = min(variances, key=variances.get), max(variances, key=variances.get)
            self.static["weight_var_min"], self.where["weight_var_min"] = variances[lo], lo
            self.static["weight_var_max"], self.where["weight_var_max"] = variances[hi], hi
        self._had_grad = {n: False for n, _ in params}
        dm = getattr(trainer, "datamodule", None)
        train, val = getattr(dm, "train_set", None), getattr(dm, "val_set", None)
        if isinstance(train, TensorDataset) and len(train.tensors) >= 2:
            pair = (train.tensors[0], train.tensors[1])
            vpair = (val.tensors[0], val.tensors[1]) if isinstance(val, TensorDataset) and len(val.tensors) >= 2 \
                else None
            self.static.update(scan_splits(pair, vpair, self.classes))
        self._handles.append(pl_module.register_forward_hook(self._output_hook))
        weighted = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, _WEIGHT_LAYERS)]
        for name, module in weighted[:-1]:  # the hidden ones: the last is the output layer
            self._handles.append(module.register_forward_hook(self._weight_layer_hook(name)))
        for name, module in pl_module.named_modules():
            if isinstance(module, _BOUNDED):
                self._handles.append(module.register_forward_hook(self._bounded_hook(name)))
            elif isinstance(module, nn.ReLU):
                self._handles.append(module.register_forward_hook(self._relu_hook(name)))

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---------------------------------------------------------------------------------- forward hooks
    def _measuring(self, module: nn.Module) -> bool:
        return self._sampled and module.training

    def _output_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self._measuring(module) or not isinstance(output, torch.Tensor) or output.dim() != 2:
            return
        out = output.detach()
        finite = torch.isfinite(out).all(-1)
        in_range = ((out >= 0) & (out <= 1)).all(-1) & ((out.sum(-1) - 1).abs() < 1e-3) & finite
        self._put("output_prob_like", float(in_range.float().mean()))
        self._put("output_absmax", float(out.abs().max()) if bool(finite.all()) else float("inf"))

    def _weight_layer_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self._measuring(module) and isinstance(output, torch.Tensor):
                self._layer_rms.append((name, float(output.detach().double().pow(2).mean().sqrt())))
        return hook

    def _bounded_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self._measuring(module) and inputs and isinstance(inputs[0], torch.Tensor):
                x = inputs[0].detach()
                self._step_buffers["preact_saturation"].append(
                    (name, float((x.abs() >= self.saturation_input).float().mean())))
        return hook

    def _relu_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self._measuring(module) or not isinstance(output, torch.Tensor) or output.dim() < 2:
                return
            y = output.detach()
            alive = y.ne(0).transpose(0, 1).flatten(1).any(1) if y.dim() >= 3 else y.ne(0).any(0)
            window = self._alive.setdefault(name, collections.deque(maxlen=self.window))
            window.append(alive)
            merged = torch.stack(list(window)).any(0) if all(a.shape == alive.shape for a in window) else alive
            self._step_buffers["dead_units_window"].append((name, 1.0 - float(merged.float().mean())))
        return hook

    # ---------------------------------------------------------------------------------- step hooks
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._step = optimizer_step_index(trainer)
        self._sampled = self._step == 0 or (self._step + 1) % self.every_n_steps == 0
        x = batch[0] if isinstance(batch, (tuple, list)) else batch.get("x") if isinstance(batch, dict) else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return
        finite = torch.isfinite(x)
        bad = float((~finite).sum())
        self._input_nonfinite += bad
        if bad and self.first_input_nonfinite_step is None:
            self.first_input_nonfinite_step = self._step
        if self._sampled:
            values = x[finite].double()
            if values.numel():
                self._put("input_absmax", float(values.abs().max()))
                self._put("input_std", float(values.std()) if values.numel() > 1 else 0.0)
                self._put("input_abs_mean", float(values.mean().abs()))

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        stale = sum(1 for p in trainable if p.grad is not None and bool(p.grad.ne(0).any()))
        self.series["stale_grad_frac"].append((self._step, stale / max(len(trainable), 1)))

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: torch.optim.Optimizer) -> None:
        named = list(pl_module.named_parameters())
        for name, p in named:
            if p.grad is not None:
                self._had_grad[name] = True
        if not self._sampled:
            return
        self._put("grad_none_frac", sum(1 for v in self._had_grad.values() if not v) / max(len(self._had_grad), 1))
        grads = [(n, p.grad.detach()) for n, p in named if p.requires_grad and p.grad is not None]
        if grads:
            zeros = sum(float(g.eq(0).sum()) for _, g in grads)
            self._put("zero_grad_frac", zeros / max(sum(g.numel() for _, g in grads), 1))
        for name, g in grads:
            if g.dim() < 2:
                continue
            window = self._zero_masks.setdefault(name, collections.deque(maxlen=self.window))
            window.append(g.eq(0))
            always_zero = torch.stack(list(window)).all(0).float().mean()
            self._step_buffers["zero_grad_window"].append((name, float(always_zero)))

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self.losses.append(float(loss.detach()))
        if self._sampled and len(self._layer_rms) >= 2:
            first, last = self._layer_rms[0][1], self._layer_rms[-1][1]
            self._put("act_growth", last / first if first > 0 else float("inf") if last > 0 else float("nan"))
        self._layer_rms = []
        if self._sampled:
            for key, readings in self._step_buffers.items():
                if readings:
                    name, value = max(readings, key=lambda r: (r[1], r[0]))
                    self.series[key].append((self._step, value))
                    self._where_series[key].append((self._step, name))
            self._step_buffers.clear()
        self._sampled = False

    def _put(self, key: str, value: float) -> None:
        self.series[key].append((self._step, float(value)))

    # ---------------------------------------------------------------------------------------- result
    def summary(self) -> Dict[str, Any]:
        """Everything measured, as plain JSON-friendly Python (non-finite floats stay floats)."""
        had_grad = self._had_grad
        static = dict(self.static)
        static["input_nonfinite"] = self._input_nonfinite
        where = dict(self.where)
        never = [n for n, v in had_grad.items() if not v]
        if never:
            where["grad_none_frac"] = never[0]
        for key, names in self._where_series.items():
            # the layer of the worst reading of the run
            values = dict(self.series[key])
            step = max((s for s, _ in names), key=lambda s: (values.get(s, float("-inf")), -s))
            where[key] = dict(names)[step]
        return {
            "losses": list(self.losses),
            "series": {k: list(v) for k, v in self.series.items()},
            "static": static,
            "grad_none": [n for n, v in had_grad.items() if not v],
            "first_input_nonfinite_step": self.first_input_nonfinite_step,
            "where": where,
        }


# ------------------------------------------------------------------------------------- run signals
def _loss_signals(losses: List[float], classes: int) -> Dict[str, float]:
    out: Dict[str, float] = {}
    if not losses:
        return out
    ln_c = math.log(classes)
    out["loss_init_over_lnC.value"] = losses[0] / ln_c if math.isfinite(losses[0]) else float("inf")
    finite = _finite(losses)
    out["loss_min.value"] = min(finite) if finite else float("nan")
    out["loss_negative_frac.value"] = sum(1 for v in losses if v < 0) / len(losses)
    out["loss_nonfinite_steps.value"] = float(sum(1 for v in losses if not math.isfinite(v)))
    tail, head = losses[-20:], losses[:20]
    tail_mean = sum(tail) / len(tail) if all(math.isfinite(v) for v in tail) else float("inf")
    head_f = _finite(head)
    head_mean = sum(head_f) / len(head_f) if head_f else float("nan")
    out["loss_final_over_lnC.value"] = tail_mean / ln_c
    for at in (50, 100):
        window = losses[at - 10:at + 10]
        if len(window) == 20:
            mean = sum(window) / 20 if all(math.isfinite(v) for v in window) else float("inf")
            out[f"loss_at{at}_over_lnC.value"] = mean / ln_c
    out["loss_drop.value"] = (1.0 - tail_mean / head_mean) if math.isfinite(tail_mean) and head_mean else float("-inf")
    z_max = ratio_max = float("nan")
    for t in range(20, len(losses)):
        v = losses[t]
        if not math.isfinite(v):
            continue
        past = _finite(losses[max(0, t - 50):t])
        if len(past) >= 10:
            med = statistics.median(past)
            mad = statistics.median(abs(p - med) for p in past)
            # floor the spread at 1% of the level: a loss at 1e-4 wiggling by 1e-6 is not a spike
            z = (v - med) / (1.4826 * mad + 0.01 * abs(med) + 1e-12)
            z_max = z if math.isnan(z_max) else max(z_max, z)
        recent = _finite(losses[max(0, t - 10):t])
        if recent:
            mean = sum(recent) / len(recent)
            if mean > 0:
                ratio_max = v / mean if math.isnan(ratio_max) else max(ratio_max, v / mean)
    out["loss_spike_z.value"] = z_max
    out["loss_spike_ratio.value"] = ratio_max
    return out


Readings = Dict[int, List[Tuple[str, float]]]


def _per_step(scalars: Mapping[str, Series], family: str, stat: str,
              subjects: Optional[Sequence[str]] = None) -> Readings:
    """``{step: [(subject, value), ...]}`` for tags ``<prefix>.<family>/<subject>/<stat>``."""
    steps: Readings = collections.defaultdict(list)
    for tag, series in scalars.items():
        head, _, rest = tag.partition("/")
        if not head.endswith("." + family) or not rest.endswith("/" + stat):
            continue
        subject = rest[: -len(stat) - 1]
        if subject.startswith("_") or (subjects is not None and subject not in subjects):
            continue
        for step, value in series:
            steps[step].append((subject, value))
    return steps


def _reduce(steps: Readings, how: Any) -> Series:
    return [(s, float(how([v for _, v in readings]))) for s, readings in sorted(steps.items()) if readings]


def _worst_subject(steps: Readings) -> Optional[str]:
    """The subject of the largest reading of the run (NaN/Inf count as largest; ties: the earliest step)."""
    best: Optional[Tuple[float, int, str]] = None
    for step, readings in steps.items():
        for subject, value in readings:
            key = float("inf") if math.isnan(value) else value
            if best is None or key > best[0] or (key == best[0] and step < best[1]):
                best = (key, step, subject)
    return best[2] if best else None


def _nanmax(values: List[float]) -> float:
    if any(math.isnan(v) for v in values):
        return float("nan")
    return max(values)


# per-subject signals read from TensorBoard: (name, family, stat, subjects key in model info, reduction)
_TB_PER_SUBJECT = (
    ("update_ratio_max", "param", "update_ratio", "weights", _nanmax),
    ("update_ratio_median", "param", "update_ratio", "weights", lambda v: statistics.median(v)),
    ("act_dead_frac", "act", "dead_frac", None, _nanmax),
    ("act_zero_frac_relu", "act", "zero_frac", "relus", _nanmax),
    ("act_saturation", "act", "saturation", None, _nanmax),
    ("act_absmax", "act", "absmax", None, _nanmax),
    ("act_nonfinite", "act", "nonfinite", None, sum),
    ("grad_nonfinite", "grad", "nonfinite", None, sum),
)


def _tb_signals(scalars: Mapping[str, Series],
                model_info: Mapping[str, Any]) -> Tuple[Dict[str, Series], Dict[str, str]]:
    out: Dict[str, Series] = {}
    where: Dict[str, str] = {}
    numel: Dict[str, int] = dict(model_info.get("numel", {}))
    first_last = model_info.get("first_last")
    if first_last:
        first, last = first_last
        f = dict(_find(scalars, "grad", first, "norm"))
        l_ = dict(_find(scalars, "grad", last, "norm"))
        out["grad_ratio_first_last"] = [(s, _ratio(f[s], l_[s])) for s in sorted(f) if s in l_]
        if first in numel:
            out["grad_rms_first"] = [(s, v / math.sqrt(numel[first])) for s, v in sorted(f.items())]
    total_max = _find(scalars, "grad", "_total", "norm_max")
    if total_max:
        out["grad_norm_max"] = total_max
    for name, family, stat, subjects_key, how in _TB_PER_SUBJECT:
        subjects = list(model_info.get(subjects_key, [])) if subjects_key else None
        if subjects_key and not subjects:
            continue
        readings = _per_step(scalars, family, stat, subjects)
        out[name] = _reduce(readings, how)
        subject = _worst_subject(readings)
        if subject is not None and name not in ("update_ratio_median",):
            where[name] = subject
    return {k: v for k, v in out.items() if v}, where


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return float("nan") if a == 0 or math.isnan(a) else float("inf")  # 0/0: no gradient anywhere


def _find(scalars: Mapping[str, Series], family: str, subject: str, stat: str) -> Series:
    for tag, series in scalars.items():
        head, _, rest = tag.partition("/")
        if head.endswith("." + family) and rest == f"{subject}/{stat}":
            return list(series)
    return []


def _generic_tb(scalars: Mapping[str, Series], skip: Sequence[str] = ("grad", "param", "act", "alert")
                ) -> Tuple[Dict[str, Series], Dict[str, str]]:
    """``tb.<family>.<stat>``: the max over subjects per step, for families other lightwatch monitors log."""
    grouped: Dict[Tuple[str, str], Readings] = {}
    for tag, series in scalars.items():
        head, _, rest = tag.partition("/")
        if "." not in head or not rest:
            continue
        family = head.split(".", 1)[1]
        if family in skip or family.endswith("_hist"):
            continue
        subject, _, stat = rest.rpartition("/")
        steps = grouped.setdefault((family, stat), collections.defaultdict(list))
        for step, value in series:
            steps[step].append((subject or family, value))
    series_out = {f"tb.{family}.{stat}": _reduce(steps, _nanmax) for (family, stat), steps in grouped.items()}
    where = {f"tb.{family}.{stat}": _worst_subject(steps) for (family, stat), steps in grouped.items()}
    return series_out, {k: v for k, v in where.items() if v}


def signal_locations(observer: Optional[Mapping[str, Any]], scalars: Mapping[str, Series],
                     info: Mapping[str, Any]) -> Dict[str, str]:
    """``{signal: subject}``: the layer, parameter or feature of each signal's worst reading in the run."""
    where: Dict[str, str] = {}
    where.update(_tb_signals(scalars, info)[1])
    where.update(_generic_tb(scalars)[1])
    if observer:
        where.update({k: v for k, v in observer.get("where", {}).items() if isinstance(v, str)})
    return where


def model_info(model: nn.Module) -> Dict[str, Any]:
    """What :func:`run_signals` needs to know about the model: weight names, sizes, ReLU module names."""
    named = list(model.named_parameters())
    trainable = [n for n, p in named if p.requires_grad and p.dim() >= 2]
    return {
        "weights": [n for n, p in named if p.dim() >= 2],
        "numel": {n: p.numel() for n, p in named},
        "first_last": (trainable[0], trainable[-1]) if trainable else None,
        "relus": [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)],
    }


def run_signals(observer: Optional[Mapping[str, Any]], scalars: Mapping[str, Series], info: Mapping[str, Any],
                classes: int = 10, outcome: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """The flat ``{"<signal>.<aggregate>": value}`` of one run (see :data:`SIGNALS`).

    Args:
        observer: :meth:`SignalObserver.summary` (or ``None``).
        scalars: :func:`read_scalars` of the run's TensorBoard directory.
        info: :func:`model_info` of the model.
        classes: C.
        outcome: measured outcomes (``test_acc``, ``val_acc``).
    """
    flat: Dict[str, float] = {}
    series: Dict[str, Series] = {}
    series.update(_tb_signals(scalars, info)[0])
    series.update(_generic_tb(scalars)[0])
    if observer:
        flat.update(_loss_signals(list(observer.get("losses", [])), classes))
        series.update({k: list(v) for k, v in observer.get("series", {}).items()})
        for key, value in observer.get("static", {}).items():
            flat[f"{key}.value"] = float(value)
    specs = {s.name: s for s in SIGNALS}
    for name, values in series.items():
        aggregates = specs[name].aggregates if name in specs else ("first", "max")
        for how in aggregates:
            if how in AGGREGATES:
                flat[f"{name}.{how}"] = aggregate(values, how)
    for key, value in (outcome or {}).items():
        flat[f"{key}.value"] = float(value)
    return flat
