"""Run the fault suite against lightwatch's default policy and Lightning's built-ins; print what each caught.

For every fault (``bench/faults``) over several seeds, and for healthy controls over more seeds, each run
is trained from the same seed once per mode:

- ``lightwatch``: the callbacks of lightwatch's Hydra policy (``monitor=default``, composed through
  ``lightwatch.conf``; if that cannot be composed, every lightwatch callback built with no arguments),
  plus a measurement-only :class:`bench.faults.SignalObserver`, a TensorBoard logger and alerts.jsonl;
- ``early_stopping``: Lightning's ``EarlyStopping(monitor="train/loss", check_finite=True)`` (its other
  settings at their defaults: patience 3, checked at the end of each training epoch);
- ``spike_detection``: Lightning's ``SpikeDetection()`` with its defaults (running mean over 10 losses,
  ``rtol=2``, a non-finite loss counts as a spike; it raises ``TrainingSpikeException``).

It prints, per fault: recall over the seeds (alerts of severity ``warning`` or worse, at or after the
fault's onset), recall counting ``info`` alerts too, the median steps from onset to detection, the rule
that fired first, and whether its subject names the fault's layer, feature or split; then the
false-alarm rate on the healthy runs; then, for every candidate signal, the healthy range and each
fault's range (the table thresholds are set from) and the signals that separate each fault best.

Each run's raw record (every TensorBoard scalar read back with ``EventAccumulator(size_guidance=0)``, the
alerts.jsonl records, the observer's measurements) is written to ``<out>/runs/<mode>/<fault>/seed<k>.json``
and the summary to ``<out>/results.json``.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python bench/diagnosis.py                      # full suite: 5 seeds, 20 healthy
    python bench/diagnosis.py --faults dead_relu,nan_in_data --seeds 2 --healthy-seeds 4
    python bench/diagnosis.py --severity lr_too_high=10 --faults lr_too_high   # a dose
    python bench/diagnosis.py --doses label_noise=0.1,0.2,0.4,0.7 --healthy-seeds 10 --modes lightwatch
    python bench/diagnosis.py --jobs 2 --markdown outputs/diagnosis/tables.md
    python bench/diagnosis.py --tables-from outputs/diagnosis/results.json       # re-tabulate, no training
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytorch_lightning as pl  # noqa: E402

from bench.tables import json_safe as _json_safe  # noqa: E402
from bench.tables import num as _num  # noqa: E402
from bench.faults import (  # noqa: E402
    FAULTS,
    SIGNALS,
    SignalObserver,
    accuracy,
    get_fault,
    model_info,
    read_alerts,
    read_scalars,
    run_signals,
    signal_locations,
)
from bench.faults.injections import optimizer_step_index  # noqa: E402

MODES = ("lightwatch", "early_stopping", "spike_detection")
SEVERITY_ORDER = ("info", "warning", "error", "critical")


# ------------------------------------------------------------------------------------------- quiet
def _quiet() -> None:
    """One thread, and no per-run chatter: the tables are the output (alerts stay in alerts.jsonl)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch", "lightwatch"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


# ------------------------------------------------------------------------------------------ policy
_POLICY_CACHE: Dict[str, Any] = {}


def policy_callbacks(policy: str) -> Tuple[List[Any], str]:
    """Fresh callbacks of lightwatch's Hydra policy ``policy``, and a line saying where they came from.

    The policy is composed once per process through ``lightwatch.conf`` and instantiated with
    ``lightwatch.hydra.instantiate_monitors``. When that is not possible (no Hydra configs in this
    version, or a policy that fails to compose), every callback in ``lightwatch.callbacks`` that can be
    built with no arguments is used instead, and the line says so and why.
    """
    try:
        from lightwatch.hydra import instantiate_monitors

        if policy not in _POLICY_CACHE:
            from hydra import compose, initialize_config_module
            from hydra.core.global_hydra import GlobalHydra

            GlobalHydra.instance().clear()
            with initialize_config_module("lightwatch.conf", version_base="1.3"):
                _POLICY_CACHE[policy] = compose(overrides=[f"+monitor={policy}"])
        callbacks = instantiate_monitors(_POLICY_CACHE[policy].monitor)
        return callbacks, f"hydra policy monitor={policy}: " + ", ".join(type(c).__name__ for c in callbacks)
    except Exception as err:  # the fallback below is the documented behaviour, and the reason is reported
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    import lightwatch.callbacks as lwc

    callbacks = []
    for name in getattr(lwc, "__all__", []):
        cls = getattr(lwc, name, None)
        if isinstance(cls, type) and issubclass(cls, pl.Callback):
            try:
                callbacks.append(cls())
            except TypeError:
                continue
    return callbacks, (f"fallback, every lightwatch callback with no arguments ("
                       f"{', '.join(type(c).__name__ for c in callbacks)}); the Hydra policy failed: {reason}")


# -------------------------------------------------------------------------------------------- runs
def _stop_reason(es: Any) -> Optional[str]:
    """``EarlyStopping.stopping_reason`` as a lower-case name (``non_finite_metric``), or ``None`` before 2.5."""
    reason = getattr(es, "stopping_reason", None)
    return reason.name.lower() if reason is not None and hasattr(reason, "name") else None


class LossStopProbe(pl.Callback):
    """Records the loss of every step and the step at which Lightning's ``EarlyStopping`` decided to stop."""

    def __init__(self, early_stopping: Any) -> None:
        self.early_stopping = early_stopping
        self.losses: List[float] = []
        self.stop_step: Optional[int] = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()) if loss is not None else float("nan"))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # EarlyStopping is a "monitoring" callback: Lightning runs its epoch-end check after every other
        # callback's, so the decision is read when training ends (it ends at once after a stop)
        es = self.early_stopping
        if es is None or self.stop_step is not None:
            return
        reason = _stop_reason(es)
        # stopped_epoch stays 0 for a stop in epoch 0: read the reason (Lightning >= 2.5), else the flag
        if (reason is not None and reason != "not_stopped") or (reason is None and trainer.should_stop):
            self.stop_step = optimizer_step_index(trainer)


def run_one(task: Dict[str, Any]) -> Dict[str, Any]:
    """Train one (fault, seed, mode) run and return its record (the raw part goes to its own JSON file)."""
    _quiet()
    from pytorch_lightning.loggers import TensorBoardLogger

    fault = get_fault(task["fault"])
    start = time.perf_counter()
    run = fault.build(task["seed"], task.get("severity"), task.get("max_steps"))
    mode = task["mode"]
    name = f"{run.fault}@{_fmt(run.severity)}" if task.get("dose") else run.fault  # doses of one fault apart
    run_dir = os.path.join(task["work_dir"], mode, name, f"seed{run.seed}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir, exist_ok=True)
    record: Dict[str, Any] = {
        "fault": run.fault, "kind": fault.kind, "seed": run.seed, "severity": run.severity, "mode": mode,
        "base": run.base, "onset": run.onset, "location": run.location.describe(), "planted": run.planted,
        "max_steps": run.recipe.max_steps, "error": None, "alerts": [], "detection": None,
    }
    raw: Dict[str, Any] = {}
    error: Optional[BaseException] = None
    if mode == "lightwatch":
        monitors, source = policy_callbacks(task.get("policy", "default"))
        observer = SignalObserver(every_n_steps=run.recipe.log_every_n_steps)
        trainer = run.trainer(run_dir, callbacks=[*monitors, observer],
                              logger=TensorBoardLogger(run_dir, name="tb", version=0))
        record["policy"] = source
        try:
            trainer.fit(run.model, datamodule=run.datamodule)
        except Exception as err:  # a raise action, or a crash: recorded, the evaluation goes on
            error = err
        record["steps_done"] = optimizer_step_index(trainer)
        for cb in monitors:
            flush = getattr(getattr(cb, "writer", None), "flush", None)
            if callable(flush):
                flush(trainer)
        for lg in trainer.loggers:
            lg.finalize("success")
        alerts = read_alerts(run_dir)
        scalars = read_scalars(run_dir)
        outcome = {"test_acc": accuracy(run.model, run.datamodule.test_dataloader()),
                   "val_acc": accuracy(run.model, run.datamodule.val_dataloader())}
        obs = observer.summary()
        info = model_info(run.model)
        record["signals"] = run_signals(obs, scalars, info, outcome=outcome)
        record["signal_where"] = signal_locations(obs, scalars, info)
        record["first_input_nonfinite_step"] = obs.get("first_input_nonfinite_step")
        record["alerts"] = alerts
        record["detection"] = _lightwatch_detection(alerts, run, fault)
        raw = {"tensorboard": scalars, "alerts": alerts, "observer": obs}
    else:
        callbacks, probe, es = _builtins(mode, run_dir)
        trainer = run.trainer(run_dir, callbacks=callbacks, logger=False)
        try:
            trainer.fit(run.model, datamodule=run.datamodule)
        except Exception as err:
            error = err
        record["steps_done"] = optimizer_step_index(trainer)
        record["builtins"] = [repr_builtin(cb) for cb in callbacks if cb is not probe]
        record["detection"] = _lightning_detection(es, probe, error, trainer, run)
        raw = {"losses": probe.losses}
        if type(error).__name__ == "TrainingSpikeException":
            error = None  # that is the built-in's detection, not a failure of the run
    if error is not None:
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    record["wall_s"] = round(time.perf_counter() - start, 3)
    raw_path = os.path.join(task["out_dir"], "runs", mode, name, f"seed{run.seed}.json")
    os.makedirs(os.path.dirname(raw_path), exist_ok=True)
    with open(raw_path, "w", encoding="utf-8") as fh:
        json.dump(_json_safe({**record, "raw": raw}), fh)
    record["raw_path"] = os.path.relpath(raw_path, task["out_dir"])
    if not task.get("keep_logs"):
        shutil.rmtree(run_dir, ignore_errors=True)
    return _json_safe(record)


def spike_detection_class() -> Optional[type]:
    """``pytorch_lightning.callbacks.SpikeDetection``, or ``None`` where this Lightning has none."""
    try:
        from pytorch_lightning.callbacks import SpikeDetection
    except ImportError:
        return None
    return SpikeDetection


def _builtins(mode: str, run_dir: str) -> Tuple[List[Any], LossStopProbe, Optional[Any]]:
    """The Lightning built-in of ``mode`` with its default settings, plus the probe that times it."""
    if mode == "early_stopping":
        from pytorch_lightning.callbacks import EarlyStopping

        es = EarlyStopping(monitor="train/loss", check_finite=True)
        probe = LossStopProbe(es)
        return [es, probe], probe, es
    spike = spike_detection_class()
    probe = LossStopProbe(None)
    # the probe goes first: SpikeDetection raises inside on_train_batch_end, after the probe saw the loss
    return [probe] + ([spike(exclude_batches_path=run_dir)] if spike is not None else []), probe, None


def repr_builtin(cb: Any) -> str:
    if type(cb).__name__ == "EarlyStopping":
        return (f"EarlyStopping(monitor={cb.monitor!r}, check_finite={cb.check_finite}, patience={cb.patience}, "
                f"mode={cb.mode!r})")
    return f"SpikeDetection(window=10, rtol={cb.rtol}, atol={cb.atol}, warmup={cb.warmup})"


def _at_least(severity: str, minimum: str) -> bool:
    return SEVERITY_ORDER.index(severity) >= SEVERITY_ORDER.index(minimum)


def _lightwatch_detection(alerts: List[Dict[str, Any]], run: Any, fault: Any) -> Dict[str, Any]:
    """What lightwatch's alerts say about this run.

    ``detected``: an alert of severity warning or worse at or after the onset; ``diagnosed``: one whose
    rule names the fault's cause (:attr:`Fault.diagnoses`); ``diagnosed_info``: such a rule fired, at
    ``info`` only. The location is checked on the first diagnosing alert, else on the first detecting one.
    A data fault is in the data from the start, and its onset is the step training first meets it (the
    first NaN batch): an alert before that counts when it names the cause (the scan before training found
    it), and its delay is negative.
    """
    ordered = [a for _, a in sorted(enumerate(alerts), key=lambda ia: (int(ia[1].get("step", 0)), ia[0]))]

    def counts(a: Dict[str, Any]) -> bool:
        return a["step"] >= run.onset or (fault.kind == "data" and fault.names_cause(a["source"], a["rule"]))

    warn = [a for a in ordered if _at_least(a["severity"], "warning")]
    after = [a for a in warn if counts(a)]
    any_after = [a for a in ordered if counts(a)]
    right = [a for a in any_after if fault.names_cause(a["source"], a["rule"])]
    right_warn = [a for a in right if _at_least(a["severity"], "warning")]
    first = after[0] if after else None
    named = right_warn[0] if right_warn else first
    return {
        "detected": first is not None,
        "detected_any": bool(any_after),
        "diagnosed": bool(right_warn),
        "diagnosed_info": bool(right) and not right_warn,
        "step": first["step"] if first else None,
        "delay": first["step"] - run.onset if first else None,
        "diagnosis_delay": right_warn[0]["step"] - run.onset if right_warn else None,
        "rule": f"{first['source']}:{first['rule']}" if first else None,
        "diagnosis_rule": f"{right_warn[0]['source']}:{right_warn[0]['rule']}" if right_warn else None,
        "subject": named.get("subject") if named else None,
        "location_ok": run.location.matches(named.get("subject")) if named else None,
        "false_alarms": len(warn) - len(after) if run.fault != "healthy" else len(warn),
        "rules": sorted({f"{a['source']}:{a['rule']}" for a in warn}),
    }


def _lightning_detection(es: Any, probe: Any, error: Optional[BaseException], trainer: Any, run: Any) -> Dict[str, Any]:
    step: Optional[int] = None
    rule: Optional[str] = None
    if error is not None and type(error).__name__ == "TrainingSpikeException":
        step = optimizer_step_index(trainer)
        last = probe.losses[-1] if probe.losses else float("nan")
        rule = "SpikeDetection:" + ("non_finite" if not math.isfinite(last) else "spike")
    elif probe.stop_step is not None:
        step = probe.stop_step
        rule = f"EarlyStopping:{_stop_reason(es) or 'stopped'}"
    detected = step is not None and step >= run.onset
    return {
        "detected": detected, "detected_any": detected, "diagnosed": False, "diagnosed_info": False, "step": step,
        "delay": step - run.onset if detected else None, "delay_any": step - run.onset if detected else None,
        "rule": rule if detected else None, "rule_any": rule if detected else None, "subject": None,
        "location_ok": None, "false_alarms": 1 if (step is not None and (run.fault == "healthy" or step < run.onset))
        else 0, "rules": [rule] if rule else [],
    }


# ------------------------------------------------------------------------------------------ tables
def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.{max(digits - 1, 1)}e}"
    return f"{value:.{digits}g}"


def _markdown(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _harm(fault: Any, runs: List[Dict[str, Any]], healthy: List[Dict[str, Any]]) -> Tuple[str, Optional[bool]]:
    """The fault's harm, measured its way, next to the healthy runs of the same base model."""
    def sig(rs: List[Dict[str, Any]], key: str) -> List[float]:
        return [v for v in (_num(r.get("signals", {}).get(key)) for r in rs) if not math.isnan(v)]

    base = runs[0]["base"] if runs else None
    same = [h for h in healthy if h["base"] == base] or healthy
    metric = fault.harm_metric
    if metric == "test_acc":
        f, h = _median(sig(runs, "test_acc.value")), _median(sig(same, "test_acc.value"))
        return f"test acc {_fmt(f, 2)} (healthy {_fmt(h, 2)})", (h - f >= 0.05) if not math.isnan(f + h) else None
    if metric in ("val_optimism", "val_drop"):
        fd = [v - t for v, t in zip(sig(runs, "val_acc.value"), sig(runs, "test_acc.value"))]
        hd = [v - t for v, t in zip(sig(healthy, "val_acc.value"), sig(healthy, "test_acc.value"))]
        if not fd or not hd:
            return "n/a", None
        f = _median(fd)
        text = f"val-test {f:+.3f} (healthy {min(hd):+.3f} to {max(hd):+.3f})"
        return text, (f > max(hd)) if metric == "val_optimism" else (f < min(hd) - 0.05)
    if metric == "spike":
        f, h = sig(runs, "loss_spike_ratio.value"), sig(healthy, "loss_spike_ratio.value")
        return (f"loss jumps x{_fmt(_median(f), 2)} (healthy max x{_fmt(max(h) if h else float('nan'), 2)})",
                (min(f) > max(h)) if f and h else None)
    f_end = sig(runs, "loss_final_over_lnC.value")
    f_min = sig(runs, "loss_min.value")
    f_nan = sig(runs, "loss_nonfinite_steps.value")
    h_end = sig(same, "loss_final_over_lnC.value")
    text = (f"loss end {_fmt(_median(f_end) * math.log(10), 2)} (healthy {_fmt(_median(h_end) * math.log(10), 2)})"
            f", min {_fmt(min(f_min) if f_min else float('nan'), 2)}, NaN-loss runs {sum(1 for v in f_nan if v > 0)}")
    harmful = bool(f_nan and max(f_nan) > 0) or bool(f_min and min(f_min) < 0) or bool(
        f_end and h_end and _median(f_end) > 2 * max(h_end))
    return text, harmful


def detection_table(records: List[Dict[str, Any]], faults: Sequence[Any]) -> Tuple[List[str], List[List[str]]]:
    """One row per fault: its harm, then what lightwatch and each Lightning built-in caught."""
    by = collections.defaultdict(list)
    for r in records:
        by[(r["mode"], r["fault"])].append(r)
    healthy = by[("lightwatch", "healthy")]
    headers = ["fault", "class", "severity", "harm", "harmful", "lw recall", "lw recall (info+)", "lw diagnosed",
               "lw steps", "lw rule", "lw location", "EarlyStopping recall", "ES steps", "SpikeDetection recall",
               "SD steps"]
    rows = []
    for fault in faults:
        lw = _main_dose(by[("lightwatch", fault.name)], fault)
        harm, harmful = _harm(fault, lw, healthy) if lw else ("n/a", None)
        severity = lw[0]["severity"] if lw else fault.severity
        row = [fault.name, fault.kind, f"{_fmt(severity)} ({fault.severity_doc})", harm,
               {True: "yes", False: "no", None: "?"}[harmful]]
        if lw:
            det = [r["detection"] for r in lw]
            hits = [d for d in det if d["detected"]]
            checked = [d["location_ok"] for d in hits if d["location_ok"] is not None]
            diagnosed = sum(1 for d in det if d.get("diagnosed"))
            info_only = sum(1 for d in det if d.get("diagnosed_info"))
            recall, recall_info, steps, rules = _lightwatch_summary(det)
            row += [recall, recall_info, f"{diagnosed}/{len(det)}" + (f" (+{info_only} info)" if info_only else ""),
                    steps, rules, f"{sum(checked)}/{len(checked)}" if checked else ("n/a" if hits else "-")]
        else:
            row += ["-"] * 6
        for mode in ("early_stopping", "spike_detection"):
            runs = _main_dose(by[(mode, fault.name)], fault)
            if not runs:
                row += ["-", "-"]
                continue
            det = [r["detection"] for r in runs]
            hits = [d for d in det if d["detected"]]
            reasons = collections.Counter(d["rule"].split(":", 1)[1] for d in hits)
            why = f" ({', '.join(k for k, _ in reasons.most_common(2))})" if reasons else ""
            row += [f"{len(hits)}/{len(det)}{why}", _fmt(_median([d["delay"] for d in hits])) if hits else "-"]
        rows.append(row)
    return headers, rows


def _main_dose(runs: List[Dict[str, Any]], fault: Any) -> List[Dict[str, Any]]:
    """The runs of one dose: the fault's default when a dose-response run holds several, else all of them."""
    doses = sorted({_num(r.get("severity")) for r in runs})
    if len(doses) <= 1:
        return runs
    main = next((d for d in doses if math.isclose(d, fault.severity)), doses[-1])
    return [r for r in runs if math.isclose(_num(r.get("severity")), main)]


def _lightwatch_summary(det: List[Dict[str, Any]]) -> List[str]:
    """Recall at warning+, recall at info+, median steps and the rules that fired, for one group of runs."""
    hits = [d for d in det if d["detected"]]
    rules = collections.Counter(d["rule"] for d in hits)
    return [f"{len(hits)}/{len(det)}", f"{sum(1 for d in det if d['detected_any'])}/{len(det)}",
            _fmt(_median([d["delay"] for d in hits])) if hits else "-",
            ", ".join(f"{k} ({v})" for k, v in rules.most_common(2)) or "-"]


def dose_table(records: List[Dict[str, Any]], faults: Sequence[Any]) -> Tuple[List[str], List[List[str]]]:
    """Dose-response: per fault run at several severities, recall and harm per dose, and where each starts.

    The last two columns, on each fault's first row: the mildest dose lightwatch names at ``warning`` in at
    least 80% of the seeds, and the mildest dose that does measurable harm. A detector tuned well fires near
    the harm threshold: not much below it (it would warn about harmless runs), not above it.
    """
    healthy = [r for r in records if r["mode"] == "lightwatch" and r["fault"] == "healthy"]
    headers = ["fault", "severity", "harm", "harmful", "lw recall", "lw recall (info+)", "lw steps", "lw rule",
               "mildest dose caught (>= 80%)", "mildest harmful dose"]
    rows = []
    for fault in faults:
        runs = [r for r in records if r["mode"] == "lightwatch" and r["fault"] == fault.name and r.get("detection")]
        doses = sorted({_num(r.get("severity")) for r in runs})
        if len(doses) < 2:
            continue
        group_rows, caught, harmful_doses = [], [], []
        for dose in doses:
            at = [r for r in runs if math.isclose(_num(r.get("severity")), dose)]
            harm, harmful = _harm(fault, at, healthy) if healthy else ("n/a (no healthy runs)", None)
            det = [r["detection"] for r in at]
            if sum(1 for d in det if d["detected"]) >= 0.8 * len(det):
                caught.append(dose)
            if harmful:
                harmful_doses.append(dose)
            group_rows.append([fault.name, _fmt(dose), harm, {True: "yes", False: "no", None: "?"}[harmful],
                               *_lightwatch_summary(det)])
        # "mildest": the lowest value, except where a lower value is the worse fault (Fault.worse_when_lower)
        pick = max if fault.worse_when_lower else min
        group_rows[0] += [_fmt(pick(caught)) if caught else "none", _fmt(pick(harmful_doses)) if harmful_doses
                          else "none"]
        for row in group_rows[1:]:
            row += ["", ""]
        rows += group_rows
    return headers, rows


def false_alarm_table(records: List[Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    headers = ["mode", "healthy runs", "runs with warning+", "rate", "95% upper bound", "alerts / 1000 steps",
               "info-only runs", "rules"]
    rows = []
    for mode in MODES:
        runs = [r for r in records if r["mode"] == mode and r["fault"] == "healthy"]
        if not runs:
            continue
        flagged = [r for r in runs if r["detection"]["false_alarms"] > 0]
        n_alerts = sum(r["detection"]["false_alarms"] for r in runs)
        steps = sum(max(int(r.get("steps_done") or 0), 1) for r in runs)
        info_only = sum(1 for r in runs if r["detection"]["false_alarms"] == 0 and r.get("alerts"))
        rules = collections.Counter(rule for r in flagged for rule in r["detection"]["rules"])
        upper = 1.0 - 0.05 ** (1.0 / len(runs)) if not flagged else float("nan")
        rows.append([mode, str(len(runs)), str(len(flagged)), f"{len(flagged) / len(runs):.0%}",
                     f"{upper:.0%}" if not flagged else "-", _fmt(1000.0 * n_alerts / steps, 3), str(info_only),
                     ", ".join(f"{k} ({v})" for k, v in rules.most_common(4)) or "-"])
    return headers, rows


def _range(values: List[float]) -> Tuple[float, float]:
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def _separation(h: Tuple[float, float], f: Tuple[float, float], scale: str) -> Optional[Dict[str, Any]]:
    """How a fault's range sits against the healthy range: direction, a threshold between them, margins.

    The threshold is halfway between the nearest healthy and the nearest faulty run: the geometric mean
    for log-scale signals, the arithmetic mean otherwise. ``score`` ranks signals: the gap in units of the
    healthy spread (log10 units for log-scale signals), so a wide gap next to a tight healthy range wins.
    """
    (h_lo, h_hi), (f_lo, f_hi) = h, f
    if any(math.isnan(v) for v in (h_lo, h_hi, f_lo, f_hi)):
        return None
    if f_lo > h_hi:
        direction, near_h, near_f = "above", h_hi, f_lo
    elif f_hi < h_lo:
        direction, near_h, near_f = "below", h_lo, f_hi
    else:
        return None
    if math.isinf(near_f):
        # non-finite readings: any finite bound separates them, but they say little about the cause
        return {"direction": direction, "threshold": near_h, "margin": "non-finite", "score": 5.0}
    if scale == "log" and near_h > 0 and near_f > 0 and h_lo > 0:
        ratio = near_f / near_h if direction == "above" else near_h / near_f
        width = max(math.log10(h_hi / h_lo), 0.1)
        return {"direction": direction, "threshold": math.sqrt(near_h * near_f), "margin": f"x{ratio:.3g}",
                "score": math.log10(ratio) / width}
    gap = abs(near_f - near_h)
    width = max(h_hi - h_lo, 0.05 * max(abs(near_h), abs(near_f)), 1e-6)
    return {"direction": direction, "threshold": (near_h + near_f) / 2.0, "margin": f"{gap:.3g}",
            "score": gap / width}


def _spec(key: str) -> Tuple[Any, str, str]:
    """``(SignalSpec or None, signal name, aggregate)`` of a ``signal.aggregate`` key."""
    name, _, how = key.rpartition(".")
    return {s.name: s for s in SIGNALS}.get(name), name, how


def _timing(key: str) -> str:
    spec, _, how = _spec(key)
    if spec is not None:
        return spec.timing_of(how)
    return "early" if how == "first" else "online"


def signal_ranges(records: List[Dict[str, Any]], faults: Sequence[Any]) -> Dict[str, Dict[str, Any]]:
    """Per ``signal.aggregate``: the healthy range, each fault's range, and where they separate.

    A range is over the runs where the signal is defined (a tanh saturation has no value on a ReLU net);
    ``n`` says how many of how many runs. A fault counts as separated only when the signal is defined on
    every one of its runs and all of them fall on the same side of every healthy run. ``located`` counts
    the runs whose worst reading of the signal is in the fault's location: its layer for layer signals
    and layer faults, its split or feature for data signals and data faults.
    """
    lw = [r for r in records if r["mode"] == "lightwatch" and r.get("signals") is not None]
    keys = sorted({k for r in lw for k in r["signals"]})
    by_fault = collections.defaultdict(list)
    for r in lw:
        by_fault[r["fault"]].append(r)
    out: Dict[str, Dict[str, Any]] = {}
    for key in keys:
        spec, name, _ = _spec(key)
        scale = spec.scale if spec is not None else "log"

        def values(fault: str) -> Tuple[List[float], int]:
            vs = [_num(r["signals"].get(key)) for r in by_fault[fault]]
            return [v for v in vs if not math.isnan(v)], len(vs)

        h_vals, h_n = values("healthy")
        entry: Dict[str, Any] = {"healthy": _range(h_vals), "healthy_n": [len(h_vals), h_n], "faults": {},
                                 "n": {}, "separation": {}, "located": {}, "scale": scale, "timing": _timing(key)}
        for fault in faults:
            f_vals, f_n = values(fault.name)
            entry["faults"][fault.name] = _range(f_vals)
            entry["n"][fault.name] = [len(f_vals), f_n]
            sep = _separation(entry["healthy"], entry["faults"][fault.name], scale) if len(f_vals) == f_n else None
            if sep is not None:
                entry["separation"][fault.name] = sep
            data_signal = name.startswith("tb.data.")
            # a layer fault is located by a layer-level signal, a data fault by a data-level one
            if f_n and ((fault.location.layers and not data_signal) or
                        ((fault.location.split or fault.location.features) and data_signal)):
                where = [r.get("signal_where", {}).get(name) for r in by_fault[fault.name]]
                if any(w is not None for w in where):
                    entry["located"][fault.name] = [sum(1 for w in where if fault.location.matches(w)), f_n]
        out[key] = entry
    return out


def _count(pair: Sequence[int]) -> str:
    k, n = pair
    return "" if k == n else f" ({k}/{n} runs)"


def signal_table(ranges: Dict[str, Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    order = {s.name: i for i, s in enumerate(SIGNALS)}
    lit = {s.name: s.literature for s in SIGNALS}
    headers = ["signal", "when", "healthy [min, max]", "faults outside the healthy range: [min, max]",
               "published rule"]
    rows = []
    for key in sorted(ranges, key=lambda k: (order.get(k.rsplit(".", 1)[0], 999), k)):
        entry = ranges[key]
        lo, hi = entry["healthy"]
        cells = []
        for name, sep in sorted(entry["separation"].items(), key=lambda kv: -kv[1]["score"]):
            f_lo, f_hi = entry["faults"][name]
            arrow = "^" if sep["direction"] == "above" else "v"
            cells.append(f"{name} {arrow} [{_fmt(f_lo)}, {_fmt(f_hi)}]")
        rows.append([key, entry["timing"], f"[{_fmt(lo)}, {_fmt(hi)}]{_count(entry['healthy_n'])}",
                     "; ".join(cells) or "-", lit.get(key.rsplit(".", 1)[0], "")])
    return headers, rows


# bookkeeping statistics that separate runs for reasons other than the fault (a run cut short sees fewer
# samples; a planted fault that drops rows changes the count)
_NOT_SIGNALS = ("tb.data.samples.", "test_acc.", "val_acc.")


def _describe(key: str, entry: Dict[str, Any], fault: Any) -> str:
    sep = entry["separation"][fault.name]
    h_lo, h_hi = entry["healthy"]
    f_lo, f_hi = entry["faults"][fault.name]
    op = ">" if sep["direction"] == "above" else "<"
    near_h, near_f = (h_hi, f_lo) if sep["direction"] == "above" else (h_lo, f_hi)
    text = (f"{key} {op} {_fmt(sep['threshold'])} (healthy {_fmt(near_h)} vs fault {_fmt(near_f)}, "
            f"margin {sep['margin']})")
    located = entry["located"].get(fault.name)
    if located:
        text += f", names the location {located[0]}/{located[1]}"
    return text


def recommendation_table(ranges: Dict[str, Dict[str, Any]], faults: Sequence[Any],
                         top: int = 2) -> Tuple[List[str], List[List[str]]]:
    """Per fault: the best-separating early/online signals (detectors) and the best outcome gate.

    A separation counts as a detector only when a rule reading the signal as it comes in could use it
    (:meth:`SignalSpec.rule_directions`): "the run's maximum stays below T" is a gate known at the end of
    the run, not a rule that fires.
    """
    headers = ["fault", "best early/online signals: rule (nearest healthy vs nearest faulty run, margin)",
               "best outcome gate"]
    rows = []
    for fault in faults:
        found = collections.defaultdict(list)
        for key, entry in ranges.items():
            sep = entry["separation"].get(fault.name)
            if sep is None or key.startswith(_NOT_SIGNALS):
                continue
            spec, _, how = _spec(key)
            directions = spec.rule_directions(how) if spec is not None else (
                ("above", "below") if how == "first" else ("above",) if how == "max" else ())
            timing = "detector" if sep["direction"] in directions else "outcome"
            # among equal scores prefer the signal that names the fault's layer, then the earlier one
            located = entry["located"].get(fault.name, [0, 1])
            score = round(sep["score"], 6)  # equal gaps compare equal (5/0.25 vs 3/0.15)
            found[timing].append((-score, -located[0] / max(located[1], 1), entry["timing"] != "early", key))
        cells = []
        for timing, limit in (("detector", top), ("outcome", 1)):
            chosen = sorted(found[timing])[:limit]
            cells.append("; ".join(_describe(k, ranges[k], fault) for *_, k in chosen) or "none")
        rows.append([fault.name] + cells)
    return headers, rows


# -------------------------------------------------------------------------------------------- main
def _seeds(text: str) -> List[int]:
    text = str(text).strip()
    if "," in text or "-" in text[1:]:
        out: List[int] = []
        for part in text.split(","):
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
        return out
    return list(range(int(text)))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", default="all", help=f"comma-separated fault names or 'all' ({', '.join(FAULTS)})")
    p.add_argument("--seeds", default="5", help="seeds per fault: a count N (0..N-1) or a list '0,3,5-7' (default 5)")
    p.add_argument("--healthy-seeds", default="20", help="healthy control seeds, same syntax (default 20; 0: none)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (2 on an otherwise idle 2-core machine)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)} (default all)")
    p.add_argument("--policy", default="default", help="lightwatch Hydra policy to compose (default 'default')")
    p.add_argument("--max-steps", type=int, default=None, help="override the runs' length (default: each recipe's)")
    p.add_argument("--severity", action="append", default=[], metavar="FAULT=VALUE",
                   help="run FAULT at another severity (repeatable)")
    p.add_argument("--doses", dest="doses_", action="append", default=[], metavar="FAULT=V1,V2,...",
                   help="dose-response: run FAULT at each of these severities (repeatable); adds a table of "
                        "recall and harm per dose, with the mildest dose caught and the mildest that harms")
    p.add_argument("--out", default=os.path.join(_ROOT, "outputs", "diagnosis"),
                   help="where results.json and runs/ go (default outputs/diagnosis, ignored by git)")
    p.add_argument("--keep-logs", action="store_true", help="keep each run's TensorBoard and alerts files")
    p.add_argument("--markdown", default=None, help="also write the tables as Markdown to this file")
    p.add_argument("--top", type=int, default=2, help="separating detector signals listed per fault (default 2)")
    p.add_argument("--tables-from", default=None, metavar="RESULTS_JSON",
                   help="print the tables from an earlier run's results.json instead of training")
    args = p.parse_args(argv)
    names = list(FAULTS) if args.faults == "all" else [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        p.error(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    args.doses = {}
    for item in args.doses_:
        name, sep, values = item.partition("=")
        try:
            doses = sorted({float(v) for v in values.split(",") if v.strip()})
        except ValueError:
            doses = []
        if not sep or name not in FAULTS or not doses:
            p.error(f"--doses expects FAULT=V1,V2,... with a known fault and numbers, got {item!r}")
        args.doses[name] = doses
    if args.doses and args.faults == "all":  # a dose-response run is about the faults it names
        names = list(args.doses)
    names += [n for n in args.doses if n not in names]
    args.fault_names = names
    args.seed_list = _seeds(args.seeds) if args.seeds not in ("0", "") else []
    args.healthy_list = _seeds(args.healthy_seeds) if args.healthy_seeds not in ("0", "") else []
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.mode_list if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {', '.join(bad)}; use {', '.join(MODES)}")
    args.severities = {}
    for item in args.severity:
        name, sep, value = item.partition("=")
        if not sep or name not in FAULTS:
            p.error(f"--severity expects FAULT=VALUE with a known fault, got {item!r}")
        args.severities[name] = float(value)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    return args


def _header(args: argparse.Namespace, n_faults: int, n_tasks: int) -> List[str]:
    import platform

    import torch

    lines = [f"# lightwatch diagnosis: {n_faults} fault(s) x {len(args.seed_list)} seed(s), "
             f"{len(args.healthy_list)} healthy seed(s), modes {', '.join(args.mode_list)}: {n_tasks} runs, "
             f"{args.jobs} job(s)",
             f"# {platform.platform()}, python {platform.python_version()}, torch {torch.__version__}, "
             f"pytorch_lightning {pl.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"]
    if "lightwatch" in args.mode_list:
        lines.append(f"# lightwatch callbacks: {policy_callbacks(args.policy)[1]}")
    if "early_stopping" in args.mode_list:
        lines.append("# early_stopping: EarlyStopping(monitor='train/loss', check_finite=True), patience 3, checked "
                     "at the end of each training epoch")
    if "spike_detection" in args.mode_list:
        lines.append("# spike_detection: " + (
            "SpikeDetection() (running mean of 10 losses, rtol 2, a non-finite loss is a spike)"
            if spike_detection_class() is not None else "SpikeDetection is not in this pytorch_lightning: skipped"))
    return lines


def run_suite(args: argparse.Namespace, faults: Sequence[Any]) -> Tuple[List[Dict[str, Any]], float]:
    """Train every (mode, fault, seed) run; progress goes to stderr, one line a run."""
    work_dir = tempfile.mkdtemp(prefix="lw-diagnosis-") if not args.keep_logs else os.path.join(args.out, "logs")
    tasks = []
    for mode in args.mode_list:
        tasks += [{"fault": "healthy", "seed": seed, "mode": mode} for seed in args.healthy_list]
        for f in faults:
            doses = args.doses.get(f.name)
            if doses:
                tasks += [{"fault": f.name, "seed": seed, "mode": mode, "severity": dose, "dose": True}
                          for dose in doses for seed in args.seed_list]
            else:
                tasks += [{"fault": f.name, "seed": seed, "mode": mode, "severity": args.severities.get(f.name)}
                          for seed in args.seed_list]
    for t in tasks:
        t.update(policy=args.policy, max_steps=args.max_steps, out_dir=args.out, work_dir=work_dir,
                 keep_logs=args.keep_logs)
    for line in _header(args, len(faults), len(tasks)):
        print(line, flush=True)
    start = time.perf_counter()
    records: List[Dict[str, Any]] = []

    def done(i: int, rec: Dict[str, Any]) -> None:
        records.append(rec)
        d = rec.get("detection") or {}
        if rec["fault"] == "healthy":
            what = f"{d.get('false_alarms')} false alarm(s)" if d.get("false_alarms") else "quiet"
        else:
            what = f"detected at step {d.get('step')} by {d.get('rule')}" if d.get("detected") else "not detected"
        err = f", error {rec['error']}" if rec.get("error") else ""
        print(f"[{i}/{len(tasks)}] {rec['mode']:10s} {rec['fault']:22s} seed {rec['seed']:<3d} {what}{err} "
              f"({rec.get('wall_s', 0):.1f} s)", file=sys.stderr, flush=True)

    try:
        if args.jobs == 1:
            for i, task in enumerate(tasks, 1):
                done(i, _safe_run(task))
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_safe_run, t) for t in tasks]
                for i, fut in enumerate(as_completed(futures), 1):
                    done(i, fut.result())
    finally:
        if not args.keep_logs:
            shutil.rmtree(work_dir, ignore_errors=True)
    records.sort(key=lambda r: (r["mode"], r["fault"], _num(r.get("severity")), r["seed"]))
    return records, time.perf_counter() - start


def report(records: List[Dict[str, Any]], faults: Sequence[Any], top: int = 2) -> Tuple[str, Dict[str, Any]]:
    """The four tables as Markdown, and the same data for results.json."""
    ok = [r for r in records if r.get("detection")]
    det_h, det_rows = detection_table(ok, faults)
    fa_h, fa_rows = false_alarm_table(ok)
    ranges = signal_ranges(ok, faults)
    sig_h, sig_rows = signal_table(ranges)
    rec_h, rec_rows = recommendation_table(ranges, faults, top)
    dose_h, dose_rows = dose_table(ok, faults)
    sections = [
        ("Detection per fault (lw: lightwatch's policy; recall = runs with a warning+ alert at or after the "
         "onset / runs; diagnosed = the alert's rule names the cause; steps = median optimizer steps from onset "
         "to the first warning+ alert)", _markdown(det_h, det_rows)),
        ("False alarms on healthy runs (alerts of severity warning or worse)", _markdown(fa_h, fa_rows)),
        ("Signal ranges: healthy vs each fault (^ above / v below every healthy run)", _markdown(sig_h, sig_rows)),
        ("Separating signals per fault (threshold halfway, geometric for log-scale signals)",
         _markdown(rec_h, rec_rows)),
    ]
    if dose_rows:
        sections.insert(1, ("Dose-response (lightwatch; the detection table above shows each fault's default dose)",
                            _markdown(dose_h, dose_rows)))
    text = "\n\n".join(f"## {title}\n\n{table}" for title, table in sections)
    tables = {"detection": [det_h] + det_rows, "false_alarms": [fa_h] + fa_rows, "signals": [sig_h] + sig_rows,
              "recommendations": [rec_h] + rec_rows, "doses": [dose_h] + dose_rows}
    return text, {"signal_ranges": ranges, "tables": tables}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    _quiet()
    import platform

    import torch

    if args.tables_from:
        with open(args.tables_from, encoding="utf-8") as fh:
            saved = json.load(fh)
        records, wall = saved["records"], float(saved.get("wall_s", 0.0))
        present = {r["fault"] for r in records}
        names = args.fault_names if args.faults != "all" else [n for n in FAULTS if n in present]
        faults = [FAULTS[n] for n in names]
        print(f"# tables recomputed from {args.tables_from} ({len(records)} runs)")
    else:
        faults = [FAULTS[n] for n in args.fault_names]
        os.makedirs(args.out, exist_ok=True)
        records, wall = run_suite(args, faults)
    failed = [r for r in records if r.get("detection") is None]
    text, tables = report(records, faults, args.top)
    print(text)
    print(f"\n# {len(records)} runs in {wall:.0f} s wall ({args.jobs} job(s)); "
          f"{len(failed)} run(s) failed to produce a record; raw records under {os.path.join(args.out, 'runs')}")
    for r in failed:
        print(f"# failed: {r['mode']} {r['fault']} seed {r['seed']}: {r.get('error')}")
    if not args.tables_from:
        summary = {
            "args": {k: v for k, v in vars(args).items() if k not in ("severity", "doses_")},
            "wall_s": wall,
            "versions": {"torch": torch.__version__, "pytorch_lightning": pl.__version__,
                         "python": platform.python_version(), "platform": platform.platform()},
            "records": records,
            **tables,
        }
        with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
            json.dump(_json_safe(summary), fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(text + f"\n\n{len(records)} runs in {wall:.0f} s wall with {args.jobs} job(s).\n")
    return 1 if failed else 0


def _safe_run(task: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`run_one`, turning a failure of the harness itself into a record that says what happened."""
    try:
        return run_one(task)
    except Exception as err:  # the harness reports the failure instead of losing the other runs
        return {"fault": task["fault"], "seed": task["seed"], "mode": task["mode"], "base": "?", "detection": None,
                "error": f"harness failure: {type(err).__name__}: {err}", "trace": traceback.format_exc(),
                "wall_s": 0.0}


if __name__ == "__main__":
    sys.exit(main())
