"""Attributes of a checkpoint callback that live elsewhere: in one of its parts (:class:`PartAttribute`), or
computed from its records unless assigned (:class:`AssignedAttribute`, as Lightning assigns ``best_model_path``
and the like on a checkpoint callback).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["AssignedAttribute", "PartAttribute"]


class PartAttribute:
    """An attribute of an object kept by one of its parts (e.g. ``_selection``): read and set there.

    Args:
        part: the attribute holding the part.
        name: the attribute's name on the part (default: the same name).

    Example:
        >>> class Part:
        ...     size = 1
        >>> class Whole:
        ...     size = PartAttribute("_part")
        ...     def __init__(self): self._part = Part()
        >>> w = Whole(); w.size = 3
        >>> w._part.size
        3
    """

    def __init__(self, part: str, name: Optional[str] = None) -> None:
        self.part, self.name = part, name or ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Any:
        return self if obj is None else getattr(getattr(obj, self.part), self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(getattr(obj, self.part), self.name, value)


class AssignedAttribute:
    """An attribute computed from the object's records, until a value is assigned to it.

    Lightning assigns ``best_model_path``, ``best_model_score``, ``kth_value``, ... on a checkpoint callback (when
    it restores one, or in the main process of ``ddp_spawn``); such a value stands until the object clears its
    ``_assigned`` dictionary (at its next commit, which changes the records the value was computed from).

    Args:
        compute: the value from the object's records: ``compute(obj)``.
        convert: applied to an assigned value (e.g. ``str``).

    Example:
        >>> class Records:
        ...     best = AssignedAttribute(lambda self: "/ckpt/best.ckpt")
        ...     def __init__(self): self._assigned = {}
        >>> r = Records(); r.best
        '/ckpt/best.ckpt'
        >>> r.best = "/elsewhere.ckpt"; r.best
        '/elsewhere.ckpt'
    """

    def __init__(self, compute: Callable[[Any], Any], convert: Optional[Callable[[Any], Any]] = None) -> None:
        self.compute, self.convert, self.name = compute, convert, ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Any:
        if obj is None:
            return self
        return obj._assigned[self.name] if self.name in obj._assigned else self.compute(obj)

    def __set__(self, obj: Any, value: Any) -> None:
        obj._assigned[self.name] = self.convert(value) if self.convert is not None else value
