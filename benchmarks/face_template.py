"""Measure the training crops' face geometry per detector: the alignment templates.

    python benchmarks/face_template.py [--root ../shared/data/utkface] [--n 2000] [--detectors mtcnn haar ...]

Each detector runs on `--n` UTKFace crops (a seeded random sample, 200x200, the crops the models
are trained on). Of each crop's largest face it keeps the landmarks and the box, as shares of the
crop's width and height; the template is their median over the crops where a face was found. It
is written to src/agecls/face_templates.json (one entry per detector, merged with the ones there),
which agecls.faces.align_face warps every detected face to. Also printed: how often the detector
found a face, and the spread (median absolute deviation, in pixels of the crop) of each landmark:
how consistently the crops place the face. Detectors that cannot be built here (an optional one not
installed) are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from agecls.data.images import list_images, load_rgb
from agecls.faces import DETECTORS, TEMPLATE_FILE, build_detector

REPO = Path(__file__).resolve().parents[1]


def measure(name: str, paths: list[Path], min_size: int) -> dict | None:
    try:
        detector = build_detector(name, min_size)
    except ImportError as err:
        print(f"{name}: skipped ({err})")
        return None
    boxes, marks, seconds, size = [], [], [], None
    for path in paths:
        rgb = np.asarray(load_rgb(path))
        h, w = rgb.shape[:2]
        size = size or (w, h)
        t0 = time.perf_counter()
        faces = detector.detect(rgb)
        seconds.append(time.perf_counter() - t0)
        if not faces:
            continue
        face = faces[0]
        boxes.append(np.asarray(face.box, dtype=float) / (w, h, w, h))
        if face.landmarks is not None:
            marks.append(np.asarray(face.landmarks, dtype=float) / (w, h))
    if not boxes:
        print(f"{name}: found no face in {len(paths)} crops")
        return None
    entry = {
        "size": list(size),
        "box": np.median(np.stack(boxes), axis=0).round(5).tolist(),
        "landmarks": np.median(np.stack(marks), axis=0).round(5).tolist() if marks else None,
        "crops": len(paths),
        "found": len(boxes),
        "found_share": round(len(boxes) / len(paths), 4),
        "ms_per_crop": round(1000 * float(np.median(seconds)), 2),
    }
    if marks:
        stack = np.stack(marks) * size
        mad = np.median(np.abs(stack - np.median(stack, axis=0)), axis=0)
        entry["landmark_mad_px"] = mad.round(2).tolist()
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.environ.get("AGECLS_UTKFACE_DIR", str(REPO.parent / "shared" / "data" / "utkface")))
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-face-size", type=int, default=30)
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS))
    parser.add_argument("--out", default=str(TEMPLATE_FILE))
    args = parser.parse_args()

    paths = list_images(args.root)
    if not paths:
        raise SystemExit(f"no images under {args.root}")
    rng = np.random.default_rng(args.seed)
    sample = [paths[i] for i in sorted(rng.choice(len(paths), size=min(args.n, len(paths)), replace=False))]
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("detectors", {})
    for name in args.detectors:
        entry = measure(name, sample, args.min_face_size)
        if entry is None:
            continue
        data["detectors"][name] = entry
        print(f"{name}: face in {entry['found']}/{entry['crops']} crops, {entry['ms_per_crop']} ms per crop; "
              f"box {entry['box']}; landmarks {entry['landmarks']}; spread (px) {entry.get('landmark_mad_px')}")
    data["about"] = ("Median face geometry of the UTKFace training crops per detector (shares of the crop's width "
                     "and height), measured by benchmarks/face_template.py: "
                     f"--n {args.n} --seed {args.seed} --min-face-size {args.min_face_size}.")
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
