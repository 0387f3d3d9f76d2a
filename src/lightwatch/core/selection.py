"""Which modules and parameters a monitor watches, and which subjects it writes.

Selection is by regular expressions on ``named_modules()`` / ``named_parameters()`` names (``re.search``;
anchor with ``^``/``$`` for exact matches) and by module type. A pattern list that selects nothing is an
error that names the patterns and shows names that exist, never a silent empty monitor.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

__all__ = ["Selection", "top_k_subjects", "as_list"]

TypeSpec = Union[str, type]


def as_list(value: Any) -> Optional[List[Any]]:
    """``None`` stays ``None``; a string becomes a one-item list; any sequence (incl. ListConfig) a list."""
    if value is None:
        return None
    if isinstance(value, (str, type)):
        return [value]
    return list(value)


def _compile(patterns: Optional[Sequence[str]], where: str) -> List[re.Pattern]:
    out = []
    for p in patterns or []:
        try:
            out.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"{where}: invalid regular expression {p!r}: {err}.") from err
    return out


def _type_names(t: type) -> Set[str]:
    names = set()
    for klass in t.__mro__:
        names.add(klass.__name__)
        names.add(f"{klass.__module__}.{klass.__qualname__}")
    return names


class Selection:
    """Include/exclude regexes and module types, applied to a model.

    Args:
        include: regexes; a name is kept if any matches (``None``: keep all).
        exclude: regexes; a name is dropped if any matches.
        module_types: module classes or class names (``"Linear"``, ``"torch.nn.Conv2d"``); subclasses count.
        where: the owner's name, for error messages.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [n for n, _ in Selection(include=[r"^2\\."]).parameters(model)]
        ['2.weight', '2.bias']
        >>> [n for n, _ in Selection(module_types=["ReLU"]).modules(model)]
        ['1']
    """

    def __init__(
        self,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        module_types: Optional[Sequence[TypeSpec]] = None,
        where: str = "lightwatch",
    ) -> None:
        self.include = as_list(include)
        self.exclude = as_list(exclude)
        self.module_types = as_list(module_types)
        self.where = where
        self._include = _compile(self.include, where)
        self._exclude = _compile(self.exclude, where)

    def _name_ok(self, name: str) -> bool:
        if self._include and not any(p.search(name) for p in self._include):
            return False
        return not any(p.search(name) for p in self._exclude)

    def _type_ok(self, module: nn.Module) -> bool:
        if not self.module_types:
            return True
        names = _type_names(type(module))
        return any((isinstance(t, type) and isinstance(module, t)) or (isinstance(t, str) and t in names)
                   for t in self.module_types)

    def _fail(self, kind: str, available: Iterable[str]) -> None:
        sample = list(available)
        shown = ", ".join(sample[:12]) + (" ..." if len(sample) > 12 else "")
        raise ValueError(
            f"{self.where}: include={self.include!r} exclude={self.exclude!r} module_types={self.module_types!r} "
            f"select no {kind}. Available {kind}: {shown or '(none)'}. Fix the patterns (they are re.search "
            f"regexes on names from named_{kind}())."
        )

    def parameters(self, model: nn.Module, require_grad: bool = True) -> List[Tuple[str, torch.nn.Parameter]]:
        """Selected ``(name, parameter)`` pairs; with ``module_types``, only parameters owned by those types."""
        owners = None
        if self.module_types:
            owners = {f"{m}.{p}" if m else p for m, mod in model.named_modules() if self._type_ok(mod)
                      for p, _ in mod.named_parameters(recurse=False)}
        all_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not require_grad]
        chosen = [(n, p) for n, p in all_params if self._name_ok(n) and (owners is None or n in owners)]
        if not chosen and all_params and (self.include or self.exclude or self.module_types):
            self._fail("parameters", (n for n, _ in all_params))
        return chosen

    def modules(self, model: nn.Module, leaf_only: bool = True) -> List[Tuple[str, nn.Module]]:
        """Selected ``(name, module)`` pairs in registration order (leaf modules only by default)."""
        candidates = [(n, m) for n, m in model.named_modules()
                      if n and (not leaf_only or not any(True for _ in m.children()))]
        chosen = [(n, m) for n, m in candidates if self._name_ok(n) and self._type_ok(m)]
        if not chosen and candidates and (self.include or self.exclude or self.module_types):
            self._fail("modules", (n for n, _ in candidates))
        return chosen


def top_k_subjects(names: Sequence[str], scores: Sequence[float], k: Optional[int],
                   always: Iterable[str] = ()) -> List[str]:
    """The ``k`` names with the largest score (non-finite scores rank first), plus every name in ``always``.

    Example:
        >>> top_k_subjects(["a", "b", "c"], [1.0, 3.0, 2.0], k=1, always=["a"])
        ['a', 'b']
    """
    if k is None or k >= len(names):
        return list(names)

    def key(i: int) -> float:
        s = scores[i]
        return float("inf") if s != s else s

    order = sorted(range(len(names)), key=key, reverse=True)[: max(k, 0)]
    keep = {names[i] for i in order} | set(always)
    return [n for n in names if n in keep]
