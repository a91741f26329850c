"""Test-time choices: augmentation (tta=flip, the mean of the predictions on each image and on its
horizontal flip) in the test stage of training and in agecls.eval, and agecls.eval's centre crop
(eval.crop_pct); each recorded in metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agecls.eval import evaluate, load_checkpoint
from agecls.train import build_model, train
from agecls.utils.checks import ConfigValueError, check_tta
from tests.conftest import compose_cfg


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


def test_flip_tta_is_the_mean_of_the_two_passes(make_cfg) -> None:
    model = build_model(make_cfg()).eval()  # resnet18 + the small head, random weights
    net, x = model.net, _images()
    with torch.no_grad():
        plain, flipped = net(x), net(torch.flip(x, dims=[3]))
        assert not torch.allclose(plain, flipped), "a flip must change this model's prediction"
        torch.testing.assert_close(net.predict_years(x, "flip"), (plain + flipped) / 2)
        torch.testing.assert_close(net.predict_years(x, "flip", plain=plain), (plain + flipped) / 2)
        torch.testing.assert_close(net.predict_years(x, "none"), plain)
        torch.testing.assert_close(net.predict_years(x), plain)


def test_the_test_step_records_the_flip_mean(make_cfg) -> None:
    model = build_model(make_cfg()).eval()
    x = _images()
    batch = {"image": x, "age": torch.tensor([10.0, 30.0, 50.0, 70.0]), "index": torch.arange(4)}
    model.tta = "flip"
    with torch.no_grad(), pytest.warns(UserWarning, match="self.log"):  # no trainer: logging is skipped
        model.test_step(batch, 0)
        expected = (model.net(x) + model.net(torch.flip(x, dims=[3]))) / 2
    out = model._test_outputs[-1]
    torch.testing.assert_close(out["raw"], expected.float())
    torch.testing.assert_close(out["pred"], model.net.clip(expected).float())
    # cached features cannot be flipped: a clear error, not a silent plain prediction
    with pytest.raises(RuntimeError, match=r"tta=flip needs the test images.*agecls.eval ckpt_path=PATH tta=flip"):
        model.test_step({"features": model.net.features(x), "age": batch["age"], "index": batch["index"]}, 0)


@pytest.mark.parametrize("bad", ["mirror", True, None, 1])
def test_tta_values_are_checked_with_what_to_choose(bad) -> None:
    with pytest.raises(ConfigValueError, match=r"tta=.*choose one of none, flip"):
        check_tta(bad)
    assert check_tta("flip") == "flip" and check_tta("none") == "none"


def test_train_with_tta_flip_then_eval_with_and_without_it(make_cfg, tmp_path: Path, cache_dir: Path) -> None:
    """The tiny synthetic run tests with tta=flip; eval of its checkpoint with tta=flip reproduces its
    test metrics, tta=none gives others; each metrics.json says which."""
    metrics = train(make_cfg("tta=flip", "data.augment.compile=false", f"paths.output_dir={tmp_path / 'run'}"))
    assert metrics["tta"] == "flip"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["tta"] == "flip"
    ckpt = metrics["best_checkpoint"]
    assert ckpt and load_checkpoint(ckpt)[0].tta == "none", "a checkpoint does not carry tta"

    def _eval(tta: str) -> dict:
        out = tmp_path / f"eval-{tta}"
        cfg = compose_cfg([f"ckpt_path={ckpt}", f"tta={tta}", f"paths.cache_dir={cache_dir}", "eval.num_workers=0",
                           "trainer.accelerator=cpu"], out, config_name="eval")
        result = evaluate(cfg)
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["tta"] == tta and saved["test/mae"] == pytest.approx(result["test/mae"])
        return result

    flip, plain = _eval("flip"), _eval("none")
    assert flip["test/mae"] == pytest.approx(metrics["test/mae"], abs=1e-5)
    assert flip["test/n_images"] == plain["test/n_images"]
    assert flip["test/mae"] != pytest.approx(plain["test/mae"], abs=1e-6)


def test_eval_refuses_a_bad_tta_before_reading_the_checkpoint(tmp_path: Path) -> None:
    cfg = compose_cfg([f"ckpt_path={tmp_path / 'missing.ckpt'}", "tta=both"], tmp_path / "eval", config_name="eval")
    with pytest.raises(ConfigValueError, match=r"tta='both': choose one of none, flip"):
        evaluate(cfg)


def test_eval_crop_pct_evaluates_the_same_weights_at_another_centre_crop(make_cfg, tmp_path: Path,
                                                                         cache_dir: Path) -> None:
    """eval.crop_pct replaces the model's centre crop in evaluation only: the images are resized to
    image_size / crop_pct before the crop, so the predictions move; null gives the training run's
    own test metrics back; metrics.json and the model card say which crop was used."""
    metrics = train(make_cfg("data.augment.compile=false", f"paths.output_dir={tmp_path / 'run'}"))
    ckpt = metrics["best_checkpoint"]
    model_crop = float(load_checkpoint(ckpt)[0].hparams.crop_pct)

    def _eval(name: str, *extra: str) -> dict:
        out = tmp_path / name
        cfg = compose_cfg([f"ckpt_path={ckpt}", f"paths.cache_dir={cache_dir}", "eval.num_workers=0",
                           "trainer.accelerator=cpu", *extra], out, config_name="eval")
        result = evaluate(cfg)
        assert json.loads((out / "metrics.json").read_text())["crop_pct"] == pytest.approx(result["crop_pct"])
        return result

    own, wide = _eval("own"), _eval("wide", "eval.crop_pct=1.0")
    assert own["crop_pct"] == pytest.approx(model_crop) and model_crop < 1.0
    assert own["test/mae"] == pytest.approx(metrics["test/mae"], abs=1e-5)
    assert wide["crop_pct"] == 1.0 and wide["test/n_images"] == own["test/n_images"]
    assert wide["test/mae"] != pytest.approx(own["test/mae"], abs=1e-6)
    assert "at centre crop 1 (eval.crop_pct" in (tmp_path / "wide" / "MODEL_CARD.md").read_text()


@pytest.mark.parametrize("bad", [0, 1.5, "wide"])
def test_eval_refuses_a_bad_crop_before_reading_the_checkpoint(tmp_path: Path, bad) -> None:
    cfg = compose_cfg([f"ckpt_path={tmp_path / 'missing.ckpt'}", f"eval.crop_pct={bad}"], tmp_path / "eval",
                      config_name="eval")
    with pytest.raises(ConfigValueError, match=r"eval.crop_pct=.*must be a number"):
        evaluate(cfg)
