"""data.cache_format=jpeg: the compressed preprocessing cache against the raw one, on real crops."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from agecls.data.jpeg_cache import (
    CachedJpegs,
    JpegCache,
    choose_format,
    decode_batch,
    raw_cache_bytes,
)
from agecls.data.pixel_cache import CachedImages, PixelCache
from agecls.train import train
from agecls.utils.checks import ConfigValueError, check_data_options
from tests.conftest import utkface_dir

SIDE = 73  # 64 px at crop_pct 0.875


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 real UTKFace crops, copied (a folder of their own: data.root for the training run)."""
    folder = tmp_path_factory.mktemp("utk40")
    for src in sorted(utkface_dir().glob("*.jpg"))[::500][:40]:
        shutil.copy(src, folder / src.name)
    assert len(list(folder.iterdir())) == 40
    return folder


@pytest.fixture(scope="module")
def caches(crops: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[PixelCache, JpegCache, pd.DataFrame]:
    records = pd.DataFrame({"path": [str(p) for p in sorted(crops.iterdir())]})
    records["age"] = [float(Path(p).name.split("_")[0]) for p in records["path"]]
    cache_dir = tmp_path_factory.mktemp("caches")
    raw = PixelCache.build_or_load(records, cache_dir, SIDE)
    jpeg = JpegCache.build_or_load(records, cache_dir, SIDE, workers=2)
    return raw, jpeg, records


def test_jpeg_cache_round_trip_matches_raw_rows(caches) -> None:
    raw, jpeg, records = caches
    assert len(jpeg) == len(records) == raw.images.shape[0]
    rows = np.arange(len(records))[::-1].copy()  # a permutation: rows are mapped, not positions
    ages = records["age"].to_numpy()[rows]
    keys = [5, 0, 39, 17, 2]
    a = CachedImages(raw, rows, ages).__getitems__(keys)
    b = CachedJpegs(jpeg, rows, ages).__getitems__(keys)
    assert b["image"].dtype == torch.uint8 and b["image"].shape == a["image"].shape == (5, 3, SIDE, SIDE)
    for k in ("age", "index", "epoch"):
        assert torch.equal(a[k], b[k])
    diff = (a["image"].int() - b["image"].int()).abs()
    assert diff.float().mean() < 3 and diff.max() < 40
    # every row against its own raw row, and never closer to another image's
    all_raw = torch.from_numpy(np.array(raw.images)).float()
    decoded = CachedJpegs(jpeg, np.arange(40), records["age"].to_numpy()).__getitems__(list(range(40)))["image"].float()
    dist = (decoded[:, None] - all_raw[None]).abs().mean(dim=(2, 3, 4))
    assert torch.equal(dist.argmin(dim=1), torch.arange(40))
    # much smaller on disk than the raw pixels
    assert (jpeg.directory / "images.bin").stat().st_size == jpeg.nbytes
    assert jpeg.nbytes < raw_cache_bytes(40, SIDE) / 3
    # reused, not rebuilt
    assert JpegCache.build_or_load(records, jpeg.directory.parents[1], SIDE).directory == jpeg.directory


def test_encoded_batches_decode_to_the_same_images_on_the_batch_device(caches) -> None:
    # the CUDA path (workers return bytes, the batch step decodes them at once), run on the CPU
    _, jpeg, records = caches
    ds = CachedJpegs(jpeg, np.arange(40), records["age"].to_numpy())
    decoded = ds.__getitems__([3, 9, 1])
    ds.decode_in_loader = False
    encoded = ds.__getitems__([3, 9, 1])
    assert "image" not in encoded and len(encoded["jpeg"]) == 3
    images = decode_batch([torch.from_numpy(b) for b in encoded["jpeg"]], "cpu")
    assert torch.equal(images, decoded["image"])


def test_workers_decode_and_the_memory_map_is_not_pickled(caches) -> None:
    _, jpeg, records = caches
    ds = CachedJpegs(jpeg, np.arange(40), records["age"].to_numpy())
    _ = jpeg.data  # opened in this process
    assert pickle.loads(pickle.dumps(jpeg))._data is None
    loader = DataLoader(ds, batch_size=16, num_workers=1, collate_fn=ds.collate_fn)
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [16, 16, 8]
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(40))


def test_auto_picks_raw_within_the_budget_and_jpeg_over_it() -> None:
    need = raw_cache_bytes(20_000, 146) / 1e9  # 1.28 GB
    assert choose_format("auto", 20_000, 146, budget_gb=need * 2) == "raw"
    assert choose_format("auto", 20_000, 146, budget_gb=need / 2) == "jpeg"
    assert choose_format("raw", 20_000, 146, budget_gb=1e-9) == "raw"
    assert choose_format("jpeg", 20_000, 146, budget_gb=1e9) == "jpeg"


def test_a_bad_cache_format_fails_naming_key_value_and_choices() -> None:
    with pytest.raises(ConfigValueError, match=r"data\.cache_format='png'.*raw, jpeg, auto"):
        check_data_options(image_size=32, batch_size=8, splits=[0.8, 0.1, 0.1], cache_format="png")
    with pytest.raises(ConfigValueError, match=r"data\.cache_memory_budget_gb"):
        check_data_options(image_size=32, batch_size=8, splits=[0.8, 0.1, 0.1], cache_memory_budget_gb=0)


@pytest.mark.parametrize("fmt, budget, built", [("jpeg", 8, "jpegs"), ("auto", 1e-6, "jpegs"), ("auto", 8, "pixels")])
def test_training_with_the_cache_format(make_cfg, crops: Path, tmp_path: Path, fmt: str, budget: float,
                                        built: str) -> None:
    cache_dir = tmp_path / "cache"  # its own: which cache was built is what the test reads
    cfg = make_cfg("data=utkface", f"data.root={crops}", "data.cache=true", f"data.cache_format={fmt}",
                   f"data.cache_memory_budget_gb={budget}", f"paths.cache_dir={cache_dir}")
    metrics = train(cfg)
    assert np.isfinite(metrics["test/mae"])
    assert [p.parents[1].name for p in cache_dir.glob("*/*/meta.json") if p.parents[1].name in ("jpegs", "pixels")] == [built]
