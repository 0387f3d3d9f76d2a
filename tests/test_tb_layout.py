"""The custom-scalars layout: written once per run at fit start, read by TensorBoard's own plugin and server."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from typing import Any, Dict

import pytest

from conftest import Classifier, make_loader, make_trainer, read_events
from lightwatch.callbacks import ActivationStatsMonitor, GradientStatsMonitor
from lightwatch.core.tb_layout import LAYOUT_TAG, layout_panels


def layout_events(log_dir: str) -> list:
    """The layout events of ``log_dir``, parsed with the custom-scalars plugin's own protobuf."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = read_events(log_dir)
    if LAYOUT_TAG not in acc.Tags()["tensors"]:
        return []
    out = []
    for event in acc.Tensors(LAYOUT_TAG):
        layout = layout_pb2.Layout()
        layout.ParseFromString(event.tensor_proto.string_val[0])
        out.append(layout)
    return out


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory: Any) -> Dict[str, Any]:
    """Two lightwatch monitors in one Trainer: the layout must still be written once."""
    import pytorch_lightning as pl

    pl.seed_everything(0)
    tmp = tmp_path_factory.mktemp("layout")
    trainer = make_trainer(tmp, [GradientStatsMonitor(every_n_steps=2), ActivationStatsMonitor(every_n_steps=2)],
                           max_steps=6, log_every_n_steps=2)
    trainer.fit(Classifier(), make_loader(n=96))
    return {"log_dir": trainer.log_dir, "trainer": trainer}


def test_the_layout_is_written_once_per_run_with_the_four_panels(monitored_run: Dict[str, Any]) -> None:
    layouts = layout_events(monitored_run["log_dir"])
    assert len(layouts) == 1
    titles = [c.title for c in layouts[0].category]
    assert titles == ["lightwatch: loss and alerts", "lightwatch: gradients and updates", "lightwatch: layers",
                      "lightwatch: data quality"]
    tags = read_events(monitored_run["log_dir"]).Tags()["scalars"]
    # every chart regex of the gradient and layer panels matches tags this run really wrote
    for category in layouts[0].category[1:3]:
        for chart in category.chart:
            if "non-finite" in chart.title or "dead" in chart.title:
                continue
            assert any(re.match(rx, t) for rx in chart.multiline.tag for t in tags), chart.title


def test_the_charts_select_what_their_titles_say() -> None:
    charts = {c["title"]: c["tags"] for p in layout_panels() for c in p["charts"]}

    def matches(title: str, tag: str) -> bool:
        return any(re.match(rx, tag) for rx in charts[title])

    assert matches("loss (training and validation)", "val/loss")
    assert not matches("loss (training and validation)", "monitor.step/loss")  # lightwatch's own copy apart
    assert matches("gradient norm per parameter", "monitor.grad/net.0.weight/norm")
    assert not matches("gradient norm per parameter", "monitor.grad/_total/norm")
    assert matches("drift (PSI) per feature", "monitor.data/val/x.3/psi_ref")
    assert matches("alerts (value at each alert, by rule)", "monitor.alert/grad_nonfinite/value")
    assert [c["tags"][0] for p in layout_panels("lw") for c in p["charts"]][1].startswith(r"lw\.alert/")


def test_a_second_fit_on_the_same_logger_does_not_write_it_again(tmp_path: Any, seed: int) -> None:
    trainer = make_trainer(tmp_path, [GradientStatsMonitor(every_n_steps=2)], max_steps=2)
    trainer.fit(Classifier(), make_loader(n=32))
    again = make_trainer(tmp_path, [GradientStatsMonitor(every_n_steps=2)], max_steps=2, logger=trainer.logger)
    again.fit(Classifier(), make_loader(n=32))
    assert again.log_dir == trainer.log_dir and len(layout_events(trainer.log_dir)) == 1


def test_no_tensorboard_logger_no_layout_and_no_error(tmp_path: Any, seed: int) -> None:
    from pytorch_lightning.loggers import CSVLogger

    trainer = make_trainer(tmp_path, [GradientStatsMonitor(every_n_steps=2)], max_steps=2,
                           logger=CSVLogger(str(tmp_path)))
    trainer.fit(Classifier(), make_loader(n=32))
    assert not [f for _, _, files in os.walk(tmp_path) for f in files if "tfevents" in f]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.loads(response.read().decode("utf-8"))


def test_a_served_tensorboard_lists_the_layout_and_the_tags(monitored_run: Dict[str, Any]) -> None:
    logdir = os.path.dirname(monitored_run["log_dir"])
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "tensorboard.main"]
    proc = subprocess.Popen(cmd + ["--logdir", logdir, "--port", str(port), "--host", "127.0.0.1",
                                   "--load_fast=false", "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        layout: Dict[str, Any] = {}
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else "exited"
            try:
                if _get(port, "/data/plugins_listing").get("custom_scalars", {}).get("enabled"):
                    layout = _get(port, "/data/plugin/custom_scalars/layout")
                    if layout.get("category"):
                        break
            except OSError:
                pass
            time.sleep(0.5)
        assert [c["title"] for c in layout["category"]][0] == "lightwatch: loss and alerts"
        tags = _get(port, "/data/plugin/scalars/tags")
        run_tags = next(iter(tags.values()))
        assert "monitor.grad/_total/norm" in run_tags and "train/loss" in run_tags
        # the custom-scalars plugin answers a chart's regex with the matching series
        run = urllib.parse.quote(next(iter(tags)))
        rx = urllib.parse.quote(layout["category"][1]["chart"][0]["multiline"]["tag"][0])
        series = _get(port, f"/data/plugin/custom_scalars/scalars?run={run}&tag={rx}")
        assert series["regex_valid"] and "monitor.grad/_total/norm" in series["tag_to_events"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_layout_follows_the_tensorboard_logger_prefix(tmp_path: Any) -> None:
    """``TensorBoardLogger(prefix="x")`` writes ``x-monitor.grad/...``: the layout's regexes say so too."""
    from pytorch_lightning.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0, prefix="x")
    trainer = make_trainer(tmp_path, [GradientStatsMonitor(every_n_steps=5)], max_steps=5, logger=logger)
    trainer.fit(Classifier(), make_loader())
    log_dir = str(tmp_path / "tb" / "version_0")
    tags = [t for t in read_events(log_dir).Tags()["scalars"] if t.startswith("x-monitor.grad/_total/norm")]
    (layout,) = layout_events(log_dir)
    regex = layout.category[1].chart[0].multiline.tag[0]
    assert tags and all(re.match(regex, t) for t in tags), (regex, tags)
    assert regex == layout_panels("monitor", "x-")[1]["charts"][0]["tags"][0]
