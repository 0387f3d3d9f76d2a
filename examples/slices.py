"""A model that gets better on average while it gets worse for a minority: ``SliceMonitor`` says so.

The task: 16 features and a binary label ``w . x > 0``; 2% of the samples come from a minority site (``group``
1), drawn from the same distribution and labelled by the same rule, so a healthy model serves both groups
alike. The fault: from epoch 2 on, the minority site's sensor reports every reading negated, in training and in
validation. The model keeps learning the majority, so the overall validation accuracy keeps rising; on the
minority it collapses. ``SliceMonitor`` (set up from the Hydra policy ``monitor/slices=group``) computes the
accuracy per group with its interval, warns that the minority regressed while the aggregate hid it
(``slice_regressed``, at the first evaluation after the fault) and that it trails the overall accuracy
(``slice_gap``, two evaluations in a row), and ``MetricCheckpoint`` keeps the checkpoint with the best
worst-group accuracy (``monitor.slice/acc/_worst``), the one from before the fault.

Run it (CPU, about 15 seconds)::

    python examples/slices.py                  # the fault
    python examples/slices.py --healthy        # the same run without it: no alert
    tensorboard --logdir slices_logs           # monitor.slice/acc/<group>, /n, /ci_low, /ci_high, _worst, _gap

In Python the same callback is ``SliceMonitor(slice_by={"field": "group", "names": ["majority", "minority"]})``.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

FEATURES = 16
MINORITY_SHARE = 0.02


def make_groups(n: int, seed: int) -> Dict[str, torch.Tensor]:
    """``n`` samples: inputs ``x``, labels ``y``, group ``group`` (1: the minority, ``MINORITY_SHARE`` of them)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(FEATURES, generator=torch.Generator().manual_seed(12345))  # one rule for every split
    group = (torch.rand(n, generator=g) < MINORITY_SHARE).long()
    x = torch.randn(n, FEATURES, generator=g)
    return {"x": x, "y": (x @ weights > 0).long(), "group": group}


class GroupData(Dataset):
    """A split of the task as ``{"x", "y", "group"}`` samples; once ``fault[0]`` is set (a list shared with the
    callback that switches it on), the minority's inputs arrive negated."""

    def __init__(self, data: Dict[str, torch.Tensor], fault: Optional[List[bool]] = None) -> None:
        self.data, self.fault = data, fault

    def __len__(self) -> int:
        return int(self.data["y"].shape[0])

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        x = self.data["x"][i]
        if self.fault is not None and self.fault[0] and int(self.data["group"][i]) == 1:
            x = -x  # the minority site's sensor now reports every reading negated
        return {"x": x, "y": self.data["y"][i], "group": self.data["group"][i]}


def make_module(lr: float = 0.01) -> Any:
    """An MLP on ``batch["x"]``; ``validation_step`` logs ``val/acc`` and returns the logits (SliceMonitor's
    predictions)."""
    import pytorch_lightning as pl

    class GroupClassifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = nn.functional.cross_entropy(self(batch["x"]), batch["y"])
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            logits = self(batch["x"])
            self.log("val/acc", (logits.argmax(1) == batch["y"]).float().mean())
            return logits

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=lr)

    return GroupClassifier()


def fault_switch(fault: List[bool], epoch: Optional[int]) -> Any:
    """A callback that sets ``fault[0]`` at the start of training epoch ``epoch`` (never when ``None``)."""
    import pytorch_lightning as pl

    class FaultAt(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if epoch is not None and trainer.current_epoch >= epoch:
                fault[0] = True

    return FaultAt()


def monitors_from_policy(root: str) -> List[Any]:
    """The callbacks of the Hydra policy ``off`` plus ``monitor/slices=group`` and a best-worst-slice checkpoint."""
    from hydra import compose, initialize_config_module

    from lightwatch.hydra import instantiate_monitors

    with initialize_config_module("lightwatch.conf", version_base="1.3"):
        cfg = compose(overrides=[
            "+monitor=off", "monitor/slices=group", "monitor/checkpoint=best",
            "monitor.slices.slice_by={field: group, names: [majority, minority]}",
            "monitor.checkpoint.monitor=monitor.slice/acc/_worst", "monitor.checkpoint.mode=max",
            "monitor.checkpoint.save_top_k=1", "monitor.checkpoint.save_last=false",
            f"monitor.checkpoint.dirpath={os.path.join(root, 'checkpoints')}",
        ])
    return instantiate_monitors(cfg.monitor)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--healthy", action="store_true", help="the same run without the fault")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--logdir", default="slices_logs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    pl.seed_everything(0, verbose=False)
    name = "healthy" if args.healthy else "fault"
    fault = [False]
    train = DataLoader(GroupData(make_groups(4000, 1), fault), batch_size=64, shuffle=True)
    val = DataLoader(GroupData(make_groups(8000, 2), fault), batch_size=256)
    callbacks = monitors_from_policy(os.path.join(args.logdir, name))
    from lightwatch.callbacks import MetricCheckpoint, SliceMonitor

    slices = next(cb for cb in callbacks if isinstance(cb, SliceMonitor))
    checkpoint = next(cb for cb in callbacks if isinstance(cb, MetricCheckpoint))
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=50,
                         logger=TensorBoardLogger(args.logdir, name=name, version=0),
                         callbacks=[fault_switch(fault, None if args.healthy else 2), *callbacks])
    trainer.fit(make_module(), train, val)
    alerts_path = os.path.join(trainer.log_dir, "alerts.jsonl")
    alerts = [json.loads(line) for line in open(alerts_path)] if os.path.exists(alerts_path) else []
    r = slices.last_result
    print(f"\nlast evaluation: overall acc {r.overall['acc']:.3f}; " + ", ".join(
        f"{n} {v:.3f} [{lo:.3f}, {hi:.3f}] (n={int(c)})" for n, v, lo, hi, c in zip(
            slices.slice_names, r.values["acc"].tolist(), r.ci_low["acc"].tolist(), r.ci_high["acc"].tolist(),
            r.counts.tolist())))
    print(f"alerts: {[(a['rule'], a['subject'], a['severity'], 'epoch %d' % a['epoch']) for a in alerts] or 'none'}")
    print(f"best worst-group accuracy {float(checkpoint.best_model_score):.3f}: {checkpoint.best_model_path}")
    return {"alerts": alerts, "best_model_score": float(checkpoint.best_model_score)}


if __name__ == "__main__":
    main()
