"""A run's checks and what a person sees: bad values fail before any work, TensorBoard keeps every
point, and the log reads as the run goes (also without a terminal)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import agecls.train as train_module
from agecls.data import AgeDataModule
from agecls.utils.checks import ConfigValueError
from tests.conftest import REPO, SYNTHETIC, TINY

# Faster tiny runs: no torch.compile of the device-side colour jitter.
FAST = ["data.augment.compile=false"]

BAD_VALUES = [
    # (overrides, text the message must hold: key=value and what is allowed)
    (["lr=0"], ["lr=0", "> 0"]),
    (["lr=-1"], ["lr=-1", "> 0"]),
    (["data.image_size=0"], ["data.image_size=0", ">= 32"]),
    (["data.image_size=16"], ["data.image_size=16", ">= 32", "tf_efficientnet_lite0"]),  # the default backbone
    (["backbone=resnet18", "data.image_size=16"], ["data.image_size=16", ">= 32", "resnet18"]),
    (["backbone=efficientnet_lite0", "data.image_size=31"], ["data.image_size=31", ">= 32", "tf_efficientnet_lite0"]),
    (["trainer.max_epochs=0", "train=true"], ["trainer.max_epochs=0", ">= 1", "train=false"]),
    (["data.splits=[0.5,0.5,0.5]"], ["data.splits=[0.5, 0.5, 0.5]", "summing to 1"]),
    (["data.splits=[0.8,0.2]"], ["data.splits=[0.8, 0.2]", "three"]),
    (["data.splits=[0.9,0.0,0.1]"], ["data.splits=[0.9, 0.0, 0.1]", "val share"]),
    (["data.batch_size=0"], ["data.batch_size=0", ">= 1"]),
    (["data.crop_pct=null"], ["data.crop_pct=None", "must be a number", "1.0"]),
    (["data.crop_pct=1.2"], ["data.crop_pct=1.2", "<= 1"]),
    (["data.num_workers=-1"], ["data.num_workers=-1", ">= 0"]),
    (["data.min_age=60", "data.max_age=40"], ["data.max_age=40", "data.min_age=60"]),
    (["head.hidden=[512,0,32]"], ["head.hidden[1]=0", ">= 1"]),
    (["tta=mirror"], ["tta='mirror'", "none, flip"]),
    (["tta=true"], ["tta=True", "none, flip", "tta=flip"]),
    (["tta=flip", "freeze=true", "data.feature_cache=true", "data.augment.enabled=false"],
     ["tta='flip'", "data.feature_cache=true", "agecls.eval ckpt_path=PATH tta=flip"]),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_fails_before_any_work_naming_key_and_value(make_cfg, tmp_path: Path, monkeypatch,
                                                                overrides: list[str], expected: list[str]) -> None:
    cache = tmp_path / "fresh-cache"
    cfg = make_cfg(f"paths.cache_dir={cache}", *overrides)

    def no_model(*_, **__):
        raise AssertionError("the model was built before the configuration was checked")

    monkeypatch.setattr(train_module, "build_model", no_model)
    with pytest.raises(ConfigValueError) as err:
        train_module.train(cfg)
    for text in expected:
        assert text in str(err.value), (text, str(err.value))
    run_dir = Path(cfg.paths.output_dir)
    assert not (run_dir / "cleaning.json").exists() and not (run_dir / "checkpoints").exists()
    assert not cache.exists() or not any(cache.iterdir()), "nothing may be generated, indexed or cached"


def test_good_edge_values_pass_the_checks(make_cfg) -> None:
    from agecls.utils.checks import check_train_config

    # the smallest image size the backbone takes; max_epochs=0 with train=false (test only)
    check_train_config(make_cfg("data.image_size=32", "train=false", "trainer.max_epochs=0", "lr=0"))
    check_train_config(make_cfg("trainer.max_epochs=-1", "trainer.max_time=00:00:01:00"))


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"image_size": 0}, "data.image_size=0"),
    ({"batch_size": 0}, "data.batch_size=0"),
    ({"splits": [0.5, 0.5, 0.5]}, "data.splits=[0.5, 0.5, 0.5]"),
    ({"num_workers": -2}, "data.num_workers=-2"),
])
def test_data_module_checks_its_own_values(tmp_path: Path, kwargs: dict, expected: str) -> None:
    opts = {"image_size": 32, "batch_size": 4, "num_workers": 0, "cache_dir": str(tmp_path / "cache"), **kwargs}
    with pytest.raises(ConfigValueError, match=re.escape(expected)):
        AgeDataModule(source="synthetic", root=str(tmp_path / "synthetic"), num_samples=10, **opts)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "synthetic").exists()


def _cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FORCE_COLOR", None)
    # stdout and stderr are pipes: not a terminal, as under nohup or SLURM
    return subprocess.run([sys.executable, "-m", "agecls.train", *args], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          text=True, timeout=timeout)


def test_bad_value_on_the_command_line_fails_with_the_key_before_any_work(tmp_path: Path) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    proc = _cli([*TINY, *SYNTHETIC, "lr=0", f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}"], REPO, timeout=300)
    assert proc.returncode != 0
    assert "lr=0: must be a number > 0" in proc.stdout, proc.stdout[-3000:]
    assert not (run_dir / "cleaning.json").exists() and not cache.exists()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    """One tiny 2-epoch `python -m agecls.train`, its stdout a pipe (no terminal). Its "best"
    checkpoint is the first epoch's (the largest val/mae_best, which never grows), so testing it
    restores a checkpoint older than the run's last step."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    best_is_first = ["callbacks.model_checkpoint.monitor=val/mae_best", "callbacks.model_checkpoint.mode=max"]
    proc = _cli([*TINY, *SYNTHETIC, *FAST, *best_is_first, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}",
                 f"paths.cache_dir={cache_dir}"], REPO)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return {"dir": run_dir, "out": proc.stdout, "metrics": json.loads((run_dir / "metrics.json").read_text())}


def test_per_epoch_lines_in_train_log_without_a_terminal(cli_run) -> None:
    log = (cli_run["dir"] / "train.log").read_text()
    line = r"Epoch {}/2: train loss \d+\.\d+, val MAE \d+\.\d+, val Pearson -?\d+\.\d+, \d+\.\d s"
    assert re.search(line.format(1) + r" \(about \d+\.\d s left\)", log), log
    assert re.search(line.format(2) + r"$", log, re.MULTILINE), log
    out = cli_run["out"]
    assert re.search(line.format(2), out), "the per-epoch lines also go to the console"
    # no progress bar without a terminal (Rich's prints only its last frame), no model/test tables
    assert "━" not in out and "it/s" not in out.split("Built preprocessing cache")[-1], out
    # a one-line summary of the config instead of the whole config
    assert "Run: backbone=tf_efficientnet_lite0" in out and "lr=0.0001" in out and "image_size=32" in out
    assert "_target_" not in out and "Config:" not in out
    assert (cli_run["dir"] / ".hydra" / "config.yaml").exists()
    assert re.search(r"Done: test MAE \d+\.\d+", out)
    # known third-party noise is silenced
    for noise in ("litlogger", "litmodels", "SpearmanCorrcoef", "LeafSpec", "No CUDA runtime"):
        assert noise not in out, noise
    assert len(out.splitlines()) <= 60, out


def _scalar_steps(run_dir: Path) -> tuple[dict[str, list[int]], set[str]]:
    steps: dict[str, list[int]] = defaultdict(list)
    hp_metrics: set[str] = set()
    for f in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps[tag] += [e.step for e in acc.Scalars(tag)]
        try:
            content = acc.PluginTagToContent("hparams")
        except KeyError:
            continue
        if "_hparams_/experiment" in content:
            experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
            hp_metrics |= {m.name.tag for m in experiment.metric_infos}
    return steps, hp_metrics


def test_tensorboard_keeps_every_point(cli_run) -> None:
    steps, hp_metrics = _scalar_steps(cli_run["dir"])
    final = cli_run["metrics"]["global_step"]
    assert Path(cli_run["metrics"]["best_checkpoint"]).name == "epoch_000.ckpt"
    for tag, seen in steps.items():
        assert len(seen) == len(set(seen)), f"{tag} has two points at one step: {seen}"
    for tag in ("val/mae", "val/mae_best", "val/pearson", "train/loss_epoch"):
        assert len(steps[tag]) == 2 and steps[tag] == sorted(steps[tag]) and steps[tag][0] < steps[tag][1], (tag, steps[tag])
    for tag in ("test/mae", "test/pearson", "test/spearman"):
        assert steps[tag] == [final], (tag, steps[tag], final)
    assert max(steps["val/mae"]) < final
    # the HParams tab's metrics, under their own tags
    for tag in ("hp/val_mae_best", "hp/test_mae", "hp/test_pearson", "hp/test_spearman"):
        assert steps[tag] == [final], (tag, steps.get(tag))
        assert tag in hp_metrics, hp_metrics
    assert "hp_metric" not in steps


def test_every_shipped_experiment_and_backbone_passes_the_checks(make_cfg) -> None:
    from agecls.utils.checks import check_train_config

    conf = REPO / "conf"
    for option in sorted(p.stem for p in (conf / "experiment").glob("*.yaml")):
        check_train_config(make_cfg(f"experiment={option}", tiny=False))
    for option in sorted(p.stem for p in (conf / "backbone").glob("*.yaml")):
        extra = ["backbone.name=resnet18"] if option == "timm" else []
        cfg = make_cfg(f"backbone={option}", *extra, tiny=False)
        check_train_config(cfg)
        assert cfg.backbone.min_image_size >= 1
