"""The README's quick start runs as written: its code block is extracted and run in a fresh process."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_code() -> str:
    """The first ``python`` code block under the README's ``## Quick start`` heading."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Quick start\n", 1)
    if len(section) != 2:
        pytest.fail("README.md has no '## Quick start' section: tests/test_readme.py runs its code block.")
    block = re.search(r"^```python\n(.*?)^```", section[1], re.MULTILINE | re.DOTALL)
    if block is None:
        pytest.fail("README.md's '## Quick start' section has no ```python code block to run.")
    return block.group(1)


def test_quick_start_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "quick_start.py"
    script.write_text(quick_start_code(), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("LIGHTWATCH_TEST_LIGHTNING", None)  # the README imports pytorch_lightning, as a user would
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"README quick start failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*")), f"no TensorBoard events in {run_dir}"
    assert (run_dir / "data_profile.json").is_file(), "DataQualityMonitor wrote no data profile"
    alerts = run_dir / "alerts.jsonl"
    records = [json.loads(line) for line in alerts.read_text().splitlines()] if alerts.exists() else []
    # The README says this healthy run raises no alert; a warning here would be a false alarm.
    assert not [r for r in records if r["severity"] != "info"], records
