"""A CI slice of the calibration corpus (bench/calibration): healthy runs that lightwatch must not alarm on.

For every family whose packages import in this venv, one short run (seed 0, at most 120 optimizer steps)
under lightwatch's ``default`` Hydra policy, and two checks:

- ``test_family_trains``: the run finished, its loss stayed finite, it learned (loss and validation metric,
  as the corpus defines it for the family); this checks the corpus itself;
- ``test_family_no_false_alarm``: no alert of severity warning or above. Every run here is healthy, so any
  such alert is a false alarm of lightwatch; the failure message lists them (rule, step, subject, value,
  threshold, message).

Families that need torchvision or timm (resnet_bn, vit_timm, convnext_timm) are skipped in the main venv:
there torchvision from PyPI does not load next to the CPU torch (see
bench/calibration/torchvision_compat.py); ``make calibration`` runs the whole corpus in its own venv.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any, Dict

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.calibration import FAMILIES, run_one  # noqa: E402
from bench.calibration.runner import WARNING_PLUS  # noqa: E402

torch.set_num_threads(1)

CI_MAX_STEPS = 120
SEED = 0
_RUNS: Dict[str, Dict[str, Any]] = {}


def _run(family: str, tmp_root: str) -> Dict[str, Any]:
    fam = FAMILIES[family]
    for module in fam.requires:  # torchvision/timm: absent from .venv (bench.calibration applied the shim anyway)
        pytest.importorskip(module)
    if family not in _RUNS:
        _RUNS[family] = run_one(family, SEED, "default", tmp_root, max_steps=min(CI_MAX_STEPS, fam.default_steps))
    return _RUNS[family]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("calibration"))


def test_families_are_documented_and_split() -> None:
    import bench.calibration as cal

    assert len(FAMILIES) >= 8
    for name, fam in FAMILIES.items():
        assert name in cal.__doc__, f"{name} is missing from the package docstring"
        assert fam.description
    held = {n for n, f in FAMILIES.items() if f.held_out}
    assert held == {"convnext_timm", "bert_hf", "finetune"}  # lightning_lstm: tuning since update_ratio_high
    assert cal.is_held_out("resnet_bn", 5) and not cal.is_held_out("resnet_bn", 4)
    assert cal.is_held_out("bert_hf", 0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains(family: str, tmp_root: str) -> None:
    rec = _run(family, tmp_root)
    assert rec["error"] is None, f"{family} crashed: {rec['error']}\n{rec.get('traceback', '')}"
    assert rec["steps"] == rec["max_steps"], f"{family} stopped at step {rec['steps']} of {rec['max_steps']}"
    assert rec["finite"], f"{family}: non-finite training loss"
    assert isinstance(rec["loss_first"], float) and math.isfinite(rec["loss_first"])
    assert isinstance(rec["loss_last"], float) and math.isfinite(rec["loss_last"])
    assert rec["learned"], (f"{family} did not learn: loss {rec['loss_first']:.4g} -> {rec['loss_last']:.4g}, "
                            f"{rec['metric']} {rec['metric_init']} -> {rec['metric_final']}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_no_false_alarm(family: str, tmp_root: str) -> None:
    rec = _run(family, tmp_root)
    if rec["error"] is not None:
        pytest.fail(f"{family} crashed: {rec['error']}")
    alerts = [a for a in rec["alerts"] if a.get("severity") in WARNING_PLUS]
    listing = "\n".join(
        f"  step {a.get('step')} {a.get('severity')} {a.get('rule')} ({a.get('source')}) subject={a.get('subject')} "
        f"value={a.get('value')} threshold={a.get('threshold')}: {a.get('message')}" for a in alerts)
    assert not alerts, f"{family} (healthy, seed {SEED}, {rec['steps']} steps, monitor=default): " \
                       f"{len(alerts)} warning+ alerts:\n{listing}"
