"""data.align: training images from raw photos aligned as agecls.predict aligns faces.

For sources of uncropped photos (`imdb_wiki` with `data.cropped=false`, a CSV of raw photos),
each cleaned record's photo is read upright, the face detector (`data.align_detector`) runs on it,
and the face is chosen: the one that overlaps the source's face box most (IMDB-WIKI's
face_location, turned upright with the photo), or the largest where the source gives no box.
Its alignment to the training crops' geometry (agecls.faces.alignment_matrix, the same function
agecls.predict uses) is kept as the record's `face_align`: the 2x3 matrix and the crop's size.
Loading the image then warps it by that matrix (agecls.data.images.load_rgb) instead of cropping
the box, in the per-sample pipeline and the preprocessing cache alike.

Detection runs once per file: the results are kept in `cache_dir/faces/` keyed by each file's
path, content hash and box, so later runs (and new epochs) never detect again. A photo where no
face is found keeps its box crop (or the whole frame); how many is logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from agecls.data.images import exif_orientation, load_rgb
from agecls.faces import Face, alignment_matrix, build_detector, face_template
from agecls.utils.progress import progress

log = logging.getLogger(__name__)

ALIGN_VERSION = 1  # bump when the meaning of a cached alignment changes
SAVE_EVERY = 512  # detections between two writes of the cache


def upright_box(box: Sequence[float], orientation: int, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A box (x0, y0, x1, y1) in stored pixels of an image of stored `size` (w, h), in the pixels
    of the upright image (EXIF `orientation` applied, as agecls.data.images.upright does)."""
    w, h = size
    x = np.array([box[0], box[2], box[0], box[2]], dtype=float)
    y = np.array([box[1], box[1], box[3], box[3]], dtype=float)
    turn = {
        2: lambda: (w - x, y), 3: lambda: (w - x, h - y), 4: lambda: (x, h - y), 5: lambda: (y, x),
        6: lambda: (h - y, x), 7: lambda: (h - y, w - x), 8: lambda: (y, w - x),
    }
    ux, uy = turn.get(orientation, lambda: (x, y))()
    return float(ux.min()), float(uy.min()), float(ux.max()), float(uy.max())


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def choose_face(faces: list[Face], box: tuple[float, float, float, float] | None, min_iou: float = 0.2) -> Face | None:
    """The face that overlaps `box` most (at least `min_iou`), or the largest where there is no box."""
    if not faces:
        return None
    if box is None:
        return faces[0]  # detectors return the largest first
    best = max(faces, key=lambda f: _iou(f.box, box))
    return best if _iou(best.box, box) >= min_iou else None


def _valid_box(box: object) -> tuple[float, ...] | None:
    if box is None or (isinstance(box, float) and math.isnan(box)):
        return None
    values = tuple(float(v) for v in box)
    return values if len(values) == 4 and all(math.isfinite(v) for v in values) else None


_WORKER: dict[str, object] = {}


def _align_one(args: tuple[str, tuple[float, ...] | None, str, int]) -> list[float] | None:
    """Worker: the alignment (6 matrix entries, crop width and height) of one photo, or None."""
    path, box, detector_name, min_size = args
    key = f"{detector_name}:{min_size}"
    if _WORKER.get("key") != key:  # one detector per worker process
        _WORKER.update(key=key, detector=build_detector(detector_name, min_size), template=face_template(detector_name))
    detector, template = _WORKER["detector"], _WORKER["template"]
    with Image.open(path) as im:
        orientation, stored = exif_orientation(im), im.size
    img = load_rgb(path)
    faces = detector.detect(np.asarray(img))
    face = choose_face(faces, upright_box(box, orientation, stored) if box is not None else None)
    if face is None:
        return None
    matrix = alignment_matrix(face, template)
    return [*(float(v) for v in matrix.reshape(-1)), float(template["size"][0]), float(template["size"][1])]


def cache_file_for(cache_dir: str | Path, detector: str, min_size: int) -> Path:
    tag = hashlib.sha1(json.dumps([ALIGN_VERSION, detector, min_size, face_template(detector)]).encode()).hexdigest()[:12]
    return Path(cache_dir) / "faces" / f"align-{detector}-{tag}.csv"


def _save(cache: Path, known: dict[str, list[float] | None]) -> None:
    """Write the detections found so far, atomically (a reader never sees half a file)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp-{os.getpid()}")
    pd.DataFrame({"key": list(known), "align": [json.dumps(v) if v else "" for v in known.values()]}).to_csv(tmp, index=False)
    tmp.replace(cache)


def add_alignment(records: pd.DataFrame, detector: str, cache_dir: str | Path | None, min_size: int = 30,
                  workers: int = 1) -> pd.DataFrame:
    """`records` with a `face_align` column (see the module docstring): detected once, cached."""
    face_template(detector)  # fails now, with the list of templates, if there is none
    boxes = [_valid_box(b) for b in records["face_box"]] if "face_box" in records.columns else [None] * len(records)
    hashes = records["sha1"].fillna("").astype(str).tolist() if "sha1" in records.columns else [""] * len(records)
    keys = [f"{p}|{h}|{b}" for p, h, b in zip(records["path"], hashes, boxes, strict=True)]
    cache = cache_file_for(cache_dir, detector, min_size) if cache_dir else None
    known: dict[str, list[float] | None] = {}
    if cache is not None and cache.exists():
        table = pd.read_csv(cache, keep_default_na=False)
        known = {k: (json.loads(a) if a else None) for k, a in zip(table["key"], table["align"], strict=True)}
    todo = [i for i, k in enumerate(keys) if k not in known or not hashes[i]]  # no hash: never trust the cache
    if todo:
        log.info("data.align: detecting faces (%s) in %d of %d images (the rest cached)", detector, len(todo), len(keys))
        jobs = [(str(records["path"].iloc[i]), boxes[i], detector, int(min_size)) for i in todo]
        pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(jobs) > 1 else None
        try:
            with progress(total=len(jobs), desc=f"Detecting faces ({detector})", unit="img", mininterval=2) as bar:
                for start in range(0, len(jobs), SAVE_EVERY):
                    chunk = jobs[start:start + SAVE_EVERY]
                    found = list(pool.map(_align_one, chunk, chunksize=16)) if pool else [_align_one(j) for j in chunk]
                    for i, a in zip(todo[start:start + SAVE_EVERY], found, strict=True):
                        known[keys[i]] = a
                    if cache is not None:  # after every chunk: an interrupted detection keeps what it found
                        _save(cache, known)
                    bar.update(len(chunk))
        finally:
            if pool is not None:
                pool.shutdown()
    aligns = [tuple(known[k]) if known[k] else None for k in keys]
    missing = sum(a is None for a in aligns)
    if missing:
        log.warning("data.align: no face found (by %s%s) in %d of %d images; they are used %s", detector,
                    ", overlapping the source's box" if "face_box" in records.columns else "", missing, len(aligns),
                    "cropped by their box" if "face_box" in records.columns else "whole")
    out = records.copy()
    out["face_align"] = pd.Series(aligns, index=records.index, dtype=object)
    return out
