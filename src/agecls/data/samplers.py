"""Training samplers whose order and augmentation depend only on (seed, epoch).

A resumed run must draw exactly what an uninterrupted one would have drawn. Torch's default
RandomSampler and the DataLoader workers' seeds come from the global RNG at the moment an
iterator is created, which differs after a restart, and persistent workers carry their RNG state
across epochs. Here the permutation of epoch e is drawn from a generator seeded with (seed, e),
and each index the sampler yields also carries the epoch (`epoch * len + i`), so the dataset can
seed every sample's augmentation with (seed, epoch, i): the same images, in the same order, with
the same augmentation, whatever the number of workers and however often the run was restarted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

# The third seed word of the order's generator: an index no sample has.
ORDER_STREAM = 2**32 - 1


def encode(epoch: int, index: int, length: int) -> int:
    return epoch * length + index


def decode(key: int, length: int) -> tuple[int, int]:
    """(epoch, index) of a key yielded by EpochSampler (plain indices decode to epoch 0)."""
    return divmod(int(key), length)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


SAMPLERS = ("shuffle", "balanced", "lds")


def age_weights(ages: Sequence[float], sampler: str, bin_width: float = 5.0, sigma: float = 2.0,
                power: float = 0.5) -> np.ndarray | None:
    """Per-image draw weights of a training sampler (None: shuffle, every image once an epoch).

    balanced: 1 / (images in its `bin_width`-year age bin): every bin equally often.
    lds: label-distribution smoothing (Yang et al., "Delving into Deep Imbalanced Regression",
    ICML 2021): the density of ages in whole years, smoothed with a Gaussian of `sigma` years, to
    the power -`power` (0.5: the paper's square-root inverse), so rare ages - babies, elders - are
    drawn more often without the noise of a raw per-year count. Weights are scaled to mean 1.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"data.sampler={sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler == "shuffle":
        return None
    ages = np.asarray(ages, dtype=np.float64)
    if sampler == "balanced":
        bins = np.floor(ages / float(bin_width)).astype(int)
        counts = np.bincount(bins - bins.min())
        weights = 1.0 / counts[bins - bins.min()]
    else:
        if not (sigma > 0 and power > 0):
            raise ValueError(f"data.lds_sigma={sigma!r}, data.lds_power={power!r}; both must be above 0 "
                             "(e.g. 2 years and 0.5)")
        years = np.rint(ages).astype(int)
        low = years.min()
        counts = np.bincount(years - low).astype(np.float64)
        radius = int(np.ceil(3 * sigma))
        offsets = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        density = np.convolve(np.pad(counts, radius), kernel / kernel.sum(), mode="valid")
        weights = density[years - low] ** -float(power)
    return weights / weights.mean()


class EpochSampler(Sampler[int]):
    """Shuffle (or draw with replacement by `weights`) with a generator seeded by (seed, epoch).

    The epoch comes from `epoch_fn` when given (the trainer's current epoch, right even when
    Lightning creates the iterator before it calls `set_epoch` on a resumed run), else from
    `set_epoch`.
    """

    def __init__(
        self,
        length: int,
        seed: int,
        weights: Sequence[float] | None = None,
        num_samples: int | None = None,
        epoch_fn: Callable[[], int] | None = None,
    ) -> None:
        self.length = int(length)
        self.seed = int(seed)
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self.num_samples = int(num_samples) if num_samples is not None else self.length
        self.epoch_fn = epoch_fn
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def current_epoch(self) -> int:
        return int(self.epoch_fn()) if self.epoch_fn is not None else self.epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        epoch = self.current_epoch()
        g = torch.Generator()
        g.manual_seed(sample_seed(self.seed, epoch, ORDER_STREAM))
        if self.weights is None:
            order = torch.randperm(self.length, generator=g)
        else:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        for i in order.tolist():
            yield encode(epoch, i, self.length)
