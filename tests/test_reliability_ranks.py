"""Rank faults in a 2-process gloo fit (torchrun): one rank SIGKILLed mid-run must end the job with an error
within its timeout (no hang), with every checkpoint the manifest names intact. ``python -m bench.reliability
--part ranks`` also runs a raising, a slow and a full-disk rank, next to ``ModelCheckpoint``."""
from __future__ import annotations

import os
import sys
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.reliability.ranks import run_fault  # noqa: E402


@pytest.mark.ddp
def test_a_rank_killed_mid_run_ends_the_job_without_a_hang_and_the_checkpoints_stay_intact(tmp_path: Any) -> None:
    record = run_fault(str(tmp_path), "kill", "lightwatch", timeout=120)  # kills its process group in a finally
    assert not record["hung"], record["output_tail"]
    assert record["returncode"] != 0
    assert record["ranks"][0]["error"], record["ranks"]  # the surviving rank saw the failure and stopped
    directory = record["dir"]
    assert directory["named"] >= 2 and not directory["bad"] and not directory["temporaries"], directory
