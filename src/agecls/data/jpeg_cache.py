"""The compressed preprocessing cache (data.cache_format=jpeg): each crop stored once, as a JPEG.

The raw cache (agecls.data.pixel_cache) stores (image_size / crop_pct)^2 x 3 bytes per image: 196 KB
at 224 px, about 100 GB for IMDB-WIKI, more than most page caches. This one stores the very same
preprocessed crop (`pixel_cache.preprocess`: decoded, face-cropped, resized, square) encoded as a
JPEG at quality 95, about 10-20x smaller, and decodes batches again when they are read:

- `images.bin`: the JPEGs, concatenated, memory-mapped; `offsets.npy` (N + 1,) int64: image i is
  bytes offsets[i]:offsets[i + 1]. Row i holds the prepared records' row i, as in the raw cache.
- Decoding: on a CPU machine in the DataLoader workers (data.num_workers of them; `CachedJpegs`
  returns decoded uint8 batches); when training on a CUDA device the workers only slice the bytes
  and the batch is decoded on the GPU in one batched `torchvision.io.decode_jpeg(..., device=...)`
  call (AgeDataModule.on_before_batch_transfer). Either way the batch step receives the same uint8
  (B, 3, side, side) images as with the raw cache, so the device-side augmentation is unchanged.

Keyed like the raw cache (`pixel_cache.cache_key`) plus the format and quality, built under
`agecls.utils.files.building` (a temporary folder renamed only when complete), and checked like
it (issue 18): both files are written front to back by `agecls.utils.files.BlockWriter`, their
sizes and per-block crc32 sealed into meta.json; every reuse checks them (data.verify=stat|full,
agecls.utils.files.open_cache) and the offset table against the bytes, and rebuilds a cache that
fails, with a warning naming the file. The free space is checked once the first chunk shows how
large the JPEGs come out (and a full disk during the build is an error naming it).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from agecls.data.index import check_verify
from agecls.data.pixel_cache import (
    CACHE_VERSION,
    SPACE_HINT,
    _identity,
    cache_key,
    in_order,
    preprocess,
    preprocess_items,
)
from agecls.data.samplers import decode
from agecls.utils.files import (
    BlockWriter,
    CacheDamaged,
    building,
    check_free_space,
    load_npy,
    open_cache,
    reuse_checked,
    seal_cache,
)
from agecls.utils.progress import progress

log = logging.getLogger(__name__)

QUALITY = 95


def raw_cache_bytes(n: int, side: int) -> int:
    """Bytes of the raw uint8 cache of n images of side x side."""
    return int(n) * 3 * int(side) * int(side)


def choose_format(cache_format: str, n: int, side: int, budget_gb: float) -> str:
    """raw or jpeg: `auto` picks raw when the raw cache fits `budget_gb`, jpeg otherwise (logged)."""
    if cache_format != "auto":
        return cache_format
    need = raw_cache_bytes(n, side)
    budget = float(budget_gb) * 1e9
    chosen = "raw" if need <= budget else "jpeg"
    log.info("data.cache_format=auto: %s (the raw cache of %d images at %d px needs %.2f GB, %s "
             "data.cache_memory_budget_gb=%g)", chosen, n, side, need / 1e9,
             "within" if chosen == "raw" else "over", budget_gb)
    return chosen


def jpeg_key(records: pd.DataFrame, side: int, margin: float, quality: int = QUALITY) -> str:
    base = cache_key(records, side, margin)
    return hashlib.sha1(f"{base}|jpeg|{quality}".encode()).hexdigest()[:20]


def _one_thread() -> None:
    """Pool initializer: a build's parallelism is its processes, one per core. torch's intra-op
    threads on top only oversubscribe the cores, and encode_jpeg suffers badly from that: measured
    12-16 ms per 146 px crop with 2 threads against 0.6 ms with 1, on 2 busy cores (issue 12)."""
    torch.set_num_threads(1)


def _encode(args: tuple[list[tuple[int, str, Any, Any]], int, float, int]) -> list[bytes]:
    """Worker: preprocess a chunk of images exactly as the raw cache does, encode each as JPEG."""
    items, side, margin, quality = args
    threads = torch.get_num_threads()
    if threads != 1:  # built in the calling process (workers=1): one thread while encoding
        torch.set_num_threads(1)
        try:
            return _encode(args)
        finally:
            torch.set_num_threads(threads)
    out = []
    for _, path, box, align in items:
        try:
            pixels = preprocess(path, box, margin, side, align)
        except Exception as err:
            raise RuntimeError(
                f"cannot read image {path} while building the jpeg preprocessing cache: "
                f"{type(err).__name__}: {err}. It changed or became unreadable after it was indexed "
                "at the start of this run; the next run re-indexes changed files."
            ) from err
        out.append(encode_jpeg(torch.from_numpy(np.ascontiguousarray(pixels)), quality=quality).numpy().tobytes())
    return out


class JpegCache:
    """A built jpeg cache: `offsets` (N + 1,) and the memory-mapped bytes; `side`, `n`, `nbytes`.

    Opening checks it (agecls.utils.files.open_cache; `verify` and `expect` as for PixelCache) and
    that the offset table fits the bytes; CacheDamaged when anything fails."""

    FILES = ("images.bin", "offsets.npy")

    def __init__(self, directory: Path, verify: str | None = "stat", expect: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.meta = open_cache(self.directory, self.FILES, {"version": CACHE_VERSION, "format": "jpeg",
                                                            "key": self.directory.name, **(expect or {})}, verify)
        self.side = int(self.meta["side"])
        where = self.directory / "offsets.npy"
        n, size = int(self.meta["n"]), self.meta["files"]["images.bin"]["size"]
        self.offsets = off = load_npy(where, (n + 1,), np.int64)
        if off[0] != 0 or off[-1] != size or (np.diff(off) <= 0).any():
            raise CacheDamaged(f"{where} is not the offset table of {n} JPEGs in {size:,} bytes")
        self._data: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the images (the offset table adds 8 per image)."""
        return int(self.offsets[-1])

    @property
    def data(self) -> np.memmap:
        if self._data is None:  # opened lazily: also after unpickling in a spawned worker
            self._data = np.memmap(self.directory / "images.bin", dtype=np.uint8, mode="r")
        return self._data

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"] = None  # never pickle the mapped bytes into a worker: it reopens the file
        return state

    def encoded(self, rows: np.ndarray) -> list[np.ndarray]:
        """The JPEG bytes of `rows`, each a copy (uint8 1-D array), read in file order."""
        data, off = self.data, self.offsets
        out: list[np.ndarray] = [None] * len(rows)  # type: ignore[list-item]
        for j in np.argsort(rows, kind="stable"):
            r = int(rows[j])
            out[j] = np.array(data[off[r]: off[r + 1]])
        return out

    @classmethod
    def build_or_load(cls, records: pd.DataFrame, cache_dir: str | Path, side: int, margin: float = 0.0,
                      workers: int = 1, quality: int = QUALITY, verify: str = "stat") -> JpegCache:
        check_verify(verify)
        key = jpeg_key(records, side, margin, quality)
        final = Path(cache_dir) / "jpegs" / key
        n = len(records)
        expect = {"n": n, "side": side, "margin": margin, "quality": quality}
        cache = reuse_checked(final, "JPEG preprocessing cache", lambda d: cls(d, verify, expect))
        if cache is not None:
            log.info("JPEG preprocessing cache %s: %d images at %d px (reused, verify=%s)", final, n, side, verify)
            return cache
        items = preprocess_items(records)
        chunk = 256
        jobs = [(items[i: i + chunk], side, margin, quality) for i in range(0, n, chunk)]
        offsets = np.zeros(n + 1, dtype=np.int64)
        with building(final) as tmp:
            t0 = time.perf_counter()
            row = 0
            with BlockWriter(tmp / "images.bin") as out, \
                    progress(total=n, desc=f"Building JPEG preprocessing cache ({side} px)", unit="img",
                             mininterval=2) as bar:
                for encoded in in_order(_encode, jobs, workers, initializer=_one_thread):
                    for blob in encoded:  # in order: row i is records row i
                        out.write(blob)
                        offsets[row + 1] = offsets[row] + len(blob)
                        row += 1
                    if row == len(encoded) and row < n:  # the first chunk tells what the rest needs
                        need = int(out.size / row * (n - row) * 1.2) + 8 * (n + 1)
                        check_free_space(tmp, need, f"JPEG preprocessing cache of {n:,} images at {side} px "
                                                    "(estimated from its first images, plus 20 %)", SPACE_HINT)
                    bar.update(len(encoded))
            with BlockWriter(tmp / "offsets.npy") as table:
                np.lib.format.write_array(table, offsets, allow_pickle=False)
            seconds = time.perf_counter() - t0
            meta = {"version": CACHE_VERSION, "format": "jpeg", "quality": quality, "key": key, "n": n,
                    "side": side, "margin": margin, "bytes": int(offsets[-1]),
                    "bytes_per_image": float(offsets[-1]) / max(n, 1),
                    "build_seconds": seconds, "seconds_per_1000": seconds / max(n, 1) * 1000}
            records[["path"]].to_csv(tmp / "paths.csv", index=False)
            seal_cache(tmp, meta, {"images.bin": out.record, "offsets.npy": table.record})
        log.info("Built JPEG preprocessing cache %s: %d images at %d px in %.1f s, %.1f KB per image "
                 "(raw: %.1f KB)", final, n, side, seconds, meta["bytes_per_image"] / 1e3,
                 raw_cache_bytes(1, side) / 1e3)
        return cls(final, None, expect)


def decode_batch(blobs: list[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """JPEG bytes (CPU uint8 tensors) -> uint8 (B, 3, side, side) on `device`, in one batched call."""
    images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    return torch.stack(images)


class CachedJpegs(Dataset):
    """A split's rows of a JpegCache, with CachedImages' interface: `__getitems__` returns a whole
    batch {"image": uint8 (B, 3, side, side), "age", "index", "epoch"}.

    With `decode_in_loader = False` (set by the DataModule when the batch step runs on a CUDA
    device) the batch carries "jpeg" instead of "image": a list of the encoded bytes as numpy
    arrays (left on the host by Lightning's transfer), decoded on the device in one call.
    """

    collate_fn = staticmethod(_identity)

    def __init__(self, cache: JpegCache, rows: np.ndarray, ages: np.ndarray) -> None:
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.ages = np.asarray(ages, dtype=np.float32)
        self.decode_in_loader = True

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, keys: list[int]) -> dict[str, Any]:
        pairs = [decode(k, len(self.rows)) for k in keys]
        idx = np.fromiter((i for _, i in pairs), dtype=np.int64, count=len(pairs))
        blobs = self.cache.encoded(self.rows[idx])
        batch: dict[str, Any] = {
            "age": torch.from_numpy(self.ages[idx]),
            "index": torch.from_numpy(idx),
            "epoch": torch.tensor([e for e, _ in pairs], dtype=torch.int64),
        }
        if self.decode_in_loader:
            batch["image"] = decode_batch([torch.from_numpy(b) for b in blobs])
        else:
            batch["jpeg"] = blobs
        return batch

    def __getitem__(self, key: int) -> dict[str, Any]:
        batch = self.__getitems__([key])
        return {k: v[0] for k, v in batch.items()}
