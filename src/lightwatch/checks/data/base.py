"""The protocol of a data check: what it observes, the state it keeps, when it is judged, what it raises.

A check is a small object with no Lightning dependency, modelled on a torchmetrics ``Metric``:

- **settings**: ``enabled``, ``action``, ``severity`` and numeric parameters (class attribute ``defaults``,
  validated against ``bounds``), all overridable per instance;
- **observation**: :meth:`DataCheck.update` gets the field values of every batch of a split (after the
  monitor's selection, on their device), and keeps what it needs in states declared with
  :meth:`DataCheck.add_state`;
- **reduction**: each state is reduced across DDP ranks with its ``reduce`` (``sum``, ``max`` or ``min``)
  before the check is judged, so every rank judges the same numbers and raises the same alert;
- **judgement**: :meth:`DataCheck.judge` runs when the check's ``tier`` says (``batch``: at every logged step
  and at the end of each epoch; ``epoch``: at the end of each epoch of each split, and after the scan before
  training), with a :class:`CheckContext` that reports alerts (rule ``data_<name>``) and writes scalars.

The built-in checks read the monitor's shared statistics (counters, moments, histograms, sample hashes)
instead of keeping states of their own; their extra tiers ``first_batch`` and ``scan`` are driven by the
monitor. A check of your own only needs ``name``, ``update`` and ``judge``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch

from lightwatch.core.alerts import check_severity, severity_at_least
from lightwatch.core.callback import MonitorCallback

__all__ = ["CheckContext", "DataCheck", "TIERS"]

#: When a check is judged: ``batch`` and ``epoch`` for any check; ``first_batch`` and ``scan`` are built-in only.
TIERS = ("batch", "first_batch", "epoch", "scan")
_REDUCTIONS = ("sum", "max", "min")
_PARAM_KEYS = ("enabled", "action", "severity")


@dataclass
class CheckContext:
    """What a check is judged with: the split, the step, its reduced states, and where its findings go.

    Args:
        split: the split judged (``train``, ``val``, ``val_1``, ``test``...).
        step: the training step the judgement belongs to.
        state: the check's states, reduced over the ranks (``{name: tensor}``, on the host).
        scan: whether the judgement comes from the scan before training.
        report: ``report(check, subject=..., value=..., message=..., step=..., threshold=..., severity=...)``:
            turns a finding into an alert (set by the monitor).
        tag: ``tag(group, subject, stat)``: the monitor's TensorBoard tag.
        scalars: the scalars the monitor writes for this judgement.

    Example:
        >>> ctx = CheckContext("train", step=3)
        >>> ctx.scalar("train/x", "nan_rows", 2.0)
        >>> ctx.scalars
        {'monitor.data/train/x/nan_rows': 2.0}
    """

    split: str
    step: int
    state: Dict[str, torch.Tensor] = field(default_factory=dict)
    scan: bool = False
    report: Optional[Callable[..., None]] = None
    tag: Optional[Callable[..., str]] = None
    scalars: Dict[str, float] = field(default_factory=dict)

    def scalar(self, subject: str, stat: str, value: float) -> None:
        """Write ``value`` under ``<prefix>.data/<subject>/<stat>`` with the monitor's other scalars."""
        key = self.tag("data", subject, stat) if self.tag is not None else f"monitor.data/{subject}/{stat}"
        self.scalars[key] = float(value)


class DataCheck:
    """One data check: its settings, what it observes per batch, its states, and the alert it raises.

    Subclass it for a check of your own: set ``name`` (the alert's rule is ``data_<name>``), ``tier`` (``batch``
    or ``epoch``), ``action`` and ``severity`` (the defaults), ``defaults`` and ``bounds`` for numeric settings;
    declare states in ``__init__`` with :meth:`add_state`, update them in :meth:`update`, and report findings
    in :meth:`judge` with :meth:`alert`. The monitor keeps one copy of the check per split, reduces its states
    across ranks before judging, and resets them afterwards.

    Args:
        enabled: whether the check runs.
        action: what its alert does (``log``, ``warn``, ``stop``, ``raise``, ``skip_step``, ...).
        severity: the alert's severity (``info``, ``warning``, ``error``, ``critical``).
        **params: the check's numeric settings (keys of ``defaults``).

    Example:
        >>> import torch
        >>> class NegativeLabels(DataCheck):
        ...     name = "negative_labels"
        ...     tier = "epoch"
        ...     defaults = {"max_fraction": 0.0}
        ...     bounds = {"max_fraction": (0.0, 1.0, True)}
        ...     def __init__(self, **settings):
        ...         super().__init__(**settings)
        ...         self.add_state("negative", torch.zeros(()), reduce="sum")
        ...         self.add_state("rows", torch.zeros(()), reduce="sum")
        ...     def update(self, split, fields):
        ...         y = fields.get("y")
        ...         if y is not None:
        ...             self.negative += (y < 0).sum()
        ...             self.rows += y.numel()
        ...     def judge(self, ctx):
        ...         fraction = float(ctx.state["negative"] / ctx.state["rows"].clamp_min(1))
        ...         if fraction > self["max_fraction"]:
        ...             self.alert(ctx, subject=f"{ctx.split}/y", value=fraction,
        ...                        message=f"{fraction:.0%} of the labels are negative")
        >>> check = NegativeLabels(action="log")
        >>> check.update("train", {"y": torch.tensor([1, -1, 0, 2])})
        >>> found = []
        >>> ctx = CheckContext("train", step=0, state=check.reduced_state(),
        ...                    report=lambda c, **alert: found.append((c.rule, alert["value"])))
        >>> check.judge(ctx)
        >>> found
        [('data_negative_labels', 0.25)]
    """

    #: the check's name: its key in ``checks=``, and ``data_<name>`` is its alert's rule
    name: ClassVar[str] = ""
    #: when it is judged: ``batch`` (every logged step), ``epoch`` (end of each epoch and of the scan)
    tier: ClassVar[str] = "epoch"
    #: default action and severity of its alert
    action: str = "warn"
    severity: str = "warning"
    #: numeric settings and their defaults
    defaults: ClassVar[Mapping[str, float]] = {}
    #: allowed range of each numeric setting: ``(low, high, low inclusive)``
    bounds: ClassVar[Mapping[str, Tuple[float, float, bool]]] = {}

    def __init__(self, enabled: bool = True, action: Optional[str] = None, severity: Optional[str] = None,
                 **params: Any) -> None:
        where = f"{type(self).__name__}"
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"{where}: a data check needs a class attribute `name` (its key in checks= and the "
                             f"`data_<name>` rule of its alert).")
        if self.tier not in TIERS:
            raise ValueError(f"{where}: tier must be one of {', '.join(TIERS)}, got {self.tier!r}.")
        if not isinstance(enabled, bool):
            raise ValueError(f"{where}(enabled=...): must be true or false, got {enabled!r}.")
        self.enabled = enabled
        self.action = MonitorCallback.check_action(str(type(self).action if action is None else action),
                                                   f"{where}(action=...)")
        self.severity = check_severity(str(type(self).severity if severity is None else severity),
                                       f"{where}(severity=...)")
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {unknown}; allowed: "
                             f"{', '.join(sorted(set(_PARAM_KEYS) | set(self.defaults)))}.")
        self.params: Dict[str, float] = {}
        for key in sorted(self.defaults):
            self.params[key] = self.check_param(key, params.get(key, self.defaults[key]), f"{where}({key}=...)")
        self._defaults: Dict[str, Tuple[torch.Tensor, str]] = {}

    # ------------------------------------------------------------------------------------- settings
    @property
    def rule(self) -> str:
        """The rule of the check's alerts: ``data_<name>``."""
        return f"data_{self.name}"

    def __getitem__(self, key: str) -> float:
        return self.params[key]

    def graded(self, strong: bool) -> str:
        """The check's severity when the finding is ``strong``, else at most ``info``."""
        if strong or not severity_at_least(self.severity, "info"):
            return self.severity
        return "info"

    @classmethod
    def check_param(cls, key: str, value: Any, where: str) -> float:
        """``value`` as a float after checking it against ``bounds[key]``; raises ``ValueError`` naming ``where``."""
        lo, hi, inclusive = cls.bounds.get(key, (-math.inf, math.inf, True))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                (lo <= value if inclusive else lo < value) and value <= hi):
            raise ValueError(f"{where}: must be a number in {'[' if inclusive else '('}{lo}, {hi}], got {value!r}.")
        return float(value)

    def settings(self) -> Dict[str, Any]:
        """The check's settings as keyword arguments of its constructor."""
        return {"enabled": self.enabled, "action": self.action, "severity": self.severity, **self.params}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
        return (f"{type(self).__name__}(enabled={self.enabled}, action={self.action!r}, severity={self.severity!r}"
                f"{', ' + params if params else ''})")

    # ---------------------------------------------------------------------------------------- state
    def add_state(self, name: str, default: torch.Tensor, reduce: str = "sum") -> None:
        """Declare a state: an attribute ``name`` starting at ``default``, reduced across ranks with ``reduce``."""
        if reduce not in _REDUCTIONS:
            raise ValueError(f"{type(self).__name__}.add_state({name!r}): reduce must be one of "
                             f"{', '.join(_REDUCTIONS)}, got {reduce!r}.")
        if not isinstance(default, torch.Tensor):
            raise ValueError(f"{type(self).__name__}.add_state({name!r}): the default must be a tensor, got "
                             f"{type(default).__name__}.")
        self._defaults[name] = (default.detach().clone(), reduce)
        setattr(self, name, default.detach().clone())

    @property
    def states(self) -> Dict[str, str]:
        """``{state: reduce}`` of the declared states."""
        return {name: reduce for name, (_, reduce) in self._defaults.items()}

    def reduced_state(self) -> Dict[str, torch.Tensor]:
        """This process's states as they are (the monitor reduces them across ranks before judging)."""
        return {name: getattr(self, name) for name in self._defaults}

    def reset(self) -> None:
        """Put every state back to its default (after each judgement)."""
        for name, (default, _) in self._defaults.items():
            current = getattr(self, name, default)
            setattr(self, name, default.clone().to(current.device if isinstance(current, torch.Tensor) else "cpu"))

    def to(self, device: Any) -> "DataCheck":
        """Move the states to ``device``."""
        for name in self._defaults:
            setattr(self, name, getattr(self, name).to(device))
        return self

    # ----------------------------------------------------------------------------------- the protocol
    @classmethod
    def implements_protocol(cls) -> bool:
        """Whether the class implements :meth:`update` or :meth:`judge`: the monitor then feeds and judges it
        (custom checks, and built-in ones that keep states of their own)."""
        return cls.update is not DataCheck.update or cls.judge is not DataCheck.judge

    def update(self, split: str, fields: Mapping[str, torch.Tensor]) -> None:
        """Observe one batch of ``split``: ``{field name: tensor}`` (read-only). Keep results in states."""

    def judge(self, ctx: CheckContext) -> None:
        """Judge the reduced states in ``ctx.state`` and report findings with :meth:`alert`."""

    def alert(self, ctx: CheckContext, *, subject: str, value: Optional[float], message: str,
              threshold: Optional[float] = None, severity: Optional[str] = None, step: Optional[int] = None) -> None:
        """Report a finding: an alert of rule ``data_<name>`` with this check's action and severity."""
        if ctx.report is None:
            raise RuntimeError(f"{type(self).__name__}.alert: the context has no report function; judge the "
                               f"check through DataQualityMonitor.")
        ctx.report(self, subject=subject, value=value, message=message, step=ctx.step if step is None else step,
                   threshold=threshold, severity=severity)


def check_tiers(checks: List[DataCheck]) -> None:
    """Raise ``ValueError`` for a user check whose tier the monitor cannot drive (``first_batch``, ``scan``)."""
    for check in checks:
        if check.tier not in ("batch", "epoch"):
            raise ValueError(f"DataQualityMonitor(checks=[{type(check).__name__}(...)]): a check of your own is "
                             f"judged at tier 'batch' or 'epoch', got {check.tier!r}.")
