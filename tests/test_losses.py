"""The losses of conf/loss/: values on known inputs, readouts, gradient signs, head widths, one
training step each through the real config, bad values, and checkpoints from before the loss
was configurable."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from agecls.models.heads import CoralLayer, MLPHead
from agecls.models.losses import (
    LOSSES,
    AgeLoss,
    CrossEntropyAgeLoss,
    DLDLLoss,
    DLDLv2Loss,
    L1AgeLoss,
    MeanVarianceLoss,
    MSEAgeLoss,
    OrdinalLoss,
    SmoothL1AgeLoss,
    build_loss,
    target_of,
)
from agecls.models.module import AgeRegressor
from agecls.train import build_model, train
from agecls.utils.checks import ConfigValueError, check_train_config
from agecls.utils.hydra_utils import train_summary

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "loss").glob("*.yaml"))
CLASS_LOSSES = ("ce", "dldl", "dldl_v2", "mean_variance")

# the study's small head (features 512 -> 512 -> 256 -> 32): hidden Linear layers, whatever the loss
SMALL_HIDDEN = [512 * 512 + 512, 131_328, 8_224]
# the head's output width and its output layer's parameters, per loss, with the default age range
# 0..100 (101 classes, 100 thresholds) after the small head's 32 units
WIDTHS = {
    "l1": (1, 33), "mse": (1, 33), "smooth_l1": (1, 33),
    "ce": (101, 32 * 101 + 101), "dldl": (101, 3_333), "dldl_v2": (101, 3_333), "mean_variance": (101, 3_333),
    "ordinal": (100, 32 + 100),  # CORAL: one shared weight vector + 100 biases
}


def make(name: str, **params) -> AgeLoss:
    return build_loss({"_target_": target_of(LOSSES[name]), **params})


def scaled(loss: AgeLoss, mean: float, std: float) -> AgeLoss:
    loss.age_mean.fill_(mean)
    loss.age_std.fill_(std)
    return loss


def test_every_loss_has_a_config_and_a_class() -> None:
    assert CONFIGS == sorted(LOSSES) == sorted(WIDTHS)


# ------------------------------------------------------------------------------- known values
def test_regression_losses_on_known_values() -> None:
    out = torch.tensor([[1.0], [-1.0], [0.25]])  # standardised: mean 10, std 2 -> 12, 8, 10.5 years
    age = torch.tensor([10.0, 10.0, 10.0])
    l1 = scaled(L1AgeLoss(), 10.0, 2.0)
    assert l1(out, age).item() == pytest.approx((2 + 2 + 0.5) / 3 / 2)
    assert scaled(MSEAgeLoss(), 10.0, 2.0)(out, age).item() == pytest.approx((4 + 4 + 0.25) / 3 / 4)
    # Huber with beta 1 year: 2 - 0.5 for the large errors, 0.5 * 0.5^2 for the small one; / std
    huber = scaled(SmoothL1AgeLoss(beta=1.0), 10.0, 2.0)
    assert huber(out, age).item() == pytest.approx((1.5 + 1.5 + 0.125) / 3 / 2)


def test_l1_is_the_studys_loss_exactly() -> None:
    """|years - age| / age_std with years = output * std + mean, as the module computed it before."""
    torch.manual_seed(0)
    out, age = torch.randn(16, 1), torch.rand(16) * 90
    loss = scaled(L1AgeLoss(), 33.0, 19.0)
    pred = out.squeeze(-1).float() * torch.tensor(19.0) + torch.tensor(33.0)
    assert torch.equal(loss.readout(out), pred)
    assert torch.equal(loss(out, age), torch.nn.functional.l1_loss(pred, age) / torch.tensor(19.0))


def test_class_losses_on_known_values() -> None:
    # three classes (ages 0, 1, 2), uniform logits: softmax 1/3 each, expected age 1
    logits = torch.zeros(1, 3)
    ce = CrossEntropyAgeLoss(min_age=0, max_age=2)
    assert ce(logits, torch.tensor([1.0])).item() == pytest.approx(math.log(3))
    assert ce(logits, torch.tensor([1.4])).item() == pytest.approx(math.log(3))  # rounds to class 1

    # DLDL, sigma 1, age 1: target proportional to exp(-d^2 / 2) at d = 1, 0, 1
    e = math.exp(-0.5)
    p = [e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)]
    kl = sum(pk * math.log(pk / (1 / 3)) for pk in p)
    dldl = DLDLLoss(min_age=0, max_age=2, sigma=1.0)
    assert torch.allclose(dldl.label_distribution(torch.tensor([1.0])), torch.tensor([p]))
    assert dldl(logits, torch.tensor([1.0])).item() == pytest.approx(kl, rel=1e-5)

    # DLDL-v2 at age 0: KL to exp(-[0, 1, 4] / 2) normalised, plus |expected age 1 - 0| = 1
    q = [math.exp(-d * d / 2) for d in (0, 1, 2)]
    q = [v / sum(q) for v in q]
    kl0 = sum(v * math.log(v * 3) for v in q)
    v2 = DLDLv2Loss(min_age=0, max_age=2, sigma=1.0, l1_weight=0.5)
    assert v2(logits, torch.tensor([0.0])).item() == pytest.approx(kl0 + 0.5 * 1.0, rel=1e-5)

    # mean-variance at age 0: CE log 3 + 0.2 * (1 - 0)^2 / 2 + 0.05 * variance (1 + 0 + 1) / 3
    mv = MeanVarianceLoss(min_age=0, max_age=2, lambda_mean=0.2, lambda_variance=0.05)
    assert mv(logits, torch.tensor([0.0])).item() == pytest.approx(math.log(3) + 0.2 * 0.5 + 0.05 * 2 / 3, rel=1e-6)


@pytest.mark.parametrize("variant", ["coral", "orcnn"])
def test_ordinal_loss_on_known_values(variant: str) -> None:
    # ages 0..2: two tasks, "age > 0" and "age > 1"; age 1 -> targets [1, 0]
    loss = OrdinalLoss(min_age=0, max_age=2, variant=variant)
    assert loss.levels(torch.tensor([0.0, 1.0, 2.0, 1.6])).tolist() == [[0, 0], [1, 0], [1, 1], [1, 1]]
    assert loss(torch.zeros(1, 2), torch.tensor([1.0])).item() == pytest.approx(2 * math.log(2))
    # logits (+2, -2) agree with age 1: BCE log(1 + e^-2) per task
    assert loss(torch.tensor([[2.0, -2.0]]), torch.tensor([1.0])).item() == pytest.approx(2 * math.log1p(math.exp(-2)))


# -------------------------------------------------------------------------------------- readouts
def test_regression_readout_rescales_the_standardised_age() -> None:
    loss = scaled(MSEAgeLoss(), 40.0, 15.0)
    assert loss.readout(torch.tensor([[0.0], [1.0], [-2.0]])).tolist() == [40.0, 55.0, 10.0]


@pytest.mark.parametrize("name", CLASS_LOSSES)
def test_a_peaked_distribution_reads_out_its_age(name: str) -> None:
    loss = make(name)  # ages 0..100
    logits = torch.full((2, 101), -30.0)
    logits[0, 37] = 30.0
    logits[1, 5] = logits[1, 7] = 30.0  # two equal peaks: their mean
    assert loss.readout(logits).tolist() == pytest.approx([37.0, 6.0], abs=1e-4)
    shifted = make(name, min_age=10, max_age=20)
    assert shifted.readout(torch.nn.functional.one_hot(torch.tensor([3]), 11).float() * 60).item() == pytest.approx(13.0)


@pytest.mark.parametrize("readout", ["sum", "threshold"])
def test_ordinal_readout_counts_the_thresholds_below_the_age(readout: str) -> None:
    loss = make("ordinal", min_age=10, max_age=90, readout=readout)
    logits = torch.where(torch.arange(80) < 27, 30.0, -30.0).unsqueeze(0)  # age > 10 .. 36: yes; above: no
    assert loss.readout(logits).item() == pytest.approx(37.0, abs=1e-4)
    assert make("ordinal", readout=readout).readout(torch.zeros(1, 100)).item() == (50.0 if readout == "sum" else 0.0)


# ---------------------------------------------------------------------------------- gradient sign
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_gradient_step_lowers_the_loss_and_moves_the_age_towards_the_label(name: str) -> None:
    loss = scaled(make(name), 50.0, 20.0)
    age = torch.tensor([30.0, 70.0])
    out = torch.zeros(2, loss.out_features, requires_grad=True)
    before = loss(out, age)
    (grad,) = torch.autograd.grad(before, out)
    step = out.detach() - 0.05 * grad / grad.abs().max()
    assert loss(step, age).item() < before.item()
    errors = (loss.readout(out.detach()) - age).abs(), (loss.readout(step) - age).abs()
    assert (errors[1] < errors[0]).all(), (name, errors)


@pytest.mark.parametrize("name", CLASS_LOSSES)
def test_raising_the_true_classs_logit_lowers_the_loss(name: str) -> None:
    loss = make(name, min_age=0, max_age=10)
    out = torch.zeros(1, 11, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(out, torch.tensor([5.0])), out)
    assert grad[0, 5] < 0
    assert grad[0, 0] > 0 and grad[0, 10] > 0  # classes far from the age are pushed down


def test_ordinal_gradient_raises_thresholds_below_the_age_and_lowers_those_above() -> None:
    loss = make("ordinal", min_age=0, max_age=10)
    out = torch.zeros(1, 10, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(out, torch.tensor([4.0])), out)
    assert (grad[0, :4] < 0).all() and (grad[0, 4:] > 0).all()


@pytest.mark.parametrize("name", ["l1", "mse", "smooth_l1"])
def test_regression_gradient_pushes_the_output_towards_the_age(name: str) -> None:
    loss = scaled(make(name), 50.0, 20.0)
    out = torch.zeros(2, 1, requires_grad=True)  # 50 years
    (grad,) = torch.autograd.grad(loss(out, torch.tensor([30.0, 70.0])), out)
    assert grad[0, 0] > 0 and grad[1, 0] < 0


# ------------------------------------------------------------------------------------- head widths
@pytest.mark.parametrize("name", sorted(WIDTHS))
def test_head_keeps_the_studys_hidden_layers_and_its_output_follows_the_loss(name: str) -> None:
    loss = make(name)
    head = MLPHead(512, [512, 256, 32], output_layer=loss.output_layer)
    width, last = WIDTHS[name]
    assert head.out_features == loss.out_features == width
    assert head.linear_param_counts() == [*SMALL_HIDDEN, last]
    assert head(torch.zeros(3, 512)).shape == (3, width)


def test_ordinal_variants_differ_only_in_the_output_layer() -> None:
    coral = MLPHead(2048, [2048, 512, 128], output_layer=make("ordinal", variant="coral").output_layer)
    orcnn = MLPHead(2048, [2048, 512, 128], output_layer=make("ordinal", variant="orcnn").output_layer)
    assert isinstance(coral[-1], CoralLayer) and isinstance(orcnn[-1], torch.nn.Linear)
    assert coral.linear_param_counts()[:-1] == orcnn.linear_param_counts()[:-1] == [2048 * 2048 + 2048, 1_049_088, 65_664]
    assert coral.linear_param_counts()[-1] == 128 + 100 and orcnn.linear_param_counts()[-1] == 128 * 100 + 100
    # CORAL's thresholds start ordered, so its probabilities are rank-consistent from the start
    probs = torch.sigmoid(coral(torch.randn(4, 2048)))
    assert (probs[:, 1:] <= probs[:, :-1]).all()


# ---------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(("config", "message"), [
    ({"_target_": "os.system"}, r"loss\._target_='os\.system': is not a loss agecls knows.*l1, mse"),
    ({"_target_": target_of(DLDLLoss), "sigma": 0}, r"loss\.sigma=0: must be a number > 0"),
    ({"_target_": target_of(CrossEntropyAgeLoss), "min_age": 50, "max_age": 50}, r"loss\.max_age=50: .*is empty"),
    ({"_target_": target_of(CrossEntropyAgeLoss), "max_age": 80.5}, r"loss\.max_age=80\.5: must be a whole number"),
    ({"_target_": target_of(L1AgeLoss), "sigma": 2}, r"loss\.sigma=2: is not a parameter of loss=l1"),
    ({"_target_": target_of(OrdinalLoss), "variant": "sord"}, r"loss\.variant='sord': choose one of coral, orcnn"),
    ({"_target_": target_of(MeanVarianceLoss), "lambda_mean": -1}, r"loss\.lambda_mean=-1: must be a number >= 0"),
])
def test_a_bad_loss_config_is_refused_naming_the_value(config: dict, message: str) -> None:
    with pytest.raises(ConfigValueError, match=message):
        build_loss(config)


def test_a_checkpoint_naming_other_code_as_its_loss_builds_nothing() -> None:
    hp = {"backbone": {"name": "resnet18", "source": "torchvision"}, "head": {"hidden": [8]}, "pretrained": False,
          "loss": {"_target_": "builtins.exec", "source": "raise SystemExit"}}
    with pytest.raises(ConfigValueError, match="is not a loss agecls knows"):
        AgeRegressor.from_checkpoint({"hyper_parameters": hp, "state_dict": {}})


def test_bad_loss_values_fail_the_run_before_any_work(make_cfg) -> None:
    with pytest.raises(ConfigValueError, match=r"loss\.sigma=-1"):
        check_train_config(make_cfg("loss=dldl", "loss.sigma=-1"))
    with pytest.raises(ConfigValueError, match=r"loss\.max_age=80: must be >= data\.max_age=100"):
        check_train_config(make_cfg("loss=ce", "loss.max_age=80"))
    check_train_config(make_cfg("loss=ce", "data.max_age=80"))  # the classes follow the data's range


# -------------------------------------------------------------------------------- through training
# one batch of each stage, and none of the extras that cost seconds here (compiling the colour
# jitter, the model summary, a second checkpoint)
ONE_STEP = ["trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
            "logger=csv", "data.augment.compile=false", "callbacks.model_summary=null",
            "callbacks.model_checkpoint.save_last=false"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_loss_trains_a_step_through_the_real_config(make_cfg, name: str) -> None:
    cfg = make_cfg(f"loss={name}", *ONE_STEP)
    width = WIDTHS[name][0]
    assert f"loss={name}, head_output={width}," in train_summary(cfg)
    metrics = train(cfg)
    for key in ("test/mae", "test/pearson", "test/spearman", "test/cs5", "val/mae_best"):
        assert math.isfinite(metrics[key]), (key, metrics.get(key))
    # the best checkpoint rebuilds with no other argument and reads out the ages the test stage wrote
    model = AgeRegressor.load_from_checkpoint(metrics["best_checkpoint"])
    assert model.loss_name == name and model.head.out_features == width
    assert model.hparams.loss["_target_"] == target_of(LOSSES[name])
    preds = pd.read_csv(Path(cfg.paths.output_dir) / "predictions.csv")
    assert preds["predicted"].between(0, 100).all()


def test_a_class_loss_trains_its_head_on_cached_features(make_cfg) -> None:
    """data.feature_cache: the head's output comes from features (AgeNet.from_features), not images."""
    cfg = make_cfg("backbone=resnet18", "loss=mean_variance", "freeze=true", "data.feature_cache=true",
                   "data.augment.enabled=false", *ONE_STEP)  # resnet18: SMALL_HIDDEN's widths
    metrics = train(cfg)
    assert math.isfinite(metrics["test/mae"]) and metrics["params/trainable"] == sum(SMALL_HIDDEN) + WIDTHS["mean_variance"][1]


# --------------------------------------------------------------------------- older checkpoints
def test_a_checkpoint_saved_before_losses_were_configurable_loads_as_l1(tmp_path: Path) -> None:
    """The shape agecls.train saved until now: hyper_parameters without `loss`, the output scale in
    net.age_mean / net.age_std, an output Linear of width 1."""
    torch.manual_seed(0)
    model = AgeRegressor(backbone={"name": "resnet18", "source": "torchvision"}, head={"name": "small", "hidden": [16]},
                         pretrained=False, image_size=32, age_mean=33.0, age_std=19.0, age_min=1.0, age_max=90.0)
    hp = {k: v for k, v in dict(model.hparams).items() if k != "loss"}
    state = model.state_dict()
    assert {"net.age_mean", "net.age_std", "net.head.2.weight"} <= set(state) and state["net.head.2.weight"].shape == (1, 16)
    assert not any(k.startswith("net.loss.") for k in state)  # the loss keeps nothing of its own
    torch.save({"hyper_parameters": hp, "state_dict": state}, tmp_path / "old.ckpt")

    loaded = AgeRegressor.load_from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.loss_name == "l1" and isinstance(loaded.loss_fn, L1AgeLoss)
    assert (float(loaded.age_mean), float(loaded.age_std)) == (33.0, 19.0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    model.eval(), loaded.eval()
    with torch.no_grad():
        expected = model.net.head(model.net.features(images)).squeeze(-1) * 19.0 + 33.0  # the formula of before
        assert torch.equal(loaded(images), model(images))
        assert torch.allclose(loaded(images), expected)


def test_the_model_comes_from_its_config_with_one_default_each(make_cfg) -> None:
    cfg = make_cfg("loss=ordinal", "loss.variant=orcnn", "model.head_dropout=0.1")
    model = build_model(cfg)
    hp = model.hparams
    assert hp.head_dropout == 0.1 and hp.loss["variant"] == "orcnn" and hp.scheduler is None
    assert hp.image_size == cfg.data.image_size and hp.crop_pct == cfg.data.crop_pct == 0.875
    # plain containers: what torch.load(weights_only=True) reads back
    assert all(type(v) in (dict, list, str, int, float, bool, type(None)) for v in hp.values())
    assert isinstance(model.head[-1], torch.nn.Linear) and model.head.out_features == 100


@pytest.mark.parametrize("target", ["CrossEntropyAgeLoss", "DLDLLoss", "DLDLv2Loss", "MeanVarianceLoss"])
def test_class_readouts_stay_float32_under_bf16_autocast(target: str) -> None:
    """A matmul under autocast runs in bf16, which rounds ages 32-64 to quarter years."""
    loss = build_loss({"_target_": f"agecls.models.losses.{target}"})
    logits = torch.randn(16, loss.out_features, generator=torch.Generator().manual_seed(0)) * 3
    ages = torch.linspace(5, 95, 16)
    plain, plain_loss = loss.readout(logits), loss(logits, ages)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, auto_loss = loss.readout(logits), loss(logits, ages)
    assert auto.dtype == torch.float32
    assert torch.allclose(auto, plain, atol=1e-5) and torch.allclose(auto_loss, plain_loss, atol=1e-5)
