"""Data sources, cleaning rules and their counts, splits, bad input, the sampler, downloads."""

from __future__ import annotations

import http.server
import io
import json
import shutil
import tarfile
import threading
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import torch
from PIL import Image

from agecls.data import AgeDataModule, EmptyDatasetError
from agecls.data import index as index_module
from agecls.data.download import DownloadError, download
from agecls.data.sources.imdb_wiki import age_at_photo
from agecls.data.splits import SplitError, assign_splits
from agecls.train import train
from tests.conftest import utkface_dir

UTK_FILES = sorted(utkface_dir().glob("*.jpg")) if utkface_dir().is_dir() else []


def _dm(tmp_path: Path, source: str, root: Path | str, **kw) -> AgeDataModule:
    opts = dict(image_size=32, batch_size=4, num_workers=0, cache_dir=str(tmp_path / "cache"), split_seed=0)
    opts.update(kw)
    return AgeDataModule(source=source, root=str(root), **opts)


def _jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path, quality=90)


def _datenum(d: date) -> float:
    return float(d.toordinal() + 366)


# ---------------------------------------------------------------------------------- IMDB-WIKI
def test_age_takes_the_photo_as_taken_mid_year() -> None:
    assert age_at_photo(_datenum(date(1981, 5, 5)), 2009) == 28
    assert age_at_photo(_datenum(date(1981, 7, 1)), 2009) == 27  # born from July on: one less
    assert np.isnan(age_at_photo(0.0, 2009))
    assert np.isnan(age_at_photo(_datenum(date(1981, 5, 5)), float("nan")))


def _cell(values: list) -> np.ndarray:
    """A 1xN MATLAB cell array, as scipy.io.savemat writes numpy object arrays."""
    out = np.empty((1, len(values)), dtype=object)
    for i, v in enumerate(values):
        out[0, i] = v if isinstance(v, np.ndarray) else np.array([v])
    return out


def _write_imdb(root: Path, subset: str = "imdb", per_person: int = 5) -> dict[str, int]:
    """A .mat in IMDB-WIKI's real structure, with a known number of records per rule.

    Returns the expected counts of cleaning.json's `removed`.
    """
    rows = []  # (file, dob, photo_taken, face_score, second_face_score, celeb_id)
    good = _datenum(date(1980, 3, 1))
    for i in range(40):  # usable: 8 people, 5 photos each (per_person), ages 21..60
        rows.append((f"{i % 100:02d}/ok_{i}.jpg", _datenum(date(1950 + i, 3, 1)), 2010, 3.0, np.nan, i // per_person))
    expected = {
        "no_photo_date": 3, "multiple_faces": 2, "no_face": 2, "low_face_score": 1,
        "invalid_dob": 2, "age_out_of_range": 1, "unreadable": 2, "duplicate": 1, "age_conflict": 2,
    }
    rows += [("01/nodate_a.jpg", good, np.nan, 3.0, np.nan, 100),
             ("01/nodate_b.jpg", good, 0, 3.0, np.nan, 100),
             # no photo date AND a second face: counted once, under the first rule
             ("01/nodate_c.jpg", good, np.nan, 3.0, 2.5, 100)]
    rows += [("02/two_a.jpg", good, 2010, 3.0, 1.7, 101), ("02/two_b.jpg", good, 2010, 3.0, 0.2, 101)]
    rows += [("03/noface_a.jpg", good, 2010, -np.inf, np.nan, 102), ("03/noface_b.jpg", good, 2010, -np.inf, np.nan, 102)]
    rows += [("04/weak.jpg", good, 2010, 0.5, np.nan, 103)]
    rows += [("05/zero_dob.jpg", 0.0, 2010, 3.0, np.nan, 104),
             ("05/born_later.jpg", _datenum(date(2015, 1, 1)), 2010, 3.0, np.nan, 104)]  # photo before birth
    rows += [("06/old.jpg", _datenum(date(1880, 1, 1)), 2010, 3.0, np.nan, 105)]  # 130 years
    rows += [("07/missing.jpg", good, 2010, 3.0, np.nan, 106), ("07/empty.jpg", good, 2010, 3.0, np.nan, 106)]
    rows += [("08/copy_of_ok_0.jpg", _datenum(date(1950, 3, 1)), 2010, 3.0, np.nan, 0)]  # same bytes, same age
    rows += [("09/conflict_a.jpg", _datenum(date(1970, 3, 1)), 2010, 3.0, np.nan, 107),
             ("09/conflict_b.jpg", _datenum(date(1960, 3, 1)), 2010, 3.0, np.nan, 107)]  # same bytes, ages differ

    for k, (f, *_rest) in enumerate(rows):
        if f in ("07/missing.jpg", "08/copy_of_ok_0.jpg", "09/conflict_b.jpg"):  # copies are made below
            continue
        if f.startswith("07/empty"):
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_bytes(b"")
            continue
        _jpeg(root / f, seed=k)
    shutil.copy(root / "00/ok_0.jpg", root / "08/copy_of_ok_0.jpg")
    shutil.copy(root / "09/conflict_a.jpg", root / "09/conflict_b.jpg")

    n = len(rows)
    struct = {
        "full_path": _cell([r[0] for r in rows]),
        "dob": np.array([r[1] for r in rows], dtype=float).reshape(1, n),
        "gender": np.ones((1, n)),
        "photo_taken": np.array([r[2] for r in rows], dtype=float).reshape(1, n),
        "face_location": _cell([np.array([[1.0, 2.0, 30.0, 35.0]]) for _ in rows]),
        "face_score": np.array([r[3] for r in rows], dtype=float).reshape(1, n),
        "second_face_score": np.array([r[4] for r in rows], dtype=float).reshape(1, n),
        "name": _cell([f"person {r[5]}" for r in rows]),
        "celeb_names": _cell([f"person {i}" for i in range(110)]),
        "celeb_id": np.array([r[5] for r in rows], dtype=float).reshape(1, n),
    }
    scipy.io.savemat(root / f"{subset}.mat", {subset: struct})
    return expected


def test_imdb_cleaning_counts_every_rule(tmp_path: Path) -> None:
    root = tmp_path / "imdb_crop"
    expected = _write_imdb(root)
    report_dir = tmp_path / "run"
    dm = _dm(tmp_path, "imdb_wiki", root, subset="imdb", report_dir=str(report_dir), splits=[0.6, 0.2, 0.2])
    dm.prepare_data()
    dm.setup("fit")
    report = json.loads((report_dir / "cleaning.json").read_text())
    assert report["removed"] == expected
    assert list(report["removed"]) == list(expected), "rules are reported in their fixed order"
    assert report["records_in"] == 40 + sum(expected.values())
    assert report["records_out"] == 40
    assert sum(report["splits"].values()) == 40
    # identity-disjoint: nobody's photos are in two splits
    recs = dm._prepare().records
    assert recs.groupby("identity")["split"].nunique().max() == 1
    assert sorted(recs["age"].unique()) == list(range(21, 61))  # 2010 - (1950 + i)


def test_wiki_subset_uses_names_as_identities_and_crops_full_photos(tmp_path: Path) -> None:
    root = tmp_path / "wiki"
    _write_imdb(root, subset="wiki")
    dm = _dm(tmp_path, "imdb_wiki", root, subset="wiki", cropped=False, face_margin=0.0)
    dm.setup("fit")
    recs = dm._prepare().records
    assert recs["identity"].str.startswith("wiki:person").all()
    item = dm.data_train[0]
    assert item["image"].shape == (3, 32, 32)
    assert dm.data_train.boxes is not None and dm.data_train.boxes[0] == (1.0, 2.0, 30.0, 35.0)


def test_missing_mat_names_the_file_and_how_to_get_it(tmp_path: Path) -> None:
    (tmp_path / "wiki_crop").mkdir()
    dm = _dm(tmp_path, "imdb_wiki", tmp_path / "wiki_crop", subset="wiki")
    with pytest.raises(FileNotFoundError, match=r"wiki\.mat.*data\.download=true"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------------- CSV
def test_csv_source_with_ages_identities_and_face_counts(tmp_path: Path) -> None:
    for i in range(30):
        _jpeg(tmp_path / "img" / f"{i}.jpg", i)
    pd.DataFrame({
        "path": [f"img/{i}.jpg" for i in range(30)],
        "age": [20 + i for i in range(30)],
        "identity": [f"p{i // 3}" for i in range(30)],
        "face_count": [2 if i == 0 else 1 for i in range(30)],
    }).to_csv(tmp_path / "faces.csv", index=False)
    dm = _dm(tmp_path, "csv", tmp_path / "faces.csv")
    dm.setup("fit")
    rep = dm.cleaning_report
    assert rep.removed["multiple_faces"] == 1 and rep.records_out == 29
    recs = dm._prepare().records
    assert recs.groupby("identity")["split"].nunique().max() == 1
    assert Path(recs["path"].iloc[0]).is_absolute()


def test_csv_source_computes_age_from_dates(tmp_path: Path) -> None:
    for i in range(4):
        _jpeg(tmp_path / f"{i}.jpg", i)
    pd.DataFrame({
        "path": ["0.jpg", "1.jpg", "2.jpg", "3.jpg"],
        "dob": ["1990-06-15", "1990-06-15", "not a date", "1990-01-01"],
        "photo_date": ["2020-06-14", "2020-06-15", "2020-01-01", ""],
    }).to_csv(tmp_path / "d.csv", index=False)
    dm = _dm(tmp_path, "csv", tmp_path / "d.csv", splits=[1.0, 0.0, 0.0])
    dm.setup("fit")
    rep = dm.cleaning_report
    assert rep.removed["no_photo_date"] == 1 and rep.removed["invalid_dob"] == 1
    ages = sorted(dm._prepare().records["age"])
    assert ages == [29.0, 30.0]  # one day before the 30th birthday, and on it


# ------------------------------------------------------------------------------------ UTKFace
@pytest.fixture(scope="module")
def utk_dm(tmp_path_factory: pytest.TempPathFactory) -> AgeDataModule:
    tmp = tmp_path_factory.mktemp("utk")
    dm = _dm(tmp, "utkface", utkface_dir(), num_workers=2, report_dir=str(tmp / "run"))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_real_utkface_counts_duplicates_and_label_conflicts(utk_dm: AgeDataModule) -> None:
    rep = utk_dm.cleaning_report
    assert rep.records_in == len(UTK_FILES) == 20_709
    assert rep.removed["duplicate"] > 0 and rep.removed["age_conflict"] > 0
    assert rep.removed["unreadable"] == 0
    recs = utk_dm._prepare().records
    assert not recs["sha1"].duplicated().any(), "no image may be in the data twice"
    # copies of one image never straddle train and test
    assert rep.records_out == len(recs) == rep.records_in - sum(rep.removed.values())


def test_utkface_names_that_break_the_pattern_still_parse(utk_dm: AgeDataModule) -> None:
    recs = utk_dm._prepare().records
    odd = recs[recs["path"].str.contains(r" \.jpg|jpg\.chip|^\d+_\d_\d{17}", regex=True)]
    names = {Path(p).name for p in recs["path"]}
    assert "24_0_1_20170116220224657 .jpg.chip.jpg" in names
    assert "55_0_0_20170116232725357jpg.chip.jpg" in names
    assert len(odd) > 0
    assert utk_dm.cleaning_report.removed["unparseable_name"] == 0


def test_split_is_stratified_and_repeatable(utk_dm: AgeDataModule, tmp_path: Path) -> None:
    recs = utk_dm._prepare().records
    shares = recs["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.8, abs=0.01) and shares["test"] == pytest.approx(0.1, abs=0.01)
    decade = (recs["age"] // 10).clip(upper=8)
    by_split = pd.crosstab(decade, recs["split"], normalize="columns")
    assert (by_split["test"] - by_split["train"]).abs().max() < 0.02
    first = (Path(utk_dm.hparams.report_dir) / "split.csv").read_bytes()
    again = _dm(tmp_path, "utkface", utkface_dir(), report_dir=str(tmp_path / "again"),
                cache_dir=utk_dm.hparams.cache_dir)
    again.setup("fit")
    assert (tmp_path / "again" / "split.csv").read_bytes() == first


def test_split_ignores_record_order_and_keeps_identities_together() -> None:
    rng = np.random.default_rng(1)
    recs = pd.DataFrame({"path": [f"/d/{i:04d}.jpg" for i in range(600)],
                         "age": rng.integers(1, 90, 600).astype(float),
                         "identity": [f"p{i // 4}" for i in range(600)]})
    a = pd.Series(assign_splits(recs, seed=3), index=recs["path"])
    shuffled = recs.sample(frac=1.0, random_state=5)
    b = pd.Series(assign_splits(shuffled, seed=3), index=shuffled["path"])
    assert (a.sort_index() == b.sort_index()).all()
    assert recs.assign(split=a.to_numpy()).groupby("identity")["split"].nunique().max() == 1
    c = pd.Series(assign_splits(recs, seed=4), index=recs["path"])
    assert (a != c).any(), "another seed gives another split"



def _ages(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 90, n).astype(float)


@pytest.mark.parametrize("people", [False, True])
def test_adding_or_removing_images_moves_no_other_image(people: bool) -> None:
    n = 1200
    recs = pd.DataFrame({"path": [f"/d/{i:04d}.jpg" for i in range(n)], "age": _ages(n),
                         "sha1": [f"{i:040x}" for i in range(n)]})
    if people:
        recs["identity"] = [f"p{i // 3}" for i in range(n)]
    before = pd.Series(assign_splits(recs, seed=7), index=recs["path"])
    for drop in (0, 517, n - 1):  # one image less
        fewer = recs.drop(index=drop)
        after = pd.Series(assign_splits(fewer, seed=7), index=fewer["path"])
        assert (before.loc[after.index] == after).all()
    extra = pd.DataFrame({"path": ["/d/new.jpg", "/d/new2.jpg"], "age": [30.0, 70.0], "sha1": ["a" * 40, "b" * 40]})
    if people:
        extra["identity"] = ["p0", "someone new"]  # a new photo of a known person joins that person's split
    more = pd.concat([recs, extra], ignore_index=True)
    after = pd.Series(assign_splits(more, seed=7), index=more["path"])
    assert (after.loc[before.index] == before).all()
    if people:
        assert after["/d/new.jpg"] == before["/d/0000.jpg"]
    # shares and age strata hold within sampling noise (measured: benchmarks/split_quality.py)
    shares = before.value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.8, abs=0.05) and shares["test"] == pytest.approx(0.1, abs=0.04)


def test_split_follows_the_content_not_the_file_name() -> None:
    recs = pd.DataFrame({"path": [f"/d/{i}.jpg" for i in range(300)], "age": _ages(300),
                         "sha1": [f"{i:040x}" for i in range(300)]})
    renamed = recs.assign(path=[f"/elsewhere/x_{i}.png" for i in range(300)])
    assert (assign_splits(recs, seed=1) == assign_splits(renamed, seed=1)).all()


def test_small_data_sets_get_a_group_in_every_split_or_a_clear_error() -> None:
    for people in (3, 5, 20):
        recs = pd.DataFrame({"path": [f"/d/{i}.jpg" for i in range(40)], "age": _ages(40),
                             "identity": [f"p{i % people}" for i in range(40)]})
        for seed in range(20):
            split = assign_splits(recs, seed=seed)
            assert set(split) == {"train", "val", "test"}, (people, seed)
            assert recs.assign(split=split).groupby("identity")["split"].nunique().max() == 1
    two = pd.DataFrame({"path": ["/a.jpg", "/b.jpg", "/c.jpg"], "age": [20.0, 30.0, 40.0], "identity": ["p", "p", "q"]})
    with pytest.raises(SplitError, match=r"3 images of 2 distinct.*data\.splits=\[0\.8, 0\.1, 0\.1\]"):
        assign_splits(two, seed=0)
    assert set(assign_splits(two, fractions=(0.5, 0.0, 0.5), seed=0)) == {"train", "test"}


def test_a_small_identity_labelled_wiki_mat_trains(tmp_path: Path, make_cfg) -> None:
    """40 usable records of 20 people: validation and test each get people, and training runs."""
    root = tmp_path / "wiki"
    _write_imdb(root, subset="wiki", per_person=2)
    cfg = make_cfg("data=imdb_wiki", f"data.root={root}", "data.subset=wiki", "data.num_workers=0",
                   "data.image_size=32", "data.batch_size=8", f"paths.output_dir={tmp_path / 'run'}")
    metrics = train(cfg)
    report = json.loads((tmp_path / "run" / "cleaning.json").read_text())
    assert report["records_out"] == 40 and report["split_version"] == "hash-v2"
    assert min(report["splits"].values()) >= 1
    assert np.isfinite(metrics["val/mae"]) and np.isfinite(metrics["test/mae"])


def test_a_copy_of_the_data_elsewhere_gets_the_same_split(tmp_path: Path) -> None:
    tables = []
    for where in ("here", "there/deeper"):
        root = tmp_path / where / "utk"
        root.mkdir(parents=True)
        for f in UTK_FILES[::300][:60]:
            shutil.copy(f, root / f.name)
        dm = _dm(tmp_path / where, "utkface", root, split_seed=7)
        dm.setup("fit")
        tables.append(dm.split_table())
    assert tables[0].equals(tables[1])


def test_split_file_is_reused(utk_dm: AgeDataModule, tmp_path: Path) -> None:
    saved = pd.read_csv(Path(utk_dm.hparams.report_dir) / "split.csv")
    edited = saved.copy()
    edited.loc[edited.index[:50], "split"] = "test"
    edited.to_csv(tmp_path / "mine.csv", index=False)
    dm = _dm(tmp_path, "utkface", utkface_dir(), split_file=str(tmp_path / "mine.csv"),
             cache_dir=utk_dm.hparams.cache_dir, split_seed=999)
    dm.setup("fit")
    got = dm.split_table().set_index("path")["split"]
    assert (got.loc[edited["path"]].to_numpy() == edited["split"].to_numpy()).all()


def test_balanced_sampler_evens_out_age_bins(tmp_path: Path) -> None:
    rows = []
    for i in range(120):
        age = 20 if i < 100 else 80  # 100 young, 20 old
        _jpeg(tmp_path / "img" / f"{i}.jpg", i)
        rows.append((f"img/{i}.jpg", age))
    pd.DataFrame(rows, columns=["path", "age"]).to_csv(tmp_path / "a.csv", index=False)
    draws = {}
    for sampler in ("shuffle", "balanced"):
        dm = _dm(tmp_path, "csv", tmp_path / "a.csv", sampler=sampler, splits=[1.0, 0.0, 0.0])
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.epoch_fn = None  # no trainer here: step the epochs by hand
        ages = []
        for epoch in range(40):  # 4,800 draws: the balanced share's sd is 0.007 (one epoch: 0.046)
            loader.sampler.set_epoch(epoch)
            ages += [b["age"] for b in loader]
        draws[sampler] = float((torch.cat(ages) == 80).float().mean())
    assert draws["shuffle"] == pytest.approx(20 / 120, abs=1e-6)  # a permutation: every image once
    assert draws["balanced"] == pytest.approx(0.5, abs=0.04)


# ---------------------------------------------------------------------------------- bad input
def _broken_folder(root: Path, n_good: int = 40) -> None:
    root.mkdir(parents=True)
    for f in UTK_FILES[:: len(UTK_FILES) // n_good][:n_good]:
        shutil.copy(f, root / f.name)
    src = UTK_FILES[0].read_bytes()
    (root / "30_0_0_20170101000000001.jpg.chip.jpg").write_bytes(b"")                    # zero bytes
    (root / "31_0_0_20170101000000002.jpg.chip.jpg").write_bytes(src[: len(src) // 2])   # truncated
    (root / "32_0_0_20170101000000003.jpg.chip.jpg").write_text("not an image at all")   # not an image
    base = Image.open(UTK_FILES[1]).convert("RGB")
    base.convert("L").save(root / "33_0_0_20170101000000004.jpg.chip.jpg")               # grayscale
    base.convert("CMYK").save(root / "34_0_0_20170101000000005.jpg.chip.jpg")            # CMYK JPEG
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "35_0_0_20170101000000006.png")                                      # RGBA PNG
    g16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(g16).save(root / "36_0_0_20170101000000007.png")                      # 16-bit PNG


def test_broken_and_odd_images_are_indexed_skipped_or_converted(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    _broken_folder(root)
    dm = _dm(tmp_path, "utkface", root, splits=[1.0, 0.0, 0.0])
    dm.setup("fit")
    rep = dm.cleaning_report
    assert rep.removed["unreadable"] == 3
    bad = {Path(p).name.split("_")[0] for p, _ in rep.unreadable_examples}
    assert bad == {"30", "31", "32"}
    ds = dm.data_train
    names = [Path(p).name.split("_")[0] for p in ds.paths]
    for age in ("33", "34", "35", "36"):
        item = ds[names.index(age)]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32)
    # the 16-bit image is rescaled, not clipped to white
    g16 = ds[names.index("36")]["image"].float().mean()
    g8 = np.asarray(Image.open(UTK_FILES[1]).convert("L")).mean()
    assert abs(float(g16) - g8) < 25


def test_training_on_a_folder_with_broken_files(make_cfg, tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    _broken_folder(root)
    cfg = make_cfg("data=utkface", f"data.root={root}")
    metrics = train(cfg)
    report = json.loads((Path(cfg.paths.output_dir) / "cleaning.json").read_text())
    assert report["removed"]["unreadable"] == 3
    assert report["records_out"] == 44
    assert np.isfinite(metrics["test/mae"])


def test_index_is_cached_and_rechecks_only_changed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "f"
    root.mkdir()
    for i in range(12):
        _jpeg(root / f"{20 + i}_0_0_x.jpg", i)
    calls = []
    real = index_module.check_image
    monkeypatch.setattr(index_module, "check_image", lambda p, decode=True: calls.append(p) or real(p, decode))
    _dm(tmp_path, "utkface", root).setup("fit")
    assert len(calls) == 12
    calls.clear()
    _dm(tmp_path, "utkface", root).setup("fit")
    assert calls == []
    _jpeg(root / "25_0_0_x.jpg", 99)  # rewritten: new content
    _dm(tmp_path, "utkface", root).setup("fit")
    assert [Path(c).name for c in calls] == ["25_0_0_x.jpg"]


def test_empty_after_cleaning_fails_with_the_counts(tmp_path: Path) -> None:
    root = tmp_path / "f"
    for i in range(5):
        _jpeg(root / f"{20 + i}_0_0_x.jpg", i)
    dm = _dm(tmp_path, "utkface", root, min_age=90)
    with pytest.raises(EmptyDatasetError, match=r"5 records found.*age_out_of_range: 5"):
        dm.setup("fit")


def test_missing_root_names_the_path_and_how_to_get_the_data(tmp_path: Path) -> None:
    dm = _dm(tmp_path, "utkface", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere.*UTKFace"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------- downloads
class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    seen_ranges: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's API)
        rng = self.headers.get("Range")
        body, status = self.payload, 200
        if rng:
            self.seen_ranges.append(rng)
            start = int(rng.split("=")[1].split("-")[0])
            body, status = self.payload[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path):
    archive_root = tmp_path / "src" / "wiki_crop"
    _write_imdb(archive_root, subset="wiki")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(archive_root, arcname="wiki_crop")
    _RangeHandler.payload = buf.getvalue()
    _RangeHandler.seen_ranges = []
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/wiki_crop.tar"
    httpd.shutdown()


def test_download_fetches_verifies_and_unpacks(tmp_path: Path, server: str) -> None:
    import hashlib

    digest = hashlib.sha256(_RangeHandler.payload).hexdigest()
    root = tmp_path / "data" / "wiki_crop"
    dm = _dm(tmp_path, "imdb_wiki", root, subset="wiki", download=True, download_url=server, download_sha256=digest)
    dm.prepare_data()
    dm.setup("fit")
    assert (root / "wiki.mat").exists() and dm.cleaning_report.records_out == 40


def test_download_resumes_a_partial_file(tmp_path: Path, server: str) -> None:
    dest = tmp_path / "wiki_crop.tar"
    half = len(_RangeHandler.payload) // 2
    (tmp_path / "wiki_crop.tar.part").write_bytes(_RangeHandler.payload[:half])
    download(server, dest)
    assert _RangeHandler.seen_ranges == [f"bytes={half}-"]
    assert dest.read_bytes() == _RangeHandler.payload


def test_download_rejects_a_wrong_checksum(tmp_path: Path, server: str) -> None:
    with pytest.raises(DownloadError, match="SHA-256"):
        download(server, tmp_path / "x.tar", sha256="0" * 64)
    assert not (tmp_path / "x.tar").exists()


def test_download_offline_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"cannot download .*put it at"):
        download("http://127.0.0.1:9/wiki_crop.tar", tmp_path / "wiki_crop.tar", timeout=5)
