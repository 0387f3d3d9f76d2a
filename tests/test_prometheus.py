"""PrometheusExporter: the HTTP endpoint scraped during a real fit, the textfile and a push to a local receiver,
each parsed with prometheus_client's own parser."""
from __future__ import annotations

import http.server
import threading
import urllib.request
from typing import Any, Dict, List

import pytest
import pytorch_lightning as pl

from conftest import Classifier, make_loader, make_trainer
from lightwatch.callbacks import PrometheusExporter, SystemMonitor
from lightwatch.core.alerts import Alert, alert_log

prom_parser = pytest.importorskip("prometheus_client.parser")


def parse(text: str) -> Dict[str, List[Any]]:
    """Samples by name: ``{name: [(labels, value), ...]}``."""
    out: Dict[str, List[Any]] = {}
    for family in prom_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


class Scraper(pl.Callback):
    """At step ``at``: raises an alert through the run's alert log, then scrapes the endpoint."""

    def __init__(self, exporter: Any, at: int) -> None:
        self.exporter, self.at, self.text = exporter, at, ""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at:
            alert_log(trainer).publish(Alert("Test", "input_bound", "warning", "a test alert", step=self.at))
            with urllib.request.urlopen(self.exporter.url, timeout=5) as response:
                self.text = response.read().decode()


def check_run_values(samples: Dict[str, List[Any]], step: int) -> None:
    assert samples["lightwatch_step"] == [({"job": "lightwatch"}, step)]
    assert samples["lightwatch_last_step_timestamp_seconds"][0][1] > 1.6e9
    loss = samples["lightwatch_loss"][0][1]
    assert 0 < loss < 5 and samples["lightwatch_loss_nonfinite"][0][1] == 0
    assert samples["lightwatch_samples_per_second"][0][1] > 0
    assert samples["lightwatch_resident_memory_bytes"][0][1] > 2 ** 20


def test_http_endpoint_is_scraped_during_a_real_fit(tmp_path: Any) -> None:
    exporter = PrometheusExporter(mode="http", port=0, addr="127.0.0.1")
    scraper = Scraper(exporter, at=12)
    make_trainer(tmp_path, [SystemMonitor(every_n_steps=5), exporter, scraper], max_steps=15).fit(
        Classifier(), make_loader())
    samples = parse(scraper.text)
    check_run_values(samples, 12)
    assert ({"job": "lightwatch", "rule": "input_bound", "severity": "warning"}, 1.0) in \
        samples["lightwatch_alerts_total"]
    assert exporter.server is None  # shut down at the end of fit
    with pytest.raises(OSError):
        urllib.request.urlopen(scraper.exporter.url, timeout=2)


def test_textfile_parses_the_same_way(tmp_path: Any) -> None:
    path = tmp_path / "node" / "lightwatch.prom"
    exporter = PrometheusExporter(mode="textfile", textfile=str(path), all_ranks=True)
    make_trainer(tmp_path, [SystemMonitor(every_n_steps=5), exporter], max_steps=15).fit(Classifier(), make_loader())
    samples = parse(path.read_text())
    assert samples["lightwatch_step"] == [({"job": "lightwatch", "rank": "0"}, 15)]
    assert samples["lightwatch_loss"][0][1] > 0


class Receiver(http.server.BaseHTTPRequestHandler):
    bodies: List[Any] = []

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        Receiver.bodies.append((self.path, self.rfile.read(length).decode()))
        self.send_response(200)
        self.end_headers()

    do_POST = do_PUT

    def log_message(self, *args: Any) -> None:
        pass


def test_push_reaches_a_gateway_at_logged_steps_and_a_dead_one_never_stops_training(tmp_path: Any,
                                                                                    caplog: Any) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Receiver.bodies = []
    try:
        exporter = PrometheusExporter(mode="push", pushgateway=f"http://127.0.0.1:{server.server_port}", job="run1")
        make_trainer(tmp_path / "a", [SystemMonitor(every_n_steps=5), exporter], max_steps=15).fit(
            Classifier(), make_loader())
    finally:
        server.shutdown()
        server.server_close()
    # logged steps 4, 9, 14 and the end of fit
    assert len(Receiver.bodies) == 4 and {p for p, _ in Receiver.bodies} == {"/metrics/job/run1/rank/0"}
    check_run_values(parse(Receiver.bodies[-1][1].replace("job=\"run1\"", "job=\"lightwatch\"")), 15)

    dead = PrometheusExporter(mode="push", pushgateway=f"http://127.0.0.1:{server.server_port}",
                              push_timeout_seconds=0.5)
    trainer = make_trainer(tmp_path / "b", [dead], max_steps=10)
    with caplog.at_level("WARNING", logger="lightwatch"):
        trainer.fit(Classifier(), make_loader())
    assert trainer.global_step == 10
    assert sum("push to" in r.getMessage() for r in caplog.records) == 1  # said once, not at every step


def test_bad_settings_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="needs pushgateway="):
        PrometheusExporter(mode="push")
    with pytest.raises(ValueError, match="mode must be one of http, textfile, push"):
        PrometheusExporter(mode="udp")
