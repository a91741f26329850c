"""Mixup on ages: training on convex combinations of two faces and of their ages.

Zhang et al. (2018) mix two inputs, x = lam * x_i + (1 - lam) * x_j, with lam ~ Beta(alpha, alpha),
and their labels alike. For a regression target the mixed label is the mixed age,
lam * y_i + (1 - lam) * y_j, given to whatever loss the run trains with (every agecls loss takes
fractional ages: the label-distribution losses centre their Gaussian on it, the class losses round
it). Mixing a baby with an 80-year-old gives a picture of nobody at 40, which is why plain mixup
often hurts regression; C-Mixup (Yao et al., NeurIPS 2022) draws each face's partner with
probability proportional to exp(-(y_i - y_j)^2 / (2 bandwidth^2)), so faces are mixed with faces of
nearby ages. `bandwidth` selects it (years; null = the partner drawn uniformly, Zhang et al.).

Partners are drawn within the batch and never the face itself (unlike C-Mixup's kernel over the
whole training set, which may draw the face itself: here a face whose age is alone in its batch is
mixed with its nearest batch-mate, however far), lam per face. The draws come from a generator
seeded by (seed, epoch, batch index, DDP rank), so runs with a seed repeat and resume exactly. Only
training batches are mixed; with cached backbone features (data.feature_cache) the features are mixed
instead of the pixels (mixup at the backbone's output).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agecls.utils.checks import ConfigValueError, check_number, check_seed

# keeps mixup's draws apart from those of the sampler and the augmentation, seeded from the same seed
_SALT = 0x6D697875


@dataclass(frozen=True)
class Mixup:
    """alpha: Beta(alpha, alpha) of the mixing weight (0 = off); bandwidth: C-Mixup's kernel width
    in years (None = uniform partners); prob: share of training batches mixed; seed: None = the
    process's torch seed."""

    alpha: float = 0.0
    bandwidth: float | None = None
    prob: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_number("model.mixup.alpha", self.alpha, minimum=0, why=" (0 turns mixup off; 0.2-0.4 is usual)")
        if self.bandwidth is not None:
            check_number("model.mixup.bandwidth", self.bandwidth, above=0,
                         why=" (a width in years; null draws partners uniformly)")
        check_number("model.mixup.prob", self.prob, minimum=0, maximum=1, why=" (the share of batches mixed)")
        check_seed("model.mixup.seed", self.seed, allow_none=True)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> Mixup:
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - {"alpha", "bandwidth", "prob", "seed"})
        if unknown:
            raise ConfigValueError(f"model.mixup has unknown keys {unknown}: it takes alpha, bandwidth, prob and seed")
        return cls(**cfg)

    @property
    def enabled(self) -> bool:
        return self.alpha > 0 and self.prob > 0

    def generator(self, epoch: int, batch_idx: int, rank: int = 0) -> np.random.Generator:
        """The draws of one batch of one process (`rank`: each DDP process mixes its own batch with
        its own draws). With seed None the process's torch seed is used: a run with seed=null
        repeats only if that seed is set again."""
        seed = int(torch.initial_seed()) if self.seed is None else int(self.seed)
        return np.random.default_rng(np.random.SeedSequence([seed % 2**63, int(epoch), int(batch_idx), int(rank),
                                                             _SALT]))

    def partners(self, age: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        """(B,) the index of each face's partner in the batch, never the face itself (a batch of one
        is its own partner)."""
        n = int(age.shape[0])
        if n < 2:
            return np.zeros(n, dtype=np.int64)
        if self.bandwidth is None:
            # uniform over the n - 1 others: draw among n - 1 and skip over the face itself
            j = rng.integers(0, n - 1, size=n)
            return j + (j >= np.arange(n))
        y = age.detach().double().cpu().numpy()
        logits = -((y[:, None] - y[None, :]) ** 2) / (2.0 * float(self.bandwidth) ** 2)
        np.fill_diagonal(logits, -np.inf)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        # one uniform per face against its row's cumulative distribution (inverse-CDF sampling)
        cdf = np.cumsum(p, axis=1)
        u = rng.random(n)[:, None] * cdf[:, -1:]
        return np.minimum((cdf <= u).sum(axis=1), n - 1).astype(np.int64)

    def __call__(self, inputs: torch.Tensor, age: torch.Tensor, epoch: int, batch_idx: int,
                 rank: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(mixed inputs, mixed ages, lam (B,) or None when this batch is not mixed)."""
        if not self.enabled or inputs.shape[0] < 2:
            return inputs, age, None
        if not inputs.is_floating_point():  # uint8 pixels would round every weight to 0 or 1
            raise TypeError(f"mixup mixes float inputs; got {inputs.dtype} (AgeNet.float_images converts pixels)")
        rng = self.generator(epoch, batch_idx, rank)
        if self.prob < 1 and rng.random() >= self.prob:
            return inputs, age, None
        j = torch.from_numpy(self.partners(age, rng)).to(inputs.device)
        lam = torch.from_numpy(rng.beta(self.alpha, self.alpha, size=inputs.shape[0])).to(inputs.device)
        w = lam.to(inputs.dtype).view(-1, *([1] * (inputs.dim() - 1)))
        mixed = w * inputs + (1 - w) * inputs[j]
        mixed_age = lam.to(age.dtype) * age + (1 - lam.to(age.dtype)) * age[j]
        return mixed, mixed_age, lam
