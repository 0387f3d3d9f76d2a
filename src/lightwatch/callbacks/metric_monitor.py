"""``MetricMonitor``: rules over any metric, turned into alerts and actions (up to skipping a step or rolling back)."""
from __future__ import annotations

import difflib
import math
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch

from lightwatch.core.lightning import bind, default_package
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
from lightwatch.core.reduce import all_reduce_flat
from lightwatch.core.rules import Firing, MetricStats, Rule, RuleSet, plain
from lightwatch.core.runtime import (distributed_ready, is_sharded_strategy, learning_rates, local_tensor, logging_step,
                                    lr_rising)

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["MetricMonitor", "default_rules"]

_POINTS = ("every_step", "step", "validation", "epoch", "epoch_late")
_NEGATIVE = "loss_negative"
_NOT_LEARNING = "loss_not_learning"
_SLOW = "loss_slow"
# loss_not_learning is judged on the run's own noise, over windows that grow with the run. Every step's loss
# (while the check is open) is in the device ring the loss scores use; the mean and mean square of the steps
# since the previous check (a block) travel with that check's read. At the first check at or after step 50 outside a warmup (then at steps 100,
# 200, 400, ...: each evaluation doubles the step of the one before), with t the current step:
#   - the level L of the steps in the last quarter, (3t/4, t], against the level of the first steps (the
#     blocks up to step 10): at or below 85% of it the run learns, and the check is closed for good;
#   - else the decline from the second quarter (t/4, t/2] to the last one, in standard errors of the
#     batch-to-batch noise (pooled within-block variance): at or above 3 the loss is still falling (a slow
#     learner): judged again at the next evaluation;
#   - else the loss is flat on its own noise. Flat at two evaluations in a row (a plateau lasting as long as
#     the whole run before it) is `loss_not_learning` (warning).
# Measured (per-step curves, 5 seeds each, 400 steps): healthy recurrent classifiers with clipping sit on an
# initial plateau at 97-99% of the first level up to step ~60 (decline z 1.9-11 at step 50) and are at 68-80%
# by step 100; a slow teacher-student MLP is at 83-88% at step 50 with z >= 4.7; shuffled labels read
# 98-100% at step 50 and memorise slowly (z 2-9): no model-free loss statistic tells an early plateau from
# labels that do not belong to their inputs before step ~100. So a flat loss at the first evaluation is named
# at once only when an earlier finding explains it (_LEARNING_CAUSES: frozen layers, missing gradients, tiny
# updates, probabilities fed to the loss, labels no nearer their neighbours' labels than chance): two
# independent signals agree. Without one, a level above 85% at the first evaluation is `loss_slow` (info).
_LEARNING_FIRST_STEP = 50
_LEARNING_RATIO = 0.85
_LEARNING_EARLY_STEPS = 10  # the first steps' level: the blocks up to this step
_LEARNING_DECLINE_Z = 3.0
_LEARNING_MAX_BLOCKS = 512  # older blocks are merged pairwise beyond this: memory stays bounded on long runs
# earlier findings that explain a loss that does not go down, most specific first: the alert is named after one
_LEARNING_CAUSES = ("frozen_at_init", "frozen_parameters", "grad_missing", "update_ratio_low", "output_probabilities",
                    "data_labels_unrelated")
# Per-step spike score: robust z of each step's loss against the median/MAD of the previous 50 steps. On the
# fault suite's healthy runs the largest z over a run was 1.3 to 8.1 (MAD floored at 1% of the median); a
# learning rate x30 for two steps gave 28 to 77 (15 sits between). A check-level z never saw that spike.
_STEP_SPIKE_WINDOW = 50
# ... and the step's excess over the median must be this many times the largest excess in the window: a spike
# is a step far outside the recent range, not one more hard batch like those the window already holds.
_STEP_SPIKE_NOVELTY = 2.0
_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
# Level-shift score: the median loss of the steps since the last check (at least 10) against the median and MAD
# (plus 1% of the median) of the 50 steps before them. A single hard batch does not move a median of ten; a
# spike that damages the model does, for tens of steps. On the fault suite: 100 healthy runs at most 1.86 over
# a whole run, a learning rate x30 for two steps 9.6 to 22 at the first check after it; 4 sits between.
# Scores count only while the recent level is at least _LOSS_FLOOR of the first step's loss: healthy runs of
# 1,000 steps fit the training set to a loss of ~0.01, where Adam's late blips (0.009 to 0.11, 5% of the first
# loss) score z up to 31 without costing anything; a real setback lifts the loss back to a sizeable share of it.
_SHIFT_RECENT_MIN = 10
_RECENT_MAX = 4096  # with longer intervals the scores look at the last 4,096 steps before a check
_SHIFT_Z = 4.0
# Regression score: the median loss of the last 50 steps against the lowest such median since the learning rate
# last rose, counted only while the level is at least 10% of the first step's loss (a rise from 0.01 to 0.02 is
# noise at the floor of a fitted loss, not a setback). On the fault suite's 100 healthy runs no two consecutive
# checks both read above 0.94; a learning rate 3x too high (26 points of test accuracy lost) read >= 1.5 at two
# checks in a row in 4 of 5 seeds, after 150-200 steps, where the loss oscillates back up.
_REGRESS_WINDOW = 50
_LOSS_FLOOR = 0.1  # of the first step's loss: below it, changes are noise at the floor of a fitted loss
_REGRESS_RATIO = 1.5
_REGRESS_ADVICE = ("A learning rate too high for this stage of training is the usual cause (the loss oscillates "
                   "back up): lower it or decay it sooner. If the loss is meant to rise (a loss weight annealed up, "
                   "a curriculum that gets harder), drop this rule: rules={'loss_regressed': None}.")


def default_rules(prefix: str = "monitor") -> Dict[str, Dict[str, Any]]:
    """The rules ``MetricMonitor()`` runs with no arguments; both watch the built-in training loss.

    - ``loss_nonfinite``: the loss is NaN or infinite -> ``error``, ``stop`` (the weights are lost from there
      on; as Lightning's ``EarlyStopping(check_finite=True)``);
    - ``loss_spike``: the loss stays at a robust z-score >= 8 against the last 50 checks for two checks in a
      row -> ``warning``, ``warn``. (A single check at z >= 8 happened about once in 14,000 checks of healthy
      small-batch runs, where a few misclassified samples make the batch loss heavy-tailed; two in a row did
      not happen.)
    - ``loss_shift``: the median per-step loss since the last check is 4 robust standard deviations above the
      median of the 50 steps before -> ``warning``, ``warn``: a spike that set training back, even when it
      fell between two checks. It keeps every step's loss in a small ring on the device (one scalar copy a
      step, no host read).
    - ``loss_regressed``: the median loss of the last 50 steps is at least 1.5x the lowest such median since
      the learning rate last rose, at two checks in a row, while at least 10% of the first step's loss ->
      ``warning``, ``warn``: the loss went back up and stayed there (a learning rate too high for this stage
      of training, an instability), which no single spike shows.

    They are checked every ``every_n_steps`` steps. ``MetricMonitor`` also runs the built-in checks
    ``loss_negative`` and ``loss_not_learning`` (see :class:`MetricMonitor`); they are not rules of this list.
    """
    loss = f"{prefix}.step/loss"
    return {
        "loss_nonfinite": {
            "metric": loss, "kind": "nonfinite", "severity": "error", "action": "stop", "check_on": ["step"],
            "message": "Training was stopped. To recover by itself instead, use action 'rollback' (with a "
                       "MetricCheckpoint, or MetricMonitor's in-memory snapshots)."},
        "loss_spike": {"metric": loss, "kind": "spike", "severity": "warning", "action": "warn", "check_on": ["step"],
                       "consecutive": 2},
        "loss_shift": {"metric": f"{prefix}.step/loss_shift_z", "kind": "threshold", "above": _SHIFT_Z,
                       "severity": "warning", "action": "warn", "check_on": ["step"]},
        "loss_regressed": {"metric": f"{prefix}.step/loss_regress", "kind": "threshold", "above": _REGRESS_RATIO,
                           "severity": "warning", "action": "warn", "check_on": ["step"], "consecutive": 2,
                           "message": _REGRESS_ADVICE},
    }


class _MetricMonitor(MonitorCallback):
    """Rules over any value in ``trainer.callback_metrics``, turned into alerts and actions.

    Each rule names a metric (a ``self.log`` key such as ``val/loss``, a lightwatch statistic such as
    ``monitor.grad/_total/norm``, or a built-in value below), a ``kind`` (``threshold``, ``nonfinite``,
    ``plateau``, ``spike``, ``gap``, ``trend``), and what to do when it fires (``action``: ``log``, ``warn``,
    ``stop``, ``raise``, ``checkpoint``, ``skip_step``, ``rollback``, or any registered action). All keys are
    listed in the README section on ``MetricMonitor`` and :class:`~lightwatch.core.rules.Rule`.

    Built-in values, computed by this callback itself (no other callback or ``self.log`` needed):

    - ``monitor.step/loss``: the loss ``training_step`` returned (summed over the micro-batches of a
      gradient-accumulation window, as Lightning divides each by ``accumulate_grad_batches``: their mean;
      divided back by the ``GradScaler`` scale under fp16 AMP);
    - ``monitor.step/grad_norm``: global L2 norm of all gradients after unscaling and the DDP all-reduce,
      before clipping (exact under FSDP through one SUM all-reduce).

    Built-in check ``loss_negative`` (on by default, with the built-in rules): at every ``step`` check, a finite
    training loss below 0 (on any rank) raises a ``warning``: a loss that should be non-negative
    (cross-entropy, NLL of log-probabilities) is negative, most often ``F.nll_loss`` applied to raw logits
    instead of ``log_softmax``. Healthy runs with such losses never go below 0. It reads the value the step
    checks already read (no extra host read or collective). For losses that can legitimately be negative
    (continuous log-likelihoods, some contrastive or adversarial objectives) switch it off with
    ``rules={"loss_negative": None}``; a rule of your own named ``loss_negative`` replaces it.

    Built-in value for short spikes, ``monitor.step/loss_step_z``: the largest robust z-score of the per-step
    losses since the previous check, against the median and MAD (floored at 1% of the median) of the 50 steps
    before them, counting only steps whose excess over that median is more than twice the largest excess among
    those 50 steps (other steps score 0). Only when a rule watches it, every step's loss is kept on the device
    in a small ring (no host read between checks), so a one- or two-step spike that falls between checks is
    seen, which a rule on
    ``monitor.step/loss`` (one value per check) cannot do. It is not in the default rules: single hard batches
    of healthy runs score as high as real spikes (27.5 on one of the fault suite's 100 healthy runs, 28.5 on
    the mildest planted spike). To use it: ``rules={"loss_step_spike": {"metric": "monitor.step/loss_step_z",
    "kind": "threshold", "above": 15, "check_on": ["step"]}}``.

    Built-in value for lasting jumps, ``monitor.step/loss_shift_z``, read by the default rule ``loss_shift``: the
    median loss of the steps since the previous check (at least 10) against the median and MAD (plus 1% of the
    median) of the 50 steps before them, from the same device ring.

    Built-in value for setbacks, ``monitor.step/loss_regress``, read by the default rule ``loss_regressed``: the
    median loss of the last 50 steps over the lowest such median since the learning rate last rose (a restart,
    a warmup or a new param group starts a new phase), from the same ring; 0 while that median is below 10% of
    the first step's loss, or before 50 steps.

    Built-in check ``loss_not_learning`` (on by default, with the built-in rules), judged on the run's own noise
    over windows that grow with the run: at the first step check at or after step 50 at which the learning rate
    is no longer rising (a warmup defers it), then at steps 100, 200, 400, ... (each evaluation at twice the
    step of the one before). The run learns once the mean loss of the last quarter of its steps is at most 85%
    of the first ten steps' (the check then closes). Otherwise, a loss that still falls from the second
    quarter to the last by at least 3 standard errors of its batch-to-batch noise is a slow learner
    (``loss_slow``, ``info``, once) and is judged again later; a loss flat on its noise at two evaluations in a row (a plateau
    as long as the run before it) is ``loss_not_learning`` (``warning``). At the first evaluation a loss above
    85% is named at once after an earlier finding that explains it (``frozen_at_init``, ``frozen_parameters``,
    ``grad_missing``, ``update_ratio_low``, ``output_probabilities``, ``data_labels_unrelated``), since two
    independent signals then agree. While the check is open every step's loss goes into the device ring the
    loss scores use (kept for it if no rule reads a score); a check reads the block of steps since the last one
    with its own read (no host read of its own). Not checked under manual optimisation with several optimizers
    (GANs, actor-critic): their losses are adversaries or separate objectives. Switch it off with
    ``rules={"loss_not_learning": None}``.

    When rules are checked (``check_on``): ``step`` every ``every_n_steps`` optimizer steps (on
    ``on_train_batch_end``, at the step ``self.log`` curves use), ``validation`` at validation end, ``epoch`` at
    training-epoch end, and ``every_step`` before every optimizer update. Each value is read once: a rule
    consumes its metric only when it was logged again since the rule last read it, so ``val/loss`` counts once
    per validation even with all check points on. Values that ``LightningModule.on_train_epoch_end`` logs are
    read at the start of the next epoch (or at the end of training): Lightning calls that hook after ordinary
    callbacks. Place ``MetricMonitor`` after the monitors whose statistics it watches, so it sees them in the
    same step.

    Cost: on steps that are not checked the hooks return at once: no tensor work, no host sync, no
    collective. A check packs every value it needs into one buffer and reads it with one device-to-host copy;
    under DDP it makes at most one MAX and one SUM all-reduce, so every rank sees the same reduced values
    (the worst rank for thresholds and spikes, the mean for plateau, trend and gap) and takes the same
    decision. ``every_step`` rules, which ``skip_step`` needs, cost that check on every step: one host sync per
    step (plus one all-reduce under DDP).

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
        ['loss_nonfinite', 'loss_spike', 'val_plateau']
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
        where = "MetricMonitor"
        user = plain(rules) if rules is not None else {}
        if not isinstance(user, Mapping):
            raise ValueError(f"{where}: rules must be a mapping of rule name to settings, e.g. "
                             f"{{'val_plateau': {{'metric': 'val/loss', 'kind': 'plateau'}}}}; "
                             f"got {type(user).__name__}.")
        specs: Dict[str, Any] = dict(default_rules(prefix)) if builtin_rules else {}
        # `loss_negative` is a built-in check, not a rule: None switches it off, a rule of that name replaces it
        self.negative_loss_check = bool(builtin_rules) and _NEGATIVE not in user
        self.learning_check = bool(builtin_rules) and _NOT_LEARNING not in user
        specs.update({str(k): v for k, v in user.items() if not (k in (_NEGATIVE, _NOT_LEARNING) and v is None)})
        self.rules = RuleSet(specs, where=where, default_cooldown=self.cooldown.steps)
        if snapshots is not None and (isinstance(snapshots, bool) or int(snapshots) != snapshots or snapshots < 0):
            raise ValueError(f"{where}: snapshots must be an integer >= 0 or None, got {snapshots!r}.")
        if snapshot_every_n_steps is not None and (isinstance(snapshot_every_n_steps, bool) or
                                                   int(snapshot_every_n_steps) != snapshot_every_n_steps or
                                                   snapshot_every_n_steps < 1):
            raise ValueError(f"{where}: snapshot_every_n_steps must be an integer >= 1 or None, "
                             f"got {snapshot_every_n_steps!r}.")
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
        self._loss_sampled = self.loss_metric in step_metrics or self.negative_loss_check or self.learning_check
        # every step's loss is kept only when a rule reads a per-step score (the default loss_shift does)
        self.step_spike_check = any(m in r.metrics for r in self.rules.rules
                                    for m in (self.step_z_metric, self.shift_z_metric, self.regress_metric))
        self._regress_check = any(self.regress_metric in r.metrics for r in self.rules.rules)
        self._negative_since: Optional[int] = None  # first check that saw a negative loss
        # loss_not_learning: `_ring_count` when the last block was read (the steps since then, in the loss ring,
        # are the next block), the block of this check (mean and mean square, on the device), the blocks read so
        # far as (first step, last step, count, mean, mean square), the step of the next evaluation, how many
        # evaluations in a row found the loss flat, and whether it is decided
        self._block_taken = 0
        self._block_at: Optional[Tuple[int, torch.Tensor]] = None
        self._blocks: List[Tuple[int, int, int, float, float]] = []
        self._next_evaluation = _LEARNING_FIRST_STEP
        self._flat_evaluations = 0
        self._slow_reported = False
        self._recent_lrs: List[List[float]] = []  # learning rates of every param group at the last checks
        self._learning_checked = False
        # loss_step_z, loss_shift_z: every step's loss on the device, oldest overwritten; `_ring_count` steps
        # written; both scores are computed once per check (`_ring_scores`)
        self._loss_ring: Optional[torch.Tensor] = None
        self._ring_count = 0
        self._ring_checked = 0  # `_ring_count` at the previous check
        self._scores_at: Optional[Tuple[int, Dict[str, Optional[torch.Tensor]]]] = None
        # loss_regress: the first step's loss and the lowest 50-step median of this learning-rate phase (device
        # scalars, or host floats just after a resume), and the rates of the last check (a rise starts a phase)
        self._initial_loss: Optional[Union[torch.Tensor, float]] = None
        self._best_level: Optional[Union[torch.Tensor, float]] = None
        self._phase_lrs: Optional[List[float]] = None
        self._phase_start = 0  # `_ring_count` when this phase began: its windows start after it
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
        self._last_obj: Dict[str, Any] = {}
        self._scores: Dict[str, float] = {}
        self._zero: Optional[torch.Tensor] = None
        self._seen: Set[str] = set()
        self._warned: Set[str] = set()
        self._nonscalar_warned: Set[str] = set()
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
        self._validations = 0
        self._opt_step = None

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            uninstall_recovery(trainer, self.recovery)
            self._last_obj.clear()
            self._loss_acc = self._step_loss = self._step_grad = None
            self._loss_ring, self._ring_count, self._ring_checked, self._scores_at = None, 0, 0, None
            self._block_taken, self._block_at = 0, None
            self._phase_start = 0

    # -------------------------------------------------------------------------------- hot path
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        learning = self.learning_check and not self._learning_checked
        if not (learning or self._loss_every_step or self.step_spike_check or (self.sampled and self._loss_sampled)):
            return
        value = loss.detach()
        if value.numel() != 1:
            value = value.sum()
        if value.dtype != torch.float32:
            value = value.float()
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
        if isinstance(scale, torch.Tensor):  # Lightning hands the hook the scaled loss under fp16 AMP
            value = value / scale.to(value.device)
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
        if (self.step_spike_check or (self.learning_check and not self._learning_checked)) \
                and self._step_loss is not None:
            self._remember_loss(self._step_loss)
        if self._grad_every_step or (self.sampled and self._grad_sampled):
            self._step_grad = self._grad_norm(pl_module)
        self.recovery.apply_pending_skip(trainer, pl_module)
        if self._due["every_step"]:
            self._check(trainer, pl_module, "every_step")

    def _loss_block(self) -> Optional[torch.Tensor]:
        """Mean and mean square of the losses since the last block, from the ring (once per check, on the device).

        The ring holds at least one check interval of steps (capped at 4,096): a longer interval's block is
        its last 4,096 steps.
        """
        ring, count = self._loss_ring, self._ring_count
        new = min(count - self._block_taken, ring.numel()) if ring is not None else 0
        if new <= 0:
            return None
        if self._block_at is None or self._block_at[0] != count:
            values = self._chronological(ring, count, new)
            self._block_at = (count, torch.stack([values.mean(), values.square().mean()]))
        return self._block_at[1]

    def _remember_loss(self, loss: torch.Tensor) -> None:
        """Write this step's loss into the device ring: one small device copy, no host read."""
        if self._loss_ring is None or self._loss_ring.device != loss.device:
            # the steps since the last check, at most _RECENT_MAX of them: memory stays bounded for any interval
            recent = min(max(self.interval, _SHIFT_RECENT_MIN), _RECENT_MAX)
            self._loss_ring = torch.zeros(_STEP_SPIKE_WINDOW + recent, device=loss.device)
            self._ring_count = self._ring_checked = self._phase_start = self._block_taken = 0
            self._block_at = None
            self._scores_at = None
        self._loss_ring[self._ring_count % self._loss_ring.numel()] = loss.reshape(())
        if self._initial_loss is None:  # kept across rollbacks: the scale of the run, not of its restart
            self._initial_loss = loss.detach().reshape(()).clone()
        self._ring_count += 1

    def _ring_scores(self) -> Dict[str, Optional[torch.Tensor]]:
        """``loss_step_z`` and ``loss_shift_z`` of this check, computed once on the device (no host read).

        Both are ``None`` until a full window of earlier steps exists. Non-finite losses are left to
        ``loss_nonfinite``: they count as missing, never as a spike.
        """
        count = self._ring_count
        if self._scores_at is not None and self._scores_at[0] == count:
            return self._scores_at[1]
        new = count - self._ring_checked
        self._ring_checked = count
        scores: Dict[str, Optional[torch.Tensor]] = {"step_z": None, "shift_z": None, "regress": None}
        ring = self._loss_ring
        if ring is not None and new > 0:
            scores["step_z"] = self._step_spike_score(ring, count, new)
            scores["shift_z"] = self._shift_score(ring, count, new)
            scores["regress"] = self._regress_score(ring, count)
        self._scores_at = (count, scores)
        return scores

    @staticmethod
    def _chronological(ring: torch.Tensor, count: int, n: int) -> torch.Tensor:
        """The last ``n`` losses written, oldest first."""
        return ring[torch.arange(count - n, count, device=ring.device) % ring.numel()]

    @staticmethod
    def _robust_center(base: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Median and MAD of the finite values of ``base`` (NaN when there are none); no boolean indexing."""
        finite = torch.where(torch.isfinite(base), base, torch.full_like(base, float("nan")))
        median = finite.nanmedian()
        return median, (finite - median).abs().nanmedian()

    def _step_spike_score(self, ring: torch.Tensor, count: int, new: int) -> Optional[torch.Tensor]:
        """Largest robust z of the steps since the last check against the 50 steps before them."""
        new = min(new, ring.numel() - _STEP_SPIKE_WINDOW)
        if count - new < _STEP_SPIKE_WINDOW:
            return None
        values = self._chronological(ring, count, new + _STEP_SPIKE_WINDOW)
        base, recent = values[:_STEP_SPIKE_WINDOW], values[_STEP_SPIKE_WINDOW:]
        median, mad = self._robust_center(base)
        scale = torch.maximum(_MAD_TO_SIGMA * mad, 0.01 * median.abs()).clamp_min(1e-12)
        z = (recent - median) / scale
        top = torch.where(torch.isfinite(base), base, torch.full_like(base, -float("inf"))).max()
        novel = (recent - median) > _STEP_SPIKE_NOVELTY * (top - median)
        # NaN/Inf is loss_nonfinite's business; a step within the window's own range is no spike: both score 0
        z = torch.where(torch.isfinite(z) & novel, z, torch.zeros_like(z))
        return z.max()

    def _shift_score(self, ring: torch.Tensor, count: int, new: int) -> Optional[torch.Tensor]:
        """Robust z of the median loss of the recent steps against the 50 steps before them."""
        recent_n = min(max(new, _SHIFT_RECENT_MIN), ring.numel() - _STEP_SPIKE_WINDOW)
        if count - recent_n < _STEP_SPIKE_WINDOW:
            return None
        values = self._chronological(ring, count, recent_n + _STEP_SPIKE_WINDOW)
        base, recent = values[:_STEP_SPIKE_WINDOW], values[_STEP_SPIKE_WINDOW:]
        median, mad = self._robust_center(base)
        level, _ = self._robust_center(recent)
        z = (level - median) / (_MAD_TO_SIGMA * mad + 0.01 * median.abs() + 1e-12)
        if self._initial_loss is not None:  # a jump that stays under 10% of the first loss is not a setback
            initial = torch.as_tensor(self._initial_loss, dtype=level.dtype, device=level.device)
            z = torch.where(level >= _LOSS_FLOOR * initial.abs(), z, torch.zeros_like(z))
        return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)

    def _regress_score(self, ring: torch.Tensor, count: int) -> Optional[torch.Tensor]:
        """Median loss of the last 50 steps over the lowest such median of this phase; updates that lowest one."""
        if count < _REGRESS_WINDOW or ring.numel() < _REGRESS_WINDOW or self._initial_loss is None:
            return None
        if count - self._phase_start < _REGRESS_WINDOW:  # the window still holds steps of the previous phase
            return torch.zeros((), device=ring.device)
        level, _ = self._robust_center(self._chronological(ring, count, _REGRESS_WINDOW))
        initial = torch.as_tensor(self._initial_loss, dtype=level.dtype, device=level.device)
        best = self._best_level
        if best is None:
            score = torch.zeros_like(level)
            self._best_level = level
        else:
            best = torch.as_tensor(best, dtype=level.dtype, device=level.device)
            ratio = level / best
            meaningful = (level >= _LOSS_FLOOR * initial.abs()) & (best > 0) & torch.isfinite(ratio)
            score = torch.where(meaningful, ratio, torch.zeros_like(ratio))
            self._best_level = torch.fmin(best, level)  # fmin: a NaN median never becomes the best
        return score

    def _grad_norm(self, pl_module: "pl.LightningModule") -> Optional[torch.Tensor]:
        grads = [local_tensor(p.grad.detach()) for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return None
        squared = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
        return squared if self._sharded else squared.sqrt()  # sharded: squares are summed over ranks first

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
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
                self._best_level, self._phase_start = None, self._ring_count
            self._phase_lrs = lrs
        snapshot = (point == "step" and self.recovery.ring.size > 0 and (step + 1) % self._snapshot_interval == 0
                    and not self.recovery.pending)
        negative = point == "step" and self.negative_loss_check
        learning = point == "step" and self.learning_check and not self._learning_checked
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
        """``loss_negative``: a finite training loss below 0 on any rank (the reduced minimum: same on all ranks)."""
        if stats is None or not stats.present or stats.nonfinite or not math.isfinite(stats.min) or stats.min >= 0:
            return  # NaN/Inf belongs to loss_nonfinite
        if self._negative_since is None:
            self._negative_since = step
        self.raise_alert(
            trainer, pl_module, rule=_NEGATIVE, severity="warning", action="warn", subject=self.loss_metric,
            value=stats.min, threshold=0.0, step=step, message=(
                f"the training loss {self.loss_metric} = {stats.min:.4g} at step {step} is negative (first seen "
                f"negative at step {self._negative_since}): a loss that should be non-negative (cross-entropy, NLL "
                f"of log-probabilities) is negative: likely NLL/cross-entropy applied to raw logits instead of "
                f"log_softmax. Use F.cross_entropy on the logits, or F.nll_loss on log_softmax outputs. If this loss "
                f"can legitimately be negative, drop the check with rules={{'{_NEGATIVE}': None}}."))

    def _remember_learning(self, trainer: Any, stats: Dict[str, MetricStats], step: int) -> None:
        """Keep this check's block of losses (reduced over ranks, as host floats) and the learning rates."""
        mean, square = stats.get(self.block_mean_metric), stats.get(self.block_square_metric)
        ring = self._loss_ring
        count = min(self._ring_count - self._block_taken, ring.numel()) if ring is not None else 0
        first = step - count + 1  # one ring entry per optimizer step, the last one this check's
        self._block_taken, self._block_at = self._ring_count, None
        self._recent_lrs = (self._recent_lrs + [learning_rates(trainer)])[-3:]
        if (count <= 0 or mean is None or square is None or not mean.present or not square.present
                or not math.isfinite(mean.mean) or not math.isfinite(square.mean)):
            return  # no step since the last check, or a non-finite loss (loss_nonfinite's business)
        self._blocks.append((first, step, count, mean.mean, square.mean))
        if len(self._blocks) > _LEARNING_MAX_BLOCKS:  # merge the oldest pairs, keeping the first steps' blocks
            keep = [b for b in self._blocks if b[1] <= _LEARNING_EARLY_STEPS]
            rest = self._blocks[len(keep):]
            merged = [_merge_blocks(rest[i], rest[i + 1]) if i + 1 < len(rest) else rest[i]
                      for i in range(0, len(rest), 2)]
            self._blocks = keep + merged

    def _warming_up(self) -> bool:
        """Whether the learning rate rose over the last checks: a warmup, during which a flat loss is expected."""
        return len(self._recent_lrs) >= 2 and lr_rising(self._recent_lrs[0], self._recent_lrs[-1])

    def _learning_evidence(self, step: int) -> Optional[Tuple[float, float, float, float]]:
        """``(early level, recent level, recent / early, decline z)`` from the blocks, or None without enough steps.

        The early level is the mean loss of the blocks up to step 10; the recent level that of the blocks in the
        last quarter of the steps so far, (3t/4, t]; the decline is the second quarter's level, (t/4, t/2], minus
        the last quarter's, in standard errors of the batch-to-batch noise (the pooled variance within blocks):
        half a run apart, so a steady decline shows twice as many standard errors as between adjacent quarters.
        """
        early = [b for b in self._blocks if b[1] <= _LEARNING_EARLY_STEPS] or self._blocks[:1]
        second = [b for b in self._blocks if step / 4 < b[1] <= step / 2 and b not in early]
        last = [b for b in self._blocks if b[1] > 3 * step / 4 and b not in early]
        if not early or not second or not last:
            return None

        def level(blocks: Sequence[Tuple[int, int, int, float, float]]) -> Tuple[float, int]:
            n = sum(b[2] for b in blocks)
            return sum(b[2] * b[3] for b in blocks) / n, n

        (first, _), (middle, n_mid), (recent, n_last) = level(early), level(second), level(last)
        pooled = [(b[2], max(b[4] - b[3] * b[3], 0.0)) for b in second + last if b[2] > 1]
        dof = sum(n - 1 for n, _ in pooled)
        variance = sum(n * v for n, v in pooled) / dof if dof > 0 else 0.0
        se = math.sqrt(variance * (1.0 / n_mid + 1.0 / n_last))
        # a noiseless loss (one fixed batch, say): any decline at all beyond rounding counts
        floor = 1e-6 * max(abs(middle), abs(recent), 1e-12)
        z = (middle - recent) / max(se, floor)
        ratio = recent / first if first > 0 else math.nan
        return first, recent, ratio, z

    def _check_learning(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """``loss_not_learning``: is the loss going down, judged on its own noise over windows that grow with the run.

        Evaluated at the first step check at or after step 50 outside a warmup, then at each check at or after
        twice the step of the previous evaluation. The run learns when the level of the last quarter of its
        steps is at most 85% of the first steps' level (the check closes for good). Otherwise the loss either
        still declines significantly from the second to the last quarter (a slow learner: judged again
        later), or it is flat on its batch-to-batch noise: flat at two evaluations in a row is
        ``loss_not_learning`` (``warning``). At the first evaluation, a level above 85% is named at once after an
        earlier finding that explains it (frozen parameters, missing gradients, tiny updates, probabilities fed
        to the loss, labels unrelated to the inputs) when there is one; otherwise it is ``loss_slow``
        (``info``). The blocks are reduced over ranks, so every rank decides alike.
        """
        step = logging_step(trainer)
        if not getattr(pl_module, "automatic_optimization", True) and len(getattr(trainer, "optimizers", ())) > 1:
            # several optimizers stepped by hand (a GAN, an actor-critic): the summed losses are adversaries or
            # separate objectives, not one quantity that training must drive down
            self._learning_checked = True
            return
        if step < self._next_evaluation or self._warming_up():
            return  # too early, or the learning rate is still warming up: judged at a later check
        evidence = self._learning_evidence(step)
        if evidence is None:
            return
        first, recent, ratio, z = evidence
        # the readings judged, so their healthy range can be read back from any run (a few writes per run)
        self.writer.write_scalars(trainer, {self.writer.tag("diag", "loss_learning", "ratio"): ratio,
                                            self.writer.tag("diag", "loss_learning", "decline_z"): z}, step)
        first_evaluation = self._next_evaluation == _LEARNING_FIRST_STEP
        self._next_evaluation = 2 * step
        if not math.isfinite(ratio) or ratio <= _LEARNING_RATIO:
            self._learning_checked = True  # it learns (or the loss is not a positive quantity): closed for good
            return
        quarter = f"steps {3 * step // 4 + 1}-{step}"
        head = (f"the training loss has not gone down: {recent:.4g} over {quarter} against {first:.4g} over the "
                f"first steps ({ratio:.0%} of it)")
        if first_evaluation:
            cause = self._earlier_cause(trainer)
            if cause is not None:
                self._learning_checked = True
                self._raise_cause(trainer, pl_module, cause, head, ratio)
                return
        if z >= _LEARNING_DECLINE_Z:
            self._flat_evaluations = 0
            if not self._slow_reported:
                self._slow_reported = True
                self.raise_alert(
                    trainer, pl_module, rule=_SLOW, severity="info", action="log", subject=self.loss_metric,
                    value=ratio, threshold=_LEARNING_RATIO, message=(
                        f"the training loss falls slowly: {recent:.4g} over {quarter}, {ratio:.0%} of the first "
                        f"steps' {first:.4g}, still declining ({z:.1f} standard errors of its batch noise from the "
                        f"second to the last quarter of the run). Judged again at step {self._next_evaluation}."))
            return
        self._flat_evaluations += 1
        if self._flat_evaluations < 2:
            return  # flat once: a plateau must last as long as the run before it to count
        self._learning_checked = True
        cause = self._earlier_cause(trainer)
        if cause is not None:
            self._raise_cause(trainer, pl_module, cause, f"{head}, flat on its own noise since step {step // 2}",
                              ratio)
            return
        self.raise_alert(
            trainer, pl_module, rule=_NOT_LEARNING, severity="warning", action="warn", subject=self.loss_metric,
            value=ratio, threshold=_LEARNING_RATIO, message=(
                f"{head}, and it has been flat on its own batch-to-batch noise since step {step // 2} (decline "
                f"{z:.1f} standard errors; below {_LEARNING_DECLINE_Z:g} is flat). Gradients, update sizes and data "
                f"checks raised nothing that explains it, so the labels may not be learnable from the inputs "
                f"(shuffled, misaligned with their inputs, or very noisy), or the model or learning rate is far too "
                f"small for the task. Check that inputs and labels are paired correctly; if the loss is expected "
                f"to stay flat (fine-tuning a converged model), drop the check with "
                f"rules={{'{_NOT_LEARNING}': None}}."))

    def _raise_cause(self, trainer: Any, pl_module: Any, cause: Any, head: str, ratio: float) -> None:
        """The not-learning verdict under the name of the earlier finding that explains it, at ``warning``."""
        self.raise_alert(
            trainer, pl_module, rule=cause.rule, severity="warning", action="warn", subject=cause.subject,
            value=ratio, threshold=_LEARNING_RATIO, message=(
                f"{head}, and at step {cause.step} {cause.source} found: {cause.message} That is the likely cause."))

    @staticmethod
    def _earlier_cause(trainer: Any) -> Optional[Any]:
        """The most specific earlier alert that explains a loss that does not go down, if any."""
        earlier = {}
        for alert in alert_log(trainer).history:
            if alert.rule in _LEARNING_CAUSES and alert.rule not in earlier:
                earlier[alert.rule] = alert
        return next((earlier[r] for r in _LEARNING_CAUSES if r in earlier), None)

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
            return self._ring_scores()["step_z"]  # computed once per check from the steps since the last one
        if name == self.shift_z_metric:
            return self._ring_scores()["shift_z"]
        if name == self.regress_metric:
            return self._ring_scores()["regress"]
        if name == self.block_mean_metric or name == self.block_square_metric:
            block = self._loss_block()
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
            if rules is self._due["step"] and (self.negative_loss_check or self.learning_check):
                # read by the built-in checks (loss_negative, loss_not_learning)
                names = names + [n for n in (self.loss_metric,) if n not in names]
                if self.learning_check:
                    names = names + [self.block_mean_metric, self.block_square_metric]
            self._names[id(rules)] = names
        metrics = trainer.callback_metrics if any(n not in self._builtins for n in names) else {}
        raw = [self._value(n, metrics) for n in names]
        raw = [self._scalar(n, v) for n, v in zip(names, raw)]
        index = {n: i for i, n in enumerate(names)}
        new_flags = [1.0 if raw[index[r.metric]] is not None and raw[index[r.metric]] is not self._last_obj.get(r.name)
                     else 0.0 for r in rules]
        for r in rules:
            value = raw[index[r.metric]]
            if value is not None:
                self._last_obj[r.name] = value
        device = pl_module.device
        n = len(names)
        values = self._stack(raw, device)
        if not distributed_ready():
            # One process: the values as they are, one device-to-host copy, nothing else on the device.
            local = values.tolist() if n else []
            self.host_reads += 1 if n else 0
            stats = {name: MetricStats.of(local[i]) if raw[i] is not None else
                     MetricStats(False, math.nan, math.nan, math.nan) for i, name in enumerate(names)}
            if self._sharded and self.grad_norm_metric in index and raw[index[self.grad_norm_metric]] is not None:
                stats[self.grad_norm_metric] = MetricStats.of(math.sqrt(local[index[self.grad_norm_metric]]))
            return stats, {r.name: f > 0 for r, f in zip(rules, new_flags)}, list(flags)
        present = torch.tensor([0.0 if v is None else 1.0 for v in raw] + new_flags + list(flags), device=device)
        inf = float("inf")
        pres = present[:n] > 0
        code = torch.isnan(values).float() * 2 + torch.isinf(values).float()
        high = torch.where(pres, values.nan_to_num(nan=inf, posinf=inf, neginf=-inf), -inf)
        neg_low = torch.where(pres, (-values).nan_to_num(nan=inf, posinf=inf, neginf=-inf), -inf)
        max_buf = torch.cat([present, high, neg_low, code])
        sum_buf = None
        squares = self._sharded and self.grad_norm_metric in index
        if squares or any(r.needs_mean() for r in rules) or self.block_mean_metric in index:
            sum_buf = torch.cat([torch.where(pres, values, torch.zeros_like(values)), present[:n]])
        all_reduce_flat(sum_buf, max_buf)
        self.collectives += 1
        host = torch.cat([max_buf] + ([sum_buf] if sum_buf is not None else [])).tolist()
        self.host_reads += 1

        k = len(rules)
        pres_h, new_h, flags_h = host[:n], host[n:n + k], host[n + k:n + k + len(flags)]
        off = n + k + len(flags)
        high_h, neg_low_h, code_h = host[off:off + n], host[off + n:off + 2 * n], host[off + 2 * n:off + 3 * n]
        off += 3 * n
        sums_h = host[off:off + n] if sum_buf is not None else None
        counts_h = host[off + n:off + 2 * n] if sum_buf is not None else None
        stats: Dict[str, MetricStats] = {}
        for i, name in enumerate(names):
            if pres_h[i] <= 0:
                stats[name] = MetricStats(False, math.nan, math.nan, math.nan)
            elif squares and name == self.grad_norm_metric:
                stats[name] = MetricStats.of(math.sqrt(sums_h[i]) if sums_h is not None else math.nan)
            else:
                mean = sums_h[i] / counts_h[i] if sums_h is not None and counts_h[i] > 0 else math.nan
                stats[name] = MetricStats(True, high_h[i], -neg_low_h[i], mean, int(code_h[i]))
        new = {r.name: new_h[j] > 0 for j, r in enumerate(rules)}
        return stats, new, flags_h

    def _scalar(self, name: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.numel() == 1:
                return value
            if name not in self._nonscalar_warned:
                self._nonscalar_warned.add(name)
                warnings.warn(f"MetricMonitor: metric {name!r} holds {value.numel()} values, not one; rules on it are "
                              f"skipped. Log a scalar (e.g. its mean).", MonitorWarning, stacklevel=3)
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        return None

    def _stack(self, raw: Sequence[Any], device: torch.device) -> torch.Tensor:
        """One float32 vector on ``device`` (0 where a value is missing), made with one stack on the device."""
        items: List[torch.Tensor] = []
        for v in raw:
            if isinstance(v, torch.Tensor) and v.device == device:
                items.append(v.detach().reshape(()).float())
            elif isinstance(v, torch.Tensor) and v.device.type != "cpu":
                items.append(v.detach().reshape(()).float().to(device))
            elif v is None:
                zero = self._zero
                if zero is None or zero.device != device:
                    zero = self._zero = torch.zeros((), device=device)
                items.append(zero)
            else:  # a host number, or a CPU tensor (reading host memory is no device sync)
                items.append(torch.tensor(float(v), device=device))
        return torch.stack(items) if items else torch.zeros(0, device=device)

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
        self._loss_ring, self._ring_count, self._ring_checked, self._scores_at = None, 0, 0, None
        self._block_taken, self._block_at = 0, None
        self._phase_start = 0

    # ------------------------------------------------------------------------------- missing
    def _warn_missing(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        missing: Dict[str, List[str]] = {}
        for rule in self.rules.rules:
            for metric in rule.metrics:
                # built-in metrics are made by this callback at its first step check: never a typo
                if metric not in self._seen and metric not in self._warned and metric not in self._builtins:
                    missing.setdefault(metric, []).append(rule.name)
        if not missing:
            return
        existing = sorted(set(map(str, trainer.callback_metrics)) | {m for m in self._builtins if m in self._seen})
        shown = ", ".join(existing[:30]) + (" ..." if len(existing) > 30 else "") if existing else "none yet"
        for metric, rule_names in missing.items():
            self._warned.add(metric)
            close = difflib.get_close_matches(metric, existing, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            checks = sorted({c for name in rule_names for c in self.rules.by_name[name].check_on})
            self.raise_alert(
                trainer, pl_module, rule="metric_missing", severity="warning", action="warn", subject=metric,
                message=(f"MetricMonitor rule(s) {', '.join(map(repr, rule_names))} watch {metric!r}, which has not "
                         f"been logged by step {logging_step(trainer)} (checked on {', '.join(checks)}). Metrics "
                         f"that exist: {shown}.{hint}"))

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update({
            "rules": self.rules.state_dict(),
            "recovery": self.recovery.state_dict(),
            "seen": sorted(self._seen),
            "warned": sorted(self._warned),
            "negative_since": self._negative_since,
            "loss_blocks": [list(b) for b in self._blocks],
            "next_evaluation": self._next_evaluation,
            "flat_evaluations": self._flat_evaluations,
            "slow_reported": self._slow_reported,
            "recent_lrs": [list(x) for x in self._recent_lrs],
            "learning_checked": self._learning_checked,
            "initial_loss": _plain(self._initial_loss),
            "best_level": _plain(self._best_level),
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
        self._blocks = [(int(b[0]), int(b[1]), int(b[2]), float(b[3]), float(b[4]))
                        for b in state_dict.get("loss_blocks", [])]
        self._next_evaluation = int(state_dict.get("next_evaluation", _LEARNING_FIRST_STEP))
        self._flat_evaluations = int(state_dict.get("flat_evaluations", 0))
        self._slow_reported = bool(state_dict.get("slow_reported", False))
        self._recent_lrs = [[float(v) for v in x] for x in state_dict.get("recent_lrs", [])]
        self._learning_checked = bool(state_dict.get("learning_checked", False))
        self._initial_loss = state_dict.get("initial_loss")
        self._best_level = state_dict.get("best_level")
        lrs = state_dict.get("phase_lrs")
        self._phase_lrs = None if lrs is None else [float(v) for v in lrs]


def _merge_blocks(a: Tuple[int, int, int, float, float],
                  b: Tuple[int, int, int, float, float]) -> Tuple[int, int, int, float, float]:
    """Two adjacent blocks of losses as one: counts add, means and mean squares are count-weighted."""
    n = a[2] + b[2]
    return a[0], b[1], n, (a[2] * a[3] + b[2] * b[3]) / n, (a[2] * a[4] + b[2] * b[4]) / n


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
