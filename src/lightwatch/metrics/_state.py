"""JSON-safe encoding of statistic state, and strict reading of state that may be corrupt or foreign.

Encoding rules (shared by every statistic):

- finite floats are written as Python floats (``json`` writes their shortest round-trip ``repr``, so a
  ``json.dumps``/``json.loads`` round trip is bit exact);
- non-finite floats are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``, so the output passes
  ``json.dumps(..., allow_nan=False)`` and is valid JSON for any reader;
- counts are Python ints;
- large int64 arrays (sample hashes, sketch registers) are base64 strings of their little-endian bytes,
  which is exact, compact and not pickle.
"""
from __future__ import annotations

import base64
import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["encode_float", "decode_float", "encode_floats", "encode_ints", "encode_b64", "StateReader"]

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
JsonFloat = Union[float, str]


def encode_float(v: float) -> JsonFloat:
    """A float as JSON-safe Python: itself when finite, else ``"nan"``, ``"inf"`` or ``"-inf"``."""
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def decode_float(v: Any) -> float:
    """Inverse of :func:`encode_float`; raises ``ValueError`` on anything else."""
    if isinstance(v, bool):
        raise ValueError(f"expected a number or 'nan'/'inf'/'-inf', got {v!r}")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in _NONFINITE:
        return _NONFINITE[v]
    raise ValueError(f"expected a number or 'nan'/'inf'/'-inf', got {v!r}")


def encode_floats(t: torch.Tensor) -> List[Any]:
    """A float tensor (any shape) as nested lists of JSON-safe floats."""
    values = t.detach().to("cpu", torch.float64).tolist()
    return _map_nested(values, encode_float)


def encode_ints(t: torch.Tensor) -> List[Any]:
    """An integer tensor (any shape) as nested lists of Python ints."""
    return t.detach().to("cpu", torch.int64).tolist()


def encode_b64(t: torch.Tensor, dtype: torch.dtype = torch.int64) -> str:
    """A tensor as base64 of its little-endian bytes in ``dtype`` (flattened)."""
    arr = t.detach().to("cpu", dtype).reshape(-1).numpy()
    np_dtype = {torch.int64: "<i8", torch.uint8: "u1"}[dtype]
    return base64.b64encode(arr.astype(np_dtype).tobytes()).decode("ascii")


def _map_nested(values: Any, fn: Any) -> Any:
    if isinstance(values, list):
        return [_map_nested(v, fn) for v in values]
    return fn(values)


class StateReader:
    """Validates a state dict for ``owner.from_state_dict`` and decodes its fields.

    Every failure is a ``ValueError`` that names the class, the field and what was expected, so a corrupt
    or foreign profile is rejected with a message a user can act on.

    Args:
        state: the state dict to read.
        owner: the class it is read for (named in errors).
        kind: the ``kind`` the state must have.
        version: the ``version`` the state must have.
        required: keys that must be present.

    Example:
        >>> reader = StateReader({"kind": "moments", "version": 1, "count": [2, "nan"]}, "Moments", "moments", 1,
        ...                      ["count"])
        >>> reader.floats("count", (2,))
        tensor([2., nan], dtype=torch.float64)
        >>> StateReader({"kind": "histogram", "version": 1}, "Moments", "moments", 1, [])
        Traceback (most recent call last):
        ...
        ValueError: Moments.from_state_dict: state is of kind 'histogram', expected 'moments'
    """

    def __init__(self, state: Any, owner: str, kind: str, version: int, required: Sequence[str]) -> None:
        self.owner = owner
        if not isinstance(state, Mapping):
            raise self.error(f"expected a dict, got {type(state).__name__}")
        got_kind = state.get("kind")
        if got_kind != kind:
            raise self.error(f"state is of kind {got_kind!r}, expected {kind!r}")
        got_version = state.get("version")
        if got_version != version:
            raise self.error(f"unsupported version {got_version!r} (this build reads version {version})")
        missing = [k for k in required if k not in state]
        if missing:
            raise self.error(f"missing keys {missing}")
        self.state = state

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.owner}.from_state_dict: {message}")

    def __getitem__(self, key: str) -> Any:
        return self.state[key]

    def int_value(self, key: str, minimum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
        v = self.state[key]
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"field {key!r} must be an int, got {v!r}")
        if minimum is not None and v < minimum:
            raise self.error(f"field {key!r} must be >= {minimum}, got {v}")
        return v

    def bool_value(self, key: str) -> bool:
        v = self.state[key]
        if not isinstance(v, bool):
            raise self.error(f"field {key!r} must be true/false, got {v!r}")
        return v

    def floats(self, key: str, shape: Tuple[int, ...]) -> torch.Tensor:
        """Field ``key`` as a float64 tensor of exactly ``shape`` (numbers or 'nan'/'inf'/'-inf')."""
        flat = self._flatten(key, self.state[key], shape)
        try:
            values = [decode_float(v) for v in flat]
        except ValueError as exc:
            raise self.error(f"field {key!r}: {exc}") from None
        return torch.tensor(values, dtype=torch.float64).reshape(shape)

    def ints(self, key: str, shape: Tuple[int, ...], minimum: Optional[int] = 0) -> torch.Tensor:
        """Field ``key`` as an int64 tensor of exactly ``shape`` (integral numbers only)."""
        flat = self._flatten(key, self.state[key], shape)
        out = []
        for v in flat:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
                raise self.error(f"field {key!r} must hold integers, got {v!r}")
            if minimum is not None and v < minimum:
                raise self.error(f"field {key!r} must hold integers >= {minimum}, got {v!r}")
            out.append(int(v))
        return torch.tensor(out, dtype=torch.int64).reshape(shape)

    def b64(self, key: str, dtype: torch.dtype, length: Optional[int] = None) -> torch.Tensor:
        """Field ``key`` decoded from base64 little-endian bytes (see :func:`encode_b64`)."""
        v = self.state[key]
        if not isinstance(v, str):
            raise self.error(f"field {key!r} must be a base64 string, got {type(v).__name__}")
        try:
            raw = base64.b64decode(v.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError) as exc:
            raise self.error(f"field {key!r} is not valid base64 ({exc})") from None
        np_dtype = np.dtype({torch.int64: "<i8", torch.uint8: "u1"}[dtype])
        if len(raw) % np_dtype.itemsize:
            raise self.error(f"field {key!r} has {len(raw)} bytes, not a multiple of {np_dtype.itemsize}")
        arr = np.frombuffer(raw, dtype=np_dtype).astype(np_dtype.newbyteorder("="))
        if length is not None and arr.size != length:
            raise self.error(f"field {key!r} has {arr.size} entries, expected {length}")
        return torch.from_numpy(arr.copy())

    def _flatten(self, key: str, value: Any, shape: Tuple[int, ...]) -> List[Any]:
        out: List[Any] = []

        def walk(v: Any, dims: Tuple[int, ...], path: str) -> None:
            if not dims:
                if isinstance(v, list):
                    raise self.error(f"field {key!r}{path} is a list, expected a scalar")
                out.append(v)
                return
            if not isinstance(v, list):
                raise self.error(f"field {key!r}{path} must be a list, got {type(v).__name__}")
            if len(v) != dims[0]:
                raise self.error(f"field {key!r}{path} has {len(v)} entries, expected {dims[0]}")
            for i, item in enumerate(v):
                walk(item, dims[1:], f"{path}[{i}]")

        walk(value, shape, "")
        return out
