"""The base every lightwatch monitor shares: the sampling gate, the writer, alerts and their state."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, Optional, Sequence, Tuple

from lightwatch.core.actions import ActionContext, check_action, run_action
from lightwatch.core.alerts import Alert, AlertCooldown, alert_log, check_severity
from lightwatch.core.runtime import logging_step
from lightwatch.core.tb_layout import write_layout_once
from lightwatch.core.writer import MonitorWriter

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["MonitorCallback", "DEFAULT_EVERY_N_STEPS"]

logger = logging.getLogger("lightwatch")

DEFAULT_EVERY_N_STEPS = 50


def _check_positive(value: Optional[int], name: str, where: str, allow_zero: bool = False) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or value < (0 if allow_zero else 1):
        raise ValueError(f"{where}: {name} must be an integer >= {0 if allow_zero else 1} (or None), got {value!r}.")
    return int(value)


class MonitorCallback:
    """Shared machinery of the lightwatch monitors (not used on its own).

    A plain class: each monitor is bound to a Lightning package's ``Callback`` by
    :func:`lightwatch.core.lightning.bind`, whose hooks the ``super()`` calls here reach.

    The gate is decided once per training step in ``on_train_batch_start``: the step is *sampled* when
    ``(step + 1) % every_n_steps == 0``, which is exactly when Lightning writes ``self.log`` values, so the
    curves line up. Subclasses do their work only when :attr:`sampled` is true; their hooks return at once
    otherwise. With ``check_first_step``, the first step of a fresh fit (step 0, before any optimizer step)
    is sampled too and :attr:`first_step` is true during it: the model as initialised, which is where
    structure faults (initialisation, depth, dead or saturated units) are already visible.

    Args:
        every_n_steps: sampling interval in optimizer steps; ``None`` follows ``Trainer(log_every_n_steps)``.
        histogram_every_n_steps: histogram interval; ``None`` is ten sampling intervals, ``0`` turns
            histograms off. Rounded up to a multiple of ``every_n_steps``.
        prefix: first part of every TensorBoard tag.
        alert_cooldown_steps: at most one alert record per (rule, subject) in this many steps.
        check_first_step: also sample step 0 of a fit that starts from scratch (not a resumed one).

    Example:
        >>> from lightwatch.callbacks import MonitorCallback
        >>> class LossScale(MonitorCallback):  # a monitor of your own: writes on sampled steps only
        ...     def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ...         if self.sampled:
        ...             self.writer.write_scalars(trainer, {self.writer.tag("loss", "_total", "abs"): 1.0},
        ...                                       trainer.global_step)
        >>> LossScale(every_n_steps=10).every_n_steps
        10
    """

    #: Names of the diagnoses a subclass can raise; ``skip_diagnoses`` may name only these.
    DIAGNOSES: Tuple[str, ...] = ()

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        histogram_every_n_steps: Optional[int] = None,
        prefix: str = "monitor",
        alert_cooldown_steps: int = 100,
        check_first_step: bool = False,
    ) -> None:
        where = type(self).__name__
        self.every_n_steps = _check_positive(every_n_steps, "every_n_steps", where)
        self.histogram_every_n_steps = _check_positive(histogram_every_n_steps, "histogram_every_n_steps", where,
                                                       allow_zero=True)
        self.writer = MonitorWriter(prefix)
        self.cooldown = AlertCooldown(_check_positive(alert_cooldown_steps, "alert_cooldown_steps", where,
                                                      allow_zero=True) or 0)
        self.interval = every_n_steps or DEFAULT_EVERY_N_STEPS
        self.histogram_interval = 0
        self.check_first_step = bool(check_first_step)
        self.sampled = False
        self.first_step = False
        self.histogram_step = False
        self.sampled_steps = 0
        self.skip_diagnoses: FrozenSet[str] = frozenset()

    @property
    def prefix(self) -> str:
        return self.writer.prefix

    # ----------------------------------------------------------------------------------------- gate
    def resolve_intervals(self, trainer: Any) -> None:
        """Fix the sampling and histogram intervals once the Trainer is known."""
        interval = self.every_n_steps or int(getattr(trainer, "log_every_n_steps", 0) or 0) or DEFAULT_EVERY_N_STEPS
        self.interval = interval
        hist = self.histogram_every_n_steps
        if hist is None:
            hist = 10 * interval
        self.histogram_interval = 0 if hist == 0 else -(-hist // interval) * interval

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.resolve_intervals(trainer)
        if stage == "fit":  # TensorBoard opens on an overview of the charts; the first monitor writes it
            write_layout_once(trainer, self.prefix)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        step = logging_step(trainer) + 1
        regular = step % self.interval == 0
        # `global_step` as well: a resumed run restores the logging counter and the optimizer steps alike
        self.first_step = (self.check_first_step and step == 1 and int(getattr(trainer, "global_step", 0)) == 0)
        self.sampled = regular or self.first_step
        self.histogram_step = regular and self.histogram_interval > 0 and step % self.histogram_interval == 0
        if self.sampled:
            self.sampled_steps += 1

    def set_skip_diagnoses(self, names: Optional[Sequence[str]]) -> None:
        """Switch off single diagnoses by rule name; an unknown name is an error that lists the known ones."""
        names = [] if names is None else ([names] if isinstance(names, str) else list(names))
        unknown = sorted(set(names) - set(self.DIAGNOSES))
        if unknown:
            raise ValueError(f"{type(self).__name__}(skip_diagnoses=...): unknown diagnosis {unknown}; this monitor's "
                             f"diagnoses are {list(self.DIAGNOSES)}.")
        self.skip_diagnoses = frozenset(names)

    # --------------------------------------------------------------------------------------- alerts
    def raise_finding(self, trainer: Any, pl_module: Any, finding: Any) -> None:
        """Raise what a check found (a :class:`~lightwatch.checks.finding.Finding`, or anything with
        ``as_kwargs()``); nothing when it found nothing (``None``)."""
        if finding is not None:
            self.raise_alert(trainer, pl_module, **finding.as_kwargs())

    def raise_alert(
        self,
        trainer: Any,
        pl_module: Any,
        *,
        rule: str,
        severity: str,
        message: str,
        action: str = "log",
        subject: Optional[str] = None,
        value: Optional[float] = None,
        threshold: Optional[float] = None,
        step: Optional[int] = None,
    ) -> Optional[Alert]:
        """Record an alert (rate-limited per rule and subject) and carry out its action (never rate-limited).

        The caller guarantees the decision is the same on every rank (decided on reduced values or agreed
        with :func:`lightwatch.core.reduce.agree_max`). A diagnosis named in ``skip_diagnoses`` is dropped
        here (``None``): neither recorded nor acted on.
        """
        if rule in self.skip_diagnoses:
            return None
        alert = Alert(
            source=type(self).__name__,
            rule=rule,
            severity=check_severity(severity, f"{type(self).__name__} rule {rule!r}"),
            message=message,
            subject=subject,
            value=None if value is None else float(value),
            threshold=None if threshold is None else float(threshold),
            action=action,
            step=logging_step(trainer) if step is None else int(step),
            epoch=int(getattr(trainer, "current_epoch", 0)),
        )
        allowed, suppressed = self.cooldown.allow(rule, subject, alert.step)
        if allowed and suppressed:
            alert.message += f" ({suppressed} similar alert(s) suppressed by the cooldown.)"
        alert_log(trainer).publish(alert, self.writer, record=allowed)
        run_action(action, ActionContext(trainer, pl_module, alert, self))
        return alert

    @staticmethod
    def check_action(action: str, where: str) -> str:
        return check_action(action, where)

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        return {"version": 1, "cooldown": self.cooldown.state_dict(), "sampled_steps": int(self.sampled_steps)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.cooldown.load_state_dict(state_dict.get("cooldown", {}))
        self.sampled_steps = int(state_dict.get("sampled_steps", 0))

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        # Whatever was written before the failure should reach the event file.
        self.writer.flush(trainer)
