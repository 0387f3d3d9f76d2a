"""Two-process DDP run of the statistics monitors (launched by tests/test_ddp_stats.py with torchrun)."""
import inspect
import json
import os
import sys
from collections import defaultdict

import pytorch_lightning as pl
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import Classifier, make_loader, shutdown_distributed  # noqa: E402

from lightwatch import ActivationStatsMonitor, GradientStatsMonitor  # noqa: E402

torch.set_num_threads(1)
out_dir = sys.argv[1]
collectives = defaultdict(int)
step_now = {"step": -1}
_all_reduce = dist.all_reduce


def counting_all_reduce(*args, **kwargs):
    if any("lightwatch" in (f.filename or "") for f in inspect.stack()[1:4]):
        collectives[step_now["step"]] += 1
    return _all_reduce(*args, **kwargs)


dist.all_reduce = counting_all_reduce


class Probe(pl.Callback):
    """Marks steps, records net.0's local output sums, and plants a NaN input on rank 1 at step 9."""

    def __init__(self):
        self.local = {}

    def setup(self, trainer, pl_module, stage):
        pl_module.net[0].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if module.training:
            self.local[step_now["step"]] = [output.double().sum().item(), output.numel()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step_now["step"] = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step_now["step"] == 9 and trainer.global_rank == 1:
            batch[0][0, 0] = float("nan")


pl.seed_everything(0)
probe = Probe()
grad = GradientStatsMonitor(every_n_steps=5, nonfinite_action="log")
act = ActivationStatsMonitor(every_n_steps=5, nonfinite_action="stop")
trainer = pl.Trainer(
    default_root_dir=out_dir, max_steps=20, log_every_n_steps=5, accelerator="cpu", devices=2, strategy="ddp",
    callbacks=[probe, grad, act], enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    logger=pl.loggers.TensorBoardLogger(out_dir, name="tb", version=0),
)
trainer.fit(Classifier(depth=2), make_loader(n=640, batch_size=16, shuffle=False))
metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("monitor.")}
with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
    json.dump({"rank": trainer.global_rank, "global_step": trainer.global_step, "collectives": collectives,
               "local": probe.local, "metrics": metrics}, fh)
shutdown_distributed()
