"""Predict ages for new photos with a trained checkpoint or an exported ONNX model.

    python -m agecls.predict ckpt_path=PATH input=photo.jpg
    python -m agecls.predict ckpt_path=PATH input=folder/ output=preds.csv detect_faces=true tta=true
    python -m agecls.predict ckpt_path=model.onnx input=folder/   # onnxruntime; preprocessing from model.json

Every image is read upright (EXIF orientation applied). With `detect_faces=true` each detected
face gets a row (`faces=all`, largest first) or only the largest does (`faces=largest`); a photo
with no face gets one row with status `no_face` and no age, or, with `no_face=whole_image`, the
whole frame predicted (status `whole_image`). Without detection each image is one row, the whole
frame, status `ok`. A detected face is aligned by its landmarks to the geometry of the training
crops (agecls.faces.align_face; `align=false`: its box widened by `face_margin` is cropped).
Columns: path, [age], face, x0, y0, x1, y1, score, predicted, predicted_raw, status, error:
`face` counts from 0; the box is in pixels of the upright image (x1, y1 exclusive); `predicted` is
clipped to the model's age range, `predicted_raw` is not. A file that cannot be
read gets status `error` and its `error`, and the other files are still predicted. Batched over
faces, with a progress bar.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from agecls.data.images import crop_box, is_image_name, list_images, load_rgb
from agecls.data.transforms import eval_transform
from agecls.deploy import OnnxAgeModel, preprocess
from agecls.eval import load_checkpoint
from agecls.faces import (
    DEFAULT_DETECTOR,
    Face,
    FaceDetector,
    align_face,
    build_detector,
    detector_template,
    face_template,
    largest_first,
)
from agecls.utils.hydra_utils import config_dir
from agecls.utils.progress import progress

log = logging.getLogger(__name__)


def resolve_inputs(spec: str | Path) -> tuple[list[str], pd.Series | None]:
    """Image paths from an image, a folder or a CSV (`path`, optional `age`, relative to the CSV)."""
    spec = Path(spec).expanduser()
    if not spec.exists():
        raise FileNotFoundError(f"input={str(spec)!r} does not exist; give an image, a folder of images or a CSV")
    if spec.is_dir():
        paths = [str(p) for p in list_images(spec)]
        if not paths:
            raise FileNotFoundError(f"input={str(spec)!r} holds no image files")
        return paths, None
    if spec.suffix.lower() == ".csv":
        table = pd.read_csv(spec)
        if "path" not in table.columns:
            raise ValueError(f"{spec}: a CSV input needs a `path` column (columns: {', '.join(table.columns)})")
        paths = [str(p if Path(p).is_absolute() else (spec.parent / p)) for p in table["path"].astype(str)]
        return paths, table["age"] if "age" in table.columns else None
    if not is_image_name(spec.name):
        log.warning("%s has no image extension; trying it as an image anyway", spec)
    return [str(spec)], None


STATUSES = ("ok", "whole_image", "no_face", "error")
FACES = ("all", "largest")
NO_FACE = ("skip", "whole_image")
COLUMNS = ["path", "face", "x0", "y0", "x1", "y1", "score", "predicted", "predicted_raw", "status", "error"]


class CheckpointAges:
    """A .ckpt: preprocessing as in evaluation, the torch model, its age range (AgeNet.clip)."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        model, _ = load_checkpoint(path)
        self.model = model.to(device).eval()
        self.device = device
        self.image_size = int(model.hparams.image_size)
        self.preprocess = eval_transform(self.image_size, float(model.hparams.crop_pct))

    def __call__(self, batch: torch.Tensor, tta: bool) -> tuple[np.ndarray, np.ndarray]:
        """(clipped, raw) ages of a uint8 (N, 3, S, S) batch."""
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            raw = self.model.net.predict_years(x, "flip" if tta else "none")
            return self.model.net.clip(raw).float().cpu().numpy(), raw.float().cpu().numpy()


class OnnxAges:
    """An exported .onnx run by onnxruntime, fed as its .json says (agecls.deploy)."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        self.model = OnnxAgeModel(path, device=device.type)
        self.image_size = self.model.image_size
        self.preprocess = _OnnxPreprocess(self.model.spec)

    def __call__(self, batch: torch.Tensor, tta: bool) -> tuple[np.ndarray, np.ndarray]:
        x = batch.numpy()
        raw = self.model.raw(x)
        if tta:
            raw = (raw + self.model.raw(np.ascontiguousarray(x[..., ::-1]))) / 2
        return self.model.clip(raw), raw


class _OnnxPreprocess:
    """agecls.deploy.preprocess with the model's spec, as a picklable callable for worker processes."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    def __call__(self, image: Any) -> torch.Tensor:
        return torch.from_numpy(preprocess(image, self.spec))


def load_model(path: str | Path, device: torch.device) -> CheckpointAges | OnnxAges:
    """A checkpoint (.ckpt) or an exported ONNX model (.onnx, with its .json beside it)."""
    return OnnxAges(path, device) if Path(path).suffix.lower() == ".onnx" else CheckpointAges(path, device)


def _row(status: str, face: int | None = None, box: Sequence[int] | None = None, score: float = np.nan) -> dict[str, Any]:
    return {"face": face, "box": None if box is None else tuple(int(v) for v in box), "score": float(score),
            "status": status}


def image_faces(img: Image.Image, detector: FaceDetector | None, faces: str = "all", no_face: str = "skip",
                margin: float = 0.4, template: dict[str, Any] | str | None = "auto",
                ) -> list[tuple[dict[str, Any], Image.Image | None]]:
    """The rows of one decoded, upright RGB image, each with the image its age is predicted from
    (None: no age). A row: `face` (from 0, largest first), `box` (x0, y0, x1, y1 in pixels of
    `img`), `score`, `status`. With `detector` None the whole frame is one face (status ok);
    otherwise every face (`faces="all"`) or the largest (`"largest"`), aligned (below); a photo
    with no face gets one row `no_face` without an image, or with `no_face="whole_image"` the whole
    frame. The one copy of the row logic: PredictDataset and predict_image (agecls.serve) use it.

    Each face is aligned to the training crops' geometry by `template` (agecls.faces.align_face):
    "auto" = the template of the detector that build_detector made (none for other detectors),
    None = no alignment: the box widened by `margin` is cropped."""
    whole = (0, 0, img.width, img.height)
    if detector is None:
        return [(_row("ok", 0, whole), img)]
    found: list[Face] = largest_first(detector.detect(np.asarray(img)))
    if faces == "largest":
        found = found[:1]
    if not found:
        return [(_row("whole_image", None, whole), img)] if no_face == "whole_image" else [(_row("no_face"), None)]
    if isinstance(template, str):
        template = detector_template(detector)
    return [(_row("ok", k, face.box, face.score),
             align_face(img, face, template) if template else crop_box(img, face.box, margin))
            for k, face in enumerate(found)]


def predict_image(img: Image.Image, model: CheckpointAges | OnnxAges, detector: FaceDetector | None,
                  faces: str = "all", no_face: str = "skip", margin: float = 0.4,
                  tta: bool = False, template: dict[str, Any] | str | None = "auto") -> list[dict[str, Any]]:
    """image_faces' rows of one upright RGB image with their ages, in one batch: `predicted` (clipped
    to the model's age range) and `predicted_raw`; NaN where a row has no age (no_face)."""
    found = image_faces(img, detector, faces, no_face, margin, template)
    rows = [{**row, "predicted": math.nan, "predicted_raw": math.nan} for row, _ in found]
    todo = [k for k, (_, image) in enumerate(found) if image is not None]
    if todo:
        clipped, raw = model(torch.stack([model.preprocess(found[k][1]) for k in todo]), tta)
        for j, k in enumerate(todo):
            rows[k]["predicted"], rows[k]["predicted_raw"] = float(clipped[j]), float(raw[j])
    return rows


class PredictDataset(Dataset):
    """Per image: its rows (one per face, or one for the whole frame, no face or an error) and the
    preprocessed crops to predict. Never raises: a broken file yields a row with its error."""

    def __init__(self, paths: Sequence[str], preprocess: Callable[[Any], torch.Tensor], image_size: int,
                 detect: bool, margin: float = 0.4, faces: str = "all", no_face: str = "skip",
                 detector: FaceDetector | Callable[[], FaceDetector] | None = None,
                 template: dict[str, Any] | str | None = "auto") -> None:
        self.paths = list(paths)
        self.template = template  # alignment (image_faces)
        self.preprocess, self.image_size = preprocess, int(image_size)
        self.detect, self.margin, self.faces, self.no_face = detect, float(margin), faces, no_face
        # a detector, or a factory called once per worker process (so none is pickled)
        self._detector: FaceDetector | None = detector if hasattr(detector, "detect") else None
        self._make_detector = None if self._detector is not None else (detector or build_detector)

    def __len__(self) -> int:
        return len(self.paths)

    def detector(self) -> FaceDetector:
        if self._detector is None:
            self._detector = self._make_detector()
        return self._detector

    def __getitem__(self, i: int) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        crops: list[torch.Tensor] = []
        try:
            img = load_rgb(self.paths[i])  # upright: detection boxes are in the upright image's pixels
            detector = self.detector() if self.detect else None
            for row, image in image_faces(img, detector, self.faces, self.no_face, self.margin, self.template):
                rows.append({"index": i, **row, "error": "", "crop": -1 if image is None else len(crops)})
                if image is not None:
                    crops.append(self.preprocess(image))
        except Exception as err:
            rows, crops = [{"index": i, "face": None, "box": None, "score": np.nan, "status": "error",
                            "error": f"{type(err).__name__}: {err}", "crop": -1}], []
        images = torch.stack(crops) if crops else torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return {"rows": rows, "images": images}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Images of every face in the batch in one tensor; each row's `crop` indexes it (-1: none)."""
    rows, offset = [], 0
    for item in items:
        for row in item["rows"]:
            rows.append({**row, "crop": row["crop"] + offset if row["crop"] >= 0 else -1})
        offset += len(item["images"])
    return {"rows": rows, "images": torch.cat([item["images"] for item in items])}


def _check_choice(cfg: DictConfig, key: str, choices: Sequence[str]) -> str:
    value = str(cfg.get(key, choices[0]))
    if value not in choices:
        raise ValueError(f"{key}={value!r}; choose {' or '.join(choices)}")
    return value


def predict(cfg: DictConfig, detector: FaceDetector | None = None) -> pd.DataFrame:
    """The predictions table (see the module docstring). `detector` replaces the configured one
    (cfg.detector, built in each worker) with an object with `detect(rgb) -> list[Face]`."""
    faces = _check_choice(cfg, "faces", FACES)
    no_face = _check_choice(cfg, "no_face", NO_FACE)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    model = load_model(cfg.ckpt_path, device)
    paths, ages = resolve_inputs(cfg.input)
    detect = bool(cfg.detect_faces)
    batch_size = int(cfg.batch_size)
    workers = min(int(cfg.num_workers), max(0, len(paths) // batch_size))
    name = str(cfg.get("detector", DEFAULT_DETECTOR))
    # each face aligned to the training crops' geometry, by the template measured for this detector
    # (a detector given as an object: its own, if build_detector made it; else none, box crops)
    template: dict[str, Any] | str | None = None
    if detect and bool(cfg.get("align", True)):
        template = "auto" if detector is not None else face_template(name)
    if detect and detector is None:
        make = functools.partial(build_detector, name, int(cfg.min_face_size))
        here = make()  # fails here, not once per image, if it cannot load
        detector = make if workers else here  # worker processes build their own
    dataset = PredictDataset(paths, model.preprocess, model.image_size, detect, float(cfg.face_margin), faces,
                             no_face, detector, template)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    rows: list[dict[str, Any]] = []
    for batch in progress(loader, desc="Predicting", unit="batch"):
        images = batch["images"]
        clipped, raw = np.full(len(images), np.nan), np.full(len(images), np.nan)
        for start in range(0, len(images), batch_size):  # batched over faces, at most batch_size at a time
            clipped[start:start + batch_size], raw[start:start + batch_size] = model(images[start:start + batch_size],
                                                                                     bool(cfg.tta))
        for row in batch["rows"]:
            crop = row.pop("crop")
            row["predicted"], row["predicted_raw"] = (clipped[crop], raw[crop]) if crop >= 0 else (np.nan, np.nan)
            rows.append(row)
    table = rows_table(rows, paths)
    if ages is not None:
        table.insert(1, "age", ages.to_numpy()[[r["index"] for r in rows]])
    counts = table["status"].value_counts()
    log.info("%d images, %d rows: %s", len(paths), len(table), ", ".join(f"{s} {int(counts.get(s, 0))}" for s in STATUSES))
    failed = table[table["status"] == "error"]
    if len(failed):
        shown = "\n".join(f"    {p}: {e}" for p, e in zip(failed["path"][:10], failed["error"][:10], strict=True))
        log.warning("%d of %d files could not be read; they have no prediction:\n%s", len(failed), len(paths), shown)
    return table


def rows_table(rows: list[dict[str, Any]], paths: Sequence[str]) -> pd.DataFrame:
    boxes = [r["box"] or (None,) * 4 for r in rows]
    table = pd.DataFrame({
        "path": [paths[r["index"]] for r in rows],
        "face": pd.array([r["face"] for r in rows], dtype="Int64"),
        **{name: pd.array([b[k] for b in boxes], dtype="Int64") for k, name in enumerate(("x0", "y0", "x1", "y1"))},
        "score": np.round(np.array([r["score"] for r in rows], dtype=float), 3),
        "predicted": np.round(np.array([r["predicted"] for r in rows], dtype=float), 2),
        "predicted_raw": np.round(np.array([r["predicted_raw"] for r in rows], dtype=float), 2),
        "status": [r["status"] for r in rows],
        "error": [r["error"] for r in rows],
    }, columns=COLUMNS)
    return table


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    table = predict(cfg)
    output = Path(cfg.output) if cfg.output else Path(cfg.paths.output_dir) / "predictions.csv"
    output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output, index=False)
    log.info("Wrote %d rows (%d predicted) to %s", len(table), int(table["predicted"].notna().sum()), output)
    first = table[table["predicted"].notna()].drop_duplicates("path")  # per image, its largest face
    if "age" in table.columns and len(first):
        mae = float((first["predicted"] - first["age"]).abs().mean())
        log.info("MAE against the input's ages (largest face of %d images): %.2f years", len(first), mae)


if __name__ == "__main__":
    main()
