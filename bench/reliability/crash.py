"""Crash consistency: SIGKILL a fit at random moments, with ``MetricCheckpoint`` and with Lightning's
``ModelCheckpoint`` side by side, then check the directory and resume.

Usage: ``python -m bench.reliability.crash OUT_DIR TRIALS SEED`` (``python -m bench.reliability --part crash``
runs it and prints the table row). This process imports torch and Lightning once and forks one child per
fit. Each trial trains a ~0.3 M-parameter MLP (checkpoints of a few MB, so much of the time is spent writing)
with a checkpoint at every step and is killed:

- ``MetricCheckpoint`` (top-k on ``train/loss``, ``last``, a threshold and alert saves, so files are written,
  linked, replaced and deleted all the time): odd trials from outside after a uniformly random delay, even
  trials by the child itself at a chosen point of a save (``tests/scripts/ckpt_crash_trials.py`` places the
  kill: mid-write, before the rename, after the pending manifest, mid-manifest, after a rename, before a
  deletion);
- ``ModelCheckpoint`` (top-2 on ``train/loss``, ``save_last``, every step): from outside after a uniformly
  random delay (it has no hook to place a kill inside its writes).

After each kill: every checkpoint file the run records (the manifest's entries; for ``ModelCheckpoint``
every ``*.ckpt`` in the directory, and the best path its ``last.ckpt`` records) must exist and load with
``torch.load(weights_only=True)``, and a resume from ``last.ckpt`` must train three more steps. A trial is
*lost* when the resume fails or starts from nothing although a checkpoint had been committed.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPTS = os.path.join(ROOT, "tests", "scripts")

__all__ = ["run_trials", "summarize"]


def _load_lightwatch_trials() -> Any:
    """The MetricCheckpoint half (training, kill injection, directory check) shared with the CI test."""
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    import ckpt_crash_trials  # noqa: E402

    return ckpt_crash_trials


def _mc_child_train(root: str, ckpt_dir: str) -> None:
    import pytorch_lightning as pl
    lw = _load_lightwatch_trials()
    pl.seed_everything(0)
    ck = model_checkpoint(ckpt_dir)
    trainer = _mc_trainer(root, [ck, lw.Started(os.path.join(root, "started"))], 400)
    trainer.fit(lw.model(), lw.loader())


def model_checkpoint(ckpt_dir: str) -> Any:
    """Lightning's ``ModelCheckpoint`` set up as the lightwatch side: top-2 on ``train/loss``, last, every step.
    (Its file names keep a ``/`` of a metric name as a subdirectory, so the name holds the step only.)"""
    from pytorch_lightning.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=ckpt_dir, monitor="train/loss", every_n_train_steps=1, save_top_k=2,
                           save_last=True, filename="{step}")


def _mc_trainer(root: str, callbacks: List[Any], max_steps: int) -> Any:
    import pytorch_lightning as pl

    return pl.Trainer(default_root_dir=root, max_steps=max_steps, callbacks=callbacks, accelerator="cpu", devices=1,
                      logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      log_every_n_steps=1)


def _mc_check(ckpt_dir: str) -> Dict[str, Any]:
    """``ModelCheckpoint``'s directory after a kill: every ``*.ckpt`` loads; the best path ``last.ckpt`` names
    exists. Returns counts instead of raising (the comparison is the point)."""
    import torch

    out: Dict[str, Any] = {"files": 0, "corrupt": [], "temporaries": 0, "best_missing": False}
    if not os.path.isdir(ckpt_dir):
        return out
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        if not name.endswith(".ckpt"):
            out["temporaries"] += 1
            continue
        out["files"] += 1
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            out["corrupt"].append(f"{name}: {type(exc).__name__}: {str(exc)[:120]}")
    last = os.path.join(ckpt_dir, "last.ckpt")
    if os.path.exists(last) and not any(c.startswith("last.ckpt") for c in out["corrupt"]):
        state = torch.load(last, map_location="cpu", weights_only=True)
        for key, cb in (state.get("callbacks") or {}).items():
            best = cb.get("best_model_path") if str(key).startswith("ModelCheckpoint") else None
            if best and not os.path.exists(best):
                out["best_missing"] = True
    return out


def _mc_child_resume(root: str, ckpt_dir: str) -> None:
    import pytorch_lightning as pl
    import torch

    lw = _load_lightwatch_trials()
    pl.seed_everything(1)
    last = os.path.join(ckpt_dir, "last.ckpt")
    ckpt_path = last if os.path.exists(last) else None
    start = torch.load(ckpt_path, weights_only=True)["global_step"] if ckpt_path else 0
    ck = model_checkpoint(ckpt_dir)
    trainer = _mc_trainer(root, [ck], start + 3)
    trainer.fit(lw.model(), lw.loader(), ckpt_path=ckpt_path)
    assert trainer.global_step == start + 3, (trainer.global_step, start)


def _fork(fn: Any, *args: Any) -> int:
    """A forked child running ``fn(*args)`` (the CI test's own: output silenced, errors to child_error.txt)."""
    return _load_lightwatch_trials().run_child(fn, *args)


def _kill_after_start(pid: int, root: str, delay: float) -> None:
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(root, "started")) and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return status


def _child_error(root: str) -> str:
    path = os.path.join(root, "child_error.txt")
    return open(path).read()[-1500:] if os.path.exists(path) else ""


def lightwatch_trial(lw: Any, root: str, t: int, rng: random.Random) -> Dict[str, Any]:
    ckpt_dir = os.path.join(root, "ck")
    if t % 2 == 0:
        phase, at, delay = lw.PHASES[(t // 2) % len(lw.PHASES)], rng.randint(2, 9), None
    else:
        phase, at, delay = None, None, rng.uniform(0.0, 0.8)
    record: Dict[str, Any] = {"side": "MetricCheckpoint", "trial": t, "kind": "injected" if phase else "random",
                              "phase": phase, "delay": delay}
    pid = _fork(lw.child_train, root, ckpt_dir, phase, at)
    if delay is not None:
        _kill_after_start(pid, root, delay)
    status = _wait(pid)
    record["killed"] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    record["temp_files_left"] = len([n for n in os.listdir(ckpt_dir) if ".tmp-" in n]) \
        if os.path.isdir(ckpt_dir) else 0
    try:
        record.update(lw.check_directory(ckpt_dir))
        record["corrupt"] = 0
    except Exception as exc:
        record.update(corrupt=1, problem=f"{type(exc).__name__}: {exc}")
        return record
    status = _wait(_fork(lw.child_resume, root, ckpt_dir, record))
    record["resumed"] = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    record["lost"] = int(not record["resumed"])
    if not record["resumed"]:
        record["problem"] = _child_error(root)
    return record


def model_checkpoint_trial(root: str, t: int, rng: random.Random) -> Dict[str, Any]:
    ckpt_dir = os.path.join(root, "ck")
    delay = rng.uniform(0.0, 0.8)
    record: Dict[str, Any] = {"side": "ModelCheckpoint", "trial": t, "kind": "random", "delay": delay}
    pid = _fork(_mc_child_train, root, ckpt_dir)
    _kill_after_start(pid, root, delay)
    status = _wait(pid)
    record["killed"] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    check = _mc_check(ckpt_dir)
    record.update(files=check["files"], temp_files_left=check["temporaries"], corrupt=len(check["corrupt"]),
                  best_missing=check["best_missing"])
    if check["corrupt"]:
        record["problem"] = "; ".join(check["corrupt"])
    status = _wait(_fork(_mc_child_resume, root, ckpt_dir))
    record["resumed"] = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    record["lost"] = int(not record["resumed"])
    if not record["resumed"]:
        record["problem"] = (record.get("problem", "") + " | resume: " + _child_error(root)[-600:]).strip(" |")
    return record


def run_trials(out_dir: str, trials: int, seed: int, sides: str = "both") -> Dict[str, Any]:
    """``trials`` kills per side (``sides``: ``both``, ``lightwatch`` or ``lightning``); records written to
    ``out_dir/crash.json`` and returned."""
    import torch

    torch.set_num_threads(1)
    lw = _load_lightwatch_trials()
    rng = random.Random(seed)
    records: List[Dict[str, Any]] = []
    started = time.time()
    for t in range(trials):
        if sides in ("both", "lightwatch"):
            root = os.path.join(out_dir, f"lw{t:03d}")
            os.makedirs(root)
            records.append(lightwatch_trial(lw, root, t, rng))
        if sides in ("both", "lightning"):
            root = os.path.join(out_dir, f"mc{t:03d}")
            os.makedirs(root)
            records.append(model_checkpoint_trial(root, t, rng))
    report = {"records": records, "seconds": time.time() - started, "seed": seed, "trials": trials}
    with open(os.path.join(out_dir, "crash.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    return report


def summarize(records: List[Dict[str, Any]], side: str) -> Dict[str, int]:
    """Kills, corrupt (a recorded file that does not load or match), lost (no resume) and leftovers for ``side``."""
    mine = [r for r in records if r["side"] == side]
    return {"trials": len(mine), "killed": sum(bool(r.get("killed")) for r in mine),
            "corrupt": sum(int(r.get("corrupt", 0)) > 0 for r in mine),
            "lost": sum(int(r.get("lost", 1)) > 0 for r in mine),
            "best_missing": sum(bool(r.get("best_missing")) for r in mine),
            "temporaries_after_kill": sum(int(r.get("temp_files_left", 0)) > 0 for r in mine),
            "temporaries_counted": int(all("temp_files_left" in r for r in mine))}


def main() -> None:
    out_dir, trials, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sides = sys.argv[4] if len(sys.argv) > 4 else "both"
    report = run_trials(out_dir, trials, seed, sides)
    for side in ("MetricCheckpoint", "ModelCheckpoint"):
        print(side, json.dumps(summarize(report["records"], side)))


if __name__ == "__main__":
    main()
