"""The fault diagnoses of the statistics monitors, each on a planted fault, and silence on a healthy run."""
from __future__ import annotations

import copy
from typing import Any, List

import pytest
import pytorch_lightning as pl
import torch

from conftest import Classifier, WarmedUpClassifier, make_loader, make_trainer, read_alerts, read_events, scalars
from lightwatch import ActivationStatsMonitor, GradientStatsMonitor


def alerts_of(tmp_path: Any, model: pl.LightningModule, max_steps: int = 20, every: int = 5,
              first_step: bool = True, **trainer_kwargs: Any) -> List[dict]:
    monitors = [GradientStatsMonitor(every_n_steps=every, check_first_step=first_step),
                ActivationStatsMonitor(every_n_steps=every, check_first_step=first_step)]
    trainer = make_trainer(tmp_path, monitors, max_steps=max_steps, log_every_n_steps=every, **trainer_kwargs)
    trainer.fit(model, make_loader(n=256, seed=1))
    return read_alerts(str(tmp_path))


def rules(alerts: List[dict], severity: str = "warning") -> List[str]:
    order = ["info", "warning", "error", "critical"]
    return [a["rule"] for a in alerts if order.index(a["severity"]) >= order.index(severity)]


def test_healthy_run_raises_no_warning(tmp_path: Any, seed: int) -> None:
    assert rules(alerts_of(tmp_path, Classifier(lr=0.05), max_steps=40)) == []


@pytest.mark.parametrize("scale, rule", [(0.0, "init_zero"), (30.0, "init_large")])
def test_initialisation_scale(tmp_path: Any, seed: int, scale: float, rule: str) -> None:
    model = Classifier()
    with torch.no_grad():
        model.net[0].weight.mul_(scale)
    alert = next(a for a in alerts_of(tmp_path, model, max_steps=1) if a["rule"] == rule)
    assert alert["subject"] == "net.0.weight" and alert["step"] == 0 and alert["severity"] == "warning"


# 20: the first step moves the typical weight by more than 30% (named at step 0) and kills every unit
@pytest.mark.parametrize("lr, step", [(5.0, 4), (20.0, 0)])
def test_learning_rate_far_too_high(tmp_path: Any, seed: int, lr: float, step: int) -> None:
    alerts = alerts_of(tmp_path, Classifier(lr=lr), max_steps=5)
    alert = next(a for a in alerts if a["rule"] == "update_ratio_high")
    assert alert["step"] == step and alert["value"] > 0.1 and alert["severity"] == "warning"
    assert len([a for a in alerts if a["rule"] == "update_ratio_high"]) == 1
    assert "update_ratio_low" not in rules(alerts, severity="info")  # a dead network is not a rate too low


def test_tiny_updates_during_a_learning_rate_warmup_are_not_a_learning_rate_fault(tmp_path: Any, seed: int) -> None:
    during = alerts_of(tmp_path / "warmup", WarmedUpClassifier(warmup=2000), max_steps=20)
    assert "update_ratio_low" not in rules(during, severity="info")  # judged once the rate stops rising
    flat = alerts_of(tmp_path / "flat", Classifier(lr=0.05 / 2000), max_steps=20)  # the same tiny rate, for good
    assert "update_ratio_low" in rules(flat)


def test_vanishing_gradient_names_the_first_layer(tmp_path: Any, seed: int) -> None:
    model = Classifier(depth=3)
    model.net[0].weight.register_hook(lambda g: g * 1e-6)  # as if through many saturating layers
    alert = next(a for a in alerts_of(tmp_path, model, max_steps=5) if a["rule"] == "grad_vanishing")
    assert alert["subject"] == "net.0.weight" and alert["value"] < 1e-3


def test_forgotten_zero_grad(tmp_path: Any, seed: int) -> None:
    class NoZeroGrad(Classifier):
        def optimizer_zero_grad(self, *args: Any, **kwargs: Any) -> None:
            pass  # the bug: gradients accumulate across steps

    alert = next(a for a in alerts_of(tmp_path, NoZeroGrad(), max_steps=5) if a["rule"] == "grad_stale")
    assert alert["severity"] == "error" and alert["step"] == 1


def test_gradient_accumulation_is_not_a_forgotten_zero_grad(tmp_path: Any, seed: int) -> None:
    assert "grad_stale" not in rules(alerts_of(tmp_path, Classifier(), max_steps=10, accumulate_grad_batches=3))


def test_frozen_and_unused_parameters_are_reported_at_info(tmp_path: Any, seed: int) -> None:
    model = Classifier(depth=2)
    model.net[0].weight.requires_grad_(False)
    model.unused = torch.nn.Linear(2, 2)
    got = {a["rule"]: a for a in alerts_of(tmp_path, model, max_steps=5)}
    assert got["frozen_parameters"]["severity"] == "info" and got["frozen_parameters"]["subject"] == "net.0.weight"
    assert got["grad_missing"]["severity"] == "info" and got["grad_missing"]["subject"] == "unused.weight"


def test_a_layer_frozen_at_its_random_initialisation_is_named_before_the_first_update(tmp_path: Any,
                                                                                     seed: int) -> None:
    model = Classifier(hidden=64, depth=2)
    model.net[2].requires_grad_(False)  # the bug: a fresh 64x64 layer frozen, a fixed random projection
    got = {a["rule"]: a for a in alerts_of(tmp_path, model, max_steps=5)}
    alert = got["frozen_at_init"]
    assert (alert["severity"], alert["subject"], alert["step"], alert["value"]) == ("warning", "net.2.weight", 0, 1)
    assert got["frozen_parameters"]["severity"] == "info"  # bias and weight, the plain fact


def test_fine_tuning_with_a_trained_backbone_frozen_is_not_a_fault(tmp_path: Any, seed: int) -> None:
    model = Classifier(hidden=64, depth=2, lr=0.05)
    pretrain = make_trainer(tmp_path / "pretrain", [], max_steps=60, logger=False)
    pretrain.fit(model, make_loader(n=256, seed=2))
    model.net[:4].requires_grad_(False)  # freeze the trained backbone, train a new head
    model.net[4] = torch.nn.Linear(64, 3)
    alerts = alerts_of(tmp_path / "finetune", model, max_steps=20)
    assert rules(alerts) == []
    assert [a["rule"] for a in alerts if a["rule"].startswith("frozen")] == ["frozen_parameters"]


class WithTargetNetwork(Classifier):
    """DQN/MoCo/BYOL-shaped: a frozen copy of the network (updated by EMA in real code) next to the trained one."""

    def __init__(self, independent: bool = False) -> None:
        super().__init__(hidden=64, depth=2)
        self.target = Classifier(hidden=64, depth=2).net if independent else copy.deepcopy(self.net)
        self.target.requires_grad_(False)


def test_a_frozen_target_network_that_starts_as_a_copy_is_not_a_fault(tmp_path: Any, seed: int) -> None:
    alerts = alerts_of(tmp_path, WithTargetNetwork(), max_steps=5)
    assert "frozen_at_init" not in rules(alerts) and "frozen_parameters" in rules(alerts, "info")
    # a frozen layer that is no copy of anything trained is still named
    independent = alerts_of(tmp_path / "independent", WithTargetNetwork(independent=True), max_steps=5)
    (alert,) = [a for a in independent if a["rule"] == "frozen_at_init"]
    assert alert["subject"] == "target.0.weight" and alert["value"] == 3.0  # every weight of it, small ones too


def test_a_diagnosis_is_switched_off_by_name_and_the_others_stay_on(tmp_path: Any, seed: int) -> None:
    model = Classifier(hidden=64, depth=2)
    model.net[2].requires_grad_(False)  # a fixed random projection, on purpose here
    monitors = [GradientStatsMonitor(every_n_steps=5, skip_diagnoses=["frozen_at_init"])]
    make_trainer(tmp_path, monitors, max_steps=5).fit(model, make_loader(n=256, seed=1))
    assert [a["rule"] for a in read_alerts(str(tmp_path))] == ["frozen_parameters"]
    with pytest.raises(ValueError, match=r"unknown diagnosis \['act_dead'\]; .*'frozen_at_init'"):
        GradientStatsMonitor(skip_diagnoses=["act_dead"])  # an activation diagnosis, on the gradient monitor
    assert ActivationStatsMonitor(skip_diagnoses="act_dead").skip_diagnoses == {"act_dead"}


def _killed(model: Classifier) -> Classifier:
    with torch.no_grad():  # 14 of 16 units of the second layer can never fire
        model.net[2].weight[:14] = 0.0
        model.net[2].bias[:14] = -10.0
    return model


def test_dead_units_at_initialisation_are_named_before_the_first_update(tmp_path: Any, seed: int) -> None:
    dead = [a for a in alerts_of(tmp_path, _killed(Classifier(depth=2, hidden=16))) if a["rule"] == "act_dead"]
    assert len(dead) == 1 and (dead[0]["subject"], dead[0]["step"]) == ("net.3", 0)  # not again at later checks
    assert "at initialisation" in dead[0]["message"]


def test_a_batch_of_one_sample_is_no_evidence_of_dead_units(tmp_path: Any, seed: int) -> None:
    # with one sample per step, about half the units of a healthy ReLU layer are zero on it
    monitors = [ActivationStatsMonitor(every_n_steps=1)]
    trainer = make_trainer(tmp_path, monitors, max_steps=30, log_every_n_steps=1)
    trainer.fit(Classifier(depth=2, hidden=4), make_loader(n=64, seed=1, batch_size=1))
    dead = scalars(read_events(trainer.log_dir), "monitor.act/net.1/dead_frac")
    assert max(dead.values()) > 0.6  # the statistic says so, often ...
    assert "act_dead" not in rules(read_alerts(str(tmp_path)), severity="info")  # ... the diagnosis does not


def test_dead_units_must_persist_during_training(tmp_path: Any, seed: int) -> None:
    alerts = alerts_of(tmp_path, _killed(Classifier(depth=2, hidden=16)), max_steps=20, first_step=False)
    dead = [a for a in alerts if a["rule"] == "act_dead"]
    assert len(dead) == 1 and dead[0]["subject"] == "net.3" and dead[0]["step"] == 14  # third check in a row
    assert "for 3 checks in a row (since step 4)" in dead[0]["message"]


@pytest.mark.parametrize("first_step, step", [(True, 0), (False, 9)])
def test_saturated_activations(tmp_path: Any, seed: int, first_step: bool, step: int) -> None:
    model = Classifier(depth=1, hidden=16, activation="tanh")
    with torch.no_grad():
        model.net[0].weight.mul_(100.0)
    alerts = alerts_of(tmp_path, model, max_steps=10, first_step=first_step)
    alert = next(a for a in alerts if a["rule"] == "act_saturated")
    assert alert["subject"] == "net.1" and alert["step"] == step  # at init one reading; later two in a row


def test_a_softmax_before_the_loss_is_named_before_the_first_update(tmp_path: Any, seed: int) -> None:
    model = Classifier(depth=2)
    model.net.append(torch.nn.Softmax(dim=-1))  # the bug: cross_entropy then sees probabilities, not logits
    alert = next(a for a in alerts_of(tmp_path, model, max_steps=10) if a["rule"] == "output_probabilities")
    assert (alert["subject"], alert["step"], alert["value"], alert["severity"]) == ("net.5", 0, 1.0, "warning")


class LossOf(Classifier):
    """:class:`Classifier` trained with another loss, optionally with a final ``LogSoftmax`` module."""

    def __init__(self, loss: str, log_softmax: bool = False) -> None:
        super().__init__(depth=2)
        self.loss = loss
        if log_softmax:
            self.net.append(torch.nn.LogSoftmax(dim=-1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if self.loss == "nll":
            return torch.nn.functional.nll_loss(out, y)
        return torch.nn.functional.mse_loss(out, torch.nn.functional.one_hot(y, out.shape[-1]).float())


def test_nll_on_raw_logits_is_named_before_the_first_update(tmp_path: Any, seed: int) -> None:
    alerts = alerts_of(tmp_path, LossOf("nll"), max_steps=5)
    (alert,) = [a for a in alerts if a["rule"] == "nll_on_logits"]
    assert (alert["step"], alert["subject"], alert["severity"], alert["value"]) == (0, "net.4", "warning", 1.0)


@pytest.mark.parametrize("model", [lambda: LossOf("nll", log_softmax=True), lambda: LossOf("mse"), Classifier],
                         ids=["log_softmax_then_nll", "mse_on_one_hot", "cross_entropy"])
def test_losses_over_log_probabilities_or_dense_gradients_are_not_nll_on_logits(tmp_path: Any, seed: int,
                                                                               model: Any) -> None:
    assert "nll_on_logits" not in rules(alerts_of(tmp_path, model(), max_steps=5), severity="info")


def test_activations_exploding_through_depth_at_initialisation(tmp_path: Any, seed: int) -> None:
    model = Classifier(depth=6, hidden=32)
    with torch.no_grad():
        for layer in model.net:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                layer.weight.mul_(2.0)  # twice the He gain per layer: x2 RMS per layer through six layers
    alerts = alerts_of(tmp_path, model, max_steps=5)
    growth = [a for a in alerts if a["rule"] == "act_exploding"]
    assert len(growth) == 1 and growth[0]["step"] == 0 and growth[0]["severity"] == "warning"
    assert growth[0]["subject"] == "net.11" and growth[0]["value"] > 10


def test_activations_at_a_healthy_initialisation_do_not_grow(tmp_path: Any, seed: int) -> None:
    model = Classifier(depth=6, hidden=32)
    with torch.no_grad():
        for layer in model.net:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")  # He init: RMS stays level
    assert "act_exploding" not in rules(alerts_of(tmp_path, model, max_steps=5), severity="info")


def test_a_fresh_small_head_that_moves_fast_is_info_not_a_learning_rate_fault(tmp_path: Any, seed: int) -> None:
    # a new head of small norm (a replaced classifier, say) moves a large share of its norm in its first
    # steps by design; the learning rate is judged by how far all layers together move
    model = Classifier(hidden=64, depth=3, lr=0.05)
    with torch.no_grad():
        model.net[-1].weight.mul_(0.01)
    alerts = alerts_of(tmp_path, model, max_steps=10)
    (alert,) = [a for a in alerts if a["rule"] == "update_ratio_high"]
    assert (alert["severity"], alert["subject"]) == ("info", "net.6.weight") and alert["value"] > 0.1
    assert rules(alerts) == []


def test_one_early_tensor_with_small_gradients_beside_healthy_ones_is_not_vanishing(tmp_path: Any, seed: int) -> None:
    # eight weight layers: the first quarter is net.0 and net.2; net.0 alone gets tiny gradients (as attention
    # queries and keys do at initialisation), net.2 beside it gets healthy ones
    model = Classifier(depth=7)
    model.net[0].weight.register_hook(lambda g: g * 1e-6)
    assert "grad_vanishing" not in rules(alerts_of(tmp_path, model, max_steps=10))


class TinyGAN(pl.LightningModule):
    """A GAN with manual optimisation: the discriminator's parameters get no gradient in the generator's step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        self.discriminator = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LeakyReLU(0.2),
                                                 torch.nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        noise = torch.randn(real.shape[0], 4, device=real.device)
        # generator step: only the generator's optimizer holds parameters with gradients
        fake = self.generator(noise)
        self.toggle_optimizer(opt_g)
        loss_g = bce(self.discriminator(fake), torch.ones(real.shape[0], 1, device=real.device))
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        # discriminator step
        self.toggle_optimizer(opt_d)
        logits = self.discriminator(torch.cat([real, fake.detach()]))
        target = torch.cat([torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)]).to(real.device)
        loss_d = bce(logits, target)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self.log_dict({"train/loss_g": loss_g, "train/loss_d": loss_d})

    def configure_optimizers(self) -> List[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
                torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))]


def test_a_gan_with_manual_optimisation_has_no_missing_gradients_and_no_learning_verdict(tmp_path: Any,
                                                                                        seed: int) -> None:
    from lightwatch import MetricMonitor

    monitors = [GradientStatsMonitor(every_n_steps=5), MetricMonitor(every_n_steps=5)]
    trainer = make_trainer(tmp_path, monitors, max_steps=300)
    trainer.fit(TinyGAN(), make_loader(n=256, seed=1))
    alerts = read_alerts(str(tmp_path))
    assert "grad_missing" not in rules(alerts, severity="info")
    assert rules(alerts) == []


def test_a_layer_left_out_of_the_optimizer_is_named_at_the_first_step(tmp_path: Any, seed: int) -> None:
    class HeadLeftOut(Classifier):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.net[:-1].parameters(), lr=self.lr)  # the bug: the head is not in it

    alerts = alerts_of(tmp_path, HeadLeftOut(), max_steps=5)
    (alert,) = [a for a in alerts if a["rule"] == "param_not_in_optimizer"]
    assert (alert["severity"], alert["subject"], alert["step"], alert["value"]) == ("warning", "net.4.weight", 0, 2.0)


class ConvNet(pl.LightningModule):
    """A small CNN with BatchNorm on 4x4 'images'; ``eval_bn`` puts its BatchNorm in eval mode every step."""

    def __init__(self, eval_bn: bool = False) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                            torch.nn.ReLU(), torch.nn.Flatten())
        self.head = torch.nn.Linear(8 * 16, 3)
        self.eval_bn = eval_bn

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.eval_bn:
            self.features[1].eval()
        x, y = batch
        return torch.nn.functional.cross_entropy(self.head(self.features(x[:, :16].reshape(-1, 1, 4, 4))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def batchnorm_alerts(tmp_path: Any, model: pl.LightningModule) -> List[dict]:
    trainer = make_trainer(tmp_path, [GradientStatsMonitor(every_n_steps=5)], max_steps=10)
    trainer.fit(model, make_loader(n=256, in_features=16, seed=1))
    return [a for a in read_alerts(str(tmp_path)) if a["rule"] == "batchnorm_eval"]


def test_batchnorm_in_eval_mode_during_training_is_named(tmp_path: Any, seed: int) -> None:
    assert batchnorm_alerts(tmp_path / "train", ConvNet()) == []
    (alert,) = batchnorm_alerts(tmp_path / "fresh", ConvNet(eval_bn=True))
    assert (alert["severity"], alert["subject"], alert["step"]) == ("warning", "features.1", 0)
    # statistics collected before (a pretrained backbone fine-tuned with frozen normalisation): info
    model = ConvNet(eval_bn=True)
    with torch.no_grad():
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    (alert,) = batchnorm_alerts(tmp_path / "pretrained", model)
    assert alert["severity"] == "info"


def test_an_embedding_initialised_to_zero_is_named_at_fit_start(tmp_path: Any, seed: int) -> None:
    class TokenModel(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16, padding_idx=0)  # the padding row alone at 0: fine
            self.head = torch.nn.Linear(16, 3)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            tokens = (x.abs() * 10).long().clamp(0, 49)
            return torch.nn.functional.cross_entropy(self.head(self.embed(tokens).mean(1)), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    assert "init_zero" not in rules(alerts_of(tmp_path / "ok", TokenModel(), max_steps=2), severity="info")
    model = TokenModel()
    with torch.no_grad():
        model.embed.weight.zero_()
    (alert,) = [a for a in alerts_of(tmp_path / "zero", model, max_steps=2) if a["rule"] == "init_zero"]
    assert (alert["severity"], alert["subject"], alert["step"]) == ("warning", "embed.weight", 0)
