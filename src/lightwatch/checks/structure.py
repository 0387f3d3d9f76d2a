"""The model as built: what :class:`~lightwatch.callbacks.gradient_stats.GradientStatsMonitor` checks before any
update (initial weight scales, frozen layers, token embeddings) and at the first training step (BatchNorm mode).

These read the module itself rather than the gradients, once per fit; under a sharded strategy each rank
judges its own shards and the ranks agree with one collective (:mod:`lightwatch.core.reduce`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn.parameter import is_lazy

from lightwatch.checks import gradient as checks
from lightwatch.checks.finding import Finding
from lightwatch.core.init_signature import copies, fingerprints, uniform_init_votes
from lightwatch.core.reduce import agree_max, all_reduce_flat
from lightwatch.core.runtime import local_tensor

__all__ = ["ModelStructure", "batchnorm_mode_finding", "owners_of"]


def owners_of(module: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """Parameter name -> the module that holds it.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> type(owners_of(net)["0.weight"]).__name__
        'Linear'
    """
    return {f"{m}.{p}" if m else p: mod for m, mod in module.named_modules()
            for p, _ in mod.named_parameters(recurse=False)}


class ModelStructure:
    """The fit-start diagnoses of a model: ``frozen_parameters``, ``frozen_at_init``, ``init_zero``, ``init_large``.

    Args:
        module: the LightningModule (or any module) as initialised.
        names: the watched parameters' names.
        params: the watched parameters, in the same order.
        weight_layers: indices (into ``params``) of the Linear/Conv weights.
        sharded: parameters are shards (FSDP): the ranks agree on the frozen-layer verdicts.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> _ = torch.nn.init.zeros_(net[2].weight)
        >>> named = list(net.named_parameters())
        >>> structure = ModelStructure(net, [n for n, _ in named], [p for _, p in named], [0, 2], sharded=False)
        >>> [(f.rule, f.subject) for f in structure.fit_start_findings()]
        [('init_zero', '2.weight')]
    """

    def __init__(self, module: torch.nn.Module, names: Sequence[str], params: Sequence[torch.nn.Parameter],
                 weight_layers: Sequence[int], sharded: bool) -> None:
        self.module, self.names, self.params = module, list(names), list(params)
        self.weight_layers, self.sharded = list(weight_layers), sharded

    def fit_start_findings(self, check_frozen_at_init: bool = True) -> List[Finding]:
        """Every finding about the initialised model, in the order they are raised."""
        found: List[Optional[Finding]] = []
        frozen = [(n, p) for n, p in self.module.named_parameters() if not p.requires_grad]
        if frozen:
            found.append(checks.frozen_parameters_finding([n for n, _ in frozen],
                                                          sum(1 for _ in self.module.parameters())))
            if check_frozen_at_init:
                found.append(checks.frozen_at_init_finding(self.fresh_frozen(frozen)))
        for i in self.weight_layers:
            if is_lazy(self.params[i]):  # a LazyLinear/LazyConv not yet run: its shape is not known
                continue
            w = self.params[i].detach()
            fan_in = w[0].numel() if w.dim() > 1 else 1
            scaled = float(w.float().var()) * fan_in if w.numel() > 1 else 1.0
            found.append(checks.init_scale_finding(self.names[i], scaled))
        # token embeddings that all start at 0 are all alike: nothing tells the tokens apart at the input
        owners = owners_of(self.module)
        zeros = [n for n, p in zip(self.names, self.params) if not is_lazy(p) and p.dim() == 2 and p.numel() > 1
                 and isinstance(owners.get(n), torch.nn.Embedding) and not bool(p.detach().any())]
        found.append(checks.zero_embedding_finding(zeros))
        return [f for f in found if f is not None]

    def fresh_frozen(self, frozen: Sequence[Tuple[str, torch.nn.Parameter]]) -> List[str]:
        """Names of the frozen tensors that still hold a fresh uniform random initialisation.

        A frozen copy of a trainable tensor (a DQN target network, a MoCo/BYOL momentum encoder, a mean
        teacher) starts fresh by design and is left out. See :mod:`lightwatch.core.init_signature` for the
        tests and their thresholds.
        """
        tensors = [local_tensor(p) for _, p in frozen]
        device = next((t.device for t in tensors if t.device.type != "meta"), torch.device("cpu"))
        votes = uniform_init_votes(tensors, device)
        if self.sharded:  # each rank judged its own shards: a tensor is named when no rank objects
            agree_max(votes.view(-1))
        objection, support = votes.tolist()
        candidates = [i for i, (o, v) in enumerate(zip(objection, support)) if v > 0 and o == 0]
        if candidates:  # a frozen copy of a trainable tensor is a target or momentum network, fresh by design
            trainable = [local_tensor(p) for p in self.module.parameters() if p.requires_grad]
            if not self.sharded:  # only tensors of the same size can be copies (shards may differ in size)
                sizes = {tensors[i].numel() for i in candidates}
                trainable = [t for t in trainable if not is_lazy(t) and t.numel() in sizes]
            rows = fingerprints([tensors[i] for i in candidates] + trainable, device)
            if self.sharded:  # fingerprints of shards add up to the whole tensor's
                all_reduce_flat(rows.view(-1))
            read = rows.tolist()
            copied = copies(read[:len(candidates)], read[len(candidates):])
            candidates = [i for i, c in zip(candidates, copied) if not c]
        return [frozen[i][0] for i in candidates]


def batchnorm_mode_finding(module: torch.nn.Module, step: int) -> Optional[Finding]:
    """``batchnorm_eval``: BatchNorm layers in eval mode during a training step (see
    :func:`lightwatch.checks.gradient.batchnorm_eval_finding`). One host read of their running statistics.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> _ = net[1].eval()
        >>> batchnorm_mode_finding(net, step=0).severity
        'warning'
    """
    frozen = [(n, m) for n, m in module.named_modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not m.training]
    if not frozen:
        return None
    fresh = []
    for name, m in frozen:
        mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if mean is None or var is None or is_lazy(mean):
            fresh.append(name)  # no running statistics: eval mode cannot normalise with anything learned
            continue
        if bool(torch.all(mean == 0)) and bool(torch.all(var == 1)):
            fresh.append(name)
    return checks.batchnorm_eval_finding([n for n, _ in frozen], fresh, step)
