"""Real photos in: EXIF orientation, every face, no face, ages clipped to the model's range, and
the exported ONNX model predicting what the checkpoint does (agecls.predict with onnxruntime)."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

from agecls.data.images import check_image, crop_box, load_rgb
from agecls.data.transforms import eval_transform
from agecls.deploy import preprocess, read_spec
from agecls.eval import evaluate, load_checkpoint
from agecls.export import export_model
from agecls.faces import Face, HaarDetector
from agecls.predict import COLUMNS, predict
from agecls.train import train
from tests.conftest import SYNTHETIC, TINY, compose_cfg, utkface_dir

UTK = sorted(utkface_dir().glob("*.jpg"))


# ----------------------------------------------------------------------------------------- EXIF
# The transpose a viewer applies for each orientation, and its inverse (to store a file that way).
_VIEW = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_90}
_STORE = {**_VIEW, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _asymmetric(w: int = 48, h: int = 30) -> Image.Image:
    """No flip or rotation of it equals another: a gradient plus a bright block near one corner."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + 2 * y) % 256], -1).astype(np.uint8)
    arr[2:8, 3:12] = (255, 255, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_loads_upright(tmp_path, orientation) -> None:
    upright = _asymmetric()
    stored = upright if orientation == 1 else upright.transpose(_STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    png, jpg = tmp_path / "a.png", tmp_path / "a.jpg"
    stored.save(png, exif=exif)
    stored.save(jpg, exif=exif, quality=100, subsampling=0)
    want = np.asarray(upright)

    got = np.asarray(load_rgb(png))
    assert got.shape == want.shape and np.array_equal(got, want)
    assert np.abs(np.asarray(load_rgb(jpg)).astype(int) - want).max() <= 8  # JPEG at quality 100
    assert np.array_equal(got, np.asarray(ImageOps.exif_transpose(Image.open(png)).convert("RGB")))
    info = check_image(png)
    assert info["ok"] and (info["width"], info["height"]) == upright.size
    # a box in stored pixels (as IMDB-WIKI's .mat boxes are) is cropped, then turned upright
    box = (5, 4, 25, 20)
    crop = np.asarray(load_rgb(png, box))
    expected = stored.crop(box) if orientation == 1 else stored.crop(box).transpose(_VIEW[orientation])
    assert np.array_equal(crop, np.asarray(expected))


# --------------------------------------------------------------------------------- shared model
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    """A tiny trained model (synthetic faces) and a copy whose raw output is 1000 years off."""
    out = tmp_path_factory.mktemp("faces")
    cfg = compose_cfg([*TINY, *SYNTHETIC, f"paths.cache_dir={cache_dir}"], out / "run")
    metrics = train(cfg)
    ckpt = Path(metrics["best_checkpoint"])
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    off = dict(saved, state_dict=dict(saved["state_dict"]), hyper_parameters=dict(saved["hyper_parameters"]))
    off["state_dict"]["net.age_mean"] = torch.tensor(1000.0)
    off["hyper_parameters"]["age_mean"] = 1000.0
    torch.save(off, out / "off.ckpt")
    return {"cfg": cfg, "dir": out / "run", "ckpt": ckpt, "off": out / "off.ckpt", "cache_dir": cache_dir, "base": out}


def _predict(ckpt: Path, inp: Path, out: Path, *over: str, detector=None) -> pd.DataFrame:
    """agecls.predict's table; on crops (detect_faces=false) unless `over` says otherwise."""
    crops = [] if any(o.startswith("detect_faces=") for o in over) else ["detect_faces=false"]
    cfg = compose_cfg([f"ckpt_path={ckpt}", f"input={inp}", "num_workers=0", *crops, *over], out, "predict")
    return predict(cfg, detector=detector)


def _two_faces(path: Path) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Two real UTKFace crops side by side: the left one 200 px, the right one 150 px."""
    big = Image.open(UTK[500]).convert("RGB")
    small = Image.open(UTK[3000]).convert("RGB").resize((150, 150))
    canvas = Image.new("RGB", (700, 400), (120, 130, 140))
    canvas.paste(big, (40, 80))
    canvas.paste(small, (450, 120))
    canvas.save(path, quality=95)
    return (40, 80, 240, 280), (450, 120, 600, 270)


def _inside(box: pd.Series, pasted: tuple[int, int, int, int]) -> bool:
    cx, cy = (box["x0"] + box["x1"]) / 2, (box["y0"] + box["y1"]) / 2
    return pasted[0] < cx < pasted[2] and pasted[1] < cy < pasted[3]


# ------------------------------------------------------------------------------- every face
def test_haar_finds_both_faces_of_a_two_person_photo_largest_first(run, tmp_path) -> None:
    big, small = _two_faces(tmp_path / "two.jpg")
    faces = HaarDetector().detect(np.asarray(load_rgb(tmp_path / "two.jpg")))
    assert len(faces) == 2 and faces[0].area > faces[1].area and all(math.isfinite(f.score) for f in faces)

    table = _predict(run["ckpt"], tmp_path / "two.jpg", tmp_path / "p", "detect_faces=true")
    assert list(table.columns) == COLUMNS
    assert table["face"].tolist() == [0, 1] and (table["status"] == "ok").all()
    assert _inside(table.iloc[0], big) and _inside(table.iloc[1], small)
    assert table["predicted"].notna().all() and table["score"].notna().all()
    largest = _predict(run["ckpt"], tmp_path / "two.jpg", tmp_path / "q", "detect_faces=true", "faces=largest")
    assert len(largest) == 1 and _inside(largest.iloc[0], big)


class _Stub:
    """A detector through the interface: fixed boxes, in no particular order."""

    def __init__(self, faces: list[Face]) -> None:
        self.faces = faces

    def detect(self, rgb: np.ndarray) -> list[Face]:
        return list(self.faces)


def test_rows_follow_faces_in_batches_across_images(run, tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for f in UTK[100:103]:
        shutil.copy(f, folder / f.name)
    boxes = [(120, 120, 190, 190), (10, 10, 150, 150), (60, 40, 140, 120)]  # sizes 70, 140, 80
    stub = _Stub([Face(b, score=float(k)) for k, b in enumerate(boxes)])
    table = _predict(run["ckpt"], folder, tmp_path / "p", "detect_faces=true", "batch_size=2", "face_margin=0.1",
                     detector=stub)
    assert len(table) == 9 and table["face"].tolist() == [0, 1, 2] * 3
    order = [boxes[1], boxes[2], boxes[0]]  # largest first
    assert [tuple(r) for r in table[["x0", "y0", "x1", "y1"]].to_numpy()[:3]] == order
    assert table["score"].tolist()[:3] == [1.0, 2.0, 0.0]
    # each row's age is its own face's, though 9 faces went through batches of 2
    model, _ = load_checkpoint(run["ckpt"])
    tf = eval_transform(int(model.hparams.image_size), float(model.hparams.crop_pct))
    for path in sorted(folder.iterdir()):
        img = load_rgb(path)
        x = torch.stack([tf(crop_box(img, b, 0.1)) for b in order])
        with torch.no_grad():
            want = model.eval()(x).numpy()
        got = table.loc[table["path"] == str(path), "predicted_raw"].to_numpy()
        assert np.allclose(got, want, atol=0.006), path.name


def test_no_face_gets_a_row_without_an_age_unless_whole_image_is_asked(run, tmp_path, caplog) -> None:
    Image.new("RGB", (200, 160), (90, 90, 90)).save(tmp_path / "blank.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    pd.DataFrame({"path": ["blank.jpg", "broken.jpg"]}).to_csv(tmp_path / "in.csv", index=False)
    caplog.set_level(logging.INFO, logger="agecls.predict")
    table = _predict(run["ckpt"], tmp_path / "in.csv", tmp_path / "p", "detect_faces=true").set_index("path")
    blank, broken = table.loc[str(tmp_path / "blank.jpg")], table.loc[str(tmp_path / "broken.jpg")]
    assert blank["status"] == "no_face" and np.isnan(blank["predicted"]) and pd.isna(blank["face"])
    assert broken["status"] == "error" and broken["error"] != "" and np.isnan(broken["predicted"])
    assert "ok 0, whole_image 0, no_face 1, error 1" in caplog.text

    whole = _predict(run["ckpt"], tmp_path / "blank.jpg", tmp_path / "q", "detect_faces=true",
                     "no_face=whole_image").iloc[0]
    assert whole["status"] == "whole_image" and np.isfinite(whole["predicted"])
    assert (whole["x0"], whole["y0"], whole["x1"], whole["y1"]) == (0, 0, 200, 160)
    plain = _predict(run["ckpt"], tmp_path / "blank.jpg", tmp_path / "r").iloc[0]
    assert plain["status"] == "ok" and plain["face"] == 0 and plain["predicted"] == whole["predicted"]


# --------------------------------------------------------------------------------- age range
def test_ages_are_clipped_to_the_training_range_in_predict_eval_and_export(run, tmp_path) -> None:
    split = pd.read_csv(run["dir"] / "split.csv")
    train_ages = split.loc[split["split"] == "train", "age"]
    model, ckpt = load_checkpoint(run["ckpt"])
    lo, hi = ckpt["hyper_parameters"]["age_min"], ckpt["hyper_parameters"]["age_max"]
    assert (lo, hi) == pytest.approx((train_ages.min(), train_ages.max()))

    # predict: a model whose raw output is ~1000 years gives the oldest training age, raw kept
    face = tmp_path / UTK[0].name
    shutil.copy(UTK[0], face)
    row = _predict(run["off"], face, tmp_path / "p").iloc[0]
    assert row["predicted"] == pytest.approx(hi, abs=0.006) and row["predicted_raw"] > 500

    # eval: predictions.csv holds both, and the metrics are those of the clipped ages
    cfg = compose_cfg([f"ckpt_path={run['off']}", f"paths.cache_dir={run['cache_dir']}", "eval.num_workers=0",
                       "trainer.accelerator=cpu"], tmp_path / "eval", "eval")
    metrics = evaluate(cfg)
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert np.allclose(preds["predicted"], hi) and (preds["predicted_raw"] > 500).all()
    assert metrics["test/mae"] == pytest.approx((hi - preds["age"]).abs().mean(), abs=1e-4)

    # export: the graph clamps, and its .json states the range
    off, _ = load_checkpoint(run["off"])
    path = export_model(off.eval(), "onnx", tmp_path / "off.onnx")
    assert read_spec(path)["age_range"] == pytest.approx([lo, hi])
    onnx_row = _predict(path, face, tmp_path / "o").iloc[0]
    assert onnx_row["predicted"] == pytest.approx(hi, abs=0.006)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    age, raw = session.run(["age", "age_raw"], {"image": np.random.default_rng(0).random((2, 3, 32, 32), np.float32)})
    assert np.allclose(age, hi) and (raw > 500).all()

    # a checkpoint from before ranges were stored: the data config's [min_age, max_age]
    old = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    for key in ("age_min", "age_max"):
        old["hyper_parameters"].pop(key)
    torch.save(old, tmp_path / "old.ckpt")
    legacy, _ = load_checkpoint(tmp_path / "old.ckpt")
    data = old["datamodule_hyper_parameters"]
    assert (float(legacy.net.age_min), float(legacy.net.age_max)) == (data["min_age"], data["max_age"]) == (0, 100)


# ------------------------------------------------------------------------------------- ONNX
def test_onnx_predict_gives_the_checkpoints_ages(run, tmp_path) -> None:
    folder = tmp_path / "faces"
    folder.mkdir()
    for f in UTK[:: len(UTK) // 6][:6]:
        shutil.copy(f, folder / f.name)
    model, _ = load_checkpoint(run["ckpt"])
    path = export_model(model.eval(), "onnx", tmp_path / "model.onnx")
    spec = json.loads(path.with_suffix(".json").read_text())
    resize = next(s for s in spec["preprocess"] if s["op"] == "resize")
    assert (resize["interpolation"], resize["antialias"], resize["short_side"]) == ("bilinear", True, 36)
    assert [s["op"] for s in spec["preprocess"]] == ["decode", "exif_transpose", "resize", "center_crop", "to_float"]
    assert spec["input"]["channel_order"] == "RGB" and spec["input"]["layout"] == "NCHW"
    assert spec["input"]["value_range"] == [0.0, 1.0] and spec["input"]["dtype"] == "float32"
    # the .json's preprocessing (numpy + Pillow) is the evaluation transform, pixel for pixel
    tf = eval_transform(32, float(model.hparams.crop_pct))
    for f in sorted(folder.iterdir())[:3]:
        img = load_rgb(f)
        assert np.array_equal(preprocess(img, spec), tf(img).numpy())

    for over in ([], ["tta=flip"]):
        by_ckpt = _predict(run["ckpt"], folder, tmp_path / "c", *over)
        by_onnx = _predict(path, folder, tmp_path / "o", *over)
        assert list(by_onnx["path"]) == list(by_ckpt["path"])
        for col in ("predicted", "predicted_raw", "predicted_low", "predicted_high"):
            assert by_ckpt[col].notna().all(), col
            assert np.abs(by_onnx[col] - by_ckpt[col]).max() <= 0.05, (over, col)
