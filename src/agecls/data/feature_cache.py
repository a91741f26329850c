"""Frozen-backbone features computed once, so the head trains on them instead of on images.

With `freeze=true` and augmentation off, the backbone maps each image to the same feature vector
every epoch: running it 50 times is waste. The features of every split are computed once (on the
GPU when there is one), cached under `<cache_dir>/features/<key>/`, and the head trains on them:
an epoch then costs a few matrix products. The key covers the data set's content, the image
preprocessing and the backbone's weights, so any change computes them again.

Like the preprocessing caches (issue 18), each split's array is written front to back with its
size and per-block crc32 sealed into meta.json, after checking the free space; every reuse checks
them (data.verify=stat|full, agecls.utils.files.open_cache) and computes the features again,
with a warning naming the file, when they fail.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from agecls.data.index import check_verify
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


def weights_digest(module: torch.nn.Module) -> str:
    """A content hash of a module's parameters and buffers."""
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureDataset(Dataset):
    """Item i: {"features": float (F,), "age": float32, "index": i}."""

    def __init__(self, features: np.ndarray, ages: np.ndarray) -> None:
        self.features = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        self.ages = torch.from_numpy(np.asarray(ages, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.ages)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        i = int(key) % len(self.ages)  # keys from an EpochSampler carry the epoch
        return {"features": self.features[i], "age": self.ages[i], "index": torch.tensor(i)}


def compute_features(extract: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader,
                     device: torch.device, desc: str) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for batch in progress(loader, desc=desc, unit="batch", mininterval=2):
            out.append(extract(batch["image"].to(device, non_blocking=True)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


FEATURE_VERSION = 2  # 2: files checksummed in meta.json


def load_checked(folder: Path, names: list[str], verify: str | None, key: str) -> dict[str, np.ndarray]:
    """The arrays `names` of the feature cache in `folder`, after open_cache's checks; CacheDamaged."""
    meta = open_cache(folder, [f"{name}.npy" for name in names], {"version": FEATURE_VERSION, "key": key}, verify)
    return {name: load_npy(folder / f"{name}.npy", tuple(meta["splits"][name]), np.float32) for name in names}


def build_or_load(key: str, cache_dir: str | Path, loaders: dict[str, DataLoader],
                  extract: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                  verify: str = "stat") -> dict[str, np.ndarray]:
    """Features of each split in `loaders` (evaluation views, in dataset order), cached by `key`."""
    check_verify(verify)
    final = Path(cache_dir) / "features" / key
    names = list(loaders)
    cached = reuse_checked(final, "feature cache", lambda d: load_checked(d, names, verify, key))
    if cached is not None:
        log.info("Feature cache %s (reused, verify=%s)", final, verify)
        return cached
    result = {}
    with building(final) as tmp:  # renamed when complete; removed on any failure
        files = {}
        for name, loader in loaders.items():
            result[name] = compute_features(extract, loader, device, f"Backbone features ({name})")
            check_free_space(tmp, result[name].nbytes + 4096, f"backbone features of the {name} split")
            with BlockWriter(tmp / f"{name}.npy") as out:
                np.lib.format.write_array(out, np.ascontiguousarray(result[name]), allow_pickle=False)
            files[f"{name}.npy"] = out.record
        seal_cache(tmp, {"version": FEATURE_VERSION, "key": key,
                         "splits": {k: list(v.shape) for k, v in result.items()}}, files)
    log.info("Computed backbone features once for %s into %s", ", ".join(f"{k}: {len(v)}" for k, v in result.items()), final)
    return result
