"""Config composition: every option of every group composes, with the study's pairings."""

from __future__ import annotations

from pathlib import Path

import pytest

from agecls.data.transforms import DEFAULT_CROP_PCT
from agecls.utils.hydra_utils import config_dir

CONF = Path(config_dir())
BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))
STUDY_HEAD = {
    "resnet18": "small",
    "mobilenet_v3_small": "small",
    "mobilenet_v3_large": "small",
    "efficientnet_lite0": "small",
    "efficientnet_lite1": "small",
    "efficientnet_lite2": "small",
    "timm": "small",
    "resnet50": "large",
    "resnet152": "large",
    "regnet_y_128gf": "large",
}


def test_every_backbone_is_listed() -> None:
    assert set(BACKBONES) == set(STUDY_HEAD)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_sets_study_head_and_normalisation(make_cfg, backbone: str) -> None:
    extra = ["backbone.name=resnet18"] if backbone == "timm" else []
    cfg = make_cfg(f"backbone={backbone}", *extra)
    assert cfg.head.name == STUDY_HEAD[backbone]
    assert list(cfg.head.hidden) == ([512, 256, 32] if STUDY_HEAD[backbone] == "small" else [2048, 512, 128])
    if backbone != "timm":
        assert len(cfg.backbone.mean) == 3 and len(cfg.backbone.std) == 3
        assert cfg.backbone.num_features > 0
    # the backbone's own crop where its config states one, else the one default
    assert cfg.data.crop_pct == cfg.backbone.get("crop_pct", DEFAULT_CROP_PCT)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("head", ["small", "large"])
def test_head_override_wins_over_backbone_default(make_cfg, backbone: str, head: str) -> None:
    cfg = make_cfg(f"backbone={backbone}", f"head={head}")
    assert cfg.head.name == head


@pytest.mark.parametrize("freeze", [("false", False), ("true", True), ("layer3", "layer3"), ("2", 2)])
def test_freeze_and_lr_are_top_level_values(make_cfg, freeze) -> None:
    text, value = freeze
    cfg = make_cfg(f"freeze={text}", "lr=1e-2")
    assert cfg.freeze == value
    assert cfg.lr == pytest.approx(1e-2)
    assert cfg.optimizer.lr == pytest.approx(1e-2), "the optimizer must take the top-level lr"


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adamw"])
def test_optimizer_is_partial_and_takes_lr(make_cfg, optimizer: str) -> None:
    cfg = make_cfg(f"optimizer={optimizer}", "lr=1e-3")
    assert cfg.optimizer._partial_ is True
    assert cfg.optimizer._target_.lower().endswith(optimizer)
    assert cfg.optimizer.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("data", ["synthetic", "utkface", "imdb_wiki", "csv"])
def test_data_options_compose_with_the_documented_keys(make_cfg, data: str) -> None:
    cfg = make_cfg(f"data={data}", "data.root=/some/where", "data.batch_size=4", "data.num_workers=1",
                   "data.image_size=48")
    assert cfg.data.source == data
    assert cfg.data.root == "/some/where"
    assert (cfg.data.batch_size, cfg.data.num_workers, cfg.data.image_size) == (4, 1, 48)


@pytest.mark.parametrize("group", ["trainer", "logger", "callbacks", "scheduler", "loss", "model", "debug", "experiment"])
def test_every_option_of_the_other_groups_composes(make_cfg, group: str) -> None:
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        if option.startswith("_"):
            continue
        # experiments bring their own data set; the tiny synthetic overrides do not apply to them
        cfg = make_cfg(f"{group}={option}", tiny=group != "experiment")
        assert cfg.backbone.name and cfg.data.source


def test_demo_experiment_is_offline_and_pretrained(make_cfg) -> None:
    cfg = make_cfg("experiment=demo", tiny=False)
    assert cfg.backbone.source == "efficientnet_lite0_package"
    assert cfg.pretrained is True
    assert cfg.data.source == "synthetic"
    assert cfg.trainer.accelerator == "cpu"


def test_results_experiments_share_one_split_and_differ_only_where_they_say(make_cfg) -> None:
    unfrozen = make_cfg("experiment=utkface_unfrozen", "seed=7", tiny=False)
    frozen = make_cfg("experiment=utkface_frozen", "seed=7", tiny=False)
    scratch = make_cfg("experiment=utkface_scratch", tiny=False)
    assert unfrozen.data.split_seed == frozen.data.split_seed == scratch.data.split_seed == 42
    assert unfrozen.freeze is False and frozen.freeze is True and frozen.data.feature_cache is True
    assert scratch.pretrained is False and unfrozen.pretrained is True
    assert unfrozen.backbone.name == frozen.backbone.name == "tf_efficientnet_lite0"
    assert unfrozen.head.name == "small"


def test_best_recipe_is_the_unfrozen_run_with_its_levers_and_nothing_else(make_cfg) -> None:
    from omegaconf import OmegaConf

    def composed(experiment: str) -> dict:
        return OmegaConf.to_container(make_cfg(f"experiment={experiment}", tiny=False), resolve=True)

    base, best9, best = composed("utkface_unfrozen"), composed("utkface_best9"), composed("utkface_best")
    # issue 13's recipe: the unfrozen run with four levers
    assert best9["loss"]["_target_"] == "agecls.models.losses.DLDLv2Loss" and base["loss"]["_target_"].endswith(".L1AgeLoss")
    assert (best9["trainer"]["max_epochs"], best9["tta"]) == (9, "flip")
    assert best9["data"]["augment"]["rotation"] is None and base["data"]["augment"]["rotation"]
    assert best9["data"]["split_seed"] == base["data"]["split_seed"] == 42  # the results' one split
    for key in ("backbone", "head", "optimizer", "scheduler", "lr", "freeze", "pretrained", "seed", "callbacks"):
        assert best9[key] == base[key], key
    for key in ("image_size", "batch_size", "crop_pct", "root"):
        assert best9["data"][key] == base["data"][key], key
    # issue 20's: that recipe with AdamW's weight decay, 15 epochs and the weights' moving average
    assert best["optimizer"]["_target_"] == "torch.optim.AdamW" and best9["optimizer"]["_target_"] == "torch.optim.Adam"
    assert best["optimizer"]["weight_decay"] == 0.05 and best["optimizer"]["lr"] == best9["optimizer"]["lr"]
    assert best["trainer"]["max_epochs"] == 15 and best9["trainer"]["max_epochs"] == 9
    assert best["callbacks"]["ema"]["decay"] == 0.997 and best9["callbacks"]["ema"]["decay"] is None
    best["callbacks"]["ema"]["decay"], best["trainer"]["max_epochs"] = None, 9
    for key in ("backbone", "head", "loss", "scheduler", "lr", "freeze", "pretrained", "seed", "tta", "data", "callbacks",
                "trainer"):
        assert best[key] == best9[key], key
