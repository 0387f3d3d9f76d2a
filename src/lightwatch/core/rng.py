"""Random-number-generator states of this process (Python, NumPy, torch CPU and CUDA), captured and restored.

Two encodings of the same states:

- :func:`collect_rng_state` / :func:`restore_rng_state`: tensors, lists, ints, floats and strings only, so a
  checkpoint holding it loads with ``torch.load(path, weights_only=True)`` (``checkpoint["lightwatch"]["rng"]``
  of every full checkpoint ``MetricCheckpoint`` writes);
- :func:`capture_rng_state` / :func:`restore_rng`: the generators' own objects, for in-memory snapshots.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Mapping

import numpy as np
import torch

__all__ = ["capture_rng_state", "collect_rng_state", "restore_rng", "restore_rng_state"]


def collect_rng_state() -> Dict[str, Any]:
    """The random-number-generator states of torch (CPU and CUDA), numpy and Python ``random``.

    Encoded with tensors, lists, ints, floats and strings only, so a checkpoint holding it loads with
    ``torch.load(path, weights_only=True)``. :func:`restore_rng_state` sets them back.

    Example:
        >>> state = collect_rng_state()
        >>> a = torch.rand(2); restore_rng_state(state); b = torch.rand(2)
        >>> bool(torch.equal(a, b))
        True
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "state": [int(v) for v in py_state],
                   "gauss_next": None if py_gauss is None else float(py_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the generators back to a state from :func:`collect_rng_state` (or ``checkpoint["lightwatch"]["rng"]``).

    Missing parts are left alone, so a state written on a CPU machine restores on a GPU machine and back.

    Args:
        state: the mapping :func:`collect_rng_state` returned, as saved or as loaded back.

    Example:
        >>> import random
        >>> state = collect_rng_state()
        >>> a = random.random(); restore_rng_state({"python": state["python"]})
        >>> random.random() == a
        True
    """
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda])
    np_state = state.get("numpy")
    if np_state:
        keys = np_state["keys"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((str(np_state["name"]), keys.astype(np.uint32), int(np_state["pos"]),
                             int(np_state["has_gauss"]), float(np_state["cached_gaussian"])))
    py_state = state.get("python")
    if py_state:
        random.setstate((int(py_state["version"]), tuple(int(v) for v in py_state["state"]),
                         py_state.get("gauss_next")))


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and (when initialised) CUDA generator states of this process, as they are.

    Example:
        >>> state = capture_rng_state()
        >>> a = torch.rand(1); restore_rng(state)
        >>> bool(torch.equal(a, torch.rand(1)))
        True
    """
    state: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any], from_checkpoint: bool = False) -> None:
    """Restore generator states saved by :func:`capture_rng_state`, or by :func:`collect_rng_state` when
    ``from_checkpoint`` (the encoding of ``checkpoint["lightwatch"]["rng"]``).

    Args:
        state: the captured states.
        from_checkpoint: ``state`` was read from a checkpoint file.
    """
    if from_checkpoint:
        restore_rng_state(state)
        return
    if "python" in state:
        py = state["python"]
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in py) if isinstance(py, list) else py)
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in state["cuda"]])
