"""SIGKILL trials for MetricCheckpoint (launched by tests/test_checkpoint_crash.py).

Usage: ckpt_crash_trials.py OUT_DIR TRIALS SEED

This process imports torch and Lightning once, then for each trial forks a child that trains a small model
with a checkpoint at every step (top-k, last, thresholds and alert saves, so files are written, linked,
replaced and deleted all the time) and gets killed with SIGKILL:

- odd trials: by this process, after a random delay, wherever the child happens to be;
- even trials: by the child itself at a chosen point of the n-th save (fault injection around the real
  file operations): half-way through writing the checkpoint, before its fsync/rename, after the "pending"
  manifest, half-way through a manifest write, right after a rename, before deleting an evicted file.

After each kill it checks the directory (every file the manifest names exists, has its size and SHA-256
and loads with ``torch.load(weights_only=True)``) and forks a second child that resumes training from the
manifest's ``last`` and trains three more steps. Results go to OUT_DIR/results.json.
"""
import json
import os
import random
import signal
import sys
import time
import traceback

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import Classifier, make_loader  # noqa: E402

import lightwatch.callbacks.metric_checkpoint as mc  # noqa: E402
import lightwatch.core.checkpoint.store as store  # noqa: E402
import lightwatch.core.atomic as atomic  # noqa: E402
from lightwatch.callbacks import MonitorCallback  # noqa: E402

torch.set_num_threads(1)
PHASES = ("mid_write", "before_commit", "after_pending_manifest", "mid_manifest", "after_rename", "before_delete")


class ErrorEvery(MonitorCallback):
    """An error alert with the checkpoint action every 7 steps: unhealthy saves, pinned rollback points."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % 7 == 0:
            self.raise_alert(trainer, pl_module, rule="probe", severity="error", action="checkpoint",
                             message="periodic probe")


class Started(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 1:
            open(self.path, "w").close()


def callbacks(ckpt_dir):
    ck = mc.MetricCheckpoint(dirpath=ckpt_dir, monitor="train/loss", every_n_train_steps=1, save_top_k=2,
                             save_last=True, alert_save_cooldown_steps=0, keep_alert_checkpoints=1,
                             filename="{step}-{train/loss:.4f}",
                             thresholds={"low": {"metric": "train/loss", "below": 1.05}})
    return ck, [ErrorEvery(every_n_steps=1, alert_cooldown_steps=0), ck]


def trainer_for(root, cbs, max_steps):
    return pl.Trainer(default_root_dir=root, max_steps=max_steps, callbacks=cbs, accelerator="cpu", devices=1,
                      logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      log_every_n_steps=1)


def model():
    # ~0.3 M parameters: each checkpoint is a few MB, so a good share of the time is spent writing.
    return Classifier(in_features=8, hidden=384, depth=3)


def loader():
    return make_loader(n=4096, batch_size=16)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def inject(phase, at):
    """Make this (child) process SIGKILL itself at ``phase`` of the ``at``-th occurrence."""
    count = {"n": 0}

    def due():
        count["n"] += 1
        return count["n"] == at

    if phase == "mid_write":
        real_open = open

        class HalfWritten:
            def __init__(self, fh):
                self.fh, self.written = fh, 0

            def write(self, data):
                n = self.fh.write(data)
                self.written += len(data)
                if self.written > 256 * 1024:
                    self.fh.flush()
                    kill_self()
                return n

            def __getattr__(self, name):
                return getattr(self.fh, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.fh.__exit__(*exc)

        def opener(path, mode="r", *args, **kwargs):
            fh = real_open(path, mode, *args, **kwargs)
            return HalfWritten(fh) if "w" in mode and atomic.TEMP_MARKER in str(path) and due() else fh

        store.open = opener  # the checkpoint writer's open(), module-local: the real file on the real disk
    elif phase == "before_commit":
        real = store.fsync_path
        store.fsync_path = lambda p: (kill_self() if due() else None, real(p))[1]
    elif phase == "after_pending_manifest":
        real_write = store.CheckpointStore.write_manifest

        def write(self, **kwargs):
            real_write(self, **kwargs)
            if kwargs.get("pending") and due():
                kill_self()

        store.CheckpointStore.write_manifest = write
    elif phase == "mid_manifest":
        real = atomic.commit_path

        def commit(tmp, final):
            if final.endswith("manifest.json") and due():
                kill_self()  # the new manifest is complete under its temporary name, not yet renamed
            real(tmp, final)

        atomic.commit_path = commit
    elif phase == "after_rename":
        real = store.commit_path

        def commit(tmp, final):
            real(tmp, final)
            if due():
                kill_self()

        store.commit_path = commit
    elif phase == "before_delete":
        real = store.remove_path

        def remove(path):
            if not atomic.is_temp_name(os.path.basename(path)) and due():
                kill_self()
            real(path)

        store.remove_path = remove


def check_directory(ckpt_dir):
    """The invariant after a crash: what the manifest names is there, complete and loadable."""
    path = os.path.join(ckpt_dir, "manifest.json")
    if not os.path.exists(path):
        return {"manifest": False, "entries": 0}
    with open(path) as fh:
        doc = json.load(fh)
    for e in doc["checkpoints"]:
        p = os.path.join(ckpt_dir, e["file"])
        assert os.path.exists(p), f"{e['file']} is named in the manifest but missing"
        assert os.path.getsize(p) == e["bytes"], f"{e['file']} has the wrong size"
        assert atomic.sha256_path(p) == e["sha256"], f"{e['file']} does not match its hash"
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == e["step"], f"{e['file']} holds step {ckpt['global_step']}, not {e['step']}"
        assert "rng" in ckpt["lightwatch"]
    names = {e["file"] for e in doc["checkpoints"]}
    assert doc["best"] is None or doc["best"] in names
    assert doc["last"] is None or doc["last"] in names
    return {"manifest": True, "entries": len(doc["checkpoints"]), "pending": len(doc.get("pending", [])),
            "garbage": len(doc.get("garbage", [])), "last": doc["last"],
            "last_step": max([e["step"] for e in doc["checkpoints"]] or [0])}


def child_train(root, ckpt_dir, phase, at):
    if phase:
        inject(phase, at)
    pl.seed_everything(0)
    _, cbs = callbacks(ckpt_dir)
    trainer_for(root, cbs + [Started(os.path.join(root, "started"))], 400).fit(model(), loader())


def child_resume(root, ckpt_dir, state):
    pl.seed_everything(1)
    ck, cbs = callbacks(ckpt_dir)
    # As a user would: last.ckpt if it is on disk (committed, or renamed just before the kill and still
    # "pending" in the manifest: the resume promotes it once its hash matches), else start afresh.
    last = os.path.join(ckpt_dir, "last.ckpt")
    ckpt_path = last if os.path.exists(last) else None
    start = torch.load(ckpt_path, weights_only=True)["global_step"] if ckpt_path else 0
    trainer = trainer_for(root, cbs, start + 3)
    trainer.fit(model(), loader(), ckpt_path=ckpt_path)
    assert trainer.global_step == start + 3, (trainer.global_step, start)
    after = check_directory(ckpt_dir)
    assert after["last_step"] == start + 3, after
    assert ck.latest_healthy() is None or os.path.exists(ck.latest_healthy())
    assert not [n for n in os.listdir(ckpt_dir) if atomic.TEMP_MARKER in n], "temporary files left after resume"
    if ckpt_path and state.get("last") is None:
        with open(os.path.join(root, "promoted"), "w") as fh:
            fh.write("last.ckpt was pending at the kill and was resumed from")


def run_child(fn, *args):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            fn(*args)
        except BaseException:
            with open(os.path.join(args[0], "child_error.txt"), "a") as fh:
                fh.write(traceback.format_exc())
            code = 1
        os._exit(code)
    return pid


def main():
    out_dir, trials, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    results = []
    t_start = time.time()
    for t in range(trials):
        root = os.path.join(out_dir, f"trial{t:03d}")
        ckpt_dir = os.path.join(root, "ck")
        os.makedirs(root)
        if t % 2 == 0:
            phase, at, delay = PHASES[(t // 2) % len(PHASES)], rng.randint(2, 9), None
        else:
            phase, at, delay = None, None, rng.uniform(0.0, 0.6)
        record = {"trial": t, "kind": "injected" if phase else "random", "phase": phase, "at": at, "delay": delay}
        pid = run_child(child_train, root, ckpt_dir, phase, at)
        if delay is not None:
            deadline = time.time() + 60
            while not os.path.exists(os.path.join(root, "started")) and time.time() < deadline:
                time.sleep(0.002)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        record["killed"] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        record["temp_files_left"] = len([n for n in os.listdir(ckpt_dir) if atomic.TEMP_MARKER in n]) \
            if os.path.isdir(ckpt_dir) else 0
        try:
            record.update(check_directory(ckpt_dir))
            record["consistent"] = True
        except Exception as exc:  # reported, and the test fails on it
            record.update(consistent=False, problem=f"{type(exc).__name__}: {exc}")
            results.append(record)
            continue
        pid = run_child(child_resume, root, ckpt_dir, record)
        _, status = os.waitpid(pid, 0)
        record["resumed"] = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        record["resumed_from_pending"] = os.path.exists(os.path.join(root, "promoted"))
        if not record["resumed"] and os.path.exists(os.path.join(root, "child_error.txt")):
            record["problem"] = open(os.path.join(root, "child_error.txt")).read()[-2000:]
        results.append(record)
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump({"trials": results, "seconds": time.time() - t_start, "seed": seed}, fh, indent=1)


if __name__ == "__main__":
    main()
