"""CI slice of the family fault suite (bench/family_faults): every (family, fault) builds for one seed and
the fault is really planted; two short end-to-end runs are caught and named at warning by lightwatch's
default policy. Main .venv only (no torchvision/timm); about 30-60 s on one thread."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest.importorskip("transformers")

from bench.family_faults import FAMILIES, FAULTS, build_case, faults_for  # noqa: E402
from bench.family_faults.cases import ATTN_Q_SCALE, NO_CLIP_LR, ZERO_INIT_LAYER  # noqa: E402

SEED = 0
PAIRS = [(fam, fault) for fault, f in FAULTS.items() for fam in f.families if fault != "healthy"]

_HEALTHY = {}


def healthy(family):
    if family not in _HEALTHY:
        _HEALTHY[family] = build_case(family, "healthy", SEED)
    return _HEALTHY[family]


def _optimizer(result):
    if isinstance(result, torch.optim.Optimizer):
        return result
    if isinstance(result, dict):
        return result["optimizer"]
    if isinstance(result, (list, tuple)):
        return _optimizer(result[0])
    raise TypeError(type(result))


def _lr(case):
    group = _optimizer(case.built.model.configure_optimizers()).param_groups[0]
    return group.get("initial_lr", group["lr"])


def _first_batch(loader):
    """The first batch of a fresh pass (the train loaders shuffle with their own generator of seed SEED:
    re-seed it, so a loader read before gives the same first batch again)."""
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(SEED)
    return next(iter(loader))


def _params(case, layer):
    return dict(case.built.model.named_modules())[layer].parameters()


def test_every_family_has_the_generic_and_its_own_faults():
    assert set(faults_for("gpt2_hf")) >= {"lr_x100", "lr_div1000", "shuffled_labels", "frozen_first_layer",
                                          "forgotten_zero_grad", "zero_init", "no_causal_mask",
                                          "padding_not_ignored", "attn_logits_large"}
    assert set(faults_for("cnn_bn")) >= {"nan_inputs", "bn_eval_mode", "layer_not_in_optimizer"}
    assert set(faults_for("rnn_clip")) >= {"nan_inputs", "no_clip_high_lr", "forgotten_zero_grad"}
    assert "nan_inputs" not in faults_for("gpt2_hf")  # token ids: no float input to hold a NaN


@pytest.mark.parametrize("family,fault", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_fault_is_planted(family, fault):
    case = build_case(family, fault, SEED)
    ref = healthy(family)
    model, hmodel = case.built.model, ref.built.model
    assert case.planted, "a fault says what it planted"
    assert case.diagnoses, "a fault lists the rule fragments that name its cause"

    if fault in ("lr_x100", "lr_div1000", "no_clip_high_lr"):
        factor = {"lr_x100": 100.0, "lr_div1000": 1e-3, "no_clip_high_lr": NO_CLIP_LR}[fault]
        assert _lr(case) == pytest.approx(_lr(ref) * factor)
        if fault == "no_clip_high_lr":
            assert ref.built.trainer_kwargs.get("gradient_clip_val") == 1.0
            assert case.built.trainer_kwargs.get("gradient_clip_val") is None

    elif fault == "shuffled_labels":
        b, hb = _first_batch(case.built.train), _first_batch(ref.built.train)
        if FAMILIES[family].kind == "lm":
            assert torch.equal(b["input_ids"], hb["input_ids"])          # same batches, same order
            real = hb["labels"] != -100
            assert torch.equal(b["labels"] != -100, real)                # padding still ignored
            assert (b["labels"][real] != hb["labels"][real]).float().mean() > 0.5
        else:
            y, hy = case.built.train.dataset.tensors[1], ref.built.train.dataset.tensors[1]
            assert torch.equal(torch.sort(y).values, torch.sort(hy).values)  # a permutation
            assert (y != hy).float().mean() > 0.5
            assert torch.equal(b[0], hb[0])

    elif fault == "nan_inputs":
        x = case.built.train.dataset.tensors[0]
        rows = (~torch.isfinite(x.view(len(x), -1))).any(1)
        assert int(rows.sum()) == case.checks["nan_rows"] >= 1
        for xb, _ in case.built.val:
            assert torch.isfinite(xb).all()                               # val untouched
        assert case.onset is None                                         # read from the first NaN batch

    elif fault == "frozen_first_layer":
        for layer in FAMILIES[family].first_layer:
            frozen, fresh = list(_params(case, layer)), list(_params(ref, layer))
            assert frozen and all(not p.requires_grad for p in frozen)
            assert all(torch.equal(a, b) for a, b in zip(frozen, fresh))  # still the random init
        others = [p for n, p in model.named_parameters()
                  if not any(n.startswith(layer + ".") for layer in FAMILIES[family].first_layer)]
        assert all(p.requires_grad for p in others)

    elif fault == "forgotten_zero_grad":
        opt = _optimizer(model.configure_optimizers())
        p = next(model.parameters())
        p.grad = torch.ones_like(p)
        model.optimizer_zero_grad(0, 0, opt)
        assert p.grad is not None and bool((p.grad == 1).all())
        hp = next(hmodel.parameters())
        hp.grad = torch.ones_like(hp)
        hmodel.optimizer_zero_grad(0, 0, _optimizer(hmodel.configure_optimizers()))
        assert hp.grad is None or not bool(hp.grad.any())

    elif fault == "zero_init":
        params = list(_params(case, ZERO_INIT_LAYER[family]))
        assert params and all(not bool(p.any()) for p in params)
        assert any(bool(p.any()) for p in _params(ref, ZERO_INIT_LAYER[family]))

    elif fault == "no_causal_mask":
        batch = _first_batch(case.built.val)
        ids, am = batch["input_ids"][:4], batch["attention_mask"][:4]
        t = int(am.sum(1).min()) // 2
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] - 1) % 198 + 2

        def earlier(m):
            m.eval()
            with torch.no_grad():
                a = m({"input_ids": ids, "attention_mask": am}).logits[:, :t]
                b = m({"input_ids": ids2, "attention_mask": am}).logits[:, :t]
            m.train()
            return float((a - b).abs().max())

        assert earlier(hmodel) == 0.0           # healthy: a later token never changes earlier logits
        assert earlier(model) > 1e-4            # planted: it does
        model._causal_restored = True           # what evaluate_clean measures: the mask put back
        try:
            assert earlier(model) == 0.0
        finally:
            model._causal_restored = False

    elif fault == "padding_not_ignored":
        b, hb = _first_batch(case.built.train), _first_batch(ref.built.train)
        pad = b["attention_mask"] == 0
        assert pad.any()
        assert bool((hb["labels"][pad] == -100).all())
        assert not bool((b["labels"][pad] == -100).any())              # every padded label counts in the loss
        assert bool((b["labels"][pad] == 0).all())                     # ... as the pad id
        assert torch.equal(b["labels"][~pad], hb["labels"][~pad])

    elif fault == "attn_logits_large":
        d = model.model.config.n_embd
        for blk, hblk in zip(model.model.transformer.h, hmodel.model.transformer.h):
            w, hw = blk.attn.c_attn.weight, hblk.attn.c_attn.weight
            assert torch.allclose(w[:, :d], hw[:, :d] * ATTN_Q_SCALE)
            assert torch.equal(w[:, d:], hw[:, d:])

    elif fault == "bn_eval_mode":
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert len(bns) == 3
        model.train()
        model.log = lambda *a, **k: None
        x, y = _first_batch(case.built.train)
        model.training_step((x, y), 0)
        assert all(not m.training for m in bns)                          # eval mode inside training
        assert all(bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()) for m in bns)
        assert all(int(m.num_batches_tracked) == 0 for m in bns)         # statistics never collected

    elif fault == "layer_not_in_optimizer":
        opt = _optimizer(model.configure_optimizers())
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        head = list(model.net.head.parameters())
        assert head and all(id(p) not in held and p.requires_grad for p in head)
        assert all(id(p) in held for p in model.net.features.parameters())
    else:
        pytest.fail(f"no planting check for {fault}")


# ------------------------------------------------------------------------------- end to end (short)
# Faults lightwatch's default policy names at warning today, on short runs. The full table comes from
# `python -m bench.family_faults`; harmful faults it does not name yet (gpt2_hf lr_x100, shuffled_labels,
# zero_init, no_causal_mask; cnn_bn frozen_first_layer; rnn_clip lr_x100) are not asserted here.
E2E = [("cnn_bn", "bn_eval_mode", 20, "batchnorm_eval"), ("rnn_clip", "nan_inputs", 40, "data_nonfinite"),
       ("rnn_clip", "lr_div1000", 20, "update_ratio_low")]


@pytest.mark.parametrize("family,fault,steps,rule", E2E, ids=[f"{a}-{b}" for a, b, _, _ in E2E])
def test_end_to_end_named_at_warning(tmp_path, family, fault, steps, rule):
    pytest.importorskip("hydra")
    from bench.family_faults.runner import run_one

    rec = run_one(dict(family=family, fault=fault, seed=SEED, max_steps=steps, work_dir=str(tmp_path / "w"),
                       out_dir=str(tmp_path / "o")))
    det = rec["detection"]
    assert det["detected"] and det["diagnosed"], (det, rec["alerts"])
    assert rule in det["diagnosis_rule"]
    assert os.path.exists(os.path.join(tmp_path, "o", rec["raw_path"]))
    assert math.isfinite(float(rec["metric_init"]))
