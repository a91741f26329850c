"""The LightningDataModule: source -> cleaning -> seeded split -> input pipeline -> loaders.

The pipelines (per-sample, cached raw, cached jpeg, cached features) live in agecls.data.pipelines
behind one interface; this module only chooses one and hands it the split records."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from agecls.data.cleaning import CleaningOptions, CleaningReport, age_histogram, clean_records
from agecls.data.index import build_index, check_verify, index_file_for
from agecls.data.jpeg_cache import JpegCache
from agecls.data.pipelines import FeaturePipeline, Pipeline, PipelineOptions, make_pipeline
from agecls.data.pixel_cache import PixelCache
from agecls.data.samplers import EpochSampler, age_weights
from agecls.data.sources import Source, make_source
from agecls.data.sources.base import GROUP_COLUMNS
from agecls.data.splits import (
    NO_SHA1,
    SPLIT_VERSION,
    SPLITS,
    SplitMembershipError,
    assign_splits,
    assign_with_test_list,
    decode_membership,
    encode_membership,
    read_split_file,
    read_test_list,
    relative_paths,
)
from agecls.data.transforms import DEFAULT_CROP_PCT
from agecls.utils.checks import check_data_options, fail
from agecls.utils.files import write_bytes_keeping_previous

log = logging.getLogger(__name__)


class EmptyDatasetError(RuntimeError):
    """Nothing was left after cleaning."""


def source_for(source: str, root: str, split_seed: int, options: Mapping[str, Any]) -> Source:
    """The data source a data config names: `options` are the keys AgeDataModule does not take
    itself; a synthetic data set is generated with the split seed unless it names its own."""
    opts = dict(options)
    if source == "synthetic":
        opts.setdefault("seed", split_seed)
    return make_source(source, root, **opts)


def describe_data(cfg_data: Mapping[str, Any]) -> str:
    """The data set a data config (cfg.data, conf/data/*.yaml) names, in words, for the console's
    first line: "data: UTKFace, 20,709 faces from /path", "data: 2,000 generated (synthetic) faces in
    <cache dir>/synthetic/...; not real photos". Cheap (a folder listing at most). Raises
    ConfigValueError where the config cannot work (a synthetic data.root that holds photos)."""
    if OmegaConf.is_config(cfg_data):
        cfg_data = OmegaConf.to_container(cfg_data, resolve=True, throw_on_missing=False)
    if cfg_data.get("root") in (None, "???", ""):
        fail("data.root", cfg_data.get("root"), f"is required with data={cfg_data.get('source')}: give "
                                                "data.root=<the data set's folder, or the CSV file for data=csv>")
    own = set(inspect.signature(AgeDataModule.__init__).parameters)
    options = {k: v for k, v in cfg_data.items() if k not in own and k != "_target_"}
    return source_for(str(cfg_data["source"]), str(cfg_data["root"]), cfg_data.get("split_seed", 0), options).describe()


@dataclass
class PreparedData:
    records: pd.DataFrame          # cleaned records with a `split` column
    report: CleaningReport
    relative_to: Path              # folder that split.csv paths are relative to


class AgeDataModule(L.LightningDataModule):
    """Reads a data set through its source, cleans, de-duplicates and splits it, and serves
    train/val/test loaders with the study's augmentation on the training split.

    Everything in `data/*.yaml` arrives here as a keyword argument; options this class does not
    name (a source's own, such as `subset` or `num_samples`) are passed to the source.
    """

    def __init__(
        self,
        source: str,
        root: str,
        image_size: int = 128,
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool | str = "auto",
        persistent_workers: bool = True,
        splits: Sequence[float] = (0.8, 0.1, 0.1),
        split_seed: int = 0,
        split_file: str | None = None,
        test_list: str | None = None,
        age_bin_width: float = 5.0,
        sampler: str = "shuffle",
        lds_sigma: float = 2.0,
        lds_power: float = 0.5,
        min_face_score: float = 1.0,
        min_age: float = 0.0,
        max_age: float = 100.0,
        deduplicate: bool = True,
        check_images: bool = True,
        verify: str = "stat",
        cache_dir: str | None = None,
        crop_pct: float = DEFAULT_CROP_PCT,
        augment: Mapping[str, Any] | None = None,
        report_dir: str | None = None,
        test_on: str = "test",
        face_margin: float = 0.0,
        align: bool = False,
        align_detector: str = "mtcnn",
        seed: int | None = None,
        cache: bool = False,
        cache_num_workers: int = 0,
        cache_format: str = "raw",
        cache_memory_budget_gb: float = 8.0,
        feature_cache: bool = False,
        **source_options: Any,
    ) -> None:
        super().__init__()
        # Plain lists and dicts (not OmegaConf nodes): they are pickled into checkpoints, which
        # torch.load(weights_only=True) must be able to read.
        splits = check_data_options(image_size=image_size, batch_size=batch_size, splits=splits,
                                    num_workers=num_workers, cache_num_workers=cache_num_workers, cache_format=cache_format,
                                    cache_memory_budget_gb=cache_memory_budget_gb, min_age=min_age,
                                    max_age=max_age, age_bin_width=age_bin_width, crop_pct=crop_pct,
                                    augment=augment, seed=seed, split_seed=split_seed)
        augment = OmegaConf.to_container(augment, resolve=True) if OmegaConf.is_config(augment) else augment
        source_options = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                          for k, v in source_options.items()}
        check_verify(verify)
        age_weights([30.0], sampler, age_bin_width, lds_sigma, lds_power)  # names a bad sampler before any work
        if test_on not in (*SPLITS, "all"):
            raise ValueError(f"test split {test_on!r}; choose one of {', '.join((*SPLITS, 'all'))}")
        if seed is None:  # still one fixed seed per run, so order and augmentation are consistent
            seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
            log.info("data.seed not set; drew %d", seed)
        self.save_hyperparameters(logger=False)
        self.source_options = dict(source_options)
        self.make_source()  # its options and root are checked now (a synthetic root holding photos), before any work
        self.face_margin = float(face_margin)  # used where a source gives face boxes
        self._prepared: PreparedData | None = None
        self._saved_split: tuple[str, dict[str, bytes], bool] | None = None  # use_saved_split
        self.saved_membership: dict[str, Any] | None = None  # a checkpoint's, from load_state_dict
        self.membership_check: dict[str, int] | None = None  # how use_saved_split went
        self._membership_state: dict[str, Any] | None = None  # state_dict, computed once
        self._reports_written = False
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.data_test: Dataset | None = None
        self.pipeline: Pipeline | None = None  # chosen once the records are known (_pipeline)
        self._feature_extractor: tuple[Callable[[torch.Tensor], torch.Tensor], torch.device, str] | None = None

    # ---------------------------------------------------------------------------------- building
    def make_source(self) -> Source:
        return source_for(self.hparams.source, self.hparams.root, self.hparams.split_seed, self.source_options)

    def _index_fn(self, source: Source):
        hp = self.hparams
        cache_file = index_file_for(hp.cache_dir, source.root, source.name) if hp.cache_dir else None
        workers = max(1, int(hp.num_workers)) if hp.num_workers else 1

        def index(paths: list[str]) -> pd.DataFrame:
            return build_index(paths, cache_file, decode=bool(hp.check_images), workers=workers,
                               verify=hp.get("verify", "stat"))

        return index

    def prepare_data(self) -> None:
        """Download or generate the data, build the image index and the pipeline's one-off work (the
        preprocessing cache with data.cache). Lightning calls this on local rank 0 of each machine;
        the build takes a file lock, so machines sharing the cache folder build it once too."""
        source = self.make_source()
        source.prepare()
        records = self._prepare(source).records
        self._pipeline().build(records)

    def pipeline_options(self) -> PipelineOptions:
        hp = self.hparams
        return PipelineOptions(
            image_size=int(hp.image_size), crop_pct=float(hp.crop_pct), augment=hp.augment, seed=int(hp.seed),
            face_margin=self.face_margin, cache_dir=hp.cache_dir, num_workers=int(hp.num_workers),
            cache_num_workers=int(hp.cache_num_workers), check_images=bool(hp.check_images),
            extra={"verify": str(hp.get("verify", "stat"))},  # how the caches are checked when reused
        )

    def make_pipeline(self, name: str) -> Pipeline:
        """The input pipeline `name` (agecls.data.pipelines.PIPELINES, or auto) with this module's
        options: what the DataModule serves, and what agecls.bench measures."""
        hp = self.hparams
        return make_pipeline(name, self.pipeline_options(), len(self._prepare().records),
                             float(hp.get("cache_memory_budget_gb", 8.0)))

    def _pipeline(self) -> Pipeline:
        """The one place that chooses the pipeline: per-sample, or the data.cache_format cache (auto
        picks by data.cache_memory_budget_gb); wrapped by the feature cache when one is attached."""
        if self.pipeline is None:
            hp = self.hparams
            pipeline = self.make_pipeline(str(hp.get("cache_format", "raw")) if hp.cache else "per_sample")
            if self._feature_extractor is not None:
                extract, device, weights_key = self._feature_extractor
                pipeline = FeaturePipeline(pipeline, extract, device, weights_key, int(hp.batch_size), str(hp.test_on))
            self.pipeline = pipeline
            log.info("Input pipeline: %s", pipeline.name if not isinstance(pipeline, FeaturePipeline)
                     else f"features over {pipeline.images.name}")
        return self.pipeline

    @property
    def cache_side(self) -> int:
        """Side of the cached images: the evaluation resize, which leaves the random crop its margin."""
        return self.pipeline_options().cache_side

    @property
    def pixel_cache(self) -> PixelCache | JpegCache | None:
        """The preprocessing cache the pipeline reads (data.cache=true), once built."""
        pipeline = self.pipeline.images if isinstance(self.pipeline, FeaturePipeline) else self.pipeline
        return getattr(pipeline, "cache", None)

    @property
    def records(self) -> pd.DataFrame:
        """The prepared records: cleaned, one row per image, with their `split`."""
        return self._prepare().records

    def _prepare(self, source: Source | None = None) -> PreparedData:
        if self._prepared is not None:
            return self._prepared
        hp = self.hparams
        source = source or self.make_source()
        loaded = source.load()
        opts = CleaningOptions(
            min_face_score=hp.min_face_score,
            min_age=hp.min_age,
            max_age=hp.max_age,
            check_images=hp.check_images,
            deduplicate=hp.deduplicate,
        )
        records, report = clean_records(loaded.records, opts, self._index_fn(source), loaded.removed)
        if hp.get("align", False) and len(records):
            # detect and align each photo's face once (cached): agecls.data.align
            from agecls.data.align import add_alignment

            records = add_alignment(records, str(hp.get("align_detector", "mtcnn")), hp.cache_dir,
                                    workers=max(1, int(hp.num_workers)))
        if len(records) == 0:
            counts = ", ".join(f"{k}: {v}" for k, v in report.removed.items()) or "none"
            raise EmptyDatasetError(
                f"No usable images in data.root={str(source.root)!r} (source {source.name}): "
                f"{report.records_in} records found, all removed by cleaning ({counts}). "
                "Check data.root, or loosen data.min_face_score / data.min_age / data.max_age."
            )
        rel = source.relative_to
        if self._saved_split is not None:
            records = self._apply_saved_split(records, rel, report)
            report.split_version = "checkpoint"
        elif hp.split_file:
            records = self._apply_split_file(records, rel, report)
            report.split_version = f"file:{hp.split_file}"
        elif hp.get("test_list"):
            label, names = read_test_list(hp.test_list)
            split = assign_with_test_list(records, names, hp.splits, hp.split_seed,
                                          keys=relative_paths(records["path"], rel))
            found = int((split == "test").sum())
            report.split_version = f"test-list:{label}+hash-v{SPLIT_VERSION}"
            report.test_list = {"listed": len(names), "found": found}
            if found < len(names):
                log.warning("data.test_list=%s lists %d images; %d of them are in data.root (after cleaning) and form "
                            "the test split", hp.test_list, len(names), found)
            records = records.assign(split=split)
        else:
            report.split_version = f"hash-v{SPLIT_VERSION}"
            records = records.assign(split=assign_splits(records, hp.splits, hp.split_seed,
                                                         keys=relative_paths(records["path"], rel)))
        report.splits = {s: int((records["split"] == s).sum()) for s in SPLITS}
        self._prepared = PreparedData(records, report, rel)
        return self._prepared

    @staticmethod
    def _split_by_paths(records: pd.DataFrame, rel: Path, mapping: Mapping[str, str]) -> tuple[pd.DataFrame, int, list[str]]:
        """The records whose path relative to `rel` is in `mapping` (path -> split), with that split
        (a `_key` column holds the relative path); how many records it left out; and the mapping's
        paths that are not among the records, sorted."""
        keys = np.asarray(relative_paths(records["path"], rel), dtype=object)
        split = np.array([mapping.get(k) for k in keys], dtype=object)
        absent = np.array([s is None for s in split], dtype=bool)
        missing = sorted(set(mapping) - set(keys.tolist()))
        kept = records.assign(split=split, _key=keys)[~absent].reset_index(drop=True)
        return kept, int(absent.sum()), missing

    def _apply_split_file(self, records: pd.DataFrame, rel: Path, report: CleaningReport) -> pd.DataFrame:
        table = read_split_file(self.hparams.split_file)
        mapping = dict(zip(table["path"], table["split"], strict=True))
        records, absent, missing = self._split_by_paths(records, rel, mapping)
        if absent:
            log.warning("%d cleaned records are not in split file %s and are left out", absent, self.hparams.split_file)
            report.removed["not_in_split_file"] = absent
        if missing:
            log.warning("%d paths of split file %s are not among the cleaned records", len(missing), self.hparams.split_file)
        records = records.drop(columns=["_key"])
        report.records_out = len(records)
        return records

    # ------------------------------------------------------------------------- saved membership
    def state_dict(self) -> dict[str, Any]:
        """Saved by Lightning in every checkpoint (under "AgeDataModule"): the split membership,
        each image by its path relative to the data root and its content hash (encode_membership),
        so that a checkpoint can later be evaluated on exactly the images it was tested on."""
        if self._prepared is None or self._saved_split is not None:
            return {}
        if self._membership_state is None:  # the records do not change within a run
            self._membership_state = {"split_membership": encode_membership(self.split_table())}
        return self._membership_state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's split membership (Lightning calls this on resume and when testing a
        checkpoint); it changes nothing by itself: use_saved_split selects by it."""
        self.saved_membership = state_dict.get("split_membership")

    def use_saved_split(self, membership: Mapping[str, Any], split: str, allow_changed: bool = False) -> None:
        """Serve exactly the images that were in `split` when `membership` (a checkpoint's, from
        state_dict) was saved, as that split; call before prepare_data/setup.

        Each saved image is looked up by its relative path among the cleaned records and its sha1
        is compared with the saved one. If any are missing or changed, preparing the data raises
        SplitMembershipError naming how many and which; with `allow_changed` it logs a warning and
        keeps the unchanged ones. `membership_check` then holds the counts.
        """
        if self._prepared is not None:
            raise RuntimeError("use_saved_split must be called before the data are prepared")
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: a saved membership has {', '.join(SPLITS)}")
        self._saved_split = (split, decode_membership(membership, split), bool(allow_changed))

    def _apply_saved_split(self, records: pd.DataFrame, rel: Path, report: CleaningReport) -> pd.DataFrame:
        split, saved, allow_changed = self._saved_split
        records, absent, missing = self._split_by_paths(records, rel, dict.fromkeys(saved, split))
        report.removed["not_in_saved_split"] = absent
        now = records["sha1"].fillna("").astype(str) if "sha1" in records.columns else pd.Series([""] * len(records))
        known = np.array([saved[k] != NO_SHA1 and len(h) == 40 for k, h in zip(records["_key"], now, strict=True)], dtype=bool)
        changed_mask = known & np.array([len(h) == 40 and bytes.fromhex(h) != saved[k]
                                         for k, h in zip(records["_key"], now, strict=True)], dtype=bool)
        changed = sorted(records.loc[changed_mask, "_key"])
        records = records[~changed_mask].drop(columns=["_key"]).reset_index(drop=True)
        self.membership_check = {"saved": len(saved), "evaluated": len(records), "missing": len(missing),
                                 "changed": len(changed), "unverified": int((~known).sum())}
        if self.membership_check["unverified"]:
            log.warning("%d images of the checkpoint's %s split have no content hash (data.check_images and "
                        "data.deduplicate off): their paths were checked, not their content",
                        self.membership_check["unverified"], split)
        root = self.hparams.root
        if missing or changed:
            shown = "; ".join(f"{what}: {', '.join(paths[:5])}{', ...' if len(paths) > 5 else ''}"
                              for what, paths in (("missing", missing), ("changed", changed)) if paths)
            counts = (f"{len(missing)} missing (no longer among the cleaned records: deleted, renamed, unreadable, "
                      f"filtered out or now a duplicate) and {len(changed)} changed (different content: sha1 differs)")
            if not allow_changed or len(records) == 0:
                remedy = (f"add eval.allow_changed=true to evaluate only the {len(records)} unchanged images" if len(records)
                          else "none is left unchanged to evaluate")
                raise SplitMembershipError(
                    f"The checkpoint's {split} split ({len(saved)} images) no longer matches data.root={root!r}: "
                    f"{counts}. {shown}. Evaluating now would test on a different set of images. Restore those "
                    f"files, or {remedy}."
                )
            log.warning("Evaluating %d of the %d images of the checkpoint's %s split (eval.allow_changed=true): %s. %s",
                        len(records), len(saved), split, counts, shown)
            report.removed["changed_since_checkpoint"] = len(changed)
        else:
            log.info("The checkpoint's %s split, exactly: all %d images present and unchanged", split, len(records))
        report.records_out = len(records)
        return records

    # ------------------------------------------------------------------------------------ stages
    def setup(self, stage: str | None = None) -> None:
        prepared = self._prepare()
        self._write_reports()
        if self.data_train is not None:
            return
        hp = self.hparams
        recs = prepared.records
        train = recs[recs["split"] == "train"].reset_index(drop=True)
        val = recs[recs["split"] == "val"].reset_index(drop=True)
        test = recs if hp.test_on == "all" else recs[recs["split"] == hp.test_on].reset_index(drop=True)
        test = test.reset_index(drop=True)
        self.test_records = test
        sets = self._pipeline().datasets(recs, {"train": train, "val": val, "test": test})
        self.data_train, self.data_val, self.data_test = sets["train"], sets["val"], sets["test"]

    # ------------------------------------------------------------------------- feature cache
    def attach_feature_extractor(self, extract: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                                 weights_key: str) -> None:
        """Train on features: `extract` maps a uint8 image batch on `device` to backbone features.

        Called before setup (agecls.train does it for data.feature_cache=true with a frozen
        backbone and no augmentation). The features of every split are computed once and cached
        (agecls.data.pipelines.features).
        """
        if self.data_train is not None or self.pipeline is not None:
            raise RuntimeError("attach the feature extractor before setup()")
        self._feature_extractor = (extract, device, weights_key)

    def test_groups(self) -> dict[str, list[Any]]:
        """Group labels of the test records (gender, race, ... where the source gives them), one per
        test image in test_records order: what metrics by group are computed over."""
        recs = self.test_records
        return {c: recs[c].tolist() for c in GROUP_COLUMNS if c in recs.columns and recs[c].notna().any()}

    def age_stats(self) -> tuple[float, float]:
        """Mean and standard deviation of the training ages (years): the model's output scale."""
        recs = self._prepare().records
        ages = recs.loc[recs["split"] == "train", "age"].to_numpy(dtype=float)
        if len(ages) == 0:
            ages = recs["age"].to_numpy(dtype=float)
        return float(ages.mean()), float(ages.std()) if len(ages) > 1 else 1.0

    def age_range(self) -> tuple[float, float]:
        """Youngest and oldest training age (years): the range the model's predictions are clipped to."""
        recs = self._prepare().records
        ages = recs.loc[recs["split"] == "train", "age"].to_numpy(dtype=float)
        if len(ages) == 0:
            ages = recs["age"].to_numpy(dtype=float)
        return float(ages.min()), float(ages.max())

    @property
    def cleaning_report(self) -> CleaningReport:
        return self._prepare().report

    def split_table(self) -> pd.DataFrame:
        """path (relative to the data root), age, split, sha1 (content hash, where indexed): split.csv."""
        p = self._prepare()
        table = pd.DataFrame(
            {"path": relative_paths(p.records["path"], p.relative_to), "age": p.records["age"], "split": p.records["split"]}
        )
        if "sha1" in p.records.columns:
            table["sha1"] = p.records["sha1"].to_numpy()
        return table

    @rank_zero_only
    def _write_reports(self) -> None:
        if self._reports_written:
            return
        self._reports_written = True
        p = self._prepare()
        log.info("%s\n%s", p.report.summary_table(), age_histogram(
            {s: p.records.loc[p.records["split"] == s, "age"] for s in SPLITS}))
        if self.hparams.report_dir:
            self.save_reports(self.hparams.report_dir)

    def save_reports(self, directory: str | Path) -> None:
        """Write cleaning.json and split.csv into `directory` (a run directory)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # a resumed run finds the same files (same seed, same data): nothing is rewritten then
        report = json.dumps(self.cleaning_report.as_dict(), indent=2) + "\n"
        write_bytes_keeping_previous(directory / "cleaning.json", report.encode())
        write_bytes_keeping_previous(directory / "split.csv", self.split_table().to_csv(index=False).encode())

    # ----------------------------------------------------------------------------------- loaders
    def _pin(self) -> bool:
        pin = self.hparams.pin_memory
        if isinstance(pin, str):
            trainer = self.trainer
            on_gpu = trainer is not None and trainer.accelerator is not None and "CUDA" in type(trainer.accelerator).__name__
            return on_gpu or (trainer is None and torch.cuda.is_available())
        return bool(pin)

    def _device(self) -> torch.device | None:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None and trainer.strategy is not None else None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The pipeline's host step (data.cache_format=jpeg on CUDA: decode the batch on the GPU)."""
        if self.pipeline is None or self._device() is None:
            return batch
        return self.pipeline.before_transfer(batch, self._device())

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The pipeline's device step (data.cache: the study's augmentation on the device that holds
        the batch, per sample, seeded by (seed, epoch, first sample); or the evaluation centre crop)."""
        if self.pipeline is None:
            return batch
        trainer = self.trainer
        return self.pipeline.on_device(batch, training=trainer is not None and trainer.training)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        hp = self.hparams
        pipeline = self._pipeline()
        workers = pipeline.workers
        pipeline.loader_ready(dataset, self._device())
        sampler = None
        if train:
            # ages: numpy (image datasets) or a tensor (FeatureDataset)
            weights = age_weights(np.asarray(dataset.ages, dtype=np.float64), hp.sampler, float(hp.age_bin_width),
                                  float(hp.get("lds_sigma", 2.0)), float(hp.get("lds_power", 0.5)))
            sampler = EpochSampler(len(dataset), int(hp.seed), weights=weights, epoch_fn=self._current_epoch)
        elif self.trainer is not None and self.trainer.world_size > 1:
            # Each rank evaluates its own share, none repeated: the default DistributedSampler pads
            # the last share with repeats, which would count some images twice in test metrics.
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=self.trainer.world_size,
                                                   rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=int(hp.batch_size),
            sampler=sampler,
            num_workers=workers,
            pin_memory=self._pin(),
            persistent_workers=bool(hp.persistent_workers) and workers > 0,
            # a last training batch of one image breaks BatchNorm; drop it when there are more
            drop_last=train and len(dataset) > int(hp.batch_size),
            # The loader's own generator seeds the workers, so creating an iterator does not
            # consume the global RNG that dropout draws from (resume stays exact).
            generator=torch.Generator().manual_seed(int(hp.seed)),
            collate_fn=getattr(dataset, "collate_fn", None),  # cached pixels come as whole batches
        )

    def _current_epoch(self) -> int:
        """The epoch the training loader is about to serve (0 outside a trainer).

        This is the value Lightning passes to `set_epoch`. It is read from the fit loop because
        on resume Lightning creates the iterator (and worker processes draw indices from the
        sampler) before it calls `set_epoch`, and before `trainer.current_epoch` is updated
        from the restored progress.
        """
        if self.trainer is None:
            return 0
        return int(self.trainer.fit_loop.epoch_progress.current.processed)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, train=False)

