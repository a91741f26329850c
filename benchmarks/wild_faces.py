"""Photos from the wild, made from test crops: does detection + alignment give the crops' accuracy back?

    python benchmarks/wild_faces.py --ckpt PATH/epoch_XX.ckpt [--split-csv RUN/split.csv] [--n 1000]
        [--detectors mtcnn haar] [--out benchmarks/results/wild_faces.csv]

From the test split of the real UTKFace folder (taken from the checkpoint's saved split membership,
or from a run's split.csv with --split-csv), `--n` crops are drawn (seeded) and each is pasted into
a larger photo-like canvas: a blurred collage of background patches (corners of other crops,
enlarged past recognition) with a gradient and sensor noise, saved as JPEG. Each crop is scaled
so that its side is 1-2.5x smaller than the canvas's short side, placed at a random position;
30 % are rotated in-plane (uniform in +-15 degrees); 20 % of the files are stored turned or
mirrored with the EXIF orientation tag (2-8) that makes them upright again; 20 % hold two faces
(a second test crop). The truth (upright coordinates of each pasted crop, its age) goes to
truth.csv beside the images.

For each detector, `agecls.predict` (detect_faces=true, faces=all, alignment on) runs on the
folder; a detection is matched to a pasted face when its box centre lies within a quarter of the
crop's side of the crop's centre and its size is 0.3-1.1 times the crop's side. Reported: the
detection rate (matched faces / pasted faces), false faces (unmatched detections, total and per
photo), the MAE of the matched faces against their ages, the MAE of the same model on the
original crops (detect_faces=false) over the same faces, and the difference. Without --ckpt only
detection is measured. A table is printed and written as CSV.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CROP = 200  # UTKFace crops are 200x200

# to store an upright picture with EXIF orientation o, apply this (the inverse of what a viewer does)
_STORE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_270}


def _background(rng: np.random.Generator, w: int, h: int, sources: list[Path]) -> np.ndarray:
    """A photo-like, face-free background: a collage of enlarged crop corners, blurred, on a gradient."""
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    canvas = (top * (1 - t) + bottom * t) * np.ones((1, w, 1))
    for _ in range(int(rng.integers(3, 7))):
        src = np.asarray(Image.open(sources[int(rng.integers(len(sources)))]).convert("RGB"))
        cx, cy = int(rng.choice([0, CROP - 40])), int(rng.integers(0, 20))  # a top corner: hair, wall, sky
        patch = src[cy:cy + 40, cx:cx + 40]
        pw, ph = int(rng.integers(w // 4, w + 1)), int(rng.integers(h // 4, h + 1))
        x, y = int(rng.integers(-pw // 2, w - pw // 2)), int(rng.integers(-ph // 2, h - ph // 2))
        big = cv2.resize(patch, (pw, ph), interpolation=cv2.INTER_CUBIC).astype(np.float64)
        x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + pw), min(h, y + ph)
        if x1 > x0 and y1 > y0:
            canvas[y0:y1, x0:x1] = big[y0 - y:y1 - y, x0 - x:x1 - x]
    sigma = float(rng.uniform(6, 14))
    return cv2.GaussianBlur(canvas, (0, 0), sigma)


def _paste(canvas: np.ndarray, crop: np.ndarray, cx: float, cy: float, side: float, angle: float) -> None:
    """Paste the square crop, scaled to `side` and turned by `angle` degrees about its centre, at (cx, cy)."""
    h, w = canvas.shape[:2]
    rot = cv2.getRotationMatrix2D((CROP / 2, CROP / 2), angle, side / CROP)  # about the crop's centre
    rot[:, 2] += (cx - CROP / 2, cy - CROP / 2)
    # area averaging first where the crop shrinks, as a camera would see a smaller face
    src, m = crop.astype(np.float64), rot
    if side < CROP:
        small = max(2, int(round(side)))
        src = cv2.resize(crop, (small, small), interpolation=cv2.INTER_AREA).astype(np.float64)
        f = small / CROP
        m = rot.copy()
        m[:, :2] = rot[:, :2] / f
        m[:, 2] = rot[:, :2] @ np.array([0.5 / f - 0.5, 0.5 / f - 0.5]) + rot[:, 2]
    warped = cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    mask = cv2.warpAffine(np.ones(src.shape[:2]), m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    canvas[:] = canvas * (1 - mask[..., None]) + warped * mask[..., None]


def make_wild_set(crops: pd.DataFrame, out_dir: str | Path, seed: int = 0, background: list[Path] | None = None,
                  two_faces: float = 0.2, rotated: float = 0.3, exif: float = 0.2, max_angle: float = 15.0) -> pd.DataFrame:
    """Write photos made from `crops` (columns path, age) into `out_dir`; return the truth table
    (file, face, crop, age, cx, cy, side, angle, orientation), coordinates in the upright photo."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    background = background or [Path(p) for p in crops["path"]]
    rows, i, n = [], 0, len(crops)
    photo = 0
    while i < n:
        pair = i + 1 < n and rng.random() < two_faces
        k = 2 if pair else 1
        h = int(rng.integers(360, 721))
        w = int(h * rng.uniform(1.8, 2.4)) if pair else int(h * rng.uniform(0.75, 1.5))
        canvas = _background(rng, w, h, background)
        placed = []
        for j in range(k):
            path, age = crops["path"].iloc[i + j], float(crops["age"].iloc[i + j])
            crop = np.asarray(Image.open(path).convert("RGB").resize((CROP, CROP), Image.BILINEAR))
            side = min(h, w) / rng.uniform(1.0, 2.5)
            if pair:
                side = min(side, w / 2 / 1.05)  # two faces side by side, apart
            angle = float(rng.uniform(-max_angle, max_angle)) if rng.random() < rotated else 0.0
            half = side / 2 * (abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle))))
            lo_x, hi_x = (half, w / 2 - half) if pair and j == 0 else ((w / 2 + half, w - half) if pair else (half, w - half))
            cx = float(rng.uniform(lo_x, hi_x)) if hi_x > lo_x else (lo_x + hi_x) / 2
            cy = float(rng.uniform(half, h - half)) if h - half > half else h / 2
            _paste(canvas, crop, cx, cy, side, angle)
            placed.append((path, age, cx, cy, side, angle))
        canvas = canvas + rng.normal(0, float(rng.uniform(1, 4)), canvas.shape)
        upright = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
        orientation = int(rng.integers(2, 9)) if rng.random() < exif else 1
        name = f"wild_{photo:05d}.jpg"
        stored = upright if orientation == 1 else upright.transpose(_STORE[orientation])
        ex = Image.Exif()
        if orientation != 1:
            ex[0x0112] = orientation
        stored.save(out_dir / name, quality=92, exif=ex)
        for j, (path, age, cx, cy, side, angle) in enumerate(placed):
            rows.append({"file": name, "face": j, "crop": str(path), "age": age, "cx": cx, "cy": cy, "side": side,
                         "angle": angle, "orientation": orientation, "faces_in_photo": k})
        i += k
        photo += 1
    truth = pd.DataFrame(rows)
    truth.to_csv(out_dir / "truth.csv", index=False)
    return truth


def match(detections: pd.DataFrame, truth: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Each true face's matched detection (columns det_index, predicted; NaN where missed), and
    the number of detections that match no true face. `detections`: file, x0, y0, x1, y1[, predicted]."""
    truth = truth.copy()
    truth["det_index"], truth["predicted"] = -1, np.nan
    false = 0
    for name, dets in detections.groupby("file", sort=False):
        faces = truth.index[truth["file"] == name]
        used: set[int] = set()
        for d, det in dets.iterrows():
            if pd.isna(det["x0"]):
                continue
            dcx, dcy = (det["x0"] + det["x1"]) / 2, (det["y0"] + det["y1"]) / 2
            size = math.sqrt(max(0.0, float((det["x1"] - det["x0"]) * (det["y1"] - det["y0"]))))
            best, best_dist = None, math.inf
            for t in faces:
                row = truth.loc[t]
                dist = math.hypot(dcx - row["cx"], dcy - row["cy"])
                if t not in used and dist <= 0.25 * row["side"] and 0.3 * row["side"] <= size <= 1.1 * row["side"] \
                        and dist < best_dist:
                    best, best_dist = t, dist
            if best is None:
                false += 1
            else:
                used.add(best)
                truth.loc[best, "det_index"] = d
                if "predicted" in det:
                    truth.loc[best, "predicted"] = det["predicted"]
    return truth, false


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from agecls.utils.hydra_utils import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("predict", overrides=overrides)


def test_crops(ckpt: str | None, root: Path, split_csv: str | None) -> pd.DataFrame:
    """path, age of the test split: from --split-csv, else from the checkpoint's membership."""
    if split_csv:
        table = pd.read_csv(split_csv)
        test = table[table["split"] == "test"]
        return pd.DataFrame({"path": [str(root / p) for p in test["path"]], "age": test["age"].to_numpy(dtype=float)})
    if ckpt is None:
        raise SystemExit("give --ckpt (its saved split) or --split-csv (a run's split.csv) to know the test split")
    import torch

    from agecls.data.datamodule import decode_membership

    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    membership = saved.get("AgeDataModule", {}).get("split_membership")
    if not membership:
        raise SystemExit(f"{ckpt} carries no split membership; give --split-csv")
    paths = sorted(decode_membership(membership, "test"))
    from agecls.data.sources.utkface import _AGE  # the age is the name's leading number

    ages = [float(_AGE.match(Path(p).name).group(1)) for p in paths]
    return pd.DataFrame({"path": [str(root / p) for p in paths], "age": ages})


def run_predict(ckpt: str, inputs: str, detector: str | None, num_workers: int) -> tuple[pd.DataFrame, float]:
    from agecls.predict import predict

    over = [f"ckpt_path={ckpt}", f"input={inputs}", "device=cpu", f"num_workers={num_workers}", "batch_size=32"]
    over += [f"detector={detector}", "detect_faces=true"] if detector else ["detect_faces=false"]
    t0 = time.perf_counter()
    table = predict(_compose(over))
    return table, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="a checkpoint of agecls.train (without: detection only)")
    parser.add_argument("--root", default=os.environ.get("AGECLS_UTKFACE_DIR", str(REPO.parent / "shared" / "data" / "utkface")))
    parser.add_argument("--split-csv", default=None, help="a run's split.csv (else the checkpoint's saved split)")
    parser.add_argument("--n", type=int, default=1000, help="test crops to paste (all if fewer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detectors", nargs="+", default=["mtcnn", "haar"])
    parser.add_argument("--work", default=None, help="folder for the made photos (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="reuse the photos already made in --work")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "wild_faces.csv"))
    args = parser.parse_args()

    root = Path(args.root)
    crops = test_crops(args.ckpt, root, args.split_csv)
    crops = crops[[Path(p).exists() for p in crops["path"]]].reset_index(drop=True)
    crops = crops.sample(n=min(args.n, len(crops)), random_state=args.seed).reset_index(drop=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="wild_faces_"))
    # backgrounds from crops outside the ones pasted
    others = [p for p in sorted(root.glob("*.jpg"))[:3000] if str(p) not in set(crops["path"])]
    made = work / "photos" / "truth.csv"
    if args.reuse and made.exists():  # the same photos as a previous run with the same --work
        truth = pd.read_csv(made)
    else:
        truth = make_wild_set(crops, work / "photos", seed=args.seed, background=others)
    photos = truth["file"].nunique()
    print(f"{len(truth)} faces pasted into {photos} photos in {work / 'photos'} "
          f"({int((truth['faces_in_photo'] == 2).sum())} in two-face photos, {int((truth['angle'] != 0).sum())} rotated, "
          f"{truth.loc[truth['orientation'] != 1, 'file'].nunique()} photos stored with an EXIF turn)")

    crop_mae = None
    if args.ckpt:
        listing = work / "crops.csv"
        truth[["crop", "age"]].rename(columns={"crop": "path"}).to_csv(listing, index=False)
        on_crops, _ = run_predict(args.ckpt, str(listing), None, args.num_workers)
        truth["crop_predicted"] = on_crops["predicted"].to_numpy()
        crop_mae = float((truth["crop_predicted"] - truth["age"]).abs().mean())

    results = []
    for name in args.detectors:
        if args.ckpt:
            table, seconds = run_predict(args.ckpt, str(work / "photos"), name, args.num_workers)
        else:
            sys.path.insert(0, str(Path(__file__).parent))
            from face_detectors import detect_folder  # noqa: PLC0415

            table, seconds = detect_folder(name, work / "photos")
        table["file"] = [Path(p).name for p in table["path"]]
        dets = table[table["status"] == "ok"] if "status" in table.columns else table
        matched, false = match(dets, truth)
        found = matched["det_index"] >= 0
        row = {"detector": name, "ckpt": Path(args.ckpt).name if args.ckpt else "", "photos": photos, "faces": len(truth), "detected": int(found.sum()),
               "detection_rate": round(float(found.mean()), 4), "false_faces": false,
               "false_per_photo": round(false / photos, 4), "s_per_photo": round(seconds / photos, 4)}
        if args.ckpt:
            wild_err = (matched.loc[found, "predicted"] - matched.loc[found, "age"]).abs()
            crop_err = (truth.loc[found, "crop_predicted"] - truth.loc[found, "age"]).abs()
            row.update({"wild_mae": round(float(wild_err.mean()), 3), "crops_mae_same_faces": round(float(crop_err.mean()), 3),
                        "mae_gap": round(float(wild_err.mean() - crop_err.mean()), 3),
                        "crops_mae_all": round(crop_mae, 3),
                        "mean_abs_diff_wild_vs_crop": round(float((matched.loc[found, "predicted"]
                                                                   - truth.loc[found, "crop_predicted"]).abs().mean()), 3)})
        results.append(row)
        print(row)
    out = pd.DataFrame(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(args.out, index=False)
    print(out.to_string(index=False))
    print(f"wrote {args.out}; the photos stay in {work}")


if __name__ == "__main__":
    main()
