"""What every input pipeline provides: the one interface AgeDataModule and agecls.bench use.

A pipeline turns the prepared records (cleaned, split; one row per image) into the datasets of
each split and says how their batches are loaded and finished on the device:

    build(records)        the one-off work over all records (a cache build); called once per
                          machine before the datasets, under a file lock (several processes, one cache)
    datasets(parts)       {"train": Dataset, "val": ..., "test": ...} from each split's records
    workers               DataLoader worker processes its datasets want
    before_transfer(b)    on the host, before the batch moves to the device (e.g. GPU JPEG decode)
    on_device(b, train)   on the device: the per-sample augmentation, or the evaluation crop

The DataModule reads as source -> clean -> split -> pipeline; a new pipeline is one new module
here with a subclass of `Pipeline`, and one line in `agecls.data.pipelines.PIPELINES`.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
from torch.utils.data import Dataset

from agecls.data.transforms import eval_resize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineOptions:
    """The data options a pipeline needs (from `conf/data/*.yaml`, via AgeDataModule)."""

    image_size: int
    crop_pct: float
    augment: Mapping[str, Any] | None
    seed: int
    face_margin: float = 0.0
    cache_dir: str | None = None
    num_workers: int = 0            # DataLoader workers of the per-sample and jpeg pipelines; cache builds
    cache_num_workers: int = 0      # DataLoader workers of the raw cache (it only gathers rows)
    check_images: bool = True       # files were decoded when indexed (for error messages)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def cache_side(self) -> int:
        """Side of cached images: the evaluation resize, which leaves the random crop its margin."""
        return eval_resize(int(self.image_size), float(self.crop_pct))

    @property
    def augment_enabled(self) -> bool:
        return bool(self.augment) and bool(self.augment.get("enabled", True))


class Pipeline:
    """Base class: per-split datasets from records, and the batch steps around the transfer."""

    name: ClassVar[str] = ""

    def __init__(self, options: PipelineOptions) -> None:
        self.options = options

    def build(self, records: pd.DataFrame) -> None:
        """The one-off work on all prepared records (row i of a cache is records row i). Nothing by default."""

    def datasets(self, records: pd.DataFrame, parts: Mapping[str, pd.DataFrame]) -> dict[str, Dataset]:
        """The dataset of each split in `parts` (subsets of `records`, which `build` saw)."""
        raise NotImplementedError

    def eval_view(self, records: pd.DataFrame, part: pd.DataFrame, dataset: Dataset) -> Dataset:
        """`dataset` (of `part`) as evaluation sees it: no augmentation (for computing features)."""
        return dataset

    @property
    def workers(self) -> int:
        return int(self.options.num_workers)

    def loader_ready(self, dataset: Dataset, device: torch.device | None) -> None:
        """Last settings before a loader is made for `dataset` on `device` (None: no trainer)."""

    def before_transfer(self, batch: Any, device: torch.device) -> Any:
        return batch

    def on_device(self, batch: Any, training: bool) -> Any:
        return batch

    def describe(self) -> str:
        return self.name


@contextmanager
def build_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder/.build.lock` (fcntl, works across processes and, on most
    shared file systems, across machines): one process builds a cache, the others wait for it and
    then find it built. Logs when it has to wait, and for how long."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process to finish building the %s in %s ...", what, folder)
            t0 = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            log.info("Waited %.1f s for the %s", time.perf_counter() - t0, what)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
