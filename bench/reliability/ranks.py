"""Rank faults: a 2-process gloo fit (torchrun) where one rank raises, is SIGKILLed, is slow, or has a full disk.

Each run has its own timeout and its whole process group is killed in a ``finally``; a run that reaches the
timeout is a hang. After each, the checkpoint directory is checked as after a crash (every file the run records
loads; for ``MetricCheckpoint`` also its size and SHA-256 against the manifest) and the ranks' errors are read.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPTS = os.path.join(ROOT, "tests", "scripts")
SCRIPT = os.path.join(SCRIPTS, "reliability_rank_fault.py")

__all__ = ["FAULTS", "run_fault"]

FAULTS = ("raise", "kill", "slow", "disk")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_directory(ck_dir: str, side: str) -> Dict[str, Any]:
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    from reliability_disk_full import check_lightning_dir, check_lightwatch_dir

    return check_lightwatch_dir(ck_dir) if side == "lightwatch" else check_lightning_dir(ck_dir)


def run_fault(out: str, fault: str, side: str, timeout: float = 120.0) -> Dict[str, Any]:
    """One run of ``fault`` with ``side`` (``lightwatch`` or ``lightning``); returns its record with a one-line
    ``summary``."""
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           SCRIPT, out, fault, side]
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    hung = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        output = ""
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    seconds = time.time() - started
    ranks = {}
    for r in (0, 1):
        path = os.path.join(out, f"rank{r}.json")
        if os.path.exists(path):
            ranks[r] = json.load(open(path))
    directory = check_directory(os.path.join(out, "ck"), side)
    record = {"fault": fault, "side": side, "returncode": proc.returncode, "hung": hung, "seconds": seconds,
              "ranks": ranks, "dir": directory, "output_tail": output[-2000:]}
    errors = sorted({f"rank {r}: {v['error']}" for r, v in ranks.items() if v.get("error")})
    state = "hang (killed at the timeout)" if hung else f"ended in {seconds:.0f} s (exit {proc.returncode})"
    record["summary"] = (f"{state}; {'; '.join(errors) or 'no rank error'}; {len(directory['bad'])} unreadable of "
                         f"{directory['named']} files")
    with open(os.path.join(out, "record.json"), "w") as fh:
        json.dump(record, fh, indent=1)
    return record


if __name__ == "__main__":  # python -m bench.reliability.ranks OUT FAULT SIDE
    print(json.dumps(run_fault(sys.argv[1], sys.argv[2], sys.argv[3]), indent=1)[-3000:])
