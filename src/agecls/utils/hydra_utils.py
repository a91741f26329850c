"""Small helpers shared by the entry points: config location, instantiation, flat hparams."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def config_dir() -> str:
    """The `conf/` folder: $AGECLS_CONFIG_DIR, else the checkout's conf/ beside src/."""
    env = os.environ.get("AGECLS_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "conf"
    if not (path / "train.yaml").exists():
        raise FileNotFoundError(
            f"agecls's Hydra configs are not at {path}. Install agecls from its checkout "
            "(pip install -e .) or set AGECLS_CONFIG_DIR to the folder holding train.yaml."
        )
    return str(path)


def to_dict(node: Any) -> Any:
    """A resolved plain container (dict/list) from a config node; None stays None."""
    if node is None:
        return None
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    callbacks: list[Callback] = []
    for name, node in (cfg or {}).items():
        if node is not None and "_target_" in node:
            log.debug("callback %s: %s", name, node._target_)
            callbacks.append(hydra.utils.instantiate(node))
    return callbacks


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    loggers: list[Logger] = []
    for _, node in (cfg or {}).items():
        if node is not None and "_target_" in node:
            loggers.append(hydra.utils.instantiate(node))
    return loggers


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The knobs a comparison of runs cares about, flat, for TensorBoard's HParams tab and summaries."""
    freeze = cfg.get("freeze")
    out: dict[str, Any] = {
        "backbone": cfg.backbone.name,
        "head": cfg.head.name,
        "loss": loss_choice(cfg)[0],
        "freeze": str(freeze).lower() if isinstance(freeze, bool) else str(freeze),
        "pretrained": bool(cfg.pretrained),
        "optimizer": str(cfg.optimizer._target_).rsplit(".", 1)[-1].lower(),
        "lr": float(cfg.lr),
        "scheduler": (str(cfg.scheduler._target_).rsplit(".", 1)[-1] if cfg.get("scheduler") and cfg.scheduler.get("_target_") else "none"),
        "data": cfg.data.source,
        "image_size": int(cfg.data.image_size),
        "batch_size": int(cfg.data.batch_size),
        "augment": bool(cfg.data.augment.enabled) if cfg.data.get("augment") else False,
        "max_epochs": int(cfg.trainer.max_epochs) if cfg.trainer.get("max_epochs") is not None else -1,
        "seed": int(cfg.seed) if cfg.get("seed") is not None else -1,
        "precision": str(cfg.trainer.get("precision", "32-true")),
        "tta": str(cfg.get("tta") or "none"),  # test-time augmentation of the test stage
    }
    return out


def loss_choice(cfg: DictConfig) -> tuple[str, int]:
    """(loss= name, the head's output width it needs) of a config; a config without the loss group
    trains with the study's l1."""
    from agecls.models.losses import build_loss, loss_name  # imported here: it needs torch

    loss = to_dict(cfg.get("loss"))
    return loss_name(loss), build_loss(loss).out_features


def metric_value(metrics: Mapping[str, Any], name: str | None) -> float | None:
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged metrics: {', '.join(sorted(metrics))}")
    value = metrics[name]
    return float(value.item() if hasattr(value, "item") else value)


def summary_line(cfg: DictConfig, fields: Mapping[str, str]) -> str:
    """`label=value, ...` for the dotted config keys in `fields` ({label: key}); unset ones left out."""
    parts = []
    for label, key in fields.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        parts.append(f"{label}={value}")
    return ", ".join(parts)


def train_summary(cfg: DictConfig) -> str:
    """One line with a training run's key choices; the whole resolved config is in
    <run dir>/.hydra/config.yaml (and `--cfg job` prints it)."""
    hp = flat_hparams(cfg)
    items = {k: hp[k] for k in ("backbone", "pretrained", "head", "loss")}
    items["head_output"] = loss_choice(cfg)[1]
    items.update({k: hp[k] for k in ("freeze", "optimizer", "lr", "scheduler")})
    items.update(data=hp["data"], root=cfg.data.get("root"), image_size=hp["image_size"], batch_size=hp["batch_size"],
                 max_epochs=hp["max_epochs"], precision=hp["precision"], accelerator=cfg.trainer.get("accelerator"),
                 seed=hp["seed"], output_dir=cfg.paths.output_dir)
    if not cfg.get("train", True) or not cfg.get("test", True):
        items.update(train=bool(cfg.get("train", True)), test=bool(cfg.get("test", True)))
    if hp["tta"] != "none":
        items["tta"] = hp["tta"]
    if cfg.get("ckpt_path"):
        items["ckpt_path"] = cfg.ckpt_path
    return ", ".join(f"{k}={v}" for k, v in items.items())


def progress_bar_enabled(setting: bool | None, callbacks: list[Callback] = ()) -> bool:
    """trainer.enable_progress_bar: null = only when stdout is a terminal. Elsewhere (nohup, SLURM,
    a pipe) Rich's bar prints just its last frame; the per-epoch lines of EpochSummary remain."""
    from lightning.pytorch.callbacks import ProgressBar

    if any(isinstance(cb, ProgressBar) for cb in callbacks):
        return True  # one was configured explicitly
    if setting is None:
        return bool(getattr(sys.stdout, "isatty", lambda: False)())
    return bool(setting)


# The key choices agecls.eval logs in its one-line summary ({label: config key}).
EVAL_SUMMARY = {
    "ckpt_path": "ckpt_path",
    "split": "eval.split",
    "tta": "tta",
    "data": "data.source",
    "root": "data.root",
    "batch_size": "eval.batch_size",
    "accelerator": "trainer.accelerator",
    "precision": "trainer.precision",
    "output_dir": "paths.output_dir",
}
