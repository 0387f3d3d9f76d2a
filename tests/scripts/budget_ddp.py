"""Two-process DDP run of the full default policy, counting lightwatch's collectives per training step
(launched by tests/test_step_budget.py with torchrun)."""
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
from test_step_budget import default_policy_monitors  # noqa: E402

torch.set_num_threads(1)
out_dir = sys.argv[1]
collectives = defaultdict(lambda: defaultdict(int))
step_now = {"step": -1}
NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
         "broadcast_object_list", "reduce_scatter_tensor", "barrier")


def counting(name, real):
    def wrapper(*args, **kwargs):
        if any("lightwatch" in (f.filename or "") for f in inspect.stack()[1:5]):
            collectives[step_now["step"]][name] += 1
        return real(*args, **kwargs)
    return wrapper


for name in NAMES:
    setattr(dist, name, counting(name, getattr(dist, name)))


class StepMarker(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step_now["step"] = trainer.fit_loop.epoch_loop._batches_that_stepped

    def on_train_epoch_end(self, trainer, pl_module):
        step_now["step"] = -2  # epoch-end work (the distribution tier's one reduction per epoch)


pl.seed_everything(0)
trainer = pl.Trainer(
    default_root_dir=out_dir, max_steps=20, log_every_n_steps=5, accelerator="cpu", devices=2, strategy="ddp",
    callbacks=[StepMarker()] + default_policy_monitors(5), enable_progress_bar=False, enable_model_summary=False,
    enable_checkpointing=False, logger=pl.loggers.TensorBoardLogger(out_dir, name="tb", version=0),
)
trainer.fit(Classifier(depth=2), make_loader(n=640, batch_size=16, shuffle=False))
with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as fh:
    json.dump({"rank": trainer.global_rank, "global_step": trainer.global_step,
               "collectives": {str(k): dict(v) for k, v in collectives.items()}}, fh)
shutdown_distributed()
