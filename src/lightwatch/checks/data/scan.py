"""The scan before training: up to N batches of the train and of each val dataloader, read and checked at step 0.

In ``on_train_start`` the data monitor reads the batches through the batch-transfer hooks (without the model)
on state of its own, runs both tiers on them, reports what they find in alerts that say they come from the
scan, and puts back every random state, so training is bit-identical with and without it.
"""
from __future__ import annotations

import importlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from lightwatch.checks.data.buffers import SplitState, row_limit
from lightwatch.checks.data.fields import Schema
from lightwatch.core.lightning import package_of
from lightwatch.core.reduce import agree_max, all_reduce_flat
from lightwatch.core.rng import capture_rng_state, restore_rng
from lightwatch.core.runtime import distributed_ready, logging_step, world_size
from lightwatch.metrics.label_signal import NeighbourLabelAgreement
from lightwatch.profile import DataProfile

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["SCAN_ISOLATED", "STEP_ACTIONS", "FreshIterable", "RandomStates", "ScanBeforeFit", "ScanInfo", "finite_int",
           "loader_generators", "ordered", "streamed"]

logger = logging.getLogger("lightwatch")

_F64 = torch.float64

#: State of the monitor that the scan before training works on: it runs on fresh or copied values of all of
# these, and the streaming values are put back afterwards, so training-time checks see exactly what they
# would see without the scan.
SCAN_ISOLATED = ("_splits", "_edges", "_schemas", "_layout", "_classes", "_class_source", "_label_max", "_ranges",
                  "_restored_ranges", "_learned", "_profile", "_train_hashes_last", "_reported", "_published_step",
                  "_skip_step", "_scale_probe", "_scale_checked", "_immediate_flag", "sampled")
#: Actions that act on an optimizer step: before training there is none to skip or roll back.
STEP_ACTIONS = ("skip_step", "rollback")


@dataclass
class ScanInfo:
    """What the scan before training read: the numbers go into the message of every alert it raises.

    Example:
        >>> ScanInfo(4, 2, 1).describe()
        'found by the data scan before training: 4 train and 2 val batch(es) read before the first optimizer step'
    """

    train_batches: int
    val_batches: int
    ranks: int
    # splits read in a fixed order and not to their end: a class-sorted split read from its start looks
    # "imbalanced" and "drifted", so the distribution comparisons (drift, label shift, class imbalance,
    # constant features) are left out for them; duplicates and leakage are exact matches and stay valid
    partial: Tuple[str, ...] = ()

    def describe(self) -> str:
        where = f" on each of the {self.ranks} ranks" if self.ranks > 1 else ""
        return (f"found by the data scan before training: {self.train_batches} train and {self.val_batches} val "
                f"batch(es) read{where} before the first optimizer step")


class FreshIterable:
    """Iterates a loader through iterators of its own and shuts their workers down in :meth:`close`.

    A ``DataLoader`` with ``persistent_workers`` caches one iterator (and its workers, whose random state
    feeds augmentation) for training; ``_get_iterator()`` makes a separate one, so the scan leaves the
    cached one untouched.

    Example:
        >>> fresh = FreshIterable([[1, 2], [3]])
        >>> [batch for batch in fresh], len(fresh)
        ([[1, 2], [3]], 2)
        >>> fresh.close()
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.iterators: List[Any] = []

    def __iter__(self) -> Iterator[Any]:
        make = getattr(self.loader, "_get_iterator", None)
        it = make() if isinstance(self.loader, DataLoader) and callable(make) else iter(self.loader)
        self.iterators.append(it)
        return it

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        for it in self.iterators:
            shutdown = getattr(it, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
        self.iterators = []


class RandomStates:
    """Every random state reading data can draw from, saved at once and put back by :meth:`restore`.

    A shuffling ``DataLoader`` draws its order (and its workers' base seed) from the global torch generator,
    or from its own ``generator``; datasets may augment with ``random``, NumPy or torch (CPU or CUDA). Putting
    all of them back makes the training run bit-identical to one without the scan.

    Example:
        >>> import torch
        >>> states = RandomStates()
        >>> first = torch.rand(1)
        >>> states.restore()
        >>> bool(torch.equal(torch.rand(1), first))
        True
    """

    def __init__(self) -> None:
        self.process = capture_rng_state()
        self.generators: List[Tuple[torch.Generator, torch.Tensor]] = []

    def add(self, generators: Sequence[torch.Generator]) -> None:
        """Also save these generators (a loader's own), before anything draws from them."""
        known = {id(g) for g, _ in self.generators}
        self.generators += [(g, g.get_state()) for g in generators if id(g) not in known]

    def restore(self) -> None:
        restore_rng(self.process)
        for g, state in self.generators:
            g.set_state(state)


def loader_generators(loader: Any) -> List[torch.Generator]:
    """The torch generators a loader draws from when iterated (its own, its sampler's, its batch sampler's)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    found: Dict[int, torch.Generator] = {}
    for obj in (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator):
            found[id(g)] = g
    return list(found.values())


def streamed(loader: Any) -> bool:
    """Whether reading ``loader`` may consume what training would read: an ``IterableDataset`` (a stream, a
    queue, a generator) or an iterable that is not a ``DataLoader`` at all."""
    return not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset)


def ordered(loader: Any) -> bool:
    """Whether ``loader`` reads its dataset in a fixed order (its first batches are no random sample)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
    if isinstance(sampler, SequentialSampler):
        return True
    # DistributedSampler (and look-alikes) with shuffle=False: each rank reads a fixed stride of the dataset
    return hasattr(sampler, "num_replicas") and getattr(sampler, "shuffle", True) is False


def finite_int(value: Any) -> Optional[int]:
    """``value`` as an int when it is a finite number (not a bool), else ``None``."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


class ScanBeforeFit:
    """The part of :class:`~lightwatch.callbacks.DataQualityMonitor` that scans the data before training.

    It puts the monitor on separate state (the attributes in ``SCAN_ISOLATED``, and the alert cooldown),
    feeds the scanned batches to the same ``_observe`` and ``_epoch_end`` as training does, and puts it all back.

    Example:
        >>> ScanBeforeFit._agree_counts(None, [3, 0], torch.device("cpu"))  # one process: the counts as they are
        [3, 0]
    """

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """With ``scan_before_fit``: scan the train and val dataloaders before the first optimizer step."""
        super().on_train_start(trainer, pl_module)
        if self.scan_before_fit <= 0 or self._scan_done:
            return
        # a run resumed past its start (or restarted mid-way) has scanned already, or has trained on the data
        if int(getattr(trainer, "global_step", 0)) > 0 or logging_step(trainer) > 0:
            self._scan_done = True
            return
        self._scan_done = True
        self._scan_alerts = {}
        self._scan_data(trainer, pl_module)

    def _scan_sources(self, trainer: Any) -> List[Tuple[str, int, Any, List[Any], Optional[int]]]:
        """``(split, dataloader_idx, iterable, loaders, batches in an epoch)`` for the train split and each val
        dataloader, in the same order on every rank; streamed loaders are left out (with a note)."""
        CombinedLoader = importlib.import_module(
            f"{package_of(trainer).__name__}.utilities.combined_loader").CombinedLoader

        sources: List[Tuple[str, int, Any, List[Any], Optional[int]]] = []
        fit_loop = trainer.fit_loop
        combined = getattr(fit_loop, "_combined_loader", None)
        if combined is not None:
            # a fresh CombinedLoader over the same loaders yields the batch the training step gets (a collection
            # of batches for several train dataloaders), without touching the fit loop's iterator
            fresh = CombinedLoader(combined.iterables, getattr(combined, "_mode", "max_size_cycle"))
            loaders = list(fresh.flattened)
            if self._scannable("train", loaders):
                fresh.flattened = [FreshIterable(dl) for dl in loaders]
                sources.append(("train", 0, fresh, loaders,
                                finite_int(getattr(trainer, "num_training_batches", None))))
        val_loop = fit_loop.epoch_loop.val_loop
        if getattr(trainer, "enable_validation", False) and getattr(val_loop, "_combined_loader", None) is None:
            # no sanity check and no validation in the first epoch: load the val dataloaders now, as the fit
            # loop itself does when validation runs in the first epoch (they are not loaded again later)
            trainer.validating = True
            try:
                val_loop.setup_data()
            finally:
                trainer.training = True
        val_combined = getattr(val_loop, "_combined_loader", None)
        if val_combined is None:
            self._note("scan:noval", "DataQualityMonitor: no validation dataloader; the scan before training reads the "
                                     "train split only.")
            return sources
        limits = list(getattr(val_loop, "_max_batches", None) or [])
        for idx, loader in enumerate(val_combined.flattened):
            split = self._eval_split("val", idx)
            if self._scannable(split, [loader]):
                sources.append((split, idx, FreshIterable(loader), [loader],
                                finite_int(limits[idx]) if idx < len(limits) else None))
        return sources

    def _scannable(self, split: str, loaders: List[Any]) -> bool:
        if self.scan_iterable or not any(streamed(dl) for dl in loaders):
            return True
        self._note(f"scan:stream:{split}",
                   f"DataQualityMonitor: the {split} dataloader reads an IterableDataset (or is not a torch "
                   f"DataLoader): reading it may consume what training would read, so the scan before training "
                   f"skips it; scan_iterable=True scans it anyway.")
        return False

    def _scan_batch(self, trainer: Any, pl_module: Any, split: str, idx: int, raw: Any) -> Any:
        """The batch as the training or validation step gets it: precision conversion and the batch-transfer
        hooks (``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``), with
        the Trainer in the matching stage, since hooks often augment in training only."""
        evaluation = split != "train"
        if evaluation:
            trainer.validating = True
        try:
            batch = trainer.precision_plugin.convert_input(raw)
            before = getattr(pl_module, "_on_before_batch_transfer", None)
            if callable(before):
                batch = before(batch, dataloader_idx=idx)
            return trainer.strategy.batch_to_device(batch, dataloader_idx=idx)
        finally:
            if evaluation:
                trainer.training = True

    def _scan_data(self, trainer: Any, pl_module: Any) -> None:
        """Read up to ``scan_before_fit`` batches of each split, check them on separate state, report at once.

        Collectives (under DDP) are the same on every rank: the batch counts are agreed first (the smallest
        over the ranks, 0 when any rank has none: that split is skipped everywhere), so the once-per-split
        reductions (and the first batch's edge and scale agreements) happen on every rank alike.
        """
        started = time.perf_counter()
        # saved before the val dataloaders may be loaded: a val_dataloader() hook may draw random numbers too
        states = RandomStates()
        sources: List[Tuple[str, int, Any, List[Any], Optional[int]]] = []
        saved = self._enter_scan()
        iterators: List[Any] = []
        try:
            sources = self._scan_sources(trainer)
            states.add([g for _, _, _, loaders, _ in sources for dl in loaders for g in loader_generators(dl)])
            firsts: List[Any] = []
            planned: List[int] = []
            end = object()
            for split, idx, iterable, loaders, epoch_batches in sources:
                limit = self.scan_before_fit if epoch_batches is None else min(self.scan_before_fit, epoch_batches)
                it = iter(iterable) if limit > 0 else iter(())
                iterators.append(it)
                first = next(it, end)
                firsts.append(first)
                planned.append(0 if first is end else limit)
            device = getattr(trainer.strategy, "root_device", None) or torch.device("cpu")
            counts = self._agree_counts(planned, device)
            n_train = sum(c for (split, *_), c in zip(sources, counts) if split == "train")
            n_val = sum(c for (split, *_), c in zip(sources, counts) if split != "train")
            partial = tuple(split for (split, _, _, loaders, epoch_batches), c in zip(sources, counts)
                            if c and (epoch_batches is None or c < epoch_batches)
                            and any(ordered(dl) for dl in loaders))
            for split in partial:
                self._note(f"scan:partial:{split}",
                           f"DataQualityMonitor: the {split} dataloader reads in a fixed order and the scan reads "
                           f"only its first batches: their distribution is no sample of the split, so drift, label "
                           f"shift, class balance and constant features are left to the checks during training.")
            self._scan = ScanInfo(n_train, n_val, world_size(), partial)
            signal = NeighbourLabelAgreement() if self.checks["labels_unrelated"].enabled and n_train else None
            for (split, idx, _, loaders, _), it, first, count in zip(sources, iterators, firsts, counts):
                if count <= 0:
                    continue
                sp = self._split(split)
                sp.row_limit, sp.limit_known = (row_limit(loaders[0]) if len(loaders) == 1 else None), True
                raw = first
                for i in range(count):
                    if i:
                        raw = next(it, end)
                        if raw is end:
                            break
                    if split == "train":
                        raw = raw[0]  # CombinedLoader yields (batch, batch_idx, dataloader_idx)
                    batch = self._scan_batch(trainer, pl_module, split, idx, raw)
                    self._observe(trainer, pl_module, sp, batch, i)  # marker: the batch index in the scan
                    if split == "train" and signal is not None and not signal.full:
                        self._sample_labels(sp, batch, signal)
                    if split == "train" and i == 0:
                        self.sampled = True  # read the input scale of the first batch now
                        self._check_scale(trainer, pl_module, sp, batch, 0)
                        self.sampled = False
                    if split == "train" and self._padding_batches_left > 0:
                        self._check_padding(trainer, pl_module, sp, batch, 0)
                if sp.specs is not None:
                    self._epoch_end(trainer, pl_module, sp)
            if signal is not None:
                self._check_labels_unrelated(trainer, pl_module, signal, device)
            logger.info("lightwatch: DataQualityMonitor scanned %d train and %d val batch(es) before training in "
                        "%.2f s", n_train, n_val, time.perf_counter() - started)
        finally:
            for _, _, iterable, _, _ in sources:
                for fresh in (iterable.flattened if hasattr(iterable, "flattened") else [iterable]):
                    if isinstance(fresh, FreshIterable):
                        fresh.close()
            self._leave_scan(saved)
            states.restore()

    def _sample_labels(self, sp: SplitState, batch: Any, signal: NeighbourLabelAgreement) -> None:
        """Rows of the first floating input and of the class labels, for ``labels_unrelated``."""
        specs = sp.specs or []
        inputs = [s for s in specs if s.role == "input" and s.kind == "numeric" and s.floating]
        labels = [s for s in specs if s.role == "target" and s.kind == "labels"]
        if len(inputs) >= 1 and len(labels) == 1:
            x, y = self.selector.get(batch, inputs[0].field), self.selector.get(batch, labels[0].field)
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and y.dim() == 1:
                signal.update(x, y)

    def _check_labels_unrelated(self, trainer: Any, pl_module: Any, signal: NeighbourLabelAgreement,
                                device: torch.device) -> None:
        """``labels_unrelated``: the scanned labels agree with their nearest neighbours' no more than by chance.

        One SUM all-reduce of four numbers under DDP (every rank scanned the agreed number of train batches).
        """
        sums = signal.sums().to(device)
        all_reduce_flat(sums, None)
        found = NeighbourLabelAgreement.score(sums.cpu())
        self.checks["labels_unrelated"].judge_score(self._context(trainer, pl_module, "train", 0, {}), found)

    def _agree_counts(self, counts: List[int], device: torch.device) -> List[int]:
        """The smallest of each count over the ranks (two MAX all-reduces under DDP: the number of counts,
        then the negated counts; a rank with fewer splits counts 0 for the missing ones)."""
        if not distributed_ready():
            return counts
        size = torch.tensor([float(len(counts))], dtype=_F64, device=device)
        n = int(agree_max(size).item())
        buf = torch.zeros(n, dtype=_F64)
        buf[:len(counts)] = -torch.tensor([float(c) for c in counts], dtype=_F64)
        agreed = agree_max(buf.to(device)).tolist()
        return [int(-v) for v in agreed[:len(counts)]]

    def _scan_key(self, rule: str, subject: Optional[str]) -> str:
        """``rule|subject`` as the scan and the streaming checks compare it.

        A drift alert names the most drifted feature of a field, which depends on the sample; the finding is
        that the field drifted, so drift subjects are compared per field (``val/x.3`` -> ``val/x``).
        """
        if rule in ("data_drift", "data_drift_ref") and subject and "/" in subject:
            split, rest = subject.split("/", 1)
            sp = self._splits.get(split)
            for name in sorted((s.name for s in (sp.specs or [])) if sp is not None else [], key=len, reverse=True):
                if rest == name or rest.startswith(name + "."):
                    subject = f"{split}/{name}"
                    break
        return f"{rule}|{subject or ''}"

    def _enter_scan(self) -> Dict[str, Any]:
        """Put the monitor on separate state for the scan; returns what :meth:`_leave_scan` puts back."""
        saved = {name: getattr(self, name) for name in SCAN_ISOLATED}
        saved["cooldown"] = self.cooldown.state_dict()
        self._splits = {}
        self._edges = dict(self._edges)
        self._schemas = {k: Schema(v.dtype, list(v.dims), v.frozen, v.source) for k, v in self._schemas.items()}
        self._layout = dict(self._layout)
        self._classes, self._class_source = dict(self._classes), dict(self._class_source)
        self._label_max, self._ranges = dict(self._label_max), dict(self._ranges)
        self._restored_ranges = dict(self._restored_ranges)
        self._profile = DataProfile()
        self._train_hashes_last = torch.zeros(0, dtype=torch.int64)
        self._reported = set(self._reported)
        self._scale_probe, self._scale_checked = None, False
        return saved

    def _leave_scan(self, saved: Dict[str, Any]) -> None:
        self._scan = None
        # the cooldown too: a later alert that is louder than the scan's is recorded, not held back
        self.cooldown.load_state_dict(saved.pop("cooldown"))
        for name, value in saved.items():
            setattr(self, name, value)
