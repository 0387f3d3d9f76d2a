"""Exactness of a rollback from a checkpoint file: right after it, the model, the optimizer (Adam moments and
step counts), the LR scheduler and the RNG states equal the restored file's, bit for bit. (``skip_step``'s
bit-identical parameters and optimizer state, and the same action on every DDP rank, are in test_recovery.py.)
The global step and the data position are not rewound: the batches in between are not replayed (by design).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List

import pytorch_lightning as pl
import torch

from conftest import Classifier, make_loader, make_trainer
from lightwatch.callbacks import MetricCheckpoint, MonitorCallback
from lightwatch.core.recovery import recovery_for

torch.set_num_threads(1)


class AdamScheduled(Classifier):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def assert_equal_tree(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ta, tb = torch.as_tensor(a), torch.as_tensor(b)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_equal_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


class RollbackProbe(MonitorCallback):
    """Asks for a rollback at ``step`` and captures the whole training state right after it."""

    def __init__(self, step: int) -> None:
        super().__init__(every_n_steps=1)
        self.at = step
        self.captured: List[Dict[str, Any]] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)

        def capture(record: Any) -> None:
            self.captured.append({
                "source": record.source, "restored_step": record.restored_step,
                "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                # deep copies: the optimizer updates its tensors in place at the next steps
                "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
                "scheduler": copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict()),
                "torch_rng": torch.get_rng_state().clone(),
            })

        recovery_for(trainer).on_rollback(capture)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at:
            self.raise_alert(trainer, pl_module, rule="probe", severity="error", action="rollback",
                             message="rollback probe")


def test_a_rollback_restores_model_optimizer_scheduler_and_rng_bit_for_bit(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    probe = RollbackProbe(7)
    ck = MetricCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=3, save_top_k=-1)
    trainer = make_trainer(tmp_path, [probe, ck], max_steps=9, enable_checkpointing=True)
    trainer.fit(AdamScheduled(), make_loader())
    (state,) = probe.captured
    assert state["restored_step"] == 6 and os.path.exists(state["source"])
    saved = torch.load(state["source"], map_location="cpu", weights_only=True)
    assert saved["global_step"] == 6
    assert_equal_tree(state["state_dict"], saved["state_dict"], "model")
    assert_equal_tree(state["optimizer"], saved["optimizer_states"][0], "optimizer")
    assert_equal_tree(state["scheduler"], saved["lr_schedulers"][0], "scheduler")
    assert torch.equal(state["torch_rng"], saved["lightwatch"]["rng"]["torch"])
