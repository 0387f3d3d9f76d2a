"""Field discovery of the data monitor: what each field of a split is, its schema, ranges and class count.

On the first batch of a split the monitor resolves its fields, gives each a :class:`FieldSpec` (role, kind,
feature dimension, counter slots), takes its expected schema (given, from the reference, or learned over the
first training epoch), its ranges (given, restored, from the reference, or learned) and its class count
(given, the module's, the reference's, or inferred), and builds the distribution statistics on frozen edges.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, List, Optional, Tuple

import torch

from lightwatch.checks.data.buffers import SplitState
from lightwatch.checks.data.fields import (
    LABEL_CAPACITY,
    FieldSpec,
    LabelTally,
    Ranges,
    Schema,
    default_feature_dim,
    feature_matrix,
    token_like,
)
from lightwatch.core.batch import BatchSelectorError
from lightwatch.core.reduce import all_reduce_flat
from lightwatch.core.runtime import distributed_ready, world_size
from lightwatch.metrics import Histogram, Moments
from lightwatch.metrics.histogram import quantile_edges, strictly_increasing
from lightwatch.profile import FieldProfile, SplitProfile, dtype_name, parse_dtype

__all__ = ["FieldDiscovery"]

logger = logging.getLogger("lightwatch")

_F64 = torch.float64
_NEG_INF = float("-inf")


class FieldDiscovery:
    """The part of :class:`~lightwatch.callbacks.DataQualityMonitor` that learns what the fields of each split are.

    It works on the monitor's shared state: ``_schemas``, ``_layout``, ``_ranges``, ``_classes`` and
    ``_class_source``, ``_label_max``, ``_edges``, and the settings ``selector``, ``feature_dim``,
    ``feature_names``, ``ranges``, ``schema``, ``reference``, ``num_classes``, ``checks``.

    Example:
        >>> import torch
        >>> class Probe(FieldDiscovery):
        ...     feature_dim = None
        >>> Probe()._feature_dim_of("image", torch.zeros(8, 3, 32, 32)), Probe()._feature_dim_of("x", torch.zeros(8, 5))
        (1, 1)
    """

    def _setup_split(self, trainer: Any, sp: SplitState, batch: Any) -> None:
        where = "DataQualityMonitor"
        fields = self.selector.resolve(batch)
        tensors = [(f, "input", self.selector.get(batch, f)) for f in fields.inputs]
        tensors += [(f, "target", self.selector.get(batch, f)) for f in fields.targets]
        specs: List[FieldSpec] = []
        kept: List[torch.Tensor] = []
        offset = 0
        for f, role, t in tensors:
            labels = role == "target" and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
            if t.is_complex():
                self._note(f"complex:{f.name}", f"{where}: field {f.name!r} is complex; it is not checked.")
                continue
            if t.dim() == 0:
                raise BatchSelectorError(f"{where}: field {f.name!r} is a 0-d tensor; fields need a batch dimension "
                                         f"(got shape {list(t.shape)}).")
            if labels:
                fd, nf, sum_dims = None, 1, None
            else:
                fd = self._feature_dim_of(f.name, t)
                nf = 1 if fd is None else int(self._layout.get(f.name, t.shape[fd]))
                if nf < 1:
                    raise BatchSelectorError(f"{where}: field {f.name!r} has no features along dimension {fd} "
                                             f"(shape {list(t.shape)}); set feature_dim.")
                sum_dims = None if fd is None else tuple(i for i in range(t.dim()) if i != fd)
            names = self.feature_names.get(f.name)
            if names is not None and len(names) != nf:
                raise ValueError(f"{where}(feature_names={{{f.name!r}: ...}}): {len(names)} names for {nf} features.")
            loose_slot = not labels and fd is not None and t.is_floating_point()
            width = 1 if labels else 2 * nf + int(loose_slot)
            spec = FieldSpec(f, role, "labels" if labels else "numeric", t.dim(), fd, nf, t.is_floating_point(),
                             offset, width, sum_dims, names, loose_slot=loose_slot)
            if fd is not None:
                self._layout.setdefault(f.name, nf)
            if not labels and fd is None and token_like(t):
                self._note(f"tokens:{f.name}", f"{where}: field {f.name!r} holds integer ids of shape "
                                               f"{list(t.shape)} ({dtype_name(t.dtype)}): its last dimension is "
                                               f"taken as a sequence (variable length) and all its ids as one "
                                               f"feature; set feature_dim={{{f.name!r}: ...}} to change that.")
            spec.zeros = torch.zeros(nf, dtype=torch.int64, device=t.device)
            specs.append(spec)
            kept.append(t)
            offset += width
            self._check_reference_field(spec, t)
            if f.name not in self._schemas:
                self._schemas[f.name] = self._initial_schema(f.name, t)
        unknown = sorted(set(self.ranges) - {s.name for s in specs})
        if unknown:
            raise BatchSelectorError(f"{where}(ranges=...): no field named {unknown} in the {sp.name} batches; the "
                                     f"fields are {[s.name for s in specs]}.")
        device = kept[0].device if kept else torch.device("cpu")
        sp.specs, sp.sample_ids, sp.device = specs, fields.sample_ids, device
        sp.counts = torch.zeros(offset, dtype=torch.int64, device=device)  # exact; float64 only when read
        sp.first = torch.full((offset,), _NEG_INF, dtype=_F64, device=device)
        n_labels = sum(1 for s in specs if s.kind == "labels")
        sp.label_max = torch.full((n_labels,), _NEG_INF, dtype=_F64, device=device)
        sp.values = [0] * len(specs)
        sp.immediate = self._immediate_mask(specs, offset, device)
        for spec, t in zip(specs, kept):
            if spec.kind == "numeric" and spec.name not in self._ranges:
                self._init_ranges(spec, t)
        if self.distribution:
            self._init_stats(sp, specs, kept)
        sp.driven = [copy.deepcopy(check).to(device) for check in self._driven]

    def _note(self, key: str, message: str) -> None:
        if key not in self._notes:
            self._notes.add(key)
            logger.info(message)

    def _feature_dim_of(self, name: str, t: torch.Tensor) -> Optional[int]:
        fd: Any = self.feature_dim
        if (fd is None or (isinstance(fd, dict) and name not in fd)) and token_like(t):
            # token ids: a position is no feature (position 23 exists only in the longest batches, and holds
            # padding in most samples); all ids of a sample are one feature
            return None
        if isinstance(fd, dict):
            if name not in fd:
                return default_feature_dim(t.dim())
            fd = fd[name]
            if fd is None:
                return None
        elif fd is None or t.dim() <= 1:  # one dimension for all fields: 1-d fields have one feature anyway
            return default_feature_dim(t.dim())
        d = int(fd) + (t.dim() if fd < 0 else 0)
        if not 1 <= d < t.dim():
            raise ValueError(f"DataQualityMonitor(feature_dim=...): {fd} is not a feature dimension of field {name!r} "
                             f"with shape {list(t.shape)} (dimension 0 is the batch).")
        return d

    def _immediate_mask(self, specs: List[FieldSpec], k: int, device: torch.device) -> Optional[torch.Tensor]:
        if not self._immediate_checks:
            return None
        mask = torch.zeros(k, dtype=torch.int64)
        for s in specs:
            if s.kind == "labels":
                mask[s.offset] = int("label_range" in self._immediate_checks)
            else:
                f = s.num_features
                mask[s.offset:s.offset + f] = int("nonfinite" in self._immediate_checks)
                mask[s.offset + f:s.offset + 2 * f] = int("out_of_range" in self._immediate_checks)
                if s.loose_slot:
                    mask[s.offset + 2 * f] = int("nonfinite" in self._immediate_checks)
        return mask.to(device)

    def _reference_field(self, name: str, split: str = "train") -> Optional[FieldProfile]:
        if self.reference is None:
            return None
        ref = self.reference.split(split, fallback=("train", "val"))
        return ref.fields.get(name) if ref is not None else None

    def _check_reference_field(self, spec: FieldSpec, t: torch.Tensor) -> None:
        if self.reference is None:
            return
        ref = self._reference_field(spec.name)
        if ref is None:
            self._note(f"noref:{spec.name}", f"DataQualityMonitor: the reference profile has no field {spec.name!r}; "
                                             f"it is not compared with the reference.")
            return
        ref.check_layout(spec.num_features, spec.kind, f"DataQualityMonitor(reference={self.reference.source})")

    def _initial_schema(self, name: str, t: torch.Tensor) -> Schema:
        if name in self.schema:
            return self.schema[name]
        ref = self._reference_field(name)
        if ref is not None:
            return Schema(parse_dtype(ref.dtype), list(ref.shape), True, "reference profile")
        dims: List[Optional[int]] = list(t.shape[1:])
        if token_like(t):
            dims[-1] = None  # token ids, masks, per-token labels: padded to each batch's longest sequence
        return Schema(t.dtype, dims, False, "first training epoch")

    def _init_ranges(self, spec: FieldSpec, t: torch.Tensor) -> None:
        given = self.ranges.get(spec.name)
        if given is not None:
            bounds = self._given_bounds(spec, given)
            self._ranges[spec.name] = self._make_ranges(spec, bounds, hard=True, source="given ranges", n_ref=0,
                                                        device=t.device)
            return
        restored = self._restored_ranges.pop(spec.name, None)
        if restored is not None and len(restored["bounds"]) == spec.num_features:
            bounds = [(float(lo), float(hi)) for lo, hi in restored["bounds"]]
            self._ranges[spec.name] = self._make_ranges(spec, bounds, hard=False, source=str(restored["source"]),
                                                        n_ref=int(restored["n_ref"]), device=t.device)
            return
        ref = self._reference_field(spec.name)
        if ref is not None and ref.kind == "numeric":
            mm = ref.value_range()
            split = self.reference.split("train", ("val",)) if self.reference else None
            if mm is not None and split is not None:
                self._ranges[spec.name] = self._learned_ranges(spec, mm, "the reference profile", split.samples,
                                                               t.device)

    def _given_bounds(self, spec: FieldSpec, given: Any) -> List[Tuple[float, float]]:
        where = f"DataQualityMonitor(ranges={{{spec.name!r}: ...}})"
        items = list(given)
        try:
            if len(items) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
                bounds = [(float(items[0]), float(items[1]))] * spec.num_features
            else:
                bounds = [(float(lo), float(hi)) for lo, hi in (list(pair) for pair in items)]
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected [lo, hi] or one [lo, hi] per feature, got {given!r}.") from None
        if len(bounds) != spec.num_features:
            raise ValueError(f"{where}: {len(bounds)} [lo, hi] pairs for {spec.num_features} features.")
        if any(not lo <= hi for lo, hi in bounds):
            raise ValueError(f"{where}: every range needs lo <= hi, got {bounds[:4]}.")
        return bounds

    def _learned_ranges(self, spec: FieldSpec, minmax: Tuple[List[float], List[float]], source: str, n_ref: int,
                        device: torch.device) -> Ranges:
        bounds = self.checks["out_of_range"].widen(minmax)
        return self._make_ranges(spec, bounds, hard=False, source=source, n_ref=n_ref, device=device)

    @staticmethod
    def _make_ranges(spec: FieldSpec, bounds: List[Tuple[float, float]], hard: bool, source: str, n_ref: int,
                     device: torch.device) -> Ranges:
        shape = [1] * spec.ndim
        if spec.feature_dim is not None:
            shape[spec.feature_dim] = spec.num_features
        lo = torch.tensor([b[0] for b in bounds], dtype=_F64).reshape(shape).to(device)
        hi = torch.tensor([b[1] for b in bounds], dtype=_F64).reshape(shape).to(device)
        return Ranges(lo, hi, hard, source, int(n_ref), bounds)

    def _init_stats(self, sp: SplitState, specs: List[FieldSpec], tensors: List[torch.Tensor]) -> None:
        """Histograms need frozen edges: from the reference, or from the first batch (averaged over ranks)."""
        missing = [(s, t) for s, t in zip(specs, tensors) if s.kind == "numeric" and s.name not in self._edges]
        from_data: List[Tuple[FieldSpec, torch.Tensor]] = []
        for s, t in missing:
            ref = self._reference_field(s.name)
            if ref is not None and ref.histogram is not None and ref.histogram.num_features == s.num_features:
                self._edges[s.name] = ref.histogram.edges.to(torch.float64).cpu()
            else:
                sample = feature_matrix(t.detach(), s.feature_dim, self.max_values_per_sample)
                from_data.append((s, quantile_edges(sample, bins=self.bins)))  # on the device, no host read
        if from_data:
            flat = torch.cat([e.reshape(-1) for _, e in from_data])
            if distributed_ready():  # once per run: every rank takes the mean of the ranks' quantiles
                all_reduce_flat(flat, None)
                flat /= world_size()
            for (s, e), part in zip(from_data, flat.split([e.numel() for _, e in from_data])):
                # stays on the device: copied to the host only when a profile or checkpoint is written
                self._edges[s.name] = strictly_increasing(part.reshape(e.shape).clone())
        for s in specs:
            if s.name in sp.acc:
                continue
            if s.kind == "numeric":
                ref = self._reference_field(s.name)
                shift = None
                if ref is not None and ref.moments is not None and ref.moments.num_features == s.num_features:
                    shift = ref.moments.compute()["mean"]
                for store in (sp.acc, sp.glob):
                    store[s.name] = Moments(num_features=s.num_features, shift=shift, device=sp.device)
                    # edges built here are valid by construction: no check, which would read them to the host
                    store[s.name + "\0hist"] = Histogram(self._edges[s.name].clone(), device=sp.device, _trusted=True)
            else:
                capacity = self._known_classes(s.name) or LABEL_CAPACITY
                for store in (sp.acc, sp.glob):
                    store[s.name] = LabelTally(capacity, self.ignore_index, device=sp.device)

    def _known_classes(self, name: str) -> Optional[int]:
        if name in self._classes:
            return self._classes[name]
        if self.num_classes is not None:
            source, n = "num_classes argument", self.num_classes
        elif self._module_classes is not None:
            source, n = "the module's num_classes", self._module_classes
        else:
            ref = self._reference_field(name)
            if ref is None or ref.kind != "labels" or not ref.num_classes:
                return None
            source, n = "the reference profile", ref.num_classes
        self._classes[name], self._class_source[name] = int(n), source
        return int(n)

    def _classes_for(self, sp: SplitState, name: str) -> Optional[int]:
        """The class count labels are checked against: known, or (evaluation splits during the first epoch) the
        largest training label seen so far plus one."""
        classes = self._classes.get(name)
        if classes is None and sp.name != "train":
            largest = self._label_max.get(name)
            if largest is not None and math.isfinite(largest) and largest >= 0:
                classes = int(largest) + 1
        return classes

    def _check_schema(self, sp: SplitState, s: FieldSpec, t: torch.Tensor, marker: int) -> Tuple[bool, bool]:
        """Host-side comparison of dtype and shape with the expected schema.

        Returns ``(usable, loose)``: ``usable`` false leaves the batch's field out of the checks and statistics;
        ``loose`` means its feature dimension is variable and has another size than the field's layout, so its
        values are checked as a whole (non-finite values) but not per feature.
        """
        exp = self._schemas.get(s.name)
        if exp is None:
            return True, False
        problems = []
        usable = True
        loose = False
        if t.dtype != exp.dtype:
            problems.append(f"dtype {dtype_name(t.dtype)} (expected {dtype_name(exp.dtype)})")
            # numbers of another dtype still count; labels that stopped being integers do not
            usable = s.kind == "numeric" or not (t.is_floating_point() or t.is_complex())
        dims = list(t.shape[1:])
        if len(dims) != len(exp.dims):
            problems.append(f"sample shape {dims} (expected {exp.describe()})")
            usable = False
        else:
            same_kind = t.dtype == exp.dtype
            for i, (got, want) in enumerate(zip(dims, exp.dims)):
                feature = s.feature_dim is not None and i + 1 == s.feature_dim
                if feature and got != s.num_features and (want is None or (not exp.frozen and same_kind)):
                    # a variable feature dimension (a sequence): learned while the schema is learned, or given
                    loose = True
                    if want is not None:
                        exp.dims[i] = None
                        self._note(f"vardim:{s.name}:{i + 1}", (
                            f"DataQualityMonitor: dimension {i + 1} of field {s.name!r} varies ({want} then {got}) "
                            f"while its dtype and other dimensions stay the same: it is taken as a variable "
                            f"(sequence) dimension, not a schema change. Its values are checked for non-finite "
                            f"values; per-feature statistics keep the {s.num_features} features of the first "
                            f"batches' size. Set feature_dim for this field to change that."))
                    continue
                if want is None or got == want:
                    continue
                if feature:
                    problems.append(f"{got} features along dimension {i + 1} (expected {want})")
                    usable = False
                elif exp.frozen:
                    problems.append(f"size {got} in dimension {i + 1} (expected {want}, from the {exp.source})")
                else:
                    exp.dims[i] = None  # still learning: a dimension that varies is variable
        if problems:
            sp.schema_errors += 1
            sp.first_schema = max(sp.first_schema, -float(marker))
            sp.schema_notes.setdefault(s.name, "; ".join(problems))
        return usable, loose and usable

    def _learn(self, train: SplitProfile) -> None:
        """After the first training epoch: freeze the schema, infer class counts, learn value ranges."""
        self._learned = True
        for schema in self._schemas.values():
            if not schema.frozen:
                schema.frozen, schema.source = True, "first training epoch"
        sp = self._splits["train"]
        for s in sp.specs or []:
            fp = train.fields.get(s.name)
            if fp is None:
                continue
            if s.kind == "labels" and s.name not in self._classes:
                largest = self._label_max.get(s.name)
                if largest is not None and math.isfinite(largest) and largest >= 0:
                    self._classes[s.name] = int(largest) + 1
                    self._class_source[s.name] = "inferred from the first training epoch"
            elif s.kind == "numeric" and self.learn_ranges and s.name not in self._ranges:
                mm = fp.value_range()
                if mm is not None and train.samples:
                    self._ranges[s.name] = self._learned_ranges(s, mm, "the first training epoch", train.samples,
                                                                sp.device or torch.device("cpu"))

    def _per_sample_labels(self, s: FieldSpec) -> bool:
        """Whether integer targets are classification labels, one per sample (``[N]`` or ``[N, 1]``).

        Per-position targets (``[N, T]`` token ids of a language model, ``[N, H, W]`` segmentation masks) are
        not judged for class imbalance or label shift: token frequencies are Zipfian and pixel classes are
        background-heavy by nature, and the positions of one sample are no independent draws, so a chi-square
        over them overstates significance. Their labels are still range-checked and counted in the profile.
        """
        schema = self._schemas.get(s.name)
        dims = list(schema.dims) if schema is not None else None
        if s.ndim == 1 or (s.ndim == 2 and dims == [1]):
            return True
        self._note(f"seqlabels:{s.name}", f"DataQualityMonitor: target {s.name!r} holds one label per position "
                                          f"({s.ndim}-d batches): its label range is checked, but class imbalance "
                                          f"and label shift are judged only for one label per sample.")
        return False
