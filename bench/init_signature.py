"""Where ``frozen_at_init``'s thresholds come from: fresh uniform inits against the same weights once trained.

Two sides, both through :func:`lightwatch.core.init_signature.uniform_init_evidence`:

- *fresh* (what the check must name): PyTorch's default initialisation of Linear, Conv2d, GRU and LSTM
  layers and ``xavier_uniform_`` / ``kaiming_uniform_`` tensors, over many seeds;
- *trained* (what it must leave alone: a frozen pretrained layer): every weight tensor of at least
  ``MIN_ELEMENTS`` values of the fault suite's healthy base models (``bench/faults``: MLP, tanh MLP, CNN,
  GRU, deep LayerNorm MLP; SGD with momentum or Adam) after 1, 2, 5, 20, 100 and 200 optimizer steps.

It prints, per side and step, the range of ``KS * sqrt(k)`` and of the edge count, and how many tensors
the rule would call fresh (``KS <= 2.5``, ``edge >= 8``, ``|mean| <= 5`` standard errors).

    OMP_NUM_THREADS=1 python bench/init_signature.py                 # 200 init seeds, 20 training seeds
    OMP_NUM_THREADS=1 python bench/init_signature.py --init-seeds 50 --train-seeds 5
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Callable, Dict, List, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.faults import HEALTHY  # noqa: E402
from lightwatch.core.init_signature import (MIN_ELEMENTS, SMALL_MIN_ELEMENTS, uniform_init_evidence,  # noqa: E402
                                            uniform_init_votes)

STEPS = (1, 2, 5, 20, 100, 200)
LAYERS: Dict[str, Callable[[], List[torch.Tensor]]] = {
    "Linear(64, 64)": lambda: [nn.Linear(64, 64).weight],
    "Linear(512, 1024)": lambda: [nn.Linear(512, 1024).weight],
    "Conv2d(16, 32, 3)": lambda: [nn.Conv2d(16, 32, 3).weight],
    "GRU(16, 64)": lambda: [p for n, p in nn.GRU(16, 64).named_parameters() if n.startswith("weight")],
    "LSTM(32, 32)": lambda: [p for n, p in nn.LSTM(32, 32).named_parameters() if n.startswith("weight")],
    "xavier_uniform_(128, 64)": lambda: [nn.init.xavier_uniform_(torch.empty(128, 64))],
    "kaiming_uniform_(128, 64)": lambda: [nn.init.kaiming_uniform_(torch.empty(128, 64), nonlinearity="relu")],
    # below MIN_ELEMENTS: judged against the init bound of their shape
    "Conv2d(1, 16, 3)": lambda: [nn.Conv2d(1, 16, 3).weight],
    "Conv2d(3, 16, 3)": lambda: [nn.Conv2d(3, 16, 3).weight],
    "Conv1d(4, 8, 5)": lambda: [nn.Conv1d(4, 8, 5).weight],
    "Linear(8, 16)": lambda: [nn.Linear(8, 16).weight],
    "GRU(4, 8)": lambda: [p for n, p in nn.GRU(4, 8).named_parameters() if n.startswith("weight")],
    "LSTM(8, 8)": lambda: [p for n, p in nn.LSTM(8, 8).named_parameters() if n.startswith("weight")],
    "xavier_uniform_(16, 8)": lambda: [nn.init.xavier_uniform_(torch.empty(16, 8))],
    "kaiming_uniform_(16, 8)": lambda: [nn.init.kaiming_uniform_(torch.empty(16, 8), nonlinearity="relu")],
}
# KS * sqrt(k), edge count, |mean| z, k, and the verdict of uniform_init_votes (1 = fresh)
Row = Tuple[float, float, float, float, float]


def evidence(t: torch.Tensor) -> Row:
    fresh = float(uniform_init_votes([t], torch.device("cpu"))[1, 0])
    return tuple(uniform_init_evidence(t).tolist()) + (fresh,)  # type: ignore[return-value]


def summary(rows: List[Row]) -> str:
    if not rows:
        return "    0 tensors"
    ks = [r[0] for r in rows]
    edge = [r[1] for r in rows]
    fresh = sum(int(r[4]) for r in rows)
    return (f"{len(rows):5d} tensors  KS*sqrt(k) {min(ks):7.2f} .. {max(ks):7.2f}  edge {min(edge):4.0f} .. "
            f"{max(edge):4.0f}  read as fresh {fresh}")


class Grab(pl.Callback):
    """The evidence of every large weight tensor after each of ``STEPS``."""

    def __init__(self) -> None:
        self.rows: Dict[int, List[Row]] = {s: [] for s in STEPS}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step in self.rows:
            self.rows[trainer.global_step] += [
                evidence(p) for n, p in pl_module.named_parameters()
                if "weight" in n and p.dim() > 1 and p.numel() >= SMALL_MIN_ELEMENTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-seeds", type=int, default=200)
    parser.add_argument("--train-seeds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)

    print(f"# fresh initialisations, {args.init_seeds} seeds each")
    everything: List[Row] = []
    for name, make in LAYERS.items():
        rows = []
        for seed in range(args.init_seeds):
            torch.manual_seed(seed)
            rows += [evidence(t) for t in make()]
        everything += rows
        print(f"{name:28s} {summary(rows)}")
    print(f"{'all':28s} {summary(everything)}")

    print(f"\n# the healthy base models of bench/faults after n optimizer steps, {args.train_seeds} seeds")
    grabbed: Dict[int, List[Row]] = {s: [] for s in STEPS}
    for seed in range(args.train_seeds):
        run = HEALTHY.build(seed, max_steps=max(STEPS))
        grab = Grab()
        trainer = run.trainer(os.devnull, callbacks=[grab], logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                              limit_val_batches=0)
        trainer.fit(run.model, datamodule=run.datamodule)
        for step in STEPS:
            grabbed[step] += grab.rows[step]
    for step in STEPS:
        large = [r for r in grabbed[step] if r[3] >= MIN_ELEMENTS]
        small = [r for r in grabbed[step] if r[3] < MIN_ELEMENTS]
        print(f"after {step:3d} steps, >= {MIN_ELEMENTS:5d}    {summary(large)}")
        print(f"after {step:3d} steps, <  {MIN_ELEMENTS:5d}    {summary(small)}")


if __name__ == "__main__":
    main()
