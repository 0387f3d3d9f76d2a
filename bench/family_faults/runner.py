"""Train one (family, fault, seed) run under lightwatch's default policy and score what it raised."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
import traceback
import warnings
from typing import Any, Dict, List, Optional, Sequence

SEVERITY_ORDER = ("info", "warning", "error", "critical")


def quiet() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch", "lightwatch",
                 "transformers"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass


# the same Hydra policy build and alerts.jsonl reader as the calibration corpus
from bench.calibration.runner import policy_callbacks, read_alerts  # noqa: E402,F401
from bench.tables import json_safe, num  # noqa: E402,F401


def at_least(severity: str, minimum: str) -> bool:
    return SEVERITY_ORDER.index(severity) >= SEVERITY_ORDER.index(minimum)


def detection(alerts: List[Dict[str, Any]], onset: int, kind: str, names_cause: Any, location: Any,
              healthy: bool) -> Dict[str, Any]:
    """As ``bench/diagnosis.py`` scores lightwatch: warning+ at/after onset (a data fault's alert before
    the onset counts when its rule names the cause), the first such alert, diagnosis by rule name."""
    ordered = [a for _, a in sorted(enumerate(alerts), key=lambda ia: (int(ia[1].get("step", 0)), ia[0]))]

    def counts(a: Dict[str, Any]) -> bool:
        return healthy or a["step"] >= onset or (kind == "data" and names_cause(a["source"], a["rule"]))

    warn = [a for a in ordered if at_least(a["severity"], "warning")]
    after = [a for a in warn if counts(a)]
    any_after = [a for a in ordered if counts(a)]
    right = [a for a in any_after if names_cause(a["source"], a["rule"])]
    right_warn = [a for a in right if at_least(a["severity"], "warning")]
    first = after[0] if after else None
    named = right_warn[0] if right_warn else first
    first_any = any_after[0] if any_after else None
    return {
        "detected": first is not None,
        "detected_info": bool(any_after),
        "diagnosed": bool(right_warn),
        "diagnosed_info": bool(right) and not right_warn,
        "step": first["step"] if first else None,
        "delay": first["step"] - onset if first else None,
        "diagnosis_delay": right_warn[0]["step"] - onset if right_warn else None,
        "rule": f"{first['source']}:{first['rule']}" if first else None,
        "severity": first["severity"] if first else None,
        "rule_info": f"{first_any['source']}:{first_any['rule']}" if first_any else None,
        "diagnosis_rule": f"{right_warn[0]['source']}:{right_warn[0]['rule']}" if right_warn else None,
        "subject": named.get("subject") if named else None,
        "location_ok": location.matches(named.get("subject")) if named else None,
        "rules_warning": sorted({f"{a['source']}:{a['rule']}" for a in warn}),
        "rules_info": sorted({f"{a['source']}:{a['rule']}" for a in ordered if a["severity"] == "info"}),
        "warning_alerts": len(warn),
    }


def _mean(values: Sequence[Any]) -> float:
    vals = [num(v) for v in values]
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _median_f(values: List[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return statistics.median(vals) if vals else float("nan")


def derived_signals(obs: Dict[str, Any]) -> Dict[str, float]:
    """Per-run aggregates of the probe's measurements (what a rule could read)."""
    losses = obs.get("losses") or []
    out: Dict[str, float] = {}
    finite = [num(v) for v in losses]
    out["nonfinite_loss_share"] = (sum(1 for v in finite if not math.isfinite(v)) / len(finite)) if finite else float("nan")
    l0 = _mean(losses[:5])
    out["loss_first5"] = l0
    for a, b in ((20, 30), (45, 55), (95, 105)):
        if len(losses) >= b:
            out[f"loss_{a}_{b}_over_first"] = _mean(losses[a:b]) / l0 if l0 else float("nan")
    out["loss_last10_over_first"] = _mean(losses[-10:]) / l0 if l0 and losses else float("nan")
    g = [num(v) for v in obs.get("grad_norms") or []]
    gf = [v for v in g if math.isfinite(v)]
    if gf:
        out["grad_norm_first"] = gf[0]
        out["grad_norm_max"] = max(gf)
        out["grad_norm_max_over_median"] = max(gf) / max(statistics.median(gf), 1e-30)
    out["grad_nonfinite_share"] = (sum(1 for v in g if not math.isfinite(v)) / len(g)) if g else float("nan")
    ur = obs.get("update_ratios") or []
    if ur:
        worst = [num(u[1]) for u in ur]
        total = [num(u[2]) for u in ur]
        out["update_ratio_worst_step0"] = worst[0]
        out["update_ratio_worst_step10"] = worst[1] if len(worst) > 1 else float("nan")
        out["update_ratio_worst_median"] = _median_f(worst)
        out["update_ratio_all_median"] = _median_f(total)
        out["update_ratio_all_max"] = max((v for v in total if math.isfinite(v)), default=float("nan"))
    for key in ("pad_label_not_ignored_share", "bn_eval_at_backward", "causal_leak", "attn_logit_std_start",
                "attn_logit_absmax_start", "attn_entropy_rel_start", "attn_logit_std_end", "attn_entropy_rel_end",
                "trainable_not_in_optimizer", "frozen_tensors"):
        v = obs.get(key)
        if v is not None:
            out[key] = num(v)
    return out


def run_one(task: Dict[str, Any]) -> Dict[str, Any]:
    """Train one (family, fault, seed) run; its raw record goes to ``<out>/runs/<family>/<fault>/seed<k>.json``."""
    quiet()
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from .cases import FAULTS, build_case
    from .probe import FaultProbe

    family, fault, seed = task["family"], task["fault"], int(task["seed"])
    start = time.perf_counter()
    run_dir = os.path.join(task["work_dir"], family, fault, f"seed{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir, exist_ok=True)
    record: Dict[str, Any] = {"family": family, "fault": fault, "seed": seed, "kind": FAULTS[fault].kind,
                              "error": None, "alerts": [], "detection": None}
    case = build_case(family, fault, seed, task.get("max_steps"))
    record.update(planted=case.planted, location=case.location.describe(), metric=case.built.metric,
                  higher_is_better=case.built.higher_is_better, diagnoses=list(case.diagnoses))
    record["metric_init"] = case.evaluate()
    monitors = policy_callbacks(task.get("policy", "default"))
    probe = FaultProbe(case.built.loss_key)
    kwargs = dict(case.built.trainer_kwargs)
    kwargs.update(logger=TensorBoardLogger(run_dir, name="tb", version=0), default_root_dir=run_dir,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[probe, *monitors])
    record["max_steps"] = kwargs.get("max_steps")
    record["callbacks"] = [type(c).__name__ for c in monitors]
    trainer = pl.Trainer(**kwargs)
    try:
        trainer.fit(case.built.model, train_dataloaders=case.built.train, val_dataloaders=case.built.val)
    except Exception as err:  # a raise action or a crash: recorded, the evaluation goes on
        record["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    record["steps_done"] = int(trainer.global_step)
    try:
        log_dir = trainer.log_dir
    except Exception:  # noqa: BLE001
        log_dir = None
    alerts = read_alerts(log_dir) or read_alerts(run_dir)
    try:
        record["metric_final"] = case.evaluate()
    except Exception as err:  # noqa: BLE001
        record["metric_final"] = float("nan")
        record["error"] = record["error"] or f"evaluate: {type(err).__name__}: {err}"
    if case.evaluate_clean is not None:
        record["metric_final_as_trained"] = float(case.built.evaluate(case.built.model))
    obs = probe.summary()
    onset = case.onset
    if onset is None:
        onset = obs["first_nonfinite_input_step"]
        onset = int(record["max_steps"]) if onset is None else int(onset)
    record["onset"] = int(onset)
    record["signals"] = derived_signals(obs)
    record["alerts"] = alerts
    record["detection"] = detection(alerts, record["onset"], case.kind, case.names_cause, case.location,
                                    fault == "healthy")
    record["wall_s"] = round(time.perf_counter() - start, 2)
    raw_path = os.path.join(task["out_dir"], "runs", family, fault, f"seed{seed}.json")
    os.makedirs(os.path.dirname(raw_path), exist_ok=True)
    with open(raw_path, "w", encoding="utf-8") as fh:
        json.dump(json_safe({**record, "raw": {"probe": obs}}), fh)
    record["raw_path"] = os.path.relpath(raw_path, task["out_dir"])
    if not task.get("keep_logs"):
        shutil.rmtree(run_dir, ignore_errors=True)
    return json_safe(record)


def safe_run(task: Dict[str, Any]) -> Dict[str, Any]:
    try:
        return run_one(task)
    except Exception as err:  # noqa: BLE001 - the harness reports the failure instead of losing the other runs
        return {"family": task["family"], "fault": task["fault"], "seed": task["seed"], "detection": None,
                "error": f"harness failure: {type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:],
                "wall_s": 0.0}


def new_work_dir() -> str:
    return tempfile.mkdtemp(prefix="lw-family-faults-")
