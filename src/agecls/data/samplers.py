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
