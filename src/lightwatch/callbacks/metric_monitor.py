"""``MetricMonitor``: rules over any metric, turned into alerts and actions (up to skipping a step or rolling back)."""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch

from lightwatch.checks.label_entropy import AT_LABEL_ENTROPY as _AT_LABEL_ENTROPY
from lightwatch.checks.learning import NOT_LEARNING as _NOT_LEARNING
from lightwatch.checks.loss_checks import LossChecks
from lightwatch.checks.metric_rules import NEGATIVE as _NEGATIVE
from lightwatch.checks.metric_rules import missing_metric_findings, negative_loss_finding
from lightwatch.core.lightning import bind, default_package
from lightwatch.core.default_rules import default_rules
from lightwatch.core.loss_ring import LossRing, global_grad_norm, unscaled_loss
from lightwatch.core.metric_values import RuleValues
from lightwatch.core.actions import MonitorWarning
from lightwatch.core.alerts import alert_log
from lightwatch.core.callback import MonitorCallback
from lightwatch.core.recovery import (
    Recovery,
    RollbackRecord,
    SnapshotRing,
    checkpoint_callback,
    install_recovery,
    uninstall_recovery,
)
from lightwatch.core.rules import Firing, MetricStats, Rule, RuleSet, plain
from lightwatch.core.runtime import (distributed_ready, is_sharded_strategy, learning_rates, logging_step,
                                    lr_rising)

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["MetricMonitor", "default_rules"]

_POINTS = ("every_step", "step", "validation", "epoch", "epoch_late")
# loss_not_learning / loss_slow: lightwatch.checks.learning; the per-step loss scores: lightwatch.core.loss_ring;
# the default rules: lightwatch.core.default_rules.


class _MetricMonitor(MonitorCallback):
    """Rules over any value in ``trainer.callback_metrics``, turned into alerts and actions.

    Each rule names a metric (a ``self.log`` key such as ``val/loss``, a lightwatch statistic such as
    ``monitor.grad/_total/norm``, or a built-in value below), a ``kind`` (``threshold``, ``nonfinite``,
    ``plateau``, ``spike``, ``gap``, ``trend``), and what to do when it fires (``action``: ``log``, ``warn``,
    ``stop``, ``raise``, ``checkpoint``, ``skip_step``, ``rollback``, or any registered action). All keys are
    listed in ``docs/rules-and-actions.md`` and :class:`~lightwatch.core.rules.Rule`.

    Built-in values, computed by this callback (``docs/callbacks/metric-monitor.md`` has their definitions):
    ``monitor.step/loss`` (the loss ``training_step`` returned, over an accumulation window, unscaled under
    fp16 AMP), ``monitor.step/grad_norm`` (global L2 norm before clipping, exact under FSDP), and per-step loss
    scores kept in a device ring only when a rule reads one (:mod:`lightwatch.core.loss_ring`):
    ``loss_step_z``, ``loss_shift_z`` (the default ``loss_shift``), ``loss_regress`` (``loss_regressed``).
    Built-in checks, each switched off with ``rules={name: None}``: ``loss_negative``, ``loss_not_learning`` /
    ``loss_slow`` and ``loss_at_label_entropy`` (:mod:`lightwatch.checks.loss_checks`); they read what the
    step checks read.

    Rules are checked (``check_on``) at ``step`` (every ``every_n_steps``, when ``self.log`` curves are
    written), ``validation``, ``epoch`` and ``every_step`` (before each optimizer update); a rule consumes a
    value only when it was logged again since it last read it. Place ``MetricMonitor`` after the monitors
    whose statistics it watches. Steps that are not checked cost nothing; a check makes one device-to-host
    read and, under DDP, at most one MAX and one SUM all-reduce, so every rank takes the same decision.

    Args:
        rules: rule name -> settings. They are added to the default rules (see :func:`default_rules`); a rule
            of the same name replaces a default one, ``None`` removes it.
        every_n_steps: interval of ``step`` checks; ``None`` follows ``Trainer(log_every_n_steps)``.
        builtin_rules: include the built-in rules (:func:`default_rules`).
        max_rollbacks: rollbacks allowed in one run; after that a ``rollback`` stops training.
        lr_factor: multiply the learning rate by this at each rollback (e.g. 0.5).
        snapshots: size of the in-memory snapshot ring used by ``rollback`` when no ``MetricCheckpoint`` is in
            ``trainer.callbacks``. ``None``: 2 when a rule uses ``rollback`` and there is no
            ``MetricCheckpoint``, else 0. Memory: one copy of model plus optimizer state per snapshot.
        snapshot_every_n_steps: how often a healthy snapshot is taken (rounded up to a multiple of
            ``every_n_steps``; default ``every_n_steps``). Snapshots are taken only at checks where no rule fired
            and no alert of severity ``error`` (or a control-flow action) happened since the previous one.
        snapshot_device: where snapshots live (``None``: beside the tensors; ``"cpu"`` spares accelerator memory).
        write_scores: write each rule's score (spike z, plateau wait, trend tau, gap, threshold value) as
            ``monitor.rule/<name>/score`` and, when a rule can skip or roll back, ``monitor.recovery/rollbacks``,
            ``skipped_steps`` and ``lr_scale``, once per check (never on unchecked steps).
        prefix: first part of every TensorBoard tag and of the built-in metric names.
        alert_cooldown_steps: at most one alert record per rule in this many steps; also the default
            ``cooldown`` of ``log``/``warn`` rules.
        name: set it to tell several ``MetricMonitor`` instances apart in checkpoints.

    Example:
        >>> from lightwatch.callbacks import MetricMonitor
        >>> monitor = MetricMonitor(rules={
        ...     "val_plateau": {"metric": "val/loss", "kind": "plateau", "patience": 5, "action": "stop"},
        ...     "loss_spike": {"metric": "monitor.step/loss", "kind": "spike", "action": "skip_step"},
        ... })
        >>> sorted(r.name for r in monitor.rules.rules)
        ['loss_nonfinite', 'loss_regressed', 'loss_shift', 'loss_spike', 'val_plateau']
    """

    def __init__(
        self,
        rules: Optional[Mapping[str, Optional[Mapping[str, Any]]]] = None,
        every_n_steps: Optional[int] = None,
        builtin_rules: bool = True,
        max_rollbacks: int = 3,
        lr_factor: float = 1.0,
        snapshots: Optional[int] = None,
        snapshot_every_n_steps: Optional[int] = None,
        snapshot_device: Optional[str] = None,
        write_scores: bool = True,
        prefix: str = "monitor",
        alert_cooldown_steps: int = 100,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(every_n_steps, 0, prefix, alert_cooldown_steps)
        specs, user = _rule_specs(rules, builtin_rules, prefix)
        # built-in checks, not rules: None switches one off, a rule of that name replaces it
        self.negative_loss_check = bool(builtin_rules) and _NEGATIVE not in user
        self.learning_check = bool(builtin_rules) and _NOT_LEARNING not in user
        self.label_check = bool(builtin_rules) and _AT_LABEL_ENTROPY not in user
        self.rules = RuleSet(specs, where="MetricMonitor", default_cooldown=self.cooldown.steps)
        _check_snapshot_settings(snapshots, snapshot_every_n_steps)
        self.recovery = Recovery(max_rollbacks, lr_factor, 0, snapshot_device)
        self.snapshots = None if snapshots is None else int(snapshots)
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.snapshot_device = snapshot_device
        self.write_scores = bool(write_scores)
        self.name = name
        self.loss_metric = f"{prefix}.step/loss"
        self.grad_norm_metric = f"{prefix}.step/grad_norm"
        self.step_z_metric = f"{prefix}.step/loss_step_z"
        self.shift_z_metric = f"{prefix}.step/loss_shift_z"
        self.regress_metric = f"{prefix}.step/loss_regress"
        # internal, for loss_not_learning: the mean and mean square of every step's loss since the last check
        self.block_mean_metric = f"{prefix}.step/loss_block_mean"
        self.block_square_metric = f"{prefix}.step/loss_block_square"
        self._builtins = (self.loss_metric, self.grad_norm_metric, self.step_z_metric, self.shift_z_metric,
                          self.regress_metric, self.block_mean_metric, self.block_square_metric)
        self._due: Dict[str, List[Rule]] = {p: self.rules.due(p) for p in _POINTS}
        self._names: Dict[int, List[str]] = {}  # metrics of each due list (they live as long as this callback)
        step_metrics = set(RuleSet.metrics_of(self._due["step"]))
        every_metrics = set(RuleSet.metrics_of(self._due["every_step"]))
        self._loss_every_step = self.loss_metric in every_metrics
        self._loss_sampled = (self.loss_metric in step_metrics or self.negative_loss_check or self.learning_check
                              or self.label_check)
        # every step's loss is kept only when a rule reads a per-step score (the default loss_shift does)
        self.step_spike_check = any(m in r.metrics for r in self.rules.rules
                                    for m in (self.step_z_metric, self.shift_z_metric, self.regress_metric))
        self._regress_check = any(self.regress_metric in r.metrics for r in self.rules.rules)
        self._negative_since: Optional[int] = None  # first check that saw a negative loss
        # loss_not_learning / loss_slow and loss_at_label_entropy
        self._loss_checks = LossChecks(self.loss_metric, learning=self.learning_check, labels=self.label_check)
        # every step's loss on the device (the loss scores, and the not-learning blocks while that check is open)
        self._losses = LossRing(interval=1)  # sized at setup, when the interval is known
        self._phase_lrs: Optional[List[float]] = None
        self._grad_every_step = self.grad_norm_metric in every_metrics
        self._grad_sampled = self.grad_norm_metric in step_metrics
        self._recovering = any(r.action in ("skip_step", "rollback") for r in self.rules.rules)
        self._snapshot_interval = 0
        self._sharded = False
        # Per step.
        self._loss_acc: Optional[torch.Tensor] = None
        self._step_loss: Optional[torch.Tensor] = None
        self._step_grad: Optional[torch.Tensor] = None
        self._opt_step: Optional[int] = None
        # Values already read, per rule (not state: tensors of this process only).
        self._reader = RuleValues()
        self._scores: Dict[str, float] = {}
        self._seen: Set[str] = set()
        self._warned: Set[str] = set()
        self._validations = 0
        #: device-to-host reads and collective rounds made by checks (tests and benchmarks read them).
        self.host_reads = 0
        self.collectives = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name) if self.name else type(self).__qualname__

    # ------------------------------------------------------------------------------------ setup
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        uses_rollback = any(r.action == "rollback" for r in self.rules.rules)
        size = self.snapshots
        if size is None:
            size = 2 if uses_rollback and checkpoint_callback(trainer) is None else 0
        self.recovery.ring = SnapshotRing(size, self.snapshot_device)
        self.recovery = install_recovery(trainer, self.recovery)
        self.recovery.on_rollback(self._after_rollback)
        self.recovery.check_supported(trainer)
        every = self.snapshot_every_n_steps or self.interval
        self._snapshot_interval = -(-every // self.interval) * self.interval
        self._sharded = is_sharded_strategy(trainer)
        self._losses.interval = self.interval
        self._validations = 0
        self._opt_step = None

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            uninstall_recovery(trainer, self.recovery)
            self._reader.forget()
            self._loss_acc = self._step_loss = self._step_grad = None
            self._losses.reset()

    # -------------------------------------------------------------------------------- hot path
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        learning = self._loss_checks.open
        if not (learning or self._loss_every_step or self.step_spike_check or (self.sampled and self._loss_sampled)):
            return
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        value = unscaled_loss(loss, scaler)
        self._loss_acc = value if self._loss_acc is None else self._loss_acc + value

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: torch.optim.Optimizer) -> None:
        step = logging_step(trainer)
        if self._opt_step == step:  # a second optimizer in the same step: only follow a skip decision
            self.recovery.apply_pending_skip(trainer, pl_module)
            return
        self._opt_step = step
        self._step_loss, self._loss_acc = self._loss_acc, None
        # the per-step loss ring serves the shift/regress scores and, while it is open, the not-learning check
        if (self.step_spike_check or self._loss_checks.open) and self._step_loss is not None:
            self._losses.remember(self._step_loss)
        if self._grad_every_step or (self.sampled and self._grad_sampled):
            self._step_grad = self._grad_norm(pl_module)
        self.recovery.apply_pending_skip(trainer, pl_module)
        if self._due["every_step"]:
            self._check(trainer, pl_module, "every_step")

    def _grad_norm(self, pl_module: "pl.LightningModule") -> Optional[torch.Tensor]:
        return global_grad_norm(pl_module.parameters(), squared=self._sharded)  # sharded: summed over ranks first

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._loss_checks.labels.collecting:  # the first batches' labels, on the device
            self._loss_checks.labels.observe(batch)
        if self._opt_step != logging_step(trainer):  # inside a gradient-accumulation window: no update yet
            return
        if self.recovery.pending:  # asked for inside the optimizer step; this is the first safe point
            self.recovery.perform(trainer, pl_module)
            return
        if self.sampled:
            self._check(trainer, pl_module, "step")

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or not _fitting(trainer):
            return
        self._validations += 1
        self._check(trainer, pl_module, "validation")

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._check(trainer, pl_module, "epoch")

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if int(getattr(trainer, "current_epoch", 0)) == 0 and not self._seen:
            return
        # Values LightningModule.on_train_epoch_end logged after this callback's epoch-end check.
        self._check(trainer, pl_module, "epoch_late")
        # A whole epoch (with its validation, if any) has been seen: a metric still missing is likely a typo.
        if self._validations or not getattr(trainer, "enable_validation", False):
            self._warn_missing(trainer, pl_module)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._check(trainer, pl_module, "epoch_late")
        if self.recovery.pending:  # the run ends on the restored, healthy weights
            self.recovery.perform(trainer, pl_module)
        self._warn_missing(trainer, pl_module)
        self.writer.flush(trainer)

    # ----------------------------------------------------------------------------------- checks
    def _check(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", point: str) -> None:
        rules = self._due[point]
        step = logging_step(trainer)
        if point == "step" and self._regress_check:
            lrs = learning_rates(trainer)
            if self._phase_lrs is not None and (len(lrs) != len(self._phase_lrs) or lr_rising(self._phase_lrs, lrs)):
                # a warmup, a restart or a new param group (layers unfrozen): the loss may rise with it, by
                # design; a new phase begins
                self._losses.new_phase()
            self._phase_lrs = lrs
        snapshot = (point == "step" and self.recovery.ring.size > 0 and (step + 1) % self._snapshot_interval == 0
                    and not self.recovery.pending)
        negative = point == "step" and self.negative_loss_check
        learning = point == "step" and self._loss_checks.open
        if not rules and not snapshot and not negative and not learning:
            if point != "every_step":
                self._write(trainer, step, counters=point == "step")
            return
        stats, new, flags = self._read(trainer, pl_module, rules, [1.0 if self.recovery.unhealthy else 0.0])
        epoch = int(getattr(trainer, "current_epoch", 0))
        firings = self.rules.evaluate(point, rules, stats, new, step, epoch)
        if negative:
            self._check_negative_loss(trainer, pl_module, stats.get(self.loss_metric), step)
        if learning:
            self._remember_learning(trainer, stats, step)
            self._check_learning(trainer, pl_module)
        self._seen.update(name for name, s in stats.items() if s.present)
        for rule in rules:
            if rule.last_score is not None and rule.last_point == point:
                self._scores[rule.name] = rule.last_score
        for firing in firings:
            self._fire(trainer, pl_module, firing)
        if snapshot:
            healthy = not firings and not flags[0] and not getattr(trainer, "should_stop", False)
            self.recovery.unhealthy = False
            self.recovery.maybe_snapshot(trainer, pl_module, step + 1, healthy)
        if point != "every_step":
            self._write(trainer, step, counters=point == "step")

    def _check_negative_loss(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                             stats: Optional[MetricStats], step: int) -> None:
        if stats is None or not stats.present or stats.nonfinite or not math.isfinite(stats.min) or stats.min >= 0:
            return
        self._negative_since = step if self._negative_since is None else self._negative_since
        finding = negative_loss_finding(self.loss_metric, stats.min, stats.nonfinite, step, self._negative_since)
        self.raise_finding(trainer, pl_module, finding)

    def _remember_learning(self, trainer: Any, stats: Dict[str, MetricStats], step: int) -> None:
        """Keep this check's block of losses (reduced over ranks, as host floats) and the learning rates."""
        mean, square = stats.get(self.block_mean_metric), stats.get(self.block_square_metric)
        count = self._losses.take_block()
        present = mean is not None and square is not None and mean.present and square.present
        self._loss_checks.remember(step, count, mean.mean if present else math.nan,
                                   square.mean if present else math.nan, learning_rates(trainer))

    def _check_learning(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """``loss_not_learning`` / ``loss_slow`` / ``loss_at_label_entropy`` (:mod:`lightwatch.checks.loss_checks`)."""
        step = logging_step(trainer)
        if not getattr(pl_module, "automatic_optimization", True) and len(getattr(trainer, "optimizers", ())) > 1:
            self._loss_checks.stop()
            return
        for name, readings, finding in self._loss_checks.judge(step, alert_log(trainer).history):
            self._report(name, readings, finding, trainer, pl_module, step)

    def _report(self, name: str, readings: Optional[Dict[str, float]], finding: Any, trainer: "pl.Trainer",
                pl_module: "pl.LightningModule", step: int) -> None:
        if readings is not None:  # the readings judged, so their healthy range can be read back from any run
            self.writer.write_scalars(trainer, {self.writer.tag("diag", name, k): v for k, v in readings.items()},
                                      step)
        self.raise_finding(trainer, pl_module, finding)

    def _fire(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", firing: Firing) -> None:
        rule, finding = firing.rule, firing.finding
        self.raise_alert(trainer, pl_module, rule=rule.name, severity=rule.severity, message=firing.message,
                         action=rule.action, subject=rule.metric, value=finding.value, threshold=finding.threshold,
                         step=firing.step)

    def _value(self, name: str, metrics: Mapping[str, Any]) -> Any:
        if name == self.loss_metric:
            return self._step_loss
        if name == self.grad_norm_metric:
            return self._step_grad
        if name == self.step_z_metric:
            return self._losses.scores()["step_z"]  # computed once per check from the steps since the last one
        if name == self.shift_z_metric:
            return self._losses.scores()["shift_z"]
        if name == self.regress_metric:
            return self._losses.scores()["regress"]
        if name == self.block_mean_metric or name == self.block_square_metric:
            block = self._losses.block()
            return None if block is None else block[0 if name == self.block_mean_metric else 1]
        return metrics.get(name)

    def _read(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", rules: Sequence[Rule],
              flags: List[float]) -> Tuple[Dict[str, MetricStats], Dict[str, bool], List[float]]:
        """The metrics of ``rules`` reduced over ranks, whether each rule's value is new, and ``flags`` (MAX).

        One buffer, one device-to-host copy, and under DDP at most one MAX and one SUM all-reduce.
        """
        names = self._names.get(id(rules))
        if names is None:
            names = RuleSet.metrics_of(rules)
            if rules is self._due["step"] and (self.negative_loss_check or self.learning_check or self.label_check):
                # read by the built-in checks (loss_negative, loss_not_learning, loss_at_label_entropy)
                names = names + [n for n in (self.loss_metric,) if n not in names]
                if self.learning_check or self.label_check:
                    names = names + [self.block_mean_metric, self.block_square_metric]
            self._names[id(rules)] = names
        metrics = trainer.callback_metrics if any(n not in self._builtins for n in names) else {}
        reduced, new = self._reader.read(
            names, lambda n: self._value(n, metrics), rules, flags, pl_module.device, distributed_ready(),
            need_sum=any(r.needs_mean() for r in rules) or self.block_mean_metric in names,
            sum_of_squares=self.grad_norm_metric if self._sharded else None)
        self.collectives += reduced.collectives
        self.host_reads += 1 if names or reduced.collectives else 0
        return reduced.stats, new, reduced.flags

    def _write(self, trainer: "pl.Trainer", step: int, counters: bool) -> None:
        if not self.write_scores:
            return
        scalars = {self.writer.tag("rule", name, "score"): value for name, value in self._scores.items()
                   if math.isfinite(value)}
        self._scores.clear()
        if counters and self._recovering:
            scalars[self.writer.tag("recovery", "rollbacks")] = float(self.recovery.rollbacks)
            scalars[self.writer.tag("recovery", "skipped_steps")] = float(self.recovery.skipped_steps)
            scalars[self.writer.tag("recovery", "lr_scale")] = float(self.recovery.lr_scale)
        self.writer.write_scalars(trainer, scalars, step)

    # ------------------------------------------------------------------------------ recovery
    def _after_rollback(self, record: RollbackRecord) -> None:
        # The model went back to its state after `restored_step` steps: what rules learned later is forgotten.
        self.rules.forget_after(record.restored_step)
        self._loss_acc = self._step_loss = self._step_grad = None
        # the history before is not this run's
        self._losses.reset()

    # ------------------------------------------------------------------------------- missing
    def _warn_missing(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        missing: Dict[str, List[str]] = {}
        for rule in self.rules.rules:
            for metric in rule.metrics:
                # built-in metrics are made by this callback at its first step check: never a typo
                if metric not in self._seen and metric not in self._warned and metric not in self._builtins:
                    missing.setdefault(metric, []).append(rule.name)
        existing = sorted(set(map(str, trainer.callback_metrics)) | {m for m in self._builtins if m in self._seen})
        points = {name: self.rules.by_name[name].check_on for names in missing.values() for name in names}
        for finding in missing_metric_findings(missing, points, existing, logging_step(trainer)):
            self._warned.add(finding.subject)
            self.raise_finding(trainer, pl_module, finding)

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update({
            "rules": self.rules.state_dict(),
            "recovery": self.recovery.state_dict(),
            "seen": sorted(self._seen),
            "warned": sorted(self._warned),
            "negative_since": self._negative_since,
            **self._loss_checks.state_dict(),
            "initial_loss": _plain(self._losses.initial_loss),
            "best_level": _plain(self._losses.best_level),
            "phase_lrs": self._phase_lrs,
        })
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)

        def warn(msg: str) -> None:
            warnings.warn(msg, MonitorWarning, stacklevel=3)

        self.rules.load_state_dict(state_dict.get("rules", {}), warn=warn)
        self.recovery.load_state_dict(state_dict.get("recovery", {}))
        self._seen = set(map(str, state_dict.get("seen", [])))
        self._warned = set(map(str, state_dict.get("warned", [])))
        since = state_dict.get("negative_since")
        self._negative_since = None if since is None else int(since)
        self._loss_checks.load_state_dict(state_dict)
        self._losses.initial_loss = state_dict.get("initial_loss")
        self._losses.best_level = state_dict.get("best_level")
        lrs = state_dict.get("phase_lrs")
        self._phase_lrs = None if lrs is None else [float(v) for v in lrs]


def _rule_specs(rules: Optional[Mapping[str, Any]], builtin_rules: bool,
                prefix: str) -> Tuple[Dict[str, Any], Mapping[str, Any]]:
    """The rule specs to build (the defaults, then the user's) and the user's mapping as given."""
    user = plain(rules) if rules is not None else {}
    if not isinstance(user, Mapping):
        raise ValueError(f"MetricMonitor: rules must be a mapping of rule name to settings, e.g. "
                         f"{{'val_plateau': {{'metric': 'val/loss', 'kind': 'plateau'}}}}; "
                         f"got {type(user).__name__}.")
    specs: Dict[str, Any] = dict(default_rules(prefix)) if builtin_rules else {}
    specs.update({str(k): v for k, v in user.items()
                  if not (k in (_NEGATIVE, _NOT_LEARNING, _AT_LABEL_ENTROPY) and v is None)})
    return specs, user


def _check_snapshot_settings(snapshots: Optional[int], every: Optional[int]) -> None:
    if snapshots is not None and (isinstance(snapshots, bool) or int(snapshots) != snapshots or snapshots < 0):
        raise ValueError(f"MetricMonitor: snapshots must be an integer >= 0 or None, got {snapshots!r}.")
    if every is not None and (isinstance(every, bool) or int(every) != every or every < 1):
        raise ValueError(f"MetricMonitor: snapshot_every_n_steps must be an integer >= 1 or None, got {every!r}.")


def _plain(value: Optional[Union[torch.Tensor, float]]) -> Optional[float]:
    """A device scalar as a host float for a checkpoint (read at save time only); NaN as None."""
    if value is None:
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _fitting(trainer: Any) -> bool:
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return fn is None or str(getattr(fn, "value", fn)) == "fit"


#: The class to add to ``Trainer(callbacks=[...])``: the implementation above bound to the installed
#: Lightning package (``pytorch_lightning``, else ``lightning.pytorch``; ``lightwatch.lightning`` binds it to
#: the latter).
MetricMonitor = bind(_MetricMonitor, default_package(), "callback", module=__name__)
