"""Calibrate a checkpoint's per-face age intervals on a validation split (agecls.intervals).

    python -m agecls.calibrate ckpt_path=PATH                       # PATH's stem + .calibrated.ckpt
    python -m agecls.calibrate ckpt_path=PATH output=new.ckpt 'levels=[0.5,0.9,0.99]'
    python -m agecls.calibrate ckpt_path=PATH data=utkface data.root=DIR   # another data set's val split

Training calibrates every model at the end of each validation epoch; this command is for a
checkpoint written before agecls did (or to add coverage levels, or to calibrate on other faces).
Without `data=` it runs the checkpoint's own validation split, exactly its images (checked by
content hash, as agecls.eval does). The margins are written into a copy of the checkpoint (key
`agecls_calibration`): the input checkpoint is never modified, and an existing output is replaced
only with overwrite=true.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from agecls.eval import build_datamodule, load_checkpoint
from agecls.intervals import CHECKPOINT_KEY, LEVELS, Calibration
from agecls.models.module import AgeRegressor
from agecls.utils.checks import ConfigValueError, check_number, check_tta
from agecls.utils.hydra_utils import config_dir, entry_point
from agecls.utils.progress import progress
from agecls.utils.safe_output import atomic_write, check_output

log = logging.getLogger(__name__)


def check_levels(levels: Any) -> tuple[float, ...]:
    """The coverages to calibrate at (None: LEVELS), checked."""
    if levels is None:
        return LEVELS
    values = OmegaConf.to_container(levels) if OmegaConf.is_config(levels) else levels
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigValueError(f"levels={values!r}: give a list of coverages in (0, 1), e.g. 'levels=[0.8,0.9,0.95]'")
    for v in values:
        check_number("levels", v, minimum=0.0, maximum=1.0)
        if not 0 < float(v) < 1:
            raise ConfigValueError(f"levels={values!r}: each coverage must lie strictly between 0 and 1")
    return tuple(sorted({float(v) for v in values}))


def calibrate(model: AgeRegressor, loader: Any, levels: tuple[float, ...], tta: str = "none",
              device: torch.device | str = "cpu", **extra: Any) -> Calibration:
    """The margins at `levels` of `model`'s base intervals (AgeNet.interval_from_outputs) on the
    faces of `loader` (batches with `image` and `age`), predicted with test-time augmentation `tta`."""
    net = model.net.to(device).eval()
    ages, lows, highs = [], [], []
    with torch.inference_mode():
        for batch in progress(loader, desc="Calibrating", unit="batch"):
            images = batch["image"].to(device)
            outputs = [net(v, head_output=True) for v in net.tta_views(images, tta)]
            _, low, high = net.interval_from_outputs(outputs, levels)
            ages.append(batch["age"].double().numpy())
            lows.append(low.double().cpu().numpy())
            highs.append(high.double().cpu().numpy())
    if not ages:
        raise ConfigValueError("the calibration split holds no images; name a data set with data=... data.root=...")
    age, low, high = np.concatenate(ages), np.concatenate(lows), np.concatenate(highs)
    return Calibration.fit(age, {c: low[:, i] for i, c in enumerate(levels)}, {c: high[:, i] for i, c in enumerate(levels)},
                           model.net.loss.interval_base, tta=tta, **extra)


def run(cfg: DictConfig) -> Path:
    levels = check_levels(cfg.levels)
    tta = check_tta(cfg.get("tta", "none"))
    ckpt_path = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt_path.is_file():
        raise ConfigValueError(f"ckpt_path={str(cfg.ckpt_path)!r} is not a file; give a .ckpt written by agecls.train")
    output = check_output(cfg.output or ckpt_path.with_name(ckpt_path.stem + ".calibrated.ckpt"), key="output",
                          suffixes=(".ckpt",), inputs=[ckpt_path], overwrite=bool(cfg.overwrite))
    model, ckpt = load_checkpoint(ckpt_path)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.eval.split = "val"
    datamodule = build_datamodule(cfg, model, ckpt, output_dir)
    datamodule.setup("test")
    calibration = calibrate(model, datamodule.test_dataloader(), levels, tta,
                            "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu",
                            data=str(datamodule.hparams.get("source", "")))
    ckpt[CHECKPOINT_KEY] = calibration.to_dict()
    with atomic_write(output) as tmp:
        torch.save(ckpt, tmp)
    shown = ", ".join(f"{k}: +-{v:.2f} y" for k, v in calibration.margins.items())
    log.info("Calibrated on %d validation faces (%s): margins %s; wrote %s", calibration.n, calibration.base, shown, output)
    return output


@entry_point
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="calibrate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

