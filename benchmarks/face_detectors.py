"""Which face detector: recall, false faces and time per photo, on real photos and on made ones.

    python benchmarks/face_detectors.py [--photos ../shared/data/photos] [--wild-n 300]
        [--detectors mtcnn mediapipe mediapipe_short facenet haar] [--repeats 3]
        [--out benchmarks/results/face_detectors.csv]
    python benchmarks/face_detectors.py --detectors mtcnn --min-scores 0.5 0.7 0.8 0.9 0.93 0.95 0.97 0.98 0.99
        [--thresholds-out benchmarks/results/face_detector_thresholds.csv]

Two sets:
- `photos`: the real uncropped photos in ../shared/data/photos (face_recognition's examples),
  with the faces marked by hand in benchmarks/photos_faces.json (a box per face, looked at; the
  half face cut by the right edge of obama2.jpg / 32bit.png is "optional": neither a miss nor a
  false face). A detection is a hit when its centre lies inside a marked box and its size is
  0.4-2.5 times the box's.
- `wild`: --wild-n UTKFace crops pasted into photo-like canvases by benchmarks/wild_faces.py
  (scaled, some rotated, some stored with an EXIF turn, some two to a photo), matched as there.

Time: the median, over photos, of the best of --repeats runs of `detect` on the decoded upright
image (decoding excluded), on this machine's CPU, one thread of Python (the libraries may use
more). On a shared machine the numbers are inflated by contention; rerun on an idle one.
Detectors that cannot be built (an optional one not installed) are skipped with a note.

--min-scores: the choice of a detector's score threshold (its `min_score`, the default of
`agecls.faces.MTCNNDetector`). Each detector with a `min_score` attribute detects each set once
with min_score=0 (what its own stages still let through: MTCNN's output net stops below 0.7), and
its detections are then kept at each threshold in turn (score >= threshold, the same test as the
detector's), giving per set and threshold the faces found (recall), missed and the false faces.
Written to --thresholds-out (a rerun replaces its detectors' rows); no times, and
--out is not touched. Detectors without a `min_score` attribute are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from results_csv import write_replacing  # benchmarks/ is on sys.path when a script runs

from agecls.data.images import list_images, load_rgb
from agecls.faces import DETECTORS, build_detector

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def detect_folder(name: str, folder: str | Path, repeats: int = 1, min_size: int = 30,
                  paths: list[Path] | None = None, min_score: float | None = None) -> tuple[pd.DataFrame, float]:
    """Every detection in the folder's images: path, x0, y0, x1, y1, score, ms (per photo: the
    best of `repeats`), and the total seconds of detection. `min_score`: set on the detector
    (one with a `min_score` attribute) in place of its default."""
    detector = build_detector(name, min_size)
    if min_score is not None:
        detector.min_score = float(min_score)
    rows, total = [], 0.0
    for path in paths if paths is not None else list_images(folder):
        rgb = np.asarray(load_rgb(path))
        best, faces = math.inf, []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            faces = detector.detect(rgb)
            best = min(best, time.perf_counter() - t0)
        total += best
        ms = 1000 * best
        if not faces:
            rows.append({"path": str(path), "x0": np.nan, "y0": np.nan, "x1": np.nan, "y1": np.nan, "score": np.nan,
                         "ms": ms, "status": "no_face"})
        for f in faces:
            rows.append({"path": str(path), "x0": f.box[0], "y0": f.box[1], "x1": f.box[2], "y1": f.box[3],
                         "score": f.score, "ms": ms, "status": "ok"})
    return pd.DataFrame(rows), total


def _inside(box: np.ndarray, cx: float, cy: float, size: float) -> bool:
    """A detection (centre, size) hits a marked box: centre inside, size 0.4-2.5 times the box's."""
    side = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3] and 0.4 * side <= size <= 2.5 * side


def score_photos(dets: pd.DataFrame, truth: dict) -> dict:
    """Hits, misses and false faces against hand-marked boxes."""
    faces = hits = false = 0
    for file, marked in truth["photos"].items():
        boxes = [np.asarray(b, float) for b in marked["faces"]]
        optional = [np.asarray(b, float) for b in marked.get("optional", [])]
        faces += len(boxes)
        used: set[int] = set()
        mine = dets[(dets["file"] == file) & (dets["status"] == "ok")]
        for _, d in mine.iterrows():
            cx, cy = (d["x0"] + d["x1"]) / 2, (d["y0"] + d["y1"]) / 2
            size = math.sqrt((d["x1"] - d["x0"]) * (d["y1"] - d["y0"]))

            k = next((k for k, b in enumerate(boxes) if k not in used and _inside(b, cx, cy, size)), None)
            if k is not None:
                used.add(k)
            elif not any(_inside(b, cx, cy, size) for b in optional):
                false += 1
        hits += len(used)
    return {"faces": faces, "detected": hits, "recall": round(hits / max(faces, 1), 4), "false_faces": false}


def at_threshold(dets: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The detections a detector thresholded at `threshold` would give: rows with status "ok" and
    score >= threshold (a photo left without any keeps no row: scoring looks at "ok" rows only)."""
    return dets[(dets["status"] == "ok") & (dets["score"] >= threshold)]


def threshold_rows(name: str, dets: pd.DataFrame, set_name: str, photos: int, thresholds: list[float],
                   score: Callable[[pd.DataFrame], tuple[int, int, int]]) -> list[dict]:
    """One row per threshold: faces, detected, missed, recall, false faces, from `score(kept)`,
    which gives (faces, detected, false) for the detections kept."""
    rows = []
    for t in thresholds:
        faces, found, false = score(at_threshold(dets, t))
        rows.append({"detector": name, "set": set_name, "min_score": t, "photos": photos, "faces": faces,
                     "detected": found, "missed": faces - found, "recall": round(found / max(faces, 1), 4),
                     "false_faces": false})
    return rows


def run_thresholds(args: argparse.Namespace, truth: dict, photo_paths: list[Path], wild_dir: Path | None,
                   wild_truth: pd.DataFrame | None) -> None:
    """--min-scores: detect once per set at min_score=0, count at each threshold (module docstring)."""
    from wild_faces import match

    thresholds = sorted(set(args.min_scores))
    results = []
    for name in args.detectors:
        try:
            detector = build_detector(name, args.min_face_size)
        except ImportError as err:
            print(f"{name}: skipped ({err})")
            continue
        if not hasattr(detector, "min_score"):
            print(f"{name}: skipped (no min_score attribute to set)")
            continue
        dets, _ = detect_folder(name, args.photos, 1, args.min_face_size, photo_paths, min_score=0.0)
        dets["file"] = [Path(p).name for p in dets["path"]]

        def photos_score(kept: pd.DataFrame) -> tuple[int, int, int]:
            r = score_photos(kept, truth)
            return r["faces"], r["detected"], r["false_faces"]

        results += threshold_rows(name, dets, "photos", len(photo_paths), thresholds, photos_score)
        if wild_dir is not None:
            dets, _ = detect_folder(name, wild_dir, 1, args.min_face_size, min_score=0.0)
            dets["file"] = [Path(p).name for p in dets["path"]]

            def wild_score(kept: pd.DataFrame) -> tuple[int, int, int]:
                matched, false = match(kept, wild_truth)
                return len(wild_truth), int((matched["det_index"] >= 0).sum()), false

            results += threshold_rows(name, dets, "wild", int(wild_truth["file"].nunique()), thresholds, wild_score)
    table = pd.DataFrame(results)
    out = Path(args.thresholds_out)
    table = write_replacing(out, table, ["detector", "set", "min_score"])
    print(table.to_string(index=False))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", default=str(REPO.parent / "shared" / "data" / "photos"))
    parser.add_argument("--truth", default=str(HERE / "photos_faces.json"))
    parser.add_argument("--root", default=os.environ.get("AGECLS_UTKFACE_DIR", str(REPO.parent / "shared" / "data" / "utkface")))
    parser.add_argument("--wild-n", type=int, default=300, help="crops pasted for the made set (0: skip it)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-face-size", type=int, default=30)
    parser.add_argument("--out", default=str(HERE / "results" / "face_detectors.csv"))
    parser.add_argument("--min-scores", type=float, nargs="+", default=None,
                        help="score thresholds to compare (detectors with a min_score): writes --thresholds-out only")
    parser.add_argument("--thresholds-out", default=str(HERE / "results" / "face_detector_thresholds.csv"))
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    from wild_faces import make_wild_set, match

    truth = json.loads(Path(args.truth).read_text())
    photo_paths = [Path(args.photos) / f for f in truth["photos"]]
    wild_dir, wild_truth = None, None
    if args.wild_n:
        files = sorted(Path(args.root).glob("*.jpg"))
        rng = np.random.default_rng(args.seed)
        pick = rng.choice(len(files), size=min(args.wild_n, len(files)), replace=False)
        crops = pd.DataFrame({"path": [str(files[i]) for i in pick], "age": [0.0] * len(pick)})
        rest = [files[i] for i in sorted(set(range(len(files))) - set(pick.tolist()))][:3000]
        wild_dir = Path(tempfile.mkdtemp(prefix="wild_detectors_")) / "photos"
        wild_truth = make_wild_set(crops, wild_dir, seed=args.seed, background=rest)

    if args.min_scores:
        run_thresholds(args, truth, photo_paths, wild_dir, wild_truth)
        return
    results = []
    for name in args.detectors:
        try:
            build_detector(name, args.min_face_size)
        except ImportError as err:
            print(f"{name}: skipped ({err})")
            continue
        dets, _ = detect_folder(name, args.photos, args.repeats, args.min_face_size, photo_paths)
        dets["file"] = [Path(p).name for p in dets["path"]]
        per_photo = dets.drop_duplicates("path")["ms"]
        row = {"detector": name, "set": "photos", "photos": len(photo_paths), **score_photos(dets, truth),
               "ms_per_photo_median": round(float(per_photo.median()), 1), "ms_per_photo_mean": round(float(per_photo.mean()), 1)}
        results.append(row)
        print(row, flush=True)
        if wild_dir is not None:
            dets, _ = detect_folder(name, wild_dir, 1, args.min_face_size)
            dets["file"] = [Path(p).name for p in dets["path"]]
            matched, false = match(dets[dets["status"] == "ok"], wild_truth)
            per_photo = dets.drop_duplicates("path")["ms"]
            row = {"detector": name, "set": "wild", "photos": int(wild_truth["file"].nunique()), "faces": len(wild_truth),
                   "detected": int((matched["det_index"] >= 0).sum()),
                   "recall": round(float((matched["det_index"] >= 0).mean()), 4), "false_faces": false,
                   "ms_per_photo_median": round(float(per_photo.median()), 1), "ms_per_photo_mean": round(float(per_photo.mean()), 1)}
            results.append(row)
            print(row, flush=True)
    table = pd.DataFrame(results)
    table = write_replacing(args.out, table, ["detector", "set"])
    print(table.to_string(index=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
