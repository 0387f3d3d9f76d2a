"""The reliability suite: ``python -m bench.reliability`` runs every part and prints one table.

Parts (``--part crash,disk,tamper,ranks,catalog``; all by default):

- ``crash``: ``--trials`` SIGKILLs (default 200) of a fit with ``MetricCheckpoint`` and as many with Lightning's
  ``ModelCheckpoint`` (bench/reliability/crash.py);
- ``disk``: a real 2 MiB tmpfs (root; else the ``io`` fault layer) under checkpoints, ``alerts.jsonl`` and
  TensorBoard, filling after a few saves and before the first, both sides (tests/scripts/reliability_disk_full.py);
- ``tamper``: truncated, bit-flipped, deleted and replaced checkpoints, a pickle that runs code, damaged
  profiles and ``alerts.jsonl`` (tests/test_reliability_tamper.py, counted);
- ``ranks``: 2-process gloo runs where one rank raises, is SIGKILLed, is slow, or has a full disk
  (tests/scripts/reliability_rank_fault.py), each under its own timeout;
- ``catalog``: the catalog of bad input (tests/test_reliability_catalog.py, counted);
- ``long``: ``--long-steps`` (default 20,000) steps with every callback on; its own table of resident memory,
  open files and file sizes over steps follows the main one (bench/reliability/longrun.py).

``--out DIR`` keeps every record (default: a new temporary directory); ``--crash-results FILE`` reuses the
records of an earlier crash run instead of running it again. Prints the table as Markdown (docs/reliability.md
holds the last one).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Dict, List, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.reliability.crash import summarize  # noqa: E402
from bench.tables import markdown_table  # noqa: E402

PARTS = ("crash", "disk", "tamper", "ranks", "catalog", "long")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run_crash(out: str, trials: int, seed: int, reuse: str) -> List[List[str]]:
    if reuse:
        with open(reuse) as fh:
            report = json.load(fh)
    else:
        os.makedirs(out, exist_ok=True)
        subprocess.run([sys.executable, "-m", "bench.reliability.crash", out, str(trials), str(seed)], cwd=ROOT,
                       env=ENV, check=True)
        with open(os.path.join(out, "crash.json")) as fh:
            report = json.load(fh)
    lw = summarize(report["records"], "MetricCheckpoint")
    mc = summarize(report["records"], "ModelCheckpoint")
    injected = sum(1 for r in report["records"] if r["side"] == "MetricCheckpoint" and r["kind"] == "injected")

    def cell(s: Dict[str, int], where: str) -> str:
        left = (f"; {s['temporaries_after_kill']} kills left a temporary {where}" if s["temporaries_counted"] else "")
        return f"{s['corrupt']} corrupt, {s['lost']} lost of {s['killed']} kills{left}"
    lw_cell = cell(lw, "(removed at the resume)")
    mc_cell = cell(mc, "in the directory (it stages files in the system temp directory)")
    return [["crash: SIGKILL at random moments, then resume", f"{lw['trials']} + {mc['trials']} "
             f"({injected} placed inside saves)", lw_cell, mc_cell]]


def run_disk(out: str) -> List[List[str]]:
    root = os.geteuid() == 0 if hasattr(os, "geteuid") else False
    fs = "tmpfs" if root else "inject"
    scenarios = [f"{side}:{when}:{fs}" for when in ("precheck", "midwrite") for side in ("lightwatch", "lightning")]
    os.makedirs(out, exist_ok=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "reliability_disk_full.py"), out,
                    *scenarios], env=ENV, check=False, timeout=600)
    rows = []
    for when, label in (("precheck", "disk full after 4 saves"), ("midwrite", "disk full during the first write")):
        cells = []
        for side in ("lightwatch", "lightning"):
            i = scenarios.index(f"{side}:{when}:{fs}")
            path = os.path.join(out, str(i), "result.json")
            if not os.path.exists(path):
                cells.append("did not finish")
                continue
            r = json.load(open(path))
            d = r["dir"]
            error = f"{r['error']} (errno {r.get('errno')})" if r["error"] else "no error"
            cells.append(f"{error}; {len(d['bad'])} unreadable of {d['named']} files; "
                         f"{len(d['temporaries'])} temporaries; alerts: {', '.join(r['alerts']) or 'none'}")
        rows.append([f"{label} ({'2 MiB tmpfs' if fs == 'tmpfs' else 'io fault layer'})", "1 + 1", *cells])
    return rows


def run_pytest(path: str, out: str) -> Dict[str, int]:
    os.makedirs(out, exist_ok=True)
    xml = os.path.join(out, os.path.basename(path) + ".xml")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, f"--junitxml={xml}"],
                   cwd=os.path.join(ROOT, "tests"), env=ENV, check=False, capture_output=True)
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def run_tamper(out: str) -> List[List[str]]:
    c = run_pytest(os.path.join(ROOT, "tests", "test_reliability_tamper.py"), out)
    return [["tampering: checkpoints, profiles, alerts.jsonl", str(c["tests"]),
             f"{c['passed']} detected with a clear error or tolerated as documented; {c['failures'] + c['errors']} "
             "missed", "not run (it records no hashes to check against)"]]


def run_catalog(out: str) -> List[List[str]]:
    c = run_pytest(os.path.join(ROOT, "tests", "test_reliability_catalog.py"), out)
    return [["catalog of bad input", str(c["tests"]),
             f"{c['passed']} a clear error or an alert; {c['failures'] + c['errors']} not; {c['skipped']} skipped",
             "-"]]


def run_ranks(out: str) -> List[List[str]]:
    from bench.reliability.ranks import FAULTS, run_fault

    rows = []
    for fault in FAULTS:
        lw = run_fault(os.path.join(out, f"lw-{fault}"), fault, "lightwatch")
        mc = run_fault(os.path.join(out, f"mc-{fault}"), fault, "lightning")
        if fault == "disk":  # rank 0's disk is the io fault layer, which ModelCheckpoint's writes bypass
            mc["summary"] += (" (not comparable: ModelCheckpoint stages its file in the system temp directory, "
                              "outside the fault layer; see the tmpfs rows)")
        rows.append([f"rank fault: {fault} (2 processes, gloo)", "1 + 1", lw["summary"], mc["summary"]])
    return rows


def run_long_part(out: str, steps: int) -> List[List[str]]:
    from bench.reliability.longrun import run_long, table

    os.makedirs(out, exist_ok=True)
    rows = run_long(out, steps, max(1, steps // 10))
    LONG_TABLES.extend(table(rows))
    first, last = rows[1] if len(rows) > 1 else rows[0], rows[-1]
    return [[f"long run: {last['step']:,} steps, every callback", "1",
             f"RSS {first['rss_mib']} -> {last['rss_mib']} MiB from step {first['step']:,}; open files "
             f"{first['open_files']} -> {last['open_files']}; alerts.jsonl {last['alerts_kib']} KiB, TensorBoard "
             f"{last['tensorboard_kib']} KiB, checkpoints {last['checkpoints_kib']} KiB", "-"]]


LONG_TABLES: List[str] = []


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    parser.add_argument("--trials", type=int, default=200, help="SIGKILL trials per side (crash)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", default="")
    parser.add_argument("--crash-results", default="", help="crash.json of an earlier run to reuse")
    parser.add_argument("--long-steps", type=int, default=20000, help="steps of the long run")
    args = parser.parse_args(list(argv) or None)
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    out = args.out or tempfile.mkdtemp(prefix="lightwatch-reliability-")
    started = time.time()
    rows: List[List[str]] = []
    for part in PARTS:
        if part not in parts:
            continue
        where = os.path.join(out, part)
        if part == "crash":
            rows += run_crash(where, args.trials, args.seed, args.crash_results)
        elif part == "disk":
            rows += run_disk(where)
        elif part == "tamper":
            rows += run_tamper(where)
        elif part == "ranks":
            rows += run_ranks(where)
        elif part == "catalog":
            rows += run_catalog(where)
        elif part == "long":
            rows += run_long_part(where, args.long_steps)
    import torch

    print(f"# lightwatch reliability suite ({platform.platform()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}; {time.time() - started:.0f} s; records in {out})\n")
    print("\n".join(markdown_table(["test", "trials or cases", "lightwatch (MetricCheckpoint)",
                                    "Lightning ModelCheckpoint"], rows)))
    if LONG_TABLES:
        print("\nLong run, over steps:\n")
        print("\n".join(LONG_TABLES))
    with open(os.path.join(out, "table.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
