"""agecls.AgeEstimator, the Python API (issue 19.1-19.3): a path, a PIL image, a numpy array and a
list give the CLI's rows; .onnx and .ckpt agree; detection is on by default; draw marks each box;
every output file a user names is checked before any work and never replaces an input."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

import agecls
from agecls.estimator import COLOURS, FaceAge, FaceOptions
from agecls.export import export_checked
from agecls.predict import predict
from agecls.train import train
from agecls.utils.checks import ConfigValueError
from tests.conftest import SYNTHETIC, TINY, compose_cfg, utkface_dir

UTK = sorted(utkface_dir().glob("*.jpg"))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    """A tiny model trained with a label-distribution loss (so its intervals have a width), exported."""
    out = tmp_path_factory.mktemp("estimator")
    cfg = compose_cfg([*TINY, *SYNTHETIC, f"paths.cache_dir={cache_dir}", "loss=dldl", "data.augment.compile=false"],
                      out / "run")
    ckpt = Path(train(cfg)["best_checkpoint"])
    onnx = out / "model.onnx"
    export_checked(compose_cfg([f"ckpt_path={ckpt}", f"output={onnx}"], out / "export", "export"))
    return {"ckpt": ckpt, "onnx": onnx, "base": out}


def _two_faces(path: Path) -> list[tuple[int, int, int, int]]:
    """Two real UTKFace crops pasted side by side into one photo: where they are."""
    canvas = Image.new("RGB", (700, 400), (120, 130, 140))
    canvas.paste(Image.open(UTK[500]).convert("RGB"), (40, 80))
    canvas.paste(Image.open(UTK[3000]).convert("RGB").resize((150, 150)), (450, 120))
    canvas.save(path, quality=95)
    return [(40, 80, 240, 280), (450, 120, 600, 270)]


def _inside(box, pasted) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return pasted[0] < cx < pasted[2] and pasted[1] < cy < pasted[3]


def test_the_package_exports_the_api_without_importing_torch() -> None:
    code = "import sys, agecls; assert 'torch' not in sys.modules; print(agecls.AgeEstimator.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "AgeEstimator"
    assert {"AgeEstimator", "FaceAge", "FaceOptions"} <= set(agecls.__all__)


def test_path_pil_numpy_and_list_give_the_clis_rows(model, tmp_path) -> None:
    photo = tmp_path / "two.jpg"
    pasted = _two_faces(photo)
    est = agecls.AgeEstimator.from_checkpoint(model["ckpt"], device="cpu")
    assert est.options.detect_faces  # detection is on by default
    by_path = est.predict(str(photo))
    assert len(by_path) == 2 and all(isinstance(f, FaceAge) and f.status == "ok" for f in by_path)
    assert _inside(by_path[0].box, pasted[0]) and _inside(by_path[1].box, pasted[1])  # largest first
    for face in by_path:
        low, high = face.interval
        assert low <= face.age <= high and high - low > 0.5
        assert len(face.landmarks) == 5 and 0 <= face.score <= 1
        assert est.age_range[0] <= face.age <= est.age_range[1]
    pil = Image.open(photo)
    rgb = np.asarray(pil.convert("RGB"))
    by_pil, by_array = est.predict(pil), est.predict(rgb)
    listed = est.predict([photo, pil, rgb])
    for rows in (by_pil, by_array, *listed):
        assert [r.box for r in rows] == [r.box for r in by_path]
        np.testing.assert_allclose([r.age for r in rows], [r.age for r in by_path], atol=1e-4)
        np.testing.assert_allclose([r.interval for r in rows], [r.interval for r in by_path], atol=1e-4)

    # the CLI, with its defaults, on the same file: the same rows
    table = predict(compose_cfg([f"ckpt_path={model['ckpt']}", f"input={photo}", "num_workers=0", "device=cpu"],
                                tmp_path / "cli", "predict"))
    assert len(table) == 2 and list(table["status"]) == ["ok", "ok"]
    assert [tuple(r) for r in table[["x0", "y0", "x1", "y1"]].to_numpy()] == [r.box for r in by_path]
    np.testing.assert_allclose(table["predicted"], [r.age for r in by_path], atol=0.006)
    np.testing.assert_allclose(table["predicted_low"], [r.interval[0] for r in by_path], atol=0.006)
    np.testing.assert_allclose(table["predicted_high"], [r.interval[1] for r in by_path], atol=0.006)


def test_exif_is_applied_for_paths_and_pil_images(model, tmp_path) -> None:
    photo = tmp_path / "two.jpg"
    _two_faces(photo)
    upright = Image.open(photo)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored a quarter turn; a viewer turns it back
    turned = tmp_path / "turned.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(turned, quality=95, exif=exif)
    est = agecls.AgeEstimator.from_checkpoint(model["ckpt"], device="cpu")
    want = est.predict(photo)
    for x in (turned, Image.open(turned)):
        got = est.predict(x)
        assert len(got) == 2
        for g, w in zip(got, want, strict=True):
            assert np.abs(np.subtract(g.box, w.box)).max() <= 6 and abs(g.age - w.age) < 1.0
    assert ImageOps.exif_transpose(Image.open(turned)).size == (700, 400)


def test_bad_inputs_are_named(model) -> None:
    est = agecls.AgeEstimator.from_checkpoint(model["ckpt"], device="cpu")
    with pytest.raises(ValueError, match="uint8 RGB"):
        est.predict(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(TypeError, match="cannot read a photo from a int"):
        est.predict(5)
    with pytest.raises(ConfigValueError, match=r"faces='every'"):
        FaceOptions(faces="every")
    with pytest.raises(FileNotFoundError, match="ckpt_path='nope.ckpt' is not a file"):
        agecls.AgeEstimator.from_checkpoint("nope.ckpt")
    with pytest.raises(ValueError, match=r"coverage=0.7.*calibrated at coverage 0.5, 0.8, 0.9, 0.95"):
        agecls.AgeEstimator.from_checkpoint(model["ckpt"], device="cpu", coverage=0.7)


def test_onnx_and_ckpt_give_the_same_ages_and_intervals(model, tmp_path) -> None:
    folder = tmp_path / "faces"
    folder.mkdir()
    for f in UTK[:: len(UTK) // 5][:5]:
        shutil.copy(f, folder / f.name)
    photos = sorted(folder.iterdir())
    for tta in ("none", "flip"):
        by = {k: agecls.AgeEstimator.from_checkpoint(model[k], device="cpu", detect_faces=False, tta=tta)
              for k in ("ckpt", "onnx")}
        assert by["onnx"].calibration.margin(0.9) == pytest.approx(by["ckpt"].calibration.margin(0.9))
        ckpt_rows, onnx_rows = (by[k].predict(photos) for k in ("ckpt", "onnx"))
        for c, o in zip(ckpt_rows, onnx_rows, strict=True):
            assert abs(c[0].age - o[0].age) <= 0.05 and abs(c[0].age_raw - o[0].age_raw) <= 0.05
            assert np.abs(np.subtract(c[0].interval, o[0].interval)).max() <= 0.05, tta
    # the .onnx alone (no .json beside it) gives the same
    alone = tmp_path / "alone" / "model.onnx"
    alone.parent.mkdir()
    shutil.copy(model["onnx"], alone)
    solo = agecls.AgeEstimator.from_checkpoint(alone, device="cpu", detect_faces=False).predict(photos[0])
    ref = agecls.AgeEstimator.from_checkpoint(model["onnx"], device="cpu", detect_faces=False).predict(photos[0])
    assert solo[0].age == pytest.approx(ref[0].age) and solo[0].interval == pytest.approx(ref[0].interval)


def test_draw_outlines_each_box_and_writes_its_label(model, tmp_path) -> None:
    photo = tmp_path / "two.jpg"
    _two_faces(photo)
    est = agecls.AgeEstimator.from_checkpoint(model["ckpt"], device="cpu")
    faces = est.predict(photo)
    drawn = np.asarray(est.draw(photo, faces)).astype(int)
    plain = np.asarray(Image.open(photo).convert("RGB")).astype(int)
    assert drawn.shape == plain.shape
    for k, face in enumerate(faces):
        x0, y0, x1, y1 = face.box
        mid = (y0 + y1) // 2
        for x, y in ((x0, mid), (x1 - 1, mid), ((x0 + x1) // 2, y0), ((x0 + x1) // 2, y1 - 1)):  # the outline
            assert np.abs(drawn[y, x] - COLOURS[k]).max() <= 1, (k, x, y, drawn[y, x])
        inside = drawn[y0 + 10:y1 - 10, x0 + 10:x1 - 10]  # the face itself is not painted over
        assert np.array_equal(inside, plain[y0 + 10:y1 - 10, x0 + 10:x1 - 10])
        tag = drawn[max(0, y0 - 20):y0, x0:x0 + 40]  # the label: a tag of the box's colour with dark text in it
        assert (np.abs(tag - COLOURS[k]).max(axis=-1) <= 1).mean() > 0.3
        assert (tag.sum(axis=-1) < 150).any()
    assert est.draw(photo, []).tobytes() == Image.open(photo).convert("RGB").tobytes()


def test_no_face_rows_and_whole_image(model, tmp_path) -> None:
    wall = Image.new("RGB", (300, 200), (90, 90, 90))
    est = agecls.AgeEstimator.from_checkpoint(model["ckpt"], device="cpu")
    [row] = est.predict(wall)
    assert row.status == "no_face" and math.isnan(row.age) and row.box is None
    whole = agecls.AgeEstimator.from_checkpoint(model["ckpt"], device="cpu", no_face="whole_image").predict(wall)
    assert whole[0].status == "whole_image" and whole[0].box == (0, 0, 300, 200) and math.isfinite(whole[0].age)
    assert row.to_dict()["age"] is None  # JSON-ready


# --------------------------------------------------------------------------- outputs never lost
def _predict_cfg(model: dict, tmp_path: Path, *over: str):
    return compose_cfg([f"ckpt_path={model['ckpt']}", "num_workers=0", "device=cpu", "detect_faces=false", *over],
                       tmp_path / "run", "predict")


def test_predict_refuses_its_input_a_folder_or_an_existing_file_before_any_work(model, tmp_path, monkeypatch) -> None:
    from agecls import predict as predict_module

    crops = tmp_path / "crops"
    crops.mkdir()
    for f in UTK[:3]:
        shutil.copy(f, crops / f.name)
    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": [f"crops/{f.name}" for f in UTK[:3]]}).to_csv(listing, index=False)
    before = listing.read_bytes()
    calls: list[str] = []
    monkeypatch.setattr(predict_module, "predict", lambda *a, **k: calls.append("predicted"))
    cases = {
        "its own input": ([f"input={listing}", f"output={listing}"], "own input"),
        "a folder": ([f"input={crops}", f"output={tmp_path}"], "is a folder"),
        "an existing file": ([f"input={crops}", f"output={tmp_path / 'old.csv'}"], "exists"),
        "another format": ([f"input={crops}", f"output={tmp_path / 'p.xlsx'}"], ".csv or .json"),
        "an unwritable folder": ([f"input={crops}", "output=/proc/agecls/p.csv"], "cannot be created or written"),
    }
    (tmp_path / "old.csv").write_text("keep me\n")
    for name, (over, words) in cases.items():
        with pytest.raises(ConfigValueError, match=words):
            predict_module.run(_predict_cfg(model, tmp_path, *over))
        assert calls == [], name
    assert listing.read_bytes() == before and (tmp_path / "old.csv").read_text() == "keep me\n"


def test_predict_overwrite_true_replaces_and_annotated_copies_are_written(model, tmp_path) -> None:
    from agecls.predict import annotate_folder, output_path, write_table

    photo = tmp_path / "in" / "two.jpg"
    photo.parent.mkdir()
    _two_faces(photo)
    out = tmp_path / "p.json"
    out.write_text("old")
    cfg = compose_cfg([f"ckpt_path={model['ckpt']}", f"input={photo}", "num_workers=0", "device=cpu",
                       f"output={out}", "overwrite=true", "draw=true"], tmp_path / "run", "predict")
    target, annotate = output_path(cfg), annotate_folder(cfg)
    table = predict(cfg, annotate=annotate)
    write_table(table, target)
    import json

    records = json.loads(out.read_text())
    assert len(records) == 2 and len(records[0]["landmarks"]) == 5 and records[0]["predicted_low"] is not None
    copy = annotate / "two.annotated.jpg"
    assert copy.is_file() and Image.open(copy).size == (700, 400)
    # annotated copies never go into the input folder
    bad = compose_cfg([f"ckpt_path={model['ckpt']}", f"input={photo.parent}", f"annotate_dir={photo.parent / 'a'}"],
                      tmp_path / "run2", "predict")
    with pytest.raises(ConfigValueError, match="inside the input folder"):
        annotate_folder(bad)


def test_export_never_replaces_its_checkpoint(model, tmp_path) -> None:
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(model["ckpt"], ckpt)
    before = ckpt.read_bytes()
    for output, words in ((ckpt, "own input"), (tmp_path / "model.pt", r"\.onnx"), (tmp_path, "folder")):
        with pytest.raises(ConfigValueError, match=words):
            export_checked(compose_cfg([f"ckpt_path={ckpt}", f"output={output}"], tmp_path / "e", "export"))
    assert ckpt.read_bytes() == before
    # an existing export is kept unless overwrite=true
    first = export_checked(compose_cfg([f"ckpt_path={ckpt}"], tmp_path / "e", "export"))
    assert first == ckpt.with_suffix(".onnx") and first.with_suffix(".json").is_file()
    with pytest.raises(ConfigValueError, match="exists"):
        export_checked(compose_cfg([f"ckpt_path={ckpt}"], tmp_path / "e", "export"))
    export_checked(compose_cfg([f"ckpt_path={ckpt}", "overwrite=true"], tmp_path / "e", "export"))
    assert ckpt.read_bytes() == before
    assert not list(tmp_path.glob(".model.export-*"))  # the staging folder is gone


def test_calibrate_gives_an_old_checkpoint_intervals_in_a_copy(model, tmp_path, caplog) -> None:
    import logging

    import torch

    from agecls.calibrate import run as calibrate

    saved = torch.load(model["ckpt"], map_location="cpu", weights_only=True)
    stored = saved.pop("agecls_calibration")
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    before = old.read_bytes()
    caplog.set_level(logging.WARNING)
    est = agecls.AgeEstimator.from_checkpoint(old, device="cpu", detect_faces=False)
    [face] = est.predict(UTK[0])
    assert math.isfinite(face.age) and all(math.isnan(v) for v in face.interval)
    assert "no calibrated age interval" in caplog.text

    cfg = compose_cfg([f"ckpt_path={old}", "eval.num_workers=0"], tmp_path / "cal", "calibrate")
    out = calibrate(cfg)
    assert out == tmp_path / "old.calibrated.ckpt" and old.read_bytes() == before  # the input is untouched
    new = torch.load(out, map_location="cpu", weights_only=True)["agecls_calibration"]
    # the checkpoint's own validation split, as training calibrated it: the same margins
    assert new["n"] == stored["n"] and new["base"] == "distribution"
    for level, margin in stored["margins"].items():
        assert new["margins"][level] == pytest.approx(margin, abs=1e-3)
    [face] = agecls.AgeEstimator.from_checkpoint(out, device="cpu", detect_faces=False).predict(UTK[0])
    assert face.interval[0] <= face.age <= face.interval[1]
    with pytest.raises(ConfigValueError, match="exists"):
        calibrate(cfg)


def test_predict_refuses_a_fifo_without_opening_it(model, tmp_path) -> None:
    """A FIFO named like a photo: refused by its type (os.stat), never opened (an open would block)."""
    import os
    import signal

    from agecls import predict as predict_module

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("predict opened the FIFO and blocked"))
    signal.alarm(60)
    try:
        with pytest.raises(ConfigValueError, match="not a regular file"):
            predict_module.run(_predict_cfg(model, tmp_path, f"input={fifo}"))
        with pytest.raises(ConfigValueError, match="not a regular file"):
            predict_module.run(_predict_cfg(model, tmp_path, f"input={tmp_path}", "output=null"))
    finally:
        signal.alarm(0)


def test_a_run_directory_names_its_best_checkpoint(tmp_path) -> None:
    """ckpt_path=<run dir> (the README's `RUN=$(ls -d outputs/runs/*/ | tail -1)`): metrics.json's best
    checkpoint, else the one epoch_*.ckpt; a folder with several is refused, listing them."""
    import json

    from agecls.estimator import model_file

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("epoch_003.ckpt", "epoch_007.ckpt", "last.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="2 model files: epoch_003.ckpt, epoch_007.ckpt"):
        model_file(run)
    (run / "metrics.json").write_text(json.dumps({"best_checkpoint": str(run / "checkpoints" / "epoch_007.ckpt")}))
    assert model_file(f"{run}/") == model_file(run / "checkpoints") == run / "checkpoints" / "epoch_007.ckpt"
    (run / "checkpoints" / "epoch_003.ckpt").unlink()
    (run / "metrics.json").unlink()
    assert model_file(run) == run / "checkpoints" / "epoch_007.ckpt"
