"""Which Lightning package a callback belongs to: ``pytorch_lightning`` or ``lightning.pytorch``.

Lightning ships the same Trainer under two import names. To each, a callback must be an instance of *its*
``Callback`` (and a checkpoint callback of *its* ``Checkpoint``): ``lightning.pytorch.Trainer`` rejects a
``pytorch_lightning.Callback`` and does not count it as a checkpoint callback. lightwatch therefore writes
every callback once, as a plain class that talks to the Trainer only through what both packages share, and
binds it to a package here: :func:`bind` makes the subclass ``(implementation, <package>.Callback)``. The
bound classes are the ones users add: ``lightwatch.callbacks`` holds them for ``pytorch_lightning`` (or, when
only ``lightning`` is installed, for ``lightning.pytorch``) and ``lightwatch.lightning`` for
``lightning.pytorch``. Neither package is imported until a class is bound to it.

Example:
    >>> from lightwatch.core.lightning import installed_packages
    >>> set(installed_packages()) <= {"pytorch_lightning", "lightning.pytorch"}
    True
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["PACKAGES", "bind", "default_package", "implementation_of", "installed_packages", "package_of"]

#: The two import names of Lightning's Trainer, in order of preference for ``lightwatch.callbacks``.
PACKAGES: Tuple[str, str] = ("pytorch_lightning", "lightning.pytorch")
_BASES = {"callback": ("callbacks", "Callback"), "checkpoint": ("callbacks", "Checkpoint")}
_BOUND: Dict[Tuple[type, str], type] = {}


def _available(package: str) -> bool:
    top = package.split(".")[0]
    try:
        return importlib.util.find_spec(top) is not None and (
            top == package or importlib.util.find_spec(package) is not None)
    except (ImportError, ValueError):
        return False


def installed_packages() -> List[str]:
    """The Lightning packages importable here, in :data:`PACKAGES` order."""
    return [p for p in PACKAGES if _available(p)]


def default_package() -> str:
    """``pytorch_lightning`` when installed, else ``lightning.pytorch``; an ImportError saying what to install."""
    found = installed_packages()
    if not found:
        raise ImportError("lightwatch needs PyTorch Lightning: install `pytorch-lightning` (import "
                          "pytorch_lightning) or `lightning` (import lightning.pytorch).")
    return found[0]


def _module(package: str) -> ModuleType:
    if package not in PACKAGES:
        raise ValueError(f"lightwatch: unknown Lightning package {package!r}; expected one of {list(PACKAGES)}.")
    try:
        return importlib.import_module(package)
    except ImportError as err:
        other = [p for p in PACKAGES if p != package]
        raise ImportError(f"lightwatch: {package} is not installed ({err}). Install "
                          f"{'pytorch-lightning' if package == 'pytorch_lightning' else 'lightning'}, or use the "
                          f"callbacks bound to {other[0]} ({_where(other[0])}).") from err


def _where(package: str) -> str:
    return "lightwatch.lightning" if package == "lightning.pytorch" else "lightwatch.callbacks"


def bind(implementation: type, package: str, base: str = "callback", module: Optional[str] = None) -> type:
    """The subclass of ``implementation`` and ``package``'s ``Callback`` (or ``Checkpoint``), made once.

    Args:
        implementation: the package-neutral class (its hooks call ``super()``, which reaches Lightning's base).
        package: ``"pytorch_lightning"`` or ``"lightning.pytorch"``.
        base: ``"callback"`` or ``"checkpoint"``.
        module: the module the bound class is published in (pickling finds it there by name).
    """
    key = (implementation, f"{package}:{base}")
    bound = _BOUND.get(key)
    if bound is None:
        sub, name = _BASES[base]
        lightning_base = getattr(importlib.import_module(f"{_module(package).__name__}.{sub}"), name)
        bound = type(implementation.__name__.lstrip("_"), (implementation, lightning_base), {
            "__module__": module or _where(package),
            "__qualname__": implementation.__name__.lstrip("_"),
            "__doc__": implementation.__doc__,
            "__lightwatch_implementation__": implementation,
            "__lightwatch_package__": package,
        })
        _BOUND[key] = bound
    return bound


def implementation_of(cls: Any) -> Any:
    """The package-neutral implementation behind a bound class (the class itself when it is one)."""
    return getattr(cls, "__lightwatch_implementation__", cls)


def package_of(trainer: Any) -> ModuleType:
    """The Lightning package ``trainer`` comes from (``pytorch_lightning`` or ``lightning.pytorch``)."""
    name = type(trainer).__module__
    if name.startswith("lightning."):
        return _module("lightning.pytorch")
    if name.startswith("pytorch_lightning"):
        return _module("pytorch_lightning")
    return _module(default_package())
