"""Train a small MLP on scikit-learn's digits with lightwatch's monitors, composed with Hydra.

The config tree is ``conf/`` at the top of the repository (``train.yaml`` and the groups ``model``,
``data``, ``trainer``, ``fault``); the ``monitor`` group comes from lightwatch itself
(``pkg://lightwatch.conf``, added to the search path by lightwatch's Hydra plugin). After training it
prints where the logs are, the TensorBoard command, and a summary of the alerts read back from
``alerts.jsonl``::

    python examples/train.py                                   # monitor=default, no fault
    python examples/train.py fault=nan_batch monitor=strict    # plant a fault and watch it being caught
    python examples/train.py fault=lr_spike monitor=debug trainer=fast
    python examples/train.py monitor.every_n_steps=10 '~monitor/act_stats'
    python examples/train.py --cfg job                         # the composed config, nothing run
    python examples/train.py -m monitor=default,debug          # one run directory per policy

Faults (``fault=...``): ``none``, ``nan_batch``, ``lr_spike``, ``dead_units``, ``leaked_val``,
``frozen_layer`` (``examples/faults.py``).
"""
from __future__ import annotations

import collections
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightwatch import MonitorError
from lightwatch.hydra import instantiate_monitors

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


class DigitsData(pl.LightningDataModule):
    """scikit-learn's 8x8 digits as ``(x, y)`` batches: 64 float features, labels 0-9.

    Args:
        batch_size: samples per batch.
        val_fraction: share of the data held out for validation.
        standardize: scale each pixel by the training split's mean and std (constant pixels stay 0).
        split_seed: seed of the train/val split and of the shuffling.
        num_workers: DataLoader workers.
    """

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, standardize: bool = True,
                 split_seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"DigitsData: val_fraction must be in (0, 1), got {val_fraction}.")
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.standardize = bool(standardize)
        self.split_seed = int(split_seed)
        self.num_workers = int(num_workers)
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32)
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(round(self.val_fraction * len(x)))
        val_idx, train_idx = order[:n_val], order[n_val:]
        if self.standardize:
            mean = x[train_idx].mean(0)
            std = x[train_idx].std(0)
            x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.split_seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class DigitsClassifier(pl.LightningModule):
    """An MLP for the digits: ``Linear -> activation`` per hidden size, then ``Linear`` to 10 classes.

    Args:
        hidden: hidden layer widths.
        activation: ``relu``, ``tanh``, ``sigmoid`` or ``gelu``.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
    """

    def __init__(self, hidden: Sequence[int] = (64, 32), activation: str = "relu", lr: float = 0.05,
                 momentum: float = 0.9, weight_decay: float = 0.0, in_features: int = 64, classes: int = 10) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"DigitsClassifier: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        layers: List[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, int(size)), ACTIVATIONS[activation]()]
            width = int(size)
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: Any, split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{split}/loss", loss, prog_bar=split == "val")
        self.log(f"{split}/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=split == "val")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


# ---------------------------------------------------------------------------------------------- report
def read_alerts(path: str) -> List[Dict[str, Any]]:
    """The records of an ``alerts.jsonl`` file (an empty list when there is none)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def summarize_alerts(alerts: List[Dict[str, Any]], show: int = 5) -> List[str]:
    """Lines of text: counts by severity and by rule, then the first ``show`` messages."""
    if not alerts:
        return ["  none: nothing went wrong (alerts.jsonl is only written when something does)"]
    severities = collections.Counter(a["severity"] for a in alerts)
    rules = collections.Counter(a["rule"] for a in alerts)
    order = ("critical", "error", "warning", "info")
    lines = [
        "  by severity: " + ", ".join(f"{s} {severities[s]}" for s in order if severities[s]),
        "  by rule:     " + ", ".join(f"{rule} {n}" for rule, n in rules.most_common()),
        f"  first {min(show, len(alerts))}:",
    ]
    for a in alerts[:show]:
        subject = f" ({a['subject']})" if a.get("subject") else ""
        lines.append(f"    step {a['step']:>4} [{a['severity']}] {a['source']} {a['rule']}{subject}: {a['message']}")
    return lines


@dataclass
class RunResult:
    """What :func:`run` leaves behind: the Trainer, the alerts read back, and the printed report."""

    trainer: pl.Trainer
    out_dir: str
    alerts: List[Dict[str, Any]]
    report: str
    stopped: Optional[str] = None
    val_loss: Optional[float] = None


def run(cfg: DictConfig, out_dir: str, choices: Optional[Mapping[str, str]] = None) -> RunResult:
    """Train with a composed config, writing logs, checkpoints and ``alerts.jsonl`` into ``out_dir``.

    Args:
        cfg: the composed ``train`` config (groups ``model``, ``data``, ``trainer``, ``monitor``, ``fault``).
        out_dir: the run directory (Hydra's output directory under ``python examples/train.py``).
        choices: the selected option of each group, for the report (Hydra's ``runtime.choices``).
    """
    torch.set_num_threads(int(cfg.num_threads))
    # Monitors first: a `???` left in the policy or a value a callback rejects stops here, before any data.
    monitors = instantiate_monitors(cfg.monitor)
    fault = instantiate(cfg.fault) if cfg.get("fault") and "_target_" in cfg.fault else None

    pl.seed_everything(int(cfg.seed), workers=True)
    out = os.path.abspath(out_dir)
    logger = TensorBoardLogger(save_dir=out, name="", version="", default_hp_metric=False)
    data = DigitsData(**cfg.data)
    model = DigitsClassifier(**cfg.model)
    # The fault goes first so that the monitors see what it planted in the same step.
    callbacks = ([fault] if fault is not None else []) + monitors
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=out)

    stopped: Optional[str] = None
    try:
        trainer.fit(model, datamodule=data)
    except MonitorError as err:  # the `raise` action (policy `debug`): report what was found, then the summary
        stopped = f"lightwatch raised MonitorError: {err}"

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    alerts_path = os.path.join(out, "alerts.jsonl")
    alerts = read_alerts(alerts_path)
    choices = dict(choices or {})
    components = ", ".join(f"{k.split('/', 1)[1]}={v}" for k, v in sorted(choices.items())
                           if k.startswith("monitor/") and v != "None")
    lines = [
        "",
        f"lightwatch example finished: {trainer.global_step} steps, {trainer.current_epoch} epoch(s)"
        + "".join(f", {k} {v:.4f}" for k, v in sorted(metrics.items())),
        f"policy:      monitor={choices.get('monitor', '?')} ({components or 'no components'}), "
        f"fault={choices.get('fault', '?')}",
    ]
    if fault is not None:
        lines += [f"planted:     {p}" for p in fault.planted] or [f"planted:     nothing ({fault.describe()} not reached)"]
    else:
        lines.append("faults:      plant one to see it caught: "
                     "fault=nan_batch|lr_spike|dead_units|leaked_val|frozen_layer "
                     "(e.g. python examples/train.py fault=nan_batch monitor=strict)")
    if stopped:
        lines.append(f"stopped:     {stopped}")
    elif trainer.should_stop:
        lines.append("stopped:     early, by a `stop` action (see the alerts)")
    lines += [
        f"logs:        {out}",
        f"TensorBoard: tensorboard --logdir {out}",
        f"alerts:      {len(alerts)} in {alerts_path}",
        *summarize_alerts(alerts, int(cfg.show_alerts)),
    ]
    loss = metrics.get("val/loss")
    return RunResult(trainer, out, alerts, "\n".join(lines), stopped,
                     loss if loss is not None and math.isfinite(loss) else None)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    runtime = HydraConfig.get().runtime
    result = run(cfg, runtime.output_dir, {k: str(v) for k, v in runtime.choices.items() if not k.startswith("hydra/")})
    if result.trainer.is_global_zero:
        print(result.report, flush=True)
    return result.val_loss  # what a sweeper would minimise


if __name__ == "__main__":
    main()
