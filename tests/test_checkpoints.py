"""Checkpoints: read safely everywhere (no pickled code runs), and a checkpoint's own split is
evaluated exactly, image by image, or not at all."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agecls.data.splits import SplitMembershipError, decode_membership
from agecls.eval import evaluate, load_checkpoint
from agecls.export import main as export_main
from agecls.models.module import AgeRegressor
from agecls.predict import predict
from agecls.train import resolve_ckpt_path, train
from agecls.utils.checkpoint import CheckpointError, read_checkpoint
from tests.conftest import TINY, compose_cfg, utkface_dir

NOT_A_CHECKPOINT = r"is not an agecls checkpoint written by agecls\.train"


# ------------------------------------------------------------------------------- safe loading
class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def bad_checkpoints(tmp_path: Path) -> dict:
    """A checkpoint shaped like agecls's with a code-running payload in its hyperparameters, and
    a text file named .ckpt."""
    marker = tmp_path / "PAYLOAD_RAN"
    payload = tmp_path / "payload.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": {"name": "resnet18"}, "head": {"hidden": [8]},
                                                        "optimizer": _Payload(marker)}}, payload)
    text = tmp_path / "notes.ckpt"
    text.write_text("epoch 3: val/mae 7.1\n")
    return {"payload": payload, "text": text, "marker": marker}


def _a_face() -> Path:
    """A real photo for predict (its input is checked before the checkpoint)."""
    return next(iter(sorted(utkface_dir().glob("*.jpg"))))


def _eval_cfg(ckpt: Path | str, out: Path, *extra: str):
    return compose_cfg([f"ckpt_path={ckpt}", "eval.num_workers=0", "trainer.accelerator=cpu", *extra], out, "eval")


ENTRY_POINTS = {
    "eval": lambda ckpt, tmp, make_cfg: evaluate(_eval_cfg(ckpt, tmp / "eval")),
    "predict": lambda ckpt, tmp, make_cfg: predict(compose_cfg([f"ckpt_path={ckpt}", f"input={_a_face()}", "num_workers=0",
                                                                "detect_faces=false"],
                                                               tmp / "p", "predict")),
    "export": lambda ckpt, tmp, make_cfg: export_main.__wrapped__(
        compose_cfg([f"ckpt_path={ckpt}", f"output={tmp / 'm.onnx'}"], tmp / "x", "export")),
    "resume": lambda ckpt, tmp, make_cfg: train(make_cfg(f"ckpt_path={ckpt}")),
    "load_from_checkpoint": lambda ckpt, tmp, make_cfg: AgeRegressor.load_from_checkpoint(ckpt),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(("kind", "reason"), [("payload", r"could run code.*weights_only=True"),
                                              ("text", r"not a file torch\.save wrote")])
def test_a_bad_checkpoint_runs_nothing_and_gets_one_clear_error(entry, kind, reason, bad_checkpoints, tmp_path,
                                                                  make_cfg) -> None:
    path = bad_checkpoints[kind]
    with pytest.raises(CheckpointError, match=f"{path.name}'.*{NOT_A_CHECKPOINT}.*{reason}"):
        ENTRY_POINTS[entry](path, tmp_path, make_cfg)
    assert not bad_checkpoints["marker"].exists(), "the checkpoint's pickled code ran"


def test_other_files_are_refused_with_what_was_expected(tmp_path) -> None:
    torch.save({"model": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"hyper_parameters\.backbone and state_dict.*no state_dict"):
        read_checkpoint(tmp_path / "other.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, tmp_path / "lightning.ckpt")
    with pytest.raises(CheckpointError, match=r"no backbone dict"):
        load_checkpoint(tmp_path / "lightning.ckpt")
    with pytest.raises(CheckpointError, match="not a file"):
        read_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        read_checkpoint(tmp_path / "nowhere.ckpt")


# ------------------------------------------------------------------- a real checkpoint (UTKFace)
N_IMAGES = 150


@pytest.fixture(scope="module")
def utk_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    """A tiny model trained on a copy of 150 UTKFace images; its best checkpoint and test members."""
    base = tmp_path_factory.mktemp("utk-run")
    files = sorted(utkface_dir().glob("*.jpg"))
    root = base / "faces"
    root.mkdir()
    for f in files[:: len(files) // N_IMAGES][:N_IMAGES]:
        shutil.copy(f, root / f.name)
    cfg = compose_cfg([*TINY, "backbone=resnet18", "data=utkface", f"data.root={root}", f"paths.cache_dir={cache_dir}",
                       "trainer.limit_test_batches=1.0"], base / "run")
    metrics = train(cfg)
    ckpt = Path(metrics["best_checkpoint"])
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)  # what is saved must load safely
    test = decode_membership(saved["AgeDataModule"]["split_membership"], "test")
    assert len(test) == metrics["test/n_images"] >= 5
    return {"root": root, "dir": base / "run", "ckpt": ckpt, "metrics": metrics, "test": test, "base": base}


def _copy_with(run: dict, dest: Path, change) -> Path:
    """A checkpoint of `run` whose data set was moved to `dest` (a copy that `change` then edits):
    what an older checkpoint meets when the data changed since."""
    shutil.copytree(run["root"], dest)
    change(dest)
    ckpt = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    ckpt["datamodule_hyper_parameters"]["root"] = str(dest)
    path = dest.parent / "moved.ckpt"
    torch.save(ckpt, path)
    return path


def _evaluated(out: Path, root: Path) -> list[str]:
    paths = pd.read_csv(out / "predictions.csv")["path"]
    return sorted(Path(p).resolve().relative_to(root.resolve()).as_posix() for p in paths)


def test_a_real_checkpoint_loads_safely_and_predicts_what_training_tested(utk_run, tmp_path) -> None:
    ckpt = utk_run["ckpt"]
    assert resolve_ckpt_path(str(ckpt), tmp_path) == str(ckpt)  # resume accepts it
    last = utk_run["dir"] / "checkpoints" / "last.ckpt"
    assert "rng_states" in str(read_checkpoint(last)["callbacks"])  # every callback state is plain data
    assert resolve_ckpt_path("last", utk_run["dir"]) == str(last)
    a = AgeRegressor.load_from_checkpoint(ckpt)
    b, _ = load_checkpoint(ckpt)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    trained = pd.read_csv(utk_run["dir"] / "predictions.csv")
    pd.DataFrame({"path": trained["path"], "age": trained["age"]}).to_csv(tmp_path / "in.csv", index=False)
    table = predict(compose_cfg([f"ckpt_path={ckpt}", f"input={tmp_path / 'in.csv'}", "num_workers=0",
                                 "detect_faces=false"], tmp_path / "p",
                                "predict"))
    assert np.allclose(table["predicted"].to_numpy(), trained["predicted"].to_numpy(), atol=0.011)


def test_eval_tests_exactly_the_checkpoints_test_images_and_reproduces_its_metrics(utk_run, tmp_path) -> None:
    metrics = evaluate(_eval_cfg(utk_run["ckpt"], tmp_path / "eval"))
    assert _evaluated(tmp_path / "eval", utk_run["root"]) == sorted(utk_run["test"])
    for key in ("test/mae", "test/pearson"):
        assert metrics[key] == pytest.approx(utk_run["metrics"][key], abs=1e-5), key
    assert metrics["members/evaluated"] == metrics["members/saved"] == len(utk_run["test"])
    assert metrics["members/missing"] == metrics["members/changed"] == 0


def test_eval_after_a_test_image_was_removed_stops_or_evaluates_the_rest_on_request(utk_run, tmp_path) -> None:
    gone = sorted(utk_run["test"])[1]
    ckpt = _copy_with(utk_run, tmp_path / "faces", lambda d: (d / gone).unlink())
    with pytest.raises(SplitMembershipError, match=rf"1 missing.*and 0 changed.*missing: {gone}.*eval\.allow_changed=true"):
        evaluate(_eval_cfg(ckpt, tmp_path / "strict"))
    assert not (tmp_path / "strict" / "predictions.csv").exists()

    metrics = evaluate(_eval_cfg(ckpt, tmp_path / "allowed", "eval.allow_changed=true"))
    assert _evaluated(tmp_path / "allowed", tmp_path / "faces") == sorted(set(utk_run["test"]) - {gone})
    assert (metrics["members/evaluated"], metrics["members/missing"], metrics["members/changed"]) == (
        len(utk_run["test"]) - 1, 1, 0)


def test_eval_detects_a_test_image_whose_content_changed_at_the_same_path(utk_run, tmp_path) -> None:
    changed = sorted(utk_run["test"])[0]
    other = next(p for p in sorted(utkface_dir().glob("*.jpg")) if not (utk_run["root"] / p.name).exists())
    ckpt = _copy_with(utk_run, tmp_path / "faces", lambda d: shutil.copyfile(other, d / changed))
    with pytest.raises(SplitMembershipError, match=rf"0 missing.*and 1 changed.*changed: {changed}"):
        evaluate(_eval_cfg(ckpt, tmp_path / "strict"))
    metrics = evaluate(_eval_cfg(ckpt, tmp_path / "allowed", "eval.allow_changed=true"))
    assert changed not in _evaluated(tmp_path / "allowed", tmp_path / "faces")
    assert (metrics["members/evaluated"], metrics["members/changed"]) == (len(utk_run["test"]) - 1, 1)


def test_an_old_checkpoint_without_membership_is_evaluated_with_a_warning(utk_run, tmp_path, caplog) -> None:
    """Refused by default (issue 18.4: no silent fallback); eval.allow_changed=true rebuilds the split, warning."""
    ckpt = torch.load(utk_run["ckpt"], map_location="cpu", weights_only=True)
    del ckpt["AgeDataModule"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    with caplog.at_level(logging.WARNING, logger="agecls"):
        metrics = evaluate(_eval_cfg(tmp_path / "old.ckpt", tmp_path / "eval", "eval.allow_changed=true"))
    assert "does not record which images were in its splits" in caplog.text
    assert not any(k.startswith("members/") for k in metrics)
    assert AgeRegressor.load_from_checkpoint(tmp_path / "old.ckpt") is not None
