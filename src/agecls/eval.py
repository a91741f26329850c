"""Test a checkpoint on a data set: metrics.json, predictions.csv, scatter.png.

    python -m agecls.eval ckpt_path=outputs/runs/.../checkpoints/epoch_012.ckpt
    python -m agecls.eval ckpt_path=PATH data=utkface data.root=/new/faces eval.split=all
    python -m agecls.eval ckpt_path=PATH tta=flip    # averaged with each image's horizontal flip
    python -m agecls.eval ckpt_path=PATH eval.crop_pct=0.95 eval.split=val   # the same weights at another centre crop
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, open_dict

from agecls.data import AgeDataModule
from agecls.data.splits import SplitMembershipError
from agecls.model_card import write_model_card
from agecls.models.module import AgeRegressor
from agecls.utils import outputs, provenance
from agecls.utils.checkpoint import read_checkpoint
from agecls.utils.checks import check_number, check_tta
from agecls.utils.files import keep_previous
from agecls.utils.hydra_utils import (
    EVAL_SUMMARY,
    config_dir,
    entry_point,
    progress_bar_enabled,
    summary_line,
)

log = logging.getLogger(__name__)


WEIGHTS = ("checkpoint", "current")


def load_checkpoint(path: str | Path, weights: str = "checkpoint") -> tuple[AgeRegressor, dict[str, Any]]:
    """The model (no other argument needed) and the checkpoint dict, read once and safely
    (tensors and plain values only: agecls.utils.checkpoint.read_checkpoint). weights=current
    loads the training weights a run with callbacks.ema kept beside its average
    (`current_model_state`) instead of the checkpoint's state_dict (the average)."""
    if weights not in WEIGHTS:
        raise ValueError(f"eval.weights={weights!r}; choose checkpoint (its state_dict: with callbacks.ema the "
                         "average) or current (the training weights saved beside an average)")
    ckpt = read_checkpoint(path)
    if weights == "current":
        current = ckpt.get("current_model_state")
        if not isinstance(current, dict):
            raise ValueError(f"eval.weights=current: {path} holds no current_model_state (it was not trained with "
                             "callbacks.ema, so its state_dict is its training weights); drop eval.weights")
        ckpt = {**ckpt, "state_dict": current}
    return AgeRegressor.from_checkpoint(ckpt, path=str(path)), ckpt


def check_eval_crop(cfg: DictConfig) -> float | None:
    """eval.crop_pct, checked: the centre crop to evaluate at instead of the model's own (the
    data.crop_pct it was trained with, which agecls.predict, serve and export use); None keeps it."""
    value = cfg.eval.get("crop_pct")
    if value is None:
        return None
    return float(check_number("eval.crop_pct", value, above=0, maximum=1,
                              why=" (null: the crop the model was trained with)"))


def build_datamodule(cfg: DictConfig, model: AgeRegressor, ckpt: dict[str, Any], report_dir: Path) -> AgeDataModule:
    """The data set named by cfg.data, or the one the checkpoint was trained on, preprocessed the
    way the model expects (its image size and crop; eval.crop_pct replaces the crop)."""
    hp = model.hparams
    check_number("eval.batch_size", cfg.eval.batch_size, minimum=1, integer=True)
    check_number("eval.num_workers", cfg.eval.num_workers, minimum=0, integer=True)
    # Evaluation decodes every image once anyway: no preprocessing cache (data.cache) to build.
    common = dict(image_size=int(hp.image_size), crop_pct=check_eval_crop(cfg) or float(hp.crop_pct), test_on=cfg.eval.split,
                  batch_size=int(cfg.eval.batch_size), num_workers=int(cfg.eval.num_workers),
                  report_dir=str(report_dir), cache_dir=cfg.paths.cache_dir, cache=False, feature_cache=False)
    if cfg.eval.split == "all":
        common.update(deduplicate=bool(cfg.eval.all_deduplicate), max_age=float(cfg.eval.all_max_age))
    if cfg.get("data") is not None:
        return hydra.utils.instantiate(cfg.data, **common, _convert_="all")
    saved = dict(ckpt.get("datamodule_hyper_parameters") or {})
    if not saved:
        raise ValueError(f"{cfg.ckpt_path} does not record its data set; name one, e.g. data=utkface data.root=DIR")
    saved.update(common)
    log.info("Evaluating on the checkpoint's own data: %s at %s (split %s)", saved["source"], saved["root"], cfg.eval.split)
    datamodule = AgeDataModule(**saved)
    if cfg.eval.split != "all":
        # exactly the images the checkpoint was tested (or trained, validated) on, checked by content
        membership = (ckpt.get(AgeDataModule.__qualname__) or {}).get("split_membership")
        allow_changed = bool(cfg.eval.get("allow_changed", False))
        if membership:
            datamodule.use_saved_split(membership, cfg.eval.split, allow_changed=allow_changed)
        elif allow_changed:
            log.warning("%s does not record which images were in its splits: the %s split is rebuilt from the data "
                        "and data.split_seed (eval.allow_changed=true), and may differ from the one it was tested on "
                        "if the data or the split method changed since", cfg.ckpt_path, cfg.eval.split)
        else:
            split_csv = Path(cfg.ckpt_path).resolve().parent.parent / "split.csv"
            hint = (f"The run's split.csv lists the split: give data=<its data> data.root=<its folder> "
                    f"data.split_file={split_csv}. " if split_csv.is_file() else "")
            raise SplitMembershipError(
                f"{cfg.ckpt_path} does not record which images were in its {cfg.eval.split} split (a checkpoint of an "
                "agecls before split membership was recorded, or one whose state was removed), so the images it was "
                "tested on cannot be told apart from others: evaluating would rebuild the split from the data and "
                f"data.split_seed, perhaps a different set. {hint}Add eval.allow_changed=true to evaluate the rebuilt "
                "split anyway (with a warning), or eval.split=all for every image.")
    return datamodule


def evaluate(cfg: DictConfig) -> dict[str, float]:
    tta = check_tta(cfg.get("tta", "none"))  # before any work
    crop = check_eval_crop(cfg)
    check_number("coverage", cfg.get("coverage", 0.9), minimum=0.0, maximum=1.0)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    provenance.write(output_dir)
    model, ckpt = load_checkpoint(cfg.ckpt_path, weights=str(cfg.eval.get("weights", "checkpoint")))
    model.tta = tta  # the test stage's predictions: AgeNet.tta_views
    model.coverage = float(cfg.get("coverage", model.coverage))  # its per-face intervals (predictions.csv)
    datamodule = build_datamodule(cfg, model, ckpt, output_dir)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=[], enable_checkpointing=False,
        enable_progress_bar=progress_bar_enabled(cfg.trainer.get("enable_progress_bar")))
    t0 = time.perf_counter()
    trainer.test(model, datamodule=datamodule)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    metrics["time/test_s"] = time.perf_counter() - t0
    metrics["checkpoint"] = str(Path(cfg.ckpt_path).resolve())
    metrics["split"] = cfg.eval.split
    metrics["tta"] = tta
    metrics["weights"] = str(cfg.eval.get("weights", "checkpoint"))
    metrics["crop_pct"] = float(datamodule.hparams.crop_pct)  # the centre crop evaluated at
    metrics["coverage"] = model.coverage  # of the intervals: test/interval_coverage is how often they held
    if getattr(datamodule, "membership_check", None):  # the checkpoint's own split: how much of it was evaluated
        metrics.update({f"members/{k}": v for k, v in datamodule.membership_check.items()})
    if trainer.is_global_zero:
        hp = model.hparams
        title = f"{hp.backbone['name']} on {datamodule.hparams.source} ({cfg.eval.split})"
        outputs.write_test_stage(output_dir, model.test_results, datamodule.test_records["path"].tolist(), metrics, title,
                                 groups=datamodule.test_groups())
        keep_previous(output_dir / "metrics.json")
        outputs.write_json(output_dir / "metrics.json", metrics)
        write_model_card(output_dir, model.hparams, datamodule.hparams, metrics, datamodule.cleaning_report.as_dict(),
                         {"model": metrics["checkpoint"], "notes": f"Evaluated on the {cfg.eval.split} split" + (
                              f" at centre crop {crop:g} (eval.crop_pct; trained at {float(hp.crop_pct):g})." if crop
                              else ".")})
    log.info("Evaluation of %s: %s", cfg.ckpt_path, {k: v for k, v in metrics.items() if "_by_" not in k})
    return metrics


@entry_point
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.ckpt_path = str(Path(cfg.ckpt_path).expanduser())
    # one line; the whole config is in <run dir>/.hydra/config.yaml (`--cfg job` prints it)
    log.info("Run: %s", summary_line(cfg, EVAL_SUMMARY))
    evaluate(cfg)


if __name__ == "__main__":
    main()
