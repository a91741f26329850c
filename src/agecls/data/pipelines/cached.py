"""The cached pipelines (data.cache=true): each image decoded, face-cropped and resized once into a
preprocessing cache; the study's augmentation then runs per sample on the device that holds the
batch (agecls.data.batch_augment), seeded by (seed, epoch, first sample).

- `raw` (data.cache_format=raw): uint8 pixels in one memory map (agecls.data.pixel_cache); the
  loader only gathers rows (data.cache_num_workers workers).
- `jpeg` (data.cache_format=jpeg): the same crops stored as JPEGs in one file with an offset table
  (agecls.data.jpeg_cache), 5-10x smaller; decoded per batch in the data.num_workers DataLoader
  workers on a CPU, or on the GPU in one batched call when training on CUDA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from agecls.data.batch_augment import BatchAugment, center_crop
from agecls.data.jpeg_cache import CachedJpegs, JpegCache, decode_batch
from agecls.data.pipelines.base import Pipeline, PipelineOptions, build_lock
from agecls.data.pixel_cache import CachedImages, PixelCache
from agecls.data.samplers import sample_seed


class CachedPipeline(Pipeline):
    """Shared by the cache formats: build once, rows by record, augmentation on the device."""

    cache_class: type[PixelCache] | type[JpegCache]
    dataset_class: type[CachedImages] | type[CachedJpegs]
    folder: str  # under data.cache_dir

    def __init__(self, options: PipelineOptions) -> None:
        super().__init__(options)
        self.cache: PixelCache | JpegCache | None = None
        self.augment = BatchAugment(options.image_size, options.augment) if options.augment_enabled else None

    def build(self, records: pd.DataFrame) -> None:
        if self.cache is not None:
            return
        o = self.options
        if not o.cache_dir:
            raise ValueError("data.cache=true needs data.cache_dir (paths.cache_dir) to store the pixels in")
        folder = f"{o.cache_dir}/{self.folder}"
        with build_lock(folder, f"{self.name} preprocessing cache"):
            self.cache = self.cache_class.build_or_load(records, o.cache_dir, o.cache_side, o.face_margin,
                                                        workers=max(1, int(o.num_workers)),
                                                        verify=o.extra.get("verify", "stat"))

    def datasets(self, records: pd.DataFrame, parts: Mapping[str, pd.DataFrame]) -> dict[str, Dataset]:
        self.build(records)
        row = {p: i for i, p in enumerate(records["path"])}  # cache row i is records row i
        return {split: self.dataset_class(self.cache, np.array([row[p] for p in part["path"]], dtype=np.int64),
                                          part["age"].to_numpy())
                for split, part in parts.items()}

    def on_device(self, batch: Any, training: bool) -> Any:
        if not isinstance(batch, dict) or "image" not in batch:
            return batch
        if self.augment is not None and training:
            epoch = int(batch["epoch"][0]) if "epoch" in batch else 0
            g = torch.Generator().manual_seed(sample_seed(int(self.options.seed), epoch, int(batch["index"][0])))
            batch["image"] = self.augment(batch["image"], g)
        else:
            batch["image"] = center_crop(batch["image"], int(self.options.image_size))
        return batch

    def describe(self) -> str:
        return f"{self.name} cache" + (f" {self.cache.directory}" if self.cache is not None else "")


class RawCachePipeline(CachedPipeline):
    name = "raw"
    cache_class = PixelCache
    dataset_class = CachedImages
    folder = "pixels"

    @property
    def workers(self) -> int:
        return int(self.options.cache_num_workers)  # gathering rows needs no decoding workers


class JpegCachePipeline(CachedPipeline):
    name = "jpeg"
    cache_class = JpegCache
    dataset_class = CachedJpegs
    folder = "jpegs"

    def loader_ready(self, dataset: Dataset, device: torch.device | None) -> None:
        # on a CUDA device the workers only slice bytes and the GPU decodes the batch
        dataset.decode_in_loader = device is None or device.type != "cuda"

    def before_transfer(self, batch: Any, device: torch.device) -> Any:
        if isinstance(batch, dict) and "jpeg" in batch:
            blobs = [torch.from_numpy(b) for b in batch.pop("jpeg")]
            batch["image"] = decode_batch(blobs, device)
        return batch
