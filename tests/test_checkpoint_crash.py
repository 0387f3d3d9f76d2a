"""Crash safety of MetricCheckpoint: training processes killed with SIGKILL, many times, then resumed.

``LIGHTWATCH_CRASH_TRIALS`` sets the number of trials (default 6, about 8 s on two cores; the reliability suite,
``python -m bench.reliability``, runs 200);
``LIGHTWATCH_CRASH_SEED`` the seed of the kill schedule (default 0). Half of the trials are killed from
outside at a random moment; the other half kill themselves at a chosen point of a save (mid-write, before
the rename, after the pending manifest, mid-manifest, after a rename, before a deletion).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest
import torch

from lightwatch.callbacks import MetricCheckpoint
from lightwatch.core.atomic import atomic_write_json

HERE = os.path.dirname(__file__)


def test_sigkill_at_random_moments_and_during_writes_never_breaks_the_manifest(tmp_path: Any) -> None:
    trials = int(os.environ.get("LIGHTWATCH_CRASH_TRIALS", "6"))
    seed = int(os.environ.get("LIGHTWATCH_CRASH_SEED", "0"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "scripts", "ckpt_crash_trials.py"), str(tmp_path),
                           str(trials), str(seed)], capture_output=True, text=True, env=env,
                          timeout=60 + 10 * trials)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.load(open(tmp_path / "results.json"))
    results = report["trials"]
    assert len(results) == trials

    failures = [r for r in results if not (r["killed"] and r.get("consistent") and r.get("resumed"))]
    assert not failures, json.dumps(failures, indent=1)[-4000:]
    # Every injected kill point was reached, and random kills landed at many different steps.
    phases = Counter(r["phase"] for r in results if r["kind"] == "injected")
    if trials >= 12:
        assert set(phases) == {"mid_write", "before_commit", "after_pending_manifest", "mid_manifest",
                               "after_rename", "before_delete"}
    summary = {
        "trials": trials,
        "killed": sum(r["killed"] for r in results),
        "consistent_after_kill": sum(bool(r.get("consistent")) for r in results),
        "resumed": sum(bool(r.get("resumed")) for r in results),
        "temporaries_left_by_the_kill": sum(r["temp_files_left"] > 0 for r in results),
        "pending_entries_at_the_kill": sum(r.get("pending", 0) > 0 for r in results),
        "resumed_from_a_pending_last": sum(bool(r.get("resumed_from_pending")) for r in results),
        "seconds": round(report["seconds"], 1),
    }
    print("\nSIGKILL trials:", json.dumps(summary))
    with open(tmp_path / "summary.json", "w") as fh:
        json.dump(summary, fh)


def test_a_file_renamed_just_before_a_crash_is_promoted_on_resume(tmp_path: Any) -> None:
    """The window between the rename and the manifest update, reproduced on real files."""
    from test_metric_checkpoint import Scripted, assert_consistent, fit, manifest

    d = str(tmp_path / "ck")
    fit(tmp_path, [MetricCheckpoint(dirpath=d, monitor="val/loss", save_top_k=2, save_last=True)],
        Scripted(val_loss=[3.0, 2.0, 1.0, 1.0]), epochs=3)
    doc = manifest(d)
    # The state a kill right after the rename of epoch=2's file leaves: committed on disk, "pending" in the record.
    newest = [e for e in doc["checkpoints"] if e["file"] == "epoch=2-step=6.ckpt"]
    doc["checkpoints"] = [e for e in doc["checkpoints"] if e["file"] != "epoch=2-step=6.ckpt"]
    doc["pending"] = newest + [dict(newest[0], file="never-renamed.ckpt")]
    doc["best"] = "epoch=1-step=4.ckpt"
    atomic_write_json(os.path.join(d, "manifest.json"), doc)
    with open(os.path.join(d, ".epoch=3-step=8.ckpt.tmp-deadbeef-9"), "wb") as fh:
        fh.write(b"partial")  # a write the kill interrupted

    ck = MetricCheckpoint(dirpath=d, monitor="val/loss", save_top_k=2, save_last=True)
    fit(tmp_path, [ck], Scripted(val_loss=[3.0, 2.0, 1.0, 1.0]), epochs=3, ckpt_path=os.path.join(d, "last.ckpt"))
    after = assert_consistent(d)  # also: the partial temporary was removed
    assert "epoch=2-step=6.ckpt" in [e["file"] for e in after["checkpoints"]]
    assert after["best"] == "epoch=2-step=6.ckpt" and ck.best_model_score.item() == 1.0
    assert "pending" not in after
    assert torch.load(ck.best_model_path, weights_only=True)["global_step"] == 6


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))
