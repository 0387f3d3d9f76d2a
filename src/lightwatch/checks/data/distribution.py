"""The distribution tier of the data monitor, and the data profile it keeps.

Per split, per-feature moments and fixed-edge histograms, label counts and 64-bit sample hashes are folded
over each epoch and reduced once at its end (one MAX, one SUM, one all-gather of hashes). The split's snapshot
is then judged by the epoch checks: drift of evaluation splits against the training split (``drift``) and of
any split against the reference (``drift_ref``), label shift (``label_shift``, ``label_shift_ref``),
constant features (``constant``), duplicates (``duplicates``), train-to-eval leakage (``leakage``) and class
imbalance (``class_imbalance``); the snapshot becomes the split's entry of the run's profile.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from lightwatch.checks.data.buffers import SplitState
from lightwatch.checks.data.fields import FieldSpec
from lightwatch.checks.data.label_shift import LabelShift
from lightwatch.core.histogram import HistogramData
from lightwatch.core.reduce import all_reduce_flat
from lightwatch.core.runtime import distributed_ready, is_global_zero, logging_step, run_dir
from lightwatch.metrics import Histogram, LabelCounts, Moments, SampleHasher, load_packed, pack_max, pack_sum
from lightwatch.profile import FieldProfile, SplitProfile, dtype_name

__all__ = ["PROFILE_NAME", "DistributionTier", "copy_stat", "trimmed"]

_F64 = torch.float64
#: File name of the profile in the run directory (``profile_path="auto"``).
PROFILE_NAME = "data_profile.json"


def copy_stat(stat: Any) -> Any:
    """A host copy of a statistic (through its JSON-safe state, so it is exactly what a profile holds).

    Example:
        >>> import torch
        >>> m = Moments(num_features=1)
        >>> m.update(torch.tensor([[1.0], [3.0]]))
        >>> copy_stat(m).compute()["mean"].tolist()
        [2.0]
    """
    if isinstance(stat, Moments):
        return Moments.from_state_dict(stat.state_dict())
    if isinstance(stat, Histogram):
        return Histogram.from_state_dict(stat.state_dict())
    return LabelCounts.from_state_dict(stat.state_dict())


def trimmed(tally: LabelCounts, classes: Optional[int]) -> LabelCounts:
    """A host copy of label counts over ``classes`` classes; labels beyond them count as out of range.

    Example:
        >>> import torch
        >>> tally = LabelCounts(4)
        >>> tally.update(torch.tensor([0, 1, 3]))
        >>> trimmed(tally, 2).counts.tolist()
        [1, 1]
    """
    state = tally.state_dict()
    if classes is not None and classes < tally.num_classes:
        counts = state["counts"]
        state.update(num_classes=classes, counts=counts[:classes],
                     out_of_range=state["out_of_range"] + sum(counts[classes:]))
    return LabelCounts.from_state_dict(state)


class DistributionTier:
    """The part of :class:`~lightwatch.callbacks.DataQualityMonitor` that reduces and judges each split's epoch.

    It works on the splits' statistics (``acc``: since the last reduction, ``glob``: the epoch so far) and
    hashes, the monitor's profile (``_profile``) and reference, and the epoch checks in its ``checks``.

    Example:
        >>> from lightwatch.checks.data.buffers import SplitState
        >>> class Probe(DistributionTier):
        ...     distribution = False
        >>> Probe()._stat_list(SplitState("train", "step"))
        []
    """

    def _stat_list(self, sp: SplitState) -> List[Any]:
        return [sp.acc[k] for k in sorted(sp.acc)] if self.distribution else []

    def _epoch_end(self, trainer: Any, pl_module: Any, sp: SplitState) -> None:
        """One MAX, one SUM and one all-gather: counters, statistics (and the training split's increments
        when an evaluation split ends) and sample hashes; then the checks of the distribution tier."""
        step = logging_step(trainer)
        train = self._splits.get("train")
        stat_splits = [sp]
        if sp.name != "train" and train is not None and train.specs is not None:
            stat_splits.append(train)  # the training split so far, to compare against
        for s in stat_splits:
            self._fold(s)
        stats = [st for s in stat_splits for st in self._stat_list(s)]
        hash_splits = [s for s in stat_splits if self.duplicates]
        device = sp.device or torch.device("cpu")

        counter_sum, counter_max, meta = self._counter_buffers(sp)
        local = torch.tensor([float(getattr(s, k)) for k in ("epoch_samples", "epoch_batches") for s in stat_splits],
                             dtype=_F64)
        rows = torch.tensor([float(s.hasher.num_rows) for s in hash_splits], dtype=_F64)
        max_stats = pack_max(stats) if stats else torch.zeros(0, dtype=_F64, device=device)
        max_buf = torch.cat([max_stats.to(device), rows.to(device), counter_max])
        all_reduce_flat(None, max_buf)
        n_max_stats = max_stats.numel()
        sum_stats = pack_sum(stats, max_buf[:n_max_stats]) if stats else torch.zeros(0, dtype=_F64, device=device)
        sum_buf = torch.cat([sum_stats.to(device), local.to(device), counter_sum])
        all_reduce_flat(sum_buf, None)
        if stats:
            load_packed(stats, sum_buf[:sum_stats.numel()], max_buf[:n_max_stats])
        for s in stat_splits:
            for key, stat in s.acc.items():
                s.glob[key].merge(stat)
                stat.reset()
        host_sum = sum_buf[sum_stats.numel():].tolist()
        host_max = max_buf[n_max_stats:].tolist()
        n = len(stat_splits)
        for j, s in enumerate(stat_splits):
            s.glob_samples += int(round(host_sum[j]))
            s.glob_batches += int(round(host_sum[n + j]))
            s.epoch_samples = s.epoch_batches = 0
        if hash_splits:
            self._gather_hashes(hash_splits, [int(r) for r in host_max[:len(hash_splits)]], device)
        scalars: Dict[str, float] = {}
        self._reset_counters(sp)
        if sp.name == "train":
            self._published_step = step
        self._publish_counters(trainer, pl_module, sp, host_sum[2 * n:], host_max[len(hash_splits):], meta, step,
                               scalars)
        self._distribution_checks(trainer, pl_module, sp, step, scalars)
        if sp.driven:
            self._judge_custom(trainer, pl_module, sp, ("batch", "epoch"), step, scalars)
        if self._scan is None:  # the scan reports through alerts only: its curves would mix with training's
            self.writer.write_scalars(trainer, scalars, step)
            self._save_profile(trainer)

    def _gather_hashes(self, splits: List[SplitState], rows: List[int], device: torch.device) -> None:
        """Every rank's new sample hashes, in one all-gather (the row counts were agreed by the MAX)."""
        local = torch.cat([s.hasher.gather_state(pad_to=r) for s, r in zip(splits, rows)]).to(device)
        if distributed_ready():
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
        else:
            parts = [local]
        offset = 0
        for s, r in zip(splits, rows):
            got = SampleHasher(seed=s.hasher.seed)
            got.load_gathered([p[offset:offset + r] for p in parts])
            s.seen.merge(got)
            s.hasher.reset()
            offset += r

    def _snapshot(self, sp: SplitState, step: int, epoch: int) -> SplitProfile:
        """The reduced statistics of a split so far, as host copies (what a profile holds)."""
        fields: Dict[str, FieldProfile] = {}
        for s in sp.specs or []:
            schema = self._schemas.get(s.name)
            dtype = dtype_name(schema.dtype) if schema else "float32"
            shape = list(schema.dims) if schema else []
            if s.kind == "labels":
                tally = sp.glob.get(s.name)
                classes = self._classes.get(s.name)
                if classes is None and tally is not None:
                    nz = torch.nonzero(tally.counts).reshape(-1)
                    classes = int(nz.max()) + 1 if nz.numel() else None
                fields[s.name] = FieldProfile(s.name, s.role, "labels", dtype, shape, None, 1,
                                              labels=trimmed(tally, classes) if tally is not None else None,
                                              num_classes=classes)
            else:
                m, h = sp.glob.get(s.name), sp.glob.get(s.name + "\0hist")
                fields[s.name] = FieldProfile(s.name, s.role, "numeric", dtype, shape, s.feature_dim, s.num_features,
                                              s.names, copy_stat(m) if m is not None else None,
                                              copy_stat(h) if h is not None else None)
        duplicates = None
        if self.duplicates:
            d = sp.seen.compute()
            duplicates = {k: d[k] for k in ("samples", "unique", "duplicates", "duplicate_fraction")}
        hashes = None
        if self.duplicates and self.save_hashes:
            hashes = SampleHasher(seed=sp.seen.seed)
            hashes.merge(sp.seen)
        return SplitProfile(sp.name, sp.glob_samples, sp.glob_batches, epoch, step, fields, duplicates, None, hashes)

    def _distribution_checks(self, trainer: Any, pl_module: Any, sp: SplitState, step: int,
                             scalars: Dict[str, float]) -> None:
        epoch = int(getattr(trainer, "current_epoch", 0))
        cur = self._snapshot(sp, step, epoch)
        tag = self.writer.tag
        name = sp.name
        scalars[tag("data", f"{name}/_all", "samples")] = float(sp.glob_samples)
        ctx = self._context(trainer, pl_module, name, step, scalars)
        train_ref: Optional[SplitProfile] = None
        if name == "train":
            if not self._learned:
                self._learn(cur)
        else:
            current_train = self._splits.get("train")
            candidates = [p for p in (self._profile.splits.get("train"),) if p is not None]
            if current_train is not None and current_train.specs is not None and current_train.glob_samples:
                candidates.append(self._snapshot(current_train, step, epoch))
            if candidates:
                train_ref = max(candidates, key=lambda p: p.samples)
        ref = self.reference.split(name, fallback=("train",)) if self.reference is not None else None
        if cur.duplicates is not None:
            d = cur.duplicates
            scalars[tag("data", f"{name}/_all", "dup_frac")] = float(d["duplicate_fraction"])
            scalars[tag("data", f"{name}/_all", "dup_count")] = float(d["duplicates"])
            self.checks["duplicates"].judge_split(ctx, d)
        if self.duplicates and name != "train":
            self._check_leakage(ctx, sp, cur)
        biased = self._scan is not None and (name in self._scan.partial or (
            name != "train" and "train" in self._scan.partial))
        if self.distribution and not biased:
            for s in sp.specs or []:
                fp = cur.fields.get(s.name)
                if fp is None:
                    continue
                if s.kind == "labels":
                    self._label_checks(trainer, ctx, s, fp, train_ref, ref)
                else:
                    self._numeric_checks(ctx, s, fp, cur, train_ref, ref)
        if name == "train":
            # an epoch cut short (a stop, max_steps) does not replace a complete one as the saved profile
            expected = getattr(trainer, "num_training_batches", math.inf)
            complete = not (isinstance(expected, int) and sp.batches_in_epoch < expected)
            if not complete and "train" in self._profile.splits:
                return
            if self.duplicates:
                self._train_hashes_last = sp.seen.hashes(unique_ids=False).clone()
        self._profile.splits[name] = cur

    def _check_leakage(self, ctx: Any, sp: SplitState, cur: SplitProfile) -> None:
        """``leakage``: the split's sample hashes against this run's (and the reference's) training hashes."""
        train = self._splits.get("train")
        pool = [self._train_hashes_last]
        if train is not None:
            pool.append(train.seen.hashes(unique_ids=False))
        references = torch.cat(pool)
        source = "this run's training split"
        if self.reference is not None:
            ref_train = self.reference.splits.get("train")
            if ref_train is not None and ref_train.hashes is not None and ref_train.hashes.seed == sp.seen.seed:
                references = torch.cat([references, ref_train.hashes.hashes(unique_ids=False)])
                source += " and the reference's training split"
        if references.numel() == 0:
            return
        mine = sp.seen.hashes()
        count, fraction = self.checks["leakage"].measure(mine, references)
        cur.leakage = {"reference_split": "train", "count": count, "fraction": fraction}
        ctx.scalar(f"{sp.name}/_all", "leak_frac", fraction)
        ctx.scalar(f"{sp.name}/_all", "leak_count", float(count))
        self.checks["leakage"].judge_split(ctx, count, mine.numel(), fraction, source)

    def _numeric_checks(self, ctx: Any, s: FieldSpec, fp: FieldProfile, cur: SplitProfile,
                        train_ref: Optional[SplitProfile], ref: Optional[SplitProfile]) -> None:
        """Drift (against the training split and the reference), constant features, and the field's scalars."""
        tag = self.writer.tag
        name = ctx.split
        scalars = ctx.scalars
        scores: Dict[str, List[float]] = {}
        comparisons = []
        if train_ref is not None and train_ref.fields.get(s.name) is not None:
            comparisons.append(("drift", train_ref, train_ref.fields[s.name], "this run's training split"))
        if ref is not None and ref.fields.get(s.name) is not None:
            comparisons.append(("drift_ref", ref, ref.fields[s.name], f"the reference profile's {ref.name!r} split"))
        for check_name, other, ofp, what in comparisons:
            check = self.checks[check_name]
            res = check.measure(fp, ofp, cur.samples, other.samples)
            if res is None:
                continue
            p, d = res[0], res[1]
            scores["psi" + check.suffix], scores["ks" + check.suffix] = p, d
            scalars[tag("data", f"{name}/{s.name}", "psi" + check.suffix)] = max(p)
            scalars[tag("data", f"{name}/{s.name}", "ks" + check.suffix)] = max(d)
            check.judge_field(ctx, s, res, cur.samples, other.samples, what)
        # constant features: reported as a count; alerted when the reference says they should vary
        m = fp.moments.compute() if fp.moments is not None else None
        if m is not None:
            constant = self.checks["constant"].constant_features(m, s.num_features)
            scalars[tag("data", f"{name}/{s.name}", "constant")] = float(len(constant))
            base = comparisons[-1] if comparisons else None
            if constant and base is not None:
                self.checks["constant"].judge_field(ctx, s, constant, cur, base[2], base[3])
            means, stds = m["mean"].tolist(), m["std"].tolist()
            order = list(range(s.num_features))
            key = "psi_ref" if "psi_ref" in scores else "psi" if "psi" in scores else None
            if key is not None:
                order.sort(key=lambda j: -scores[key][j] if math.isfinite(scores[key][j]) else 0.0)
            for j in order[: self.top_k]:
                subject = f"{name}/{s.label(j)}"
                if s.num_features > 1 or s.names:
                    for stat, vals in scores.items():
                        scalars[tag("data", subject, stat)] = vals[j]
                scalars[tag("data", subject, "mean")] = means[j]
                scalars[tag("data", subject, "std")] = stds[j]

    def _label_checks(self, trainer: Any, ctx: Any, s: FieldSpec, fp: FieldProfile, train_ref: Optional[SplitProfile],
                      ref: Optional[SplitProfile]) -> None:
        """Label shift (against the training split and the reference), class imbalance, and the label scalars."""
        tag = self.writer.tag
        name, step = ctx.split, ctx.step
        scalars = ctx.scalars
        tally = fp.labels
        if tally is None:
            return
        per_sample = self._per_sample_labels(s)
        classes = self._classes.get(s.name) or fp.num_classes or 0
        if classes > tally.num_classes or classes == 0:
            return
        counts = tally.counts[:classes].to(torch.float64)
        total = float(counts.sum())
        if total <= 0:
            return
        scalars[tag("data", f"{name}/{s.name}", "classes")] = float(int((counts > 0).sum()))
        freq = counts / total
        if classes >= 2:
            scalars[tag("data", f"{name}/{s.name}", "imbalance")] = float(freq.min()) * classes
        self._write_label_histogram(trainer, f"{name}/{s.name}", counts.tolist(), step)
        comparisons = []
        if train_ref is not None and train_ref.fields.get(s.name) is not None:
            comparisons.append(("label_shift", train_ref.fields[s.name], "this run's training split"))
        if ref is not None and ref.fields.get(s.name) is not None:
            comparisons.append(("label_shift_ref", ref.fields[s.name], f"the reference profile's {ref.name!r} split"))
        for check_name, ofp, what in comparisons:
            check = self.checks[check_name]
            pair = check.counts_against(counts, classes, ofp)
            if pair is None:
                continue
            compared = LabelShift.compare(*pair)
            scalars[tag("data", f"{name}/{s.name}", "label_shift" + check.suffix)] = compared[0]
            if per_sample:
                check.judge_field(ctx, s, compared, what)
        if name == "train" and classes >= 2 and per_sample and ("imbalance", s.name) not in self._reported:
            self._reported.add(("imbalance", s.name))
            self.checks["class_imbalance"].judge_field(ctx, s, counts, total, classes,
                                                       self._class_source.get(s.name, "inferred"))

    def _write_label_histogram(self, trainer: Any, subject: str, counts: List[float], step: int) -> None:
        n = len(counts)
        total = sum(counts)
        if n == 0 or total <= 0 or self._scan is not None:
            return
        sum_v = sum(c * i for i, c in enumerate(counts))
        sum_sq = sum(c * i * i for i, c in enumerate(counts))
        data = HistogramData(0.0, float(n - 1), total, sum_v, sum_sq, 0.0, [i + 0.5 for i in range(n)], counts)
        self.writer.write_histograms(trainer, {self.writer.tag("data_hist", subject): data}, step)

    def _profile_file(self, trainer: Any) -> Optional[str]:
        if self.profile_path is None:
            return None
        if self.profile_path == "auto":
            return os.path.join(run_dir(trainer), PROFILE_NAME)
        return self.profile_path

    def _save_profile(self, trainer: Any) -> None:
        path = self._profile_file(trainer)
        if path is None or not self._profile.splits or not is_global_zero(trainer):
            return
        self._profile.save(path, with_hashes=self.save_hashes)
