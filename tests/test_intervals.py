"""Per-face age intervals (issue 19.3): the split-conformal margin covers what it promises, the base
interval of a label distribution is its central quantiles, a stored calibration is checked before
it is used, and the interval always contains the prediction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agecls.intervals import (
    LEVELS,
    Calibration,
    CalibrationError,
    conformal_margin,
    coverage_and_width,
)
from agecls.models.losses import LOSSES, target_of
from agecls.models.module import AgeRegressor


def _model(loss: str = "dldl") -> AgeRegressor:
    torch.manual_seed(0)
    return AgeRegressor(backbone={"name": "resnet18", "source": "torchvision"}, head={"name": "small", "hidden": [16]},
                        pretrained=False, image_size=32, age_mean=33.0, age_std=19.0, age_min=1.0, age_max=90.0,
                        loss={"_target_": target_of(LOSSES[loss])}).eval()


def test_the_margin_covers_new_faces_at_the_level_asked() -> None:
    """Calibrated on 2,000 faces of a noisy predictor, the interval holds 1-3 points of the asked
    coverage on 20,000 new ones, for a point base (width 0) and a distribution base."""
    rng = np.random.default_rng(0)

    def faces(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        age = rng.uniform(1, 90, n)
        spread = rng.uniform(2, 10, n)  # some faces are harder than others
        pred = age + rng.normal(0, spread)
        return age, pred, spread

    age, pred, spread = faces(2000)
    new_age, new_pred, new_spread = faces(20000)
    point = Calibration.fit(age, {c: pred for c in LEVELS}, {c: pred for c in LEVELS}, "point")
    dist = Calibration.fit(age, {c: pred - spread for c in LEVELS}, {c: pred + spread for c in LEVELS}, "distribution")
    for c in LEVELS:
        for cal, (low, high) in ((point, (new_pred, new_pred)), (dist, (new_pred - new_spread, new_pred + new_spread))):
            lo, hi = cal.apply(low, high, c)
            covered, width = coverage_and_width(new_age, lo, hi)
            assert c - 0.01 <= covered <= c + 0.03, (cal.base, c, covered)
            assert np.all(lo <= hi) and width > 0
    # an adaptive base (wider where the model is unsure) gives narrower intervals at the same coverage
    lo_p, hi_p = point.apply(new_pred, new_pred, 0.9)
    lo_d, hi_d = dist.apply(new_pred - new_spread, new_pred + new_spread, 0.9)
    assert coverage_and_width(new_age, lo_d, hi_d)[1] < coverage_and_width(new_age, lo_p, hi_p)[1]


def test_conformal_margin_is_the_finite_sample_quantile() -> None:
    scores = np.arange(1, 11, dtype=float)  # n = 10
    assert conformal_margin(scores, 0.5) == 6.0  # ceil(11 * 0.5) = 6th smallest
    assert conformal_margin(scores, 0.9) == 10.0  # ceil(9.9) = 10th
    assert conformal_margin(scores, 0.95) == math.inf  # ceil(10.45) = 11 > n: no finite margin is valid


def test_a_coverage_it_was_not_calibrated_at_is_refused_naming_the_levels() -> None:
    cal = Calibration({"0.9": 3.0}, 100, "point")
    with pytest.raises(CalibrationError, match=r"coverage=0.8: this model is calibrated at coverage 0.9"):
        cal.margin(0.8)


@pytest.mark.parametrize(("edit", "key"), [
    (lambda d: d.update(margins={"0.9": "wide"}), r"margins\[0.9\]='wide'"),
    (lambda d: d.update(margins={"1.5": 2.0}), r"margins='1.5'"),
    (lambda d: d.update(margins={}), "margins={}"),
    (lambda d: d.update(n=0), "n=0"),
    (lambda d: d.update(base="magic"), "base='magic'"),
    (lambda d: d.update(method="bayes"), "method='bayes'"),
    (lambda d: d.update(margins={"0.9": float("nan")}), r"margins\[0.9\]=nan"),
])
def test_a_stored_calibration_is_checked_field_by_field(edit, key) -> None:
    good = Calibration({"0.9": 3.0}, 100, "point").to_dict()
    assert Calibration.from_dict(good).margin(0.9) == 3.0
    bad = dict(good)
    edit(bad)
    with pytest.raises(CalibrationError, match=key):
        Calibration.from_checkpoint({"agecls_calibration": bad}, "x.ckpt")


def test_the_base_of_a_label_distribution_is_its_central_quantiles() -> None:
    model = _model("dldl")
    net = model.net
    ages = net.loss.ages
    # a distribution putting all its mass on 30 and 31 (half each): the 90 % central interval is
    # [29.5 + 0.05 * 2, 30.5 + 0.95 * 2 - 1] = [29.6, 31.4] (each class uniform over its year)
    logits = torch.full((1, len(ages)), -1e4)
    logits[0, (ages == 30).nonzero()] = 0.0
    logits[0, (ages == 31).nonzero()] = 0.0
    raw, low, high = net.interval_from_outputs([logits], [0.9, 0.5])
    assert raw.item() == pytest.approx(30.5, abs=1e-3)
    assert low[0].tolist() == pytest.approx([29.6, 30.0], abs=1e-3)
    assert high[0].tolist() == pytest.approx([31.4, 31.0], abs=1e-3)
    # a point loss: a zero-width base at the prediction
    l1 = _model("l1").net
    raw, low, high = l1.interval_from_outputs([torch.tensor([[0.5]])], [0.9])
    assert low.item() == high.item() == raw.item() == pytest.approx(33.0 + 0.5 * 19.0)


def test_the_interval_holds_the_prediction_and_travels_in_the_checkpoint(tmp_path) -> None:
    model = _model("dldl")
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        raw, low, high = model.net.predict_interval(x, 0.9, "flip")
        assert torch.allclose(raw, model.net.predict_years(x, "flip"))
    assert torch.all(low <= raw) and torch.all(raw <= high)
    model.calibration = Calibration({"0.9": -1.0, "0.5": -3.0}, 50, "distribution")
    lo, hi = model.calibration.apply(low.numpy(), high.numpy(), 0.9, (1.0, 90.0))
    assert np.all(lo <= hi)
    # a negative margin never turns an interval inside out
    lo, hi = model.calibration.apply(np.array([10.0]), np.array([12.0]), 0.5)
    assert lo[0] == hi[0] == 11.0
    # saved with the weights and read back, checked
    ckpt = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    assert ckpt["agecls_calibration"]["margins"] == {"0.9": -1.0, "0.5": -3.0}
    back = AgeRegressor.from_checkpoint(ckpt)
    assert back.calibration == model.calibration
    ckpt["agecls_calibration"]["base"] = "nonsense"
    with pytest.raises(CalibrationError, match="base='nonsense'"):
        AgeRegressor.from_checkpoint(ckpt)


def test_an_infinite_margin_gives_the_whole_age_range_not_nan() -> None:
    cal = Calibration({"0.95": math.inf}, 5, "point")
    low, high = cal.apply(np.array([30.0]), np.array([30.0]), 0.95, (1.0, 90.0))
    assert (low[0], high[0]) == (1.0, 90.0)
