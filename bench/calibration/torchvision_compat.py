"""Make ``import torchvision`` work next to the CPU build of torch, for the calibration corpus only.

The problem (torch 2.13.0+cpu with torchvision 0.28.0 from PyPI, as ``make calibration`` installs them):
PyPI's torchvision 0.28.0 wheel for Linux is a CUDA build. Its compiled ops, ``torchvision/_C.so``, link
``libtorch_cuda.so`` and ``libc10_cuda.so``, which the CPU torch does not ship, so they cannot load. The
pure-Python part of ``import torchvision`` then registers fake (meta) kernels for ``torchvision::nms`` and
``torchvision::qnms`` (``torchvision/_meta_registrations.py``) and fails with

    RuntimeError: operator torchvision::nms does not exist

Everything that imports torchvision breaks with it: timm, and torchmetrics (which imports torchvision
whenever it is installed), and through torchmetrics ``import pytorch_lightning`` itself. That is why the
corpus has its own venv (``.venv-calibration``) and torchvision/timm must never go into ``.venv``.

The workaround: before anything imports torchvision, try to load its compiled ops; if they do not load,
define the schemas of the two ops that its import registers fake kernels for, in a ``torchvision``
library fragment kept alive by this module. torchvision, timm, torchmetrics and pytorch_lightning then
import, and the classification models the corpus uses (ResNet, ViT, ConvNeXt) work: they need no compiled
torchvision op. Detection ops (``torchvision.ops.nms`` and friends) still do not work, and nothing here
uses them.

Import this module first (``bench/calibration/__init__.py`` does, and so does every worker process, since
it imports the package). It is a no-op where torchvision is absent or its ops load.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

import torch

#: The library fragment that holds the two schemas; it must stay referenced, or the ops go away again.
_LIB: Optional["torch.library.Library"] = None
#: What :func:`apply` found and did, for reports: "absent", "native", "patched", "already imported" or an error.
STATUS: str = "not applied"

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except Exception:
        return False


def apply() -> str:
    """Make torchvision importable (see the module docstring); return what was done. Idempotent."""
    global _LIB, STATUS
    if _LIB is not None or STATUS in ("native", "patched", "absent"):
        return STATUS
    if "torchvision" in sys.modules:
        STATUS = "already imported"
        return STATUS
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        STATUS = "absent"
        return STATUS
    so = os.path.join(os.path.dirname(spec.origin), "_C.so")
    if os.path.exists(so):
        try:
            torch.ops.load_library(so)
        except (OSError, RuntimeError):
            pass
    if all(_op_exists(name) for name in ("nms", "qnms")):
        STATUS = "native"
        return STATUS
    _LIB = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - a fragment we own for the process
    for schema in _SCHEMAS:
        if not _op_exists(schema.split("(")[0]):
            _LIB.define(schema)
    STATUS = "patched"
    return STATUS


apply()
