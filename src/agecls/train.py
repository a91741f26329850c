"""Train a grafted backbone, then test its best checkpoint.

    python -m agecls.train backbone=resnet18 freeze=false
    python -m agecls.train -m optimizer=sgd,adam lr=1e-4,1e-3,1e-2
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from agecls.data.datamodule import describe_data
from agecls.data.feature_cache import weights_digest
from agecls.data.sources import Source
from agecls.model_card import write_model_card
from agecls.models.module import AgeRegressor
from agecls.utils import outputs, provenance
from agecls.utils.callbacks import epoch_progress_bar
from agecls.utils.checks import check_train_config
from agecls.utils.files import keep_previous
from agecls.utils.hydra_utils import (
    config_dir,
    entry_point,
    flat_hparams,
    instantiate,
    instantiate_callbacks,
    instantiate_loggers,
    metric_value,
    progress_bar_enabled,
    to_dict,
    train_summary,
)
from agecls.utils.malloc import keep_freed_memory
from agecls.utils.quiet import quiet_third_party

log = logging.getLogger(__name__)

# Lightning reads checkpoints it resumes from or tests with torch.load(weights_only=True) where it
# lets us say so (2.6+); resolve_ckpt_path has already checked the file the safe way in any case.
SAFE_LOAD = {"weights_only": True} if "weights_only" in inspect.signature(L.Trainer.fit).parameters else {}


def build_model(cfg: DictConfig) -> AgeRegressor:
    """The LightningModule a config describes: conf/model/ (`_target_`, its arguments interpolated
    from the other groups), instantiated as the data module is. Fails here, before any data work,
    on missing weights or a bad loss. Plain containers (_convert_=all), so the hyperparameters the
    checkpoint saves are readable with weights_only=True."""
    model = instantiate(cfg.model, _convert_="all")
    if not isinstance(model, AgeRegressor):
        raise TypeError(f"model._target_={cfg.model.get('_target_')!r} built a {type(model).__name__}; "
                        "agecls.train trains an agecls.models.module.AgeRegressor (conf/model/default.yaml)")
    return model


def attach_feature_cache(cfg: DictConfig, model: AgeRegressor, datamodule: L.LightningDataModule) -> None:
    """data.feature_cache=true: the head trains on backbone features computed once."""
    augment = cfg.data.get("augment") or {}
    if not model.backbone.fully_frozen or augment.get("enabled", True):
        raise ValueError(
            f"data.feature_cache=true needs a fully frozen backbone and no augmentation (features computed "
            f"once cannot follow a backbone that trains or a new augmentation every epoch); got "
            f"freeze={cfg.freeze} and data.augment.enabled={augment.get('enabled', True)}. "
            "Add freeze=true data.augment.enabled=false, or drop data.feature_cache."
        )
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu")
    net = model.net

    def extract(images: torch.Tensor) -> torch.Tensor:
        if next(net.parameters()).device != images.device:
            net.to(images.device)
        net.eval()
        return net.features(images)

    datamodule.attach_feature_extractor(extract, device, weights_digest(net.backbone))


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path, cfg: DictConfig | None = None) -> str | None:
    """`last` means this run directory's checkpoints/last.ckpt; a path must exist.

    The file is read once here the safe way (tensors and plain values only) and checked to be an
    agecls checkpoint, before Lightning loads it to resume: a checkpoint that would run code when
    unpickled, or is no checkpoint at all, stops the run here with a CheckpointError. With the run's
    config `cfg`, the checkpoint must also have been trained with this run's network and data
    (check_resume_config).
    """
    from agecls.utils.checkpoint import read_checkpoint

    if not ckpt_path:
        return None
    if ckpt_path == "last":
        path = output_dir / "checkpoints" / "last.ckpt"
        if not path.exists():
            raise FileNotFoundError(
                f"ckpt_path=last: no {path}. Resume inside the run directory that was interrupted: "
                "add hydra.run.dir=<that run's directory> (its checkpoints/last.ckpt is read)."
            )
        ckpt_path = str(path)
    ckpt = read_checkpoint(ckpt_path)
    if cfg is not None:
        check_resume_config(ckpt_path, ckpt, cfg)
    return ckpt_path


def check_resume_config(ckpt_path: str, ckpt: dict[str, Any], cfg: DictConfig) -> None:
    """Stop (ConfigValueError naming each key, old -> new) before anything is built when the run
    would resume a checkpoint of another network, or on other data or image size without
    resume.allow_changed=true (then each difference is a warning)."""
    from agecls.utils.checkpoint import check_resume

    run = {k: v for k, v in (to_dict(cfg.model) or {}).items() if not str(k).startswith("_")}
    run["data"] = {k: v for k, v in (to_dict(cfg.data) or {}).items() if not str(k).startswith("_")}
    allow = bool(OmegaConf.select(cfg, "resume.allow_changed", default=False))
    for change in check_resume(ckpt_path, ckpt, run, allow):
        log.warning("Resuming %s although it was trained with other values (resume.allow_changed=true): %s",
                    Path(ckpt_path).name, change)
    averaged = "current_model_state" in ckpt  # written by callbacks.ema (WeightEMA)
    decay = OmegaConf.select(cfg, "callbacks.ema.decay", default=None)
    if averaged and decay is None:
        from agecls.utils.checks import ConfigValueError

        raise ConfigValueError(
            f"ckpt_path={ckpt_path!r} was trained with callbacks.ema: its state_dict is the weights' average and "
            "the training weights are kept beside it. Resuming without the average would continue training from "
            "the average instead; add callbacks.ema.decay=<its decay> (its run's .hydra/config.yaml)")
    if decay is not None and not averaged:
        log.warning("Resuming %s, trained without callbacks.ema, with callbacks.ema.decay=%s: the average starts "
                    "from the checkpoint's weights", Path(ckpt_path).name, decay)


def check_data_root(datamodule: L.LightningDataModule) -> None:
    """A data set that must already be on disk (utkface, csv, imdb_wiki without data.download) stops
    here when data.root does not exist, before the model is built; sources that make or fetch
    their data (synthetic, data.download=true) are left to do so."""
    make_source = getattr(datamodule, "make_source", None)
    if make_source is None:
        return
    source = make_source()
    fetches = type(source).prepare is not Source.prepare and getattr(source, "download", True)
    if not fetches:
        source.check_root()


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "numel") and v.numel() != 1:
            continue
        out[k] = float(v.item() if hasattr(v, "item") else v)
    return out


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, write the run's outputs; return every logged metric."""
    check_train_config(cfg)  # bad values fail here, before any model, data or indexing work
    quiet_third_party()
    keep_freed_memory(bool(cfg.get("tune_malloc", True)))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rank_zero_only(provenance.write)(output_dir)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    if torch.cuda.is_available():
        # TF32 matmuls on Ampere+: ~same accuracy for this task, much faster fp32 training
        torch.set_float32_matmul_precision("high")

    # a bad checkpoint, a checkpoint of another run, or a missing data set stop the run here,
    # before the model is built (or its weights are loaded)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, cfg) if cfg.get("train", True) else None
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    check_data_root(datamodule)
    model = build_model(cfg)
    counts = model.param_counts()
    log.info("Model: %s parameters, %s trainable; loss %s, head output width %d", _millions(counts["params/total"]),
             _millions(counts["params/trainable"]), model.loss_name, model.head.out_features)
    if cfg.data.get("feature_cache"):
        attach_feature_cache(cfg, model, datamodule)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    for lg in loggers:  # CSVLogger rewrites metrics.csv; keep a resumed run's earlier one
        if isinstance(lg, CSVLogger) and lg.log_dir:
            keep_previous(Path(lg.log_dir) / "metrics.csv")
    progress_bar = progress_bar_enabled(cfg.trainer.get("enable_progress_bar"), callbacks)
    if progress_bar and not any(isinstance(cb, ProgressBar) for cb in callbacks):
        callbacks.append(epoch_progress_bar())  # Lightning's bar, its epochs counted from 1 as in the log
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 enable_progress_bar=progress_bar)

    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **SAFE_LOAD)
        metrics.update(_scalar_metrics(trainer.callback_metrics))
    metrics["time/fit_s"] = time.perf_counter() - t0
    metrics["epochs"] = int(trainer.current_epoch)
    metrics["global_step"] = int(trainer.global_step)
    metrics.update(model.param_counts())

    if cfg.get("test", True):
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not ckpt:
            log.warning("No best checkpoint was saved (fast_dev_run or no validation): testing the current weights")
        t1 = time.perf_counter()
        model.tta = str(cfg.get("tta") or "none")  # test-time augmentation (checked by check_train_config)
        # Restoring the best checkpoint for testing keeps the trainer's step (only fitting restores
        # loop progress), so test/* land at the run's final step, after every val/* point.
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt or None, verbose=False, **SAFE_LOAD)
        metrics.update(_scalar_metrics(trainer.callback_metrics))
        metrics["time/test_s"] = time.perf_counter() - t1
        metrics["tta"] = model.tta
        metrics["best_checkpoint"] = ckpt or None
        if trainer.is_global_zero and model.test_results is not None:
            title = f"{cfg.backbone.name}, freeze={cfg.freeze}, {flat_hparams(cfg)['optimizer']} lr={cfg.lr}"
            outputs.write_test_stage(output_dir, model.test_results, datamodule.test_records["path"].tolist(),
                                     metrics, title, trainer.loggers, trainer.global_step, datamodule.test_groups())

    if trainer.is_global_zero:
        keep_previous(output_dir / "metrics.json")
        outputs.write_json(output_dir / "metrics.json", metrics)
        write_model_card(output_dir, model.hparams, datamodule.hparams, metrics,
                         datamodule.cleaning_report.as_dict(), {"model": metrics.get("best_checkpoint")})
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):  # the HParams tab pairs knobs with these metrics
                lg.log_hyperparams(flat_hparams(cfg), metrics=hparams_metrics(metrics), step=trainer.global_step)
            else:
                lg.log_hyperparams(flat_hparams(cfg))
            lg.finalize("success")
    log.debug("Metrics: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    log.info("%s", result_line(metrics, output_dir))
    return metrics


# The metrics TensorBoard's HParams tab pairs with a run's knobs. They go under their own tags
# (hp/...): written again under val/... or test/... they would add a second point to those curves.
HPARAMS_METRICS = ("val/mae_best", "test/mae", "test/pearson", "test/spearman")


def hparams_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {"hp/" + k.replace("/", "_"): metrics[k] for k in HPARAMS_METRICS if metrics.get(k) is not None}


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 100_000 else f"{n:,}"


def result_line(metrics: dict[str, Any], output_dir: Path) -> str:
    """The run's outcome in one line; every metric is in metrics.json."""
    parts = []
    if metrics.get("test/mae") is not None:
        test = f"test MAE {metrics['test/mae']:.2f}"
        for key, name in (("test/pearson", "Pearson"), ("test/spearman", "Spearman")):
            if metrics.get(key) is not None:
                test += f", {name} {metrics[key]:.3f}"
        if metrics.get("test/n_images") is not None:
            test += f" on {int(metrics['test/n_images'])} images"
        parts.append(test)
    if metrics.get("val/mae_best") is not None:
        parts.append(f"best val MAE {metrics['val/mae_best']:.2f}")
    if metrics.get("best_checkpoint"):
        parts.append(f"best checkpoint {Path(metrics['best_checkpoint']).name}")
    parts.append(f"{metrics.get('epochs', 0)} epochs in {metrics.get('time/fit_s', 0.0):.0f} s")
    return "Done: " + "; ".join(parts) + f". Metrics in {output_dir / 'metrics.json'}"


@entry_point
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    # One line of key choices; the whole resolved config is in <run dir>/.hydra/config.yaml
    # (`python -m agecls.train --cfg job` prints it).
    check_train_config(cfg)
    log.info("%s", describe_data(cfg.data))  # the data set in words: "data: UTKFace, 20,709 faces from ..."
    log.info("Run: %s", train_summary(cfg))
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    if name and name not in metrics and not cfg.get("train", True):
        log.warning("optimized_metric=%s is not logged with train=false; the run returns no value", name)
        return None
    return metric_value(metrics, name)


if __name__ == "__main__":
    main()
