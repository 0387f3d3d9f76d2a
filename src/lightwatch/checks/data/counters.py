"""The per-batch tier of the data monitor: each batch copied into a buffer, checked and counted on the device.

The hook takes one batch: host-side checks (schema, emptiness) and a copy of each field. At the next logged
step, the end of an evaluation epoch, or when the buffer is full, the buffered batches are folded on the device:
non-finite values and values outside the ranges per feature, labels outside the class range, each with the
first marker (step) at which it occurred, and the distribution statistics and sample hashes. The counters are
reduced with one SUM and one MAX all-reduce per logged step, read with one device-to-host copy, and judged by
the per-batch checks (``nonfinite``, ``label_range``, ``out_of_range``, ``schema``, ``empty_batch``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from lightwatch.checks.data.buffers import BUFFER_BYTES, Pending, SplitState, SteadyBatch
from lightwatch.checks.data.fields import FieldSpec, feature_matrix
from lightwatch.core.readback import HostReadback
from lightwatch.core.reduce import agree_max, all_reduce_flat
from lightwatch.metrics.base import may_read_values
from lightwatch.metrics.hashing import hash_rows

__all__ = ["BatchCounters", "FOLD_BLOCK_VALUES", "HIST_VALUES_PER_SAMPLE"]

_F64 = torch.float64
_NEG_INF = float("-inf")
#: A field's histogram counts all samples up to this many values a sample (features x values per feature),
#: a content-chosen share of them above (see ``BatchCounters._histogram_rows``).
HIST_VALUES_PER_SAMPLE = 64
# The distribution statistics read a field's buffered values in blocks of at most this many (2 MiB as float64),
# so their float64 copy and temporaries stay small whatever the buffer holds.
FOLD_BLOCK_VALUES = 1 << 18
_HIST_SEED = 0x5EED
#: Whether batches of the last clean batch's layout take the short path (:class:`SteadyBatch`); switched off
#: only to measure what it saves (``bench/data_quality.py``'s ``full-no-short-path``).
SHORT_PATH = True


class BatchCounters:
    """The part of :class:`~lightwatch.callbacks.DataQualityMonitor` that runs the per-batch tier.

    It works on the splits' :class:`~lightwatch.checks.data.buffers.SplitState` and the monitor's ranges and
    class counts, and reports through the per-batch checks in the monitor's ``checks``.

    Example:
        >>> import torch
        >>> from lightwatch.checks.data.buffers import Pending
        >>> BatchCounters._row_markers([Pending([None], 3, 2, None), Pending([None], 4, 1, None)],
        ...                            torch.device("cpu")).tolist()
        [3.0, 3.0, 4.0]
    """

    def _observe(self, trainer: Any, pl_module: Any, sp: SplitState, batch: Any, marker: int) -> None:
        """Take one batch: host-side checks (schema, emptiness), then a copy of each field into the buffer."""
        if sp.specs is None:
            self._setup_split(trainer, sp, batch)
        assert sp.specs is not None
        tensors = [self.selector.get(batch, s.field) for s in sp.specs]
        if not tensors:
            return
        steady = sp.steady
        if steady is not None and SHORT_PATH and steady.matches(tensors, self._schemas) and \
                sp.buffer.add_steady(tensors, marker, steady.rows, steady.nbytes):
            n = steady.rows
            sp.batches += 1
            sp.epoch_batches += 1
            sp.batches_in_epoch += 1
            sp.pending = True
            sp.rows_seen += n
            sp.samples += n
            sp.epoch_samples += n
            values = sp.values
            for i, count in enumerate(steady.values):
                values[i] += count
            if sp.buffer.nbytes >= BUFFER_BYTES:
                self._fold(sp)
            return
        sp.steady = None
        n = int(tensors[0].shape[0])
        sp.batches += 1
        sp.epoch_batches += 1
        sp.batches_in_epoch += 1
        sp.pending = True  # set on every rank alike: it decides whether a reduction is due
        if n == 0:
            sp.empty += 1
            sp.first_empty = max(sp.first_empty, -float(marker))
            return
        # DistributedSampler pads every rank to the same length with repeated samples: they are not data.
        keep = n if sp.row_limit is None else max(0, min(n, sp.row_limit - sp.rows_seen))
        sp.rows_seen += n
        if keep == 0:
            return
        sp.samples += keep
        sp.epoch_samples += keep
        parts: List[Optional[torch.Tensor]] = []
        loose: Dict[int, torch.Tensor] = {}
        errors_before = sp.schema_errors
        for i, (s, t) in enumerate(zip(sp.specs, tensors)):
            usable, is_loose = self._check_schema(sp, s, t, marker)
            if not usable or t.dim() == 0 or t.shape[0] != n:
                parts.append(None)
                continue
            t = t.detach()
            if is_loose:
                parts.append(None)
                if s.floating:
                    loose[i] = t[:keep] if keep < n else t
                continue
            parts.append(t[:keep] if keep < n else t)
            sp.values[i] += parts[-1].numel()
        if sp.driven:
            self._update_custom(sp, parts)
        ids = None
        if self.duplicates and sp.sample_ids is not None:
            ids = self.selector.get(batch, sp.sample_ids).detach().reshape(-1)[:keep]
        if not sp.buffer.fits(parts):  # variable sample shapes cannot be concatenated: fold what is there
            self._fold(sp)
        size = sum(p.numel() * p.element_size() for p in parts if p is not None)
        direct = not sp.buffer.batches and (size >= BUFFER_BYTES or bool(self._immediate_checks))
        if not direct:  # kept past this hook: copy, since training code may change the batch in place
            ids = None if ids is None else ids.clone()
            loose = {i: v.clone() for i, v in loose.items()}
        pending = Pending(parts, marker, keep, ids, loose)
        sp.buffer.add(pending, copy=not direct)
        if (not direct and keep == n and ids is None and not loose and sp.row_limit is None and not sp.driven
                and sp.schema_errors == errors_before and len(pending.staged) == len(parts)
                and not any(t.requires_grad for t in tensors)):
            sp.steady = SteadyBatch(tensors, self._schemas)  # the next batch of this layout takes the short path
        if direct or sp.buffer.nbytes >= BUFFER_BYTES:
            self._fold(sp)

    def _fold(self, sp: SplitState) -> None:
        """Check and count the buffered batches on the device: no host sync, no collective.

        Per field: non-finite values and values outside the ranges (per feature), labels outside the class
        range, each with the first marker (step) at which it occurred, taken from per-row markers; then the
        distribution statistics and the sample hashes.
        """
        buf = sp.buffer
        if not buf.batches or sp.specs is None or sp.counts is None or sp.first is None:
            buf.clear()
            return
        device = sp.counts.device
        counts: List[torch.Tensor] = []
        firsts: List[torch.Tensor] = []
        label_maxes: List[torch.Tensor] = []
        all_markers: Optional[torch.Tensor] = None
        for i, s in enumerate(sp.specs):
            if s.loose_slot:
                loose = [b for b in buf.batches if i in b.loose]
                if loose:
                    flags = [torch.isfinite(b.loose[i]).logical_not_().reshape(b.loose[i].shape[0], -1).any(1)
                             for b in loose]
                    rows = torch.cat(flags)
                    marks = torch.tensor([float(b.marker) for b, f in zip(loose, flags) for _ in range(f.shape[0])],
                                         dtype=_F64).to(device)
                    loose_count = sum(torch.isfinite(b.loose[i]).logical_not_().sum() for b in loose).reshape(1)
                    loose_first = torch.where(rows, marks, math.inf).amin().reshape(1)
                else:
                    loose_count = torch.zeros(1, dtype=torch.int64, device=device)
                    loose_first = torch.full((1,), math.inf, dtype=_F64, device=device)
            batches = [b for b in buf.batches if b.parts[i] is not None]
            if not batches:
                counts.append(torch.zeros(s.width, dtype=torch.int64, device=device))
                firsts.append(torch.full((s.width,), math.inf, dtype=_F64, device=device))
                if s.loose_slot:
                    counts[-1][-1:] = loose_count
                    firsts[-1][-1:] = loose_first
                continue
            x = buf.joined(i, batches)
            if len(batches) < len(buf.batches):  # a field missing from some batches: markers of its own
                row_markers_of = self._row_markers(batches, device)
            else:  # every field holding every batch (the usual case) shares one marker vector
                if all_markers is None:
                    all_markers = self._row_markers(batches, device)
                row_markers_of = all_markers
            markers = row_markers_of.reshape((-1,) + (1,) * (x.dim() - 1))
            if s.kind == "labels":
                bad = x < 0
                if self.ignore_index is not None:
                    bad &= x != self.ignore_index
                classes = self._classes_for(sp, s.name)
                if classes is not None:
                    bad |= x >= classes
                counts.append(bad.sum().reshape(1))
                firsts.append(torch.where(bad, markers, math.inf).amin().reshape(1))
                valid = x if self.ignore_index is None or self.ignore_index < 0 else \
                    torch.where(x == self.ignore_index, torch.full_like(x, -1), x)
                label_maxes.append(valid.amax().to(_F64))
            else:
                for bad in self._numeric_flags(s, x):
                    if bad is None:
                        counts.append(s.zeros)
                        firsts.append(torch.full((s.num_features,), math.inf, dtype=_F64, device=device))
                        continue
                    counts.append(bad.sum(dim=s.sum_dims) if s.sum_dims is not None else bad.sum().reshape(1))
                    rows = self._rows_by_feature(bad, s)  # [rows, F]: which samples hold a bad value
                    firsts.append(torch.where(rows, markers.reshape(-1, 1), math.inf).amin(0))
                if s.loose_slot:
                    counts.append(loose_count)
                    firsts.append(loose_first)
            if self.distribution:
                if s.kind == "labels":
                    sp.acc[s.name].update(x)
                else:
                    sample = feature_matrix(x, s.feature_dim, self.max_values_per_sample)
                    chosen = self._histogram_rows(x, sample)
                    # in blocks of rows: the float64 copy and the statistics' temporaries of a whole 8 MiB
                    # buffer took 25-30 MB at the fold's peak on a 4,096-feature input; a block takes ~2 MB
                    rows = max(1, FOLD_BLOCK_VALUES // max(sample.shape[1], 1))
                    for start in range(0, sample.shape[0], rows):
                        block = sample[start:start + rows].to(_F64)
                        sp.acc[s.name].update(block)
                        sp.acc[s.name + "\0hist"].update(
                            block, rows=None if chosen is None else chosen[start:start + rows])
        vec = torch.cat(counts)
        sp.counts.add_(vec)
        torch.maximum(sp.first, torch.cat(firsts).neg(), out=sp.first)
        if label_maxes and sp.label_max is not None:
            torch.maximum(sp.label_max, torch.stack(label_maxes), out=sp.label_max)
        if sp.immediate is not None:
            self._immediate_flag = (vec * sp.immediate).sum()
        if self.duplicates:
            inputs = [i for i, s in enumerate(sp.specs) if s.role == "input"]
            hashed = [b for b in buf.batches if inputs and all(b.parts[i] is not None for i in inputs)]
            if hashed:
                fields = [buf.joined(i, hashed) for i in inputs]
                ids = None
                if all(b.ids is not None for b in hashed):
                    ids = torch.cat([b.ids for b in hashed])  # type: ignore[misc]
                sp.hasher.update(fields, sample_ids=ids)
        buf.clear()

    @staticmethod
    def _histogram_rows(x: torch.Tensor, sample: torch.Tensor) -> Optional[torch.Tensor]:
        """The rows of a field's feature matrix its histogram counts: all of them, or for a wide field (more
        than ``HIST_VALUES_PER_SAMPLE`` values a sample) the samples whose content hash falls in one of ``k``
        classes, ``k = ceil(values / HIST_VALUES_PER_SAMPLE)``.

        Counting a histogram costs a comparison per edge and value, about 10 ns a value on the CPU: on a
        deep MLP with 256 input features it was 70% of the data monitor's work. The moments (ranges, mean,
        variance) still see every value, and the drift thresholds take the samples counted
        (:func:`~lightwatch.checks.data.drift.counted_share`). A content hash picks the samples, so the choice
        does not depend on batching, ranks or order.
        """
        n = x.shape[0]
        per_sample = sample.shape[0] // max(n, 1)
        k = -(-per_sample * sample.shape[1] // HIST_VALUES_PER_SAMPLE)
        if k <= 1 or n == 0:
            return None
        values = sample.reshape(n, -1)  # the values the distribution tier reads: fewer than the sample's on images
        chosen = hash_rows(values if values.numel() < x.numel() else x, seed=_HIST_SEED).remainder(k) == 0
        return chosen.unsqueeze(1).expand(n, per_sample).reshape(-1)

    def _numeric_flags(self, s: FieldSpec, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Element-wise masks of non-finite values and of values outside the field's ranges (``None``: none).

        On the CPU a host read waits for nothing, so a clean chunk (the usual case) is shown clean by a sum
        and a per-feature min and max, and only a chunk that holds a flagged value pays for the element-wise
        masks (each a pass over the chunk and an allocation of its size). On an accelerator the masks are
        always built: branching on the data there would be a host sync.
        """
        rng = self._ranges.get(s.name)
        if x.numel() == 0:
            return None, None
        if may_read_values(x) and x.dtype != torch.bool:
            # A finite sum means every value is finite; an overflowing sum only sends the chunk the long way.
            total = (x.sum(dtype=torch.float32) if x.element_size() < 4 else x.sum()) if s.floating else None
            if total is None or bool(torch.isfinite(total)):
                if rng is None:
                    return None, None
                dims = s.sum_dims if s.sum_dims is not None else tuple(range(x.dim()))
                if bool((x.amin(dim=dims, keepdim=True) >= rng.lo).all()) and \
                        bool((x.amax(dim=dims, keepdim=True) <= rng.hi).all()):
                    return None, None
                return None, (x < rng.lo) | (x > rng.hi)
        nonfinite = torch.isfinite(x).logical_not_() if s.floating else None
        outside = ((x < rng.lo) | (x > rng.hi)) if rng is not None else None
        return nonfinite, outside

    @staticmethod
    def _rows_by_feature(bad: torch.Tensor, s: FieldSpec) -> torch.Tensor:
        """``[rows, F]``: whether each sample has a flagged value in each feature (one reduction, no copy)."""
        if s.feature_dim is None:
            return bad.reshape(bad.shape[0], -1).any(1, keepdim=True)
        dims = tuple(d for d in range(1, bad.dim()) if d != s.feature_dim)
        return bad.any(dim=dims) if dims else bad

    @staticmethod
    def _row_markers(batches: List[Pending], device: torch.device) -> torch.Tensor:
        """The marker of every buffered row, as float64 on ``device`` (one host-to-device copy)."""
        # one value per batch, repeated: a Python list of every row's marker took ~0.1 ms per field and fold
        host = torch.tensor([float(b.marker) for b in batches], dtype=_F64).repeat_interleave(
            torch.tensor([b.rows for b in batches]))
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)

    def _immediate_triggered(self, sp: SplitState) -> bool:
        """Every step, when a per-batch check acts on the batch itself: one host read (and one MAX)."""
        device = sp.device or torch.device("cpu")
        host = float(("schema" in self._immediate_checks and sp.schema_errors > 0)
                     or ("empty_batch" in self._immediate_checks and sp.empty > 0))
        flag = torch.zeros(1, dtype=_F64, device=device) + host
        if self._immediate_flag is not None:
            flag += self._immediate_flag
        agree_max(flag)
        return float(flag.item()) > 0  # the one documented per-step sync of immediate actions

    def _host_parts(self, sp: SplitState) -> Tuple[List[float], List[float]]:
        sums = [float(sp.batches), float(sp.samples), float(sp.empty), float(sp.schema_errors)]
        sums += [float(v) for v in sp.values]
        return sums, [sp.first_empty, sp.first_schema]

    def _counter_buffers(self, sp: SplitState) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
        assert sp.counts is not None and sp.first is not None and sp.label_max is not None
        device = sp.counts.device
        host_sum, host_max = self._host_parts(sp)
        pinned = device.type == "cuda"
        host = torch.tensor(host_sum + host_max, dtype=_F64, pin_memory=pinned).to(device, non_blocking=True)
        sum_buf = torch.cat([sp.counts.to(_F64), host[:len(host_sum)]])
        max_buf = torch.cat([sp.first, sp.label_max, host[len(host_sum):]])
        classes = {s.name: self._classes_for(sp, s.name) for s in sp.specs or [] if s.kind == "labels"}
        meta = {"split": sp.name, "notes": dict(sp.schema_notes),
                "ranges": {s.name: self._ranges[s.name] for s in sp.specs or [] if s.name in self._ranges},
                "classes": classes, "sum_size": sum_buf.numel()}
        return sum_buf, max_buf, meta

    def _reset_counters(self, sp: SplitState) -> None:
        assert sp.counts is not None and sp.first is not None
        sp.counts.zero_()
        sp.first.fill_(_NEG_INF)
        sp.reset_host_counters()

    def _flush_step(self, trainer: Any, pl_module: Any, sp: SplitState, step: int, synchronous: bool = False) -> None:
        """Reduce the per-batch counters (one SUM and one MAX) and read them back (one copy)."""
        if sp.name == "train":
            self._published_step = step
        self._fold(sp)  # a logged step: the buffered batches' statistics are brought up to date too
        sum_buf, max_buf, meta = self._counter_buffers(sp)
        all_reduce_flat(sum_buf, max_buf)
        meta["step"] = step
        self._reset_counters(sp)
        self._readback.submit(torch.cat([sum_buf, max_buf]), meta)
        if synchronous or not HostReadback.deferred(sum_buf):
            self._publish_pending(trainer, pl_module)
        if sp.driven:
            self._judge_custom(trainer, pl_module, sp, ("batch",), step, None)

    def _publish_pending(self, trainer: Any, pl_module: Any) -> None:
        for values, meta in self._readback.collect():
            sp = self._splits[meta["split"]]
            self._publish_counters(trainer, pl_module, sp, values[:meta["sum_size"]], values[meta["sum_size"]:],
                                   meta, meta["step"])

    def _publish_counters(self, trainer: Any, pl_module: Any, sp: SplitState, sums: List[float], maxes: List[float],
                          meta: Dict[str, Any], step: int, scalars: Optional[Dict[str, float]] = None) -> None:
        """Tags and alerts of the per-batch tier from reduced counters (identical on every rank)."""
        assert sp.specs is not None
        k = sum(s.width for s in sp.specs)
        counts, host = sums[:k], sums[k:]
        first, n_labels = maxes[:k], sum(1 for s in sp.specs if s.kind == "labels")
        label_max, host_first = maxes[k:k + n_labels], maxes[k + n_labels:]
        batches, samples, empty, schema_errors = host[:4]
        values = host[4:]
        own = scalars is None
        scalars = {} if scalars is None else scalars
        tag = self.writer.tag
        split = sp.name
        evaluation = sp.marker_word == "batch"
        ctx = self._context(trainer, pl_module, split, step, scalars)
        li = 0
        for i, s in enumerate(sp.specs):
            seg = counts[s.offset:s.offset + s.width]
            seg_first = first[s.offset:s.offset + s.width]
            if s.kind == "labels":
                if li < len(label_max) and math.isfinite(label_max[li]):
                    self._label_max[s.name] = max(self._label_max.get(s.name, _NEG_INF), label_max[li])
                li += 1
                scalars[tag("data", f"{split}/{s.name}", "out_of_range")] = seg[0]
                if seg[0] > 0 and f"{split}/{s.name}" not in self._explained:
                    classes = meta["classes"].get(s.name)
                    self.checks["label_range"].judge_field(
                        ctx, s, seg[0], classes, self._class_source.get(s.name, "the largest training label so far, "
                                                                        "plus one"),
                        self.ignore_index, self._label_max.get(s.name), *self._where(sp, -seg_first[0], step,
                                                                                     evaluation))
                continue
            f = s.num_features
            nonfinite, oor = seg[:f], seg[f:2 * f]
            loose_nf = seg[2 * f] if s.loose_slot else 0.0
            total_nf = sum(nonfinite) + loose_nf
            scalars[tag("data", f"{split}/{s.name}", "nonfinite")] = total_nf
            if total_nf > 0:
                firsts = [-v for v, c in zip(seg_first[:f], nonfinite) if c > 0]
                if loose_nf > 0:
                    firsts.append(-seg_first[2 * f])
                self.checks["nonfinite"].judge_field(ctx, s, nonfinite, *self._where(sp, min(firsts), step, evaluation),
                                                     loose=loose_nf)
            rng = meta["ranges"].get(s.name)
            if rng is not None:
                total_oor = sum(oor)
                scalars[tag("data", f"{split}/{s.name}", "out_of_range")] = total_oor
                frac = total_oor / values[i] if values[i] else 0.0
                tolerance = self.checks["out_of_range"].tolerance_for(rng)
                if total_oor > 0 and frac > tolerance:
                    firsts = [-v for v, c in zip(seg_first[f:2 * f], oor) if c > 0]
                    self.checks["out_of_range"].judge_field(ctx, s, oor, frac, tolerance, rng,
                                                            *self._where(sp, min(firsts), step, evaluation))
        scalars[tag("data", f"{split}/_all", "schema_errors")] = schema_errors
        scalars[tag("data", f"{split}/_all", "empty_batches")] = empty
        if schema_errors > 0:
            self.checks["schema"].judge_split(ctx, schema_errors, meta["notes"],
                                              *self._where(sp, -host_first[1], step, evaluation))
        if empty > 0:
            self.checks["empty_batch"].judge_split(ctx, empty, *self._where(sp, -host_first[0], step, evaluation))
        if own and self._scan is None:
            self.writer.write_scalars(trainer, scalars, step)

    def _where(self, sp: SplitState, first: float, step: int, evaluation: bool) -> Tuple[str, int]:
        if self._scan is not None:
            # markers of the scan are its batch indices: the scan's order is not the order training will read
            # (a shuffling loader draws another permutation), so the alert is at the scan's step, 0
            return f"first in {sp.name} batch {int(first)} of the scan", step
        if evaluation:
            return f"first in {sp.name} batch {int(first)} (during step {step})", step
        return f"first at step {int(first)}", int(first)
