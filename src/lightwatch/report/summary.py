"""What a run's logs say, as plain data: the verdict, the alerts by rule, the worst layers, the data, checkpoints.

:func:`summarize` turns a :class:`~lightwatch.report.reader.RunLog` into the JSON-safe dictionary that
``lightwatch report --json`` prints (one per run, schema in ``docs/report.md``) and that the terminal and
HTML renderings read. Numbers that are not finite become ``null``.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lightwatch.report.reader import RunLog

__all__ = ["SCHEMA_VERSION", "SEVERITIES", "summarize", "severity_rank", "curve_tags", "layer_rows",
           "profile_drift"]

#: version of the ``--json`` schema; bumped when a key changes meaning or goes away (new keys do not bump it)
SCHEMA_VERSION = 1
SEVERITIES = ("info", "warning", "error", "critical")
_LAYER_STATS = {"grad": ("norm", "nonfinite"), "param": ("update_ratio",), "act": ("dead_frac", "saturation",
                                                                                  "nonfinite")}


def severity_rank(severity: str) -> int:
    """``info`` 0 ... ``critical`` 3; an unknown severity counts as ``warning``.

    Example:
        >>> severity_rank("error") > severity_rank("warning")
        True
    """
    return SEVERITIES.index(severity) if severity in SEVERITIES else 1


def _num(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _alert_brief(a: Dict[str, Any]) -> Dict[str, Any]:
    return {"step": a["step"], "epoch": a.get("epoch"), "rule": a["rule"], "severity": a["severity"],
            "source": a.get("source"), "subject": a.get("subject"), "value": _num(a.get("value")),
            "message": a.get("message", "")}


def _alert_groups(alerts: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    groups: Dict[str, Dict[str, Any]] = {}
    for a in alerts:
        g = groups.get(a["rule"])
        if g is None:
            g = groups[a["rule"]] = {"rule": a["rule"], "source": a.get("source"), "severity": a["severity"],
                                     "count": 0, "first_step": a["step"], "last_step": a["step"], "subjects": [],
                                     "actions": [], "message": a.get("message", "")}
        g["count"] += 1
        g["first_step"] = min(g["first_step"], a["step"])
        g["last_step"] = max(g["last_step"], a["step"])
        if severity_rank(a["severity"]) > severity_rank(g["severity"]):
            g["severity"] = a["severity"]
        if a.get("subject") is not None and a["subject"] not in g["subjects"]:
            g["subjects"].append(a["subject"])
        if a.get("action") and a["action"] not in g["actions"]:
            g["actions"].append(a["action"])
    return sorted(groups.values(), key=lambda g: (-severity_rank(g["severity"]), g["first_step"]))  # stable: file order


def _verdict(alerts: Sequence[Dict[str, Any]], problems: Sequence[str]) -> Dict[str, Any]:
    problems_first = sorted((a for a in alerts if severity_rank(a["severity"]) >= 1),
                            key=lambda a: (a["step"], -severity_rank(a["severity"])))
    worst = max((severity_rank(a["severity"]) for a in alerts), default=0)
    status = "errors" if worst >= 2 else "warnings" if worst == 1 else "healthy"
    first = _alert_brief(problems_first[0]) if problems_first else None
    if first is None:
        text = "healthy: no alert at warning or above" + (
            f" ({len(alerts)} info alert(s))" if alerts else "")
    else:
        where = f" on {first['subject']}" if first["subject"] else ""
        text = f"{status}: first problem at step {first['step']}: {first['rule']} ({first['severity']}){where}"
    return {"status": status, "worst_severity": SEVERITIES[worst] if alerts else None, "first_problem": first,
            "text": text, "complete": not problems}


def curve_tags(run: RunLog, prefix: str = "monitor") -> List[str]:
    """The user's own curves (everything not written by lightwatch, and not ``epoch``)."""
    return sorted(t for t in run.scalars if not t.startswith(prefix + ".") and t not in ("epoch", "hp_metric"))


def _curves(run: RunLog, prefix: str) -> List[Dict[str, Any]]:
    out = []
    for tag in curve_tags(run, prefix):
        points = [(s, v) for s, v in run.series(tag) if math.isfinite(v)]
        everything = run.series(tag)
        if not everything:
            continue
        lower_is_better = not re.search(r"acc|f1|auc|precision|recall|iou|score|map\b", tag, re.I)
        best = (min if lower_is_better else max)(points, key=lambda p: p[1]) if points else None
        out.append({"tag": tag, "points": len(everything), "last_step": everything[-1][0],
                    "last": _num(everything[-1][1]), "mode": "min" if lower_is_better else "max",
                    "best": None if best is None else best[1], "best_step": None if best is None else best[0],
                    "nonfinite_points": len(everything) - len(points)})
    return out


def layer_rows(run: RunLog, prefix: str = "monitor") -> Dict[str, Dict[str, Any]]:
    """Per layer subject: the range of its gradient norm, update ratio, dead/saturated fraction, non-finite counts.

    Example:
        >>> from lightwatch.report.reader import RunLog
        >>> run = RunLog("r", scalars={"monitor.grad/fc.weight/norm": [(4, 0.5), (9, 2.0)]})
        >>> layer_rows(run)["fc.weight"]["grad_norm"]
        {'min': 0.5, 'max': 2.0, 'last': 2.0}
    """
    rows: Dict[str, Dict[str, Any]] = {}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(grad|param|act)/(.+)/([^/]+)$")
    for tag, points in run.scalars.items():
        m = pattern.match(tag)
        if not m or m.group(2) == "_total" or m.group(3) not in _LAYER_STATS[m.group(1)]:
            continue
        family, subject, stat = m.groups()
        row = rows.setdefault(subject, {"subject": subject})
        values = [v for _, v in points]
        finite = [v for v in values if math.isfinite(v)]
        if stat == "nonfinite":
            bad = [s for s, v in points if not math.isfinite(v) or v > 0]
            row["nonfinite_steps"] = row.get("nonfinite_steps", 0) + len(bad)
            if bad:
                row["first_nonfinite_step"] = min(bad + [row.get("first_nonfinite_step", bad[0])])
            continue
        key = {"norm": "grad_norm"}.get(stat, stat)
        row[key] = {"min": min(finite) if finite else None, "max": max(finite) if finite else None,
                    "last": _num(values[-1]) if values else None}
        if len(finite) < len(values):  # a NaN norm is as telling as a NaN count
            row["nonfinite_steps"] = row.get("nonfinite_steps", 0) + len(values) - len(finite)
            first = min(s for s, v in points if not math.isfinite(v))
            row["first_nonfinite_step"] = min(first, row.get("first_nonfinite_step", first))
    return rows


def _badness(row: Dict[str, Any]) -> Tuple[float, ...]:
    """Sort key, worst first: non-finite values (earliest first), dead or saturated units, extreme update
    ratios (far from the customary 1e-3), then the widest range of gradient norms."""
    first_nonfinite = row.get("first_nonfinite_step")
    dead = max((row.get(k) or {}).get("max") or 0.0 for k in ("dead_frac", "saturation"))
    ratio = (row.get("update_ratio") or {}).get("max")
    ratio_off = abs(math.log10(ratio / 1e-3)) if ratio and ratio > 0 else 0.0
    grad = row.get("grad_norm") or {}
    spread = math.log10(grad["max"] / grad["min"]) if grad.get("min") and grad.get("max") else 0.0
    named = 0.0 if row.get("alerts") else 1.0
    return (0.0 if first_nonfinite is not None else 1.0, float(first_nonfinite or 0), named, -dead, -ratio_off,
            -spread)


def _layers(run: RunLog, prefix: str, limit: int) -> Dict[str, Any]:
    rows: Any = layer_rows(run, prefix)
    for a in run.alerts:  # a layer an alert names is worse than its neighbours with the same numbers
        if a.get("subject") in rows:
            rows[a["subject"]].setdefault("alerts", []).append(a["rule"])
    shown = ("grad_norm", "update_ratio", "dead_frac", "saturation", "nonfinite_steps")
    rows = sorted((r for r in rows.values() if any(r.get(k) for k in shown)),
                  key=lambda r: (_badness(r), r["subject"]))
    total = {k: v for k, v in (("grad_norm", run.series(f"{prefix}.grad/_total/norm")),
                               ("update_ratio_median", run.series(f"{prefix}.diag/update_ratio/median")))}
    overall = {}
    for key, points in total.items():
        finite = [v for _, v in points if math.isfinite(v)]
        overall[key] = {"min": min(finite) if finite else None, "max": max(finite) if finite else None,
                        "points": len(points), "nonfinite_points": len(points) - len(finite)}
    return {"count": len(rows), "worst": rows[:limit], "global": overall}


def profile_drift(profile: Any, reference: Any = None, split: str = "val",
                  ref_split: str = "train") -> List[Dict[str, Any]]:
    """Per field of ``split``: PSI and binned KS per feature against ``ref_split`` (of ``reference``, else the
    same profile), with the thresholds of the ``drift`` data check; fields whose bin edges differ are rebinned.
    """
    from lightwatch.report.drift import field_drift

    if profile is None or split not in profile.splits:
        return []
    other = reference if reference is not None else profile
    ref = other.splits.get(ref_split)
    cur = profile.splits[split]
    if ref is None or (reference is None and split == ref_split):
        return []
    out = []
    for name, f in sorted(cur.fields.items()):
        if name in ref.fields:
            result = field_drift(f, ref.fields[name], cur.samples, ref.samples)
            if result is not None:
                out.append(result)
    return out


def _data(run: RunLog, prefix: str) -> Dict[str, Any]:
    data_alerts = [a for a in run.alerts if a["rule"].startswith("data_") or a.get("source") == "DataQualityMonitor"]
    found = {"alerts": [_alert_brief(a) for a in data_alerts], "profile": None, "splits": {}, "drift": [],
             "drift_scalars": {}}
    pattern = re.compile(rf"^{re.escape(prefix)}\.data/([^/]+)/(.+)/(psi|ks|psi_ref|ks_ref)$")
    for tag, points in run.scalars.items():
        m = pattern.match(tag)
        if m and points:
            found["drift_scalars"].setdefault(f"{m.group(1)}/{m.group(3)}", {})[m.group(2)] = _num(points[-1][1])
    p = run.profile
    if p is None:
        return found
    found["profile"] = {"created": p.created, "producer": p.producer, "splits": sorted(p.splits)}
    for name, split in sorted(p.splits.items()):
        found["splits"][name] = {
            "samples": split.samples, "epoch": split.epoch, "step": split.step,
            "fields": {fname: {"role": f.role, "kind": f.kind, "dtype": f.dtype, "shape": f.shape,
                               "num_features": f.num_features, "num_classes": f.num_classes}
                       for fname, f in sorted(split.fields.items())},
            "duplicate_fraction": _num((split.duplicates or {}).get("duplicate_fraction")),
            "leak_fraction": _num((split.leakage or {}).get("fraction")),
        }
    for split in sorted(p.splits):
        if split != "train":
            for row in profile_drift(p, None, split, "train"):
                found["drift"].append(dict(row, split=split, against="train"))
    return found


def _checkpoints(run: RunLog) -> Dict[str, Any]:
    manifests = []
    listed = set()
    for reading in run.manifests:
        m = reading.manifest
        entries = []
        by_file = {c["file"]: c for c in reading.checks}
        for e in m.get("checkpoints", []) if isinstance(m.get("checkpoints"), list) else []:
            if not isinstance(e, dict) or not e.get("file"):
                continue
            check = by_file.get(str(e["file"]), {})
            listed.add(str(e["file"]))
            entries.append({"file": e["file"], "step": e.get("step"), "epoch": e.get("epoch"),
                            "score": _num(e.get("score")), "reason": e.get("reason"), "healthy": e.get("healthy"),
                            "verified": bool(check.get("exists")) and not check.get("problem")
                            and check.get("sha256_ok") is not False,
                            "sha256_checked": check.get("sha256_ok") is not None, "problem": check.get("problem", "")})
        manifests.append({"path": reading.path, "monitor": m.get("monitor"), "mode": m.get("mode"),
                          "best": m.get("best"), "last": m.get("last"), "checkpoints": entries,
                          "problem": reading.problem,
                          "all_verified": not reading.problem and all(e["verified"] for e in entries)})
    unlisted = [os.path.relpath(p, run.path) for p in run.checkpoint_files if os.path.basename(p) not in listed]
    return {"manifests": manifests, "unverified_files": unlisted}


def summarize(run: RunLog, prefix: str = "monitor", layer_limit: int = 8) -> Dict[str, Any]:
    """The report of one run as JSON-safe data (the ``runs[i]`` object of ``lightwatch report --json``).

    Args:
        run: what :func:`~lightwatch.report.reader.read_run` read.
        prefix: the monitors' tag prefix.
        layer_limit: how many of the worst layers to list.

    Example:
        >>> from lightwatch.report.reader import RunLog
        >>> alert = {"step": 7, "rule": "grad_nonfinite", "severity": "error", "subject": "fc.weight",
        ...          "source": "GradientStatsMonitor", "message": "non-finite gradients", "action": "warn"}
        >>> report = summarize(RunLog("run", alerts=[alert]))
        >>> report["verdict"]["status"], report["verdict"]["first_problem"]["rule"]
        ('errors', 'grad_nonfinite')
    """
    by_severity = {s: sum(1 for a in run.alerts if a["severity"] == s) for s in SEVERITIES}
    return {
        "path": run.path,
        "verdict": _verdict(run.alerts, run.problems),
        "alerts": {"total": len(run.alerts), "by_severity": by_severity, "groups": _alert_groups(run.alerts)},
        "curves": _curves(run, prefix),
        "layers": _layers(run, prefix, layer_limit),
        "data": _data(run, prefix),
        "checkpoints": _checkpoints(run),
        "sources": {"event_files": [str(p) for p in run.event_files], "scalar_tags": len(run.scalars),
                    "alerts_file": run.alerts_file,
                    "profile": run.profile is not None, "manifests": len(run.manifests)},
        "problems": list(run.problems),
    }
