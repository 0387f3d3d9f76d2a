"""What changed between two runs: the data, the layers' scales, the alerts, and the best metrics.

The question after "it got worse". Each part compares run B against run A:

- data: every field of every split both profiles hold, with the ``drift`` data check's PSI and KS
  thresholds (numeric fields, rebinned onto A's edges when the runs froze different ones) and the
  chi-square test of the class counts (label fields, i.e. label shift);
- layers: the median over the run of each layer's gradient norm, update ratio and activation std, listed
  when B's is more than ``scale_factor`` times A's (or less than ``1 / scale_factor``), and dead fractions
  that moved by more than ``dead_change``;
- alerts: rules that fired in one run only;
- metrics: the best value of each curve (min for losses, max for accuracies) and the step it was reached.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional

from lightwatch.report.drift import field_drift
from lightwatch.report.reader import RunLog
from lightwatch.report.summary import SCHEMA_VERSION, layer_rows, summarize

__all__ = ["compare_runs"]

_SCALE_STATS = (("grad", "norm", "gradient norm"), ("param", "update_ratio", "update ratio"),
                ("act", "std", "activation std"))


def _data(a: RunLog, b: RunLog) -> Dict[str, Any]:
    notes: List[str] = []
    fields: List[Dict[str, Any]] = []
    if a.profile is None or b.profile is None:
        missing = " and ".join(n for n, r in (("A", a), ("B", b)) if r.profile is None)
        notes.append(f"no data profile in {missing}: the data cannot be compared")
        return {"fields": fields, "drifted_fields": [], "notes": notes}
    for split in sorted(set(a.profile.splits) | set(b.profile.splits)):
        pa, pb = a.profile.splits.get(split), b.profile.splits.get(split)
        if pa is None or pb is None:
            notes.append(f"split {split!r} is only in {'A' if pb is None else 'B'}")
            continue
        for name in sorted(set(pa.fields) | set(pb.fields)):
            if name not in pa.fields or name not in pb.fields:
                fields.append({"split": split, "field": name, "kind": "?", "drifted": True,
                               "schema_change": f"field only in {'A' if name in pa.fields else 'B'}"})
                continue
            result = field_drift(pb.fields[name], pa.fields[name], pb.samples, pa.samples)
            if result is None:
                notes.append(f"{split}/{name}: no statistics to compare")
                continue
            if "features" in result:  # only the drifted features: a 3000-pixel image field stays readable
                result["features_compared"] = len(result["features"])
                result["features"] = sorted((f for f in result["features"] if f["drifted"]),
                                            key=lambda f: -(f["psi"] or 0.0))
            fields.append(dict(result, split=split))
    drifted = sorted(f"{f['split']}/{f['field']}" for f in fields if f["drifted"])
    return {"fields": fields, "drifted_fields": drifted, "notes": notes}


def _median(points: List[Any]) -> Optional[float]:
    finite = [v for _, v in points if math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _layers(a: RunLog, b: RunLog, prefix: str, scale_factor: float, dead_change: float) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    for family, stat, label in _SCALE_STATS:
        head = f"{prefix}.{family}/"
        tail = f"/{stat}"
        for tag in sorted(set(a.scalars) & set(b.scalars)):
            if not (tag.startswith(head) and tag.endswith(tail)):
                continue
            subject = tag[len(head):-len(tail)]
            va, vb = _median(a.series(tag)), _median(b.series(tag))
            if va is None or vb is None or va <= 0 or vb <= 0:
                if (va is None) != (vb is None):
                    out.append({"subject": subject, "stat": label, "a": va, "b": vb, "ratio": None})
                continue
            ratio = vb / va
            if ratio > scale_factor or ratio < 1.0 / scale_factor:
                out.append({"subject": subject, "stat": label, "a": va, "b": vb, "ratio": ratio})
    rows_a, rows_b = layer_rows(a, prefix), layer_rows(b, prefix)
    for subject in sorted(set(rows_a) & set(rows_b)):
        da = (rows_a[subject].get("dead_frac") or {}).get("max")
        db = (rows_b[subject].get("dead_frac") or {}).get("max")
        if da is not None and db is not None and abs(db - da) > dead_change:
            out.append({"subject": subject, "stat": "dead fraction (max)", "a": da, "b": db, "ratio": None})
    return sorted(out, key=lambda r: -abs(math.log(r["ratio"])) if r["ratio"] else -math.inf)


def _alerts(sa: Dict[str, Any], sb: Dict[str, Any]) -> Dict[str, Any]:
    ga = {g["rule"]: g for g in sa["alerts"]["groups"]}
    gb = {g["rule"]: g for g in sb["alerts"]["groups"]}
    return {"a_only": [ga[r] for r in sorted(set(ga) - set(gb))], "b_only": [gb[r] for r in sorted(set(gb) - set(ga))],
            "both": sorted(set(ga) & set(gb))}


def _metrics(sa: Dict[str, Any], sb: Dict[str, Any]) -> List[Dict[str, Any]]:
    ca = {c["tag"]: c for c in sa["curves"]}
    cb = {c["tag"]: c for c in sb["curves"]}
    out = []
    for tag in sorted(set(ca) | set(cb)):
        x, y = ca.get(tag, {}), cb.get(tag, {})
        out.append({"tag": tag, "mode": x.get("mode") or y.get("mode"), "a_best": x.get("best"),
                    "a_step": x.get("best_step"), "b_best": y.get("best"), "b_step": y.get("best_step")})
    return out


def compare_runs(a: RunLog, b: RunLog, prefix: str = "monitor", scale_factor: float = 3.0,
                 dead_change: float = 0.2) -> Dict[str, Any]:
    """Compare run B with run A (the ``lightwatch compare --json`` object, schema in ``docs/report.md``).

    Args:
        a: the reference run, as read by :func:`~lightwatch.report.reader.read_run`.
        b: the run compared with it.
        prefix: the monitors' tag prefix.
        scale_factor: list a layer whose median statistic changed by more than this factor.
        dead_change: list a layer whose largest dead fraction moved by more than this.

    Example:
        >>> from lightwatch.report.reader import RunLog
        >>> a = RunLog("a", scalars={"monitor.grad/fc.weight/norm": [(4, 1.0)]})
        >>> b = RunLog("b", scalars={"monitor.grad/fc.weight/norm": [(4, 10.0)]})
        >>> [(r["subject"], r["ratio"]) for r in compare_runs(a, b)["layers"]]
        [('fc.weight', 10.0)]
    """
    sa, sb = summarize(a, prefix), summarize(b, prefix)
    data = _data(a, b)
    layers = _layers(a, b, prefix, scale_factor, dead_change)
    alerts = _alerts(sa, sb)
    metrics = _metrics(sa, sb)
    summary = [
        f"verdict: A {sa['verdict']['status']}, B {sb['verdict']['status']}",
        "data: " + (f"{len(data['drifted_fields'])} field(s) drifted: {', '.join(data['drifted_fields'])}"
                    if data["drifted_fields"] else "no field drifted"),
        f"layers: {len(layers)} change(s) beyond x{scale_factor:g} in scale or {dead_change:g} in dead fraction",
        f"alerts: {len(alerts['a_only'])} rule(s) only in A, {len(alerts['b_only'])} only in B",
    ]
    for m in metrics:
        if m["tag"].startswith("val") and m["a_best"] is not None and m["b_best"] is not None:
            summary.append(f"{m['tag']}: best A {m['a_best']:.4g} (step {m['a_step']}), "
                           f"B {m['b_best']:.4g} (step {m['b_step']})")
    return {"schema_version": SCHEMA_VERSION, "kind": "compare", "a": a.path, "b": b.path, "summary": summary,
            "verdicts": {"a": sa["verdict"], "b": sb["verdict"]}, "data": data, "layers": layers,
            "alerts": alerts, "metrics": metrics, "problems": {"a": a.problems, "b": b.problems}}
