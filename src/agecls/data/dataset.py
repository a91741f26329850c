"""A map-style dataset over cleaned records: decode, crop the face box if any, transform."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, get_worker_info

from agecls.data.images import load_rgb
from agecls.data.samplers import decode, sample_seed


class FaceAgeDataset(Dataset):
    """Item i is {"image": uint8 CHW, "age": float32, "index": i} for record i.

    With a `seed`, the random transform of each sample is seeded by (seed, epoch, i), the epoch
    coming from the key an EpochSampler yields: augmentation then repeats exactly, in any worker.
    """

    def __init__(self, records: pd.DataFrame, transform: Callable, face_margin: float = 0.0,
                 seed: int | None = None, checked: bool = True) -> None:
        self.paths = records["path"].astype(str).tolist()
        self.ages = records["age"].to_numpy(dtype=np.float32)
        boxes = records["face_box"].tolist() if "face_box" in records.columns else None
        self.boxes = boxes if boxes is not None and any(b is not None for b in boxes) else None
        aligns = records["face_align"].tolist() if "face_align" in records.columns else None  # data.align
        self.aligns = aligns if aligns is not None and any(a is not None for a in aligns) else None
        self.transform = transform
        self.face_margin = face_margin
        self.seed = seed
        self.checked = checked  # each file was decoded when indexed (data.check_images=true)

    def __len__(self) -> int:
        return len(self.paths)

    def _unreadable_advice(self) -> str:
        if self.checked:
            return ("It passed the check when the data set was indexed at the start of this run, so it changed, "
                    "vanished or became unreadable since; the next run re-indexes it and drops it if unreadable.")
        return ("With data.check_images=false files are not decoded when indexed; set data.check_images=true "
                "to drop unreadable ones before training.")

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        epoch, i = decode(key, len(self.paths))
        path = self.paths[i]
        try:
            img = load_rgb(path, self.boxes[i] if self.boxes is not None else None, self.face_margin,
                           self.aligns[i] if self.aligns is not None else None)
        except Exception as err:  # found after indexing: the file changed, or check_images=false
            raise RuntimeError(f"cannot read image {path}: {type(err).__name__}: {err}. "
                               + self._unreadable_advice()) from err
        if self.seed is None:
            image = self.transform(img)
        elif get_worker_info() is not None:
            # a worker's RNG serves only this: reseed it per sample (a few microseconds)
            torch.manual_seed(sample_seed(self.seed, epoch, i))
            image = self.transform(img)
        else:
            # in the main process, leave the caller's RNG state untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, i))
                image = self.transform(img)
        return {"image": image, "age": torch.tensor(self.ages[i]), "index": torch.tensor(i)}
