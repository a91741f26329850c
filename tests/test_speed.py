"""The fast path: preprocessing cache, per-sample batch augmentation, frozen backbones, the bench."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from agecls.data import pixel_cache
from agecls.data.batch_augment import BatchAugment, center_crop, hue_shift
from agecls.data.images import load_rgb
from agecls.data.pixel_cache import PixelCache
from agecls.data.transforms import eval_transform
from agecls.train import train
from tests.conftest import compose_cfg, utkface_dir

UTK = sorted(utkface_dir().glob("*.jpg"))
STUDY = dict(hflip=0.5, color_jitter=[0.1, 0.1, 0.1, 0.1], rotation=30, resized_crop_scale=[0.8, 1.0],
             resized_crop_ratio=[0.9, 1.1], affine_translate=[0.05, 0.05], affine_scale=[0.95, 1.05], affine_shear=5)


def _records(folder: Path) -> pd.DataFrame:
    from agecls.data.index import build_index

    paths = sorted(str(p) for p in folder.iterdir())
    index = build_index(paths, None)
    return pd.DataFrame({"path": paths, "age": 30.0, "sha1": index["sha1"]})


def _folder(tmp_path: Path, n: int = 12) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in UTK[:: len(UTK) // n][:n]:
        shutil.copy(f, folder / f.name)
    return folder


# ----------------------------------------------------------------------------- the pixel cache
def test_cache_rebuilds_when_a_parameter_or_an_image_changes(tmp_path, monkeypatch) -> None:
    folder = _folder(tmp_path)
    calls = []
    real = pixel_cache._fill
    monkeypatch.setattr(pixel_cache, "_fill", lambda job: calls.append(len(job[3])) or real(job))
    first = PixelCache.build_or_load(_records(folder), tmp_path / "c", side=36)
    assert sum(calls) == 12 and first.images.shape == (12, 3, 36, 36)
    calls.clear()
    again = PixelCache.build_or_load(_records(folder), tmp_path / "c", side=36)
    assert calls == [] and again.directory == first.directory, "unchanged data and parameters: reused"
    other_size = PixelCache.build_or_load(_records(folder), tmp_path / "c", side=40)
    assert other_size.directory != first.directory and sum(calls) == 12
    calls.clear()
    victim = sorted(folder.iterdir())[3]
    Image.open(UTK[7]).save(victim, format="JPEG")  # same name, new content
    changed = PixelCache.build_or_load(_records(folder), tmp_path / "c", side=36)
    assert changed.directory != first.directory and sum(calls) == 12
    assert np.array_equal(changed.images[3], pixel_cache.preprocess(str(victim), None, 0.0, 36))


def test_an_interrupted_build_is_never_reused(tmp_path, monkeypatch) -> None:
    folder = _folder(tmp_path)
    monkeypatch.setattr(pixel_cache, "_fill", lambda job: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        PixelCache.build_or_load(_records(folder), tmp_path / "c", side=36)
    pixels = tmp_path / "c" / "pixels"
    assert not [p for p in pixels.iterdir() if (p / "meta.json").exists()], "no complete-looking cache"
    monkeypatch.undo()
    cache = PixelCache.build_or_load(_records(folder), tmp_path / "c", side=36)
    assert cache.images[:].any(axis=(1, 2, 3)).all(), "every row was written by the fresh build"


def test_cached_pixels_give_exactly_the_evaluation_view(tmp_path) -> None:
    folder = _folder(tmp_path, 4)
    cache = PixelCache.build_or_load(_records(folder), tmp_path / "c", side=146)  # 128 / 0.875
    ev = eval_transform(128, 0.875)
    for i, path in enumerate(sorted(folder.iterdir())):
        naive = ev(load_rgb(path))
        fast = center_crop(torch.from_numpy(np.array(cache.images[i])), 128)
        assert torch.equal(naive, fast)


# ---------------------------------------------------------------------- per-sample augmentation
def _torchvision_draws(n: int, size: int, out: int) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    cj = v2.ColorJitter(0.1, 0.1, 0.1, 0.1)
    img = torch.zeros(3, size, size)
    rrc = v2.RandomResizedCrop(out, scale=(0.8, 1.0), ratio=(0.9, 1.1))
    draws: dict[str, list] = {k: [] for k in ("flip", "b", "c", "s", "h", "order", "angle", "top", "left", "ch", "cw",
                                               "tx", "ty", "scale", "shear")}
    for _ in range(n):
        draws["flip"].append(float(torch.rand(1) < 0.5))  # RandomHorizontalFlip: torch.rand(1) < p
        # ColorJitter: a random order of the four adjustments, then each factor
        fn_idx = torch.randperm(4)
        draws["order"].append(tuple(fn_idx.tolist()))
        draws["b"].append(float(torch.empty(1).uniform_(*cj.brightness)))
        draws["c"].append(float(torch.empty(1).uniform_(*cj.contrast)))
        draws["s"].append(float(torch.empty(1).uniform_(*cj.saturation)))
        draws["h"].append(float(torch.empty(1).uniform_(*cj.hue)))
        draws["angle"].append(float(torch.empty(1).uniform_(-30.0, 30.0)))  # RandomRotation
        p = rrc.make_params([img])
        draws["top"].append(p["top"])
        draws["left"].append(p["left"])
        draws["ch"].append(p["height"])
        draws["cw"].append(p["width"])
        aff = v2.RandomAffine(degrees=0, translate=(0.05, 0.05), scale=(0.95, 1.05), shear=5)
        q = aff.make_params([torch.zeros(3, out, out)])
        draws["tx"].append(q["translate"][0])
        draws["ty"].append(q["translate"][1])
        draws["scale"].append(q["scale"])
        draws["shear"].append(q["shear"][0])
    return {k: np.asarray(v, dtype=object if k == "order" else float) for k, v in draws.items()}


def test_per_sample_parameters_are_distributed_as_torchvision_draws_them() -> None:
    n, size, out = 3000, 146, 128
    tv = _torchvision_draws(n, size, out)
    p = BatchAugment(out, STUDY).sample(n, size, size, torch.Generator().manual_seed(1))
    ours = {
        "flip": p.flip.double().numpy(), "b": p.jitter[:, 0].numpy(), "c": p.jitter[:, 1].numpy(),
        "s": p.jitter[:, 2].numpy(), "h": p.jitter[:, 3].numpy(), "angle": p.angle.numpy(),
        "top": p.crop[:, 0].numpy(), "left": p.crop[:, 1].numpy(), "ch": p.crop[:, 2].numpy(), "cw": p.crop[:, 3].numpy(),
        "tx": p.translate[:, 0].numpy(), "ty": p.translate[:, 1].numpy(), "scale": p.scale.numpy(), "shear": p.shear[:, 0].numpy(),
    }
    for key, values in ours.items():
        result = stats.ks_2samp(values, tv[key])
        assert result.pvalue > 1e-3, (key, result)
    assert (p.shear[:, 1] == 0).all(), "a single shear number shears along x only"
    assert set(np.unique(p.translate.numpy())) <= set(range(-7, 8)), "translations are whole pixels"
    # colour order: a uniform random permutation per sample, as ColorJitter draws it per image
    orders = pd.Series([tuple(o) for o in p.order.tolist()]).value_counts()
    assert len(orders) == 24
    assert stats.chisquare(orders.to_numpy()).pvalue > 1e-3
    batch = BatchAugment(out, STUDY).sample(64, size, size, torch.Generator().manual_seed(2))
    assert len({tuple(o) for o in batch.order.tolist()}) > 10, "each sample gets its own order, not one per batch"
    assert batch.angle.std() > 5, "each sample gets its own rotation"


def _smooth_image(size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([torch.sin(3 * xx + 1) * 0.5 + 0.5, torch.cos(2 * yy) * 0.5 + 0.5, xx * yy]).unsqueeze(0)


def test_fused_geometry_equals_torchvision_sequential_transforms() -> None:
    size, out = 146, 128
    img = _smooth_image(size)
    aug = BatchAugment(out, STUDY)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        p = aug.sample(1, size, size, g)
        x = TF.horizontal_flip(img) if p.flip[0] else img
        x = TF.rotate(x, float(p.angle[0]), interpolation=InterpolationMode.BILINEAR)
        top, left, ch, cw = (int(v) for v in p.crop[0])
        x = TF.resized_crop(x, top, left, ch, cw, [out, out], interpolation=InterpolationMode.BILINEAR, antialias=False)
        x = TF.affine(x, angle=0.0, translate=[int(v) for v in p.translate[0]], scale=float(p.scale[0]),
                      shear=[float(v) for v in p.shear[0]], interpolation=InterpolationMode.BILINEAR)
        y = aug.warp(img, aug.source_matrix(p, size, size))
        inner = (..., slice(32, 96), slice(32, 96))  # away from the corners rotation blanks
        assert (x[inner] - y[inner]).abs().max() < 2e-3


@pytest.mark.parametrize("compiled", [True, False], ids=["fused-compiled", "masked-eager"])
def test_colour_jitter_equals_torchvision_per_sample_in_each_samples_order(compiled) -> None:
    aug = BatchAugment(32, {"color_jitter": [0.1, 0.1, 0.1, 0.1], "compile": compiled})
    x = torch.rand(24, 3, 20, 20)
    p = aug.sample(24, 20, 20, torch.Generator().manual_seed(3))
    y = aug.color(x.clone(), p)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in range(24):
        z = x[k]
        for op in p.order[k].tolist():
            z = fns[op](z, float(p.jitter[k, op]))
        assert torch.allclose(z, y[k], atol=1e-4)
    assert aug.compile == compiled  # the compiled path ran (a failed compile falls back to eager)


def test_hue_shift_equals_torchvision() -> None:
    x = torch.rand(8, 3, 16, 16)
    x[:, :, :2] = 0.4  # grey pixels: no hue
    delta = torch.linspace(-0.5, 0.5, 8)
    ref = torch.stack([TF.adjust_hue(x[i], float(delta[i])) for i in range(8)])
    assert torch.allclose(hue_shift(x, delta), ref, atol=1e-5)


def test_batch_augment_is_reproducible_and_per_sample() -> None:
    aug = BatchAugment(32, STUDY)
    x = torch.randint(0, 256, (6, 3, 37, 37), dtype=torch.uint8)
    x[:] = x[0]  # six copies of one image
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert (a[0] - a[1]).abs().mean() > 0.01, "two copies of an image get different augmentations"


# ---------------------------------------------------------------------------- training on it
def _tiny(cache_dir: Path, out: Path, *extra: str):
    from tests.conftest import SYNTHETIC, TINY

    return compose_cfg([*TINY, *SYNTHETIC, f"paths.cache_dir={cache_dir}", *extra], out)


def test_training_on_the_fast_path_is_repeatable(tmp_path, cache_dir) -> None:
    runs = [train(_tiny(cache_dir, tmp_path / name, "data.cache=true", "trainer.max_epochs=2")) for name in "ab"]
    for key in ("test/mae", "test/pearson", "val/mae_best"):
        assert runs[0][key] == runs[1][key] and math.isfinite(runs[0][key])
    naive = train(_tiny(cache_dir, tmp_path / "naive", "trainer.max_epochs=2", "data.augment.enabled=false"))
    fast = train(_tiny(cache_dir, tmp_path / "fast", "trainer.max_epochs=2", "data.augment.enabled=false",
                       "data.cache=true"))
    # without augmentation both paths feed identical pixels: identical training
    assert fast["test/mae"] == pytest.approx(naive["test/mae"], abs=1e-4)


def test_frozen_backbone_runs_without_autograd() -> None:
    from agecls.models.module import AgeRegressor

    model = AgeRegressor(backbone={"name": "resnet18", "source": "torchvision"}, head={"hidden": [512, 256, 32]},
                         freeze=True, pretrained=False)
    model.train()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    feats = model.net.features(x)
    assert feats.grad_fn is None and not feats.requires_grad, "no graph, no activations kept"
    assert model(x).requires_grad, "the head still trains"


def test_feature_cache_trains_the_head_on_features_computed_once(tmp_path, cache_dir) -> None:
    cfg = _tiny(cache_dir, tmp_path / "run", "backbone=efficientnet_lite0", "pretrained=true", "freeze=true",
                "data.augment.enabled=false", "data.feature_cache=true", "trainer.max_epochs=2")
    metrics = train(cfg)
    assert math.isfinite(metrics["test/mae"])
    saved = sorted((cache_dir / "features").glob("*/meta.json"))
    assert saved
    # the cache folder is shared with other tests' feature caches: this run's is the newest
    feats = np.load(max(saved, key=lambda m: m.stat().st_mtime_ns).parent / "test.npy")
    # the cached features are the frozen backbone's features of the evaluation view
    from agecls.eval import load_checkpoint

    model, _ = load_checkpoint(metrics["best_checkpoint"])
    preds = pd.read_csv(Path(cfg.paths.output_dir) / "predictions.csv")
    ev = eval_transform(32, 0.875)
    images = torch.stack([ev(load_rgb(p)) for p in preds["path"][:4]])
    with torch.no_grad():
        direct = model.eval().net.features(images).numpy()
    split = pd.read_csv(Path(cfg.paths.output_dir) / "split.csv")
    assert feats.shape == (int((split["split"] == "test").sum()), 1280)
    assert np.isclose(direct[:, None, :], feats[None], atol=1e-4).all(-1).any(-1).all()


def test_feature_cache_refuses_a_training_backbone(tmp_path, cache_dir) -> None:
    with pytest.raises(ValueError, match=r"feature_cache=true needs a fully frozen backbone.*freeze=true"):
        train(_tiny(cache_dir, tmp_path / "run", "data.feature_cache=true"))


# --------------------------------------------------------------------------------- the bench
def test_bench_measures_every_mode_and_writes_the_csv(tmp_path, cache_dir) -> None:
    from agecls.bench import Bench, summarize

    cfg = compose_cfg(["data.image_size=32", "data.batch_size=8", "batches=2", "warmup=1", "max_images=64", "rounds=2",
                       f"paths.cache_dir={cache_dir}", f"data.root={utkface_dir()}", f"output={tmp_path / 'b.csv'}"],
                      tmp_path / "bench", config_name="bench")
    table = Bench(cfg).run()
    assert list(table["mode"]) == ["model_only", "load_naive", "load_fast", "train_naive", "train_fast"]
    for col in ("mode", "backbone", "image_size", "batch_size", "images_per_s", "cpu_ms_per_image", "cache_s_per_1000"):
        assert col in table.columns
    assert (table["images_per_s"] > 0).all()
    paired = table.set_index("mode")["vs_model_only"]  # per-round ratios against the limit
    assert paired["model_only"] == 1.0 and paired[["train_naive", "train_fast"]].gt(0).all()
    loads = table.set_index("mode").loc[["load_naive", "load_fast"], "cpu_ms_per_image"]
    assert loads.notna().all() and loads["load_fast"] < loads["load_naive"]
    text = summarize(table)
    assert "train_fast / model_only" in text and "cpu ms/image naive / fast" in text
