"""The data checks as classes: the protocol, the registry, checks by name, and a check of the user's own in a
real Trainer (the example of docs/custom-checks.md, run as written)."""
from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any, Dict, List

import pytest
import pytorch_lightning as pl
import torch

from conftest import Classifier, make_loader, make_trainer, read_alerts, read_events, scalars
from lightwatch.callbacks import DataQualityMonitor
from lightwatch.callbacks.data_quality import CHECKS
from lightwatch.checks.data import BUILTIN_CHECKS, CheckContext, DataCheck, builtin_check, parse_checks
from lightwatch.checks.data.registry import import_check
from lightwatch.checks.data_names import BUILTIN_DATA_CHECKS
from lightwatch.checks.data.nonfinite import NonFinite

HERE = os.path.dirname(__file__)
PAGE = os.path.join(HERE, "..", "docs", "custom-checks.md")
pytestmark = pytest.mark.filterwarnings("ignore::lightwatch.core.actions.MonitorWarning")

# The table as it stood when every check lived in the callback: names, order, tiers and defaults stay.
_DEFAULTS = {
    "nonfinite": {"tier": "batch", "action": "warn", "severity": "error"},
    "label_range": {"tier": "batch", "action": "warn", "severity": "error"},
    "out_of_range": {"tier": "batch", "action": "warn", "severity": "warning", "margin": 0.1, "tolerance": 1e-3},
    "schema": {"tier": "batch", "action": "warn", "severity": "error"},
    "empty_batch": {"tier": "batch", "action": "warn", "severity": "warning"},
    "unnormalised": {"tier": "first_batch", "action": "warn", "severity": "warning", "max_abs_mean": 0.5,
                     "min_rms": 2.0, "offset_ratio": 2.0},
    "drift": {"tier": "epoch", "action": "warn", "severity": "warning", "alpha": 0.01, "psi_floor": 0.1,
              "ks_floor": 0.1, "psi_warn": 0.5, "ks_warn": 0.3},
    "drift_ref": {"tier": "epoch", "action": "warn", "severity": "warning", "alpha": 0.01, "psi_floor": 0.1,
                  "ks_floor": 0.1, "psi_warn": 0.5, "ks_warn": 0.3},
    "label_shift": {"tier": "epoch", "action": "warn", "severity": "warning", "alpha": 1e-3, "floor": 0.1},
    "label_shift_ref": {"tier": "epoch", "action": "warn", "severity": "warning", "alpha": 1e-3, "floor": 0.1},
    "constant": {"tier": "epoch", "action": "warn", "severity": "warning", "alpha": 1e-3},
    "duplicates": {"tier": "epoch", "action": "warn", "severity": "warning", "threshold": 0.01, "warn_above": 0.5},
    "leakage": {"tier": "epoch", "action": "warn", "severity": "warning", "threshold": 0.0},
    "class_imbalance": {"tier": "epoch", "action": "warn", "severity": "warning", "ratio": 0.2, "alpha": 1e-3},
    "labels_unrelated": {"tier": "scan", "action": "log", "severity": "info", "min_z": 3.0, "min_rows": 200},
    "padding_in_loss": {"tier": "first_batch", "action": "warn", "severity": "warning", "threshold": 0.5},
}


# ------------------------------------------------------------------------------------------ registry
def test_the_registry_keeps_every_check_its_order_and_defaults() -> None:
    assert list(CHECKS) == list(_DEFAULTS) == list(BUILTIN_CHECKS)
    assert CHECKS == _DEFAULTS


def test_every_built_in_check_is_a_small_class_in_a_module_of_its_own() -> None:
    modules = [cls.__module__ for cls in BUILTIN_CHECKS.values()]
    assert len(set(modules)) == len(modules)
    for name, cls in BUILTIN_CHECKS.items():
        assert issubclass(cls, DataCheck) and cls.name == name and cls().rule == f"data_{name}"
        assert builtin_check(name) is cls
    with pytest.raises(KeyError, match="no built-in data check 'nope'"):
        builtin_check("nope")


def test_the_registry_imports_the_classes_its_torch_free_table_names() -> None:
    assert list(BUILTIN_CHECKS) == list(BUILTIN_DATA_CHECKS)
    for name, target in BUILTIN_DATA_CHECKS.items():
        cls = BUILTIN_CHECKS[name]
        assert f"{cls.__module__}.{cls.__name__}" == f"lightwatch.checks.data.{target}"
    with pytest.raises(TypeError, match=r"BUILTIN_DATA_CHECKS\['duplicates'\] = 'leakage.Leakage' does not name"):
        import_check("duplicates", "leakage.Leakage")
    with pytest.raises(TypeError, match="a DataCheck called 'duplicates'"):
        import_check("duplicates", "Duplicates")


def test_the_hydra_schema_knows_every_built_in_check_and_setting() -> None:
    from lightwatch.hydra import DataCheckConf, DataChecksConf

    assert list(DataChecksConf.__dataclass_fields__) == list(BUILTIN_CHECKS)
    settings = {key for cls in BUILTIN_CHECKS.values() for key in cls.defaults} | {"enabled", "action", "severity"}
    assert set(DataCheckConf.__dataclass_fields__) == settings


# ------------------------------------------------------------------------------------- checks= forms
def test_a_list_of_names_runs_those_checks_only() -> None:
    monitor = DataQualityMonitor(checks=["nonfinite", "duplicates"])
    assert [n for n, c in monitor.checks.items() if c.enabled] == ["nonfinite", "duplicates"]
    assert monitor.checks["nonfinite"].action == "warn" and monitor.checks["drift"].params["alpha"] == 0.01


def test_an_instance_of_a_built_in_check_replaces_its_defaults() -> None:
    stop = NonFinite(action="stop")
    monitor = DataQualityMonitor(checks=[stop, "label_range"])
    assert monitor.checks["nonfinite"] is stop and monitor.checks["label_range"].enabled
    assert not monitor.checks["schema"].enabled
    monitor = DataQualityMonitor(checks={"nonfinite": NonFinite(severity="critical")})
    assert monitor.checks["nonfinite"].severity == "critical" and monitor.checks["schema"].enabled


def test_the_mapping_form_keeps_working() -> None:
    monitor = DataQualityMonitor(checks={"leakage": False, "drift": {"alpha": 0.05}, "constant": None})
    assert not monitor.checks["leakage"].enabled and not monitor.checks["constant"].enabled
    assert monitor.checks["drift"]["alpha"] == 0.05 and monitor.checks["drift"].graded(False) == "info"


@pytest.mark.parametrize("checks, words", [
    (["nonfinite", "nonfinte"], ["'nonfinte'", "neither a built-in check", "nonfinite, label_range"]),
    ({"nonfinte": {}}, ["unknown check(s) ['nonfinte']"]),
    ("nonfinite", ["expected a mapping", "or a list"]),
    ({"drift": {"alpha": 2}}, ["checks={'drift': {alpha: ...}}", "(0.0, 1.0]"]),
    ({"nonfinite": {"margin": 0.5}}, ["'nonfinite'", "unknown setting(s) ['margin']"]),
    ({"schema": NonFinite()}, ["named 'nonfinite'", "use its name as the key"]),
])
def test_bad_checks_say_what_and_where(checks: Any, words: List[str]) -> None:
    with pytest.raises(ValueError) as err:
        DataQualityMonitor(checks=checks)
    for word in words:
        assert word in str(err.value)


# ------------------------------------------------------------------------------------------ protocol
class NegativeTargets(DataCheck):
    """Per-batch tier: the share of negative targets since the last logged step (a check of the user's own)."""

    name = "negative_targets"
    tier = "batch"
    severity = "error"
    defaults = {"max_fraction": 0.0}
    bounds = {"max_fraction": (0.0, 1.0, True)}

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.add_state("negative", torch.zeros((), dtype=torch.int64), reduce="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.int64), reduce="sum")
        self.add_state("lowest", torch.full((), float("inf")), reduce="min")
        self.judged: List[Dict[str, float]] = []

    def update(self, split: str, fields: Any) -> None:
        y = fields["y"]
        self.negative += (y < 0).sum()
        self.rows += y.numel()
        self.lowest = torch.minimum(self.lowest, y.min().to(self.lowest.dtype))

    def judge(self, ctx: CheckContext) -> None:
        state = {k: float(v) for k, v in ctx.state.items()}
        self.judged.append(state)
        fraction = state["negative"] / max(state["rows"], 1.0)
        ctx.scalar(f"{ctx.split}/y", "negative_frac", fraction)
        if fraction > self["max_fraction"]:
            self.alert(ctx, subject=f"{ctx.split}/y", value=fraction, threshold=self["max_fraction"],
                       message=f"{fraction:.1%} negative targets (lowest {state['lowest']:g})")


def test_the_protocol_rejects_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match=r"max_fraction=\.\.\.\): must be a number in \[0.0, 1.0\]"):
        NegativeTargets(max_fraction=3)
    with pytest.raises(ValueError, match="unknown setting"):
        NegativeTargets(margin=1.0)
    with pytest.raises(ValueError, match="unknown action"):
        NegativeTargets(action="explode")
    with pytest.raises(ValueError, match="reduce must be one of sum, max, min"):
        NegativeTargets().add_state("x", torch.zeros(()), reduce="mean")

    class Nameless(DataCheck):
        pass

    with pytest.raises(ValueError, match="needs a class attribute `name`"):
        Nameless()

    class AtTheScan(DataCheck):
        name = "at_the_scan"
        tier = "scan"

    with pytest.raises(ValueError, match="judged at tier 'batch' or 'epoch'"):
        DataQualityMonitor(checks={"at_the_scan": AtTheScan()})
    builtin, own = parse_checks({"negative_targets": NegativeTargets()}, "DataQualityMonitor")
    assert len(builtin) == len(BUILTIN_CHECKS) and [c.name for c in own] == ["negative_targets"]


def test_a_batch_check_of_your_own_is_judged_at_every_logged_step(tmp_path: Any) -> None:
    loader = make_loader(n=128, batch_size=16)
    x, y = loader.dataset.tensors
    y = y.clone()
    y[40:44] = -1  # batch 2 (step 2): 4 of its 16 targets are negative
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    check = NegativeTargets(action="log")
    monitor = DataQualityMonitor(checks={"negative_targets": check, "label_range": False}, profile_path=None)
    trainer = make_trainer(tmp_path, [monitor], max_steps=8, log_every_n_steps=5)

    class Safe(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return super().training_step((x, y.clamp_min(0)), batch_idx)

    trainer.fit(Safe(), data)
    assert check.judged == []  # the monitor judges its own copies, one per split
    alerts = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "data_negative_targets"]
    # the first logged step is step 4: its reading holds batches 0 to 4 (5 x 16 rows), then the state restarts
    assert len(alerts) == 1, alerts
    assert alerts[0]["subject"] == "train/y" and alerts[0]["severity"] == "error" and alerts[0]["step"] == 4
    assert alerts[0]["value"] == pytest.approx(4 / 80) and "lowest -1" in alerts[0]["message"]
    events = read_events(os.path.join(str(tmp_path), "tb", "version_0"))
    series = scalars(events, "monitor.data/train/y/negative_frac")
    assert min(series) == 4 and series[4] == pytest.approx(4 / 80)
    assert all(v == 0.0 for step, v in series.items() if step > 4)


def test_a_new_built_in_check_is_one_class_and_its_line_in_the_registry(tmp_path: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # the built-in checks so far read the monitor's shared statistics: the loop feeds none of them itself
    assert not any(cls.implements_protocol() for cls in BUILTIN_CHECKS.values())

    class NegativeTargetsBuiltIn(NegativeTargets):
        name = "negative_targets"

    monkeypatch.setitem(BUILTIN_CHECKS, "negative_targets", NegativeTargetsBuiltIn)
    monitor = DataQualityMonitor(checks={"negative_targets": {"max_fraction": 0.01}, "label_range": False},
                                 profile_path=None)
    assert monitor.checks["negative_targets"]["max_fraction"] == 0.01 and monitor._custom_checks == []
    loader = make_loader(n=64, batch_size=16)
    x, y = loader.dataset.tensors
    y = y.clone()
    y[:8] = -1

    class Safe(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return super().training_step((batch[0], batch[1].clamp_min(0)), batch_idx)

    trainer = make_trainer(tmp_path, [monitor], max_steps=4, log_every_n_steps=50)
    trainer.fit(Safe(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16))
    alerts = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "data_negative_targets"]
    assert len(alerts) == 1 and alerts[0]["value"] == pytest.approx(8 / 64), alerts


# ------------------------------------------------------------------------------- the documented example
def _page_code() -> str:
    with open(PAGE) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    return "\n".join(b for b in blocks if "class BlankRows" in b or "trainer.fit" in b)


def test_the_custom_check_page_runs_as_written(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _page_code()
    assert "class BlankRows(DataCheck)" in code and "DataQualityMonitor(checks=" in code
    expected = re.search(r"^# (train/x .*)$", code, flags=re.M)
    assert expected is not None
    monkeypatch.chdir(tmp_path)
    pl.seed_everything(0, verbose=False)
    out = io.StringIO()
    namespace: Dict[str, Any] = {"__name__": "custom_checks_page"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, PAGE, "exec"), namespace)
    assert out.getvalue().strip() == expected.group(1)
    alerts = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "data_blank_rows"]
    assert len(alerts) == 1 and "12.5% of the 256 train samples have an all-zero input 'x'" in alerts[0]["message"]
    # the page's check also lists by name beside the built-in ones
    monitor = DataQualityMonitor(checks=["nonfinite", namespace["BlankRows"](field="image")])
    assert [n for n, c in monitor.checks.items() if c.enabled] == ["nonfinite"]
    assert [c.name for c in monitor._custom_checks] == ["blank_rows"]


# ------------------------------------------------------------------------------------------------ DDP
_DDP_SCRIPT = '''
import json, os, sys
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightwatch.callbacks import DataQualityMonitor
from lightwatch.checks.data import DataCheck

RESULTS = []


class RowStats(DataCheck):
    name = "row_stats"
    tier = "epoch"

    def __init__(self):
        super().__init__(action="log")
        self.add_state("rows", torch.zeros((), dtype=torch.int64), reduce="sum")
        self.add_state("top", torch.full((), -1.0), reduce="max")
        self.add_state("low", torch.full((), 1e9), reduce="min")

    def update(self, split, fields):
        x = fields["x"]
        self.rows += x.shape[0]
        self.top = torch.maximum(self.top, x.max())
        self.low = torch.minimum(self.low, x.min())

    def judge(self, ctx):
        RESULTS.append(dict({k: float(v) for k, v in ctx.state.items()}, split=ctx.split))
        self.alert(ctx, subject=ctx.split + "/x", value=float(ctx.state["rows"]), message="rows seen")


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


out = sys.argv[1]
x, y = torch.arange(60, dtype=torch.float32).reshape(30, 2), torch.zeros(30, dtype=torch.long)
monitor = DataQualityMonitor(checks={"row_stats": RowStats()}, profile_path=None)
trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False, default_root_dir=out,
                     callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)
trainer.fit(Model(), DataLoader(TensorDataset(x, y), batch_size=4))
with open(os.path.join(out, "rank%d.json" % trainer.global_rank), "w") as f:
    json.dump(RESULTS, f)
# as every torchrun script here (tests/conftest.py shutdown_distributed): gloo torn down at interpreter exit can
# abort a rank ("terminate called without an active exception")
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
'''


@pytest.mark.ddp
def test_states_of_your_own_reduce_across_ranks_and_every_rank_judges_alike(tmp_path: Any) -> None:
    import json
    import socket
    import subprocess
    import sys

    script = tmp_path / "row_stats_ddp.py"
    script.write_text(_DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script),
           str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 30 rows split over two ranks: each rank judges the sum and the extremes of both halves
    assert ranks[0] == ranks[1] == [{"rows": 30.0, "top": 59.0, "low": 0.0, "split": "train"}]
    alerts = [a for a in read_alerts(str(tmp_path)) if a["rule"] == "data_row_stats"]
    assert len(alerts) == 1 and alerts[0]["value"] == 30.0  # written once, by rank 0
