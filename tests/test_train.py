"""End-to-end training runs: every output file, real UTKFace, sweeps, the offline error."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agecls.models.module import AgeRegressor
from agecls.train import train
from tests.conftest import REPO, TINY, utkface_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scalars(run_dir: Path) -> tuple[set[str], set[str]]:
    tags, images = set(), set()
    for f in run_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"images": 1})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return tags, images


def assert_run_outputs(run_dir: Path) -> dict:
    """Everything the design says a run leaves behind, with finite test metrics."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/mae", "test/pearson", "test/spearman", "val/mae_best"):
        assert metrics.get(key) is not None and math.isfinite(metrics[key]), (key, metrics.get(key))
    assert metrics["epochs"] >= 1
    assert metrics["params/total"] >= metrics["params/trainable"] > 0

    preds = pd.read_csv(run_dir / "predictions.csv")
    assert list(preds.columns) == ["path", "age", "predicted", "predicted_raw", "predicted_low", "predicted_high"]
    assert len(preds) > 0 and preds["predicted"].notna().all()
    assert all(Path(p).exists() for p in preds["path"])

    assert (run_dir / "scatter.png").read_bytes()[:8] == PNG_MAGIC
    ckpts = {p.name for p in (run_dir / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in ckpts and any(n.startswith("epoch_") for n in ckpts), ckpts
    assert Path(metrics["best_checkpoint"]).exists()
    for name in ("cleaning.json", "split.csv", "provenance.json"):
        assert (run_dir / name).exists(), name

    tags, images = _scalars(run_dir)
    for tag in ("train/loss_step", "val/loss", "val/mae", "val/pearson", "val/spearman",
                "test/mae", "test/pearson", "test/spearman"):
        assert tag in tags, (tag, sorted(tags))
    assert "test/scatter" in images
    return metrics


def test_short_run_on_synthetic_data_leaves_every_output(make_cfg) -> None:
    cfg = make_cfg("trainer.max_epochs=2")
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    saved = assert_run_outputs(run_dir)
    assert saved["test/mae"] == pytest.approx(metrics["test/mae"])
    assert saved["epochs"] == 2
    # the test stage ran on the best checkpoint, which rebuilds with no other argument
    model = AgeRegressor.load_from_checkpoint(saved["best_checkpoint"], map_location="cpu")
    assert model.hparams.image_size == 32 and model.hparams.backbone["name"] == "tf_efficientnet_lite0"  # the default
    preds = pd.read_csv(run_dir / "predictions.csv")
    split = pd.read_csv(run_dir / "split.csv")
    assert len(preds) == min(16, int((split["split"] == "test").sum()))


def test_short_run_on_real_utkface(make_cfg) -> None:
    # the check: resnet18 unfrozen, 64 px, batches of 8, 3/2/2 batches
    cfg = make_cfg("data=utkface", f"data.root={utkface_dir()}", "backbone=resnet18", "freeze=false",
                   "data.image_size=64", "trainer.limit_train_batches=3")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert_run_outputs(run_dir)
    preds = pd.read_csv(run_dir / "predictions.csv")
    assert preds["path"].str.endswith(".jpg.chip.jpg").all()
    assert preds["age"].between(1, 116).all()


def test_efficientnet_lite0_frozen_trains_only_its_head_offline(make_cfg) -> None:
    cfg = make_cfg("backbone=efficientnet_lite0", "freeze=true", "pretrained=true")
    metrics = train(cfg)
    head = 1280 * 512 + 512 + 131_328 + 8_224 + 33
    assert metrics["params/trainable"] == head
    assert metrics["params/total"] > 4_000_000


def _cli(args: list[str], cwd: Path, env_extra: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "agecls.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_sweep_runs_six_jobs_each_with_its_own_metrics(tmp_path: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "optimizer=sgd,adam", "lr=1e-4,1e-3,1e-2", *TINY, "data.num_samples=120",
            "data.synthetic_size=48", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache_dir}",
            "logger=csv", "callbacks.model_summary=null"]
    proc = _cli(args, tmp_path, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 6
    seen = set()
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert math.isfinite(metrics["test/mae"])
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        seen.add(overrides)
    assert len(seen) == 6, "each job must run its own optimizer/lr pair"
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 6 and (summary["status"] == "ok").all()
    assert summary["val/mae_best"].is_monotonic_increasing
    assert (sweep / "summary.md").exists()


def test_pretrained_torchvision_offline_fails_before_training_with_the_file(tmp_path: Path, cache_dir: Path) -> None:
    empty = tmp_path / "torch-home"
    run_dir = tmp_path / "run"
    proc = _cli(["backbone=resnet18", "pretrained=true", f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}"],
                REPO, {"TORCH_HOME": str(empty)}, timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "resnet18-f37072fd.pth" in out
    assert str(empty / "hub" / "checkpoints") in out
    assert "pretrained=false" in out and "backbone=efficientnet_lite0" in out
    assert not (run_dir / "checkpoints").exists(), "it must fail before training starts"


@pytest.mark.slow
def test_demo_reaches_a_high_pearson(make_cfg) -> None:
    cfg = make_cfg("experiment=demo", tiny=False)
    metrics = train(cfg)
    assert metrics["test/pearson"] > 0.8
