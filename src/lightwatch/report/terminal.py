"""The report for a terminal: a verdict line, then short tables; ``rich`` on a terminal, plain text elsewhere.

The content is built once as :class:`Section` objects (a title, optional lines and one table) and drawn by
:func:`render_plain` or :func:`render_rich`, so both show the same thing. ``rich`` is optional (the
``report`` extra): without it, or when the output is not a terminal (a pipe, a CI log), plain text is
printed.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, TextIO

__all__ = ["Section", "report_sections", "compare_sections", "render_plain", "render_rich", "write_sections"]

_STATUS_STYLE = {"healthy": "bold green", "warnings": "bold yellow", "errors": "bold red"}
_SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "error": "red", "critical": "bold red"}


@dataclass
class Section:
    """One block of the report: a title, lines of text, and a table (``columns`` and ``rows`` of strings)."""

    title: str
    lines: List[str] = field(default_factory=list)
    columns: List[str] = field(default_factory=list)
    rows: List[List[str]] = field(default_factory=list)
    style: str = ""


def fmt(value: Any, digits: int = 3) -> str:
    """A number short enough for a table cell; ``-`` for none.

    Example:
        >>> fmt(0.000123456), fmt(12345.0), fmt(None), fmt(3)
        ('0.000123', '1.23e+04', '-', '3')
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _span(stat: Optional[Dict[str, Any]]) -> str:
    if not stat or stat.get("min") is None:
        return "-"
    return f"{fmt(stat['min'])} .. {fmt(stat['max'])}"


def _short(text: str, width: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def report_sections(run: Dict[str, Any], width: int = 110) -> List[Section]:
    """The sections of one run's report (from :func:`~lightwatch.report.summary.summarize`)."""
    v = run["verdict"]
    out = [Section(f"lightwatch report: {run['path']}", [v["text"]], style=_STATUS_STYLE.get(v["status"], ""))]
    if v["first_problem"]:
        fp = v["first_problem"]
        out[0].lines.append(_short(f"  {fp['source']}: {fp['message']}", width))
    groups = run["alerts"]["groups"]
    alerts = Section(f"Alerts ({run['alerts']['total']})", [] if groups else ["none"],
                     ["severity", "rule", "count", "first", "last", "subject", "message"])
    for g in groups:
        subjects = ", ".join(str(s) for s in g["subjects"][:3]) + (" ..." if len(g["subjects"]) > 3 else "")
        alerts.rows.append([g["severity"], g["rule"], str(g["count"]), str(g["first_step"]), str(g["last_step"]),
                            subjects or "-", _short(g["message"], 70)])
    out.append(alerts)

    layers = Section(f"Worst layers ({len(run['layers']['worst'])} of {run['layers']['count']})",
                     columns=["layer", "grad norm", "update ratio", "dead/saturated", "non-finite from"])
    glob = run["layers"]["global"]
    if glob.get("grad_norm", {}).get("points"):
        layers.lines.append(f"global gradient norm {_span(glob['grad_norm'])}"
                            + (f", update ratio (median) {_span(glob['update_ratio_median'])}"
                               if glob.get("update_ratio_median", {}).get("points") else ""))
    for row in run["layers"]["worst"]:
        dead = row.get("dead_frac") or row.get("saturation")
        layers.rows.append([row["subject"], _span(row.get("grad_norm")), _span(row.get("update_ratio")),
                            fmt((dead or {}).get("max")), fmt(row.get("first_nonfinite_step"))])
    if not layers.rows:
        layers.lines.append("no per-layer statistics in the event files")
    out.append(layers)

    data = run["data"]
    ds = Section("Data", columns=["split", "samples", "fields", "duplicates", "leaked", "drifted vs train"])
    drift_by_split: Dict[str, List[str]] = {}
    for d in data["drift"]:
        if d.get("schema_change"):
            drift_by_split.setdefault(d["split"], []).append(f"{d['field']}: {d['schema_change']}")
        elif d.get("drifted"):
            names = d.get("drifted_features") or [d["field"]]
            more = f" (+{len(names) - 4})" if len(names) > 4 else ""
            drift_by_split.setdefault(d["split"], []).append(f"{d['field']}: {', '.join(names[:4])}{more}")
    for name, s in data["splits"].items():
        fields = ", ".join(f"{f} {i['dtype']}{list(i['shape'])}" for f, i in s["fields"].items())
        ds.rows.append([name, str(s["samples"]), fields, fmt(s["duplicate_fraction"]), fmt(s["leak_fraction"]),
                        "; ".join(drift_by_split.get(name, [])) or ("-" if name == "train" else "none")])
    if data["profile"] is None:
        ds.lines.append("no data profile (data_profile.json) in the run directory")
    for a in data["alerts"][:5]:
        ds.lines.append(_short(f"step {a['step']} {a['rule']} ({a['severity']}) {a['subject'] or ''}", width))
    out.append(ds)

    ck = Section("Checkpoints", columns=["file", "step", "score", "reason", "healthy", "verified"])
    for m in run["checkpoints"]["manifests"]:
        ck.lines.append(f"{os.path.relpath(m['path'], run['path'])}: best {m['best']}, last {m['last']}"
                        + ("" if m["all_verified"] else "  NOT ALL VERIFIED")
                        + (f" ({m['problem']})" if m["problem"] else ""))
        for e in m["checkpoints"]:
            ck.rows.append([str(e["file"]), fmt(e["step"]), fmt(e["score"]), str(e["reason"]), fmt(e["healthy"]),
                            "yes" if e["verified"] else f"NO: {e['problem'] or 'hash mismatch'}"])
    for path in run["checkpoints"]["unverified_files"]:
        ck.rows.append([path, "-", "-", "-", "-", "no manifest"])
    if not ck.rows and not ck.lines:
        ck.lines.append("none")
    out.append(ck)

    curves = Section("Curves", columns=["metric", "last", "best", "at step"])
    for c in run["curves"]:
        curves.rows.append([c["tag"], fmt(c["last"]), fmt(c["best"]), fmt(c["best_step"])])
    if curves.rows:
        out.append(curves)
    if run["problems"]:
        out.append(Section("Could not read", list(run["problems"]), style="yellow"))
    return out


def compare_sections(cmp: Dict[str, Any]) -> List[Section]:
    """The sections of ``lightwatch compare`` (from :func:`~lightwatch.report.compare.compare_runs`)."""
    out = [Section(f"lightwatch compare: A = {cmp['a']}  B = {cmp['b']}", list(cmp["summary"]))]
    drift = Section("Data drift, B against A", columns=["split", "field", "drifted", "worst features (PSI)"])
    for d in cmp["data"]["fields"]:
        worst = ", ".join(f"{f['feature']} ({fmt(f['psi'])})" for f in d.get("features", []) if f["drifted"])
        drift.rows.append([d["split"], d["field"], fmt(d["drifted"]),
                           _short(worst or (f"label TV {fmt(d.get('total_variation'))}" if d["kind"] == "labels"
                                            else "-"), 70)])
    drift.lines += cmp["data"]["notes"]
    out.append(drift)
    layers = Section("Layer scale changes (B / A, median over the run)",
                     columns=["layer", "stat", "A", "B", "B / A"])
    for r in cmp["layers"]:
        layers.rows.append([r["subject"], r["stat"], fmt(r["a"]), fmt(r["b"]), fmt(r["ratio"])])
    if not layers.rows:
        layers.lines.append("no layer changed its scale by more than the threshold")
    out.append(layers)
    al = Section("Alerts in one run only", columns=["run", "rule", "severity", "count", "first step"])
    for side in ("a_only", "b_only"):
        for g in cmp["alerts"][side]:
            al.rows.append([side[0].upper(), g["rule"], g["severity"], str(g["count"]), str(g["first_step"])])
    if not al.rows:
        al.lines.append("none")
    out.append(al)
    best = Section("Best metrics", columns=["metric", "A best", "A at step", "B best", "B at step"])
    for m in cmp["metrics"]:
        best.rows.append([m["tag"], fmt(m["a_best"]), fmt(m["a_step"]), fmt(m["b_best"]), fmt(m["b_step"])])
    out.append(best)
    return out


def render_plain(sections: Sequence[Section], stream: TextIO) -> None:
    """Plain text: each title underlined, tables as aligned columns.

    Example:
        >>> import io
        >>> buf = io.StringIO()
        >>> render_plain([Section("Alerts", columns=["rule", "count"], rows=[["grad_nonfinite", "2"]])], buf)
        >>> print(buf.getvalue().strip())
        Alerts
        ------
          rule            count
          grad_nonfinite  2
    """
    for s in sections:
        stream.write(f"{s.title}\n{'-' * min(len(s.title), 100)}\n")
        for line in s.lines:
            stream.write(f"{line}\n")
        if s.rows:
            widths = [max(len(c), *(len(r[i]) for r in s.rows)) for i, c in enumerate(s.columns)]
            for row in [s.columns] + s.rows:
                stream.write("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
        stream.write("\n")


def render_rich(sections: Sequence[Section], console: Any) -> None:
    """The same sections as ``rich`` panels and tables on ``console``."""
    from rich.table import Table
    from rich.text import Text

    for s in sections:
        console.rule(Text(s.title, style="bold"), align="left")
        for line in s.lines:
            console.print(Text(line, style=s.style))
        if s.rows:
            table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
            for c in s.columns:
                table.add_column(c, overflow="fold")
            for row in s.rows:
                style = _SEVERITY_STYLE.get(row[0], "") if s.columns and s.columns[0] == "severity" else ""
                table.add_row(*row, style=style)
            console.print(table)
        console.print()


def write_sections(sections: Sequence[Section], stream: Optional[TextIO] = None, color: Optional[bool] = None) -> None:
    """Draw ``sections`` with ``rich`` when it is installed and ``stream`` is a terminal (or ``color``), else
    as plain text."""
    stream = stream or sys.stdout
    use_rich = color if color is not None else bool(getattr(stream, "isatty", lambda: False)())
    if use_rich:
        try:
            from rich.console import Console
        except ImportError:
            use_rich = False
    if not use_rich:
        render_plain(sections, stream)
        return
    render_rich(sections, Console(file=stream, force_terminal=True, width=max(100, Console().width)))
