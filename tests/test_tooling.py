"""Around training: eval, predict, sweep summaries and report, resume, Optuna, DDP, SLURM, export,
provenance and repeatability."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from agecls.eval import evaluate, load_checkpoint
from agecls.export import export_model, max_difference, sample_batch
from agecls.predict import predict
from agecls.report import report
from agecls.train import train
from agecls.utils.hydra_utils import config_dir
from tests.conftest import REPO, SYNTHETIC, TINY, compose_cfg, utkface_dir

UTK = sorted(utkface_dir().glob("*.jpg"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    """One short synthetic run shared by the eval, predict and export tests."""
    out = tmp_path_factory.mktemp("trained")
    cfg = compose_cfg([*TINY, *SYNTHETIC, f"paths.cache_dir={cache_dir}", "trainer.max_epochs=2"], out / "run")
    metrics = train(cfg)
    return {"cfg": cfg, "metrics": metrics, "dir": out / "run", "ckpt": metrics["best_checkpoint"]}


def _compose(name: str, overrides: list[str], output_dir: Path):
    return compose_cfg(overrides, output_dir, config_name=name)


def _utk_folder(dest: Path, n: int, start: int = 0) -> Path:
    dest.mkdir(parents=True)
    for f in UTK[start:: len(UTK) // n][:n]:
        shutil.copy(f, dest / f.name)
    return dest


# ----------------------------------------------------------------------------------------- eval
def test_eval_reproduces_the_training_test_metrics_from_the_checkpoint_alone(trained, tmp_path, cache_dir) -> None:
    cfg = _compose("eval", [f"ckpt_path={trained['ckpt']}", f"paths.cache_dir={cache_dir}", "eval.num_workers=0",
                            "trainer.accelerator=cpu"], tmp_path / "eval")
    metrics = evaluate(cfg)
    assert metrics["test/mae"] == pytest.approx(trained["metrics"]["test/mae"], abs=1e-5)
    out = tmp_path / "eval"
    saved = json.loads((out / "metrics.json").read_text())
    assert "test/cs5" in saved and any(k.startswith("mae_by_decade/") for k in saved)
    assert (out / "scatter.png").exists()
    preds = pd.read_csv(out / "predictions.csv")
    train_preds = pd.read_csv(trained["dir"] / "predictions.csv")
    assert set(preds["path"]) == set(train_preds["path"])


def test_eval_all_on_a_folder_the_model_never_saw(trained, tmp_path, cache_dir) -> None:
    folder = _utk_folder(tmp_path / "unseen", 38)
    # a byte-identical copy and a 110-year-old: each file still gets its prediction
    shutil.copy(next(folder.iterdir()), folder / "25_0_0_20170101000000000.jpg.chip.jpg")
    shutil.copy(UTK[0], folder / "110_0_0_20170101000000001.jpg.chip.jpg")
    cfg = _compose("eval", [f"ckpt_path={trained['ckpt']}", "data=utkface", f"data.root={folder}", "eval.split=all",
                            f"paths.cache_dir={cache_dir}", "eval.num_workers=0", "trainer.accelerator=cpu"],
                   tmp_path / "eval")
    pixel_caches = set((cache_dir / "pixels").glob("*"))
    metrics = evaluate(cfg)
    assert set((cache_dir / "pixels").glob("*")) == pixel_caches, "eval decodes once: no preprocessing cache"
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert len(preds) == 40 == metrics["test/n_images"]
    assert sorted(Path(p).name for p in preds["path"]) == sorted(p.name for p in folder.iterdir())
    assert np.isfinite(preds["predicted"]).all()
    assert math.isfinite(metrics["test/mae"]) and 0 <= metrics["test/cs5"] <= 1


# -------------------------------------------------------------------------------------- predict
def test_predict_on_a_folder_with_a_broken_file(trained, tmp_path) -> None:
    folder = _utk_folder(tmp_path / "in", 6)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    cfg = _compose("predict", [f"ckpt_path={trained['ckpt']}", f"input={folder}", "num_workers=0", "batch_size=4",
                               "detect_faces=false"],
                   tmp_path / "p")
    table = predict(cfg)
    assert len(table) == 7
    broken = table[table["path"].str.endswith("broken.jpg")]
    assert broken["error"].iloc[0] != "" and np.isnan(broken["predicted"].iloc[0])
    good = table[table["error"] == ""]
    assert len(good) == 6 and np.isfinite(good["predicted"]).all()
    # the same images through the evaluation path give the same ages
    model, _ = load_checkpoint(trained["ckpt"])
    batch = sample_batch(model, str(folder), 6)
    with torch.no_grad():
        direct = model.eval()(batch).numpy()
    assert np.allclose(np.sort(direct), np.sort(good["predicted_raw"].to_numpy()), atol=0.01)


def test_predict_csv_input_with_tta_and_face_detection(trained, tmp_path) -> None:
    face = Image.open(UTK[500]).convert("RGB")
    canvas = Image.new("RGB", (640, 480), (120, 130, 140))
    canvas.paste(face, (300, 120))
    canvas.save(tmp_path / "scene.jpg")
    Image.new("RGB", (200, 200), (90, 90, 90)).save(tmp_path / "blank.jpg")
    pd.DataFrame({"path": ["scene.jpg", "blank.jpg"], "age": [30, 40]}).to_csv(tmp_path / "in.csv", index=False)
    cfg = _compose("predict", [f"ckpt_path={trained['ckpt']}", f"input={tmp_path / 'in.csv'}", "num_workers=0",
                               "detect_faces=true", "tta=flip"], tmp_path / "p")
    table = predict(cfg).set_index("path")
    scene = table.loc[str(tmp_path / "scene.jpg")]
    assert scene["status"] == "ok" and scene["face"] == 0
    x1, y1, x2, y2 = (int(scene[k]) for k in ("x0", "y0", "x1", "y1"))
    assert 250 < (x1 + x2) / 2 < 450 and 150 < (y1 + y2) / 2 < 300  # the pasted face, not the background
    assert table.loc[str(tmp_path / "blank.jpg"), "status"] == "no_face"
    assert list(table.columns[:2]) == ["age", "face"]  # the CSV's ages are carried over


# --------------------------------------------------------------------------------- sweep, report
def _cli(module: str, args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


@pytest.fixture(scope="module")
def failed_sweep(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    sweep = tmp_path_factory.mktemp("sweep") / "s"
    proc = _cli("agecls.train", ["-m", "backbone=resnet18", "freeze=false,true,layer1,layer2,layer3,layer9", *TINY, *SYNTHETIC,
                                 f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}"], REPO)
    return sweep, proc


def test_a_failing_job_is_recorded_and_the_others_still_run(failed_sweep) -> None:
    sweep, proc = failed_sweep
    assert proc.returncode != 0, "a sweep with a failed job must not exit 0"
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 6
    assert (summary["status"] == "ok").sum() == 5
    failed = summary[summary["status"] == "failed"].iloc[0]
    assert "layer9" in failed["overrides"] and "layer9" in failed["error"] and "ValueError" in failed["error"]
    assert summary.iloc[-1]["status"] == "failed", "failed jobs sort last"
    ok = summary[summary["status"] == "ok"]
    assert ok["val/mae_best"].is_monotonic_increasing
    assert "failed" in (sweep / "summary.md").read_text()


def test_report_rebuilds_the_summary_and_draws_the_figures(failed_sweep) -> None:
    sweep, _ = failed_sweep
    (sweep / "summary.csv").unlink()
    summary = report(sweep)
    assert len(summary) == 6 and (sweep / "summary.csv").exists()
    for png in ("lr_vs_metric.png", "val_curves.png"):
        assert (sweep / png).read_bytes()[:4] == b"\x89PNG", png
    proc = _cli("agecls.report", [str(sweep / "nope")], REPO, timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr


# -------------------------------------------------------------------------------------- resume
RESUME = [*TINY, *SYNTHETIC, "backbone=resnet18", "trainer.max_epochs=4", "trainer.limit_train_batches=6", "data.num_workers=2",
          "trainer.deterministic=true", "model.head_dropout=0.2", "callbacks.early_stopping=null"]


@pytest.mark.slow  # 73 s: make test-full
def test_resume_after_sigkill_ends_with_the_uninterrupted_metrics(tmp_path, cache_dir) -> None:
    common = [*RESUME, f"paths.cache_dir={cache_dir}"]
    straight = _cli("agecls.train", [*common, f"hydra.run.dir={tmp_path / 'straight'}"], REPO)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agecls.train", *common, f"hydra.run.dir={run}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its data-loading workers, mid-training
    proc.wait()
    assert not (run / "metrics.json").exists(), "killed too late: the run had finished"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.endswith(".log")}

    resumed = _cli("agecls.train", [*common, f"hydra.run.dir={run}", "ckpt_path=last"], REPO)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    for key in ("test/mae", "test/pearson", "test/spearman", "val/mae_best", "epochs", "global_step"):
        assert a[key] == b[key], key
    # nothing the first attempt wrote was lost or overwritten
    for name, data in before.items():
        kept = run / name if name not in ("provenance.json",) else run / "provenance.1.json"
        assert kept.read_bytes() == data, name
    assert (run / ".hydra.1" / "config.yaml").exists() and (run / ".hydra" / "config.yaml").exists()


# -------------------------------------------------------------------------------- optuna, ddp
def test_optuna_search_over_optimizer_lr_freeze_and_head(tmp_path, cache_dir) -> None:
    sweep = tmp_path / "opt"
    proc = _cli("agecls.train", ["hparams_search=optuna", "hydra.sweeper.n_trials=3",
                                 "hydra.sweeper.sampler.n_startup_trials=2", *TINY, *SYNTHETIC,
                                 f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}"], REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from omegaconf import OmegaConf

    result = OmegaConf.load(sweep / "optimization_results.yaml")
    assert set(result.best_params) == {"optimizer", "lr", "freeze", "head"}
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 3
    assert result.best_value == pytest.approx(summary["val/mae_best"].min())


# jpeg: the same lock and build path as raw (pipelines.cached), only the cache class differs: slow
@pytest.mark.slow  # 46 s: make test-full
@pytest.mark.parametrize("cache_format", ["raw", pytest.param("jpeg", marks=pytest.mark.slow)])
def test_ddp_on_two_cpu_processes_writes_one_synchronised_set_of_outputs(tmp_path, cache_format) -> None:
    run, cache = tmp_path / "ddp", tmp_path / "cache"  # a cache folder of its own: built by this run
    over = [o for o in TINY if not o.startswith(("trainer.accelerator", "trainer.limit_test"))]
    proc = _cli("agecls.train", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *over, *SYNTHETIC,
                                 "data.cache=true", f"data.cache_format={cache_format}",
                                 f"paths.cache_dir={cache}", f"hydra.run.dir={run}"], REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the preprocessing cache was built once, by one rank, and both ranks read it
    output = proc.stdout + proc.stderr
    built = "Built JPEG preprocessing cache" if cache_format == "jpeg" else "Built preprocessing cache"
    assert output.count(built) == 1, output[-3000:]
    folder = cache / ("jpegs" if cache_format == "jpeg" else "pixels")
    assert len([p for p in folder.iterdir() if not p.name.startswith(".")]) == 1
    metrics = json.loads((run / "metrics.json").read_text())
    preds = pd.read_csv(run / "predictions.csv")
    split = pd.read_csv(run / "split.csv")
    assert len(preds) == int((split["split"] == "test").sum()) == metrics["test/n_images"]
    # the logged metric covers both ranks' images, each once
    assert metrics["test/mae"] == pytest.approx((preds["predicted"] - preds["age"]).abs().mean(), abs=1e-4)
    assert len(list(run.glob("metrics*.json"))) == 1 and len(list(run.glob("provenance*.json"))) == 1
    assert not list(run.glob(".hydra.*"))


def test_slurm_launcher_configs_compose() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for launcher in ("slurm", "submitit_slurm"):
            cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "trainer=ddp", "trainer.devices=4"],
                          return_hydra_config=True)
            assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
            assert cfg.trainer.strategy == "ddp"
        assert cfg.hydra.launcher.timeout_min > 0


# -------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_the_checkpoint_on_real_images(trained, tmp_path, fmt) -> None:
    model, _ = load_checkpoint(trained["ckpt"])
    path = export_model(model.eval(), fmt, tmp_path / f"m.{fmt}")
    batch = sample_batch(model, str(utkface_dir()), 8)
    assert batch.shape == (8, 3, 32, 32)
    assert max_difference(model, path, fmt, batch) < 1e-4
    assert json.loads(path.with_suffix(".json").read_text())["image_size"] == 32


def test_export_command_verifies_what_it_wrote(trained, tmp_path) -> None:
    folder = _utk_folder(tmp_path / "faces", 4)
    out = tmp_path / "model.onnx"
    proc = _cli("agecls.export", [f"ckpt_path={trained['ckpt']}", "format=onnx", f"output={out}",
                                  f"verify_input={folder}", f"hydra.run.dir={tmp_path / 'x'}"], REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists() and "Verified on 4 images" in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------- provenance
def test_provenance_and_bit_for_bit_repeat(make_cfg, tmp_path) -> None:
    runs = []
    for name in ("a", "b"):
        cfg = make_cfg("trainer.max_epochs=2", "data.num_workers=2", f"paths.output_dir={tmp_path / name}")
        train(cfg)
        runs.append(tmp_path / name)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in runs)
    for key in a:
        if not key.startswith("time/") and key != "best_checkpoint":
            assert a[key] == b[key], key
    assert (runs[0] / "predictions.csv").read_bytes() == (runs[1] / "predictions.csv").read_bytes()
    prov = json.loads((runs[0] / "provenance.json").read_text())
    assert prov["packages"]["torch"] == torch.__version__.split("+")[0] or prov["packages"]["torch"]
    assert prov["packages"]["lightning"] and prov["command"]
    if (REPO / ".git").exists():
        assert len(prov["git"]["commit"]) == 40
