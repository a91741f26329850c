"""A damaged cache is never trained or tested on (issue 18, item 3): noise over a cache, flipped
bytes, a truncated file, an edited or missing meta.json are found when the cache is reused and the
cache is built again; a build checks the free space first and fails clearly on a full disk; the
leftovers of killed builds are removed. Tiny caches of synthetic images: no UTKFace needed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from agecls.data import AgeDataModule, feature_cache, jpeg_cache, pixel_cache
from agecls.data.jpeg_cache import JpegCache
from agecls.data.pixel_cache import PixelCache
from agecls.utils import files
from agecls.utils.files import VERIFIED, CacheDamaged, NotEnoughSpace

SIDE = 16
N = 6


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """N random-noise JPEGs named as UTKFace names its crops (age_gender_race_date.jpg)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{20 + 5 * i}_{i % 2}_0_2017010100000{i}.jpg", quality=90)
    return folder


def _records(folder: Path) -> pd.DataFrame:
    return pd.DataFrame({"path": sorted(str(p) for p in folder.iterdir()), "age": 30.0})


def _expected(folder: Path) -> np.ndarray:
    return np.stack([pixel_cache.preprocess(p, None, 0.0, SIDE) for p in _records(folder)["path"]])


def _flip(path: Path, count: int = 100, start: int = 128, seed: int = 1) -> None:
    """Flip `count` bytes of `path` at random places from `start` on, in place."""
    data = bytearray(path.read_bytes())
    where = np.random.default_rng(seed).choice(np.arange(start, len(data)), size=count, replace=False)
    for i in where:
        data[i] ^= 0xFF
    with open(path, "r+b") as f:  # the same file, written over: as a stray process or a bad copy would
        f.write(data)


def _builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the images the raw cache decodes (one entry per chunk)."""
    calls: list[int] = []
    real = pixel_cache._fill
    monkeypatch.setattr(pixel_cache, "_fill", lambda job: calls.append(len(job[3])) or real(job))
    return calls


def _damage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "damaged" in r.getMessage()]


# ------------------------------------------------------------------------------- the raw cache
@pytest.mark.parametrize("verify", ["stat", "full"])
def test_noise_of_the_same_size_is_found_and_the_cache_rebuilt(images, tmp_path, monkeypatch, caplog, verify) -> None:
    first = PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE)
    target = first.directory / "images.npy"
    size = target.stat().st_size
    del first
    target.write_bytes(np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8).tobytes())
    calls = _builds(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE, verify=verify)
    assert sum(calls) == N, "rebuilt, not read as data"
    assert np.array_equal(np.asarray(again.images), _expected(images))
    warned = _damage_warnings(caplog)
    assert warned and str(again.directory) in warned[0] and "images.npy" in warned[0]


@pytest.mark.parametrize("verify", ["stat", "full"])
def test_a_hundred_flipped_bytes_are_found(images, tmp_path, monkeypatch, caplog, verify) -> None:
    first = PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE)
    _flip(first.directory / "images.npy")
    del first
    with pytest.raises(CacheDamaged, match=r"images\.npy: bytes .* do not match the checksum"):
        PixelCache(tmp_path / "c" / "pixels" / _key(images), verify=verify)
    calls = _builds(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE, verify=verify)
    assert sum(calls) == N and np.array_equal(np.asarray(again.images), _expected(images))
    assert _damage_warnings(caplog)


def _key(folder: Path) -> str:
    return pixel_cache.cache_key(_records(folder), SIDE, 0.0)


def test_a_truncated_cache_is_named_as_such_and_rebuilt(images, tmp_path, monkeypatch, caplog) -> None:
    first = PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE)
    target = first.directory / "images.npy"
    size = target.stat().st_size
    del first
    os.truncate(target, size // 2)
    with pytest.raises(CacheDamaged, match=rf"{size // 2:,} bytes, but {size:,} were written .*truncated"):
        PixelCache(target.parent)
    calls = _builds(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE)
    assert sum(calls) == N and np.array_equal(np.asarray(again.images), _expected(images))
    assert "truncated" in _damage_warnings(caplog)[0]
    # and every later run reuses the rebuilt cache, with no error
    calls.clear()
    assert PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE).directory == again.directory
    assert calls == []


def test_a_cache_unchanged_since_verified_is_cheap_to_open_and_full_reads_every_block(
        images, tmp_path, monkeypatch) -> None:
    """data.verify=stat: a file unchanged since it was verified in full reads its first and last
    blocks only; full reads every block, every time, and so finds damage stat cannot see (bit rot:
    the content changed, the stat did not)."""
    monkeypatch.setattr(files, "BLOCK_BYTES", 256)
    cache = PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE)
    folder = cache.directory
    n_blocks = len(cache.meta["files"]["images.npy"]["crc32"])
    assert n_blocks > 10
    del cache
    read: list[int] = []
    real = files._check_blocks

    def counting(path, record, blocks):
        blocks = list(blocks)
        read.append(len(blocks))
        return real(path, record, blocks)

    monkeypatch.setattr(files, "_check_blocks", counting)
    time.sleep(0.05)  # a few ticks of the file system's clock after the build
    PixelCache(folder, verify="stat")  # built within the same clock tick ("racy"): checked in full
    PixelCache(folder, verify="stat")  # now recorded as verified: first and last block
    PixelCache(folder, verify="full")
    assert read[-2:] == [2, n_blocks] and read[0] in (2, n_blocks)

    # bit rot: flip bytes in a middle block, then make the stat record claim it was verified since
    _flip(folder / "images.npy", count=5, start=256 * 4, seed=3)
    seen = files.read_sealed_json(folder / VERIFIED)
    seen["files"]["images.npy"] = files._signature(os.stat(folder / "images.npy"))
    files.write_sealed_json(folder / VERIFIED, seen)
    later = os.stat(folder / VERIFIED).st_mtime_ns + 10**9
    os.utime(folder / VERIFIED, ns=(later, later))
    PixelCache(folder, verify="stat")  # what stat cannot see
    with pytest.raises(CacheDamaged, match="do not match the checksum"):
        PixelCache(folder, verify="full")


def test_an_edited_or_missing_record_is_never_trusted(images, tmp_path, monkeypatch, caplog) -> None:
    first = PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE)
    folder = first.directory
    del first
    meta = json.loads((folder / "meta.json").read_text())
    meta["n"] = N - 1  # edited by hand (or damaged) without its checksum
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheDamaged, match="does not match its own checksum"):
        PixelCache(folder)
    # a cache of an older agecls (no checksums) is built again, not trusted
    del meta["meta_sha256"], meta["files"]
    meta["n"] = N
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheDamaged, match="no checksum"):
        PixelCache(folder)
    (folder / "meta.json").unlink()  # a folder without its record: rebuilt, not "another build won"
    calls = _builds(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE)
    assert sum(calls) == N and np.array_equal(np.asarray(again.images), _expected(images))
    assert "meta.json" in _damage_warnings(caplog)[0]


# ------------------------------------------------------------------------------ the jpeg cache
def test_flipped_bytes_in_the_jpeg_cache_are_found_and_it_is_rebuilt(images, tmp_path, monkeypatch, caplog) -> None:
    first = JpegCache.build_or_load(_records(images), tmp_path / "c", SIDE)
    folder = first.directory
    blobs = [np.array(b) for b in first.encoded(np.arange(N))]
    del first
    _flip(folder / "images.bin", start=0)
    with pytest.raises(CacheDamaged, match=r"images\.bin: bytes"):
        JpegCache(folder)
    encoded = []
    real = jpeg_cache.preprocess
    monkeypatch.setattr(jpeg_cache, "preprocess", lambda *a: encoded.append(1) or real(*a))
    with caplog.at_level(logging.WARNING):
        again = JpegCache.build_or_load(_records(images), tmp_path / "c", SIDE)
    assert len(encoded) == N and _damage_warnings(caplog)
    assert all(np.array_equal(a, b) for a, b in zip(again.encoded(np.arange(N)), blobs, strict=True))

    # an offset table written over with noise of its size: found, not used to slice the bytes
    table = again.directory / "offsets.npy"
    table.write_bytes(np.random.default_rng(4).integers(0, 256, table.stat().st_size, dtype=np.uint8).tobytes())
    with pytest.raises(CacheDamaged, match=r"offsets\.npy"):
        JpegCache(again.directory, verify="full")


# ---------------------------------------------------------------------------- the feature cache
def test_damaged_features_are_computed_again(tmp_path, caplog) -> None:
    loader = DataLoader([{"image": torch.full((3, 4, 4), float(i))} for i in range(5)], batch_size=2)
    calls = []

    def extract(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x.flatten(1)[:, :3]

    first = feature_cache.build_or_load("k1", tmp_path, {"train": loader}, extract, torch.device("cpu"))
    _flip(tmp_path / "features" / "k1" / "train.npy", count=20)
    calls.clear()
    with caplog.at_level(logging.WARNING):
        again = feature_cache.build_or_load("k1", tmp_path, {"train": loader}, extract, torch.device("cpu"))
    assert sum(calls) == 5 and np.array_equal(again["train"], first["train"]) and _damage_warnings(caplog)


# --------------------------------------------------------------------------------- full disks
def test_a_build_refuses_a_disk_without_room_before_decoding_anything(images, tmp_path, monkeypatch) -> None:
    calls = _builds(monkeypatch)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    need = len(pixel_cache.npy_header((N, 3, SIDE, SIDE), np.uint8)) + N * 3 * SIDE * SIDE
    with pytest.raises(NotEnoughSpace) as err:
        PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE)
    message = str(err.value)
    assert str(tmp_path / "c" / "pixels") in message and f"{need:,} bytes" in message and "1,000 bytes" in message
    assert "data.cache_dir" in message, "says what to do"
    assert calls == [], "refused before any image was decoded"
    assert not list((tmp_path / "c" / "pixels").glob("*")), "nothing left behind"


def test_a_disk_that_fills_during_a_build_is_a_clear_error_not_a_crash(images, tmp_path, monkeypatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(NotEnoughSpace, match=r"filled up while writing images\.npy"):
        PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE)
    assert not list((tmp_path / "c" / "pixels").glob("*")), "the half-built cache is removed"


# ------------------------------------------------------------------------------------ leftovers
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_builds_are_removed_when_a_cache_is_reused(images, tmp_path) -> None:
    cache = PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE)
    pixels = cache.directory.parent
    dead = _dead_pid()
    leftover = pixels / f"aaaa.tmp-{files._host()}-{dead}"  # as tmp_name spells a build's folder
    leftover.mkdir()
    (leftover / "images.npy").write_bytes(b"\0" * 4096)
    again = PixelCache.build_or_load(_records(images), tmp_path / "c", SIDE)
    assert again.directory == cache.directory and not leftover.exists()


# ----------------------------------------------------------------------------- data.verify
def test_data_verify_full_reaches_the_cache(images, tmp_path, monkeypatch) -> None:
    """data.verify=full (AgeDataModule's `verify`) is what the preprocessing cache is checked with."""
    used = []
    real = files.open_cache
    monkeypatch.setattr(pixel_cache, "open_cache", lambda *a: used.append(a[-1]) or real(*a))
    for verify in ("stat", "stat", "full"):  # built (checked by its sizes), then reused
        dm = AgeDataModule(source="utkface", root=str(images), image_size=SIDE, batch_size=2, num_workers=0,
                           cache_dir=str(tmp_path / "c"), split_seed=0, seed=0, splits=[0.34, 0.33, 0.33],
                           cache=True, cache_format="raw", crop_pct=1.0, verify=verify, deduplicate=False)
        dm.setup("fit")
        assert dm.pixel_cache is not None
    assert used == [None, "stat", "full"]
