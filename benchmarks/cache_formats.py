"""What `data.cache_format` costs: bytes per image on disk and batch decode rate on one core, raw
against jpeg.

    python benchmarks/cache_formats.py [root=/path/to/utkface] [n=2000] [image_size=128] [crop_pct=0.875]

Takes `n` UTKFace crops (every k-th file of the sorted folder, so ages and photos vary), builds
both preprocessing caches (side = image_size / crop_pct: 146 px at 128) in a temporary folder, then
with torch.set_num_threads(1) delivers every image once in shuffled batches of 64 through each
format's dataset (`CachedImages`: a gather from the memory map; `CachedJpegs`: slicing the bytes
and a batched torchvision decode_jpeg), after a warm-up pass so both read from the page cache.
Images/s per core is images / process CPU seconds (what a loaded machine does not distort much);
wall-clock images/s is printed beside it. Also the JPEG's mean and max abs pixel error against raw.
Prints a table and writes benchmarks/results/cache_formats.csv.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from agecls.data.jpeg_cache import CachedJpegs, JpegCache, raw_cache_bytes
from agecls.data.pixel_cache import CachedImages, PixelCache
from agecls.data.transforms import eval_resize

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "cache_formats.csv"


def deliver(ds, order: np.ndarray, batch: int = 64) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to deliver every index of `order` in batches."""
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(0, len(order), batch):
        ds.__getitems__(order[i: i + batch].tolist())
    return time.process_time() - c0, time.perf_counter() - w0


def main(argv: list[str]) -> pd.DataFrame:
    opts = dict(a.split("=", 1) for a in argv)
    root = Path(opts.get("root", os.environ.get("AGECLS_UTKFACE_DIR", REPO.parent / "shared" / "data" / "utkface")))
    n, size, crop_pct = int(opts.get("n", 2000)), int(opts.get("image_size", 128)), float(opts.get("crop_pct", 0.875))
    side = eval_resize(size, crop_pct)
    files = sorted(root.glob("*.jpg"))
    files = files[:: max(1, len(files) // n)][:n]
    records = pd.DataFrame({"path": [str(p) for p in files]})
    ages = np.array([float(p.name.split("_")[0]) for p in files], dtype=np.float32)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        raw = PixelCache.build_or_load(records, tmp, side, workers=2)
        raw_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        jpeg = JpegCache.build_or_load(records, tmp, side, workers=2)
        jpeg_build = time.perf_counter() - t0
        order = np.random.default_rng(0).permutation(len(files))
        a = CachedImages(raw, np.arange(len(files)), ages)
        b = CachedJpegs(jpeg, np.arange(len(files)), ages)
        diffs = [(a.__getitems__(list(range(i, min(i + 64, len(files)))))["image"].int()
                  - b.__getitems__(list(range(i, min(i + 64, len(files)))))["image"].int()).abs()
                 for i in range(0, len(files), 64)]
        mean_err = float(torch.cat([d.flatten().float() for d in diffs]).mean())
        max_err = int(max(int(d.max()) for d in diffs))
        for fmt, ds, nbytes, build in (("raw", a, raw_cache_bytes(len(files), side), raw_build),
                                       ("jpeg", b, jpeg.nbytes + 8 * (len(files) + 1), jpeg_build)):
            deliver(ds, order)  # warm: page cache, allocator
            cpu, wall = min(deliver(ds, order) for _ in range(2))
            rows.append({"format": fmt, "n_images": len(files), "image_size": size, "side": side,
                         "bytes_per_image": round(nbytes / len(files)),
                         "images_per_s_per_core": round(len(files) / cpu),
                         "images_per_s_wall": round(len(files) / wall),
                         "ms_per_batch64_cpu": round(cpu / len(files) * 64 * 1000, 2),
                         "build_s_2_workers": round(build, 1),
                         "mean_abs_err": 0.0 if fmt == "raw" else round(mean_err, 2),
                         "max_abs_err": 0 if fmt == "raw" else max_err,
                         "load_avg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    print(f"raw / jpeg bytes: {rows[0]['bytes_per_image'] / rows[1]['bytes_per_image']:.1f}x; "
          f"jpeg decode is {rows[0]['images_per_s_per_core'] / rows[1]['images_per_s_per_core']:.0f}x the CPU of a raw gather")
    print(f"note: measured with a 1-minute load average of {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          "on a shared, loaded machine the wall-clock rates are lower bounds, the per-core (CPU time) rates less so")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(OUT, index=False)
    print(f"wrote {OUT}")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
