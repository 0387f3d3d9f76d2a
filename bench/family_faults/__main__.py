"""``python -m bench.family_faults``: train every (family, fault, seed) and the healthy controls under
lightwatch's default policy; print the recall, false-alarm and miss tables; write results.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Dict, List, Optional, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench.family_faults.cases import FAMILIES, FAULTS, HARM_RULE  # noqa: E402
from bench.family_faults.report import render  # noqa: E402
from bench.family_faults.runner import json_safe, new_work_dir, quiet, safe_run  # noqa: E402

# rough seconds per run on one thread, to start the slow runs first
_COST = {"gpt2_hf": 13, "cnn_bn": 5, "rnn_clip": 3}


def _git_head() -> str:
    import subprocess

    try:
        head = subprocess.run(["git", "-C", _ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", _ROOT, "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True).stdout.strip()
        return head + (" (src modified)" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def parse_seeds(text: str) -> List[int]:
    out: List[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.family_faults", description=__doc__)
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated ({', '.join(FAMILIES)})")
    p.add_argument("--faults", default="all", help=f"comma-separated or 'all' ({', '.join(FAULTS)}); "
                                                   "healthy controls are always run")
    p.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-4 or 0,2,5 (default 0-4)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (2 on a 2-core machine)")
    p.add_argument("--max-steps", type=int, default=None, help="override each family's run length")
    p.add_argument("--policy", default="default", help="lightwatch Hydra policy (default 'default')")
    p.add_argument("--out", default=os.path.join(_ROOT, "outputs", "family_faults"))
    p.add_argument("--markdown", default=None, help="also write the tables to this Markdown file")
    p.add_argument("--keep-logs", action="store_true", help="keep TensorBoard logs and alerts.jsonl under <out>/logs")
    p.add_argument("--no-healthy", action="store_true", help="skip the healthy controls (harm is then unknown)")
    args = p.parse_args(argv)
    args.family_list = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in args.family_list if f not in FAMILIES]
    if bad:
        p.error(f"unknown families {bad}; known: {', '.join(FAMILIES)}")
    args.fault_list = list(FAULTS) if args.faults == "all" else [f.strip() for f in args.faults.split(",") if f.strip()]
    bad = [f for f in args.fault_list if f not in FAULTS]
    if bad:
        p.error(f"unknown faults {bad}; known: {', '.join(FAULTS)}")
    if not args.no_healthy and "healthy" not in args.fault_list:
        args.fault_list.insert(0, "healthy")
    args.seed_list = parse_seeds(args.seeds)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    quiet()
    import pytorch_lightning as pl
    import torch

    os.makedirs(args.out, exist_ok=True)
    work_dir = os.path.join(args.out, "logs") if args.keep_logs else new_work_dir()
    tasks: List[Dict[str, Any]] = []
    for fam in args.family_list:
        for fault in args.fault_list:
            if fam not in FAULTS[fault].families:
                continue
            for seed in args.seed_list:
                tasks.append(dict(family=fam, fault=fault, seed=seed, max_steps=args.max_steps, policy=args.policy,
                                  out_dir=args.out, work_dir=work_dir, keep_logs=args.keep_logs))
    tasks.sort(key=lambda t: -_COST.get(t["family"], 5))
    print(f"# family faults: {len(args.family_list)} families, {len(args.fault_list)} faults (where they apply), "
          f"seeds {args.seed_list}: {len(tasks)} runs, {args.jobs} job(s)", flush=True)
    print(f"# {platform.platform()}, python {platform.python_version()}, torch {torch.__version__}, "
          f"pytorch_lightning {pl.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    start = time.perf_counter()
    records: List[Dict[str, Any]] = []

    def done(rec: Dict[str, Any]) -> None:
        records.append(rec)
        d = rec.get("detection") or {}
        what = (f"warning+ at step {d.get('step')} by {d.get('rule')}" if d.get("detected") else
                ("info only" if d.get("detected_info") else "quiet"))
        err = f", error {rec['error']}" if rec.get("error") else ""
        print(f"[{len(records)}/{len(tasks)}] {rec['family']:9s} {rec['fault']:22s} seed {rec['seed']} {what}{err} "
              f"({rec.get('wall_s', 0):.1f} s)", file=sys.stderr, flush=True)

    try:
        if args.jobs <= 1:
            for t in tasks:
                done(safe_run(t))
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
                for fut in as_completed([pool.submit(safe_run, t) for t in tasks]):
                    done(fut.result())
    finally:
        if not args.keep_logs:
            shutil.rmtree(work_dir, ignore_errors=True)
    wall = time.perf_counter() - start
    records.sort(key=lambda r: (r["family"], r["fault"], r["seed"]))
    text, tables = render(records, args.family_list, args.fault_list)
    failed = [r for r in records if r.get("detection") is None]
    print(text)
    print(f"\n# {len(records)} runs in {wall:.0f} s wall ({args.jobs} job(s)); {len(failed)} failed; raw records under "
          f"{os.path.join(args.out, 'runs')}; {HARM_RULE}")
    for r in failed:
        print(f"# failed: {r['family']} {r['fault']} seed {r['seed']}: {r.get('error')}\n{r.get('trace', '')}")
    summary = {"args": {k: v for k, v in vars(args).items()}, "wall_s": wall, "harm_rule": HARM_RULE,
               "families": {n: FAMILIES[n].description for n in args.family_list},
               "faults": {n: {"summary": FAULTS[n].summary, "kind": FAULTS[n].kind, "families": FAULTS[n].families,
                              "diagnoses": FAULTS[n].diagnoses} for n in args.fault_list},
               "lightwatch_commit": _git_head(),
               "versions": {"torch": torch.__version__, "pytorch_lightning": pl.__version__,
                            "python": platform.python_version()},
               "records": records, **tables}
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(json_safe(summary), fh, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(text + f"\n\n{len(records)} runs in {wall:.0f} s wall with {args.jobs} job(s).\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
