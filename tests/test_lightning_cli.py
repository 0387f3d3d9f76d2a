"""LightningCLI: every callback configured from YAML (``trainer.callbacks`` with ``class_path``/``init_args``).

Runs the documented example (``examples/cli/train_cli.py`` with ``examples/cli/lightwatch.yaml``) in a
subprocess, then a config with a misspelt argument and one with a bad nested rule.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

pytest.importorskip("jsonargparse")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "examples", "cli", "train_cli.py")
CONFIG = os.path.join(ROOT, "examples", "cli", "lightwatch.yaml")


def cli(tmp_path: Any, config: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"),
                                                                           os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, APP, "fit", "--config", config,
                           f"--trainer.default_root_dir={tmp_path}", *extra],
                          env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))


def test_the_example_config_trains_with_every_callback(tmp_path: Any) -> None:
    done = cli(tmp_path, CONFIG, "--trainer.max_epochs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    manifest = json.loads((run / "checkpoints" / "manifest.json").read_text())
    assert manifest["monitor"] == "val/acc" and manifest["mode"] == "max" and manifest["best"]
    assert (run / "data_profile.json").exists()  # DataQualityMonitor ran, with its scan before fit
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "monitor.grad/_total/norm" in tags and any(t.startswith("monitor.act/") for t in tags)
    assert not any(t.endswith("bias/norm") and t.startswith("monitor.grad/") for t in tags)  # exclude: ["bias$"]
    # LightningCLI saves the resolved config: the nested rules and checks are there as given
    saved = (run / "config.yaml").read_text()
    assert "val_plateau" in saved and "warn_above: 0.3" in saved


def test_a_misspelt_argument_stops_before_training_naming_it(tmp_path: Any) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(CONFIG).read().replace("scan_before_fit: 16", "scan_before_fitt: 16"))
    done = cli(tmp_path, str(bad))
    assert done.returncode != 0
    assert "Option 'scan_before_fitt' is not accepted" in done.stderr
    assert not (tmp_path / "lightning_logs").exists()  # nothing trained


def test_a_bad_nested_rule_says_which_rule_and_key(tmp_path: Any) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(CONFIG).read().replace("kind: plateau", "kind: plateu"))
    done = cli(tmp_path, str(bad))
    assert done.returncode != 0
    assert "rule 'val_plateau': key 'kind' must be one of" in done.stderr and "did you mean 'plateau'?" in done.stderr
