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

    python benchmarks/cache_formats.py mode=decode [device=auto] [n=2048] [image_size=224] [output=...]

The decode rate alone, on the CPU against the GPU: the same `n` crops built into a jpeg cache (side =
image_size / crop_pct, as training stores them), then every image decoded by `decode_batch` (what
training calls) on the CPU with 1 thread and with one thread per core (batches of 64, threads over
batches), and, where CUDA is present (device=auto or cuda), batched on the GPU
(`torchvision.io.decode_jpeg(list, device="cuda")`, bytes copied from the host included) in batches of
64 and 256. Without a GPU only the CPU rows are written. Writes `output` (default
benchmarks/results/<hardware>-decode.csv, hardware as agecls.bench names it).
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


def decode_rates(opts: dict[str, str]) -> pd.DataFrame:
    """mode=decode: images/s of the batched JPEG decode on the CPU (1 thread, all cores) and the GPU."""
    from concurrent.futures import ThreadPoolExecutor

    import torchvision

    from agecls.data.jpeg_cache import decode_batch

    root = Path(opts.get("root", os.environ.get("AGECLS_UTKFACE_DIR", REPO.parent / "shared" / "data" / "utkface")))
    n, size, crop_pct = int(opts.get("n", 2048)), int(opts.get("image_size", 224)), float(opts.get("crop_pct", 0.875))
    want = opts.get("device", "auto")
    cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    side = eval_resize(size, crop_pct)
    files = sorted(root.glob("*.jpg"))
    files = files[:: max(1, len(files) // n)][:n]
    records = pd.DataFrame({"path": [str(p) for p in files]})
    cores = os.cpu_count() or 1
    rows = []
    try:
        from agecls.bench import hardware_name
        hardware = hardware_name(device)
    except ImportError:  # agecls.bench needs hydra
        hardware = device.type
    with tempfile.TemporaryDirectory() as tmp:
        cache = JpegCache.build_or_load(records, tmp, side, workers=min(cores, 12))
        blobs = [torch.from_numpy(b) for b in cache.encoded(np.arange(len(cache)))]
        common = {"hardware": hardware, "n_images": len(blobs), "image_size": size, "side": side,
                  "bytes_per_image": round(cache.nbytes / len(blobs))}

        def timed(run, dev: torch.device) -> float:
            run()  # warm: allocator, nvjpeg handles, thread pool
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            run()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return time.perf_counter() - t0

        threads_before = torch.get_num_threads()
        torch.set_num_threads(1)
        for threads in sorted({1, cores}):
            batches = [blobs[i: i + 64] for i in range(0, len(blobs), 64)]

            def on_cpu(batches=batches, threads=threads) -> None:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(decode_batch, batches))

            s = timed(on_cpu, torch.device("cpu"))
            rows.append({"device": "cpu", "threads": threads, "batch_size": 64, **common,
                         "images_per_s": round(len(blobs) / s), "ms_per_batch": round(s / len(batches) * 1000, 2)})
        torch.set_num_threads(threads_before)
        if cuda:
            for bs in (64, 256):
                batches = [blobs[i: i + bs] for i in range(0, len(blobs), bs)]

                def on_gpu(batches=batches) -> None:
                    for b in batches:
                        decode_batch(b, device)

                s = timed(on_gpu, device)
                rows.append({"device": "cuda", "threads": 1, "batch_size": bs, **common,
                             "images_per_s": round(len(blobs) / s), "ms_per_batch": round(s / len(batches) * 1000, 2)})
    for row in rows:
        row.update(torch=torch.__version__, torchvision=torchvision.__version__, date=time.strftime("%Y-%m-%d"),
                   load_avg_1min=round(os.getloadavg()[0], 2), cpus=cores)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if cuda:
        gpu = table.loc[table["device"] == "cuda", "images_per_s"].max()
        cpu_all = table.loc[(table["device"] == "cpu") & (table["threads"] == cores), "images_per_s"].iloc[0]
        print(f"GPU batched decode: {gpu / cpu_all:.1f}x the CPU's {cores} threads")
    out = Path(opts["output"]) if opts.get("output") else OUT.parent / f"{hardware}-decode.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(f"wrote {out}")
    return table


def main(argv: list[str]) -> pd.DataFrame:
    opts = dict(a.split("=", 1) for a in argv)
    if opts.get("mode", "formats") == "decode":
        return decode_rates(opts)
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
