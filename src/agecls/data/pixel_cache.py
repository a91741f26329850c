"""The preprocessing cache: every image decoded, face-cropped and resized once, kept as uint8.

Decoding a JPEG and resizing it costs about a millisecond of CPU per image, every epoch, in the
per-sample pipeline. The cache does it once: each image is stored at the evaluation resize
(`image_size / crop_pct`, square), which is exactly what evaluation centre-crops from and leaves
the random resized crop its margin. Pixels live in one memory-mapped `.npy` array (N, 3, side,
side), so a batch is a gather of rows from the page cache.

The cache is keyed by the data set's content (each file's path and content hash from the image
index, its face box) and the preprocessing parameters: any change builds a new one. A build writes
into a temporary folder that is renamed only when complete, so an interrupted build is never
mistaken for a cache; a failed build removes it, and the next build removes those of builds killed
outright.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from agecls.data.images import load_rgb
from agecls.data.samplers import decode
from agecls.utils.files import building
from agecls.utils.progress import progress

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when preprocessing changes meaning (3: EXIF orientation applied)


def preprocess(path: str, box: tuple[float, ...] | None, margin: float, side: int,
               align: tuple[float, ...] | None = None) -> np.ndarray:
    """Decode, crop the face box (or warp by its alignment, data.align), resize the short side to
    `side`, centre-crop a square: (3, side, side)."""
    return _resize(load_rgb(path, box, margin, align), side)


def _resize(img: Image.Image, side: int) -> np.ndarray:
    # the same Pillow kernels as the evaluation transform, so its centre crop is the same view
    img = TF.resize(img, side, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.pil_to_tensor(TF.center_crop(img, side)).numpy()


def cache_key(records: pd.DataFrame, side: int, margin: float) -> str:
    h = hashlib.sha1(json.dumps({"version": CACHE_VERSION, "side": side, "margin": margin}).encode())
    boxes = records["face_box"] if "face_box" in records.columns else [None] * len(records)
    hashes = records["sha1"] if "sha1" in records.columns else [""] * len(records)
    aligns = records["face_align"] if "face_align" in records.columns else [None] * len(records)
    for path, digest, box, align in zip(records["path"], hashes, boxes, aligns, strict=True):
        if not digest:  # no content hash (indexing off): fall back to what the file's stat says
            st = os.stat(path)
            digest = f"{st.st_size}-{st.st_mtime_ns}-{st.st_ctime_ns}-{st.st_ino}"
        h.update((f"{path}|{digest}|{box}\n" if align is None else f"{path}|{digest}|{box}|{align}\n").encode())
    return h.hexdigest()[:20]


def preprocess_items(records: pd.DataFrame) -> list[tuple[int, str, object, object]]:
    """(row, path, face box, alignment) of every record: what a cache build preprocesses."""
    n = len(records)
    boxes = records["face_box"].tolist() if "face_box" in records.columns else [None] * n
    aligns = records["face_align"].tolist() if "face_align" in records.columns else [None] * n
    return list(zip(range(n), records["path"].tolist(), boxes, aligns, strict=True))


def _fill(args: tuple[str, int, int, list[tuple[int, str, object]], float]) -> int:
    """Worker: preprocess a chunk of images straight into the memory-mapped array."""
    array_path, n, side, items, margin = args
    images = np.lib.format.open_memmap(array_path, mode="r+")
    for row, path, box, align in items:
        try:
            img = load_rgb(path, box, margin, align)
        except Exception as err:
            raise RuntimeError(
                f"cannot read image {path} while building the preprocessing cache: {type(err).__name__}: {err}. "
                "It changed or became unreadable after it was indexed at the start of this run, or "
                "data.check_images=false let an undecodable file through; the next run re-indexes "
                "changed files and, with data.check_images=true, drops unreadable ones."
            ) from err
        images[row] = _resize(img, side)
    images.flush()
    return len(items)


class PixelCache:
    """A built cache: `images` (N, 3, side, side) uint8, row i holding records row i."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.images = np.load(self.directory / "images.npy", mmap_mode="r")
        self.side = int(self.meta["side"])

    @classmethod
    def build_or_load(cls, records: pd.DataFrame, cache_dir: str | Path, side: int, margin: float = 0.0,
                      workers: int = 1) -> PixelCache:
        key = cache_key(records, side, margin)
        final = Path(cache_dir) / "pixels" / key
        if (final / "meta.json").exists():
            log.info("Preprocessing cache %s: %d images at %d px (reused)", final, len(records), side)
            return cls(final)
        n = len(records)
        items = preprocess_items(records)
        chunk = 256
        # built under a temporary name, removed on any failure (Ctrl-C included); the leftovers of
        # a build killed outright are removed by the next build (agecls.utils.files.building)
        with building(final) as tmp:
            array_path = str(tmp / "images.npy")
            np.lib.format.open_memmap(array_path, mode="w+", dtype=np.uint8, shape=(n, 3, side, side)).flush()
            jobs = [(array_path, n, side, items[i: i + chunk], margin) for i in range(0, n, chunk)]
            t0 = time.perf_counter()
            with progress(total=n, desc=f"Building preprocessing cache ({side} px)", unit="img", mininterval=2) as bar:
                if workers > 1 and len(jobs) > 1:
                    with ProcessPoolExecutor(max_workers=workers) as pool:
                        for done in pool.map(_fill, jobs):
                            bar.update(done)
                else:
                    for job in jobs:
                        bar.update(_fill(job))
            seconds = time.perf_counter() - t0
            meta = {"version": CACHE_VERSION, "key": key, "n": n, "side": side, "margin": margin,
                    "build_seconds": seconds, "seconds_per_1000": seconds / max(n, 1) * 1000}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            records[["path"]].to_csv(tmp / "paths.csv", index=False)
            # complete: only on leaving this block is it renamed to look like a cache
        log.info("Built preprocessing cache %s: %d images at %d px in %.1f s (%.2f s per 1,000)",
                 final, n, side, seconds, meta["seconds_per_1000"])
        return cls(final)


def _identity(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


class CachedImages(Dataset):
    """A split's rows of a PixelCache. Item/batch: {"image": uint8 (3, side, side), "age", "index",
    "epoch"}; `__getitems__` gathers a whole batch from the memory map in one go."""

    collate_fn = staticmethod(_identity)

    def __init__(self, cache: PixelCache, rows: np.ndarray, ages: np.ndarray) -> None:
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.ages = np.asarray(ages, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, keys: list[int]) -> dict[str, torch.Tensor]:
        pairs = [decode(k, len(self.rows)) for k in keys]
        idx = np.fromiter((i for _, i in pairs), dtype=np.int64, count=len(pairs))
        rows = self.rows[idx]
        order = np.argsort(rows, kind="stable")  # read the memory map in file order
        pixels = np.empty((len(rows), *self.cache.images.shape[1:]), dtype=np.uint8)
        pixels[order] = self.cache.images[rows[order]]
        return {
            "image": torch.from_numpy(pixels),
            "age": torch.from_numpy(self.ages[idx]),
            "index": torch.from_numpy(idx),
            "epoch": torch.tensor([e for e, _ in pairs], dtype=torch.int64),
        }

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([key])
        return {k: v[0] for k, v in batch.items()}
