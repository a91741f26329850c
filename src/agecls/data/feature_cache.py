"""Frozen-backbone features computed once, so the head trains on them instead of on images.

With `freeze=true` and augmentation off, the backbone maps each image to the same feature vector
every epoch: running it 50 times is waste. The features of every split are computed once (on the
GPU when there is one), cached under `<cache_dir>/features/<key>/`, and the head trains on them:
an epoch then costs a few matrix products. The key covers the data set's content, the image
preprocessing and the backbone's weights, so any change computes them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from agecls.utils.files import building
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


def build_or_load(key: str, cache_dir: str | Path, loaders: dict[str, DataLoader],
                  extract: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> dict[str, np.ndarray]:
    """Features of each split in `loaders` (evaluation views, in dataset order), cached by `key`."""
    final = Path(cache_dir) / "features" / key
    if (final / "meta.json").exists():
        log.info("Feature cache %s (reused)", final)
        return {name: np.load(final / f"{name}.npy") for name in loaders}
    result = {}
    with building(final) as tmp:  # renamed when complete; removed on any failure
        for name, loader in loaders.items():
            result[name] = compute_features(extract, loader, device, f"Backbone features ({name})")
            np.save(tmp / f"{name}.npy", result[name])
        (tmp / "meta.json").write_text(json.dumps({"key": key, "splits": {k: list(v.shape) for k, v in result.items()}}))
    log.info("Computed backbone features once for %s into %s", ", ".join(f"{k}: {len(v)}" for k, v in result.items()), final)
    return result
