"""The device-side augmentation alone: agecls's kernels (compiled and eager) against Kornia's.

    python benchmarks/augment_speed.py [device=cpu] [batch=64] [side=146] [size=128] [rounds=4]

Times, in interleaved rounds (median reported), the study's augmentation of one batch of uint8
images (`side` px, as in the preprocessing cache) to `size` px, each image with its own draw:
agecls's BatchAugment with `data.augment.compile` true and false, and Kornia's
AugmentationSequential with the same transforms (ColorJitter, RandomRotation,
RandomResizedCrop, RandomAffine, RandomHorizontalFlip). Prints a table and writes
benchmarks/results/augment_speed.csv.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import kornia.augmentation as K
import pandas as pd
import torch
from omegaconf import OmegaConf

from agecls.data.batch_augment import BatchAugment

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> pd.DataFrame:
    opts = dict(a.split("=", 1) for a in argv)
    device = torch.device(opts.get("device", "cpu"))
    n, side, size = int(opts.get("batch", 64)), int(opts.get("side", 146)), int(opts.get("size", 128))
    rounds, reps = int(opts.get("rounds", 4)), int(opts.get("reps", 8))
    aug = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "_base.yaml").augment)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, device=device)
    g = torch.Generator().manual_seed(0)
    cj = aug["color_jitter"]
    kornia_seq = K.AugmentationSequential(
        K.ColorJitter(*cj, p=1.0),
        K.RandomRotation(aug["rotation"], p=1.0),
        K.RandomResizedCrop((size, size), scale=tuple(aug["resized_crop_scale"]), ratio=tuple(aug["resized_crop_ratio"])),
        K.RandomAffine(degrees=0, translate=tuple(aug["affine_translate"]), scale=tuple(aug["affine_scale"]),
                       shear=aug["affine_shear"], p=1.0),
        K.RandomHorizontalFlip(p=aug["hflip"]),
    ).to(device)
    impls = {
        "agecls, compiled colour jitter (default)": BatchAugment(size, {**aug, "compile": True}).__call__,
        "agecls, eager": BatchAugment(size, {**aug, "compile": False}).__call__,
        "kornia AugmentationSequential": lambda x, _g: kornia_seq(x.float() / 255.0),
    }
    for fn in impls.values():  # warm-up (and the one-off compile)
        for _ in range(2):
            fn(images, g)
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(images, g)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / reps * 1000)
    rows = [{"implementation": name, "ms_per_batch": statistics.median(t), "ms_min": min(t), "ms_max": max(t),
             "images_per_s": n / statistics.median(t) * 1000, "batch": n, "side": side, "size": size,
             "device": str(device), "threads": torch.get_num_threads()} for name, t in times.items()]
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    out = ROOT / "benchmarks" / "results" / "augment_speed.csv"
    table.to_csv(out, index=False)
    print(f"wrote {out}")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
