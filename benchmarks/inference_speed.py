"""Photos per second through agecls.AgeEstimator: detection + alignment + model, on CPU.

    python benchmarks/inference_speed.py --ckpt RUN/checkpoints/epoch_XX.ckpt [--onnx model.onnx]
        [--photos ../shared/data/photos] [--threads 1 2] [--batch 1 16] [--rounds 3]
        [--out benchmarks/results/inference_speed.csv]

For each model file (the .ckpt, and the .onnx if given), torch thread count (`threads`, which the
estimator also gives OpenCV, whose DNN runs the MTCNN detector) and batch size:

- `batch=1`: `est.predict(path)` photo after photo, as a loop in a user's script does;
- `batch=16`: `est.predict([16 paths])`: one call, faces of several photos in one forward pass.

Each photo of --photos (the shared photos: 14 real photos, 480 x 360 to 1920 x 1080) is predicted
--rounds times after one warm-up round; reported are photos/s and seconds/photo over the timed
rounds (decoding, EXIF, detection, alignment, preprocessing, model and interval; what a user
waits for), and apart the detector's milliseconds per photo (detection alone on decoded photos)
and the model's milliseconds per face (preprocessed crops, at the batch size). The machine's load
average is recorded with each row: the figures mean something only on an idle machine.
Rows are appended to --out (a rerun replaces the rows of the same model file, threads and batch).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from results_csv import write_replacing  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(model_path: str, photos: list[Path], threads: int, batch: int, rounds: int) -> dict:
    import torch

    import agecls
    from agecls.estimator import as_image

    est = agecls.AgeEstimator.from_checkpoint(model_path, device="cpu", threads=threads, batch_size=batch)
    images = [as_image(p) for p in photos]

    def run_all() -> int:
        faces = 0
        if batch == 1:
            for p in photos:
                faces += len([f for f in est.predict(p) if f.status == "ok"])
        else:
            for s in range(0, len(photos), batch):
                faces += sum(len([f for f in rows if f.status == "ok"]) for rows in est.predict(photos[s:s + batch]))
        return faces

    faces = run_all()  # warm-up: detector and model initialised, files in the page cache
    t0 = time.perf_counter()
    for _ in range(rounds):
        run_all()
    total = time.perf_counter() - t0
    n = len(photos) * rounds

    # the parts: the detector on decoded photos, the model on preprocessed crops
    detect_s = sum(_timed(lambda im=im: est.detector.detect(np.asarray(im)), 2) for im in images)
    crop = est.backend.preprocess(images[0].resize((200, 200)))
    crops = torch.stack([crop] * batch)
    model_s = _timed(lambda: est.backend(crops, est.tta, est.coverage), max(3, rounds))
    return {
        "model_file": Path(model_path).name, "backend": "onnxruntime" if model_path.endswith(".onnx") else "torch",
        "backbone": (est.backend.hparams.get("backbone") or {}).get("name") if isinstance(
            est.backend.hparams.get("backbone"), dict) else est.backend.hparams.get("backbone"),
        "image_size": est.backend.image_size, "detector": est.options.detector, "threads": threads, "batch": batch,
        "photos": n, "faces_per_round": faces, "photos_per_s": round(n / total, 2),
        "s_per_photo": round(total / n, 3), "detect_ms_per_photo": round(1000 * detect_s / len(images), 1),
        "model_ms_per_face": round(1000 * model_s / batch, 1), "load_avg_1min": round(os.getloadavg()[0], 2),
        "cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint of agecls.train")
    parser.add_argument("--onnx", default=None, help="its export (agecls.export), timed as well")
    parser.add_argument("--photos", default=str(REPO.parent / "shared" / "data" / "photos"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results" / "inference_speed.csv"))
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from agecls.data.images import list_images

    photos = list_images(args.photos)
    if not photos:
        raise SystemExit(f"--photos {args.photos} holds no photos")
    rows = []
    for model_path in [args.ckpt, *([args.onnx] if args.onnx else [])]:
        for threads in args.threads:
            for batch in args.batch:
                row = measure(str(model_path), photos, threads, batch, args.rounds)
                print(f"{row['model_file']}: threads {threads}, batch {batch}: {row['photos_per_s']} photos/s "
                      f"({row['s_per_photo']} s/photo; detector {row['detect_ms_per_photo']} ms/photo, model "
                      f"{row['model_ms_per_face']} ms/face; load {row['load_avg_1min']})", flush=True)
                rows.append(row)
    table = pd.DataFrame(rows)
    table = write_replacing(args.out, table, ["model_file", "threads", "batch"])
    print(table.to_string(index=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
