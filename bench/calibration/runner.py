"""Run the calibration corpus: one healthy run per (family, seed, mode), in spawned worker processes.

See the package docstring (``bench/calibration/__init__.py``) for what the corpus is for, and which runs
are for tuning and which are held out.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from . import torchvision_compat  # noqa: F401  (first: before anything imports torchvision)

MODES = ("default", "callbacks", "strict")
SEVERITIES = ("info", "warning", "error", "critical")
WARNING_PLUS = ("warning", "error", "critical")


# ------------------------------------------------------------------------------------------- quiet
def quiet() -> None:
    """One thread, and no per-run chatter: the tables are the output (alerts stay in alerts.jsonl)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch", "lightwatch",
                 "transformers", "timm"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


# ------------------------------------------------------------------------------------------ policy
_POLICY_CACHE: Dict[str, Any] = {}


def policy_callbacks(policy: str) -> List[Any]:
    """Fresh callbacks of lightwatch's Hydra policy ``policy``, composed as ``bench/diagnosis.py`` does
    (``lightwatch.conf`` + ``+monitor=<policy>``, then ``lightwatch.hydra.instantiate_monitors``). There
    is no fallback here: a policy that does not compose is an error of the run, and is reported."""
    from lightwatch.hydra import instantiate_monitors

    if policy not in _POLICY_CACHE:
        from hydra import compose, initialize_config_module
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        with initialize_config_module("lightwatch.conf", version_base="1.3"):
            _POLICY_CACHE[policy] = compose(overrides=[f"+monitor={policy}"])
    return list(instantiate_monitors(_POLICY_CACHE[policy].monitor))


def mode_callbacks(mode: str, run_dir: str) -> List[Any]:
    if mode in ("default", "strict"):
        return policy_callbacks(mode)
    if mode == "callbacks":
        from lightwatch.callbacks import (ActivationStatsMonitor, DataQualityMonitor, GradientStatsMonitor,
                                          MetricCheckpoint, MetricMonitor)

        return [GradientStatsMonitor(), ActivationStatsMonitor(), DataQualityMonitor(), MetricMonitor(),
                MetricCheckpoint(dirpath=os.path.join(run_dir, "ckpt"))]
    raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")


# ------------------------------------------------------------------------------------- loss record
def _make_recorder(loss_key: str) -> Any:
    import pytorch_lightning as pl
    import torch

    class LossRecorder(pl.Callback):
        """The training loss of every batch: the step's returned loss, else ``callback_metrics[loss_key]``
        (manual optimisation logs its losses instead of returning one)."""

        def __init__(self) -> None:
            self.losses: List[float] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if not isinstance(loss, torch.Tensor):
                loss = trainer.callback_metrics.get(loss_key)
            if isinstance(loss, torch.Tensor):
                self.losses.append(float(loss.detach()))

    return LossRecorder()


def _f(x: Optional[float]) -> Any:
    """JSON-safe number: non-finite floats as strings."""
    if x is None:
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    return x


def read_alerts(log_dir: Optional[str]) -> List[Dict[str, Any]]:
    if not log_dir:
        return []
    path = os.path.join(log_dir, "alerts.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


#: The readings lightwatch's diagnoses judge (``monitor.diag/...``), and which end of their range matters.
DIAG_TAGS = {
    "monitor.diag/update_ratio/first_step": "max",
    "monitor.diag/update_ratio/median": "max",
    "monitor.diag/update_ratio/all_layers": "max",
    "monitor.diag/grad_depth/ratio": "min",
    "monitor.diag/act_dead/max": "max",
    "monitor.diag/act_saturated/max": "max",
    "monitor.diag/act_growth/ratio": "max",
    "monitor.diag/loss_learning/ratio": "max",
    "monitor.diag/loss_learning/decline_z": "min",
    "monitor.diag/future_leak/ratio": "max",
}


def read_diag(run_dir: str) -> Dict[str, Dict[str, Any]]:
    """Per ``monitor.diag`` tag of the run's TensorBoard events: min, max, the first and the second reading."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: Dict[str, Dict[str, Any]] = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            if not name.startswith("events.out.tfevents"):
                continue
            acc = EventAccumulator(os.path.join(root, name), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                if tag in DIAG_TAGS:
                    points = sorted((e.step, float(e.value)) for e in acc.Scalars(tag))
                    values = [v for _, v in points if math.isfinite(v)]
                    if values:
                        found[tag] = dict(min=min(values), max=max(values), first=points[0],
                                          second=points[1] if len(points) > 1 else None)
    return found


def record_path(out: str, mode: str, family: str, seed: int) -> str:
    return os.path.join(out, "runs", mode, family, f"seed{seed}.json")


# -------------------------------------------------------------------------------------------- a run
def run_one(family: str, seed: int, mode: str, out: str, max_steps: Optional[int] = None,
            write: bool = True) -> Dict[str, Any]:
    """Train one run and return its record (also written to ``<out>/runs/<mode>/<family>/seed<k>.json``).
    A crash is caught and reported in the record (``error`` with the traceback's tail), never hidden."""
    quiet()
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Checkpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from .families import FAMILIES, is_held_out

    fam = FAMILIES[family]
    steps = int(max_steps or fam.default_steps)
    run_dir = os.path.abspath(os.path.join(out, "logs", mode, family, f"seed{seed}"))
    if os.path.isdir(run_dir):
        import shutil

        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    rec: Dict[str, Any] = dict(family=family, seed=seed, mode=mode, held_out=is_held_out(family, seed),
                               family_held_out=fam.held_out, max_steps=steps, run_dir=run_dir, error=None,
                               alerts=[], steps=0, batches=0, seconds=None, loss_first=None, loss_last=None,
                               loss_first_step=None, metric=None, metric_init=None, metric_final=None,
                               higher_is_better=None, finite=None, learned=None, healthy=None, stopped_early=None,
                               callbacks=None, notes="")
    t0 = time.perf_counter()
    trainer = None
    recorder = None
    try:
        pl.seed_everything(seed, workers=True, verbose=False)
        built = fam.build(seed, steps)
        rec.update(metric=built.metric, higher_is_better=built.higher_is_better, notes=built.notes)
        rec["metric_init"] = _f(float(built.evaluate(built.model)))
        callbacks = mode_callbacks(mode, run_dir)
        rec["callbacks"] = [type(c).__name__ for c in callbacks]
        recorder = _make_recorder(built.loss_key)
        kwargs = dict(built.trainer_kwargs)
        kwargs.update(
            logger=TensorBoardLogger(run_dir, name="", version=""),
            default_root_dir=run_dir,
            enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks + [recorder],
        )
        trainer = pl.Trainer(**kwargs)
        t_fit = time.perf_counter()
        trainer.fit(built.model, train_dataloaders=built.train, val_dataloaders=built.val)
        rec["fit_seconds"] = round(time.perf_counter() - t_fit, 2)
        rec["metric_final"] = _f(float(built.evaluate(built.model)))
    except BaseException as err:  # noqa: BLE001 - a crash is a result: reported, not hidden
        if isinstance(err, KeyboardInterrupt):
            raise
        rec["error"] = f"{type(err).__name__}: {err}"
        rec["traceback"] = traceback.format_exc()[-4000:]
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    if trainer is not None:
        rec["steps"] = int(trainer.global_step)
        rec["stopped_early"] = bool(trainer.global_step < steps)
        try:
            log_dir = trainer.log_dir
        except Exception:  # noqa: BLE001
            log_dir = None
        rec["alerts"] = read_alerts(log_dir or run_dir)
    else:
        rec["alerts"] = read_alerts(run_dir)
    losses = recorder.losses if recorder is not None else []
    rec["batches"] = len(losses)
    if losses:
        head, tail = losses[:5], losses[-10:]
        rec["loss_first_step"] = _f(losses[0])
        rec["loss_first"] = _f(sum(head) / len(head))
        rec["loss_last"] = _f(sum(tail) / len(tail))
        rec["finite"] = all(math.isfinite(v) for v in losses)
        rec["loss_curve"] = [_f(round(v, 5)) for v in losses[:: max(1, len(losses) // 50)]]
    rec["diag"] = read_diag(run_dir)
    rec["learned"] = _learned(fam, rec)
    rec["healthy"] = bool(rec["error"] is None and rec["finite"] and rec["learned"])
    if write:
        path = record_path(out, mode, family, seed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(rec, fh, indent=1, default=str)
    return rec


def _num(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) else None


def _learned(fam: Any, rec: Dict[str, Any]) -> Optional[bool]:
    """The family learned: its loss fell by ``min_drop`` (families that learn), and the validation metric
    moved the right way from its value at initialisation (all families)."""
    first, last = _num(rec["loss_first"]), _num(rec["loss_last"])
    m0, m1 = _num(rec["metric_init"]), _num(rec["metric_final"])
    if first is None or last is None or m0 is None or m1 is None:
        return False
    ok = True
    if fam.learns:
        ok = last <= (1 - fam.min_drop) * first
    ok = ok and ((m1 > m0) if rec["higher_is_better"] else (m1 < m0))
    return bool(ok)


# ------------------------------------------------------------------------------------------ workers
def _worker_init() -> None:
    quiet()


def _task(args: Tuple[str, int, str, str, Optional[int]]) -> Dict[str, Any]:
    family, seed, mode, out, max_steps = args
    return run_one(family, seed, mode, out, max_steps)


_COST = {"resnet_bn": 9, "vit_timm": 8, "convnext_timm": 6, "gpt2_hf": 5, "bert_hf": 5,
         "lightning_transformer": 5, "lightning_lstm": 4, "gan_manual": 3, "finetune": 3}


def run_corpus(families: Sequence[str], seeds: Sequence[int], modes: Sequence[str], out: str, jobs: int,
               max_steps: Optional[int], progress: bool = True) -> List[Dict[str, Any]]:
    tasks = [(f, s, m, out, max_steps) for m in modes for f in families for s in seeds]
    tasks.sort(key=lambda t: -_COST.get(t[0], 2))  # longest first: the pool ends together
    records: List[Dict[str, Any]] = []
    t0 = time.perf_counter()

    def note(rec: Dict[str, Any]) -> None:
        records.append(rec)
        if progress:
            warn = sum(a.get("severity") in WARNING_PLUS for a in rec["alerts"])
            state = "CRASH " + rec["error"][:80] if rec["error"] else ("ok" if rec["healthy"] else "UNHEALTHY")
            print(f"[{len(records):4d}/{len(tasks)} {time.perf_counter() - t0:7.1f}s] {rec['mode']:9s} "
                  f"{rec['family']:22s} seed{rec['seed']:<3d} {rec['seconds']:6.1f}s  warning+={warn:<3d} {state}",
                  file=sys.stderr, flush=True)

    if jobs <= 1:
        for t in tasks:
            note(_task(t))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # no max_tasks_per_child: with it, Python 3.11's pool hung here once both workers had been replaced
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            futures = {pool.submit(_task, t): t for t in tasks}
            for fut in as_completed(futures):
                try:
                    note(fut.result())
                except Exception as err:  # noqa: BLE001 - a dead worker is a crash of that run
                    f, s, m, _, ms = futures[fut]
                    note(dict(family=f, seed=s, mode=m, held_out=None, error=f"worker died: {err!r}", alerts=[],
                              seconds=None, healthy=False, steps=0, loss_first=None, loss_last=None,
                              metric=None, metric_init=None, metric_final=None))
    records.sort(key=lambda r: (MODES.index(r["mode"]) if r["mode"] in MODES else 9, r["family"], r["seed"]))
    return records


# ------------------------------------------------------------------------------------------- report
def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
            return f"{x:.2e}"
        return f"{x:.{nd}f}"
    return str(x)


def _median(vals: Iterable[Any]) -> Optional[float]:
    v = [float(x) for x in vals if isinstance(x, (int, float))]
    return statistics.median(v) if v else None


def _warn_alerts(rec: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [a for a in rec.get("alerts") or [] if a.get("severity") in WARNING_PLUS]


def summarise(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per mode: per-family rows, totals (tuning / held out), every warning+ alert, info alerts per rule."""
    from .families import FAMILIES

    out: Dict[str, Any] = {}
    for mode in sorted({r["mode"] for r in records}, key=lambda m: MODES.index(m) if m in MODES else 9):
        recs = [r for r in records if r["mode"] == mode]
        rows = []
        for fam in sorted({r["family"] for r in recs}):
            fr = [r for r in recs if r["family"] == fam]
            rules: Dict[str, Dict[str, Any]] = {}
            for r in fr:
                for a in _warn_alerts(r):
                    d = rules.setdefault(a["rule"], {"alerts": 0, "runs": set(), "example": None})
                    d["alerts"] += 1
                    d["runs"].add(r["seed"])
                    if d["example"] is None:
                        d["example"] = {"seed": r["seed"], "step": a.get("step"), "subject": a.get("subject"),
                                        "value": a.get("value"), "threshold": a.get("threshold"),
                                        "severity": a.get("severity")}
            fam_obj = FAMILIES.get(fam)
            rows.append(dict(
                family=fam,
                held_out="yes" if (fam_obj and fam_obj.held_out) else "seeds>=5",
                runs=len(fr),
                seeds=sorted(r["seed"] for r in fr),
                crashed=sum(1 for r in fr if r.get("error")),
                unhealthy=sum(1 for r in fr if not r.get("healthy")),
                stopped_early=sum(1 for r in fr if r.get("stopped_early")),
                runs_warning_plus=sum(1 for r in fr if _warn_alerts(r)),
                rules={k: {"alerts": v["alerts"], "runs": len(v["runs"]), "example": v["example"]}
                       for k, v in sorted(rules.items())},
                loss_first=_median(r.get("loss_first") for r in fr),
                loss_last=_median(r.get("loss_last") for r in fr),
                metric=next((r.get("metric") for r in fr if r.get("metric")), None),
                metric_init=_median(r.get("metric_init") for r in fr),
                metric_final=_median(r.get("metric_final") for r in fr),
                seconds=_median(r.get("seconds") for r in fr),
                diag={tag: dict(min=min(v[tag]["min"] for v in diags), max=max(v[tag]["max"] for v in diags),
                                runs=len(diags))
                      for tag in DIAG_TAGS
                      for diags in [[r["diag"] for r in fr if tag in (r.get("diag") or {})]] if diags},
            ))
        totals = {}
        for split, pick in (("tuning", lambda r: r.get("held_out") is False),
                            ("held_out", lambda r: r.get("held_out") is True), ("all", lambda r: True)):
            sr = [r for r in recs if pick(r)]
            totals[split] = dict(runs=len(sr), healthy=sum(1 for r in sr if r.get("healthy")),
                                 crashed=sum(1 for r in sr if r.get("error")),
                                 runs_warning_plus=sum(1 for r in sr if _warn_alerts(r)),
                                 warning_plus_alerts=sum(len(_warn_alerts(r)) for r in sr),
                                 families=len({r["family"] for r in sr}))
        warn_list = []
        for r in recs:
            for a in _warn_alerts(r):
                warn_list.append(dict(family=r["family"], seed=r["seed"], held_out=r.get("held_out"),
                                      step=a.get("step"), rule=a.get("rule"), severity=a.get("severity"),
                                      source=a.get("source"), subject=a.get("subject"), value=a.get("value"),
                                      threshold=a.get("threshold"), action=a.get("action"),
                                      message=a.get("message")))
        info: Dict[str, Dict[str, Any]] = {}
        for r in recs:
            for a in r.get("alerts") or []:
                if a.get("severity") == "info":
                    d = info.setdefault(a["rule"], {"alerts": 0, "runs": 0, "families": Counter(), "example": None})
                    d["alerts"] += 1
                    d["families"][r["family"]] += 1
                    if d["example"] is None:
                        d["example"] = dict(family=r["family"], seed=r["seed"], step=a.get("step"),
                                            subject=a.get("subject"), value=a.get("value"),
                                            threshold=a.get("threshold"), message=a.get("message"))
            for rule in {a["rule"] for a in r.get("alerts") or [] if a.get("severity") == "info"}:
                info[rule]["runs"] += 1
        for d in info.values():
            d["families"] = dict(d["families"])
        crashes = [dict(family=r["family"], seed=r["seed"], error=r["error"]) for r in recs if r.get("error")]
        unhealthy = [dict(family=r["family"], seed=r["seed"], loss_first=r.get("loss_first"),
                          loss_last=r.get("loss_last"), metric=r.get("metric"), metric_init=r.get("metric_init"),
                          metric_final=r.get("metric_final"), error=r.get("error"))
                     for r in recs if not r.get("healthy")]
        out[mode] = dict(families=rows, totals=totals, warning_plus=warn_list, info=info, crashes=crashes,
                         unhealthy=unhealthy)
    return out


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append(" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _msg(m: Any, n: int = 150) -> str:
    s = " ".join(str(m or "").split())
    return s if len(s) <= n else s[: n - 3] + "..."


def format_report(summary: Dict[str, Any], show_info: bool = False) -> str:
    parts: List[str] = []
    for mode, s in summary.items():
        parts.append(f"\n=== mode {mode} ===")
        rows = [["family", "held_out", "runs", "warn+ runs", "rules that fired (alerts/runs, example seed step "
                 "subject=value thr)", "loss first->last", "val metric init->final", "s/run"]]
        for r in s["families"]:
            fired = "; ".join(
                f"{k} {v['alerts']}/{v['runs']} (s{v['example']['seed']} @{v['example']['step']} "
                f"{v['example']['subject']}={_fmt(v['example']['value'])} thr {_fmt(v['example']['threshold'])})"
                for k, v in r["rules"].items()) or "-"
            extra = ""
            if r["crashed"]:
                extra += f" CRASHED {r['crashed']}"
            if r["unhealthy"]:
                extra += f" unhealthy {r['unhealthy']}"
            if r["stopped_early"]:
                extra += f" stopped {r['stopped_early']}"
            rows.append([r["family"], r["held_out"], f"{r['runs']}{extra}", str(r["runs_warning_plus"]), fired,
                         f"{_fmt(r['loss_first'])}->{_fmt(r['loss_last'])}",
                         f"{r['metric']} {_fmt(r['metric_init'])}->{_fmt(r['metric_final'])}",
                         _fmt(r["seconds"], 1)])
        parts.append(_table(rows))
        t = s["totals"]
        parts.append("totals: " + "; ".join(
            f"{k}: {v['runs']} runs over {v['families']} families, {v['healthy']} healthy, {v['crashed']} crashed, "
            f"{v['runs_warning_plus']} with warning+ ({v['warning_plus_alerts']} alerts)"
            for k, v in t.items()))
        if s["crashes"]:
            parts.append("crashes:")
            parts += [f"  {c['family']} seed{c['seed']}: {c['error']}" for c in s["crashes"]]
        bad = [u for u in s["unhealthy"] if not u.get("error")]
        if bad:
            parts.append("did not learn (not healthy):")
            parts += [f"  {u['family']} seed{u['seed']}: loss {_fmt(u['loss_first'])}->{_fmt(u['loss_last'])}, "
                      f"{u['metric']} {_fmt(u['metric_init'])}->{_fmt(u['metric_final'])}" for u in bad]
        wl = s["warning_plus"]
        parts.append(f"warning+ alerts ({len(wl)}):")
        if wl:
            rows = [["rule", "severity", "family", "seed", "held", "step", "subject", "value", "threshold", "message"]]
            for a in sorted(wl, key=lambda a: (a["rule"], a["family"], a["seed"], a["step"] or 0)):
                rows.append([str(a["rule"]), str(a["severity"]), a["family"], str(a["seed"]),
                             "H" if a["held_out"] else "T", str(a["step"]), str(a["subject"]), _fmt(a["value"]),
                             _fmt(a["threshold"]), _msg(a["message"])])
            parts.append(_table(rows))
        parts.append("healthy range of each diagnosis reading (monitor.diag), min..max over the family's runs:")
        rows = [["family"] + [t.split("/", 1)[1] for t in DIAG_TAGS]]
        for r in s["families"]:
            d = r.get("diag") or {}
            rows.append([r["family"]] + [f"{_fmt(d[t]['min'])}..{_fmt(d[t]['max'])}" if t in d else "-"
                                         for t in DIAG_TAGS])
        parts.append(_table(rows))
        if show_info:
            parts.append(f"info alerts per rule ({sum(d['alerts'] for d in s['info'].values())}):")
            for rule, d in sorted(s["info"].items(), key=lambda kv: -kv[1]["alerts"]):
                ex = d["example"]
                fams = ", ".join(f"{k} {v}" for k, v in sorted(d["families"].items()))
                parts.append(f"  {rule}: {d['alerts']} alerts in {d['runs']} runs ({fams}); e.g. {ex['family']} "
                             f"seed{ex['seed']} @{ex['step']} {ex['subject']}={_fmt(ex['value'])} "
                             f"thr {_fmt(ex['threshold'])}: {_msg(ex['message'], 120)}")
    return "\n".join(parts)


def write_markdown(path: str, summary: Dict[str, Any]) -> None:
    """The per-family table of every mode, the totals, and the healthy ranges of the diagnosis readings."""
    modes = list(summary)
    first = summary[modes[0]]["families"]
    lines = ["| family | held out | loss first->last | val metric init->final | "
             + " | ".join(f"{m}: runs with warning+" for m in modes) + " |",
             "|" + "---|" * (4 + len(modes))]
    for i, r in enumerate(first):
        cells = [r["family"], r["held_out"], f"{_fmt(r['loss_first'])}->{_fmt(r['loss_last'])}",
                 f"{r['metric']} {_fmt(r['metric_init'])}->{_fmt(r['metric_final'])}"]
        for m in modes:
            row = next((x for x in summary[m]["families"] if x["family"] == r["family"]), None)
            fired = "; ".join(f"{k} {v['runs']}" for k, v in row["rules"].items()) if row else ""
            cells.append(f"{row['runs_warning_plus']}/{row['runs']}" + (f" ({fired})" if fired else "") if row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| mode | tuning runs with warning+ | held-out runs with warning+ | all |", "|---|---|---|---|"]
    for m in modes:
        t = summary[m]["totals"]
        lines.append(f"| {m} | " + " | ".join(f"{t[k]['runs_warning_plus']} of {t[k]['runs']}"
                                            for k in ("tuning", "held_out", "all")) + " |")
    lines += ["", "| family | " + " | ".join(t.split("/", 1)[1] for t in DIAG_TAGS) + " |",
              "|" + "---|" * (1 + len(DIAG_TAGS))]
    for r in summary[modes[0]]["families"]:
        d = r.get("diag") or {}
        lines.append("| " + " | ".join([r["family"]] + [f"{_fmt(d[t]['min'])}..{_fmt(d[t]['max'])}" if t in d
                                                        else "-" for t in DIAG_TAGS]) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- cli
def parse_seeds(text: str) -> List[int]:
    seeds: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            seeds += list(range(int(a), int(b) + 1))
        else:
            seeds.append(int(part))
    return sorted(dict.fromkeys(seeds))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .families import FAMILIES

    ap = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="all", help="comma-separated family names, or 'all' (the available ones)")
    ap.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,1,5-7")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    ap.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run (default: the family's)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (spawned, one thread each)")
    ap.add_argument("--out", default=os.path.join("outputs", "calibration"))
    ap.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    ap.add_argument("--info", action="store_true", help="also list info alerts per rule with counts")
    ap.add_argument("--list", action="store_true", help="list the families and exit")
    ap.add_argument("--markdown", default=None, help="also write the tables as Markdown to this file")
    ap.add_argument("--tables-from", default=None, help="re-tabulate an earlier results.json (no training)")
    args = ap.parse_args(argv)
    quiet()

    if args.list:
        for name, f in FAMILIES.items():
            ok, missing = f.available()
            print(f"{name:22s} held_out={'yes' if f.held_out else 'seeds>=5'} steps={f.default_steps} "
                  f"{'' if ok else '(missing: ' + missing + ') '}{f.description}")
        return 0
    if args.tables_from:
        with open(args.tables_from, encoding="utf-8") as fh:
            earlier = json.load(fh)
        summary = summarise(earlier["runs"])
        print(format_report(summary, show_info=args.info))
        if args.markdown:
            write_markdown(args.markdown, summary)
        return 0
    if args.families == "all":
        families = [n for n, f in FAMILIES.items() if f.available()[0]]
        skipped = [f"{n} (missing {f.available()[1]})" for n, f in FAMILIES.items() if not f.available()[0]]
        if skipped:
            print("skipped, packages missing: " + ", ".join(skipped), file=sys.stderr)
    else:
        families = [s.strip() for s in args.families.split(",") if s.strip()]
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            ap.error(f"unknown families: {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown modes: {', '.join(bad)}")
    seeds = parse_seeds(args.seeds)
    print(f"torchvision: {torchvision_compat.STATUS}; {len(families)} families x {len(seeds)} seeds x "
          f"{len(modes)} modes = {len(families) * len(seeds) * len(modes)} runs, --jobs {args.jobs}", file=sys.stderr)
    t0 = time.perf_counter()
    records = run_corpus(families, seeds, modes, args.out, args.jobs, args.max_steps)
    wall = time.perf_counter() - t0
    summary = summarise(records)
    result = dict(command=" ".join(sys.argv), wall_seconds=round(wall, 1), families=families, seeds=seeds,
                  modes=modes, max_steps=args.max_steps, torchvision=torchvision_compat.STATUS,
                  summary=summary, runs=[{k: v for k, v in r.items() if k not in ("loss_curve", "traceback")}
                                         for r in records])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1, default=str)
    if args.json:
        print(json.dumps(dict(wall_seconds=result["wall_seconds"], summary=summary), indent=1, default=str))
    else:
        print(format_report(summary, show_info=args.info))
        if args.markdown:
            write_markdown(args.markdown, summary)
        print(f"\n{len(records)} runs in {wall:.0f} s; records in {os.path.join(args.out, 'runs')}, "
              f"summary in {os.path.join(args.out, 'results.json')}")
    return 0
