"""Input-pipeline benchmark: is the model or the loader the limit?

    python -m agecls.bench backbone=resnet18 data.image_size=128 data.batch_size=64
    python -m agecls.bench suite=frozen backbone=efficientnet_lite0

Measures, in one run, on one machine, model, image size and batch size (images per second):

    model_only   forward + backward + step on a batch already on the device: the limit
    load_naive   the per-sample pipeline alone: PIL decode + torchvision transforms in workers
    load_fast    the fast path alone: batches of the preprocessing cache (data.cache_format=raw: rows
                 of the memory map; jpeg: decoded in the workers, or on the GPU), on the device
    train_naive  training fed by the per-sample pipeline
    train_fast   training fed by the fast path, augmented per sample on the device

and, for the two `load_` modes, the host CPU time per delivered image (main process and workers:
decode, augment, collate; everything before the batch reaches the device), plus the throughput
of the device-side augmentation alone. `suite=frozen` compares an unfrozen backbone, a frozen one
(run without autograd) and the head trained on features computed once. `suite=scale` generates
IMDB-WIKI-style data sets of growing size and times each data stage (agecls.bench_scale).

The datasets and batch steps are the input pipelines training uses (agecls.data.pipelines), made by
the DataModule: `data.cache_format=raw|jpeg` picks the fast path's cache, as in training.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from agecls.data import AgeDataModule
from agecls.data.batch_augment import center_crop
from agecls.data.feature_cache import FeatureDataset
from agecls.data.pipelines import Pipeline
from agecls.data.samplers import EpochSampler
from agecls.models.module import AgeRegressor
from agecls.utils.hydra_utils import config_dir, entry_point, to_dict
from agecls.utils.malloc import keep_freed_memory, malloc_tuned

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ------------------------------------------------------------------------------------ machine
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_name(device: torch.device) -> str:
    """A file-name-safe description of the machine, e.g. nvidia-h200 or cpu-amd-epyc-...-2cores."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {cpu_name()} {os.cpu_count()}cores"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:80]


def _worker_cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLOCK_TICKS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> tuple[float, float | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return rss, gpu


def _cache_bytes(directory: Path) -> int:
    """Bytes on disk of a cache folder (its data files)."""
    return sum(f.stat().st_size for f in Path(directory).iterdir() if f.is_file())


# --------------------------------------------------------------------------------------- parts
class Bench:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        want = cfg.device
        self.device = torch.device("cuda" if want == "auto" and torch.cuda.is_available() else ("cpu" if want == "auto" else want))
        self.size = int(cfg.data.image_size)
        self.bs = int(cfg.data.batch_size)
        self.augment = to_dict(cfg.data.augment)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=str(cfg.precision) == "bf16")
        torch.manual_seed(int(cfg.seed))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")

        # the very pipelines training uses (agecls.data.pipelines), built by the DataModule
        dm = hydra.utils.instantiate(cfg.data, _convert_="all", report_dir=None, cache=False)
        assert isinstance(dm, AgeDataModule)
        recs = dm.records
        train = recs[recs["split"] == "train"].head(int(cfg.max_images)).reset_index(drop=True)
        self.records = train
        self.naive_pipeline = dm.make_pipeline("per_sample")
        self.naive = self.naive_pipeline.datasets(train, {"train": train})["train"]
        self.fast_pipeline = dm.make_pipeline(str(cfg.data.get("cache_format") or "raw"))
        t0 = time.perf_counter()
        self.fast = self.fast_pipeline.datasets(train, {"train": train})["train"]
        built_now = time.perf_counter() - t0
        self.fast_pipeline.loader_ready(self.fast, self.device)  # jpeg on CUDA: decoded on the GPU
        self.cache = self.fast_pipeline.cache
        self.cache_format = self.fast_pipeline.name
        self.cache_s_per_1000 = float(self.cache.meta.get("seconds_per_1000", built_now / len(train) * 1000))
        self.cache_bytes_per_image = _cache_bytes(self.cache.directory) / len(train)
        self.batch_aug = self.fast_pipeline.augment
        # the fast path's DataLoader workers: fast_workers, else the pipeline's own (raw: it only
        # gathers rows, data.cache_num_workers; jpeg: it decodes, data.num_workers)
        self.fast_workers = int(cfg.fast_workers) if cfg.get("fast_workers") is not None else self.fast_pipeline.workers
        self.hardware = hardware_name(self.device)
        log.info("Benchmark on %s: %s, %d px, batch %d, %d images (%s cache: %.1f s per 1,000 images, %.1f KB per image)",
                 self.hardware, cfg.backbone.name, self.size, self.bs, len(train), self.cache_format,
                 self.cache_s_per_1000, self.cache_bytes_per_image / 1e3)

    def model(self, freeze: bool | str = False) -> tuple[AgeRegressor, torch.optim.Optimizer]:
        cfg = self.cfg
        module = AgeRegressor(backbone=to_dict(cfg.backbone), head=to_dict(cfg.head), freeze=freeze,
                              pretrained=bool(cfg.pretrained), image_size=self.size, age_mean=35.0, age_std=20.0,
                              channels_last=bool(cfg.channels_last), loss=to_dict(cfg.get("loss")))
        net = module.net.to(self.device)
        if cfg.channels_last:
            net.to(memory_format=torch.channels_last)
        if cfg.compile:
            net.compile()
        net.train()
        module.backbone.train()  # re-applies eval mode to frozen layers
        params = [p for p in net.parameters() if p.requires_grad]
        opt = hydra.utils.instantiate(to_dict(cfg.optimizer), _convert_="all")(params=params)
        return module, opt

    def loader(self, dataset: Any, workers: int, shuffle: bool = True) -> DataLoader:
        sampler = EpochSampler(len(dataset), int(self.cfg.seed)) if shuffle else None
        return DataLoader(dataset, batch_size=self.bs, sampler=sampler, num_workers=workers, drop_last=True,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          collate_fn=getattr(dataset, "collate_fn", None))

    def deliver(self, batch: dict[str, Any], pipeline: Pipeline) -> dict[str, Any]:
        """A loaded batch on the device, as the DataModule's transfer hooks deliver it (before the
        device step): the pipeline's host step (GPU JPEG decode), then the copy."""
        batch = pipeline.before_transfer(batch, self.device)
        batch["image"] = batch["image"].to(self.device, non_blocking=True)
        return batch

    def _batches(self, loader: DataLoader, n: int) -> Iterator[dict[str, torch.Tensor]]:
        while True:  # as many epochs as needed
            for batch in loader:
                yield batch
                n -= 1
                if n <= 0:
                    return
            if isinstance(loader.sampler, EpochSampler):
                loader.sampler.set_epoch(loader.sampler.epoch + 1)

    # ---------------------------------------------------------------------------- measurements
    def train_step(self, module: AgeRegressor, opt: torch.optim.Optimizer, images: torch.Tensor,
                   ages: torch.Tensor) -> None:
        with self.autocast:
            output = module.net(images, head_output=True)
        loss = module.training_loss(output, ages)  # the loss training uses (conf/loss/), as configured
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def time_train(self, source: str, freeze: bool | str = False) -> dict[str, Any]:
        """images/s of training fed by `source`: memory (model_only), naive or fast."""
        module, opt = self.model(freeze)
        warmup, n = int(self.cfg.warmup), int(self.cfg.batches)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if source == "memory":
            x = torch.randint(0, 256, (self.bs, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
            y = torch.rand(self.bs, device=self.device) * 80
            batches: Iterator = iter([{"image": x, "age": y}] * (warmup + n))
        elif source == "naive":
            batches = self._batches(self.loader(self.naive, int(self.cfg.data.num_workers)), warmup + n)
        else:
            batches = self._batches(self.loader(self.fast, self.fast_workers), warmup + n)
        t0 = None
        for k, batch in enumerate(batches):
            if k == warmup:
                _sync(self.device)
                t0 = time.perf_counter()
            if source == "memory":
                x = batch["image"]
            else:
                pipeline = self.fast_pipeline if source == "fast" else self.naive_pipeline
                x = pipeline.on_device(self.deliver(batch, pipeline), training=True)["image"]
            y = batch["age"].to(self.device, non_blocking=True).float()
            self.train_step(module, opt, x, y)
        _sync(self.device)
        seconds = time.perf_counter() - t0
        rss, gpu = _peak_mb(self.device)
        return {"images_per_s": n * self.bs / seconds, "peak_rss_mb": rss, "peak_gpu_mb": gpu}

    def time_load(self, source: str) -> dict[str, Any]:
        """Delivery rate of a pipeline without the model, and the host CPU it costs per image."""
        dataset = self.naive if source == "naive" else self.fast
        workers = int(self.cfg.data.num_workers) if source == "naive" else self.fast_workers
        loader = self.loader(dataset, workers)
        warmup, n = int(self.cfg.warmup), int(self.cfg.batches)
        it = iter(loader)
        for _ in range(warmup):  # workers up, prefetch queue full
            next(it)
        pids = [w.pid for w in getattr(it, "_workers", [])]
        _sync(self.device)
        cpu0, w0, t0 = time.process_time(), _worker_cpu_seconds(pids), time.perf_counter()
        got = 0
        while got < n:
            try:
                batch = next(it)
            except StopIteration:
                loader.sampler.set_epoch(loader.sampler.epoch + 1)
                it = iter(loader)
                pids = [w.pid for w in getattr(it, "_workers", [])]
                continue
            self.deliver(batch, self.fast_pipeline if source == "fast" else self.naive_pipeline)
            got += 1
        _sync(self.device)
        seconds = time.perf_counter() - t0
        cpu = (time.process_time() - cpu0) + (_worker_cpu_seconds(pids) - w0)
        del it
        images = n * self.bs
        row = {"images_per_s": images / seconds, "cpu_ms_per_image": cpu / images * 1000}
        if source == "fast":
            row["device_aug_images_per_s"] = self.time_device_augment()
        rss, gpu = _peak_mb(self.device)
        row.update(peak_rss_mb=rss, peak_gpu_mb=gpu)
        return row

    def time_device_augment(self) -> float:
        """images/s of the per-sample batch augmentation alone, on the device."""
        x = self.deliver(self.fast.__getitems__(list(range(self.bs))), self.fast_pipeline)["image"]
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            self.batch_aug(x, g)
        _sync(self.device)
        reps = max(3, int(self.cfg.batches) // 2)
        t0 = time.perf_counter()
        for _ in range(reps):
            self.batch_aug(x, g)
        _sync(self.device)
        return reps * self.bs / (time.perf_counter() - t0)

    def frozen_suite(self) -> list[dict[str, Any]]:
        rows = [{"mode": "train_unfrozen", **self.time_train("fast", freeze=False)},
                {"mode": "train_frozen", **self.time_train("fast", freeze=True)}]
        # the head trained on features computed once (augmentation off: evaluation views)
        module, opt = self.model(freeze=True)
        loader = self.loader(self.fast, self.fast_workers, shuffle=False)
        t0 = time.perf_counter()
        feats = []
        with torch.inference_mode(), self.autocast:
            for batch in loader:
                x = center_crop(self.deliver(batch, self.fast_pipeline)["image"], self.size)
                feats.append(module.net.features(x).float().cpu())
        _sync(self.device)
        extract_s = time.perf_counter() - t0
        n_imgs = sum(len(f) for f in feats)
        rows.append({"mode": "feature_extract", "images_per_s": n_imgs / extract_s})
        data = FeatureDataset(torch.cat(feats).numpy(), self.records["age"].to_numpy()[:n_imgs])
        features, ages = data.features.to(self.device), data.ages.to(self.device)
        warmup, n = int(self.cfg.warmup), max(int(self.cfg.batches), 50)
        perm = torch.randperm(len(ages), device=self.device)
        for k in range(warmup + n):
            if k == warmup:
                _sync(self.device)
                t0 = time.perf_counter()
            idx = perm[(k * self.bs) % len(ages):][: self.bs]
            loss = module.training_loss(module.net.from_features(features[idx], head_output=True), ages[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(self.device)
        rows.append({"mode": "train_feature_cache", "images_per_s": n * self.bs / (time.perf_counter() - t0)})
        return rows

    def run(self) -> pd.DataFrame:
        rows = []
        if self.cfg.suite == "frozen":
            rows = self.frozen_suite()
        else:
            known = {"model_only", "load_naive", "load_fast", "train_naive", "train_fast"}
            unknown = [m for m in self.cfg.modes if m not in known]
            if unknown:
                raise ValueError(f"unknown modes {unknown}; modes are {', '.join(sorted(known))}")
            for mode in (m for m in self.cfg.modes if m.startswith("load_")):
                log.info("Measuring %s ...", mode)
                rows.append({"mode": mode, **self.time_load(mode.split("_")[1])})
            # Training modes in interleaved rounds (A B C A B C ...), each reported as its median:
            # a shared or throttled machine drifts by 10-20 % over minutes, which would otherwise
            # land on whichever mode ran in the slow minute.
            train_modes = [m for m in self.cfg.modes if not m.startswith("load_")]
            rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in train_modes}
            for r in range(int(self.cfg.rounds)):
                for mode in train_modes:
                    log.info("Measuring %s (round %d of %d) ...", mode, r + 1, self.cfg.rounds)
                    source = "memory" if mode == "model_only" else mode.split("_")[1]
                    rounds[mode].append(self.time_train(source, self.cfg.freeze))
            limit = [x["images_per_s"] for x in rounds.get("model_only", [])]
            for mode, results in rounds.items():
                rates = [x["images_per_s"] for x in results]
                row = {"mode": mode, **results[-1], "images_per_s": float(np.median(rates)),
                       "images_per_s_min": min(rates), "images_per_s_max": max(rates)}
                if limit:
                    # paired within each round (measured seconds apart), so the machine's drift
                    # over minutes cancels; the median over rounds
                    row["vs_model_only"] = float(np.median([r / m for r, m in zip(rates, limit, strict=True)]))
                rows.append(row)
            rows.sort(key=lambda row: list(self.cfg.modes).index(row["mode"]))
        common = {
            "backbone": self.cfg.backbone.name, "image_size": self.size, "batch_size": self.bs,
            "device": self.hardware, "precision": str(self.cfg.precision), "channels_last": bool(self.cfg.channels_last),
            "compile": bool(self.cfg.compile), "freeze": str(self.cfg.freeze).lower(), "tune_malloc": malloc_tuned(),
            "workers_naive": int(self.cfg.data.num_workers), "workers_fast": self.fast_workers,
            "cache_s_per_1000": round(self.cache_s_per_1000, 2), "cache_format": self.cache_format,
            "cache_bytes_per_image": round(self.cache_bytes_per_image), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        }
        table = pd.DataFrame([{**r, **common} for r in rows])
        first = ["mode", "backbone", "image_size", "batch_size", "images_per_s"]
        return table[first + [c for c in table.columns if c not in first]]


def summarize(table: pd.DataFrame) -> str:
    """The printed table with the ratios the benchmark exists for."""
    rate = dict(zip(table["mode"], table["images_per_s"], strict=True))
    cpu = dict(zip(table["mode"], table.get("cpu_ms_per_image", pd.Series([np.nan] * len(table))), strict=True))
    lines = [table.drop(columns=["torch", "date", "threads"], errors="ignore").to_string(index=False, float_format=lambda v: f"{v:.2f}")]
    paired = dict(zip(table["mode"], table.get("vs_model_only", pd.Series([np.nan] * len(table))), strict=True))
    # (vs_model_only: each training mode's rate over model_only's, paired within a round)
    for mode, target in (("train_fast", "   (target >= 0.95 on CPU, >= 0.8 on a GPU)"), ("train_naive", "")):
        if "model_only" in rate and mode in rate:
            lines.append(f"{mode + ' / model_only':<29} = {paired[mode]:.3f}{target}   (median of the per-round ratios)")
    if "load_fast" in rate and "load_naive" in rate:
        lines.append(f"load_fast / load_naive        = {rate['load_fast'] / rate['load_naive']:.1f}x delivery")
        lines.append(f"cpu ms/image naive / fast     = {cpu['load_naive'] / cpu['load_fast']:.1f}x   (target >= 20)")
    if "train_frozen" in rate:
        lines.append(f"train_frozen / train_unfrozen = {rate['train_frozen'] / rate['train_unfrozen']:.2f}x")
        lines.append(f"train_feature_cache / train_frozen = {rate['train_feature_cache'] / rate['train_frozen']:.0f}x "
                     f"(features once: {rate['feature_extract']:.0f} images/s)")
    return "\n".join(lines)


def write_csv(table: pd.DataFrame, output: Path, append: bool) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    if append and output.exists():
        table = pd.concat([pd.read_csv(output), table], ignore_index=True)
    table.to_csv(output, index=False)
    return output


@entry_point
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="bench")
def main(cfg: DictConfig) -> pd.DataFrame:
    keep_freed_memory(bool(cfg.get("tune_malloc", True)))
    if cfg.suite == "scale":  # generates its own data sets: agecls.bench_scale
        from agecls.bench_scale import run_scale_suite

        return run_scale_suite(cfg)
    bench = Bench(cfg)
    table = bench.run()
    suffix = "-frozen" if cfg.suite == "frozen" else ""
    output = Path(cfg.output) if cfg.output else REPO / "benchmarks" / "results" / f"{bench.hardware}{suffix}.csv"
    write_csv(table, output, bool(cfg.append))
    print(summarize(table))
    print(f"wrote {output}")
    return table


if __name__ == "__main__":
    main()
