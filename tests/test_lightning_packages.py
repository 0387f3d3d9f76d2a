"""Both Lightning import styles and every CPU strategy, with the same five callbacks.

``lightwatch.callbacks`` binds the callbacks to ``pytorch_lightning``, ``lightwatch.lightning`` to
``lightning.pytorch`` (``import lightning as L``). Fits under ``ddp``, ``ddp_spawn`` and ``ddp_fork`` run in
subprocesses (``tests/scripts/strategies.py``) that report what Lightning saw.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any, Dict, List, Tuple

import pytest
import torch

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("lightning")
# these tests use both packages side by side: under the alias run (LIGHTWATCH_TEST_LIGHTNING=lightning) they are one
pytestmark = pytest.mark.skipif(os.environ.get("LIGHTWATCH_TEST_LIGHTNING") == "lightning",
                                reason="compares the two packages; the alias run makes them one")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A ddp_spawn worker whose work is done can still abort as it exits: nothing destroys the gloo process group in a
# spawned worker (Lightning's atexit hook does not run there), and tearing gloo down as the process ends can
# call std::terminate. It happens after the fit finished, outside any callback; such a run is tried once more.
_SPAWN_EXIT_ABORT = "terminate called without an active exception"


def run_script(tmp_path: Any, package: str, strategy: str, attempts: int = 2) -> Dict[str, Any]:
    for attempt in range(attempts):
        directory = tmp_path if attempt == 0 else tmp_path / f"retry{attempt}"  # a fresh run, not a resumed one
        os.makedirs(directory, exist_ok=True)
        returncode, stderr = _run_script_once(directory, package, strategy)
        if returncode == 0:
            break
        exit_abort = strategy == "ddp_spawn" and _SPAWN_EXIT_ABORT in stderr and "`Trainer.fit` stopped" in stderr
        if not exit_abort or attempt == attempts - 1:
            break
    assert returncode == 0, stderr[-3000:]
    with open(os.path.join(directory, "report.json")) as fh:
        return json.load(fh)


def _run_script_once(tmp_path: Any, package: str, strategy: str) -> Tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"),
                                                                           os.environ.get("PYTHONPATH", "")]))
    script = os.path.join(SCRIPTS, "strategies.py")
    if strategy == "ddp":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   script]
    else:
        command = [sys.executable, script]
    # its own process group: on a timeout the launcher's workers are killed with it, not left running
    proc = subprocess.Popen(command + [str(tmp_path), package, strategy], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"{strategy} with {package} did not finish in 300 s: {stderr[-3000:]}")
    return proc.returncode, stderr


def check_report(report: Dict[str, Any], world_size: int) -> None:
    # the Trainer takes MetricCheckpoint as its checkpoint callback (no ModelCheckpoint of its own)
    assert report["checkpoint_callback"] == "MetricCheckpoint" and report["is_ours"]
    assert report["checkpoint_callbacks"] == ["MetricCheckpoint"]
    assert report["world_size"] == world_size
    assert report["best_exists"] and report["best_model_path"].startswith(report["dirpath"])
    assert report["last_model_path"].endswith("last.ckpt") and len(report["best_k_models"]) == 2
    # ckpt_path="best" restored the checkpoint best_model_path names: its val/loss is the best score
    assert report["validated"][0]["val/loss"] == pytest.approx(report["best_model_score"], rel=1e-5)


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning"])
def test_single_device_with_either_import_style(tmp_path: Any, package: str) -> None:
    check_report(run_script(tmp_path, package, "auto"), 1)


@pytest.mark.ddp
# Each strategy once and each package under DDP: the ddp_spawn path (the main process's callback never trained) is
# the same code for both packages, and two spawn launches cost 20 s.
@pytest.mark.parametrize("package, strategy", [("pytorch_lightning", "ddp_spawn"), ("pytorch_lightning", "ddp_fork"),
                                               ("lightning", "ddp")])
def test_every_cpu_strategy(tmp_path: Any, package: str, strategy: str) -> None:
    check_report(run_script(tmp_path, package, strategy), 2)


def test_the_lightning_flavour_is_a_lightning_callback_and_checkpoint() -> None:
    import lightning as L
    import pytorch_lightning as pl

    import lightwatch.callbacks as for_pl
    import lightwatch.lightning as for_l

    for name in for_l.__all__:
        ours = getattr(for_l, name)() if name != "MetricCheckpoint" else for_l.MetricCheckpoint(monitor="val/loss")
        theirs = getattr(for_pl, name)() if name != "MetricCheckpoint" else for_pl.MetricCheckpoint(monitor="val/loss")
        assert isinstance(ours, L.pytorch.Callback) and not isinstance(ours, pl.Callback)
        assert isinstance(theirs, pl.Callback) and not isinstance(theirs, L.pytorch.Callback)
        assert type(ours).__name__ == type(theirs).__name__ == name  # the same alert source and state key
    assert isinstance(for_l.MetricCheckpoint(), L.pytorch.callbacks.Checkpoint)


def test_checkpoint_state_is_interchangeable_between_the_two_flavours(tmp_path: Any) -> None:
    import lightwatch.callbacks as for_pl
    import lightwatch.lightning as for_l

    a, b = for_pl.MetricMonitor(), for_l.MetricMonitor()
    assert a.state_key == b.state_key
    b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("blocked, module, binds_to", [
    ("pytorch_lightning", "lightwatch.callbacks", "lightning.pytorch"),
    ("lightning", "lightwatch.callbacks", "pytorch_lightning"),
])
def test_neither_package_is_required_when_the_other_is_installed(blocked: str, module: str, binds_to: str) -> None:
    code = (f"import sys; sys.modules[{blocked!r}] = None; sys.modules[{blocked + '.pytorch'!r}] = None\n"
            f"import {module} as m\n"
            f"print(m.GradientStatsMonitor.__lightwatch_package__, m.MetricCheckpoint.__mro__[2].__module__)\n")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    package, checkpoint_module = out.stdout.split()
    assert package == binds_to and checkpoint_module.startswith(binds_to)


def test_lightwatch_lightning_without_lightning_says_what_to_install() -> None:
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
            "import lightwatch.lightning\n")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "Install lightning, or use the callbacks bound to pytorch_lightning (lightwatch.callbacks)" in out.stderr


def test_attributes_lightning_writes_on_a_checkpoint_callback_can_be_set(tmp_path: Any) -> None:
    # ddp_spawn: the main process's callback never trained; Lightning sets best_model_path on it afterwards
    import lightning as L

    from conftest import Classifier, make_loader
    from lightwatch.lightning import MetricCheckpoint

    class LClassifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Classifier()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.inner(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val/loss", torch.nn.functional.cross_entropy(self.inner(x), y))

        def configure_optimizers(self) -> Any:
            return self.inner.configure_optimizers()

    trained = MetricCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val/loss", save_top_k=2)
    trainer = L.Trainer(default_root_dir=str(tmp_path), max_epochs=3, callbacks=[trained], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LClassifier(), make_loader(n=64), make_loader(n=32, seed=1))

    fresh = MetricCheckpoint(monitor="val/loss", save_top_k=2)  # as in the main process of ddp_spawn
    fresh.best_model_path = trained.best_model_path
    assert fresh.best_model_path == trained.best_model_path and fresh.dirpath == trained.dirpath
    assert float(fresh.best_model_score) == pytest.approx(float(trained.best_model_score))
    assert sorted(fresh.best_k_models) == sorted(trained.best_k_models)
    # every attribute ModelCheckpoint lets Lightning or a user assign reads back what was assigned
    values: List[Any] = [("best_model_score", torch.tensor(0.5)), ("last_model_path", "/x/last.ckpt"),
                         ("kth_best_model_path", "/x/k.ckpt"), ("best_k_models", {"/x/a.ckpt": torch.tensor(1.0)}),
                         ("kth_value", torch.tensor(2.0)), ("best_model_path", "/x/b.ckpt")]
    for name, value in values:
        setattr(fresh, name, value)
        assert getattr(fresh, name) == value if not isinstance(value, torch.Tensor) else \
            float(getattr(fresh, name)) == float(value)
