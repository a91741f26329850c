"""scripts/gpu_check.sh in its CPU fallback (every stage, tiny settings) and scripts/pack_gpu_payload.sh.

The GPU run itself needs a GPU machine (benchmarks/README.md, "GPU check"); here the script runs
end to end on 40 UTKFace crops (synthesized in UTKFace's naming where the real folder is missing)
and must leave in OUT each stage's file with its header, and at most 8 files in all.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, UTKFACE_DIR


def _crops(folder: Path, n: int) -> Path:
    """n UTKFace crops spread over the ages (real ones where present, else synthesized)."""
    folder.mkdir(parents=True, exist_ok=True)
    real = sorted(UTKFACE_DIR.glob("*.jpg"), key=lambda p: (int(p.name.split("_")[0]), p.name)) if UTKFACE_DIR.is_dir() else []
    if real:
        for i in np.linspace(0, len(real) - 1, n).round().astype(int):
            shutil.copy(real[i], folder / real[i].name)
    else:
        rng = np.random.default_rng(0)
        for k in range(n):
            age = 1 + (k * 89) // max(n - 1, 1)
            pixels = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{age}_{k % 2}_{k % 5}_2017011{k:09d}.jpg.chip.jpg", quality=85)
    return folder


def _header(path: Path) -> list[str]:
    with path.open() as f:
        return next(csv.reader(f))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_gpu_check_cpu_fallback(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "AGECLS_UTKFACE_DIR": str(_crops(tmp_path / "crops", 40)), "GPU_CHECK_CPU": "1",
           "GPU_CHECK_WORK": str(tmp_path / "work"), "AGECLS_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1150)
    tail = proc.stdout[-4000:]
    assert proc.returncode == 0, tail
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert all(p.is_file() for p in out.iterdir()), files  # nothing nested: what comes back is files

    stages = _rows(out / "stages.csv")
    names = [r["stage"] for r in stages]
    assert names == ["install", "bench_resnet18_raw", "bench_resnet18_jpeg", "bench_efficientnet_lite0_raw",
                     "bench_efficientnet_lite0_jpeg", "decode", "train"], stages
    assert all(r["exit_code"] == "0" for r in stages), stages
    assert "mode: cpu-fallback" in (out / "gpu.txt").read_text()
    assert "=== done" in (out / "log.txt").read_text()

    train_csv = next(name for name in files if name.endswith("-train.csv"))
    hw = train_csv[: -len("-train.csv")]
    assert set(files) == {"gpu.txt", "stages.csv", "log.txt", "metrics.json", f"{hw}.csv", f"{hw}-decode.csv", train_csv}

    bench = out / f"{hw}.csv"
    assert _header(bench)[:2] == ["mode", "requested_cache_format"]
    assert {"backbone", "image_size", "images_per_s", "vs_model_only"} <= set(_header(bench))
    rows = _rows(bench)
    got = {(r["backbone"], r["requested_cache_format"], r["mode"]) for r in rows}
    for backbone in ("resnet18", "tf_efficientnet_lite0"):
        for fmt in ("raw", "jpeg"):
            assert {(backbone, fmt, "model_only"), (backbone, fmt, "train_fast")} <= got, got
    assert all(r["image_size"] == "64" and float(r["images_per_s"]) > 0 for r in rows)

    decode = _rows(out / f"{hw}-decode.csv")
    assert {"device", "threads", "batch_size", "images_per_s", "bytes_per_image"} <= set(decode[0])
    assert {r["device"] for r in decode} == {"cpu"} and all(float(r["images_per_s"]) > 0 for r in decode)

    assert _header(out / train_csv)[:2] == ["hardware", "backbone"]
    (train,) = _rows(out / train_csv)
    assert train["backbone"] == "tf_efficientnet_lite0" and train["freeze"] == "False"
    assert int(train["epochs"]) >= 1 and float(train["wall_s"]) > 0 and float(train["train_images_per_s"]) > 0
    assert 0 < float(train["test_mae"]) < 100 and train["test_pearson"] != ""
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/mae"] == pytest.approx(float(train["test_mae"]))


def test_pack_gpu_payload(tmp_path: Path) -> None:
    """The wheels copied whole; an age-spread subset of the crops, names kept, within the budget."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("a-1.0-py3-none-any.whl", "b-2.0-py3-none-any.whl"):
        with zipfile.ZipFile(wheels / name, "w") as z:
            z.writestr("a/__init__.py", "x = 1\n" * 1000)
    crops = tmp_path / "crops"
    crops.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for k in range(60):  # noise does not compress: about 30 KB each, 1.8 MB in all
        name = f"{1 + k}_{k % 2}_{k % 5}_20170110{k:09d}.jpg.chip.jpg"
        Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(crops / name, quality=90)
        names.append(name)
    dest = tmp_path / "payload"
    env = {**os.environ, "AGECLS_UTKFACE_DIR": str(crops), "AGECLS_DEVICE_WHEELS": str(wheels),
           "GPU_PAYLOAD_DIR": str(dest), "GPU_PAYLOAD_MB": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "pack_gpu_payload.sh")], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert sorted(p.name for p in (dest / "wheels").iterdir()) == sorted(p.name for p in wheels.iterdir())
    kept = sorted((dest / "utkface").iterdir(), key=lambda p: int(p.name.split("_")[0]))
    assert 5 <= len(kept) < 60 and {p.name for p in kept} <= set(names)
    ages = [int(p.name.split("_")[0]) for p in kept]
    assert ages[0] == 1 and ages[-1] == 60  # both ends of the age range
    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) <= 2**20
    with Image.open(kept[0]) as im:
        assert im.size == (200, 200) and im.format == "JPEG"
    assert "payload:" in proc.stdout and "MiB" in proc.stdout
