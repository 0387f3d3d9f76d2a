"""Tables of the family fault suite: recall per (family, fault), false alarms on healthy runs, and for each
harmful fault that lightwatch does not name, what it raised instead and the probe signals that separate it."""
from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .runner import num

ACC_DROP = 0.03      # harmful: val_acc at least 3 points below the healthy run of the same seed
LOSS_RISE = 0.05     # harmful: val_loss at least 5% above the healthy run of the same seed
OPTIMISM = 0.05      # harmful (no_causal_mask): the metric as trained overstates the clean one by >= 5%
DIAGNOSED_SHARE = 0.9


def _fmt(x: Any, nd: int = 3) -> str:
    v = num(x) if not isinstance(x, (int, float)) else float(x)
    if v != v:
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.{nd}g}"


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _median(vals: List[float]) -> float:
    vals = [v for v in vals if v == v]
    return statistics.median(vals) if vals else float("nan")


def run_harm(rec: Dict[str, Any], healthy: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Harm of one run against the healthy run of the same (family, seed)."""
    m = num(rec.get("metric_final"))
    h = num(healthy.get("metric_final")) if healthy else float("nan")
    out: Dict[str, Any] = {"metric": m, "healthy": h, "delta": m - h, "harmful": None, "why": ""}
    if not math.isfinite(m):
        out.update(harmful=True, why="metric not finite")
        return out
    if math.isfinite(h):
        if rec.get("higher_is_better"):
            out["harmful"] = (h - m) >= ACC_DROP
            out["why"] = f"acc -{h - m:.3f}" if out["harmful"] else ""
        else:
            rel = (m - h) / abs(h) if h else float("nan")
            out["rel"] = rel
            out["harmful"] = rel >= LOSS_RISE
            out["why"] = f"loss +{rel:.1%}" if out["harmful"] else ""
    trained = rec.get("metric_final_as_trained")
    if trained is not None and math.isfinite(num(trained)) and m:
        opt = (m - num(trained)) / abs(m) if not rec.get("higher_is_better") else (num(trained) - m)
        out["optimism"] = opt
        if opt >= OPTIMISM:
            out["harmful"] = True
            out["why"] = (out["why"] + "; " if out["why"] else "") + f"val as trained overstates by {opt:.1%}"
    return out


def _by_key(records: List[Dict[str, Any]]) -> Dict[Tuple[str, str], List[Dict[str, Any]]]:
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["family"], r["fault"])].append(r)
    return groups


def annotate(records: List[Dict[str, Any]]) -> None:
    healthy = {(r["family"], r["seed"]): r for r in records if r["fault"] == "healthy" and r.get("detection")}
    for r in records:
        if r.get("detection") and r["fault"] != "healthy":
            r["harm"] = run_harm(r, healthy.get((r["family"], r["seed"])))


def _count(items: List[str]) -> str:
    c = Counter(i for i in items if i)
    return ", ".join(f"{k} ({v})" for k, v in c.most_common()) or "-"


def detection_table(records: List[Dict[str, Any]], families: Sequence[str], faults: Sequence[str]
                    ) -> Tuple[List[str], List[List[str]], List[Dict[str, Any]]]:
    headers = ["family", "fault", "metric", "fault (median)", "healthy (median)", "harm (median)", "harmful",
               "recall warning+", "recall info+", "diagnosed (warning+)", "diagnosed info only", "median steps",
               "first warning+ rule", "first subject", "location named"]
    rows, summary = [], []
    groups = _by_key(records)
    for fam in families:
        for fault in faults:
            runs = [r for r in groups.get((fam, fault), []) if r.get("detection")]
            if fault == "healthy" or not runs:
                continue
            n = len(runs)
            dets = [r["detection"] for r in runs]
            harms = [r.get("harm") or {} for r in runs]
            harmful = sum(1 for h in harms if h.get("harmful"))
            delays = [d["delay"] for d in dets if d["delay"] is not None]
            loc = [d["location_ok"] for d in dets if d["location_ok"] is not None]
            m_f = _median([num(h.get("metric")) for h in harms])
            m_h = _median([num(h.get("healthy")) for h in harms])
            higher = runs[0].get("higher_is_better")
            if higher:
                harm_txt = f"acc {m_f - m_h:+.3f}"
            else:
                harm_txt = f"loss {(m_f - m_h) / m_h:+.1%}" if m_h == m_h and m_h else "-"
            opts = [h.get("optimism") for h in harms if h.get("optimism") is not None]
            if opts:
                harm_txt += f"; as-trained overstates by {_median(opts):.1%}"
            row = dict(family=fam, fault=fault, n=n, harmful=harmful,
                       detected=sum(d["detected"] for d in dets), detected_info=sum(d["detected_info"] for d in dets),
                       diagnosed=sum(d["diagnosed"] for d in dets),
                       diagnosed_info=sum(d["diagnosed_info"] for d in dets),
                       median_delay=_median([float(x) for x in delays]) if delays else None,
                       rules=_count([d["rule"] for d in dets]), subjects=_count([d["subject"] for d in dets]),
                       metric=runs[0].get("metric"), metric_fault=m_f, metric_healthy=m_h, harm=harm_txt)
            summary.append(row)
            rows.append([fam, fault, row["metric"], _fmt(m_f), _fmt(m_h), harm_txt,
                         f"{'yes' if harmful * 2 >= n and harmful else 'no'} ({harmful}/{n})",
                         f"{row['detected']}/{n}", f"{row['detected_info']}/{n}", f"{row['diagnosed']}/{n}",
                         f"{row['diagnosed_info']}/{n}",
                         _fmt(row["median_delay"]) if row["median_delay"] is not None else "-", row["rules"],
                         row["subjects"], f"{sum(loc)}/{len(loc)}" if loc else "n/a"])
    return headers, rows, summary


def false_alarm_table(records: List[Dict[str, Any]], families: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    headers = ["family", "healthy runs", "runs with warning+", "warning+ rules (runs)", "info-only runs",
               "info rules (runs)", "healthy metric (median)"]
    rows = []
    for fam in families:
        runs = [r for r in records if r["family"] == fam and r["fault"] == "healthy" and r.get("detection")]
        if not runs:
            continue
        warn = [r for r in runs if r["detection"]["warning_alerts"]]
        info_only = [r for r in runs if not r["detection"]["warning_alerts"] and r["detection"]["rules_info"]]
        rows.append([fam, len(runs), len(warn), _count([x for r in runs for x in r["detection"]["rules_warning"]]),
                     len(info_only), _count([x for r in runs for x in r["detection"]["rules_info"]]),
                     f"{runs[0].get('metric')} {_fmt(_median([num(r.get('metric_final')) for r in runs]))}"])
    return headers, rows


def _range(vals: List[float]) -> Tuple[float, float]:
    vals = [v for v in vals if v == v]
    return (min(vals), max(vals)) if vals else (float("nan"), float("nan"))


def separating_signals(records: List[Dict[str, Any]], family: str, fault: str) -> List[str]:
    """Probe signals whose range over the fault's runs lies outside the healthy runs' range (same family)."""
    healthy = [r for r in records if r["family"] == family and r["fault"] == "healthy" and r.get("signals")]
    faulty = [r for r in records if r["family"] == family and r["fault"] == fault and r.get("signals")]
    out = []
    keys = sorted({k for r in healthy + faulty for k in r["signals"]})
    for k in keys:
        h = _range([num(r["signals"].get(k)) for r in healthy])
        f = _range([num(r["signals"].get(k)) for r in faulty])
        hv = [num(r["signals"].get(k)) for r in healthy]
        fv = [num(r["signals"].get(k)) for r in faulty]
        if not healthy or not faulty:
            continue
        if all(v != v for v in fv) and not any(v != v for v in hv):
            out.append(f"{k}: healthy [{_fmt(h[0])}, {_fmt(h[1])}], fault nan in every run")
        elif f[0] > h[1]:
            out.append(f"{k} ^: healthy [{_fmt(h[0])}, {_fmt(h[1])}], fault [{_fmt(f[0])}, {_fmt(f[1])}]")
        elif f[1] < h[0]:
            out.append(f"{k} v: healthy [{_fmt(h[0])}, {_fmt(h[1])}], fault [{_fmt(f[0])}, {_fmt(f[1])}]")
    return out


def raised_instead(runs: List[Dict[str, Any]]) -> List[str]:
    """Every rule lightwatch raised at/after onset on these runs: runs, severities, values, first step."""
    per: Dict[str, Dict[str, Any]] = {}
    for r in runs:
        onset = r.get("onset", 0)
        for a in r.get("alerts") or []:
            if a.get("step", 0) < onset and r.get("kind") != "data":
                continue
            key = f"{a['source']}:{a['rule']}"
            d = per.setdefault(key, {"runs": set(), "sev": Counter(), "values": [], "steps": [], "thr": set(),
                                     "subject": Counter()})
            d["runs"].add(r["seed"])
            d["sev"][a["severity"]] += 1
            if isinstance(a.get("value"), (int, float)):
                d["values"].append(float(a["value"]))
            d["steps"].append(int(a.get("step", 0)))
            if a.get("threshold") is not None:
                d["thr"].add(str(a["threshold"]))
            if a.get("subject"):
                d["subject"][str(a["subject"])] += 1
    out = []
    for key, d in sorted(per.items(), key=lambda kv: -len(kv[1]["runs"])):
        vals = d["values"]
        v = f"values [{_fmt(min(vals))}, {_fmt(max(vals))}]" if vals else "no value"
        thr = f", threshold {'/'.join(sorted(d['thr']))}" if d["thr"] else ""
        subj = d["subject"].most_common(1)[0][0] if d["subject"] else "-"
        out.append(f"{key} in {len(d['runs'])}/{len(runs)} runs ({', '.join(f'{s} x{c}' for s, c in d['sev'].items())}; "
                   f"{v}{thr}; first step {min(d['steps'])}; subject {subj})")
    return out or ["nothing at or after the onset"]


def misses(records: List[Dict[str, Any]], summary: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for row in summary:
        n = row["n"]
        if not (row["harmful"] * 2 >= n and row["harmful"]):
            continue
        if row["diagnosed"] >= DIAGNOSED_SHARE * n:
            continue
        runs = [r for r in records if r["family"] == row["family"] and r["fault"] == row["fault"] and r.get("detection")]
        out.append(dict(family=row["family"], fault=row["fault"], diagnosed=f"{row['diagnosed']}/{n}",
                        detected=f"{row['detected']}/{n}", raised=raised_instead(runs),
                        signals=separating_signals(records, row["family"], row["fault"])))
    return out


def render(records: List[Dict[str, Any]], families: Sequence[str], faults: Sequence[str]) -> Tuple[str, Dict[str, Any]]:
    annotate(records)
    det_h, det_rows, summary = detection_table(records, families, faults)
    fa_h, fa_rows = false_alarm_table(records, families)
    miss = misses(records, summary)
    parts = [
        "## Detection per family and fault (lightwatch default policy)\n\n"
        "recall = runs with a warning+ alert at or after the onset / runs; diagnosed = that alert's rule names the "
        "cause; steps = median optimizer steps from the onset to the first warning+ alert. Harm: the family's "
        f"validation metric against the healthy run of the same seed; harmful = >= {ACC_DROP * 100:.0f} points of "
        f"val_acc lost, or val_loss >= {LOSS_RISE:.0%} higher, or not finite (no_causal_mask also: the val metric "
        f"as trained, with the leak, overstates the clean one by >= {OPTIMISM:.0%}); 'yes' when harmful in at least "
        "half of the seeds.\n\n" + markdown(det_h, det_rows),
        "## Healthy controls (false alarms: runs with a warning+ alert)\n\n" + markdown(fa_h, fa_rows),
    ]
    lines = []
    for m in miss:
        lines.append(f"### {m['family']} / {m['fault']}: diagnosed {m['diagnosed']}, detected {m['detected']}\n")
        lines.append("lightwatch raised (at/after onset):\n")
        lines += [f"- {x}" for x in m["raised"]]
        lines.append("\nprobe signals outside the healthy range of this family:\n")
        lines += [f"- {x}" for x in (m["signals"] or ["none"])]
        lines.append("")
    parts.append("## Harmful faults not named at warning in >= 90% of seeds\n\n" + ("\n".join(lines) or "none"))
    text = "\n\n".join(parts)
    return text, {"detection": [det_h] + det_rows, "false_alarms": [fa_h] + fa_rows, "summary": summary,
                  "misses": miss}
