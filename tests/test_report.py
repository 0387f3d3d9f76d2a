"""`lightwatch report`, `compare` and `policies` on real runs: the example app's healthy run and three runs of
the fault suite (NaN in the data, dead ReLU units, a covariate shift of the validation split), each trained
once for the whole module with the shipped `monitor=default` policy, read back from what they left on disk."""
from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import shutil
import subprocess
import sys
from typing import Any, Dict, List

import pytest
import torch

from lightwatch.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO, os.path.join(REPO, "examples")):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench.faults import CENTRE_FEATURES, get_fault  # noqa: E402

FAULTS = ("nan_in_data", "dead_relu", "covariate_shift")


def run_cli(*args: str) -> Any:
    """``lightwatch ARGS`` in this process: ``(exit code, stdout)``."""
    out = io.StringIO()
    code = main(list(args), out=out)
    return code, out.getvalue()


def report_json(logdir: str, *extra: str) -> Dict[str, Any]:
    code, text = run_cli("report", logdir, "--json", *extra)
    assert code in (0, 1), text
    return json.loads(text)


def _default_monitors() -> List[Any]:
    from hydra import compose, initialize_config_module

    from lightwatch.hydra import instantiate_monitors

    with initialize_config_module("lightwatch.conf", version_base="1.3"):
        return instantiate_monitors(compose(config_name="monitor/default").monitor)


def _suite_run(name: str, root: Any) -> str:
    from pytorch_lightning.loggers import TensorBoardLogger

    run = get_fault(name).build(0, max_steps=40)
    log_dir = str(root / name)
    logger = TensorBoardLogger(log_dir, name="", version="")
    trainer = run.trainer(log_dir, callbacks=_default_monitors(), logger=logger, limit_val_batches=3,
                          log_every_n_steps=5)
    trainer.fit(run.model, datamodule=run.datamodule)
    return log_dir


def _app_run(root: Any) -> str:
    """The example app's healthy run, with MetricCheckpoint's verified checkpoints (one epoch)."""
    from hydra import compose, initialize_config_dir

    import train as app

    overrides = ["trainer=fast", "trainer.max_steps=45", "monitor/checkpoint=best",
                 "monitor.checkpoint.monitor=val/loss"]
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    out = str(root / "app")
    app.run(cfg, out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: Any) -> Dict[str, str]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    found = {"healthy": _app_run(root), "suite_healthy": _suite_run("healthy", root)}
    for name in FAULTS:
        found[name] = _suite_run(name, root)
    return found


@pytest.fixture(scope="module")
def reports(runs: Dict[str, str]) -> Dict[str, Dict[str, Any]]:
    return {name: report_json(path) for name, path in runs.items()}


# ------------------------------------------------------------------------------------------ verdicts
def test_the_healthy_run_is_healthy_with_verified_checkpoints(reports: Dict[str, Dict[str, Any]]) -> None:
    doc = reports["healthy"]
    assert doc["schema_version"] == 1 and doc["kind"] == "report" and doc["status"] == "healthy"
    (run,) = doc["runs"]
    assert run["verdict"]["status"] == "healthy" and run["verdict"]["first_problem"] is None
    assert run["alerts"]["total"] == 0 and run["problems"] == []
    (manifest,) = run["checkpoints"]["manifests"]
    assert manifest["all_verified"] and manifest["best"] and manifest["last"] == "last.ckpt"
    assert all(e["verified"] and e["sha256_checked"] for e in manifest["checkpoints"])
    curves = {c["tag"]: c for c in run["curves"]}
    assert curves["val/loss"]["best"] is not None and curves["val/acc"]["mode"] == "max"
    assert {"train", "val"} <= set(run["data"]["splits"]) and not any(d["drifted"] for d in run["data"]["drift"])


def test_a_nan_in_the_data_is_an_error_first_seen_in_the_batch(reports: Dict[str, Dict[str, Any]]) -> None:
    run = reports["nan_in_data"]["runs"][0]
    first = run["verdict"]["first_problem"]
    assert run["verdict"]["status"] == "errors"
    assert (first["rule"], first["subject"], first["step"]) == ("data_nonfinite", "train/x.36", 0)
    rules = [g["rule"] for g in run["alerts"]["groups"]]
    assert {"grad_nonfinite", "act_nonfinite", "loss_nonfinite"} <= set(rules)
    worst = run["layers"]["worst"][0]
    assert worst["first_nonfinite_step"] is not None and worst["subject"].startswith("net.fc1")


def test_dead_relu_units_are_a_warning_on_the_dead_layer(reports: Dict[str, Dict[str, Any]]) -> None:
    run = reports["dead_relu"]["runs"][0]
    first = run["verdict"]["first_problem"]
    assert run["verdict"]["status"] == "warnings"
    assert (first["rule"], first["subject"]) == ("act_dead", "net.act2")
    worst = run["layers"]["worst"][0]
    assert worst["subject"] == "net.act2" and worst["dead_frac"]["max"] >= 0.9


def test_a_shifted_validation_split_is_named_with_its_features(reports: Dict[str, Dict[str, Any]]) -> None:
    run = reports["covariate_shift"]["runs"][0]
    first = run["verdict"]["first_problem"]
    assert run["verdict"]["status"] == "warnings"
    assert first["rule"] in ("data_drift", "data_out_of_range") and first["subject"].startswith("val/x.")
    (x,) = [d for d in run["data"]["drift"] if d["drifted"]]
    assert (x["split"], x["field"]) == ("val", "x")
    assert sorted(x["drifted_features"]) == sorted(f"x.{i}" for i in CENTRE_FEATURES)


def test_fail_on_warning_exits_1_on_the_faulty_runs_and_0_on_the_healthy_one(runs: Dict[str, str]) -> None:
    assert run_cli("report", runs["healthy"], "--fail-on", "warning")[0] == 0
    for name in FAULTS:
        code, text = run_cli("report", runs[name], "--fail-on", "warning")
        assert code == 1 and "--fail-on warning: FAILED" in text, name
    assert run_cli("report", runs["dead_relu"], "--fail-on", "error")[0] == 0  # a warning is below error
    # the installed entry point, as a CI job calls it
    cmd = [sys.executable, "-m", "lightwatch", "report", runs["nan_in_data"], "--json", "--fail-on", "error"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1 and json.loads(proc.stdout)["failed"] is True


def test_the_terminal_report_starts_with_the_verdict_in_plain_text(runs: Dict[str, str]) -> None:
    code, text = run_cli("report", runs["dead_relu"])
    lines = text.splitlines()
    assert code == 0 and lines[0].startswith("lightwatch report: ")
    assert lines[2].startswith("warnings: first problem at step 0: act_dead (warning) on net.act2")
    for title in ("Alerts (1)", "Worst layers", "Data", "Checkpoints", "Curves"):
        assert any(line.startswith(title) for line in lines), title
    assert "\x1b[" not in text  # not a terminal: no colour codes


# ----------------------------------------------------------------------------------------------- html
class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: Dict[str, Dict[str, str]] = {}
        self.urls: List[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids[attrs["id"]] = dict(attrs, tag=tag)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v]


def test_the_html_page_is_self_contained_and_has_every_plot(runs: Dict[str, str], tmp_path: Any) -> None:
    from lightwatch.report.html import PLOT_IDS

    out = tmp_path / "report.html"
    code, _ = run_cli("report", runs["covariate_shift"], "--html", str(out))
    assert code == 0
    text = out.read_text()
    page = _Page()
    page.feed(text)
    assert not [u for u in page.urls if not u.startswith("data:")]
    assert "http://" not in text and "https://" not in text
    for plot_id, _ in PLOT_IDS:
        img = page.ids[plot_id]
        assert img["tag"] == "img" and img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "warnings" in page.ids["verdict"]["class"]


def test_html_without_matplotlib_says_what_to_install(runs: Dict[str, str], tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an interpreter without the extra does
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    code, _ = run_cli("report", runs["healthy"], "--html", str(tmp_path / "r.html"))
    assert code == 2 and "pip install lightwatch[report]" in err.getvalue()
    assert not (tmp_path / "r.html").exists()


# -------------------------------------------------------------------------------------------- compare
def test_compare_names_the_drifted_field_and_nothing_else(runs: Dict[str, str]) -> None:
    code, text = run_cli("compare", runs["suite_healthy"], runs["covariate_shift"], "--json")
    assert code == 0
    result = json.loads(text)
    assert result["data"]["drifted_fields"] == ["val/x"]
    (x,) = [f for f in result["data"]["fields"] if f["drifted"]]
    assert sorted(f["feature"] for f in x["features"]) == sorted(f"x.{i}" for i in CENTRE_FEATURES)
    labels = [f for f in result["data"]["fields"] if f["kind"] == "labels"]
    assert len(labels) == 2 and not any(f["drifted"] for f in labels)  # no label shift in either split
    assert [g["rule"] for g in result["alerts"]["b_only"]] == ["data_drift", "data_out_of_range"]
    assert result["alerts"]["a_only"] == []
    best = {m["tag"]: m for m in result["metrics"]}
    assert best["val/acc"]["b_best"] < best["val/acc"]["a_best"]
    same = json.loads(run_cli("compare", runs["suite_healthy"], runs["suite_healthy"], "--json")[1])
    assert same["data"]["drifted_fields"] == [] and same["layers"] == []


def test_compare_across_runs_with_different_bin_edges_rebins(runs: Dict[str, str]) -> None:
    # the app and the suite split the digits differently, so their profiles froze different edges
    result = json.loads(run_cli("compare", runs["healthy"], runs["suite_healthy"], "--json")[1])
    assert all(f.get("rebinned") for f in result["data"]["fields"] if f["kind"] == "numeric")
    code, text = run_cli("compare", runs["suite_healthy"], runs["dead_relu"])
    assert code == 0 and "dead fraction (max)" in text and "net.act2" in text


# ------------------------------------------------------------------------------------ what cannot be read
def test_what_cannot_be_read_is_said(runs: Dict[str, str], tmp_path: Any) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(runs["healthy"], copy)
    with open(copy / "alerts.jsonl", "w") as fh:
        fh.write(json.dumps({"step": 3, "rule": "loss_spike", "severity": "warning", "source": "MetricMonitor",
                             "subject": "train/loss", "message": "spike"}) + "\n" + '{"step": 9, "rul')
    (copy / "data_profile.json").write_text('{"format": "something-else"}')
    ckpt = next(p for p in sorted((copy / "checkpoints").iterdir()) if p.suffix == ".ckpt")
    with open(ckpt, "r+b") as fh:
        fh.seek(10)
        fh.write(b"XX")
    run = report_json(str(copy))["runs"][0]
    assert run["alerts"]["total"] == 1 and run["verdict"]["status"] == "warnings"
    assert not run["verdict"]["complete"]
    problems = " | ".join(run["problems"])
    assert "the last line is incomplete" in problems and "data_profile.json: cannot be read" in problems
    entry = next(e for m in run["checkpoints"]["manifests"] for e in m["checkpoints"] if e["file"] == ckpt.name)
    assert not entry["verified"] and "does not match" in entry["problem"]


def test_a_missing_or_empty_log_directory_is_a_usage_error(tmp_path: Any, monkeypatch: Any) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert run_cli("report", str(tmp_path / "nope"))[0] == 2
    assert run_cli("report", str(tmp_path))[0] == 2
    assert "no such directory" in err.getvalue() and "no lightwatch run found" in err.getvalue()
    assert run_cli("report")[0] == 2 and run_cli("report", str(tmp_path), "--fail-on", "bad")[0] == 2


def test_a_parent_of_several_runs_reports_each(runs: Dict[str, str]) -> None:
    doc = report_json(os.path.dirname(runs["dead_relu"]), "--fail-on", "error")
    assert len(doc["runs"]) == len(runs) and doc["status"] == "errors" and doc["failed"]


# ------------------------------------------------------------------------------------------- policies
def test_policies_are_listed_and_one_is_shown_resolved(monkeypatch: Any) -> None:
    code, text = run_cli("policies")
    assert code == 0 and all(f"  {name}" in text for name in ("default", "strict", "debug", "off"))
    assert "grad_stats/full" in text
    code, text = run_cli("policies", "show", "strict", "every_n_steps=7")
    assert code == 0 and "every_n_steps: 7" in text and "${" not in text
    assert "_target_: lightwatch.callbacks.GradientStatsMonitor" in text
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert run_cli("policies", "show", "stricter")[0] == 2 and "strict" in err.getvalue()
