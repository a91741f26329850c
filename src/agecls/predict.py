"""Predict ages for new photos with a trained checkpoint.

    python -m agecls.predict ckpt_path=PATH input=photo.jpg
    python -m agecls.predict ckpt_path=PATH input=folder/ output=preds.csv detect_faces=true tta=true

Batched, with a progress bar. A file that cannot be read gets an `error` in the output and the
log, and the other files are still predicted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from agecls.data.images import is_image_name, list_images, load_rgb
from agecls.data.transforms import eval_transform
from agecls.eval import load_checkpoint
from agecls.utils.hydra_utils import config_dir

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


class FaceDetector:
    """OpenCV's bundled frontal-face Haar cascade: no download, CPU only."""

    def __init__(self, min_size: int = 30) -> None:
        import cv2

        self.cv2 = cv2
        file = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self.cascade = cv2.CascadeClassifier(str(file))
        if self.cascade.empty():
            raise RuntimeError(f"cannot load OpenCV's face cascade {file}; reinstall opencv-python-headless<5")
        self.min_size = int(min_size)

    def largest_face(self, rgb: np.ndarray) -> tuple[int, int, int, int] | None:
        gray = self.cv2.cvtColor(rgb, self.cv2.COLOR_RGB2GRAY)
        faces = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(self.min_size,) * 2)
        if len(faces) == 0:
            return None
        x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
        return int(x), int(y), int(x + w), int(y + h)


class PredictDataset(Dataset):
    """Never raises: a broken file yields a blank image and its error message."""

    def __init__(self, paths: Sequence[str], image_size: int, crop_pct: float, detect: bool, margin: float,
                 min_face_size: int) -> None:
        self.paths = list(paths)
        self.transform = eval_transform(image_size, crop_pct)
        self.image_size = image_size
        self.detect, self.margin, self.min_face_size = detect, margin, min_face_size
        self._detector: FaceDetector | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        box = None
        try:
            img = load_rgb(path)
            if self.detect:
                if self._detector is None:  # built lazily: one per worker process
                    self._detector = FaceDetector(self.min_face_size)
                box = self._detector.largest_face(np.asarray(img))
                if box is not None:
                    img = load_rgb(path, box, self.margin)
            image, error = self.transform(img), ""
        except Exception as err:
            image, error = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), f"{type(err).__name__}: {err}"
        return {"image": image, "index": i, "error": error, "face_box": "" if box is None else " ".join(map(str, box))}


def predict(cfg: DictConfig) -> pd.DataFrame:
    model, _ = load_checkpoint(cfg.ckpt_path)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    model.to(device).eval()
    hp = model.hparams
    paths, ages = resolve_inputs(cfg.input)
    dataset = PredictDataset(paths, int(hp.image_size), float(hp.crop_pct), bool(cfg.detect_faces),
                             float(cfg.face_margin), int(cfg.min_face_size))
    workers = min(int(cfg.num_workers), max(0, len(paths) // int(cfg.batch_size)))
    loader = DataLoader(dataset, batch_size=int(cfg.batch_size), num_workers=workers,
                        pin_memory=device.type == "cuda")
    predicted = np.full(len(paths), np.nan)
    errors = [""] * len(paths)
    boxes = [""] * len(paths)
    with torch.inference_mode():
        for batch in tqdm(loader, desc="Predicting", unit="batch"):
            idx = batch["index"].numpy()
            ok = np.array([e == "" for e in batch["error"]])
            for j, i in enumerate(idx):
                errors[i], boxes[i] = batch["error"][j], batch["face_box"][j]
            if not ok.any():
                continue
            x = batch["image"][torch.from_numpy(ok)].to(device, non_blocking=True)
            out = model(x)
            if cfg.tta:
                out = (out + model(torch.flip(x, dims=[3]))) / 2
            predicted[idx[ok]] = out.float().cpu().numpy()
    table = pd.DataFrame({"path": paths, "predicted": np.round(predicted, 2), "error": errors})
    if cfg.detect_faces:
        table["face_box"] = boxes
        table["face_found"] = [b != "" for b in boxes]
    if ages is not None:
        table.insert(1, "age", ages.to_numpy())
    failed = table[table["error"] != ""]
    if len(failed):
        shown = "\n".join(f"    {p}: {e}" for p, e in zip(failed["path"][:10], failed["error"][:10], strict=True))
        log.warning("%d of %d files could not be read; they have no prediction:\n%s", len(failed), len(table), shown)
    return table


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    table = predict(cfg)
    output = Path(cfg.output) if cfg.output else Path(cfg.paths.output_dir) / "predictions.csv"
    output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output, index=False)
    ok = table["error"] == ""
    log.info("Wrote %d predictions (%d unreadable) to %s", int(ok.sum()), int((~ok).sum()), output)
    if "age" in table.columns and ok.any():
        mae = float((table.loc[ok, "predicted"] - table.loc[ok, "age"]).abs().mean())
        log.info("MAE against the input's ages: %.2f years", mae)


if __name__ == "__main__":
    main()
