"""Predict ages for the faces in photos with a trained checkpoint or an exported ONNX model.

    python -m agecls.predict ckpt_path=PATH input=photo.jpg
    python -m agecls.predict ckpt_path=PATH input=folder/ output=preds.csv draw=true
    python -m agecls.predict ckpt_path=model.onnx input=folder/   # onnxruntime; preprocessing from the model
    python -m agecls.predict ckpt_path=PATH input=crops/ detect_faces=false   # pre-cropped faces

A thin shell over agecls.AgeEstimator (agecls.estimator): the faces of every photo are found,
aligned and aged as there; each face is a row (a photo with no face: one row, status `no_face`;
an unreadable file: one row, status `error` with its reason, and the other files are still
predicted). Columns: path, [age, when the input CSV has one], face, x0, y0, x1, y1, score,
predicted, predicted_low, predicted_high, predicted_raw, status, error. `face` counts from 0,
largest first; the box is in pixels of the upright photo (x1, y1 exclusive); `predicted` is clipped
to the model's age range (`predicted_raw`: not); [predicted_low, predicted_high] is the interval
that holds the true age with probability `coverage`. `output=*.json` writes the same rows as JSON
records, with each face's landmarks.

The output file is checked before any work (a file, not the input, writable, .csv or .json, not
existing unless overwrite=true) and written whole or not at all (agecls.utils.safe_output).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from agecls.data.images import SKIP_REASONS, is_image_name, scan_images
from agecls.estimator import STATUSES, AgeEstimator, FaceAge
from agecls.faces import FaceDetector
from agecls.utils.checks import ConfigValueError, check_number
from agecls.utils.hydra_utils import config_dir, entry_point
from agecls.utils.safe_output import atomic_write, check_output

log = logging.getLogger(__name__)

COLUMNS = ["path", "face", "x0", "y0", "x1", "y1", "score", "predicted", "predicted_low", "predicted_high",
           "predicted_raw", "status", "error"]
OUTPUT_SUFFIXES = (".csv", ".json")


def resolve_inputs(spec: str | Path) -> tuple[list[str], pd.Series | None]:
    """Image paths from an image, a folder or a CSV (`path`, optional `age`, relative to the CSV)."""
    spec = Path(spec).expanduser()
    if not spec.exists():
        raise FileNotFoundError(f"input={str(spec)!r} does not exist; give an image, a folder of images or a CSV")
    if spec.is_dir():
        scan = scan_images(spec)  # FIFOs, folders and broken links named like images: counted, never opened
        scan.log_skipped(spec)
        paths = [str(p) for p in scan.files]
        if not paths:
            lost = scan.lost()
            why = "; ".join(f"{n} {SKIP_REASONS[r]}" for r, n in lost.items())
            if lost:
                raise ConfigValueError(f"input={str(spec)!r} holds no image file to read, only entries that are not "
                                       f"a regular file or not a readable format ({why})")
            raise FileNotFoundError(f"input={str(spec)!r} holds no image files")
        return paths, None
    if not spec.is_file():  # a FIFO or a device would hang the reader
        raise ConfigValueError(f"input={str(spec)!r} is not a regular file (a pipe, socket or device?); "
                               "give an image, a folder of images or a CSV")
    if spec.suffix.lower() == ".csv":
        table = pd.read_csv(spec)
        if "path" not in table.columns:
            raise ConfigValueError(f"input={str(spec)!r}: a CSV input needs a `path` column "
                                   f"(columns: {', '.join(map(str, table.columns))})")
        paths = [str(p if Path(p).is_absolute() else (spec.parent / p)) for p in table["path"].astype(str)]
        return paths, table["age"] if "age" in table.columns else None
    if not is_image_name(spec.name):
        log.warning("%s has no image extension; trying it as an image anyway", spec)
    return [str(spec)], None


def rows_table(rows: Sequence[tuple[int, FaceAge]], paths: Sequence[str]) -> pd.DataFrame:
    """The predictions table of (photo index, face) rows."""
    boxes = [r.box or (None,) * 4 for _, r in rows]

    def rounded(values: Sequence[float], digits: int) -> np.ndarray:
        return np.round(np.array(values, dtype=float), digits)

    return pd.DataFrame({
        "path": [paths[i] for i, _ in rows],
        "face": pd.array([r.face for _, r in rows], dtype="Int64"),
        **{name: pd.array([b[k] for b in boxes], dtype="Int64") for k, name in enumerate(("x0", "y0", "x1", "y1"))},
        "score": rounded([r.score for _, r in rows], 3),
        "predicted": rounded([r.age for _, r in rows], 2),
        "predicted_low": rounded([r.interval[0] for _, r in rows], 2),
        "predicted_high": rounded([r.interval[1] for _, r in rows], 2),
        "predicted_raw": rounded([r.age_raw for _, r in rows], 2),
        "status": [r.status for _, r in rows],
        "error": [r.error for _, r in rows],
    }, columns=COLUMNS)


def output_path(cfg: DictConfig) -> Path:
    """The predictions file, checked before any work (agecls.utils.safe_output.check_output)."""
    if not cfg.output:
        return Path(cfg.paths.output_dir) / "predictions.csv"
    return check_output(cfg.output, key="output", suffixes=OUTPUT_SUFFIXES, inputs=[cfg.input],
                        overwrite=bool(cfg.get("overwrite", False)))


def annotate_folder(cfg: DictConfig) -> Path | None:
    """Where annotated copies go (None: none are drawn); never the input folder or inside it."""
    if not (cfg.get("draw") or cfg.get("annotate_dir")):
        return None
    folder = Path(cfg.annotate_dir).expanduser() if cfg.get("annotate_dir") else Path(cfg.paths.output_dir) / "annotated"
    source = Path(cfg.input).expanduser()
    root = source if source.is_dir() else source.parent
    if folder.resolve() == root.resolve() or root.resolve() in folder.resolve().parents:
        raise ConfigValueError(f"annotate_dir={str(folder)!r} is inside the input folder {str(root)!r}: the copies "
                               "would mix with the photos (and be read as input next time); name another folder")
    if folder.exists() and not folder.is_dir():
        raise ConfigValueError(f"annotate_dir={str(folder)!r} is a file; name a folder")
    return folder


def annotated_name(path: str, root: Path) -> Path:
    """The annotated copy's name: the photo's path under the input folder, `.annotated` before the suffix."""
    p = Path(path)
    try:
        rel = p.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(p.name)
    suffix = p.suffix.lower() if p.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
    return rel.with_name(f"{rel.stem}.annotated{suffix}")


def predict(cfg: DictConfig, detector: FaceDetector | None = None, annotate: Path | None = None) -> pd.DataFrame:
    """The predictions table (see the module docstring). `detector`: an object with
    `detect(rgb) -> list[Face]` instead of the configured one. `annotate`: a folder for annotated copies."""
    check_number("batch_size", cfg.batch_size, minimum=1, integer=True)
    check_number("num_workers", cfg.num_workers, minimum=0, integer=True)
    paths, ages = resolve_inputs(cfg.input)
    source = Path(cfg.input).expanduser()
    root = source if source.is_dir() else source.parent
    targets = [] if annotate is None else [  # every annotated copy checked before any work
        check_output(annotate / annotated_name(p, root), key="annotate_dir", overwrite=bool(cfg.get("overwrite", False)))
        for p in paths]
    estimator = AgeEstimator.from_config(cfg, face_detector=detector)
    rows: list[tuple[int, FaceAge]] = []
    for index, faces in estimator.predict_many(paths, num_workers=int(cfg.num_workers), show_progress=True):
        rows.extend((index, face) for face in faces)
        if targets and faces[0].status != "error":
            target = targets[index]
            with atomic_write(target) as tmp:
                estimator.draw(paths[index], faces).save(tmp, format="JPEG" if target.suffix != ".png" else "PNG")
    table = rows_table(rows, paths)
    if ages is not None:
        table.insert(1, "age", ages.to_numpy()[[i for i, _ in rows]])
    counts = table["status"].value_counts()
    log.info("%d images, %d rows: %s", len(paths), len(table), ", ".join(f"{s} {int(counts.get(s, 0))}" for s in STATUSES))
    failed = table[table["status"] == "error"]
    if len(failed):
        shown = "\n".join(f"    {p}: {e}" for p, e in zip(failed["path"][:10], failed["error"][:10], strict=True))
        log.warning("%d of %d files could not be read; they have no prediction:\n%s", len(failed), len(paths), shown)
    table.attrs["landmarks"] = [face.landmarks for _, face in rows]
    return table


def write_table(table: pd.DataFrame, output: Path) -> None:
    """CSV, or JSON records (with landmarks), written whole or not at all."""
    with atomic_write(output) as tmp:
        if output.suffix.lower() == ".json":
            records = json.loads(table.to_json(orient="records"))
            for record, marks in zip(records, table.attrs.get("landmarks") or [None] * len(records), strict=True):
                record["landmarks"] = marks
            tmp.write_text(json.dumps(records, indent=1))
        else:
            table.to_csv(tmp, index=False)


def summary(table: pd.DataFrame, show: int) -> str:
    """The first `show` rows, short, for the console."""
    cols = [c for c in ("path", "age", "face", "predicted", "predicted_low", "predicted_high", "status") if c in table]
    head = table[cols].head(show).copy()
    head["path"] = [Path(p).name for p in head["path"]]
    more = f"\n... {len(table) - show} more rows" if len(table) > show else ""
    return head.to_string(index=False, na_rep="") + more


@entry_point
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    run(cfg)


def run(cfg: DictConfig) -> pd.DataFrame:
    """agecls.predict: the output and annotation folder checked, then predict, write, summarise."""
    output = output_path(cfg)  # before any work
    annotate = annotate_folder(cfg)
    table = predict(cfg, annotate=annotate)
    write_table(table, output)
    log.info("Wrote %d rows (%d predicted) to %s", len(table), int(table["predicted"].notna().sum()), output)
    if annotate is not None:
        log.info("Annotated copies in %s", annotate)
    if int(cfg.get("show", 10)) > 0 and len(table):
        log.info("First rows:\n%s", summary(table, int(cfg.show)))
    first = table[table["predicted"].notna()].drop_duplicates("path")  # per image, its largest face
    if "age" in table.columns and len(first):
        mae = float((first["predicted"] - first["age"]).abs().mean())
        log.info("MAE against the input's ages (largest face of %d images): %.2f years", len(first), mae)
    return table


if __name__ == "__main__":
    main()
