"""Plant data faults in scikit-learn's digits and watch ``DataQualityMonitor`` report them.

Each fault is planted in the data a small MLP trains on (1797 8x8 digits, split 80/20, standardised with
the training split's statistics), then the alerts read back from ``alerts.jsonl`` are printed::

    python examples/data_faults.py                 # a healthy run first, then every fault, one run each
    python examples/data_faults.py --fault leak    # one fault: none, nan, leak, shift, scale
    python examples/data_faults.py --out /tmp/dq   # where runs are written (default: runs/data_faults)

Faults:

- ``nan``: a pixel of 3 training images is NaN. The check ``nonfinite`` uses the action ``skip_step``, so
  the updates of the batches holding them are dropped and training carries on (the run's model stays
  finite); the alert names the pixel and the first step;
- ``leak``: 60 validation images are copies of training images: ``leakage`` reports 60 / 359;
- ``shift``: 80% of the validation images of digits 0-4 are dropped, so the validation labels no longer
  look like the training labels: ``label_shift``;
- ``scale``: the validation images are not standardised (raw 0-16 pixel values): ``drift`` against the
  training split, ``drift_ref`` against the healthy profile, and ``out_of_range`` against the healthy
  profile's ranges (without a reference: the ranges learned in the first training epoch, from the second
  validation run on).

The healthy run writes ``data_profile.json``; every fault run uses it as its ``reference`` as well, so
faults also show up as drift against the healthy profile (``drift_ref``, ``label_shift_ref``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightwatch.callbacks import DataQualityMonitor

FAULTS = ("none", "nan", "leak", "shift", "scale")


class MLP(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def digits(fault: str) -> Tuple[TensorDataset, TensorDataset, str]:
    """Train and validation sets of the digits, with ``fault`` planted; and what was planted."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    val_idx, train_idx = order[:360], order[360:]
    mean, std = x[train_idx].mean(0), x[train_idx].std(0).clamp_min(1e-6)
    tx, ty = (x[train_idx] - mean) / std, y[train_idx]
    vx, vy = (x[val_idx] - mean) / std, y[val_idx]
    planted = "nothing"
    if fault == "nan":
        tx[[100, 700, 1200], 27] = float("nan")
        planted = "NaN in pixel 27 of training images 100, 700 and 1200"
    elif fault == "leak":
        vx[:60], vy[:60] = tx[:60], ty[:60]
        planted = "60 validation images replaced by training images"
    elif fault == "shift":
        g = torch.Generator().manual_seed(1)
        keep = (vy >= 5) | (torch.rand(len(vy), generator=g) < 0.2)
        vx, vy = vx[keep], vy[keep]
        planted = f"80% of the validation digits 0-4 dropped ({len(vy)} validation images left)"
    elif fault == "scale":
        vx = x[val_idx].clone()
        planted = "validation images left unstandardised (raw 0-16 pixel values)"
    return TensorDataset(tx, ty), TensorDataset(vx, vy), planted


def run(fault: str, out: str, reference: Optional[str], epochs: int) -> List[Dict[str, Any]]:
    train, val, planted = digits(fault)
    pl.seed_everything(0, verbose=False)
    monitor = DataQualityMonitor(
        reference=reference,
        checks={"nonfinite": {"action": "skip_step"}},  # drop the update of a NaN batch and carry on
        profile_path=os.path.join(out, fault, "data_profile.json"),
    )
    trainer = pl.Trainer(
        max_epochs=epochs, log_every_n_steps=10, accelerator="cpu", devices=1, callbacks=[monitor],
        logger=TensorBoardLogger(out, name=fault, version=0), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )
    model = MLP()
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=64))
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    path = os.path.join(out, fault, "version_0", "alerts.jsonl")
    alerts = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    print(f"\n=== fault: {fault} -- planted: {planted}")
    print(f"    logs: {os.path.join(out, fault, 'version_0')}   weights finite after training: {finite}")
    if not alerts:
        print("    no alerts")
    for a in alerts:
        print(f"    step {a['step']:>4}  {a['severity']:<8} {a['rule']:<22} {a['subject'] or '':<14} "
              f"{a['message'][:150]}{'...' if len(a['message']) > 150 else ''}")
    return alerts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fault", choices=FAULTS + ("all",), default="all")
    ap.add_argument("--out", default=os.path.join("runs", "data_faults"))
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # the alerts are printed below; Lightning's own tips are not needed
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightwatch").setLevel(logging.CRITICAL)

    # the healthy run comes first: its profile is the reference of the others
    reference = os.path.join(args.out, "none", "data_profile.json")
    faults = FAULTS if args.fault == "all" else ("none", args.fault) if args.fault != "none" else ("none",)
    for fault in faults:
        run(fault, args.out, None if fault == "none" else reference, args.epochs)
    print(f"\nTensorBoard: tensorboard --logdir {args.out}   (section monitor.data, alerts under monitor.alert)")


if __name__ == "__main__":
    main()
