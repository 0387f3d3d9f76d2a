"""A measurement-only callback: the signals that could separate these faults from healthy runs.

It never alerts and never changes the run (its static forward passes run in eval mode, without gradients,
on a fixed batch, so they draw no random numbers). Per step: the training loss, the total gradient norm
before clipping, whether the batch holds a non-finite input, the share of padded label positions that are
not -100, the number of BatchNorm layers in eval mode at backward. At fit start (and at fit end for the
attention scale): whether a token's logits depend on later tokens (causal leak), the attention logits'
scale and entropy, and the parameters that get gradients but are in no optimizer.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
from torch import nn

from bench.faults.injections import optimizer_step_index

__all__ = ["FaultProbe"]


def _f(x: float) -> Any:
    return x if math.isfinite(x) else ("nan" if x != x else ("inf" if x > 0 else "-inf"))


class FaultProbe(pl.Callback):
    def __init__(self, loss_key: str = "train/loss") -> None:
        self.loss_key = loss_key
        self.losses: List[Any] = []
        self.grad_norms: List[Any] = []
        self.first_nonfinite_input_step: Optional[int] = None
        self.pad_positions = 0
        self.pad_labels_not_ignored = 0
        self.bn_eval_at_backward = 0
        self.static: Dict[str, Any] = {}
        self._hf = False
        self.update_every = 10
        self.update_ratios: List[Any] = []      # (step, max over weight tensors, all weights together)
        self._before: Optional[List[Any]] = None

    # ------------------------------------------------------------------------------------------- static
    @torch.no_grad()
    def _attention_stats(self, pl_module: Any, batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Layer-0..n attention logits (q.k * scaling) on a fixed batch: their std, max |.|, and the mean
        attention entropy over real query positions as a share of the entropy of uniform attention."""
        hf = pl_module.model
        cfg = hf.config
        d, heads = cfg.n_embd, cfg.n_head
        hd = d // heads
        captured: List[torch.Tensor] = []
        hooks = [blk.attn.c_attn.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
                 for blk in hf.transformer.h]
        was = pl_module.training
        pl_module.eval()
        try:
            hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            pl_module.train(was)
            for h in hooks:
                h.remove()
        out: Dict[str, float] = {}
        stds, maxes, ents = [], [], []
        am = batch["attention_mask"].bool()
        L = am.shape[1]
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
        for blk, o in zip(hf.transformer.h, captured):
            q, k = o[..., :d], o[..., d:2 * d]
            q = q.view(*q.shape[:2], heads, hd).transpose(1, 2)
            k = k.view(*k.shape[:2], heads, hd).transpose(1, 2)
            logits = (q @ k.transpose(-1, -2)) * blk.attn.scaling
            allowed = causal[None, None] & am[:, None, None, :] & am[:, None, :, None]
            vals = logits[allowed.expand_as(logits)]
            stds.append(float(vals.std()))
            maxes.append(float(vals.abs().max()))
            p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1)                       # (B, H, L)
            n_allowed = allowed.sum(-1).clamp_min(1).float()
            rel = torch.where(n_allowed > 1, ent / n_allowed.log().clamp_min(1e-9), torch.ones_like(ent))
            qmask = am[:, None, :].expand_as(rel) & (n_allowed > 1)
            ents.append(float(rel[qmask].mean()))
        out["attn_logit_std"] = max(stds)
        out["attn_logit_absmax"] = max(maxes)
        out["attn_entropy_rel"] = min(ents)
        return out

    @torch.no_grad()
    def _causal_leak(self, pl_module: Any, batch: Dict[str, torch.Tensor]) -> float:
        """Max |change of logits at positions < t| when the token at t changes, through the module's forward."""
        ids = batch["input_ids"][:4].clone()
        am = batch["attention_mask"][:4]
        n = int(am.sum(1).min())
        t = max(1, n // 2)
        was = pl_module.training
        pl_module.eval()
        try:
            a = pl_module({"input_ids": ids, "attention_mask": am}).logits
            ids2 = ids.clone()
            ids2[:, t] = (ids2[:, t] - 2 + 1) % (pl_module.model.config.vocab_size - 2) + 2
            b = pl_module({"input_ids": ids2, "attention_mask": am}).logits
        finally:
            pl_module.train(was)
        return float((a[:, :t] - b[:, :t]).abs().max())

    def _first_batch(self, trainer: Any) -> Any:
        loader = trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        return next(iter(loader)) if loader is not None else None

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._hf = hasattr(pl_module, "model") and hasattr(getattr(pl_module, "model"), "transformer")

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._hf:
            batch = self._first_batch(trainer)
            if batch is not None:
                self.static["causal_leak"] = self._causal_leak(pl_module, batch)
                for k, v in self._attention_stats(pl_module, batch).items():
                    self.static[f"{k}_start"] = v
        held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        self.static["trainable_not_in_optimizer"] = sum(
            1 for p in pl_module.parameters() if p.requires_grad and id(p) not in held)
        self.static["frozen_tensors"] = sum(1 for p in pl_module.parameters() if not p.requires_grad)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._hf:
            batch = self._first_batch(trainer)
            if batch is not None:
                try:
                    for k, v in self._attention_stats(pl_module, batch).items():
                        self.static[f"{k}_end"] = v
                except Exception:  # a NaN model: nothing to measure
                    pass

    # --------------------------------------------------------------------------------------- per step
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        step = optimizer_step_index(trainer)
        if isinstance(batch, dict):
            labels, am = batch.get("labels"), batch.get("attention_mask")
            if labels is not None and am is not None and labels.shape == am.shape:
                pad = am == 0
                self.pad_positions += int(pad.sum())
                self.pad_labels_not_ignored += int((pad & (labels != -100)).sum())
            x = None
        elif isinstance(batch, (list, tuple)):
            x = batch[0]
        else:
            x = batch
        if (self.first_nonfinite_input_step is None and isinstance(x, torch.Tensor) and x.is_floating_point()
                and not bool(torch.isfinite(x).all())):
            self.first_nonfinite_input_step = step

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        self.bn_eval_at_backward = max(self.bn_eval_at_backward, sum(
            1 for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training))

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
            if grads else 0.0
        self.grad_norms.append(_f(norm))
        step = optimizer_step_index(trainer)
        if step % self.update_every == 0:
            self._before = [(n, p, p.detach().clone()) for n, p in pl_module.named_parameters()
                            if p.requires_grad and p.ndim >= 2]
            self._before_step = step

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            loss = trainer.callback_metrics.get(self.loss_key)
        self.losses.append(_f(float(loss.detach())) if isinstance(loss, torch.Tensor) else None)
        if self._before is not None:
            worst, num, den = 0.0, 0.0, 0.0
            for _, p, old in self._before:
                d = float(torch.linalg.vector_norm(p.detach() - old))
                w = float(torch.linalg.vector_norm(old))
                num, den = num + d * d, den + w * w
                if w > 0:
                    worst = max(worst, d / w) if math.isfinite(d / w) else float("inf")
            self.update_ratios.append([self._before_step, _f(worst), _f(math.sqrt(num / den) if den else 0.0)])
            self._before = None

    def summary(self) -> Dict[str, Any]:
        return {
            "losses": self.losses,
            "grad_norms": self.grad_norms,
            "first_nonfinite_input_step": self.first_nonfinite_input_step,
            "pad_positions": self.pad_positions,
            "pad_label_not_ignored_share": (self.pad_labels_not_ignored / self.pad_positions
                                            if self.pad_positions else None),
            "bn_eval_at_backward": self.bn_eval_at_backward,
            "update_ratios": self.update_ratios,
            **self.static,
        }
