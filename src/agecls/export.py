"""Export a checkpoint to ONNX or TorchScript, and check it predicts what the checkpoint does.

    python -m agecls.export ckpt_path=PATH format=onnx
    python -m agecls.export ckpt_path=PATH format=torchscript verify_input=some/faces/

The exported graph maps float RGB in [0, 1], (N, 3, S, S), to `age` (years, clipped to the model's
age range), `age_raw`, and `age_low_raw` / `age_high_raw`: the base of the per-face interval at the
export's `coverage`, to be widened by the calibrated margin the spec records (`interval`,
agecls.intervals). The `.json` beside it names every preprocessing step and the age range
(agecls.deploy.preprocessing_spec); an .onnx also carries it in its metadata_props (`agecls_spec`), so
the .onnx alone is enough. `agecls.predict ckpt_path=model.onnx` (and agecls.AgeEstimator) runs it
with onnxruntime.

The output is checked before the checkpoint is read (not the checkpoint itself, not a folder, the
format's extension, writable, and an existing file only with overwrite=true); the model is exported
into a temporary folder beside it, verified, and only then moved into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from agecls.data.images import list_images, load_rgb
from agecls.data.transforms import eval_transform
from agecls.deploy import METADATA_KEY, check_spec, preprocessing_spec
from agecls.eval import load_checkpoint
from agecls.intervals import DEFAULT_COVERAGE
from agecls.models.module import AgeRegressor, ClippedAgeNet
from agecls.utils.checks import ConfigValueError, check_number
from agecls.utils.hydra_utils import config_dir, entry_point
from agecls.utils.safe_output import atomic_write, check_output

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


def export_model(model: AgeRegressor, fmt: str, output: Path, opset: int = 18,
                 coverage: float = DEFAULT_COVERAGE) -> Path:
    """`model` written to `output` (and its spec to the .json beside it, and into an .onnx's
    metadata): the graph images -> age, age_raw, age_low_raw, age_high_raw (ClippedAgeNet), the
    base interval at `coverage`, whose calibrated margin the spec's `interval` records."""
    if fmt not in FORMATS:
        raise ConfigValueError(f"format={fmt!r}; choose {' or '.join(FORMATS)}")
    calibration = model.calibration
    interval = calibration.at(coverage) if calibration is not None else None  # a coverage it lacks: fails here
    # the plain nn.Module inside the LightningModule: float RGB in [0, 1] (N, 3, S, S) -> ages (N,),
    # clipped to the model's age range, the raw ages and the base interval
    wrapper = ClippedAgeNet(model.net, coverage).eval()
    size = int(model.hparams.image_size)
    example = torch.rand(2, 3, size, size)
    # how to feed it, beside the model and (ONNX) inside it: every preprocessing step and the age range
    meta = preprocessing_spec(size, float(model.hparams.crop_pct),
                              (float(model.net.age_min), float(model.net.age_max)), model.hparams.backbone["name"])
    meta["format"] = fmt
    meta["outputs"] = list(ClippedAgeNet.OUTPUTS)
    if interval is not None:
        meta["interval"] = interval
    check_spec(meta, f"the spec of {output}")  # what read_spec will accept, before anything is written
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(output) as tmp, torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(wrapper, example, check_trace=False)
            traced.save(str(tmp))
        else:
            torch.onnx.export(
                wrapper, (example,), str(tmp), input_names=["image"], output_names=list(ClippedAgeNet.OUTPUTS),
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
                opset_version=opset, dynamo=True, external_data=False,
            )
            store_spec_in_onnx(tmp, meta)
    with atomic_write(output.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return output


def store_spec_in_onnx(path: Path, spec: dict) -> None:
    """The spec as JSON text in the .onnx file's metadata_props (agecls.deploy.METADATA_KEY), so the
    graph carries its own preprocessing and age range."""
    import onnx

    proto = onnx.load(str(path))
    for prop in [p for p in proto.metadata_props if p.key == METADATA_KEY]:
        proto.metadata_props.remove(prop)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(spec, sort_keys=True))
    onnx.save(proto, str(path))


def run_exported(path: Path, fmt: str, batch: torch.Tensor) -> tuple[np.ndarray, ...]:
    """The exported model's outputs (ClippedAgeNet.OUTPUTS: age, age_raw, age_low_raw,
    age_high_raw) for a float batch."""
    if fmt == "torchscript":
        module = torch.jit.load(str(path))
        with torch.no_grad():
            return tuple(t.numpy() for t in module(batch))
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return tuple(session.run(list(ClippedAgeNet.OUTPUTS), {session.get_inputs()[0].name: batch.numpy()}))


def max_difference(model: AgeRegressor, path: Path, fmt: str, batch: torch.Tensor,
                   coverage: float = DEFAULT_COVERAGE) -> float:
    """Largest difference (years) between the exported model's outputs and the checkpoint's:
    clipped and raw ages, and the base interval."""
    with torch.no_grad():
        expected = [t.numpy() for t in ClippedAgeNet(model.eval().net, coverage)(batch)]
    got = run_exported(path, fmt, batch)
    return max(float(np.abs(g.reshape(-1) - e.reshape(-1)).max()) for g, e in zip(got, expected, strict=True))


def export_checked(cfg: DictConfig) -> Path:
    """agecls.export: every value and the output checked before the model is read; exported into a
    temporary file, verified, and only then moved to `output` (a model that fails verification
    replaces nothing)."""
    fmt = cfg.format
    if fmt not in FORMATS:
        raise ConfigValueError(f"format={fmt!r}; choose {' or '.join(FORMATS)}")
    coverage = float(check_number("coverage", cfg.coverage, minimum=0.0, maximum=1.0))
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt.is_file():
        raise ConfigValueError(f"ckpt_path={str(cfg.ckpt_path)!r} is not a file; give a .ckpt written by agecls.train")
    overwrite = bool(cfg.get("overwrite", False))
    output = check_output(cfg.output or ckpt.with_suffix(FORMATS[fmt]), key="output", suffixes=(FORMATS[fmt],),
                          inputs=[ckpt], overwrite=overwrite)
    check_output(output.with_suffix(".json"), key="output's .json", suffixes=(".json",), inputs=[ckpt],
                 overwrite=overwrite)
    model, _ = load_checkpoint(ckpt)
    model.eval()
    if model.calibration is None:
        log.warning("%s has no interval calibration (trained before agecls made one): the export has no `interval`; "
                    "run python -m agecls.calibrate ckpt_path=%s first for per-face intervals", ckpt, ckpt)
    else:
        model.calibration.margin(coverage)  # a coverage it was not calibrated at: refused before exporting
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.stem}.export-", dir=output.parent))
    try:
        staged = export_model(model, fmt, staging / output.name, int(cfg.opset), coverage)
        if cfg.verify:
            batch = sample_batch(model, cfg.verify_input, int(cfg.verify_batch))
            diff = max_difference(model, staged, fmt, batch, coverage)
            if diff > float(cfg.tolerance):
                raise RuntimeError(f"the exported model differs from the checkpoint by {diff:.2e} years (tolerance "
                                   f"{cfg.tolerance}); nothing was written to {output}")
            log.info("Verified on %d images: largest difference %.2e years", len(batch), diff)
        for src in (staged.with_suffix(".json"), staged):  # the model last: it is what is looked for
            os.replace(src, output.with_suffix(src.suffix))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("Wrote %s (%s) and %s", output, fmt, output.with_suffix(".json").name)
    return output


@entry_point
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    export_checked(cfg)


if __name__ == "__main__":
    main()
