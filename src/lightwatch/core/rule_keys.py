"""Reading the settings of one rule: every value checked, every error naming the rule and the key.

Used by :class:`~lightwatch.core.rule_base.Rule` and its kinds; settings may come from plain mappings or
from Hydra/OmegaConf configs (see :func:`plain` and :func:`unenum`).
"""
from __future__ import annotations

import difflib
import math
from enum import Enum
from typing import Any, Iterable, List, Mapping, Optional, Sequence

__all__ = ["RuleKeys", "format_value", "plain", "rule_kind", "unenum"]


def format_value(x: float) -> str:
    """A number as rule messages write it: six significant digits.

    Example:
        >>> format_value(0.123456789), format_value(1e-9)
        ('0.123457', '1e-09')
    """
    return f"{x:.6g}"


class RuleKeys:
    """Reads and checks the settings of one rule; every error names the rule and the key.

    Each reader marks its key as used and turns a structured-config enum member into its value; a key the
    config left as ``???`` is reported as missing.

    Args:
        name: the rule's name, for error messages.
        spec: the rule's settings.
        where: the owner, for error messages (e.g. ``"MetricMonitor"``).

    Example:
        >>> keys = RuleKeys("loss_high", {"metric": "train/loss", "above": 10}, "MetricMonitor")
        >>> keys.string("metric", required=True), keys.number("above"), keys.integer("warmup", 0)
        ('train/loss', 10.0, 0)
        >>> keys.number("below") is None
        True
        >>> RuleKeys("r", {"patience": -1}, "MetricMonitor").integer("patience", 10, minimum=1)
        Traceback (most recent call last):
        ...
        ValueError: MetricMonitor rule 'r': key 'patience' must be an integer >= 1, got -1.
    """

    def __init__(self, name: str, spec: Mapping[str, Any], where: str) -> None:
        self.name = name
        self.spec = dict(spec)
        self.where = where
        self.used: set = set()

    def error(self, key: str, problem: str) -> ValueError:
        """An error naming the owner, the rule and ``key``; ``problem`` says what is wrong and what to do."""
        return ValueError(f"{self.where} rule {self.name!r}: key {key!r} {problem}.")

    def has(self, key: str) -> bool:
        """Whether ``key`` is set (and not ``None``)."""
        return key in self.spec and self.spec[key] is not None

    def raw(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` as given (enum members as their values), ``default`` when unset."""
        self.used.add(key)
        value = unenum(self.spec.get(key, default))
        if isinstance(value, str) and value == "???":
            raise self.error(key, "is missing (the config left it as ???); set a value")
        return default if value is None else value

    def string(self, key: str, default: Optional[str] = None, choices: Optional[Sequence[str]] = None,
               required: bool = False) -> Optional[str]:
        """A non-empty string, one of ``choices`` when given."""
        value = self.raw(key, default)
        if value is None:
            if required:
                raise self.error(key, "is required")
            return None
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def number(self, key: str, default: Optional[float] = None, minimum: Optional[float] = None,
               below: Optional[float] = None, positive: bool = False) -> Optional[float]:
        """A number (not a bool, not NaN) within the given bounds, as a float."""
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {value!r}")
        value = float(value)
        if math.isnan(value):
            raise self.error(key, "must not be NaN")
        if positive and not value > 0:
            raise self.error(key, f"must be > 0, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum:g}, got {value!r}")
        if below is not None and not value < below:
            raise self.error(key, f"must be < {below:g}, got {value!r}")
        return value

    def integer(self, key: str, default: Optional[int] = None, minimum: int = 0) -> Optional[int]:
        """An integer (a float with no fractional part is accepted) of at least ``minimum``."""
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and
                                                                          value.is_integer()):
            raise self.error(key, f"must be an integer, got {value!r}")
        if value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}, got {value!r}")
        return int(value)

    def boolean(self, key: str, default: bool) -> bool:
        """``true`` or ``false``, nothing else."""
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def names(self, key: str) -> List[str]:
        """A name or a list of names, as a list (empty when unset)."""
        value = self.raw(key, None)
        if value is None:
            return []
        items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
        if items is None or not all(isinstance(v, str) and v for v in items):
            raise self.error(key, f"must be a name or a list of names, got {value!r}")
        return items

    def check_unknown(self, known: Iterable[str]) -> None:
        """Reject a key not in ``known``, suggesting the closest known one."""
        known = sorted(known)
        for key in self.spec:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; keys of this kind: {', '.join(known)}"
                raise ValueError(f"{self.where} rule {self.name!r}: unknown key {key!r}{hint}")


def rule_kind(name: str, spec: Mapping[str, Any], kinds: Iterable[str], where: str) -> str:
    """The ``kind`` of rule ``name``'s settings, one of ``kinds``; otherwise a ``ValueError`` that lists them and
    suggests the closest.

    Example:
        >>> rule_kind("r", {"kind": "plateau"}, ["plateau", "spike"], "MetricMonitor")
        'plateau'
        >>> rule_kind("r", {"kind": "spik"}, ["plateau", "spike"], "MetricMonitor")
        Traceback (most recent call last):
        ...
        ValueError: MetricMonitor rule 'r': key 'kind' must be one of plateau, spike, got 'spik'; did you mean 'spike'?
    """
    kinds = list(kinds)
    kind = unenum(spec.get("kind"))
    if kind not in kinds:
        close = difflib.get_close_matches(str(kind), kinds, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where} rule {name!r}: key 'kind' must be one of {', '.join(kinds)}, got {kind!r}{hint}")
    return kind


def unenum(value: Any) -> Any:
    """Enum members (structured configs) to their values, also inside lists.

    Example:
        >>> from enum import Enum
        >>> class Mode(Enum):
        ...     MIN = "min"
        >>> unenum(Mode.MIN), unenum([Mode.MIN, "max"])
        ('min', ['min', 'max'])
    """
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [unenum(v) for v in value]
    return value


def plain(value: Any) -> Any:
    """OmegaConf containers to plain ``dict``/``list`` (resolved), everything else unchanged.

    Example:
        >>> from omegaconf import OmegaConf
        >>> plain(OmegaConf.create({"metric": "val/loss", "patience": 3}))
        {'metric': 'val/loss', 'patience': 3}
    """
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value
