"""The report as one self-contained HTML page: the tables of the terminal report and the plots worth seeing.

Plots are drawn with ``matplotlib`` (the optional ``report`` extra, imported only here) and embedded as
base64 PNG ``data:`` URIs: the page needs no network and no other file. Every plot is an ``<img>`` with a
stable id (``plot-loss``, ``plot-grad-norm``, ``plot-update-ratio``, ``plot-activations``, ``plot-drift``;
runs after the first get a ``run<i>-`` prefix); a plot with nothing to show says so in its picture.
"""
from __future__ import annotations

import base64
import html
import io
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lightwatch.report.reader import RunLog
from lightwatch.report.summary import curve_tags
from lightwatch.report.terminal import Section, report_sections

__all__ = ["PLOT_IDS", "MissingExtra", "require_matplotlib", "plot_png", "render_html"]

#: the plots of each run, in page order: (id, caption)
PLOT_IDS: Tuple[Tuple[str, str], ...] = (
    ("plot-loss", "Loss and validation curves; vertical lines mark alerts (colour by severity)."),
    ("plot-grad-norm", "Gradient norm per parameter over steps (log10)."),
    ("plot-update-ratio", "Update ratio |dw|/|w| per parameter over steps (log10; 1e-3 is customary)."),
    ("plot-activations", "Dead and saturated fraction per activation over steps."),
    ("plot-drift", "Drift per feature (PSI), worst first, against the reference profile or the training split."),
)
_SEVERITY_COLOUR = {"info": "#4c9be8", "warning": "#e8a33c", "error": "#d9453b", "critical": "#8b0000"}
_INSTALL = "pip install lightwatch[report]"


class MissingExtra(RuntimeError):
    """An optional dependency of the report (matplotlib) is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`MissingExtra` with the install command when matplotlib cannot be imported."""
    import importlib

    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise MissingExtra(f"the HTML report draws its plots with matplotlib, which is not installed: "
                           f"{_INSTALL}") from None


def _figure(width: float = 9.0, height: float = 3.4) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777777")
    ax.set_xticks([])
    ax.set_yticks([])


def _loss(fig: Any, run: RunLog, prefix: str) -> None:
    ax = fig.add_subplot(1, 1, 1)
    tags = [t for t in curve_tags(run, prefix) if "loss" in t.lower()] or curve_tags(run, prefix)
    drawn: List[float] = []
    for tag in tags[:6]:
        points = [(s, v) for s, v in run.series(tag) if math.isfinite(v)]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 12 else None, markersize=3, label=tag)
            drawn += values
    if drawn and min(drawn) > 0 and max(drawn) > 100 * min(drawn):  # a spike would flatten the rest
        ax.set_yscale("log")
    seen = set()
    for a in run.alerts:
        colour = _SEVERITY_COLOUR.get(a["severity"], "#888888")
        key = (a["rule"], a["severity"])
        ax.axvline(a["step"], color=colour, alpha=0.6, linestyle="--",
                   label=None if key in seen else f"alert {a['rule']} ({a['severity']})")
        seen.add(key)
    if not drawn and not run.alerts:
        _empty(ax, "no loss curve and no alert in this run")
        return
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)


def _matrix(run: RunLog, pattern: str, log: bool, limit: int = 40) -> Tuple[List[str], List[int], Any]:
    import numpy as np

    rx = re.compile(pattern)
    series = {m.group(1): run.series(t) for t in sorted(run.scalars) for m in [rx.match(t)] if m and run.series(t)}
    names = list(series)[:limit]
    steps = sorted({s for n in names for s, _ in series[n]})
    grid = np.full((len(names), len(steps)), np.nan)
    col = {s: j for j, s in enumerate(steps)}
    for i, n in enumerate(names):
        for s, v in series[n]:
            if math.isfinite(v) and (not log or v > 0):
                grid[i, col[s]] = math.log10(v) if log else v
    return names, steps, grid


def _heat(ax: Any, fig: Any, names: List[str], steps: List[int], grid: Any, label: str, empty: str,
          vmin: Optional[float] = None, vmax: Optional[float] = None, cmap: str = "viridis") -> None:
    import numpy as np

    if not names or np.isnan(grid).all():
        _empty(ax, empty)
        return
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap=cmap,
                      vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(names)), labels=names, fontsize=7)
    ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
    ax.set_xticks(ticks, labels=[str(steps[j]) for j in ticks], fontsize=7)
    ax.set_xlabel("step")
    fig.colorbar(image, ax=ax, label=label)


def _layer_heat(fig: Any, run: RunLog, prefix: str, family: str, stat: str, label: str) -> None:
    p = re.escape(prefix)
    names, steps, grid = _matrix(run, rf"^{p}\.{family}/((?!_total/).+)/{stat}$", log=True)
    _heat(fig.add_subplot(1, 1, 1), fig, names, steps, grid, label, f"no {family}/*/{stat} scalars in this run")


def _activations(fig: Any, run: RunLog, prefix: str) -> None:
    p = re.escape(prefix)
    for k, (stat, title) in enumerate((("dead_frac", "dead fraction"), ("saturation", "saturated fraction"))):
        ax = fig.add_subplot(1, 2, k + 1)
        names, steps, grid = _matrix(run, rf"^{p}\.act/(.+)/{stat}$", log=False)
        _heat(ax, fig, names, steps, grid, title, f"no {title} recorded", vmin=0.0, vmax=1.0, cmap="magma")
        ax.set_title(title, fontsize=9)


def _drift_bars(summary: Dict[str, Any]) -> Tuple[str, List[Tuple[str, float, bool]], Optional[float]]:
    """``(what it is against, [(feature, psi, drifted)], threshold)``: the reference profile's scalars first."""
    scalars = summary["data"]["drift_scalars"]
    ref = {k: v for k, v in scalars.items() if k.endswith("/psi_ref")}
    if ref:
        key = sorted(ref)[0]
        bars = [(f, v, False) for f, v in ref[key].items() if v is not None]
        return f"{key.split('/')[0]} against the reference profile", bars, None
    for d in summary["data"]["drift"]:
        if d.get("kind") == "numeric" and d.get("features"):
            bars = [(f["feature"], f["psi"], f["drifted"]) for f in d["features"] if f["psi"] is not None]
            return f"{d['split']} {d['field']} against {d['against']}", bars, d.get("psi_threshold")
    return "", [], None


def _drift(fig: Any, summary: Dict[str, Any]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    what, bars, threshold = _drift_bars(summary)
    if not bars:
        _empty(ax, "no drift measured (no data profile with two splits, no reference profile)")
        return
    bars = sorted(bars, key=lambda b: -b[1])[:40]
    ax.bar(range(len(bars)), [b[1] for b in bars], color=["#d9453b" if b[2] else "#4c9be8" for b in bars])
    ax.set_xticks(range(len(bars)), labels=[b[0] for b in bars], rotation=90, fontsize=7)
    if threshold is not None:
        ax.axhline(threshold, color="#444444", linestyle=":", label=f"threshold {threshold:.3g}")
        ax.legend(fontsize=7)
    ax.set_ylabel("PSI")
    ax.set_title(what, fontsize=9)


def plot_png(plot_id: str, run: RunLog, summary: Dict[str, Any], prefix: str = "monitor") -> bytes:
    """One plot of :data:`PLOT_IDS` as PNG bytes.

    Raises:
        MissingExtra: matplotlib is not installed.
    """
    require_matplotlib()
    fig = _figure(height=4.2 if plot_id in ("plot-grad-norm", "plot-update-ratio", "plot-drift") else 3.4)
    if plot_id == "plot-loss":
        _loss(fig, run, prefix)
    elif plot_id == "plot-grad-norm":
        _layer_heat(fig, run, prefix, "grad", "norm", "log10 gradient norm")
    elif plot_id == "plot-update-ratio":
        _layer_heat(fig, run, prefix, "param", "update_ratio", "log10 update ratio")
    elif plot_id == "plot-activations":
        _activations(fig, run, prefix)
    elif plot_id == "plot-drift":
        _drift(fig, summary)
    else:
        raise ValueError(f"plot_png: unknown plot {plot_id!r}; known: {[p for p, _ in PLOT_IDS]}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _table(section: Section) -> str:
    e = html.escape
    parts = [f"<h3>{e(section.title)}</h3>"]
    parts += [f"<p>{e(line)}</p>" for line in section.lines]
    if section.rows:
        head = "".join(f"<th>{e(c)}</th>" for c in section.columns)
        body = "".join("<tr>" + "".join(f"<td class='{e(c) if i == 0 else ''}'>{e(c)}</td>"
                                        for i, c in enumerate(r)) + "</tr>" for r in section.rows)
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return "\n".join(parts)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { font-size: 1.4em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { margin-bottom: 0.3em; }
.verdict { font-size: 1.15em; padding: 0.6em 1em; border-radius: 6px; }
.healthy { background: #e3f5e1; } .warnings { background: #fff3d6; } .errors { background: #fbe0de; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { padding: 2px 8px; text-align: left; }
tr:nth-child(even) { background: #f5f5f5; } td.warning { color: #b07000; } td.error, td.critical { color: #c00; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { font-size: 0.85em; color: #555; }
"""


def render_html(runs: Sequence[Tuple[RunLog, Dict[str, Any]]], prefix: str = "monitor", title: str = "") -> str:
    """The page for ``runs`` (each ``(RunLog, summarize(...))``); raises :class:`MissingExtra` without matplotlib."""
    require_matplotlib()
    e = html.escape
    body = [f"<h1>{e(title or 'lightwatch report')}</h1>"]
    for i, (run, summary) in enumerate(runs):
        v = summary["verdict"]
        body.append(f"<section id='run-{i}'><h2>{e(run.path)}</h2>")
        verdict_id = "verdict" if i == 0 else f"run{i}-verdict"
        body.append(f"<p class='verdict {e(v['status'])}' id='{verdict_id}'>{e(v['text'])}</p>")
        for plot_id, caption in PLOT_IDS:
            data = base64.b64encode(plot_png(plot_id, run, summary, prefix)).decode("ascii")
            element_id = plot_id if i == 0 else f"run{i}-{plot_id}"
            body.append(f"<figure><img id='{element_id}' alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                        f"<figcaption>{e(caption)}</figcaption></figure>")
            if plot_id == "plot-loss":  # the verdict's evidence right under the main plot
                body += [_table(s) for s in report_sections(summary)[1:]]
        body.append("</section>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{e(title or 'lightwatch report')}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
