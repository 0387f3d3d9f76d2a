"""The hidden minority regression: SliceMonitor on a synthetic task, a faulty run against its healthy twin.

The task (``examples/slices.py``): 16 features, a binary label ``w . x > 0``; 98% of the samples are the majority
group and 2% the minority (group 1), drawn from the same distribution and labelled by the same rule: a healthy
model serves both groups alike. The model (an MLP) learns the
majority slowly, so the overall accuracy rises for many epochs. The fault: from epoch ``drop_at`` on, the
minority's inputs arrive negated (its site's sensor was rewired), in training and validation alike: the model gets
the minority wrong, its validation accuracy collapses, while the overall accuracy keeps rising. The
healthy twin is the same run, same seed, without the fault.

Measured per seed: at which evaluation (counted from the first evaluation after the fault) ``slice_gap`` and
``slice_regressed`` fired, whether they named the minority, at which severity, the overall accuracy before the fault
and at detection, and every alert of the healthy twin (there must be none).

Run: ``OMP_NUM_THREADS=1 python bench/slice_faults.py`` (5 seeds, about a minute on one CPU core);
``--seeds 0,1`` for fewer, ``--out results.json`` to keep the records, ``--families`` to add healthy runs of three
other model families (MLPs with tanh, deeper ReLU, sigmoid at a high learning rate; 3 classes, 8 random groups,
rules on accuracy and macro F1, 10 evaluations each): there must be no alert there either.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (os.path.join(ROOT, "src"), os.path.join(ROOT, "examples")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from slices import GroupData, fault_switch, make_groups, make_module  # noqa: E402  (examples/slices.py: the task)


def run_once(seed: int, drop_at: Optional[int], root: str, epochs: int = 6, train_size: int = 4000,
             val_size: int = 8000, extra_callbacks: Optional[List[Any]] = None,
             trainer_kwargs: Optional[Dict[str, Any]] = None, **monitor_kwargs: Any) -> Dict[str, Any]:
    """One run; ``drop_at=None`` is the healthy twin. Returns alerts, per-evaluation values and settings.

    ``monitor_kwargs`` go to ``SliceMonitor`` (default: slices by ``batch["group"]``, named majority and minority),
    ``trainer_kwargs`` to the ``Trainer``."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightwatch.callbacks import SliceMonitor

    pl.seed_everything(seed, verbose=False)
    fault = [False]
    train = DataLoader(GroupData(make_groups(train_size, 1000 + seed), fault), batch_size=64, shuffle=True)
    val = DataLoader(GroupData(make_groups(val_size, 2000 + seed), fault), batch_size=256)
    monitor_kwargs.setdefault("slice_by", {"field": "group", "names": ["majority", "minority"]})
    monitor = SliceMonitor(**monitor_kwargs)
    history: List[Dict[str, float]] = []

    class Record(pl.Callback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking or monitor.last_result is None:
                return
            r = monitor.last_result
            history.append({"epoch": trainer.current_epoch, "overall": r.overall["acc"],
                            "majority": float(r.values["acc"][0]), "minority": float(r.values["acc"][1])})

    settings: Dict[str, Any] = dict(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                                    enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                                    logger=TensorBoardLogger(root, name="tb", version=0), log_every_n_steps=50)
    settings.update(trainer_kwargs or {})
    trainer = pl.Trainer(callbacks=[fault_switch(fault, drop_at), monitor, Record(), *(extra_callbacks or [])], **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(make_module(), train, val)
    alerts = []
    for path in [os.path.join(root, "tb", "version_0", "alerts.jsonl")]:
        if os.path.exists(path):
            with open(path) as fh:
                alerts = [json.loads(line) for line in fh]
    return {"seed": seed, "drop_at": drop_at, "history": history, "alerts": alerts, "log_dir": trainer.log_dir,
            "epochs_run": trainer.current_epoch, "monitor": monitor}


def summarize(run: Dict[str, Any]) -> Dict[str, Any]:
    """When each rule fired, counted in evaluations after the fault (1: the first evaluation after it)."""
    fired: Dict[str, Dict[str, Any]] = {}
    drop = run["drop_at"]
    for a in run["alerts"]:
        if a["rule"] in ("slice_gap", "slice_regressed") and a["rule"] not in fired:
            fired[a["rule"]] = {"epoch": a["epoch"], "subject": a["subject"], "severity": a["severity"],
                                "evaluations_after_drop": None if drop is None else a["epoch"] - drop + 1}
    out: Dict[str, Any] = {"seed": run["seed"], "fired": fired,
                           "alerts": [(a["rule"], a["subject"], a["epoch"]) for a in run["alerts"]]}
    if drop is not None and run["history"]:
        before = run["history"][drop - 1]
        first = min((f["epoch"] for f in fired.values()), default=None)
        at = run["history"][first] if first is not None and first < len(run["history"]) else run["history"][-1]
        out.update(overall_before=before["overall"], overall_at_detection=at["overall"],
                   minority_before=before["minority"], minority_at_detection=at["minority"])
    return out


FAMILIES: Dict[str, Dict[str, Any]] = {
    "mlp_tanh": {"activation": "tanh", "depth": 2, "lr": 0.05},
    "mlp_relu_deep": {"activation": "relu", "depth": 3, "lr": 0.05},
    "mlp_sigmoid_high_lr": {"activation": "sigmoid", "depth": 2, "lr": 0.5},
}


def healthy_families(seeds: List[int], epochs: int = 10) -> int:
    """False alarms on healthy runs of other model families: a 3-class task, 8 random groups (no real gap), rules
    on accuracy and macro F1, ``epochs`` evaluations per run. Returns the number of alerts (should be 0)."""
    import pytorch_lightning as pl
    from torch import nn
    from torch.utils.data import TensorDataset

    from lightwatch.callbacks import SliceMonitor

    class Family(pl.LightningModule):
        def __init__(self, activation: str, depth: int, lr: float) -> None:
            super().__init__()
            act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[activation]
            layers: List[nn.Module] = []
            width = 8
            for _ in range(depth):
                layers += [nn.Linear(width, 32), act()]
                width = 32
            self.net, self.lr = nn.Sequential(*layers, nn.Linear(width, 3)), lr

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    def loader(n: int, seed: int, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 8, generator=g)
        return DataLoader(TensorDataset(x, x[:, :3].argmax(1), torch.randint(0, 8, (n,), generator=g)), batch_size=64,
                          shuffle=shuffle)

    total = 0
    for name, family in FAMILIES.items():
        for seed in seeds:
            pl.seed_everything(seed, verbose=False)
            with tempfile.TemporaryDirectory() as root:
                monitor = SliceMonitor(slice_by=2, max_values=8, metrics=["acc", "f1"], num_classes=3, rules={
                    "gap_acc": {"kind": "slice_gap"}, "regressed_acc": {"kind": "slice_regressed"},
                    "gap_f1": {"kind": "slice_gap", "metric": "f1"},
                    "regressed_f1": {"kind": "slice_regressed", "metric": "f1"}})
                trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                                     enable_model_summary=False, enable_checkpointing=False, logger=False,
                                     default_root_dir=root, num_sanity_val_steps=0, callbacks=[monitor])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    trainer.fit(Family(**family), loader(1024, seed, True), loader(2000, 100 + seed, False))
                path = os.path.join(root, "alerts.jsonl")
                alerts = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
                alerts = [a for a in alerts if a["rule"] != "slice_unassigned"]
            total += len(alerts)
            print(json.dumps({"family": name, "seed": seed, "alerts": [(a["rule"], a["subject"]) for a in alerts]}))
    return total


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--drop-at", type=int, default=2, help="epoch from which the minority's inputs are negated")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default=None)
    parser.add_argument("--families", action="store_true",
                        help="also: healthy runs of three other model families, 8 random groups (no alert expected)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import pytorch_lightning as pl

    print(f"# slice faults: python {platform.python_version()}, torch {torch.__version__}, "
          f"lightning {pl.__version__}, {platform.processor() or platform.machine()}")
    records = []
    start = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for drop in (args.drop_at, None):
            with tempfile.TemporaryDirectory() as root:
                record = summarize(run_once(seed, drop, root, epochs=args.epochs))
            record["run"] = "drop" if drop is not None else "healthy"
            records.append(record)
            print(json.dumps(record))
    drops = [r for r in records if r["run"] == "drop"]
    healthy = [r for r in records if r["run"] == "healthy"]
    caught = [r for r in drops if any(f["subject"] == "minority" and f["severity"] == "warning"
                                      and f["evaluations_after_drop"] is not None and f["evaluations_after_drop"] <= 2
                                      for f in r["fired"].values())]
    rose = [r for r in drops if r.get("overall_at_detection", 0) > r.get("overall_before", 1)]
    false_alarms = sum(len(r["alerts"]) for r in healthy)
    print(f"drop runs caught at warning within 2 evaluations, naming the minority: {len(caught)}/{len(drops)}; "
          f"overall accuracy rose between the fault and detection in {len(rose)}/{len(drops)}; "
          f"alerts in the healthy twins: {false_alarms}; {time.perf_counter() - start:.0f}s")
    if args.families:
        family_alarms = healthy_families([int(s) for s in args.seeds.split(",")])
        print(f"alerts in healthy runs of other model families: {family_alarms}")
        false_alarms += family_alarms
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(records, fh, indent=1)
    return 0 if len(caught) == len(drops) and false_alarms == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
