"""The feature pipeline (data.feature_cache=true, with a fully frozen backbone and no augmentation):
the backbone maps each image to the same vector every epoch, so the features of every split are
computed once through another pipeline's evaluation views (on the GPU when there is one), cached
(agecls.data.feature_cache) and the head trains on them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from agecls.data import feature_cache
from agecls.data.batch_augment import center_crop
from agecls.data.feature_cache import FeatureDataset
from agecls.data.pipelines.base import Pipeline, build_lock
from agecls.data.pixel_cache import cache_key


class FeaturePipeline(Pipeline):
    """Wraps the pipeline that serves the images (`images`); `extract` maps a uint8 image batch on
    `device` to backbone features; `weights_key` names the backbone's weights in the cache key."""

    name = "features"

    def __init__(self, images: Pipeline, extract: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 weights_key: str, batch_size: int, test_on: str = "test") -> None:
        super().__init__(images.options)
        self.images = images
        self.extract = extract
        self.device = device
        self.weights_key = weights_key
        self.batch_size = int(batch_size)
        self.test_on = test_on

    def build(self, records: pd.DataFrame) -> None:
        self.images.build(records)

    def datasets(self, records: pd.DataFrame, parts: Mapping[str, pd.DataFrame]) -> dict[str, Dataset]:
        o = self.options
        if not o.cache_dir:
            raise ValueError("data.feature_cache=true needs data.cache_dir (paths.cache_dir) to store the features in")
        data_key = cache_key(records, o.cache_side, o.face_margin)
        # which images are in which split (and in which order): the cache holds one array per split,
        # so another split of the same images (data.split_seed, data.splits, a split file) is another key
        members = hashlib.sha1()
        for s in sorted(parts):
            members.update(f"{s}\n".encode())
            members.update("".join(f"{path}\n" for path in parts[s]["path"]).encode())
        key = hashlib.sha1(f"{data_key}|{members.hexdigest()}|{o.image_size}|{o.crop_pct}|{self.test_on}|"
                           f"{self.weights_key}".encode()).hexdigest()[:20]
        image_sets = self.images.datasets(records, parts)
        views = {s: self.images.eval_view(records, parts[s], ds) for s, ds in image_sets.items()}
        loaders = {s: DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.images.workers,
                                 collate_fn=getattr(ds, "collate_fn", None))
                   for s, ds in views.items()}
        size = int(o.image_size)

        def extract(batch_images: torch.Tensor) -> torch.Tensor:
            if batch_images.shape[-1] != size:  # cached rows: the evaluation centre crop
                batch_images = center_crop(batch_images, size)
            return self.extract(batch_images)

        with build_lock(f"{o.cache_dir}/features", "feature cache"):
            feats = feature_cache.build_or_load(key, o.cache_dir, loaders, extract, self.device)
        return {s: FeatureDataset(feats[s], parts[s]["age"].to_numpy()) for s in parts}

    @property
    def workers(self) -> int:
        return 0  # features are in memory: a batch is an index

