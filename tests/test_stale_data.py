"""A changed image is noticed: the index keys files by what `touch` cannot restore (ctime, inode),
truncated files become `unreadable` records, and no failed or killed cache build leaves a
temporary folder a later run keeps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from agecls.data import AgeDataModule, feature_cache, pixel_cache
from agecls.data import index as index_module
from agecls.data.dataset import FaceAgeDataset
from agecls.data.images import check_image
from agecls.data.pixel_cache import PixelCache
from agecls.data.transforms import eval_transform
from agecls.utils.files import tmp_name
from tests.conftest import utkface_dir

N = 8


@pytest.fixture(scope="module")
def crops() -> list[Path]:
    files = sorted(utkface_dir().glob("*.jpg"))
    return files[:: max(1, len(files) // 200)][:200]  # spread over ages


def _folder(tmp_path: Path, crops: list[Path], n: int = N) -> Path:
    root = tmp_path / "utk"
    root.mkdir()
    for f in crops[:: len(crops) // n][:n]:
        shutil.copy(f, root / f.name)
    return root


def _dm(tmp_path: Path, root: Path, **kw) -> AgeDataModule:
    opts = dict(image_size=32, batch_size=4, num_workers=0, cache_dir=str(tmp_path / "cache"), split_seed=0,
                splits=[1.0, 0.0, 0.0], cache=True, report_dir=str(tmp_path / "run"), augment=None)
    opts.update(kw)
    dm = AgeDataModule(source="utkface", root=str(root), **opts)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _replace_keeping_times(path: Path, data: bytes) -> None:
    """Overwrite `path` in place and restore its access and modification times, as `touch -r` does."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def _requantised(data: bytes) -> bytes:
    """The same JPEG with its first quantisation table's DC step changed: same size, still decodes,
    other pixels."""
    at = data.index(b"\xff\xdb") + 5  # marker, 2 length bytes, Pq/Tq byte: the first step
    out = bytearray(data)
    out[at] = out[at] + 3 if out[at] < 200 else out[at] - 3
    return bytes(out)


def _row(dm: AgeDataModule, path: Path) -> int:
    return dm._prepare().records["path"].tolist().index(str(path))


def test_touch_r_replacement_is_rehashed_and_recached(tmp_path: Path, crops: list[Path]) -> None:
    root = _folder(tmp_path, crops)
    victim = sorted(root.iterdir())[3]
    before = _dm(tmp_path, root)
    old_sha = before._prepare().records["sha1"].iloc[_row(before, victim)]
    old_pixels = np.array(before.pixel_cache.images[_row(before, victim)])

    new = _requantised(victim.read_bytes())
    assert check_image(victim)["ok"] and len(new) == victim.stat().st_size
    _replace_keeping_times(victim, new)
    assert check_image(victim)["ok"], "the replacement decodes"

    after = _dm(tmp_path, root)
    records = after._prepare().records
    row = _row(after, victim)
    assert records["sha1"].iloc[row] == hashlib.sha1(new).hexdigest() != old_sha
    assert after.pixel_cache.directory != before.pixel_cache.directory, "a new pixel cache for new content"
    cached = np.array(after.pixel_cache.images[row])
    assert np.array_equal(cached, pixel_cache.preprocess(str(victim), None, 0.0, after.cache_side))
    assert not np.array_equal(cached, old_pixels)


def _cut_and_padded(data: bytes, keep: int) -> bytes:
    return data[:keep] + b"\0" * (len(data) - keep)


@pytest.mark.parametrize("cut", ["half", "end_marker"])
def test_truncated_replacement_becomes_unreadable_not_stale(tmp_path: Path, crops: list[Path], cut: str) -> None:
    root = _folder(tmp_path, crops)
    victim = sorted(root.iterdir())[5]
    first = _dm(tmp_path, root)
    assert first.cleaning_report.removed["unreadable"] == 0
    data = victim.read_bytes()
    keep = len(data) // 2 if cut == "half" else len(data) - 2  # cut short, padded to its old size
    _replace_keeping_times(victim, _cut_and_padded(data, keep))

    run = tmp_path / "run2"
    second = _dm(tmp_path, root, report_dir=str(run))
    report = json.loads((run / "cleaning.json").read_text())
    assert report["removed"]["unreadable"] == 1
    assert [p for p, _ in second.cleaning_report.unreadable_examples] == [str(victim)]
    assert str(victim) not in second._prepare().records["path"].tolist()
    assert len(second.pixel_cache.images) == N - 1 and second.pixel_cache.directory != first.pixel_cache.directory

    # the per-sample pipeline (data.cache=false) never meets it mid-epoch either
    third = _dm(tmp_path, root, cache=False, report_dir=str(tmp_path / "run3"))
    assert len(third.data_train) == N - 1
    for i in range(len(third.data_train)):
        assert third.data_train[i]["image"].shape == (3, 32, 32)


def test_check_image_rejects_truncated_jpegs(tmp_path: Path, crops: list[Path]) -> None:
    """Pillow decodes some JPEGs missing only their end (or cut and zero-padded) without an error;
    check_image must not."""
    path = tmp_path / "cut.jpg"
    for f in crops[:40]:
        data = f.read_bytes()
        for cut in (data[: len(data) // 2], data[:-2], _cut_and_padded(data, len(data) // 2),
                    _cut_and_padded(data, len(data) - 2)):
            path.write_bytes(cut)
            assert not check_image(path)["ok"], f"{f.name} cut to {len(cut)} bytes passed"
        path.write_bytes(data)
        assert check_image(path)["ok"]


def test_old_index_without_stat_columns_is_rechecked(tmp_path: Path, crops: list[Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root = _folder(tmp_path, crops)
    paths = sorted(str(p) for p in root.iterdir())
    cache_file = tmp_path / "index.csv"
    index_module.build_index(paths, cache_file)
    old = pd.read_csv(cache_file, keep_default_na=False, dtype={"sha1": str, "error": str})
    old = old.drop(columns=["ctime_ns", "inode"])
    old.loc[2, "sha1"] = "0" * 40  # what a stale entry would say
    old.to_csv(cache_file, index=False)
    calls = []
    real = index_module.check_image
    monkeypatch.setattr(index_module, "check_image", lambda p, decode=True: calls.append(p) or real(p, decode))
    frame = index_module.build_index(paths, cache_file)
    assert sorted(calls) == paths, "an index without ctime and inode re-checks every file"
    assert frame["sha1"].iloc[2] == hashlib.sha1(Path(paths[2]).read_bytes()).hexdigest()
    calls.clear()
    index_module.build_index(paths, cache_file)
    assert calls == [], "the rewritten index is trusted again"


def test_verify_full_rehashes_every_file_and_bad_values_are_named(tmp_path: Path, crops: list[Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = _folder(tmp_path, crops)
    calls = []
    real = index_module.check_image
    monkeypatch.setattr(index_module, "check_image", lambda p, decode=True: calls.append(p) or real(p, decode))
    _dm(tmp_path, root, cache=False)
    assert len(calls) == N
    calls.clear()
    _dm(tmp_path, root, cache=False)
    assert calls == []
    _dm(tmp_path, root, cache=False, verify="full")
    assert len(calls) == N
    with pytest.raises(ValueError, match=r"data\.verify='quick'.*stat, full"):
        AgeDataModule(source="utkface", root=str(root), verify="quick")


def test_a_file_broken_mid_run_names_what_happened(tmp_path: Path, crops: list[Path]) -> None:
    root = _folder(tmp_path, crops, n=2)
    victim = sorted(root.iterdir())[0]
    records = pd.DataFrame({"path": [str(victim)], "age": [30.0]})
    victim.write_bytes(victim.read_bytes()[:500])
    with pytest.raises(RuntimeError) as err:
        FaceAgeDataset(records, eval_transform(32, 0.875))[0]
    msg = str(err.value)
    assert str(victim) in msg and "since" in msg and "next run re-indexes" in msg
    assert "check_images" not in msg, "check_images was already on: advising it would not help"
    with pytest.raises(RuntimeError, match=r"set data\.check_images=true"):
        FaceAgeDataset(records, eval_transform(32, 0.875), checked=False)[0]


# --------------------------------------------------------------------------- temporary folders
def _tmp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name) if folder.exists() else []


def _records(root: Path) -> pd.DataFrame:
    return pd.DataFrame({"path": sorted(str(p) for p in root.iterdir())})


def test_failed_cache_build_leaves_no_tmp_folder(tmp_path: Path, crops: list[Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = _folder(tmp_path, crops, n=4)
    cache = tmp_path / "c"
    with pytest.raises(Exception):  # noqa: B017 - whatever side 0 raises
        PixelCache.build_or_load(_records(root), cache, side=0)
    assert _tmp_leftovers(cache / "pixels") == []

    real = pixel_cache.load_rgb
    seen = []

    def interrupted(*a, **k):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pixel_cache, "load_rgb", interrupted)
    with pytest.raises(KeyboardInterrupt):
        PixelCache.build_or_load(_records(root), cache, side=16)
    assert _tmp_leftovers(cache / "pixels") == []
    monkeypatch.undo()

    # an image unreadable when the cache is built: named, with what helps, and nothing left behind
    broken = sorted(root.iterdir())[1]
    broken.write_bytes(b"not an image")
    with pytest.raises(RuntimeError, match="while building the preprocessing cache") as err:
        PixelCache.build_or_load(_records(root), cache, side=16)
    assert str(broken) in str(err.value)
    assert _tmp_leftovers(cache / "pixels") == []
    assert not list((cache / "pixels").glob("*/meta.json"))

    def failing(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("backbone failed")

    loader = DataLoader([{"image": torch.zeros(3, 4, 4)}] * 3, batch_size=2)
    with pytest.raises(RuntimeError, match="backbone failed"):
        feature_cache.build_or_load("k1", cache, {"train": loader}, failing, torch.device("cpu"))
    assert _tmp_leftovers(cache / "features") == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_tmp_folder_of_a_dead_process_is_removed_by_the_next_build(tmp_path: Path, crops: list[Path]) -> None:
    root = _folder(tmp_path, crops, n=4)
    pixels = tmp_path / "c" / "pixels"
    pixels.mkdir(parents=True)
    dead, live = _dead_pid(), os.getppid()
    host = tmp_name("x").split(".tmp-", 1)[1].rsplit("-", 1)[0]  # this host, as tmp names spell it
    names = {
        "dead": f"aaaa.tmp-{host}-{dead}",
        "legacy_dead": f"bbbb.tmp-{dead}",
        "live": f"cccc.tmp-{host}-{live}",
        "other_host": f"dddd.tmp-{host}x-other-{dead}",
    }
    for name in names.values():
        (pixels / name).mkdir()
        (pixels / name / "images.npy").write_bytes(b"\0" * 64)
    cache = PixelCache.build_or_load(_records(root), tmp_path / "c", side=16)
    assert (cache.directory / "meta.json").exists()
    left = set(_tmp_leftovers(pixels))
    assert names["dead"] not in left and names["legacy_dead"] not in left, "a dead build's folder is removed"
    assert names["live"] in left, "a running build's folder is kept"
    assert names["other_host"] in left, "another host's process ids mean nothing here"

    # the image index's half-written file, likewise, when the index is next written
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    stale = index_dir / f"utk.csv.tmp-{host}-{dead}"
    stale.write_text("half an index")
    index_module.build_index(_records(root)["path"].tolist(), index_dir / "utk.csv")
    assert (index_dir / "utk.csv").exists() and not stale.exists()
    assert _tmp_leftovers(index_dir) == []
