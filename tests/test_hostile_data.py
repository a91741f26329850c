"""Hostile and careless data (issue 18): nothing lost, nothing leaked, nothing hangs.

Split membership survives any path; eval never silently tests another set; a JPEG cut mid-scan
and closed with an end marker is unreadable, not grey; a CSV reads only below its folder; a FIFO,
a folder or a broken link named x.jpg and a .gif are counted, never read; bad augmentation and
seed values are named; the synthetic data set never writes into a folder of photos.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from agecls.data import AgeDataModule
from agecls.utils.checks import ConfigValueError, check_train_config
from tests.conftest import utkface_dir


def _face(path: Path, seed: int, size: int = 24) -> None:
    """A tiny JPEG of noise: every file's content (and so its sha1) differs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _utk_folder(root: Path, n: int = 12, extra: tuple[str, ...] = ()) -> list[str]:
    """A UTKFace-like folder of n tiny faces (ages 20, 23, ...) plus files named `extra`."""
    names = [f"{20 + 3 * i}_0_0_2017011{i:02d}.jpg.chip.jpg" for i in range(n)] + list(extra)
    for i, name in enumerate(names):
        _face(root / name, seed=i)
    return names


def _dm(tmp_path: Path, root: Path, source: str = "utkface", **kwargs) -> AgeDataModule:
    opts = dict(image_size=32, batch_size=4, num_workers=0, cache_dir=str(tmp_path / "cache"), split_seed=0,
                seed=0, splits=[0.34, 0.33, 0.33], cache=False, report_dir=None)
    return AgeDataModule(source=source, root=str(root), **{**opts, **kwargs})


# ------------------------------------------------------------------------- 18.4 split membership
def test_split_membership_records_a_path_with_a_newline_and_eval_selects_exactly_it(tmp_path: Path) -> None:
    from agecls.data.splits import decode_membership

    root = tmp_path / "faces"
    odd = "33_1_0_20170110\nsecond line.jpg.chip.jpg"
    _utk_folder(root, extra=(odd,))
    dm = _dm(tmp_path, root)
    table = dm.split_table()
    assert odd in set(table["path"])
    state = dm.state_dict()
    assert state.get("split_membership"), "no split membership recorded: eval would test another set"
    for split in ("train", "val", "test"):
        saved = decode_membership(state["split_membership"], split)
        assert sorted(saved) == sorted(table.loc[table["split"] == split, "path"])
    split = table.loc[table["path"] == odd, "split"].iloc[0]

    again = _dm(tmp_path, root)
    again.use_saved_split(state["split_membership"], split)
    got = sorted(again.split_table()["path"])
    assert got == sorted(table.loc[table["split"] == split, "path"]) and odd in got
    assert again.membership_check["missing"] == again.membership_check["changed"] == 0


def _eval_cfg(tmp_path: Path, allow_changed: bool):
    return OmegaConf.create({
        "ckpt_path": str(tmp_path / "run" / "checkpoints" / "x.ckpt"), "data": None,
        "paths": {"cache_dir": str(tmp_path / "cache")},
        "eval": {"split": "test", "allow_changed": allow_changed, "batch_size": 4, "num_workers": 0,
                 "all_deduplicate": False, "all_max_age": 120},
    })


def test_eval_refuses_a_checkpoint_that_records_no_membership_unless_asked(tmp_path: Path, caplog) -> None:
    from agecls.data.splits import SplitMembershipError
    from agecls.eval import build_datamodule

    root = tmp_path / "faces"
    _utk_folder(root)
    model = SimpleNamespace(hparams=SimpleNamespace(image_size=32, crop_pct=0.875))
    ckpt = {"datamodule_hyper_parameters": dict(source="utkface", root=str(root), split_seed=0, seed=0,
                                                 splits=[0.34, 0.33, 0.33])}
    with pytest.raises(SplitMembershipError, match=r"does not record which images.*eval\.allow_changed=true"):
        build_datamodule(_eval_cfg(tmp_path, False), model, ckpt, tmp_path / "out")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "split.csv").write_text("path,age,split\n")  # the run's own record: named as the way out
    with pytest.raises(SplitMembershipError, match=re.escape(f"data.split_file={tmp_path / 'run' / 'split.csv'}")):
        build_datamodule(_eval_cfg(tmp_path, False), model, ckpt, tmp_path / "out")
    # asked for: rebuilt from the seed, with a warning naming it
    dm = build_datamodule(_eval_cfg(tmp_path, True), model, ckpt, tmp_path / "out")
    assert isinstance(dm, AgeDataModule)
    assert "rebuilt from the data" in caplog.text


# ------------------------------------------------------------------- 18.6 a JPEG cut mid-scan
def test_a_jpeg_cut_mid_scan_with_an_end_marker_appended_is_unreadable(tmp_path: Path) -> None:
    from agecls.data.images import check_image

    real = sorted(utkface_dir().glob("*.jpg"))[:3]
    root = tmp_path / "faces"
    root.mkdir()
    for f in real:
        shutil.copy(f, root / f.name)
        assert check_image(root / f.name)["ok"], "a whole real JPEG must stay readable"
    data = real[0].read_bytes()
    cut = root / "40_1_0_20170109000000000.jpg.chip.jpg"
    cut.write_bytes(data[: len(data) // 2] + b"\xff\xd9")
    with Image.open(cut) as im:  # what the hole was: Pillow decodes it without a word, half grey
        im.load()
    result = check_image(cut)
    assert not result["ok"] and "truncated JPEG" in result["error"]

    dm = _dm(tmp_path, root, splits=[1.0, 0.0, 0.0])
    assert dm.cleaning_report.removed["unreadable"] == 1
    assert str(cut) not in set(dm.records["path"])


# ------------------------------------------------------------------------- 18.6 CSV paths
def test_csv_paths_that_lead_outside_its_folder_are_refused_unless_allowed(tmp_path: Path) -> None:
    sub = tmp_path / "data"
    for i in range(6):
        _face(sub / f"img{i}.jpg", seed=i)
    _face(tmp_path / "private.jpg", seed=99)
    rows = [(f"img{i}.jpg", 20 + i) for i in range(6)]
    for outside in ("../private.jpg", str(tmp_path / "private.jpg"), "img0/../../private.jpg"):
        pd.DataFrame(rows + [(outside, 30)], columns=["path", "age"]).to_csv(sub / "labels.csv", index=False)
        with pytest.raises(ConfigValueError, match=r"data\.root=.*1 of its 7 paths lead outside.*"
                                                   r"data\.allow_outside_root=true"):
            _dm(tmp_path, sub / "labels.csv", source="csv").prepare_data()
    dm = _dm(tmp_path, sub / "labels.csv", source="csv", allow_outside_root=True)
    assert str((tmp_path / "private.jpg").resolve()) in set(dm.records["path"])
    with pytest.raises(ConfigValueError, match=r"data\.allow_outside_root='yes'"):
        _dm(tmp_path, sub / "labels.csv", source="csv", allow_outside_root="yes")


def test_an_imdb_wiki_full_path_that_leads_outside_root_is_refused(tmp_path: Path) -> None:
    import scipy.io

    root = tmp_path / "wiki_crop"
    names = [f"00/ok_{i}.jpg" for i in range(6)] + ["../../private.jpg"]
    for i, name in enumerate(names[:-1]):
        _face(root / name, seed=i)
    _face(tmp_path / "private.jpg", seed=99)
    n = len(names)
    cells = np.empty((1, n), dtype=object)
    for i, name in enumerate(names):
        cells[0, i] = np.array([name])
    struct = {"full_path": cells, "dob": np.full((1, n), 723_000.0), "photo_taken": np.full((1, n), 2010.0),
              "face_score": np.full((1, n), 3.0), "second_face_score": np.full((1, n), np.nan)}
    scipy.io.savemat(root / "wiki.mat", {"wiki": struct})
    with pytest.raises(ConfigValueError, match=r"wiki\.mat'?: 1 of its 7 paths lead outside.*allow_outside_root=true"):
        _dm(tmp_path, root, source="imdb_wiki", subset="wiki").prepare_data()


# ------------------------------------------- 18.6 FIFOs, folders, broken links, .gif: counted
@pytest.mark.timeout(60)  # a FIFO that is opened blocks forever
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_fifos_folders_broken_links_and_gifs_are_counted_never_read(tmp_path: Path, caplog) -> None:
    from agecls.data.images import (
        check_image,
        is_regular_image_file,
        load_rgb,
        open_regular,
        regular_file_problem,
        scan_images,
    )

    root = tmp_path / "faces"
    names = _utk_folder(root, n=9)
    os.mkfifo(root / "41_0_0_20170101000000001.jpg.chip.jpg")
    (root / "42_0_0_20170101000000002.jpg.chip.jpg").mkdir()
    os.symlink(root / "gone.jpg", root / "43_0_0_20170101000000003.jpg.chip.jpg")
    Image.new("RGB", (8, 8)).save(root / "44_0_0_20170101000000004.gif")
    (root / "notes.txt").write_text("not an image")

    scan = scan_images(root)
    assert [p.name for p in scan.files] == sorted(names)
    assert scan.lost() == {"not_a_file": 2, "broken_link": 1, "unsupported_format": 1}
    assert scan.skipped["other_file"] == 1

    fifo = root / "41_0_0_20170101000000001.jpg.chip.jpg"
    assert not is_regular_image_file(fifo) and "FIFO" in regular_file_problem(fifo)
    assert is_regular_image_file(root / names[0])
    for read in (open_regular, load_rgb):
        with pytest.raises(OSError, match="not a regular file: a FIFO"):
            read(fifo)
    assert "FIFO" in check_image(fifo)["error"]
    assert "folder" in check_image(root / "42_0_0_20170101000000002.jpg.chip.jpg")["error"]

    dm = _dm(tmp_path, root)
    removed = dm.cleaning_report.removed
    assert (removed["not_a_file"], removed["broken_link"], removed["unsupported_format"]) == (2, 1, 1)
    assert dm.cleaning_report.records_in == 9 + 4
    assert re.search(r"Skipped under .*2 not_a_file.*1 broken_link.*1 unsupported_format", caplog.text)


# --------------------------------------------------------- 18.6 augmentation and seed values
@pytest.mark.parametrize(("override", "expected"), [
    ({"augment": {"hflip": 2}}, "data.augment.hflip=2"),
    ({"augment": {"color_jitter": [5, 5, 5, 5]}}, "data.augment.color_jitter=[5, 5, 5, 5]"),
    ({"augment": {"rotation": -10}}, "data.augment.rotation=-10"),
    ({"augment": {"resized_crop_scale": [0.9, 0.2]}}, "data.augment.resized_crop_scale=[0.9, 0.2]"),
    ({"augment": {"hfilp": 0.5}}, "data.augment.hfilp=0.5: is not an augmentation option"),
    ({"seed": "abc"}, "data.seed='abc'"),
    ({"split_seed": "abc"}, "data.split_seed='abc'"),
    ({"split_seed": None}, "data.split_seed=None"),
])
def test_augmentation_and_seed_values_are_checked_by_name(tmp_path: Path, override: dict, expected: str) -> None:
    with pytest.raises(ConfigValueError, match=re.escape(expected)):
        _dm(tmp_path, tmp_path / "synthetic", source="synthetic", num_samples=10, **override)
    assert not (tmp_path / "synthetic").exists() and not (tmp_path / "cache").exists()


def test_train_config_names_a_bad_seed_or_augmentation_first(make_cfg) -> None:
    for override, expected in (("seed=abc", "seed='abc'"), ("data.augment.hflip=2", "data.augment.hflip=2"),
                               ("data.augment.color_jitter=[5,5,5,5]", "data.augment.color_jitter=[5, 5, 5, 5]")):
        with pytest.raises(ConfigValueError, match=re.escape(expected)):
            check_train_config(make_cfg(override))
    check_train_config(make_cfg())  # the defaults pass


# --------------------------------------------------- 18.7 synthetic data never lands in photos
def test_synthetic_data_is_never_written_into_a_folder_of_photos(tmp_path: Path, make_cfg) -> None:
    from agecls.data.datamodule import describe_data

    photos = tmp_path / "my_utkface"
    names = _utk_folder(photos, n=5)
    before = sorted(os.listdir(photos))
    with pytest.raises(ConfigValueError, match=rf"data\.root='{re.escape(str(photos))}': holds 5 images.*"
                                               r"add data=utkface.*or data=csv"):
        _dm(tmp_path, photos, source="synthetic", num_samples=10)
    cfg = make_cfg(f"data.root={photos}")  # `python -m agecls.train data.root=...` without data=
    with pytest.raises(ConfigValueError, match=r"data=utkface"):
        check_train_config(cfg)
    with pytest.raises(ConfigValueError, match=r"data=utkface"):
        describe_data(cfg.data)
    with pytest.raises(ConfigValueError, match=r"is a file.*data=csv"):
        _dm(tmp_path, photos / names[0], source="synthetic", num_samples=10)
    assert sorted(os.listdir(photos)) == before, "nothing was written into the user's folder"

    # the first console line says what the data are
    synthetic = describe_data(make_cfg().data)
    assert re.match(r"data: 120 generated \(synthetic\) faces in .*; not real photos$", synthetic)
    assert str(Path(make_cfg().paths.cache_dir)) in synthetic
    assert describe_data(make_cfg("data=utkface", f"data.root={photos}").data) == f"data: UTKFace, 5 faces from {photos}"
    with pytest.raises(ConfigValueError, match=r"data\.root='\?\?\?': is required with data=csv"):
        describe_data(make_cfg("data=csv").data)
    dm = _dm(tmp_path, tmp_path / "synthetic", source="synthetic", num_samples=12)  # its own folder: reused
    assert len(dm.records) == 12
    assert len(_dm(tmp_path, tmp_path / "synthetic", source="synthetic", num_samples=12).records) == 12
