"""Issue 20's levers and measurements: the weight EMA, label-distribution smoothing, a published
test split (data.test_list), and where the model fails (MAE and counts per decade, minors
predicted adult, errors.png)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from agecls.data import AgeDataModule
from agecls.data.samplers import age_weights
from agecls.data.splits import PROTOCOLS, PROTOCOLS_DIR, read_test_list
from agecls.eval import evaluate
from agecls.train import train
from agecls.utils.callbacks import WeightEMA, weight_ema
from agecls.utils.checkpoint import read_checkpoint
from agecls.utils.checks import ConfigValueError
from agecls.utils.hydra_utils import instantiate_callbacks
from agecls.utils.outputs import metrics_by_decade
from tests.conftest import compose_cfg


# ------------------------------------------------------------------------------ weight EMA
def test_ema_is_off_by_default_and_checks_its_decay() -> None:
    cfg = compose_cfg([], Path("/tmp/unused"))
    assert not any(isinstance(cb, WeightEMA) for cb in instantiate_callbacks(cfg.callbacks))
    assert weight_ema(None) is None
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="callbacks.ema.decay"):
            weight_ema(bad)


def test_ema_run_tests_and_saves_the_average_and_keeps_the_training_weights(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("trainer.max_epochs=2", "trainer.limit_train_batches=4", "callbacks.ema.decay=0.5")
    metrics = train(cfg)
    ckpt_path = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["best_checkpoint"]
    ckpt = read_checkpoint(ckpt_path)
    current = ckpt["current_model_state"]
    assert set(current) == set(ckpt["state_dict"])
    differ = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.equal(v, current[k])]
    assert differ, "the saved average equals the training weights: no averaging happened"

    def _eval(weights: str, out: str) -> dict:
        return evaluate(compose_cfg([f"ckpt_path={ckpt_path}", "eval.num_workers=0", "trainer.accelerator=cpu",
                                     f"eval.weights={weights}", f"paths.cache_dir={cfg.paths.cache_dir}"],
                                    tmp_path / out, "eval"))

    averaged, raw = _eval("checkpoint", "avg"), _eval("current", "raw")
    # the training run's own test stage used the average (Lightning's callback would reload the raw weights)
    assert averaged["test/mae"] == pytest.approx(metrics["test/mae"], abs=1e-4)
    assert raw["test/mae"] != pytest.approx(averaged["test/mae"], abs=1e-4)
    assert raw["weights"] == "current"

    # resuming: without the average it would continue from the average; refused, naming the key
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigValueError, match="callbacks.ema.decay"):
        train(make_cfg("trainer.max_epochs=3", "trainer.limit_train_batches=4", f"ckpt_path={last}",
                       f"paths.output_dir={cfg.paths.output_dir}"))
    resumed = train(make_cfg("trainer.max_epochs=3", "trainer.limit_train_batches=4", "callbacks.ema.decay=0.5",
                             f"ckpt_path={last}", f"paths.output_dir={cfg.paths.output_dir}"))
    assert resumed["epochs"] == 3


def test_eval_weights_current_needs_an_ema_checkpoint(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg()
    train(cfg)
    ckpt_path = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["best_checkpoint"]
    with pytest.raises(ValueError, match="no current_model_state"):
        evaluate(compose_cfg([f"ckpt_path={ckpt_path}", "eval.weights=current"], tmp_path / "e", "eval"))
    with pytest.raises(ValueError, match="eval.weights='best'"):
        evaluate(compose_cfg([f"ckpt_path={ckpt_path}", "eval.weights=best"], tmp_path / "e2", "eval"))


# --------------------------------------------------------------- label-distribution smoothing
def test_lds_weights_favour_rare_ages_smoothly() -> None:
    ages = np.r_[np.full(1000, 30.0), np.full(100, 2.0), np.full(10, 80.0), np.full(10, 81.0)]
    w = age_weights(ages, "lds", sigma=2.0, power=0.5)
    assert w.mean() == pytest.approx(1.0)
    w30, w2, w80 = w[0], w[1000], w[1100]
    assert w80 > w2 > w30
    # square-root inverse: 10x rarer is about sqrt(10)x the weight (smoothing joins 80 and 81)
    assert 2.0 < w2 / w30 < 4.5
    assert w[1100] == pytest.approx(w[1110], rel=0.2)  # neighbouring years share their density
    # gentler than balanced bins, which give the 20 elders 1000/20 = 50x a 30-year-old
    b = age_weights(ages, "balanced", bin_width=5)
    assert b[1100] / b[0] == pytest.approx(50.0)
    assert w80 / w30 < b[1100] / b[0]
    assert age_weights(ages, "shuffle") is None
    with pytest.raises(ValueError, match="data.sampler='weighted'"):
        age_weights(ages, "weighted")
    with pytest.raises(ValueError, match="lds_sigma"):
        age_weights(ages, "lds", sigma=0.0)


def test_lds_sampler_draws_rare_ages_more_often(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):
        age = 20 if i < 100 else 80
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
        rows.append((f"img/{i}.jpg", age))
    pd.DataFrame(rows, columns=["path", "age"]).to_csv(tmp_path / "a.csv", index=False)
    dm = AgeDataModule(source="csv", root=str(tmp_path / "a.csv"), image_size=32, batch_size=8, num_workers=0,
                       cache_dir=str(tmp_path / "cache"), split_seed=0, splits=[1.0, 0.0, 0.0], sampler="lds")
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.epoch_fn = None
    ages = []
    for epoch in range(30):
        loader.sampler.set_epoch(epoch)
        ages += [b["age"] for b in loader]
    share = float((torch.cat(ages) == 80).float().mean())
    expected = 20 * np.sqrt(5) / (100 + 20 * np.sqrt(5))  # 5x rarer -> sqrt(5)x the weight: 0.309
    assert share == pytest.approx(expected, abs=0.04)
    with pytest.raises(ValueError, match="data.sampler='lsd'"):
        AgeDataModule(source="csv", root=str(tmp_path / "a.csv"), sampler="lsd")


# --------------------------------------------------------------------- a published test split
def _utk_folder(root: Path, ages: list[int]) -> list[str]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    names = []
    for i, age in enumerate(ages):
        name = f"{age}_{i % 2}_{i % 4}_2017011{i:010d}.jpg.chip.jpg"
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / name, quality=90)
        names.append(name)
    return names


def test_test_list_makes_exactly_the_listed_images_the_test_split(tmp_path: Path) -> None:
    ages = [21 + (i % 40) for i in range(60)]
    names = _utk_folder(tmp_path / "utk", ages)
    listed = names[:15] + ["not_here_30_0_0_x.jpg.chip.jpg"]
    pd.DataFrame({"file": listed, "age": [0] * len(listed)}).to_csv(tmp_path / "test.csv")
    dm = AgeDataModule(source="utkface", root=str(tmp_path / "utk"), image_size=32, batch_size=8, num_workers=0,
                       cache_dir=str(tmp_path / "cache"), split_seed=0, splits=[0.8, 0.2, 0.0],
                       test_list=str(tmp_path / "test.csv"), report_dir=str(tmp_path / "report"))
    dm.setup("fit")
    table = dm.split_table()
    test = {Path(p).name for p in table.loc[table["split"] == "test", "path"]}
    assert test == set(names[:15])
    rest = table[table["split"] != "test"]
    assert set(rest["split"]) == {"train", "val"} and len(rest) == 45
    cleaning = json.loads((tmp_path / "report" / "cleaning.json").read_text())
    assert cleaning["test_list"] == {"listed": 16, "found": 15}
    assert cleaning["split_version"].startswith("test-list:test.csv")
    # the split of the rest does not depend on the test list's own shares
    with pytest.raises(FileNotFoundError, match="data.test_list='nope'"):
        AgeDataModule(source="utkface", root=str(tmp_path / "utk"), test_list="nope", splits=[0.9, 0.1, 0.0],
                      cache_dir=str(tmp_path / "cache"), num_workers=0).setup("fit")


def test_the_shipped_coral_split_is_its_3287_test_crops_aged_21_to_60() -> None:
    assert "coral_utkface" in PROTOCOLS
    label, names = read_test_list("coral_utkface")
    assert len(names) == 3287 and label.startswith("coral_utkface")
    ages = np.array([int(n.split("_")[0]) for n in names])
    assert ages.min() >= 21 and ages.max() <= 60
    assert all(n.endswith(".jpg.chip.jpg") for n in names)
    assert "MIT License" in (PROTOCOLS_DIR / "LICENSE-coral-cnn").read_text()  # shipped with its licence


def test_coral_experiment_composes_to_the_21_60_protocol() -> None:
    cfg = compose_cfg(["experiment=utkface_coral"], Path("/tmp/unused"))
    assert cfg.data.test_list == "coral_utkface"
    assert (cfg.data.min_age, cfg.data.max_age) == (21, 60)
    best = compose_cfg(["experiment=utkface_best"], Path("/tmp/unused"))
    assert cfg.data.image_size == best.data.image_size and cfg.trainer.max_epochs == best.trainer.max_epochs


# ------------------------------------------------------------------------- where it fails
def test_decade_counts_and_minors_taken_for_adults() -> None:
    frame = pd.DataFrame({"age": [5, 12, 16, 17, 25, 30, 70], "predicted": [6, 19, 15, 18, 17, 33, 60]})
    m = metrics_by_decade(frame)
    assert m["n_by_decade/0-9"] == 1 and m["n_by_decade/10-19"] == 3 and m["n_by_decade/70-79"] == 1
    assert m["mae_by_decade/10-19"] == pytest.approx((7 + 1 + 1) / 3)
    assert m["test/n_minors"] == 4 and m["test/minors_predicted_adult"] == pytest.approx(2 / 4)  # 12->19, 17->18
    assert m["test/n_adults"] == 3 and m["test/adults_predicted_minor"] == pytest.approx(1 / 3)  # 25->17


def test_a_run_writes_the_errors_figure_and_the_card_lists_the_minors(make_cfg) -> None:
    cfg = make_cfg()
    train(cfg)
    run = Path(cfg.paths.output_dir)
    with Image.open(run / "errors.png") as im:
        assert im.size[0] > 500
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test/minors_predicted_adult" in metrics or metrics["test/n_minors"] == 0
    assert any(k.startswith("n_by_decade/") for k in metrics)
    card = (run / "MODEL_CARD.md").read_text()
    assert "## MAE by decade" in card and "| decade | mae | images |" in card  # counts beside each decade


# ------------------------------------------------------------------- the levers table script
def _fake_run(directory: Path, ages: np.ndarray, predicted: np.ndarray, fit_s: float,
              cfg: dict | None = None) -> Path:
    directory.mkdir(parents=True)
    if cfg is not None:
        (directory / ".hydra").mkdir()
        (directory / ".hydra" / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    pd.DataFrame({"path": [f"{i}.jpg" for i in range(len(ages))], "age": ages, "predicted": predicted}).to_csv(
        directory / "predictions.csv", index=False)
    err = np.abs(predicted - ages)
    metrics = {"test/mae": float(err.mean()), "time/fit_s": fit_s, "test/n_images": len(ages),
               **metrics_by_decade(pd.DataFrame({"age": ages, "predicted": predicted}))}
    (directory / "metrics.json").write_text(json.dumps(metrics))
    return directory


def test_levers_table_scores_an_ensemble_by_its_mean_prediction(tmp_path: Path) -> None:
    import subprocess
    import sys

    ages = np.array([5.0, 15.0, 30.0, 65.0, 70.0])
    a = _fake_run(tmp_path / "a", ages, ages + np.array([4, 4, -2, 6, -6.0]), 600)
    b = _fake_run(tmp_path / "b", ages, ages + np.array([-4, 2, 2, -6, 6.0]), 300)
    out = tmp_path / "levers.csv"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_levers.py"
    done = subprocess.run([sys.executable, str(script), "--run", f"A={a}", "--ensemble", f"A+B={a},{b}",
                           "--csv", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out).set_index("lever")
    assert table.loc["A", "mae"] == pytest.approx(4.4)
    assert table.loc["A+B", "mae"] == pytest.approx(np.mean([0, 3, 0, 0, 0]))  # errors cancel in the mean
    assert table.loc["A+B", "fit_min"] == pytest.approx(15.0)
    assert table.loc["A", "mae_60_plus"] == pytest.approx(6.0)
    assert table.loc["A", "minors_predicted_adult"] == pytest.approx(0.5)  # 15 -> 19
    c = _fake_run(tmp_path / "c", ages[:4], ages[:4], 60)
    done = subprocess.run([sys.executable, str(script), "--ensemble", f"bad={a},{c}"], capture_output=True, text=True)
    assert done.returncode != 0 and "did not predict the same test images" in done.stderr


def test_levers_spread_is_over_seeds_of_one_setting_and_refuses_mixed_settings(tmp_path: Path) -> None:
    import subprocess
    import sys

    ages = np.array([5.0, 15.0, 30.0, 65.0])
    mix = {"model": {"mixup": {"alpha": 0.4, "bandwidth": 5}}}
    runs = {f"s{s}": _fake_run(tmp_path / f"s{s}", ages, ages + e, 600, {"seed": s, **mix})
            for s, e in ((1, 1.0), (2, 2.0), (3, 4.0))}
    other = _fake_run(tmp_path / "other", ages, ages, 600, {"seed": 4, "data": {"image_size": 160}, **mix})
    light = {"enabled": True, "hflip": 0.5, "color_jitter": [0.1, 0.1, 0.1, 0.1], "rotation": None,
             "resized_crop_scale": [0.8, 1.0], "affine_translate": None, "affine_scale": None, "affine_shear": None}
    aligned = _fake_run(tmp_path / "aligned", ages, ages, 600, {"seed": 5, **mix, "data": {
        "align": True, "align_detector": "mtcnn", "augment": {**light, "rotation": 30, "affine_shear": 5}}})
    decayed = _fake_run(tmp_path / "decayed", ages, ages, 600, {"seed": 6, **mix, "data": {"augment": light},
                        "optimizer": {"_target_": "torch.optim.AdamW", "weight_decay": 0.05}})
    out = tmp_path / "levers.csv"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_levers.py"

    def _call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *args, "--csv", str(out)], capture_output=True, text=True)

    done = _call(*(a for k, d in runs.items() for a in ("--run", f"{k}={d}")))
    assert done.returncode == 0, done.stderr
    # a later call spreads rows an earlier one wrote
    done = _call("--spread", "three=s1,s2,s3")
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out).set_index("lever")
    assert table.loc["s1", "mixup"] == "alpha 0.4, C-Mixup 5 y"
    assert table.loc["three", "mae"] == pytest.approx(7 / 3)
    assert table.loc["three", "mae_sd"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert table.loc["three", "seed"] == "1,2,3" and len(table) == 4
    # what else a row records of its run: the augmentations, the alignment, the optimizer
    assert _call("--run", f"aligned={aligned}", "--run", f"decayed={decayed}").returncode == 0
    table = pd.read_csv(out).set_index("lever")
    assert table.loc["aligned", ["augment", "align", "optimizer"]].tolist() == ["hflip+jitter+rotation+crop+affine",
                                                                              "mtcnn", "unset"]
    assert table.loc["decayed", ["augment", "align", "optimizer"]].tolist() == ["hflip+jitter+crop", "none",
                                                                              "AdamW wd 0.05"]
    # an evaluation of s1's checkpoint at another centre crop (agecls.eval eval.crop_pct=0.95)
    wide = runs["s1"] / "eval_wide"
    wide.mkdir()
    (wide / "metrics.json").write_text(json.dumps({"test/mae": 0.5, "test/n_images": 4, "crop_pct": 0.95}))
    assert _call("--run", f"wide s1={wide}").returncode == 0
    table = pd.read_csv(out).set_index("lever")
    assert table.loc["s1", "crop"] == "0.875" and table.loc["wide s1", "crop"] == "0.875 (eval 0.95)"
    assert table.loc["wide s1", "fit_min"] == pytest.approx(10.0)  # the run's, two levels up
    # the mean over the two crops of one model: one fit
    (wide / "predictions.csv").write_bytes((runs["s1"] / "predictions.csv").read_bytes())
    assert _call("--ensemble", f"two crops s1={runs['s1']},{wide}").returncode == 0
    two = pd.read_csv(out).set_index("lever").loc["two crops s1"]
    assert two["fit_min"] == pytest.approx(10.0) and two["crop"] == "0.875 + 0.875 (eval 0.95)"
    # as Hydra saves it: data.crop_pct follows the backbone's
    lite1 = _fake_run(tmp_path / "lite1", ages, ages, 600, {"seed": 7, **mix, "backbone": {"crop_pct": 0.882},
                      "data": {"crop_pct": "${oc.select:backbone.crop_pct,0.875}"}})
    assert _call("--run", f"lite1={lite1}").returncode == 0
    assert pd.read_csv(out).set_index("lever").loc["lite1", "crop"] == "0.882"
    for bad, why in ((["--run", f"other={other}", "--spread", "x=s1,other"], "differ in image_size"),
                     (["--spread", "x=wide s1,s2"], "differ in crop"),
                     (["--spread", "x=aligned,decayed"], "differ in augment"),
                     (["--spread", "x=s1,s1"], "share seeds"), (["--spread", "x=s1,nope"], "no rows \\['nope'\\]")):
        done = _call(*bad)
        assert done.returncode != 0
        assert __import__("re").search(why, done.stderr), done.stderr


def test_label_distribution_tails_reports_the_far_mass_of_a_trained_model(make_cfg, tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = make_cfg("loss=dldl_v2", "trainer.max_epochs=1")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    ckpt = json.loads((run / "metrics.json").read_text())["best_checkpoint"]
    preds = pd.read_csv(run / "predictions.csv")
    out = tmp_path / "tails.csv"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "label_distribution_tails.py"
    done = subprocess.run([sys.executable, str(script), "--ckpt", ckpt, "--predictions", str(run / "predictions.csv"),
                           "--root", str(cfg.data.root or tmp_path), "--label", "tiny", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out).set_index("decade")
    assert table.loc["all", "faces"] == len(preds)
    assert ((table["peak"] > 0) & (table["peak"] <= 1)).all()
    assert ((table["far_below"] >= 0) & (table["far_below"] + table["far_above"] <= 1 + 1e-9)).all()
    assert (table["central90_width"] >= 0).all()
    # the expected age the script reads agrees with what the test stage predicted (unclipped, no TTA)
    assert table.loc["all", "mae"] == pytest.approx((preds["predicted_raw"] - preds["age"]).abs().mean(), abs=0.05)
    # interval_bases.py on the same run: its val and test faces from split.csv (paths relative to the
    # data root, images/NAME.jpg for the synthetic set), every base calibrated
    bases_out = tmp_path / "bases.csv"
    done = subprocess.run([sys.executable, str(script.with_name("interval_bases.py")), "--ckpt", ckpt, "--split",
                           str(run / "split.csv"), "--root", str(Path(preds["path"][0]).parents[1]), "--label", "tiny",
                           "--out", str(bases_out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    bases = pd.read_csv(bases_out).query("group == 'all'").set_index("base")
    assert set(bases.index) == {"central", "central50", "hpd", "point", "scaled"}
    assert (bases["faces"] == len(preds)).all()  # every test face, none of the val faces
    l1 = make_cfg("loss=l1", "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'l1'}")
    train(l1)
    l1_ckpt = json.loads((Path(l1.paths.output_dir) / "metrics.json").read_text())["best_checkpoint"]
    done = subprocess.run([sys.executable, str(script), "--ckpt", l1_ckpt, "--predictions",
                           str(run / "predictions.csv"), "--root", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and "predicts a point" in done.stderr


def test_levers_spread_reads_rows_written_before_the_mixup_column_and_refuses_ensembles(tmp_path: Path) -> None:
    import subprocess
    import sys

    ages = np.array([5.0, 15.0, 30.0, 65.0])
    a = _fake_run(tmp_path / "a", ages, ages + 1.0, 600, {"seed": 1})
    b = _fake_run(tmp_path / "b", ages, ages + 3.0, 600, {"seed": 2})
    out = tmp_path / "levers.csv"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_levers.py"

    def _call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *args, "--csv", str(out)], capture_output=True, text=True)

    assert _call("--run", f"a={a}", "--run", f"b={b}", "--ensemble", f"a+b={a},{b}").returncode == 0
    old = pd.read_csv(out)
    old.loc[old["lever"] == "a", "mixup"] = None  # a row from before the column existed
    old.to_csv(out, index=False)
    done = _call("--spread", "ab=a,b")
    assert done.returncode == 0, done.stderr
    assert pd.read_csv(out).set_index("lever").loc["ab", "mae"] == pytest.approx(2.0)
    done = _call("--spread", "bad=a,a+b")
    assert done.returncode != 0 and "no single seed" in done.stderr


def _interval_bases():
    import importlib
    import sys

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("interval_bases")


def test_interval_bases_quantiles_and_hpd_agree_with_the_model_and_a_brute_force_search() -> None:
    from agecls.models.losses import DLDLv2Loss
    from agecls.models.module import AgeNet

    ib = _interval_bases()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 101, generator=gen) * 3
    loss = DLDLv2Loss()
    net = AgeNet.__new__(AgeNet)  # only the loss is used by _base_interval
    torch.nn.Module.__init__(net)
    net.loss = loss
    _, low, high = net._base_interval(logits, [0.9])
    p = loss.distribution(logits).double().numpy()
    ages = loss.ages.double().numpy()
    assert np.allclose(ib.quantiles(p, ages, 0.05), low[:, 0].numpy(), atol=1e-3)
    assert np.allclose(ib.quantiles(p, ages, 0.95), high[:, 0].numpy(), atol=1e-3)
    # the shortest run of classes holding 0.8 of the mass, found by trying every run
    lo, hi = ib.hpd(p, ages, 0.8)
    cdf = np.concatenate([np.zeros((len(p), 1)), np.cumsum(p, axis=1)], axis=1)
    for r in range(len(p)):
        widths = [j - i for i in range(101) for j in range(i + 1, 102) if cdf[r, j] - cdf[r, i] >= 0.8 - 1e-12]
        assert hi[r] - lo[r] == pytest.approx(min(widths))
        assert p[r][int(lo[r] + 0.5):int(hi[r] + 0.5)].sum() >= 0.8 - 1e-9


def test_interval_bases_calibrated_on_a_split_cover_it_and_follow_the_spread_of_each_face() -> None:
    ib = _interval_bases()
    rng = np.random.default_rng(0)
    ages = np.arange(101, dtype=float)
    centre = rng.uniform(10, 80, 3000)
    spread = np.where(centre > 40, 8.0, 2.0)  # older faces: wider distributions, and larger errors
    age = np.clip(centre + rng.normal(0, 1, 3000) * spread, 0, 100)
    p = np.exp(-0.5 * ((ages[None, :] - centre[:, None]) / spread[:, None]) ** 2)
    p /= p.sum(1, keepdims=True)
    bases = ib.base_intervals(p, ages, 0.9)
    out = ib.calibrated(bases, bases, age, 0.9, (0.0, 100.0))
    assert set(out) == set(ib.BASES)
    for name, (low, high, _) in out.items():
        assert ((age >= low) & (age <= high)).mean() >= 0.9, name  # conformal: at least c on its own split
    young = centre <= 40
    width = {name: high - low for name, (low, high, _) in out.items()}
    # a per-face base is narrower for the faces it is surer of; the point base is one width for all
    for name in ("central", "central50", "hpd", "scaled"):
        assert width[name][young].mean() < width[name][~young].mean() - 5, name
    for name in ("central", "hpd", "scaled"):  # central50's additive margin is most of its width
        assert width[name][young].mean() < width[name][~young].mean() / 2, name
    assert np.ptp(width["point"][(centre > 15) & (centre < 85)]) < 1e-9
    table = ib.table(age, out, "fake", 0.9)
    assert set(table["base"]) == set(ib.BASES) and (table.query("group == 'all'")["faces"] == 3000).all()
