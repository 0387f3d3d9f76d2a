"""``SliceMonitor``: validation metrics per slice of the data (a group, a site, a validation set), with intervals,
the gap between the worst slice and the rest, and rules that say when a slice falls behind.

Hooks: ``on_validation_batch_end`` adds the batch to one summed state on the device
(:class:`~lightwatch.metrics.slices.SliceMetrics`; no host sync); ``on_validation_epoch_end`` merges it across
ranks (torchmetrics' own sync of its single state tensor), reads it once, writes the values, puts them into
``trainer.callback_metrics`` and judges the rules (:mod:`lightwatch.checks.slices`), before any callback's
``on_validation_end``: ``MetricCheckpoint`` and ``MetricMonitor`` see this evaluation's values.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from lightwatch.checks.slices import SliceReading, SliceRule, build_slice_rules
from lightwatch.core.batch import BatchSelectorError, get_path, resolve_path
from lightwatch.core.callback import MonitorCallback
from lightwatch.core.lightning import bind, default_package
from lightwatch.core.rule_keys import plain
from lightwatch.core.runtime import logging_step
from lightwatch.metrics.slices import SliceMetrics, SliceResult, interval_at

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["SliceMonitor", "SliceKey"]

_TARGET_NAMES = ("y", "target", "targets", "label", "labels")
_INPUT_NAMES = ("x", "input", "inputs", "features")
_PRED_NAMES = ("preds", "logits", "y_hat", "scores", "outputs")


class SliceKey:
    """One way of putting samples into slices; several make a cross (see ``SliceMonitor(slice_by=...)``).

    Args:
        spec: ``"dataloader"`` (the validation dataloader index), a batch path (``"group"``, ``"meta.site"``,
            ``2``), a callable ``batch -> [B] integer tensor``, or a mapping with ``field`` (a batch path),
            ``column`` (a column of that tensor), ``fn`` (instead of ``field``), ``names`` (one per value) or
            ``num_values``, and ``name`` (the label of unnamed values: ``<name>_<value>``).
        max_values: capacity of a key that gives neither ``names`` nor ``num_values``.

    Example:
        >>> key = SliceKey({"field": "group", "names": ["majority", "minority"]}, max_values=16)
        >>> key.label, key.names(), key.ids({"group": torch.tensor([1, 0])}, 0, 2).tolist()
        ('group', ['majority', 'minority'], [1, 0])
    """

    def __init__(self, spec: Any, max_values: int) -> None:
        spec = plain(spec)
        self.fn: Optional[Callable[[Any], Any]] = None
        self.path: Any = None
        self._canonical: Optional[Tuple[Any, ...]] = None  # the resolved batch path, after the first batch
        self.column: Optional[int] = None
        self.value_names: Optional[List[str]] = None
        self.capacity: Optional[int] = None
        self.dataloader = False
        self.label = ""
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - {"field", "column", "fn", "names", "num_values", "name"})
            if unknown:
                raise ValueError(f"SliceMonitor: slice key {spec!r} has unknown setting(s) {unknown}; use field, column, "
                                 f"fn, names, num_values, name.")
            names = spec.get("names")
            self.value_names = None if names is None else [str(n) for n in names]
            num = spec.get("num_values")
            self.capacity = len(self.value_names) if self.value_names is not None else (None if num is None else int(num))
            self.column = None if spec.get("column") is None else int(spec["column"])
            base = spec.get("fn") if spec.get("fn") is not None else spec.get("field")
            if base is None:
                raise ValueError(f"SliceMonitor: slice key {spec!r} needs 'field' (a batch path) or 'fn' (a callable).")
            self._set_base(base)
            self.label = str(spec.get("name") or self.label)
        else:
            self._set_base(spec)
        if self.capacity is None and not self.dataloader:
            self.capacity = int(max_values)
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"SliceMonitor: slice key {self.label!r} has {self.capacity} values; give at least one.")

    def _set_base(self, base: Any) -> None:
        if callable(base):
            self.fn = base
            self.label = getattr(base, "__name__", "fn")
        elif base == "dataloader":
            self.dataloader = True
            self.label = "dataloader"
        elif isinstance(base, (str, int)) and not isinstance(base, bool):
            self.path = base
            self.label = str(base)
        else:
            raise ValueError(f"SliceMonitor: a slice key is 'dataloader', a batch path ('group', 'meta.site', 2), a "
                             f"callable batch -> ids, or a mapping with 'field'; got {base!r}.")

    def names(self) -> List[str]:
        """The name of each value of this key."""
        assert self.capacity is not None
        if self.value_names is not None:
            return list(self.value_names)
        return [f"{self.label}_{v}" for v in range(self.capacity)]

    def ids(self, batch: Any, dataloader_idx: int, size: int) -> torch.Tensor:
        """The ``[B]`` integer value of this key for each sample of ``batch`` (on the batch's device)."""
        if self.dataloader:
            return torch.full((size,), int(dataloader_idx), dtype=torch.long)
        if self.fn is not None:
            value = self.fn(batch)
        else:
            try:
                value = get_path(batch, self._canonical) if self._canonical is not None else None
            except LookupError:  # another batch structure (another dataloader): resolve the path again
                value = None
            if value is None:
                self._canonical, value = resolve_path(batch, self.path, f"SliceMonitor(slice_by={self.path!r})")
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        if self.column is not None:
            value = value[..., self.column]
        if value.numel() != size:
            raise ValueError(f"SliceMonitor: slice key {self.label!r} gives {value.numel()} values for a batch of {size} "
                             f"samples (shape {tuple(value.shape)}); it must give one integer per sample.")
        return value.reshape(-1).long()


class _SliceMonitor(MonitorCallback):
    """Validation metrics per slice, their intervals and gaps, and the rules ``slice_gap`` and ``slice_regressed``.

    Writes ``<prefix>.slice/<metric>/<slice>`` (the value) with ``/n``, ``/ci_low``, ``/ci_high`` per slice;
    ``<prefix>.slice/<metric>/_overall``, ``_worst`` (the worst eligible slice's value), ``_gap`` (how far the
    worst slice trails the overall value), ``_spread`` (best minus worst slice) and ``_too_few`` (slices with
    fewer than ``min_count`` samples: those get ``/n`` only, never a value). Everything also goes into
    ``trainer.callback_metrics``: ``MetricCheckpoint(monitor="monitor.slice/acc/_worst", mode="max")`` keeps the
    checkpoint with the best worst-slice accuracy, and ``MetricMonitor`` rules can read any of these values.

    The rules are judged by this callback (they need every slice's count and interval, and they name the slice
    in the alert's ``subject``); they raise through :meth:`MonitorCallback.raise_alert`, so every registered
    action works (``warn``, ``stop``, ``checkpoint``, ``raise``, ``rollback``, ...; not ``skip_step``: no
    optimizer step is pending at the end of validation). Decisions are taken on values merged across ranks, so
    every rank takes the same one.

    Args:
        slice_by: a slice key (see :class:`SliceKey`: ``"dataloader"``, a batch path such as ``"group"``, a
            callable, or a mapping with ``field``/``column``/``names``/``num_values``), or a list of keys: their
            cross (slice names joined with ``.``).
        metrics: names from :data:`lightwatch.metrics.slices.SLICE_METRICS` (``acc``, ``precision``, ``recall``,
            ``f1``, ``mse``, ``mae``, ``outcome``).
        task: ``multiclass``, ``binary`` or ``regression``.
        num_classes: classes of a multiclass task (needed for precision, recall, F1).
        preds: where the predictions are: ``None`` reads what ``validation_step`` returned (a tensor, or a mapping
            with ``preds``/``logits``/``y_hat``/``scores``), and if it returned nothing runs the model on the
            batch's inputs (one more forward pass per validation batch); a key of the returned mapping; or a
            callable ``(pl_module, batch, outputs) -> predictions``.
        target: batch path of the targets (default: the second element of a tuple batch, or ``y``/``target``/
            ``label(s)`` of a mapping).
        outcome: for the ``outcome`` metric: ``(pl_module, batch, outputs, preds, target) -> [B]`` per-sample values.
        rules: rule name -> settings (see :mod:`lightwatch.checks.slices`); ``None``: ``slice_gap`` and
            ``slice_regressed`` on the first metric; ``{}``: none.
        min_count: slices with fewer samples get no value and are not judged.
        bootstrap: Poisson-bootstrap replicates for the intervals of metrics that are not rates.
        confidence: level of the intervals written and put into ``callback_metrics``.
        rule_confidence: level at which the rules judge, family-wise over the slices: each slice's interval is taken
            at ``1 - (1 - rule_confidence) / slices judged`` (Bonferroni), Wilson's for rates and ``value ± z *
            bootstrap standard error`` for the others. Stricter than ``confidence``: on a large validation set even a
            small, transient gap is significant at 95%, and with many slices one is always at the edge of its own.
        max_values: capacity of a slice key that gives neither ``names`` nor ``num_values``.
        threshold: decision threshold of binary scores.
        seed: seed of the bootstrap weights.
        every_n_steps, prefix, alert_cooldown_steps: as for every monitor.

    Example:
        >>> from lightwatch.callbacks import SliceMonitor
        >>> monitor = SliceMonitor(slice_by={"field": "group", "names": ["majority", "minority"]})
        >>> monitor.slice_names, [r.name for r in monitor.rules]
        (['majority', 'minority'], ['slice_gap', 'slice_regressed'])
    """

    DIAGNOSES = ("slice_gap", "slice_regressed", "slice_unassigned")

    def __init__(
        self,
        slice_by: Any = "dataloader",
        metrics: Optional[List[str]] = None,
        task: str = "multiclass",
        num_classes: Optional[int] = None,
        preds: Any = None,
        target: Any = None,
        outcome: Any = None,
        rules: Optional[Dict[str, Any]] = None,
        min_count: int = 30,
        bootstrap: int = 200,
        confidence: float = 0.95,
        rule_confidence: float = 0.99,
        max_values: int = 16,
        threshold: float = 0.5,
        seed: int = 0,
        every_n_steps: Optional[int] = None,
        prefix: str = "monitor",
        alert_cooldown_steps: int = 0,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, prefix=prefix, alert_cooldown_steps=alert_cooldown_steps)
        slice_by = plain(slice_by)
        specs = list(slice_by) if isinstance(slice_by, (list, tuple)) else [slice_by]
        if not specs:
            raise ValueError("SliceMonitor: slice_by is empty; give a key such as 'group' or 'dataloader'.")
        self.keys = [SliceKey(s, max_values) for s in specs]
        self.metric_names = list(plain(metrics) or ["acc"])
        self.task = task
        self.num_classes = num_classes
        self.preds = preds
        self.target = target
        self.outcome = outcome
        if "outcome" in self.metric_names and not callable(outcome):
            raise ValueError("SliceMonitor: metric 'outcome' needs outcome=(pl_module, batch, outputs, preds, target) -> "
                             "per-sample values.")
        if int(min_count) < 1:
            raise ValueError(f"SliceMonitor: min_count must be >= 1, got {min_count!r}.")
        self.min_count = int(min_count)
        self.bootstrap, self.confidence, self.threshold, self.seed = int(bootstrap), float(confidence), threshold, seed
        self.rule_confidence = float(rule_confidence)
        if not 0 < self.rule_confidence < 1:
            raise ValueError(f"SliceMonitor: rule_confidence must be in (0, 1), e.g. 0.99; got {rule_confidence!r}.")
        # Built now so that a bad metric or task fails at construction, not at the first validation.
        self._settings = dict(metrics=self.metric_names, task=task, num_classes=num_classes, threshold=threshold,
                              bootstrap=self.bootstrap, confidence=self.confidence)
        SliceMetrics(1, **self._settings)  # type: ignore[arg-type]
        self.rules: List[SliceRule] = build_slice_rules(rules, self.metric_names)
        self.state: Optional[SliceMetrics] = None
        self._active = False
        self._target_path: Any = None
        self.evaluations = 0
        self.last_result: Optional[SliceResult] = None

    @property
    def state_key(self) -> str:
        # several SliceMonitors (other slicings, another prefix) each keep their own state in a checkpoint
        return self._generate_state_key(slice_by="x".join(k.label for k in self.keys),  # type: ignore[attr-defined]
                                        prefix=self.prefix)

    @property
    def slice_names(self) -> List[str]:
        """The names of the slices (known once every key's capacity is: at the first validation for dataloaders)."""
        names: List[str] = [""]
        for key in self.keys:
            if key.capacity is None:
                return []
            names = [f"{a}.{b}" if a else b for a in names for b in key.names()]
        return names

    # ---------------------------------------------------------------------------------------- hooks
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._active = not getattr(trainer, "sanity_checking", False)
        if not self._active:
            return
        if self.state is None:
            loaders = getattr(trainer, "num_val_batches", None) or [1]
            for key in self.keys:
                if key.dataloader and key.capacity is None:
                    key.capacity = max(1, len(loaders) if isinstance(loaders, (list, tuple)) else 1)
            rank = int(getattr(trainer, "global_rank", 0))
            self.state = SliceMetrics(len(self.slice_names), seed=int(self.seed) + 1_000_003 * rank,
                                      **self._settings)  # type: ignore[arg-type]
        self.state.to(pl_module.device)
        self.state.reset()

    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active or self.state is None:
            return
        target = self._targets(batch)
        preds = self._predictions(pl_module, batch, outputs)
        ids = self._slice_ids(batch, dataloader_idx, target.shape[0] if target.ndim else 1, target.device)
        outcome = None
        if self.outcome is not None:
            outcome = torch.as_tensor(self.outcome(pl_module, batch, outputs, preds, target)).detach()
        self.state.update(preds.detach(), target.detach(), ids, outcome)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._active or self.state is None:
            return
        self._active = False
        result = self.state.compute()  # torchmetrics merges the state across ranks here
        self.state.reset()
        self.last_result = result
        self.evaluations += 1
        step = logging_step(trainer)
        readings = self._readings(result)
        self.writer.write_scalars(trainer, self._scalars(result, readings), step)
        if result.other > 0:
            self.raise_alert(trainer, pl_module, rule="slice_unassigned", severity="info", subject=None,
                             value=result.other, step=step, message=(
                                 f"{int(result.other)} validation samples had a slice id outside the known values "
                                 f"(slice names: {self.slice_names[:8]}); they count in _overall only. Give the key's "
                                 f"'names' or 'num_values' to cover every value."))
        for rule in self.rules:
            for finding in rule.judge(readings[rule.metric], step):
                self.raise_finding(trainer, pl_module, finding)

    # ------------------------------------------------------------------------------------- batch parts
    def _targets(self, batch: Any) -> torch.Tensor:
        if self._target_path is None:
            selector = self.target
            if selector is None:
                if isinstance(batch, (tuple, list)) and len(batch) >= 2:
                    selector = 1
                elif isinstance(batch, Mapping):
                    selector = next((k for k in _TARGET_NAMES if k in batch), None)
            if selector is None:
                raise BatchSelectorError("SliceMonitor: found no targets in the validation batch; pass target=<batch "
                                         "path> (e.g. 'y' or 1).")
            self._target_path, _ = resolve_path(batch, selector, "SliceMonitor(target=...)")
        value = get_path(batch, self._target_path)
        return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)

    def _predictions(self, pl_module: Any, batch: Any, outputs: Any) -> torch.Tensor:
        if callable(self.preds):
            return torch.as_tensor(self.preds(pl_module, batch, outputs))
        if isinstance(outputs, Mapping):
            names = (self.preds,) if self.preds is not None else _PRED_NAMES
            for name in names:
                if isinstance(outputs.get(name), torch.Tensor):
                    return outputs[name]
            if self.preds is not None:
                raise ValueError(f"SliceMonitor: validation_step returned no {self.preds!r}; keys: {sorted(outputs)}.")
        if isinstance(outputs, torch.Tensor) and outputs.ndim > 0:
            return outputs
        if self.preds is not None:
            raise ValueError(f"SliceMonitor(preds={self.preds!r}): validation_step must return a mapping holding it.")
        inputs = None
        if isinstance(batch, (tuple, list)) and batch:
            inputs = batch[0]
        elif isinstance(batch, Mapping):
            inputs = next((batch[k] for k in _INPUT_NAMES if k in batch), None)
        if inputs is None:
            raise ValueError("SliceMonitor: validation_step returned no predictions and the batch has no inputs to run "
                             "the model on; return the logits from validation_step or pass preds=callable.")
        with torch.no_grad():
            return pl_module(inputs)

    def _slice_ids(self, batch: Any, dataloader_idx: int, size: int, device: torch.device) -> torch.Tensor:
        ids: Optional[torch.Tensor] = None
        for key in self.keys:
            assert key.capacity is not None
            own = key.ids(batch, dataloader_idx, size).to(device)
            valid = (own >= 0) & (own < key.capacity)
            if ids is None:
                ids = torch.where(valid, own, -1)
            else:
                ids = torch.where(valid & (ids >= 0), ids * key.capacity + own, -1)
        assert ids is not None
        return ids

    # ---------------------------------------------------------------------------------------- results
    def _readings(self, result: SliceResult) -> Dict[str, SliceReading]:
        names = self.slice_names
        counts = result.counts.tolist()
        # Family-wise over the slices judged (Bonferroni): with many slices one of them is always at the edge of
        # its own interval; the overall value's interval is at the rule level itself.
        judged = max(1, sum(1 for c in counts if c >= self.min_count))
        per_slice = 1 - (1 - self.rule_confidence) / judged
        readings = {}
        for m in self.metric_names:
            low, high, _, _ = interval_at(result, m, per_slice)
            _, _, overall_low, overall_high = interval_at(result, m, self.rule_confidence)
            readings[m] = SliceReading(m, result.higher_is_better[m], names, counts, result.values[m].tolist(),
                                       low.tolist(), high.tolist(), result.overall[m], (overall_low, overall_high),
                                       self.min_count)
        return readings

    def _scalars(self, result: SliceResult, readings: Mapping[str, SliceReading]) -> Dict[str, float]:
        out: Dict[str, float] = {}
        tag = self.writer.tag
        for metric, r in readings.items():
            lows, highs = result.ci_low[metric].tolist(), result.ci_high[metric].tolist()
            eligible: List[Tuple[float, str]] = []
            too_few = 0
            for i, name in enumerate(r.names):
                if r.counts[i] <= 0:
                    continue
                out[tag("slice", f"{metric}/{name}", "n")] = r.counts[i]
                if r.counts[i] < self.min_count:
                    too_few += 1
                    continue
                if math.isfinite(r.values[i]):
                    out[tag("slice", f"{metric}/{name}")] = r.values[i]
                    eligible.append((r.values[i], name))
                for stat, bound in (("ci_low", lows[i]), ("ci_high", highs[i])):
                    if math.isfinite(bound):
                        out[tag("slice", f"{metric}/{name}", stat)] = bound
            if math.isfinite(r.overall):
                out[tag("slice", f"{metric}/_overall")] = r.overall
            out[tag("slice", f"{metric}/_too_few")] = float(too_few)
            if eligible:
                worst = min(eligible)[0] if r.higher_is_better else max(eligible)[0]
                best = max(eligible)[0] if r.higher_is_better else min(eligible)[0]
                out[tag("slice", f"{metric}/_worst")] = worst
                out[tag("slice", f"{metric}/_spread")] = abs(best - worst)
                if math.isfinite(r.overall):
                    out[tag("slice", f"{metric}/_gap")] = (r.overall - worst) if r.higher_is_better else (worst - r.overall)
        if result.other > 0:
            out[tag("slice", "_other", "n")] = result.other
        return out

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "evaluations": int(self.evaluations),
                "rules": {r.name: r.state_dict() for r in self.rules}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.evaluations = int(state_dict.get("evaluations", 0))
        saved = dict(state_dict.get("rules", {}))
        for rule in self.rules:
            if rule.name in saved and saved[rule.name].get("kind") == rule.kind:
                rule.load_state_dict(saved[rule.name])


SliceMonitor = bind(_SliceMonitor, default_package(), module=__name__)
