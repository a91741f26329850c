"""Metrics by group (gender, race) and the model card written by train and eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agecls.data.sources.utkface import UTKFaceSource
from agecls.eval import evaluate
from agecls.train import train
from agecls.utils.outputs import metrics_by_group
from tests.conftest import TINY, compose_cfg, utkface_dir


def test_utkface_names_give_gender_and_race_where_they_have_them(tmp_path: Path) -> None:
    src = utkface_dir()
    names = {"25_1_2_20170116174525125.jpg.chip.jpg": ("female", "Asian"),
             "61_0_4_20170109142408075.jpg.chip.jpg": ("male", "Others"),
             "39_1_20170116174525125.jpg.chip.jpg": ("female", None),   # a real name without race
             "7_x_20170116174525125.jpg.chip.jpg": (None, None)}
    one = next(src.glob("*.jpg"))
    for name in names:
        shutil.copy(one, tmp_path / name)
    recs = UTKFaceSource(tmp_path).load().records
    recs.index = [Path(p).name for p in recs["path"]]
    for name, want in names.items():
        got = tuple(None if pd.isna(v) else v for v in recs.loc[name, ["gender", "race"]])
        assert got == want, name


def test_metrics_by_group_on_known_values() -> None:
    frame = pd.DataFrame({"age": [20.0, 30.0, 40.0, 50.0, 60.0], "predicted": [22.0, 30.0, 37.0, 50.0, 70.0]})
    got = metrics_by_group(frame, {"gender": ["female", "female", "male", None, "male"], "race": [None] * 5})
    assert got == {"test/mae_by_gender/female": 1.0, "test/n_by_gender/female": 2,
                   "test/mae_by_gender/male": 6.5, "test/n_by_gender/male": 2,
                   "test/mae_by_gender/unknown": 0.0, "test/n_by_gender/unknown": 1}


@pytest.fixture(scope="module")
def utk_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    base = tmp_path_factory.mktemp("groups")
    root = base / "utk"
    root.mkdir()
    for f in sorted(utkface_dir().glob("*.jpg"))[::100][:200]:
        shutil.copy(f, root / f.name)
    cfg = compose_cfg([*TINY, "data=utkface", f"data.root={root}", "data.cache=false", "trainer.limit_test_batches=null",
                       f"paths.cache_dir={cache_dir}"], base / "run")
    return {"metrics": train(cfg), "dir": base / "run", "root": root, "base": base, "cache_dir": cache_dir}


def test_training_reports_mae_by_gender_and_race_with_counts(utk_run: dict) -> None:
    metrics, run = utk_run["metrics"], utk_run["dir"]
    saved = json.loads((run / "metrics.json").read_text())
    preds = pd.read_csv(run / "predictions.csv")
    names = preds["path"].map(lambda p: Path(p).name)
    gender = names.str.split("_").str[1].map({"0": "male", "1": "female"})
    for g in ("female", "male"):
        mask = (gender == g).to_numpy()
        assert saved[f"test/n_by_gender/{g}"] == int(mask.sum()) > 0
        err = (preds["predicted"] - preds["age"]).abs().to_numpy()[mask].mean()
        assert saved[f"test/mae_by_gender/{g}"] == pytest.approx(err, abs=1e-6)
    races = [k for k in saved if k.startswith("test/n_by_race/")]
    assert len(races) >= 3 and sum(saved[k] for k in races) == metrics["test/n_images"] == len(preds)
    # TensorBoard gets them at the final step
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert "test/mae_by_gender/female" in acc.Tags()["scalars"]
    # the model card names them
    card = (run / "MODEL_CARD.md").read_text()
    assert "MAE by gender" in card and "MAE by race" in card and "female" in card
    assert "## Intended use" in card and "utkface" in card.lower()


def test_eval_writes_groups_and_a_model_card(utk_run: dict) -> None:
    ckpt = utk_run["metrics"]["best_checkpoint"]
    cfg = compose_cfg([f"ckpt_path={ckpt}", "eval.num_workers=0", f"paths.cache_dir={utk_run['cache_dir']}"],
                      utk_run["base"] / "eval", "eval")
    metrics = evaluate(cfg)
    train_metrics = json.loads((utk_run["dir"] / "metrics.json").read_text())
    for key in [k for k in train_metrics if k.startswith("test/mae_by_gender/")]:
        assert np.isclose(metrics[key], train_metrics[key], atol=1e-4), key
    assert "MAE by race" in (utk_run["base"] / "eval" / "MODEL_CARD.md").read_text()
