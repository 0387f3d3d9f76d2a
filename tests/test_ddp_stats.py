"""The statistics monitors under DDP: two CPU processes on gloo, checked through the files they write."""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
from typing import Any

import pytest

from conftest import read_alerts, read_events, scalars

HERE = os.path.dirname(__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(HERE, "scripts", script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.ddp
def test_ddp_statistics_agree_and_each_file_is_written_once(tmp_path: Any) -> None:
    torchrun("stats_ddp.py", str(tmp_path))
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]

    # The NaN input seen by rank 1 alone at step 9 stops both ranks at the same step: no hang.
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 10

    # Collectives: none on steps that are not sampled, one SUM + one MAX per sampled step (activations;
    # gradients need none under DDP), plus one MAX at the first sampled step (step 0, the initialised model)
    # to agree on unit counts.
    for r in ranks:
        per_step = {int(k): v for k, v in r["collectives"].items()}
        assert per_step == {0: 3, 4: 2, 9: 2}, per_step

    # Every rank holds the same reduced values; the activation mean is over both ranks' batches.
    assert ranks[0]["metrics"] == pytest.approx(ranks[1]["metrics"], nan_ok=True)
    s0, n0 = ranks[0]["local"]["4"]
    s1, n1 = ranks[1]["local"]["4"]
    acc = read_events(str(tmp_path / "tb" / "version_0"))
    assert scalars(acc, "monitor.act/net.0/mean")[4] == pytest.approx((s0 + s1) / (n0 + n1), rel=1e-5)
    assert s0 / n0 != pytest.approx(s1 / n1, rel=1e-3)  # the ranks really saw different data

    # One writer: one event file, one alerts file, one record per alert.
    assert len(glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)) == 1
    assert len(glob.glob(str(tmp_path / "**" / "alerts.jsonl"), recursive=True)) == 1
    alerts = read_alerts(str(tmp_path))
    act_alerts = [a for a in alerts if a["rule"] == "act_nonfinite"]
    assert len(act_alerts) == 1 and act_alerts[0]["subject"] == "net.0" and act_alerts[0]["action"] == "stop"
    assert [a["step"] for a in alerts if a["rule"] == "grad_nonfinite"] == [9]
