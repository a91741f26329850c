"""The preprocessing cache: every image decoded, face-cropped and resized once, kept as uint8.

Decoding a JPEG and resizing it costs about a millisecond of CPU per image, every epoch, in the
per-sample pipeline. The cache does it once: each image is stored at the evaluation resize
(`image_size / crop_pct`, square), which is exactly what evaluation centre-crops from and leaves
the random resized crop its margin. Pixels live in one memory-mapped `.npy` array (N, 3, side,
side), so a batch is a gather of rows from the page cache.

The cache is keyed by the data set's content (each file's path and content hash from the image
index, its face box) and the preprocessing parameters: any change builds a new one. A build writes
into a temporary folder that is renamed only when complete, so an interrupted build is never
mistaken for a cache; a failed build removes it, and the next build or reuse removes those of
builds killed outright.

A cache is never trusted on its name (issue 18): the build checks the free space first (a clear
error naming the folder and the bytes needed and free), reserves the file (posix_fallocate) and
writes it front to back (no sparse file under a memory map, so a full disk is an error, never a
SIGBUS), and seals the size and per-4-MiB crc32 of `images.npy` into `meta.json`. Every reuse
checks them (agecls.utils.files.open_cache, data.verify=stat|full: the policy and its measured
cost are there) before the array is mapped; a cache that fails is rebuilt, with a warning naming
the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from agecls.data.images import load_rgb
from agecls.data.index import check_verify
from agecls.data.samplers import decode
from agecls.utils.files import (
    BlockWriter,
    building,
    check_free_space,
    load_npy,
    open_cache,
    reuse_checked,
    seal_cache,
)
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


def _fill(args: tuple[int, float, int, list[tuple[int, str, object, object]]]) -> np.ndarray:
    """Worker: (side, margin, first row, items) -> the chunk's preprocessed images (len, 3, side, side)."""
    side, margin, _, items = args
    out = np.empty((len(items), 3, side, side), dtype=np.uint8)
    for j, (_, path, box, align) in enumerate(items):
        try:
            img = load_rgb(path, box, margin, align)
        except Exception as err:
            raise RuntimeError(
                f"cannot read image {path} while building the preprocessing cache: {type(err).__name__}: {err}. "
                "It changed or became unreadable after it was indexed at the start of this run, or "
                "data.check_images=false let an undecodable file through; the next run re-indexes "
                "changed files and, with data.check_images=true, drops unreadable ones."
            ) from err
        out[j] = _resize(img, side)
    return out


def in_order(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int,
             initializer: Callable[[], None] | None = None) -> Iterator[Any]:
    """fn(job) for each job, in order: in this process, or in `workers` processes with at most two
    jobs per worker ahead of the consumer (a build holds a few chunks in memory, not the cache)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    pool = ProcessPoolExecutor(max_workers=workers, initializer=initializer)
    pending: deque[Future] = deque()
    try:
        todo = iter(jobs)
        for job in todo:
            pending.append(pool.submit(fn, job))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            job = next(todo, None)
            if job is not None:
                pending.append(pool.submit(fn, job))
            yield result
    finally:
        pool.shutdown(cancel_futures=True)


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The .npy header of a C-order array of `shape` and `dtype` (what np.save writes first)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


SPACE_HINT = "point data.cache_dir (paths.cache_dir) to a disk with room, or use data.cache_format=jpeg (5-10x smaller)"


class PixelCache:
    """A built cache: `images` (N, 3, side, side) uint8, row i holding records row i.

    Opening checks the cache (agecls.utils.files.open_cache) and raises CacheDamaged when it fails:
    `verify` is data.verify (stat | full; None: sizes only, for a cache this process just built);
    `expect`, fields meta.json must hold (build_or_load's key, n, side and margin)."""

    def __init__(self, directory: Path, verify: str | None = "stat", expect: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.meta = open_cache(self.directory, ["images.npy"],
                               {"version": CACHE_VERSION, "key": self.directory.name, **(expect or {})}, verify)
        self.side = int(self.meta["side"])
        self.images = load_npy(self.directory / "images.npy", (int(self.meta["n"]), 3, self.side, self.side),
                               np.uint8, mmap=True)

    @classmethod
    def build_or_load(cls, records: pd.DataFrame, cache_dir: str | Path, side: int, margin: float = 0.0,
                      workers: int = 1, verify: str = "stat") -> PixelCache:
        check_verify(verify)
        key = cache_key(records, side, margin)
        final = Path(cache_dir) / "pixels" / key
        n = len(records)
        expect = {"n": n, "side": side, "margin": margin}
        cache = reuse_checked(final, "preprocessing cache", lambda d: cls(d, verify, expect))
        if cache is not None:
            log.info("Preprocessing cache %s: %d images at %d px (reused, verify=%s)", final, n, side, verify)
            return cache
        items = preprocess_items(records)
        chunk = 256
        header = npy_header((n, 3, side, side), np.uint8)
        size = len(header) + n * 3 * side * side
        check_free_space(final.parent, size, f"preprocessing cache of {n:,} images at {side} px", SPACE_HINT)
        # built under a temporary name, removed on any failure (Ctrl-C included); the leftovers of
        # a build killed outright are removed by the next build or reuse (agecls.utils.files)
        with building(final) as tmp:
            jobs = [(side, margin, i, items[i: i + chunk]) for i in range(0, n, chunk)]
            t0 = time.perf_counter()
            with BlockWriter(tmp / "images.npy", size) as out, \
                    progress(total=n, desc=f"Building preprocessing cache ({side} px)", unit="img", mininterval=2) as bar:
                out.write(header)
                for pixels in in_order(_fill, jobs, workers):  # row i is records row i
                    out.write(np.ascontiguousarray(pixels, dtype=np.uint8))
                    bar.update(len(pixels))
            if out.size != size:
                raise RuntimeError(f"the preprocessing cache build wrote {out.size:,} bytes, not {size:,}")
            seconds = time.perf_counter() - t0
            meta = {"version": CACHE_VERSION, "key": key, "n": n, "side": side, "margin": margin,
                    "build_seconds": seconds, "seconds_per_1000": seconds / max(n, 1) * 1000}
            records[["path"]].to_csv(tmp / "paths.csv", index=False)
            seal_cache(tmp, meta, {"images.npy": out.record})
            # complete: only on leaving this block is it renamed to look like a cache
        log.info("Built preprocessing cache %s: %d images at %d px in %.1f s (%.2f s per 1,000)",
                 final, n, side, seconds, meta["seconds_per_1000"])
        return cls(final, None, expect)


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
