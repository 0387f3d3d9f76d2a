"""``DataQualityMonitor``: data-quality checks on the batches, on the device, merged across DDP ranks.

Both tiers are fed from ``on_*_batch_start``, where the batch is already on its device. The hook checks
the schema on the host (tensor metadata only) and leaves a copy of each field in a per-split buffer; that
copy is the whole device work of a step. The buffered batches are checked and folded together at the next
logged step, at the end of an evaluation epoch, or when the buffer is full:

- the **per-batch tier** counts non-finite values per feature, values outside known ranges, labels
  outside ``[0, num_classes)``, and (on the host) schema changes and empty batches, each with the first
  step at which it occurred (per-row step markers). The counters are reduced with one SUM and one MAX
  all-reduce per logged step and read with one device-to-host copy;
- the **distribution tier** accumulates per-feature moments and fixed-edge histograms, label counts and
  64-bit sample hashes over the epoch; it is reduced once per epoch (one MAX, one SUM, one all-gather of
  hashes) and gives drift of val against train, drift of any split against a reference profile, label
  shift, class imbalance, features that became constant, duplicates within a split and train-to-val
  leakage.

With ``scan_before_fit=N`` the monitor also reads up to N batches of the train and of each val dataloader in
``on_train_start``, before the first optimizer step, and runs both tiers on them with separate state, so data
faults are named at step 0; every random state is put back, so training is bit-identical with and without it.

Each check is a small class in :mod:`lightwatch.checks.data` (by name in ``BUILTIN_CHECKS``); this callback is
the loop that discovers the fields, feeds the checks, runs their reductions and writes their alerts and scalars.
See the README section "Data quality" for the checks, their defaults, the thresholds and the profile format,
and ``docs/custom-checks.md`` for a check of your own.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from lightwatch.checks.data.base import CheckContext, DataCheck
from lightwatch.checks.data.buffers import SplitState, row_limit
from lightwatch.checks.data.counters import BatchCounters
from lightwatch.checks.data.crash import CrashReport
from lightwatch.checks.data.discovery import FieldDiscovery
from lightwatch.checks.data.distribution import DistributionTier
from lightwatch.checks.data.fields import Ranges, Schema, parse_schema
from lightwatch.checks.data.first_batch import FirstBatchChecks
from lightwatch.checks.data.custom import CustomChecks
from lightwatch.checks.data.padding_in_loss import PaddingInLoss
from lightwatch.checks.data.registry import CheckSpec, check_table, parse_checks
from lightwatch.checks.data.scan import STEP_ACTIONS, ScanBeforeFit, ScanInfo
from lightwatch.checks.data.state import LearnedState
from lightwatch.core.alerts import SEVERITIES
from lightwatch.core.batch import BatchSelector, Selector
from lightwatch.core.callback import MonitorCallback
from lightwatch.core.lightning import bind, default_package
from lightwatch.core.readback import HostReadback
from lightwatch.core.runtime import logging_step
from lightwatch.profile import DataProfile

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["DataQualityMonitor", "CHECKS"]

logger = logging.getLogger("lightwatch")

# Actions that must act on the very batch that triggered them: the per-batch tier reads its flags every
# step (one small host read, one MAX collective under DDP) when a per-batch check uses one of them.
_IMMEDIATE_ACTIONS = ("skip_step", "raise")

#: Every built-in check, its tier, and its defaults: ``action``, ``severity`` and the check's own parameters
#: (the check classes are in :mod:`lightwatch.checks.data`, by name in ``BUILTIN_CHECKS``).
CHECKS: Dict[str, Dict[str, Any]] = check_table()


def _whole(value: Any, low: int, problem: str, numbers_only: bool = False) -> int:
    """``value`` as an int ``>= low``; ``ValueError("<problem>, got <value>.")`` otherwise."""
    if isinstance(value, bool) or (numbers_only and not isinstance(value, (int, float))) or int(value) != value \
            or value < low:
        raise ValueError(f"{problem}, got {value!r}.")
    return int(value)


class _DataQualityMonitor(FieldDiscovery, BatchCounters, FirstBatchChecks, ScanBeforeFit, DistributionTier,
                          CustomChecks, CrashReport, LearnedState, MonitorCallback):
    """Data-quality checks on every batch, on the device, with profiles and drift across splits and runs.

    Each check is an object of :mod:`lightwatch.checks.data` (its settings, what it observes, when it is judged,
    the alert it raises); this callback is the loop that discovers the fields, feeds the checks, runs their
    reductions across ranks, and writes their alerts and scalars.

    **Per-batch tier** (every batch, on the device, read once per logged step; an unlogged step costs one
    copy of each field and no host sync): non-finite values per feature (``nonfinite``), labels outside
    ``[0, num_classes)`` or negative (``label_range``), values outside given, reference or learned ranges
    (``out_of_range``), a dtype or sample shape that changed (``schema``), empty batches (``empty_batch``).
    An alert for a bad batch carries the step of that batch, even though it is read at the next logged
    step. A per-batch check whose action is ``skip_step`` or ``raise`` makes the tier read its flags every
    step (one small host read, one MAX all-reduce under DDP), so the action hits the bad batch itself.

    **Distribution tier** (accumulated over each epoch, reduced once per epoch): per-feature moments and
    histograms on frozen bin edges, label counts and sample hashes. At the end of each epoch: drift of each
    evaluation split against the training split (``drift``: PSI and binned KS with thresholds that account
    for both sample sizes and the number of features), drift of any split against a reference profile
    (``drift_ref``), label shift (``label_shift``, ``label_shift_ref``: a chi-square test *and* the total
    variation distance as effect size), features that became constant (``constant``), duplicates within a split
    (``duplicates``), evaluation samples also seen in training (``leakage``) and class imbalance
    (``class_imbalance``). Once, at the first training batch: inputs far from zero mean and unit scale
    (``unnormalised``). Graded severities keep healthy runs quiet: drift is ``info`` unless a feature has both
    PSI > ``psi_warn`` (0.5) and KS > ``ks_warn`` (0.3), duplicates are ``info`` up to ``warn_above`` (50%)
    of the split. The statistics are saved as a JSON profile usable as ``reference`` of a later
    run.

    **Scan before training** (``scan_before_fit=N``, off by default; 64 in the Hydra ``default`` and
    ``strict`` policies): in ``on_train_start`` up to N batches of the train dataloader and of each val
    dataloader are read (through the batch-transfer hooks, without the model) and checked by both tiers on
    state of their own, so leakage, duplicates, class imbalance, label shift, drift, NaNs and unscaled inputs
    are reported at step 0, in alerts that say they come from the scan. All random states are restored, so the
    training run is bit-identical with and without it; the checks during training then do not repeat an
    alert (rule and subject) the scan already raised at the same or a higher severity.

    Tags: ``monitor.data/<split>/<field or field.feature or _all>/<stat>`` with stats ``nonfinite``,
    ``out_of_range``, ``schema_errors``, ``empty_batches``, ``samples``, ``dup_frac``, ``dup_count``,
    ``leak_frac``, ``leak_count``, ``psi``, ``ks``, ``psi_ref``, ``ks_ref``, ``mean``, ``std``, ``constant``,
    ``label_shift``, ``label_shift_ref``, ``imbalance``, ``classes``; label histograms under
    ``monitor.data_hist/<split>/<target>``.

    Features: the last dimension of 2-d and 3-d tensors (tabular ``[N, F]``, sequences ``[N, T, F]``), the
    channels of 4-d and 5-d tensors (``[N, C, H, W]``), a single feature for 1-d tensors; set
    ``feature_dim`` to change it. Integer targets are class labels; float targets are numeric like inputs.

    Args:
        inputs: selector(s) of the input tensors in the batch (``0``, ``"image"``, ``"inputs.ids"``); ``None``
            fits ``(x, y)`` tuples and ``{"x"/"input"/"features"/"image"/..., ...}`` dicts. ``[]``: none.
        targets: selector(s) of the targets; ``None`` fits ``(x, y)`` and ``{"y"/"label"/"target"/...}``.
        reference: path of a data profile saved by an earlier run (in Python also a path-like object or a
            :class:`~lightwatch.profile.DataProfile`): its bin edges, ranges, schema and class count are used,
            and every split is compared with it. The hint says ``str`` so that command-line parsers take it.
        every_n_steps: logging interval of the per-batch tier; ``None`` follows ``Trainer(log_every_n_steps)``.
        sample_ids: optional selector of per-sample ids (dataset indices): repeated ids are not duplicates.
        num_classes: number of classes of integer targets; ``None``: the module's ``num_classes`` attribute
            or hyperparameter, the reference, or the largest label of the first training epoch plus one.
        ignore_index: a label value that marks "no label" (cross-entropy's default ``-100``); never counted.
        feature_dim: dimension holding the features: one int for every field, or ``{field: int or None}``
            (``None``: all values of a sample are one feature). Unlisted fields use the default above.
        feature_names: ``{field: [names]}`` for tags and alerts (``x.age`` instead of ``x.3``).
        ranges: ``{field: [lo, hi]}`` or ``{field: [[lo, hi], ...]}`` per feature: hard bounds; any value
            outside is an ``out_of_range`` alert.
        schema: ``{field: {"dtype": "float32", "shape": [3, None, None]}}``: the expected dtype and sample
            shape (``None``: variable). Without it the schema comes from the reference, or is learned over
            the first training epoch (dimensions that vary are variable) and frozen after it.
        learn_ranges: after the first training epoch, use its per-feature ``[min, max]`` (widened by the
            ``out_of_range`` margin) as the range of later epochs and of evaluation splits, for fields
            without given or reference ranges.
        bins: histogram bins per feature (plus an underflow and an overflow bucket).
        max_values_per_sample: the distribution tier reads at most this many evenly strided values of each
            feature per sample (an image of 224x224 contributes 64 pixels per channel); the per-batch tier
            always reads everything.
        distribution: run the distribution tier (moments, histograms, labels, drift).
        duplicates: hash samples for duplicates and leakage.
        checks: per-check settings, ``{check: {"action": ..., "severity": ..., "enabled": bool, <params>}}``
            or ``{check: false}``; the checks and their defaults are in :data:`CHECKS`. Or a list of check names
            and :class:`~lightwatch.checks.data.base.DataCheck` instances: those run, the other built-in checks
            do not. A check of your own (a ``DataCheck`` subclass with a name of its own) runs beside them.
        profile_path: where this run's data profile is written (atomically, by global rank 0, at each
            epoch end); ``"auto"``: ``data_profile.json`` in the run directory; ``None``: not written.
        save_hashes: include the sample hashes in the profile (lets a later run find samples leaked from
            this run's training split; 8 bytes a sample).
        top_k: per-feature scalars are written for at most this many features per field (the most drifted).
        prefix: first part of every tag.
        alert_cooldown_steps: at most one record per alert rule and subject in this many steps.
        scan_before_fit: before the first optimizer step (in ``on_train_start``), read at most this many batches
            from the train dataloader and from each val dataloader, run every check on them (non-finite values,
            ranges, labels, schema, input scale, duplicates, leakage, class imbalance, label shift, drift) and
            report what they find at once, in alerts that say they come from the scan. It costs one pass of the
            data pipeline over up to this many batches per split, without the model; the training run is
            bit-identical with and without it (every random state is put back). A later alert of the same rule
            and subject (at the same or a lower severity) is not repeated. ``0``: no scan.
        scan_iterable: let the scan read dataloaders over an ``IterableDataset`` too (by default they are
            skipped: reading a stream may consume what training would read).

    Example:
        >>> from lightwatch.callbacks import DataQualityMonitor
        >>> monitor = DataQualityMonitor(inputs="image", targets="label", checks={"nonfinite": {"action": "stop"}})
        >>> monitor.checks["nonfinite"].action, monitor.checks["drift"].severity
        ('stop', 'warning')
        >>> only = DataQualityMonitor(checks=["nonfinite", "label_range"])
        >>> [name for name, check in only.checks.items() if check.enabled]
        ['nonfinite', 'label_range']
    """

    def __init__(
        self,
        inputs: Optional[Union[Selector, Sequence[Selector]]] = None,
        targets: Optional[Union[Selector, Sequence[Selector]]] = None,
        reference: Optional[str] = None,
        every_n_steps: Optional[int] = None,
        sample_ids: Optional[Selector] = None,
        num_classes: Optional[int] = None,
        ignore_index: Optional[int] = -100,
        feature_dim: Optional[Union[int, Mapping[str, Optional[int]]]] = None,
        feature_names: Optional[Mapping[str, Sequence[str]]] = None,
        ranges: Optional[Mapping[str, Sequence[Any]]] = None,
        schema: Optional[Mapping[str, Mapping[str, Any]]] = None,
        learn_ranges: bool = True,
        bins: int = 10,
        max_values_per_sample: int = 64,
        distribution: bool = True,
        duplicates: bool = True,
        checks: Optional[CheckSpec] = None,
        profile_path: Optional[str] = "auto",
        save_hashes: bool = False,
        top_k: int = 10,
        prefix: str = "monitor",
        alert_cooldown_steps: int = 100,
        scan_before_fit: int = 0,
        scan_iterable: bool = False,
    ) -> None:
        super().__init__(every_n_steps, 0, prefix, alert_cooldown_steps)
        where = "DataQualityMonitor"
        self.selector = BatchSelector(inputs, targets, sample_ids, where=where)
        self.checks, self._custom_checks = parse_checks(checks, where)
        # fed every batch and judged by the loop: custom checks, and built-in ones with states of their own
        self._driven = [c for c in list(self.checks.values()) + self._custom_checks if c.implements_protocol()]
        self.num_classes = None if num_classes is None else _whole(
            num_classes, 1, f"{where}: num_classes must be a positive integer or None")
        if ignore_index is not None and (isinstance(ignore_index, bool) or int(ignore_index) != ignore_index):
            raise ValueError(f"{where}: ignore_index must be an integer or None, got {ignore_index!r}.")
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        if isinstance(feature_dim, bool) or not (feature_dim is None or isinstance(feature_dim, (int, Mapping))):
            raise ValueError(f"{where}: feature_dim must be an int, a mapping {{field: int or None}}, or None; got "
                             f"{feature_dim!r}.")
        self.feature_dim = dict(feature_dim) if isinstance(feature_dim, Mapping) else feature_dim
        self.feature_names = {str(k): [str(n) for n in v] for k, v in dict(feature_names or {}).items()}
        self.ranges = {str(k): v for k, v in dict(ranges or {}).items()}
        self.schema = parse_schema(schema, where)
        self.learn_ranges = bool(learn_ranges)
        self.bins = _whole(bins, 2, f"{where}: bins must be an integer >= 2")
        self.max_values_per_sample = _whole(max_values_per_sample, 1,
                                            f"{where}: max_values_per_sample must be a positive integer")
        self.distribution = bool(distribution)
        self.duplicates = bool(duplicates)
        self.profile_path = None if profile_path is None else str(profile_path)
        self.save_hashes = bool(save_hashes)
        self.top_k = _whole(top_k, 0, f"{where}: top_k must be an integer >= 0")
        self.scan_before_fit = _whole(scan_before_fit, 0, (
            f"{where}: scan_before_fit must be an integer >= 0 (the most batches read from the train and from each "
            f"val dataloader before training; 0 turns the scan off)"), numbers_only=True)
        if not isinstance(scan_iterable, bool):
            raise ValueError(f"{where}: scan_iterable must be true or false (whether the scan before training may "
                             f"read dataloaders over an IterableDataset), got {scan_iterable!r}.")
        self.scan_iterable = scan_iterable
        self.reference: Optional[DataProfile] = None
        if isinstance(reference, DataProfile):
            self.reference = reference
        elif reference is not None:
            self.reference = DataProfile.load(reference)  # fail at construction: a typo must not wait an epoch
        self._immediate_checks = {name for name, c in self.checks.items()
                                  if c.enabled and c.tier == "batch" and c.action in _IMMEDIATE_ACTIONS}
        # state shared by the splits: frozen edges, schema, classes, ranges, learned after the first epoch
        self._splits: Dict[str, SplitState] = {}
        self._edges: Dict[str, torch.Tensor] = {}
        self._schemas: Dict[str, Schema] = {}
        # number of features of each field with a feature dimension, from its first batch: every split uses it
        self._layout: Dict[str, int] = {}
        self._classes: Dict[str, int] = {}
        self._class_source: Dict[str, str] = {}
        self._label_max: Dict[str, float] = {}
        self._ranges: Dict[str, Ranges] = {}
        self._learned = False  # the first training epoch has been folded into schema, ranges and classes
        self._profile = DataProfile()
        self._train_hashes_last = torch.zeros(0, dtype=torch.int64)
        self._reported: set = set()
        self._readback: HostReadback = HostReadback()
        self._published_step: Optional[int] = None
        self._skip_step: Optional[int] = None
        self._module_classes: Optional[int] = None
        self._notes: set = set()
        self._restored_ranges: Dict[str, Dict[str, Any]] = {}
        self._immediate_flag: Optional[torch.Tensor] = None
        self._record_only = False
        # input scale of the first training batch: (field names, device tensor [|mean|, std] per field), read
        # at the first logged step; `_scale_checked` keeps a resumed run from checking again
        self._scale_probe: Optional[Tuple[List[str], torch.Tensor, int]] = None
        self._scale_checked = False
        # padding_in_loss: training batches left to look at for padding (checked until one has some)
        self._padding_batches_left = PaddingInLoss.max_batches
        # the scan before training: set while it runs; the (rule, subject) it reported with their severity,
        # so the streaming checks do not report them again; done once per run (kept in checkpoints)
        self._scan: Optional[ScanInfo] = None
        self._scan_alerts: Dict[str, str] = {}
        self._scan_done = False
        # the batch the model gets next: (split, marker, batch, sanity check); a reference, no copy, read only
        # when training fails (`on_exception`) to name a label that crashed the loss
        self._last_batch: Optional[Tuple[str, int, Any, bool]] = None
        self._explained: set = set()

    # -------------------------------------------------------------------------------- public API
    @property
    def state_key(self) -> str:
        """Unique per selection and profile path, so several monitors can share a Trainer and a checkpoint."""
        # Lightning reads it around every hook call of every callback, overridden or not (ten times a step):
        # built once, since the selection and the path are fixed at construction
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = self._generate_state_key(
                inputs=self.selector.inputs, targets=self.selector.targets, profile_path=self.profile_path)
        return key

    @property
    def profile(self) -> DataProfile:
        """This run's data profile: the last completed epoch of each split."""
        return self._profile

    def save_profile(self, path: str) -> None:
        """Write this run's data profile to ``path`` (JSON, atomically)."""
        self._profile.save(path, with_hashes=self.save_hashes)

    # ------------------------------------------------------------------------------------- setup
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.num_classes is None:
            found = getattr(pl_module, "num_classes", None)
            hparams = getattr(pl_module, "hparams", None)
            if found is None and isinstance(hparams, Mapping):
                found = hparams.get("num_classes")
            if isinstance(found, int) and not isinstance(found, bool) and found > 0:
                self._module_classes = found

    def _split(self, name: str) -> SplitState:
        sp = self._splits.get(name)
        if sp is None:
            sp = self._splits[name] = SplitState(name, "step" if name == "train" else "batch")
        return sp

    @staticmethod
    def _eval_split(stage: str, dataloader_idx: int) -> str:
        return stage if dataloader_idx == 0 else f"{stage}_{dataloader_idx}"

    # ---------------------------------------------------------------------------------- hooks: train
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        sp = self._split("train")
        sp.reset_epoch()

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._readback.pending:  # values of an earlier logged step (CUDA: read one step late)
            self._publish_pending(trainer, pl_module)
        sp = self._split("train")
        if not sp.limit_known:
            sp.row_limit, sp.limit_known = row_limit(getattr(trainer, "train_dataloader", None)), True
        step = logging_step(trainer)
        self._immediate_flag = None
        self._last_batch = ("train", step, batch, False)
        self._observe(trainer, pl_module, sp, batch, step)
        if not self._scale_checked:
            self._check_scale(trainer, pl_module, sp, batch, step)
        if self._padding_batches_left > 0:
            self._check_padding(trainer, pl_module, sp, batch, step)
        if self._immediate_checks and self._immediate_triggered(sp):
            self._flush_step(trainer, pl_module, sp, step, synchronous=True)
            return
        if self.sampled and step != self._published_step:
            self._flush_step(trainer, pl_module, sp, step)

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._skip_step is not None and self._skip_step == logging_step(trainer):
            from lightwatch.core.recovery import recovery_for

            recovery_for(trainer).apply_pending_skip(trainer, pl_module)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        sp = self._splits.get("train")
        if sp is None or sp.specs is None:
            return
        if self._readback.pending:
            self._publish_pending(trainer, pl_module)
        self._epoch_end(trainer, pl_module, sp)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._readback.pending:
            self._publish_pending(trainer, pl_module)
        sp = self._splits.get("train")
        if sp is not None and sp.specs is not None and sp.pending:
            self._flush_step(trainer, pl_module, sp, logging_step(trainer), synchronous=True)

    # ---------------------------------------------------------------------------- hooks: evaluation
    def _eval_epoch_start(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        train = self._splits.get("train")
        if train is not None and train.specs is not None and train.pending:
            # read the training counters now, so evaluation batches are checked against every training label
            if self._readback.pending:
                self._publish_pending(trainer, pl_module)
            self._flush_step(trainer, pl_module, train, logging_step(trainer), synchronous=True)
        for name, sp in self._splits.items():
            if (name == stage or name.startswith(stage + "_")) and sp.specs is not None:
                sp.reset_epoch()
                self._reset_counters(sp)

    def _eval_batch_start(self, trainer: Any, pl_module: Any, stage: str, batch: Any, dataloader_idx: int,
                          batch_idx: int = 0) -> None:
        split = self._eval_split(stage, dataloader_idx)
        if getattr(trainer, "sanity_checking", False):
            # not checked or counted (the sanity check is no epoch), but kept: if the model crashes on it (a label
            # out of range), `on_exception` names the cause
            self._last_batch = (split, batch_idx, batch, True)
            return
        sp = self._split(split)
        self._last_batch = (split, sp.batches_in_epoch, batch, False)
        if not sp.limit_known:
            loaders = getattr(trainer, "val_dataloaders" if stage == "val" else f"{stage}_dataloaders", None)
            if isinstance(loaders, (list, tuple)):
                loaders = loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
            sp.row_limit, sp.limit_known = row_limit(loaders), True
        self._immediate_flag = None
        self._observe(trainer, pl_module, sp, batch, sp.batches_in_epoch)
        if self._immediate_checks and self._immediate_triggered(sp):
            self._flush_step(trainer, pl_module, sp, logging_step(trainer), synchronous=True)

    def _eval_epoch_end(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        for name in sorted(self._splits):
            sp = self._splits[name]
            if (name == stage or name.startswith(stage + "_")) and sp.specs is not None:
                self._epoch_end(trainer, pl_module, sp)

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval_epoch_start(trainer, pl_module, "val")

    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_start(trainer, pl_module, "val", batch, dataloader_idx, batch_idx)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval_epoch_end(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval_epoch_start(trainer, pl_module, "test")

    def on_test_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_start(trainer, pl_module, "test", batch, dataloader_idx, batch_idx)

    def on_test_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval_epoch_end(trainer, pl_module, "test")

    # ------------------------------------------------------------------------------------ alerts
    def _raise(self, trainer: Any, pl_module: Any, check: DataCheck, *, subject: str, value: Optional[float],
               message: str, step: int, threshold: Optional[float] = None, severity: Optional[str] = None) -> None:
        """Turn a check's finding into an alert: the scan's suffix and dedupe, and the check's action."""
        action = "log" if self._record_only else check.action
        severity = severity or check.severity
        key = self._scan_key(check.rule, subject)
        if self._scan is not None:
            message = f"{message} [{self._scan.describe()}]"
            if action in STEP_ACTIONS:
                action = "warn"  # before training there is no optimizer step to skip or roll back
            known = self._scan_alerts.get(key)
            if known is None or SEVERITIES.index(severity) > SEVERITIES.index(known):
                self._scan_alerts[key] = severity
        elif key in self._scan_alerts and action not in STEP_ACTIONS \
                and SEVERITIES.index(severity) <= SEVERITIES.index(self._scan_alerts[key]):
            # the scan before training reported this already (as loud or louder); a step action still acts
            return
        if action == "skip_step":
            self._skip_step = logging_step(trainer)
        if severity == "info" and severity != check.severity and action not in ("log", "warn"):
            action = "log"  # a weak finding never takes a control-flow action meant for a strong one
        self.raise_alert(trainer, pl_module, rule=check.rule, severity=severity, action=action,
                         subject=subject, value=value, threshold=threshold, message=message, step=step)

    def _context(self, trainer: Any, pl_module: Any, split: str, step: int,
                 scalars: Optional[Dict[str, float]] = None) -> CheckContext:
        """What a check is judged with: its findings become alerts through :meth:`_raise`."""

        def report(check: DataCheck, **found: Any) -> None:
            self._raise(trainer, pl_module, check, **found)

        return CheckContext(split, step, scan=self._scan is not None, report=report, tag=self.writer.tag,
                            scalars={} if scalars is None else scalars)


#: The class to add to ``Trainer(callbacks=[...])``: the implementation above bound to the installed
#: Lightning package (``pytorch_lightning``, else ``lightning.pytorch``; ``lightwatch.lightning`` binds it to
#: the latter).
DataQualityMonitor = bind(_DataQualityMonitor, default_package(), "callback", module=__name__)
