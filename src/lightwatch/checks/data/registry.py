"""The built-in data checks by name, and how ``DataQualityMonitor(checks=...)`` is read.

The built-in checks are listed once, by name and class, in the torch-free table
:data:`lightwatch.checks.data_names.BUILTIN_DATA_CHECKS`; :data:`BUILTIN_CHECKS` holds their classes, imported
from it, and the Hydra schema ``DataChecksConf`` takes one field per name from the same table. Adding a built-in
check is therefore one module under ``lightwatch.checks.data``, its line in that table, and a test.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

from lightwatch.checks.data.base import DataCheck, check_tiers
from lightwatch.checks.data_names import BUILTIN_DATA_CHECKS
from lightwatch.core.callback import MonitorCallback
from lightwatch.core.alerts import check_severity

__all__ = ["BUILTIN_CHECKS", "CheckSpec", "builtin_check", "check_table", "import_check", "parse_checks"]


def import_check(name: str, target: str) -> Type[DataCheck]:
    """The class of the built-in check ``name`` from its line in the table: ``target`` is ``"<module>.<Class>"``
    under ``lightwatch.checks.data``. A ``TypeError`` when it is not a :class:`DataCheck` called ``name``.

    Example:
        >>> import_check("duplicates", "duplicates.Duplicates").__name__
        'Duplicates'
    """
    module, _, class_name = target.rpartition(".")
    cls = getattr(importlib.import_module(f"{__package__}.{module}"), class_name, None) if module else None
    if not (isinstance(cls, type) and issubclass(cls, DataCheck) and cls.name == name):
        raise TypeError(f"lightwatch.checks.data_names.BUILTIN_DATA_CHECKS[{name!r}] = {target!r} does not name a "
                        f"DataCheck called {name!r}; give \"<module>.<Class>\" of a class under lightwatch.checks.data "
                        f"whose name is {name!r}.")
    return cls


#: The built-in checks by name, per-batch tier first, in the order they are documented and configured (the order
#: of :data:`~lightwatch.checks.data_names.BUILTIN_DATA_CHECKS`).
BUILTIN_CHECKS: Dict[str, Type[DataCheck]] = {
    name: import_check(name, target) for name, target in BUILTIN_DATA_CHECKS.items()
}

#: What ``checks=`` accepts: ``{name: settings | bool | None | DataCheck}``, or a list of names and checks.
CheckSpec = Union[Mapping[str, Any], Sequence[Union[str, DataCheck]]]


def builtin_check(name: str) -> Type[DataCheck]:
    """The built-in check class called ``name``; ``KeyError`` naming the built-in checks otherwise.

    Example:
        >>> builtin_check("duplicates").__name__
        'Duplicates'
    """
    try:
        return BUILTIN_CHECKS[name]
    except KeyError:
        raise KeyError(f"no built-in data check {name!r}; the checks are {', '.join(BUILTIN_CHECKS)}.") from None


def check_table() -> Dict[str, Dict[str, Any]]:
    """Every built-in check, its tier, and its defaults: ``action``, ``severity`` and its own parameters."""
    return {name: {"tier": cls.tier, "action": cls.action, "severity": cls.severity, **cls.defaults}
            for name, cls in BUILTIN_CHECKS.items()}


def _from_settings(name: str, override: Any, where: str) -> DataCheck:
    """The built-in check ``name`` with one ``checks={name: ...}`` entry applied."""
    cls = BUILTIN_CHECKS[name]
    if override is None or override is False:
        override = {"enabled": False}
    elif override is True:
        override = {}
    if not isinstance(override, Mapping):
        raise ValueError(f"{where}(checks={{{name!r}: ...}}): expected a mapping of settings (or true/false), got "
                         f"{type(override).__name__} {override!r}.")
    override = dict(override)
    allowed = {"enabled", "action", "severity"} | set(cls.defaults)
    bad = sorted(set(override) - allowed)
    if bad:
        raise ValueError(f"{where}(checks={{{name!r}: ...}}): unknown setting(s) {bad}; allowed: "
                         f"{', '.join(sorted(allowed))}.")
    action = MonitorCallback.check_action(str(override.get("action", cls.action)),
                                          f"{where}(checks={{{name!r}: {{action: ...}}}})")
    severity = check_severity(str(override.get("severity", cls.severity)),
                              f"{where}(checks={{{name!r}: {{severity: ...}}}})")
    params = {key: cls.check_param(key, override.get(key, cls.defaults[key]),
                                     f"{where}(checks={{{name!r}: {{{key}: ...}}}})") for key in sorted(cls.defaults)}
    enabled = override.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"{where}(checks={{{name!r}: {{enabled: ...}}}}): must be true or false, got {enabled!r}.")
    return cls(enabled=enabled, action=action, severity=severity, **params)


def parse_checks(checks: Optional[CheckSpec], where: str) -> Tuple[Dict[str, DataCheck], List[DataCheck]]:
    """``(built-in checks by name, custom checks)`` from the ``checks=`` argument of ``DataQualityMonitor``.

    A mapping configures built-in checks by name (settings, ``true``/``false``/``None``) and may map a name to a
    check instance. A list names the checks that run: built-in names run with their defaults, check instances
    as they are; built-in checks not listed are switched off. A check of your own is any
    :class:`~lightwatch.checks.data.base.DataCheck` whose name is not a built-in one.

    Example:
        >>> builtin, custom = parse_checks(["nonfinite", "duplicates"], "DataQualityMonitor")
        >>> [name for name, check in builtin.items() if check.enabled], custom
        (['nonfinite', 'duplicates'], [])
    """
    instances: Dict[str, DataCheck] = {}
    if checks is not None and not isinstance(checks, Mapping):
        if isinstance(checks, (str, bytes)) or not isinstance(checks, Sequence):
            raise ValueError(f"{where}(checks=...): expected a mapping {{check: settings}} or a list of check names "
                             f"and DataCheck instances, got {type(checks).__name__} {checks!r}.")
        user: Dict[str, Any] = {name: False for name in BUILTIN_CHECKS}
        for item in checks:
            if isinstance(item, DataCheck):
                instances[item.name] = item
                user.pop(item.name, None)
            elif isinstance(item, str) and item in BUILTIN_CHECKS:
                user[item] = {}
            else:
                raise ValueError(f"{where}(checks=[...]): {item!r} is neither a built-in check "
                                 f"({', '.join(BUILTIN_CHECKS)}) nor a DataCheck instance.")
    else:
        user = {}
        for name, value in dict(checks or {}).items():
            if isinstance(value, DataCheck):
                if value.name != name:
                    raise ValueError(f"{where}(checks={{{name!r}: {type(value).__name__}(...)}}): the check is named "
                                     f"{value.name!r}; use its name as the key.")
                instances[name] = value
            else:
                user[name] = value
    unknown = sorted(set(user) - set(BUILTIN_CHECKS))
    if unknown:
        raise ValueError(f"{where}(checks=...): unknown check(s) {unknown}; the checks are "
                         f"{', '.join(BUILTIN_CHECKS)}.")
    builtin: Dict[str, DataCheck] = {}
    for name, cls in BUILTIN_CHECKS.items():
        given = instances.pop(name, None)
        if given is not None and not isinstance(given, cls):
            raise ValueError(f"{where}(checks=...): {type(given).__name__} is named {name!r} like a built-in check "
                             f"({cls.__name__}); give it a name of its own.")
        builtin[name] = given if given is not None else _from_settings(name, user.get(name, {}), where)
    custom = list(instances.values())
    check_tiers(custom)
    return builtin, custom
