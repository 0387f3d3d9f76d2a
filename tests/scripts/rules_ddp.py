"""Two-process DDP run (launch with torchrun): a fault on rank 1 only must lead to the same action on both ranks.

Scenario ``skip``: rank 1's batch at step 20 is scaled by 1e3 (a loss spike only that rank sees); a per-step
spike rule drops the update on both ranks. Scenario ``rollback``: rank 1's batch at step 22 is NaN; a
per-step non-finite rule rolls both ranks back to the same in-memory snapshot. Scenario ``checkpoint``: the
same fault, with a ``MetricCheckpoint`` to roll back to (every rank loads the file rank 0 names). Each rank
writes ``rank<R>.json`` with what it did and hashes of its weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from typing import Any, Dict, List, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from conftest import Classifier, make_loader, shutdown_distributed
from lightwatch.callbacks import MetricCheckpoint, MetricMonitor

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
MAX_STEPS = 40


def weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class OneRankFault(Classifier):
    def __init__(self, at: int, fault: str) -> None:
        super().__init__()
        self.at, self.fault = at, fault

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_rank == 1 and self.trainer.global_step == self.at:
            x = x * 1e3 if self.fault == "spike" else x * float("nan")
        return super().training_step((x, y), batch_idx)


class Probe(pl.Callback):
    def __init__(self, monitor: MetricMonitor) -> None:
        self.monitor = monitor
        self.rows: List[Tuple[int, int, str]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        self.rows.append((trainer.global_step, self.monitor.recovery.rollbacks, weights_hash(pl_module)))


def run(out: str, scenario: str) -> Dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    if scenario == "skip":
        rules = {"spike": {"metric": "monitor.step/loss", "kind": "spike", "action": "skip_step"}}
        model = OneRankFault(at=20, fault="spike")
    else:
        rules = {"nan": {"metric": "monitor.step/loss", "kind": "nonfinite", "action": "rollback",
                         "check_on": ["every_step"]}}
        model = OneRankFault(at=22, fault="nan")
    monitor = MetricMonitor(rules=rules, builtin_rules=False, every_n_steps=5)
    probe = Probe(monitor)
    callbacks: List[pl.Callback] = [monitor, probe]
    if scenario == "checkpoint":
        callbacks.append(MetricCheckpoint(dirpath=os.path.join(out, scenario, "ckpt"), every_n_train_steps=10))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=MAX_STEPS, log_every_n_steps=5,
        callbacks=callbacks, logger=TensorBoardLogger(out, name=scenario, version=0),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=scenario == "checkpoint",
    )
    trainer.fit(model, make_loader(n=2 * 16 * MAX_STEPS, shuffle=False))
    result: Dict[str, Any] = {
        "poisoned_rank": 1,
        "global_step": int(trainer.global_step),
        "max_steps": MAX_STEPS,
        "final": weights_hash(model),
        "actions": monitor.recovery.skipped_steps if scenario == "skip" else monitor.recovery.rollbacks,
    }
    if scenario != "skip" and monitor.recovery.history:
        restored = monitor.recovery.history[0].restored_step
        result["snapshot"] = next(h for gs, n, h in probe.rows if gs == restored and n == 0)
        result["after_rollback"] = next(h for gs, n, h in probe.rows if n == 1)
        result["source"] = monitor.recovery.history[0].source
    return result


def main() -> None:
    out = sys.argv[1]
    results = {scenario: run(out, scenario) for scenario in ("skip", "rollback", "checkpoint")}
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
    shutdown_distributed()
