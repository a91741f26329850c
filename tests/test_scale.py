"""The scaling benchmark (issue 12): its generated IMDB-WIKI-style data set and the suite end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import open_dict
from PIL import Image

from agecls.bench_scale import COLUMNS, DIRTY_KINDS, STAGES, generate, run_scale_suite
from agecls.data.cleaning import CleaningOptions, clean_records
from agecls.data.index import build_index
from agecls.data.sources import make_source
from tests.conftest import compose_cfg


@pytest.mark.parametrize("subset", ["imdb", "wiki"])
def test_generated_mat_passes_the_source_and_cleaning_with_known_counts(tmp_path: Path, subset: str) -> None:
    folder = generate(tmp_path, 60, seed=3, subset=subset, workers=2)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["records"] == 60 and set(meta["kinds"]) == {"clean", *DIRTY_KINDS}  # one of each kind at least
    assert (folder / f"{subset}.mat").exists()
    loaded = make_source("imdb_wiki", folder, subset=subset).load()
    recs = loaded.records
    assert len(recs) == 60 and recs["identity"].notna().all()
    assert recs["identity"].str.startswith(f"{subset}:").all()
    records, report = clean_records(recs, CleaningOptions(), lambda paths: build_index(paths, None, workers=1),
                                    loaded.removed)
    expected = meta["expected_removed"]
    assert {rule: report.removed.get(rule, 0) for rule in expected} == expected
    assert sum(report.removed.values()) == sum(expected.values())  # nothing else removed
    assert report.records_out == len(records) == meta["expected_records_out"] == meta["kinds"]["clean"] - meta["kinds"]["age_conflict"]
    # crops of realistic size and content: JPEGs of varying size, a few KB each
    sizes = {Image.open(p).size for p in records["path"]}
    assert len(sizes) > 10 and all(48 <= min(s) and max(s) <= 600 for s in sizes)
    kb = pd.Series([Path(p).stat().st_size for p in records["path"]]) / 1e3
    assert 3 < kb.median() < 25
    # generated once: a second call reuses the folder
    mtime = (folder / "meta.json").stat().st_mtime_ns
    assert generate(tmp_path, 60, seed=3, subset=subset, workers=2) == folder
    assert (folder / "meta.json").stat().st_mtime_ns == mtime


def test_scale_suite_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results" / "cpu-test-scale.csv"
    cfg = compose_cfg(["suite=scale", "scale.sizes=[40,80]", f"scale.root={tmp_path / 'data'}", f"scale.output={out}",
                       "data.image_size=32", "data.batch_size=8", "scale.workers=2"],
                      tmp_path / "run", config_name="bench")
    with open_dict(cfg):
        cfg.paths.cache_dir = str(tmp_path / "unused-cache")
    table = run_scale_suite(cfg)
    assert out.exists() and out.with_suffix(".png").exists()
    csv = pd.read_csv(out)
    csv["cache_format"] = csv["cache_format"].fillna("")
    assert list(csv.columns[: len(COLUMNS)]) == COLUMNS
    assert sorted(csv["n_images"].unique()) == [40, 80] and len(csv) == len(table)
    for n in (40, 80):
        rows = csv[csv["n_images"] == n]
        got = set(zip(rows["stage"], rows["cache_format"], strict=True))
        want = {("generate", "")} | {(s, "") for s in STAGES if s not in ("cache_build", "epoch_load")}
        want |= {(s, f) for s in ("cache_build", "epoch_load") for f in ("raw", "jpeg")}
        assert got == want
        measured = rows[rows["stage"] != "generate"]
        assert (measured["seconds"] > 0).all() and (measured["peak_rss_mb"] > 0).all()
        cache = rows[rows["stage"] == "cache_build"].set_index("cache_format")["bytes_on_disk"]
        assert cache["jpeg"] < cache["raw"]
        assert (rows[rows["stage"].isin(["index", "split"])]["bytes_on_disk"] > 0).all()
        epoch = rows[rows["stage"] == "epoch_load"]
        assert (epoch["items"] > 0).all()
    # caches are removed after measuring: only the generated data sets stay
    assert not (tmp_path / "data" / "work").exists()
