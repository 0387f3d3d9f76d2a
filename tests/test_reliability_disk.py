"""A full disk under checkpoints, ``alerts.jsonl`` and TensorBoard: a real 2 MiB tmpfs where this process may
mount one (root), and always the fault layer at the ``io`` level (tests/scripts/reliability_disk_full.py).

The fit stops with one clear ``CheckpointSaveError`` (errno ``ENOSPC``) and a ``checkpoint_save_failed`` alert;
every file the manifest names still loads and matches its hash, no temporary is left, and ``best``/``last``
never name a partial file. ``python -m bench.reliability --part disk`` runs the same script next to Lightning's
``ModelCheckpoint``.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from typing import Any, Dict, List


HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "scripts", "reliability_disk_full.py")


def can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and os.path.exists("/proc/filesystems") and \
        "tmpfs" in open("/proc/filesystems").read()


def run(tmp_path: Any, *scenarios: str) -> List[Dict[str, Any]]:
    """Run ``side:when:fs`` scenarios in one process (imports once, a fork each); their results."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path), *scenarios], capture_output=True, text=True,
                          env=env, timeout=60 + 30 * len(scenarios))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = []
    for i in range(len(scenarios)):
        with open(tmp_path / str(i) / "result.json") as fh:
            results.append(json.load(fh))
    return results


def assert_intact(result: Dict[str, Any], earlier: bool) -> None:
    assert result["error"] == "CheckpointSaveError", result
    assert result["errno"] == errno.ENOSPC and "No space left on device" in result["message"], result
    assert "intact" in result["message"] and "Free disk space" in result["message"]
    directory = result["dir"]
    assert not directory["bad"] and not directory["temporaries"], directory
    if earlier:
        assert directory["named"] >= 2 and directory["last"] == "last.ckpt" and directory["best"], directory
    assert result["alerts"].count("checkpoint_save_failed") <= 1


def test_a_full_filesystem_stops_the_fit_with_one_clear_error_and_intact_checkpoints(tmp_path: Any) -> None:
    """The fault layer always, the disk filling after a few saves (the free-space check refuses the next file);
    a real tmpfs too where this process may mount one (root), filling before the first save (the write itself
    fails). The bench runs both cases on both, next to ModelCheckpoint."""
    scenarios = ["lightwatch:precheck:inject"]
    if can_mount():
        scenarios += ["lightwatch:midwrite:tmpfs"]
    for result in run(tmp_path, *scenarios):
        assert_intact(result, earlier=result["when"] == "precheck")
        if result["when"] == "precheck":  # there was room for the alert line
            assert result["alerts"] == ["checkpoint_save_failed"], result["alerts"]
