"""The per-sample pipeline (data.cache=false): every epoch, each image is decoded, face-cropped,
augmented and resized by PIL + torchvision in the DataLoader workers (data.num_workers)."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
from torch.utils.data import Dataset

from agecls.data.dataset import FaceAgeDataset
from agecls.data.pipelines.base import Pipeline
from agecls.data.transforms import eval_transform, train_transform


class PerSamplePipeline(Pipeline):
    name = "per_sample"

    def datasets(self, records: pd.DataFrame, parts: Mapping[str, pd.DataFrame]) -> dict[str, Dataset]:
        o = self.options
        out: dict[str, Dataset] = {}
        for split, part in parts.items():
            if split == "train":
                out[split] = FaceAgeDataset(part, train_transform(o.image_size, o.augment, o.crop_pct),
                                            o.face_margin, seed=int(o.seed), checked=o.check_images)
            else:
                out[split] = self._eval(part)
        return out

    def _eval(self, part: pd.DataFrame) -> FaceAgeDataset:
        o = self.options
        return FaceAgeDataset(part, eval_transform(o.image_size, o.crop_pct), o.face_margin, checked=o.check_images)

    def eval_view(self, records: pd.DataFrame, part: pd.DataFrame, dataset: Dataset) -> Dataset:
        return self._eval(part)
