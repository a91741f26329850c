"""Mixup on ages (agecls.models.mixup, model.mixup): what is mixed with what, C-Mixup's partners
of nearby ages, seeded draws, checks of the options, and a training run that trains on mixed ages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agecls.model_card import render_model_card
from agecls.models.mixup import Mixup
from agecls.models.module import AgeRegressor
from agecls.train import train
from agecls.utils.checks import ConfigValueError, check_train_config
from tests.conftest import compose_cfg


def _ages(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(1, 90, size=n)).float()


def test_partners_are_never_the_face_itself_and_uniform_ones_reach_everyone() -> None:
    age = _ages(16)
    seen = np.zeros((16, 16), dtype=int)
    for b in range(300):
        j = Mixup(alpha=0.4).partners(age, Mixup(alpha=0.4, seed=1).generator(0, b))
        assert (j != np.arange(16)).all() and ((0 <= j) & (j < 16)).all()
        seen[np.arange(16), j] += 1
    off_diagonal = ~np.eye(16, dtype=bool)
    assert (seen[off_diagonal] > 0).all(), "uniform partners never reached some faces"
    with_bandwidth = Mixup(alpha=0.4, bandwidth=3.0)
    for b in range(50):
        assert (with_bandwidth.partners(age, with_bandwidth.generator(0, b)) != np.arange(16)).all()


def test_c_mixup_partners_are_of_nearby_ages() -> None:
    age = _ages(128)
    gaps = {}
    for name, mix in {"uniform": Mixup(alpha=0.4, seed=3), "c-mixup": Mixup(alpha=0.4, bandwidth=2.0, seed=3)}.items():
        d = [np.abs(age.numpy() - age.numpy()[mix.partners(age, mix.generator(0, b))]).mean() for b in range(20)]
        gaps[name] = float(np.mean(d))
    # 128 ages uniform over 1-90: a uniform partner is ~30 years away, one within a 2-year kernel ~2
    assert gaps["uniform"] > 20 and gaps["c-mixup"] < 4, gaps


def test_mixed_images_and_mixed_ages_are_the_same_combination() -> None:
    age = _ages(32)
    # each image is its own age in every pixel: mixing images must give the mixed age in every pixel
    images = age.view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()
    mixed, mixed_age, lam = Mixup(alpha=0.4, bandwidth=10.0, seed=5)(images, age, epoch=2, batch_idx=7)
    assert lam is not None and ((lam >= 0) & (lam <= 1)).all() and lam.std() > 0  # one weight per face
    torch.testing.assert_close(mixed, mixed_age.view(-1, 1, 1, 1).expand_as(mixed))
    assert not torch.allclose(mixed_age, age)
    # each mixed age lies between the face's age and some other face's age of the batch
    assert ((mixed_age >= age.min() - 1e-4) & (mixed_age <= age.max() + 1e-4)).all()


def test_pixels_are_mixed_as_floats() -> None:
    from agecls.models.module import AgeNet

    age = _ages(4)
    pixels = torch.full((4, 3, 2, 2), 255, dtype=torch.uint8)
    with pytest.raises(TypeError, match="float inputs"):
        Mixup(alpha=0.4)(pixels, age, 0, 0)
    mixed, _, _ = Mixup(alpha=0.4)(AgeNet.float_images(pixels), age, 0, 0)
    torch.testing.assert_close(mixed, torch.ones(4, 3, 2, 2))  # white mixed with white stays white


def test_draws_are_seeded_by_seed_epoch_and_batch() -> None:
    age, images = _ages(16), torch.rand(16, 3, 4, 4)
    a = Mixup(alpha=1.0, seed=9)(images, age, 1, 3)
    b = Mixup(alpha=1.0, seed=9)(images, age, 1, 3)
    c = Mixup(alpha=1.0, seed=9)(images, age, 1, 4)
    d = Mixup(alpha=1.0, seed=10)(images, age, 1, 3)
    other_rank = Mixup(alpha=1.0, seed=9)(images, age, 1, 3, rank=1)  # each DDP process draws its own
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[1], d[1]) and not torch.equal(a[1], other_rank[1])


def test_off_settings_leave_the_batch_alone() -> None:
    age, images = _ages(8), torch.rand(8, 3, 4, 4)
    for mix in (Mixup(), Mixup(alpha=0.4, prob=0.0)):
        out, out_age, lam = mix(images, age, 0, 0)
        assert out is images and out_age is age and lam is None
    # prob: about that share of the batches is mixed
    mixed = sum(Mixup(alpha=0.4, prob=0.3, seed=2)(images, age, 0, b)[2] is not None for b in range(400))
    assert 80 <= mixed <= 160


@pytest.mark.parametrize(("override", "match"), [
    ("model.mixup.alpha=-0.5", "model.mixup.alpha=-0.5"),
    ("model.mixup.bandwidth=0", "model.mixup.bandwidth=0"),
    ("model.mixup.prob=1.5", "model.mixup.prob=1.5"),
    ("+model.mixup.sigma=2", "unknown keys \\['sigma'\\]"),
    ("model.mixup.alpha=true", "model.mixup.alpha=True"),
    ("model.mixup.seed=1.5", "model.mixup.seed=1.5"),
])
def test_bad_mixup_options_are_refused_before_any_work(override: str, match: str, tmp_path: Path) -> None:
    cfg = compose_cfg([override], tmp_path)
    with pytest.raises(ConfigValueError, match=match):
        check_train_config(cfg)


def test_training_with_mixup_trains_on_mixed_ages_and_says_so_in_the_card(make_cfg, monkeypatch,
                                                                          tmp_path: Path) -> None:
    seen: list[torch.Tensor] = []
    original = AgeRegressor.training_loss

    def recording(self, output, age):
        if self.training:
            seen.append(age.detach().clone())
        return original(self, output, age)

    monkeypatch.setattr(AgeRegressor, "training_loss", recording)
    cfg = make_cfg("trainer.max_epochs=1", "trainer.limit_train_batches=3", "model.mixup.alpha=0.4")
    train(cfg)
    ages = torch.cat(seen)
    assert (ages != ages.round()).float().mean() > 0.5, "the loss saw whole-year ages: nothing was mixed"
    seen.clear()
    train(make_cfg("trainer.max_epochs=1", "trainer.limit_train_batches=3", f"paths.output_dir={tmp_path / 'plain'}"))
    ages = torch.cat(seen)
    assert torch.equal(ages, ages.round()), "without mixup the loss must see the labels themselves"
    card = render_model_card({"mixup": {"alpha": 0.4, "bandwidth": 5}, "loss": None}, {}, None, None)
    assert "C-Mixup, bandwidth 5 years" in card
    assert "Mixup" not in render_model_card({"mixup": {"alpha": 0.0}}, {}, None, None)
