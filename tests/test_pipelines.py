"""Input pipelines behind one interface (agecls.data.pipelines), on real crops: the same images in
the same rows whichever pipeline serves them, reproducible batches, one cache build across
processes, and a new pipeline added by one module and one registry line."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from agecls.data import AgeDataModule, pixel_cache
from agecls.data import pipelines as pipes
from agecls.data.pipelines import PIPELINES, Pipeline, PipelineOptions, RawCachePipeline
from agecls.data.samplers import EpochSampler
from agecls.utils.checks import ConfigValueError, check_data_options
from tests.conftest import utkface_dir

AUGMENT = {"enabled": True, "hflip": 0.5, "color_jitter": [0.1, 0.1, 0.1, 0.1], "rotation": 30,
           "resized_crop_scale": [0.8, 1.0], "resized_crop_ratio": [0.9, 1.1], "affine_translate": [0.05, 0.05],
           "affine_scale": [0.95, 1.05], "affine_shear": 5, "compile": False}


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("utk30")
    for src in sorted(utkface_dir().glob("*.jpg"))[::700][:30]:
        shutil.copy(src, folder / src.name)
    return folder


def _dm(crops: Path, cache_dir: Path, **kw) -> AgeDataModule:
    opts = dict(source="utkface", root=str(crops), image_size=48, batch_size=8, num_workers=0,
                cache_dir=str(cache_dir), split_seed=0, seed=3, splits=[0.6, 0.2, 0.2], augment=AUGMENT)
    opts.update(kw)
    return AgeDataModule(**opts)


def _eval_batch(dm: AgeDataModule, split: str = "val") -> dict[str, torch.Tensor]:
    dm.setup("fit")
    dataset = {"val": dm.data_val, "test": dm.data_test}[split]
    loader = DataLoader(dataset, batch_size=len(dataset), collate_fn=getattr(dataset, "collate_fn", None))
    return dm.pipeline.on_device(next(iter(loader)), training=False)


@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
def test_every_pipeline_serves_the_same_images_in_the_same_rows(crops: Path, tmp_path: Path, fmt: str) -> None:
    per_sample = _eval_batch(_dm(crops, tmp_path, cache=False))
    cached = _eval_batch(_dm(crops, tmp_path, cache=True, cache_format=fmt))
    assert per_sample["image"].shape == cached["image"].shape == (len(per_sample["age"]), 3, 48, 48)
    assert torch.equal(per_sample["age"], cached["age"])
    diff = (per_sample["image"].float() - cached["image"].float()).abs()
    # raw: the same Pillow resize and centre crop, so the very pixels; jpeg: within JPEG tolerance
    if fmt == "raw":
        assert diff.max() <= 1
    else:
        assert diff.mean() < 3 and diff.max() < 80
    # and not merely similar images: each row is its own image
    other = torch.roll(cached["image"], 1, dims=0).float()
    assert (per_sample["image"].float() - other).abs().mean() > 5 * diff.mean() + 5


@pytest.mark.parametrize("fmt", ["per_sample", "raw", "jpeg"])
def test_the_same_seed_gives_the_same_training_batches(crops: Path, tmp_path: Path, fmt: str) -> None:
    def first_batches(seed: int) -> list[torch.Tensor]:
        kw = {"cache": False} if fmt == "per_sample" else {"cache": True, "cache_format": fmt}
        dm = _dm(crops, tmp_path, seed=seed, **kw)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, EpochSampler)
        return [dm.pipeline.on_device(b, training=True)["image"] for b, _ in zip(loader, range(2), strict=False)]

    a, b, c = first_batches(3), first_batches(3), first_batches(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])  # another seed: another order and augmentation


def test_the_datamodule_serves_what_its_pipeline_makes(crops: Path, tmp_path: Path) -> None:
    dm = _dm(crops, tmp_path, cache=True, cache_format="raw", cache_num_workers=0, num_workers=1)
    dm.setup("fit")
    assert isinstance(dm.pipeline, RawCachePipeline) and dm.pixel_cache is dm.pipeline.cache
    assert dm.train_dataloader().num_workers == 0  # the raw cache only gathers rows: cache_num_workers
    jpeg = _dm(crops, tmp_path, cache=True, cache_format="jpeg", num_workers=1)
    jpeg.setup("fit")
    assert jpeg.pipeline.name == "jpeg" and jpeg.train_dataloader().num_workers == 1  # decoding needs workers


class _Inverted(Pipeline):
    """A fifth pipeline for the test: the per-sample one, with every pixel inverted on the device."""

    name = "inverted"

    def datasets(self, records, parts):
        return pipes.PerSamplePipeline(self.options).datasets(records, parts)

    def on_device(self, batch, training):
        batch["image"] = 255 - batch["image"]
        return batch


def test_a_new_pipeline_is_one_class_and_one_registry_line(crops: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigValueError, match="cache_format"):
        check_data_options(image_size=48, batch_size=8, splits=[0.6, 0.2, 0.2], cache_format="inverted")
    monkeypatch.setitem(PIPELINES, "inverted", _Inverted)
    dm = _dm(crops, tmp_path, cache=True, cache_format="inverted")
    plain = _eval_batch(_dm(crops, tmp_path, cache=False))
    assert torch.equal(_eval_batch(dm)["image"], 255 - plain["image"])


def _build_in_child(args: tuple) -> str:
    records_csv, cache_dir, side, log_file, barrier = args
    records = pd.read_csv(records_csv)
    real = pixel_cache.building

    def counting(final, *a, **kw):  # each real build appends a line, and takes a second longer
        with open(log_file, "a") as f:
            f.write(f"build {final}\n")
        time.sleep(1.0)
        return real(final, *a, **kw)

    pixel_cache.building = counting
    options = PipelineOptions(image_size=side, crop_pct=0.875, augment=None, seed=0, cache_dir=cache_dir)
    pipeline = RawCachePipeline(options)
    barrier.wait()  # both processes ask for the cache at the same moment
    pipeline.build(records)
    return str(pipeline.cache.directory)


def test_two_processes_build_one_cache(crops: Path, tmp_path: Path) -> None:
    """What DDP ranks on several machines sharing the cache folder do: both build, one builds."""
    records = pd.DataFrame({"path": [str(p) for p in sorted(crops.iterdir())]})
    records["age"] = 30.0
    records.to_csv(tmp_path / "records.csv", index=False)
    log_file = tmp_path / "builds.txt"
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        args = (str(tmp_path / "records.csv"), str(tmp_path / "cache"), 64, str(log_file), manager.Barrier(2))
        dirs = pool.map(_build_in_child, [args, args], chunksize=1)
    assert dirs[0] == dirs[1]
    assert len(log_file.read_text().splitlines()) == 1, log_file.read_text()
    assert [p.name for p in (tmp_path / "cache" / "pixels").iterdir() if not p.name.startswith(".")] == [Path(dirs[0]).name]
    images = np.load(Path(dirs[0]) / "images.npy", mmap_mode="r")
    assert images.shape[0] == len(records) and images[-1].any()


def test_feature_cache_key_follows_the_split(crops: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The feature cache holds one array per split: another split of the same images must not reuse it."""
    from agecls.data import feature_cache
    from agecls.data.pipelines import FeaturePipeline, PerSamplePipeline

    keys = []

    def fake_build(key, cache_dir, loaders, extract, device):
        keys.append(key)
        return {s: np.zeros((len(ld.dataset), 4), dtype=np.float32) for s, ld in loaders.items()}

    monkeypatch.setattr(feature_cache, "build_or_load", fake_build)
    options = PipelineOptions(image_size=48, crop_pct=0.875, augment=None, seed=0, cache_dir=str(tmp_path))
    pipeline = FeaturePipeline(PerSamplePipeline(options), lambda x: x, torch.device("cpu"), "w", batch_size=8)
    records = pd.DataFrame({"path": [str(p) for p in sorted(crops.iterdir())], "age": 30.0})

    def parts(cut: int) -> dict[str, pd.DataFrame]:
        return {"train": records.iloc[:cut], "val": records.iloc[cut:25], "test": records.iloc[25:]}

    pipeline.datasets(records, parts(20))
    pipeline.datasets(records, parts(20))
    pipeline.datasets(records, parts(15))
    assert keys[0] == keys[1] and keys[2] != keys[0]
