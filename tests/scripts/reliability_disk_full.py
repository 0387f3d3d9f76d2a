"""A fit whose disk fills up: checkpoints, ``alerts.jsonl`` and TensorBoard all on one small filesystem.

Usage: reliability_disk_full.py OUT_DIR SIDE:WHEN:FS [SIDE:WHEN:FS ...]

Each scenario runs in a child forked after the imports, in OUT_DIR/<i>, with its result in OUT_DIR/<i>/result.json:

- SIDE: ``lightwatch`` (MetricCheckpoint and the monitors) or ``lightning`` (ModelCheckpoint, same settings);
- WHEN: ``precheck`` (the disk fills after a few saves: too little room left for the next file) or
  ``midwrite`` (room for an estimate of the first file, not for the file: the write itself fails);
- FS: ``tmpfs`` (a real 2 MiB tmpfs mounted at OUT_DIR/fs; needs root) or ``inject`` (no mount: every file
  opened for writing under OUT_DIR/fs shares a byte budget and raises ``OSError(ENOSPC)`` once it is spent,
  a fault layer at the ``io`` level installed in this process, below ``torch.save`` and the TensorBoard writer).

The filler file that takes the disk's space is written by a callback (``precheck``: after step 4; ``midwrite``:
at train start). Writes OUT_DIR/result.json: the exception that ended the fit, the alerts that reached
``alerts.jsonl``, and the state of the checkpoint directory (every file the run records loads and matches its
hash; no temporary left; ``best``/``last`` never name a partial file).
"""
import builtins
import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import traceback

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import Classifier, make_loader  # noqa: E402

torch.set_num_threads(1)
MiB = 1 << 20
FS_BYTES = 2 * MiB


class Budget:
    """The ``inject`` filesystem: files opened for writing under ``root`` share ``FS_BYTES``."""

    def __init__(self, root):
        self.root, self.used, self.real_open = root, 0, builtins.open
        self.sizes = {}

    def free(self):
        return FS_BYTES - sum(self.sizes.values())

    def install(self):
        budget = self

        class Limited(io.RawIOBase):
            def __init__(self, fh, path):
                self.fh, self.path = fh, path

            def write(self, data):
                n = len(data)
                if budget.free() < n:
                    room = max(0, budget.free())
                    if room:
                        self.fh.write(bytes(data[:room]))
                        budget.sizes[self.path] = budget.sizes.get(self.path, 0) + room
                    raise OSError(errno.ENOSPC, "No space left on device", self.path)
                budget.sizes[self.path] = budget.sizes.get(self.path, 0) + n
                return self.fh.write(data)

            def __getattr__(self, name):
                return getattr(self.fh, name)

            def writable(self):
                return True

            def close(self):
                self.fh.close()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

        def limited_open(file, mode="r", *args, **kwargs):
            fh = budget.real_open(file, mode, *args, **kwargs)
            path = os.path.abspath(str(file)) if isinstance(file, (str, os.PathLike)) else None
            if path and path.startswith(budget.root) and any(c in mode for c in "wax+"):
                if "w" in mode:
                    budget.sizes[path] = 0
                return Limited(fh, path)
            return fh

        builtins.open = limited_open
        real_remove, real_replace = os.remove, os.replace

        def remove(path, *a, **k):
            budget.sizes.pop(os.path.abspath(str(path)), None)
            return real_remove(path, *a, **k)

        def replace(src, dst, *a, **k):
            src_abs, dst_abs = os.path.abspath(str(src)), os.path.abspath(str(dst))
            if src_abs in budget.sizes:
                budget.sizes[dst_abs] = budget.sizes.pop(src_abs)
            return real_replace(src, dst, *a, **k)

        os.remove, os.unlink, os.replace, os.rename = remove, remove, replace, replace

    def statvfs_free(self):
        return self.free()


def free_bytes(fs, budget):
    if budget is not None:
        return budget.free()
    st = os.statvfs(fs)
    return st.f_bavail * st.f_frsize


class Filler(pl.Callback):
    """Takes the disk's space: all but ``leave`` bytes, at ``step`` (None: at train start)."""

    def __init__(self, fs, budget, leave, step):
        self.fs, self.budget, self.leave, self.step, self.done = fs, budget, leave, step, False

    def fill(self):
        size = max(0, free_bytes(self.fs, self.budget) - self.leave)
        with open(os.path.join(self.fs, "filler.bin"), "wb") as fh:
            fh.write(b"\0" * size)
        self.done = True

    def on_train_start(self, trainer, pl_module):
        if self.step is None:
            self.fill()

    def on_train_batch_end(self, trainer, *args):
        if self.step is not None and trainer.global_step == self.step and not self.done:
            self.fill()


class Model(Classifier):
    def __init__(self):
        super().__init__(hidden=128, depth=2)  # ~18 k parameters: ~80 KB of weights, ~160 KB with momentum

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_lightwatch_dir(ck):
    out = {"named": 0, "bad": [], "temporaries": [], "best": None, "last": None}
    path = os.path.join(ck, "manifest.json")
    if not os.path.exists(path):
        return out
    doc = json.load(open(path))
    out["best"], out["last"] = doc.get("best"), doc.get("last")
    for e in doc["checkpoints"]:
        p = os.path.join(ck, e["file"])
        out["named"] += 1
        try:
            assert os.path.getsize(p) == e["bytes"] and sha256(p) == e["sha256"], "size or hash"
            torch.load(p, weights_only=True)
        except Exception as exc:
            out["bad"].append(f"{e['file']}: {exc}")
    out["temporaries"] = [n for n in os.listdir(ck) if ".tmp-" in n]
    return out


def check_lightning_dir(ck):
    out = {"named": 0, "bad": [], "temporaries": [], "best": None, "last": None}
    if not os.path.isdir(ck):
        return out
    for name in os.listdir(ck):
        p = os.path.join(ck, name)
        if not name.endswith(".ckpt"):
            out["temporaries"].append(name)
            continue
        out["named"] += 1
        try:
            torch.load(p, weights_only=True)
        except Exception as exc:
            out["bad"].append(f"{name}: {type(exc).__name__}: {str(exc)[:100]}")
    out["last"] = "last.ckpt" if os.path.exists(os.path.join(ck, "last.ckpt")) else None
    return out


def scenario(out_dir, side, when, fs_kind):
    fs = os.path.join(out_dir, "fs")
    os.makedirs(fs, exist_ok=True)
    budget = None
    if fs_kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", fs], check=True)
    else:
        budget = Budget(os.path.abspath(fs))
    result = {"side": side, "when": when, "fs": fs_kind}
    try:
        from pytorch_lightning.loggers import TensorBoardLogger

        from lightwatch.callbacks import GradientStatsMonitor, MetricCheckpoint, MetricMonitor
        from lightwatch.callbacks.metric_checkpoint import CheckpointSaveError

        ck_dir = os.path.join(fs, "ck")
        if side == "lightwatch":
            ck = MetricCheckpoint(dirpath=ck_dir, monitor="train/loss", every_n_train_steps=1, save_top_k=2,
                                  save_last=True)
            callbacks = [GradientStatsMonitor(every_n_steps=1), MetricMonitor(every_n_steps=1), ck]
        else:
            from pytorch_lightning.callbacks import ModelCheckpoint

            ck = ModelCheckpoint(dirpath=ck_dir, monitor="train/loss", every_n_train_steps=1, save_top_k=2,
                                 save_last=True, filename="{step}")
            callbacks = [ck]
        leave = 120 * 1024 if when == "precheck" else 100 * 1024
        callbacks.append(Filler(fs, budget, leave, 4 if when == "precheck" else None))
        if budget is not None:
            budget.install()
        pl.seed_everything(0)
        trainer = pl.Trainer(default_root_dir=fs, max_steps=12, callbacks=callbacks, accelerator="cpu", devices=1,
                             logger=TensorBoardLogger(fs, name="tb", version=0), enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1)
        try:
            trainer.fit(Model(), make_loader())
            result["error"] = None
        except CheckpointSaveError as exc:
            result.update(error=type(exc).__name__, errno=exc.errno, message=str(exc))
        except Exception as exc:
            result.update(error=type(exc).__name__, errno=getattr(exc, "errno", None), message=str(exc)[:600],
                          traceback=traceback.format_exc()[-1500:])
        result["step"] = trainer.global_step
        alerts_path = os.path.join(fs, "tb", "version_0", "alerts.jsonl")
        alerts = []
        if os.path.exists(alerts_path):
            for line in open(alerts_path):
                alerts.append(json.loads(line)["rule"])
        result["alerts"] = alerts
        result["dir"] = check_lightwatch_dir(ck_dir) if side == "lightwatch" else check_lightning_dir(ck_dir)
    finally:
        if fs_kind == "tmpfs":
            subprocess.run(["umount", "-l", fs], check=False)
    with open(os.path.join(out_dir, "result.json"), "w") as fh:
        json.dump(result, fh, indent=1)


def main():
    from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: F401  (imported once, before the forks)
    from pytorch_lightning.loggers import TensorBoardLogger  # noqa: F401

    import lightwatch.callbacks  # noqa: F401

    failed = 0
    for i, spec in enumerate(sys.argv[2:]):
        out_dir = os.path.join(sys.argv[1], str(i))
        os.makedirs(out_dir, exist_ok=True)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                scenario(out_dir, *spec.split(":"))
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        failed += int(not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
