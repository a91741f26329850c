"""Export a checkpoint to ONNX or TorchScript, and check it predicts what the checkpoint does.

    python -m agecls.export ckpt_path=PATH format=onnx
    python -m agecls.export ckpt_path=PATH format=torchscript verify_input=some/faces/

The exported graph maps float RGB in [0, 1], (N, 3, S, S), to `age` (years, clipped to the model's
age range) and `age_raw`. The `.json` beside it names every preprocessing step and the age range
(agecls.deploy.preprocessing_spec); `agecls.predict ckpt_path=model.onnx` runs it with onnxruntime.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from agecls.data.images import list_images, load_rgb
from agecls.data.transforms import eval_transform
from agecls.deploy import preprocessing_spec
from agecls.eval import load_checkpoint
from agecls.models.module import AgeRegressor, ClippedAgeNet
from agecls.utils.hydra_utils import config_dir

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


def sample_batch(model: AgeRegressor, folder: str | None, n: int) -> torch.Tensor:
    """n images from `folder`, preprocessed as in evaluation, or random pixels."""
    size = int(model.hparams.image_size)
    if folder:
        tf = eval_transform(size, float(model.hparams.crop_pct))
        images = []
        for f in list_images(folder):
            try:
                images.append(tf(load_rgb(f)))
            except Exception as err:  # a broken file in the folder is not the export's problem
                log.warning("Skipping %s for verification: %s", f, err)
            if len(images) == n:
                break
        if not images:
            raise FileNotFoundError(f"verify_input={folder!r} holds no readable images")
        return torch.stack(images).float() / 255.0
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def export_model(model: AgeRegressor, fmt: str, output: Path, opset: int = 18) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; choose {' or '.join(FORMATS)}")
    # the plain nn.Module inside the LightningModule: float RGB in [0, 1] (N, 3, S, S) -> ages (N,),
    # clipped to the model's age range, and the raw ages
    wrapper = ClippedAgeNet(model.net).eval()
    size = int(model.hparams.image_size)
    example = torch.rand(2, 3, size, size)
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(wrapper, example, check_trace=False)
            traced.save(str(output))
        else:
            torch.onnx.export(
                wrapper, (example,), str(output), input_names=["image"], output_names=["age", "age_raw"],
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
                opset_version=opset, dynamo=True, external_data=False,
            )
    # how to feed it, beside the model: every preprocessing step and the age range
    meta = preprocessing_spec(size, float(model.hparams.crop_pct),
                              (float(model.net.age_min), float(model.net.age_max)), model.hparams.backbone["name"])
    meta["format"] = fmt
    output.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return output


def run_exported(path: Path, fmt: str, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The exported model's (clipped ages, raw ages) for a float batch."""
    if fmt == "torchscript":
        module = torch.jit.load(str(path))
        with torch.no_grad():
            age, raw = module(batch)
        return age.numpy(), raw.numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    age, raw = session.run(["age", "age_raw"], {session.get_inputs()[0].name: batch.numpy()})
    return age, raw


def max_difference(model: AgeRegressor, path: Path, fmt: str, batch: torch.Tensor) -> float:
    """Largest difference (years) between the exported and the checkpoint's ages, clipped and raw."""
    with torch.no_grad():
        raw = model.eval()(batch)
        expected = (model.net.clip(raw).numpy(), raw.numpy())
    got = run_exported(path, fmt, batch)
    return max(float(np.abs(g.reshape(-1) - e.reshape(-1)).max()) for g, e in zip(got, expected, strict=True))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    model, _ = load_checkpoint(cfg.ckpt_path)
    model.eval()
    output = Path(cfg.output) if cfg.output else Path(cfg.ckpt_path).with_suffix(FORMATS.get(cfg.format, ""))
    export_model(model, cfg.format, output, int(cfg.opset))
    log.info("Wrote %s (%s)", output, cfg.format)
    if cfg.verify:
        batch = sample_batch(model, cfg.verify_input, int(cfg.verify_batch))
        diff = max_difference(model, output, cfg.format, batch)
        if diff > float(cfg.tolerance):
            raise RuntimeError(f"the exported model differs from the checkpoint by {diff:.2e} years "
                               f"(tolerance {cfg.tolerance}); {output} was written but should not be trusted")
        log.info("Verified on %d images: largest difference %.2e years", len(batch), diff)


if __name__ == "__main__":
    main()
