"""The job-health fault suite: each fault of SystemMonitor's rules on several model families, with its healthy twin.

    OMP_NUM_THREADS=1 python bench/system_faults.py                # every family x fault, 1 seed
    OMP_NUM_THREADS=1 python bench/system_faults.py --seeds 3 --families mlp cnn --faults none leak

Faults (``none`` is the healthy twin of all of them):

- ``slow_loader``: the collate function sleeps longer than a step a batch (30 ms; 500 ms on the CNN): a slow
  transform with ``num_workers=0``;
- ``leak``: the training step keeps a second forward's outputs, with their graph, in a list (outputs kept for
  an epoch-end metric outside ``no_grad``): every step's activations stay alive;
- ``slowdown``: from step 100 on, the loss is taken over the batch repeated six times (a growing per-step cost).

The straggler and hang faults need two processes: ``tests/scripts/system_ddp.py`` runs them.
Prints one row per run: the rules that fired (severity), the largest data share, the step-time ratio against
the run's first intervals, and the memory trend (MiB a step and its t). Writes ``bench/results/system_faults.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.dataloader import default_collate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import TinyTransformer, deep_mlp, small_cnn  # noqa: E402

from lightwatch.callbacks import SystemMonitor  # noqa: E402

warnings.filterwarnings("ignore")
FAMILIES = ("mlp", "cnn", "transformer", "lstm")
FAULTS = ("none", "slow_loader", "leak", "slowdown")
LEAK_ROWS = {"cnn": 2}  # rows of the batch whose outputs are kept: 1.5-6 MiB a step on every family
SLOW_LOADER_SECONDS = {"cnn": 0.5}  # longer than the family's step: the loader is the bottleneck


class LSTMLM(nn.Module):
    def __init__(self, vocab: int = 500, d: int = 128) -> None:
        super().__init__()
        self.embed, self.lstm, self.head = nn.Embedding(vocab, d), nn.LSTM(d, d, batch_first=True), nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(x))[0])


def family(name: str, n: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        x = torch.randn(n, 64, generator=g)
        return deep_mlp(depth=8, width=256), TensorDataset(x, x[:, :10].argmax(1)), 64
    if name == "cnn":
        x = torch.randn(n, 3, 32, 32, generator=g)
        return small_cnn(), TensorDataset(x, (x.mean((1, 2, 3)) > 0).long()), 32
    tokens = torch.randint(0, 500, (n, 33), generator=g)
    net = TinyTransformer(vocab=500, d=64, layers=2, seq=32) if name == "transformer" else LSTMLM()
    return net, TensorDataset(tokens[:, :-1], tokens[:, 1:]), 16


class Task(pl.LightningModule):
    def __init__(self, net: nn.Module, fault: str, family: str = "") -> None:
        super().__init__()
        self.net, self.fault, self.family = net, fault, family
        self.kept: List[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.fault == "slowdown" and self.global_step >= 100:
            # from step 100 the loss is taken over the batch repeated: 6x the forward and backward work
            x, y = torch.cat([x] * 6), torch.cat([y] * 6)
        out = self.net(x)
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        if self.fault == "leak":
            # outputs kept for an epoch-end metric, from a forward outside no_grad: every step's graph and
            # activations stay alive
            self.kept.append(self.net(x[:LEAK_ROWS.get(self.family, len(x))]))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class SlowCollate:
    """A collate function that sleeps ``seconds`` a batch (a slow transform in the main process)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, items: List[Any]) -> Any:
        time.sleep(self.seconds)
        return default_collate(items)


def run_case(fam: str, fault: str, seed: int, steps: int, every: int) -> Dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    net, data, batch = family(fam, 4096, seed)
    loader = DataLoader(data, batch_size=batch, shuffle=True,
                        collate_fn=SlowCollate(SLOW_LOADER_SECONDS.get(fam, 0.03)) if fault == "slow_loader" else None)
    monitor = SystemMonitor(every_n_steps=every)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(default_root_dir=tmp, max_steps=steps, log_every_n_steps=every, callbacks=[monitor],
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             accelerator="cpu", devices=1, logger=False)
        t0 = time.perf_counter()
        trainer.fit(Task(net, fault, fam), loader)
        wall = time.perf_counter() - t0
        alerts = []
        path = os.path.join(tmp, "alerts.jsonl")
        if os.path.exists(path):
            alerts = [json.loads(line) for line in open(path)]
    rules = sorted({f"{a['rule']}({a['severity']})" for a in alerts})
    slope, t = monitor.host_memory_growth.last_trend or (0.0, 0.0)
    baseline = monitor.regression.baseline
    return {"family": fam, "fault": fault, "seed": seed, "rules": rules, "wall_s": round(wall, 1),
            "max_data_share": round(monitor.max_data_share, 3),
            "step_time_ratio": None if not baseline else round(monitor.max_step_time / baseline, 2),
            "in_use_mib_per_step": round(slope / 2 ** 20, 3), "in_use_t": round(t, 1),
            "first_alert": {a["rule"]: a["message"] for a in alerts}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--faults", nargs="+", default=list(FAULTS), choices=FAULTS)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--one", nargs=3, metavar=("FAMILY", "FAULT", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "system_faults.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:  # one case in a fresh process: memory freed by an earlier run would hide a later leak
        fam, fault, seed = args.one
        print("ROW " + json.dumps(run_case(fam, fault, int(seed), args.steps, args.every)))
        return
    print(f"# {platform.node()} {platform.processor() or platform.machine()} torch {torch.__version__} "
          f"lightning {pl.__version__}; {args.steps} steps, logged every {args.every}")
    rows = []
    for fam in args.families:
        for fault in args.faults:
            for seed in range(args.seeds):
                proc = subprocess.run([sys.executable, __file__, "--one", fam, fault, str(seed), "--steps",
                                       str(args.steps), "--every", str(args.every)], capture_output=True, text=True)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
                if proc.returncode or not lines:
                    raise SystemExit(f"{fam} {fault} seed {seed} failed:\n{proc.stderr[-3000:]}")
                row = json.loads(lines[0][4:])
                rows.append(row)
                print(f"{fam:12s} {fault:12s} seed {seed}  {','.join(row['rules']) or '-':45s} "
                      f"share {row['max_data_share']:.2f}  ratio {row['step_time_ratio']}  "
                      f"in use {row['in_use_mib_per_step']:.3f} MiB/step t={row['in_use_t']}  ({row['wall_s']} s)",
                      flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    expected = {"none": set(), "slow_loader": {"input_bound"}, "leak": {"memory_growth"},
                "slowdown": {"step_time_regression"}}
    wrong = [r for r in rows if {x.split("(")[0] for x in r["rules"]} != expected[r["fault"]]]
    print(f"{len(rows) - len(wrong)} of {len(rows)} runs named exactly the expected rule"
          + "".join(f"\n  off: {r['family']} {r['fault']} seed {r['seed']}: {r['rules']}" for r in wrong))


if __name__ == "__main__":
    main()
