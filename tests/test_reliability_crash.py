"""The CI slice of the crash-consistency bench: SIGKILLs of fits with ``MetricCheckpoint`` and with Lightning's
``ModelCheckpoint``, side by side (``python -m bench.reliability --part crash`` runs 200 of each).

``LIGHTWATCH_RELIABILITY_TRIALS`` sets the kills per side (default 6: 12 in all).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.reliability.crash import summarize  # noqa: E402


def test_sigkill_never_corrupts_or_loses_a_metric_checkpoint_run_next_to_model_checkpoint(tmp_path: Any) -> None:
    trials = int(os.environ.get("LIGHTWATCH_RELIABILITY_TRIALS", "6"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "bench.reliability.crash", str(tmp_path), str(trials), "7"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60 + 20 * trials)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(tmp_path / "crash.json") as fh:
        records = json.load(fh)["records"]
    lw = summarize(records, "MetricCheckpoint")
    assert lw["trials"] == lw["killed"] == trials
    assert lw["corrupt"] == 0 and lw["lost"] == 0, [r for r in records if r.get("problem")]
    # the other side ran the same kills and was checked the same way (its figures are the bench's to report)
    mc = summarize(records, "ModelCheckpoint")
    assert mc["trials"] == mc["killed"] == trials
    print("\nSIGKILL slice:", json.dumps({"MetricCheckpoint": lw, "ModelCheckpoint": mc}))
