"""``PrometheusExporter``: lightwatch's values and alert counts as Prometheus metrics (HTTP, textfile or push)."""
from __future__ import annotations

import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

import torch

from lightwatch.core.alerts import Alert, alert_log
from lightwatch.core.callback import MonitorCallback
from lightwatch.core.lightning import bind, default_package
from lightwatch.core.runtime import run_dir

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["PrometheusExporter", "DEFAULT_METRICS", "MODES"]

logger = logging.getLogger("lightwatch")

MODES = ("http", "textfile", "push")

#: ``lightwatch_<name>`` gauge -> the callback metrics it is read from (the first one present); ``{prefix}`` is
#: the monitors' tag prefix. Base units: seconds, bytes, ratios.
DEFAULT_METRICS: Dict[str, List[str]] = {
    "loss": ["train/loss", "train_loss", "loss"],
    "grad_norm": ["{prefix}.grad/_total/norm"],
    "step_seconds": ["{prefix}.system/step/seconds"],
    "data_wait_ratio": ["{prefix}.system/step/data_share"],
    "samples_per_second": ["{prefix}.system/throughput/samples_per_second"],
    "tokens_per_second": ["{prefix}.system/throughput/tokens_per_second"],
    "resident_memory_bytes": ["{prefix}.system/process/rss_bytes"],
    "cuda_allocated_bytes": ["{prefix}.system/cuda/allocated_bytes"],
    "cuda_reserved_bytes": ["{prefix}.system/cuda/reserved_bytes"],
    "cuda_peak_bytes": ["{prefix}.system/cuda/peak_bytes"],
}


def _require_prometheus_client() -> Any:
    try:
        import prometheus_client
    except ImportError as err:
        raise ImportError("PrometheusExporter needs prometheus-client: pip install 'lightwatch[prometheus]' "
                          "(or prometheus-client).") from err
    return prometheus_client


class _PrometheusExporter(MonitorCallback):
    """Exposes a chosen set of lightwatch's values to Prometheus, for alerting from outside the job.

    Metrics (gauges unless named ``_total``; all with the label ``job``, and ``rank`` where every rank exports):

    - ``lightwatch_step`` and ``lightwatch_last_step_timestamp_seconds``: the global step and the Unix time of the
      last completed training step, updated at every step (a host float, no tensor, no I/O): the "is it alive"
      signal;
    - ``lightwatch_loss``, ``lightwatch_loss_nonfinite`` (1 when the loss is NaN or infinite),
      ``lightwatch_grad_norm``, ``lightwatch_step_seconds``, ``lightwatch_data_wait_ratio``,
      ``lightwatch_samples_per_second``, ``lightwatch_tokens_per_second``, ``lightwatch_resident_memory_bytes``,
      ``lightwatch_cuda_{allocated,reserved,peak}_bytes`` (:data:`DEFAULT_METRICS`; values other lightwatch
      monitors computed, read from ``trainer.callback_metrics`` at logged steps), and any ``extra_metrics``;
    - ``lightwatch_alerts_total{rule, severity}``: alerts raised by every lightwatch callback.

    Modes: ``http`` serves ``/metrics`` on ``port`` (rank 0, or every rank on ``port + local rank`` with
    ``all_ranks``); ``textfile`` writes ``textfile`` (default ``<log dir>/lightwatch.prom``, atomically) for
    node_exporter's textfile collector; ``push`` sends to a Pushgateway at ``pushgateway`` under ``job`` (grouped
    by ``rank``). Files and pushes happen at logged steps and at the end of fit. A Pushgateway that cannot be
    reached is logged once and never stops training.

    Args:
        mode: ``http``, ``textfile`` or ``push``.
        port: HTTP port (``http``); 0 takes any free one (``url`` says which).
        addr: HTTP address to bind (``http``).
        textfile: path of the textfile (``textfile``); ``None``: ``<log dir>/lightwatch.prom``.
        pushgateway: Pushgateway address, e.g. ``http://pushgateway:9091`` (``push``).
        job: the ``job`` label (and the Pushgateway job).
        all_ranks: every rank exports (with a ``rank`` label) instead of rank 0 alone.
        extra_metrics: more gauges, ``{prometheus name: callback metric name}`` (``lightwatch_`` is prepended).
        every_n_steps: interval of the textfile writes and pushes, and of reading the values; ``None`` follows
            ``Trainer(log_every_n_steps)``.
        prefix: the tag prefix of the monitors whose values are read.
        push_timeout_seconds: timeout of one push.

    Example:
        >>> from lightwatch.callbacks import PrometheusExporter
        >>> exporter = PrometheusExporter(mode="textfile", textfile="/tmp/lightwatch.prom",
        ...                               extra_metrics={"val_accuracy": "val/acc"})
        >>> exporter.mode, sorted(exporter.sources)[:2]
        ('textfile', ['cuda_allocated_bytes', 'cuda_peak_bytes'])
    """

    def __init__(
        self,
        mode: str = "http",
        port: int = 9464,
        addr: str = "0.0.0.0",
        textfile: Optional[str] = None,
        pushgateway: Optional[str] = None,
        job: str = "lightwatch",
        all_ranks: bool = False,
        extra_metrics: Optional[Mapping[str, str]] = None,
        every_n_steps: Optional[int] = None,
        prefix: str = "monitor",
        push_timeout_seconds: float = 5.0,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, histogram_every_n_steps=0, prefix=prefix)
        if mode not in MODES:
            raise ValueError(f"PrometheusExporter: mode must be one of {', '.join(MODES)}, got {mode!r}.")
        if mode == "push" and not pushgateway:
            raise ValueError("PrometheusExporter(mode='push') needs pushgateway='http://host:9091' (the "
                             "Pushgateway's address).")
        self.mode, self.port, self.addr, self.textfile = mode, int(port), str(addr), textfile
        self.pushgateway, self.job, self.all_ranks = pushgateway, str(job), bool(all_ranks)
        self.push_timeout_seconds = float(push_timeout_seconds)
        self.sources: Dict[str, List[str]] = {name: [s.format(prefix=prefix) for s in keys]
                                              for name, keys in DEFAULT_METRICS.items()}
        for name, key in dict(extra_metrics or {}).items():
            if not name.replace("_", "").isalnum() or name[0].isdigit():
                raise ValueError(f"PrometheusExporter(extra_metrics=...): {name!r} is not a metric name: use "
                                 f"letters, digits and underscores (lightwatch_ is prepended).")
            self.sources[name] = [str(key)]
        self.registry: Any = None
        self.server: Any = None
        self.url: Optional[str] = None
        self._gauges: Dict[str, Any] = {}
        self._labels: Dict[str, str] = {}
        self._active = False
        self._push_failed = False
        self._trainer: Any = None

    def __getstate__(self) -> Dict[str, Any]:
        # the server, registry and metrics hold locks and sockets of this process: a copy sets them up again
        state = dict(self.__dict__)
        state.update(registry=None, server=None, url=None, _gauges={}, _trainer=None, _active=False)
        state.pop("_alerts", None)
        return state

    # ---------------------------------------------------------------------------------------- set-up
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        prom = _require_prometheus_client()
        rank = int(getattr(trainer, "global_rank", 0))
        self._active = self.all_ranks or rank == 0
        if not self._active:
            return
        self._trainer = trainer
        self.registry = prom.CollectorRegistry()
        self._labels = {"job": self.job, **({"rank": str(rank)} if self.all_ranks else {})}
        names = list(self._labels)

        def gauge(name: str, doc: str) -> Any:
            return prom.Gauge(f"lightwatch_{name}", doc, names, registry=self.registry).labels(**self._labels)

        self._gauges = {
            "step": gauge("step", "Global training step."),
            "last_step_timestamp_seconds": gauge("last_step_timestamp_seconds",
                                                 "Unix time at which the last training step completed."),
            "loss_nonfinite": gauge("loss_nonfinite", "1 when the last logged loss is NaN or infinite."),
        }
        for name, keys in self.sources.items():
            self._gauges[name] = gauge(name, f"lightwatch value read from {' or '.join(keys)}.")
        self._alerts = prom.Counter("lightwatch_alerts", "Alerts raised by lightwatch callbacks.",
                                    names + ["rule", "severity"], registry=self.registry)
        alert_log(trainer).subscribe(self._on_alert)
        if self.mode == "http" and self.server is None:
            port = self.port + (int(getattr(trainer, "local_rank", 0)) if self.all_ranks else 0)
            try:
                self.server, _ = prom.start_http_server(port, addr=self.addr, registry=self.registry)
            except OSError as err:  # a taken port must not end the training it would only have watched
                logger.error("lightwatch PrometheusExporter: cannot serve on %s:%d (%s); no /metrics for this run. "
                             "Choose another `port` (0: any free port) or mode='textfile'.", self.addr, port, err)
                return
            self.url = f"http://{self.addr if self.addr not in ('0.0.0.0', '') else '127.0.0.1'}:" \
                       f"{self.server.server_port}/metrics"
            logger.info("lightwatch PrometheusExporter: serving %s", self.url)
        if self.mode == "textfile" and self.textfile is None:
            self.textfile = os.path.join(run_dir(trainer), "lightwatch.prom")

    def _on_alert(self, alert: Alert) -> None:
        self._alerts.labels(**self._labels, rule=alert.rule, severity=alert.severity).inc()

    # ----------------------------------------------------------------------------------------- steps
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._active:
            return
        self._gauges["step"].set(int(getattr(trainer, "global_step", 0)))
        self._gauges["last_step_timestamp_seconds"].set(time.time())
        if self.sampled:
            self._read_values(trainer)
            self._export()

    def _read_values(self, trainer: Any) -> None:
        metrics = getattr(trainer, "callback_metrics", None) or {}
        found: Dict[str, Any] = {}
        for name, keys in self.sources.items():
            key = next((k for k in keys if k in metrics), None)
            if key is not None:
                found[name] = metrics[key]
        tensors = {n: v for n, v in found.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        values = {n: float(v) for n, v in found.items() if isinstance(v, (int, float))}
        if tensors:  # one device-to-host read for all of them
            host = torch.stack([v.detach().reshape(()).float().cpu() for v in tensors.values()]).tolist()
            values.update(zip(tensors, host))
        for name, value in values.items():
            self._gauges[name].set(value)
        if "loss" in values:
            self._gauges["loss_nonfinite"].set(0.0 if math.isfinite(values["loss"]) else 1.0)

    def _export(self) -> None:
        prom = _require_prometheus_client()
        if self.mode == "textfile" and self.textfile:
            os.makedirs(os.path.dirname(os.path.abspath(self.textfile)), exist_ok=True)
            prom.write_to_textfile(self.textfile, self.registry)
        elif self.mode == "push":
            grouping = {"rank": self._labels.get("rank", "0")}
            try:
                prom.push_to_gateway(self.pushgateway, job=self.job, registry=self.registry, grouping_key=grouping,
                                     timeout=self.push_timeout_seconds)
                self._push_failed = False
            except Exception as err:  # monitoring must not end training
                if not self._push_failed:
                    logger.warning("lightwatch PrometheusExporter: push to %s failed (%s); retrying at the next "
                                   "logged step.", self.pushgateway, err)
                self._push_failed = True

    # ------------------------------------------------------------------------------------------- end
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._active:
            self._read_values(trainer)
            self._export()
        self._close(trainer)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if self._active:
            self._export()
        self._close(trainer)

    def _close(self, trainer: Any) -> None:
        if self._active:
            alert_log(trainer).unsubscribe(self._on_alert)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


PrometheusExporter = bind(_PrometheusExporter, default_package(), module=__name__)
