"""Running an exported model without torch: the preprocessing its `.json` names, and onnxruntime.

`agecls.export format=onnx` writes `<name>.onnx` and `<name>.json`. The `.json` (`preprocessing_spec`)
names every step from a photo file to the model's input, and the age range the graph clamps to:

1. decode to 8-bit RGB (transparent pixels on white), then apply the EXIF orientation tag;
2. crop the face (agecls.predict: a detected box widened by `face_margin`), if any;
3. resize so the short side is `short_side` = floor(image_size / crop_pct) and the long side
   int(short_side * long / short), bilinear with antialiasing (Pillow's `Image.resize(...,
   BILINEAR)`, which torchvision's Resize calls on PIL images);
4. centre-crop `image_size` x `image_size`, top-left corner at (round((w - size) / 2),
   round((h - size) / 2)) with Python's round (halves to even), zero-padded if smaller;
5. float32 in [0, 1] (uint8 / 255), RGB, NCHW. The backbone's normalisation is inside the graph.

The graph returns `age` (years, clipped to `age_range`) and `age_raw` (the unclipped output).

This module imports only numpy, Pillow and (to run a model) onnxruntime, so it is the reference
for deploying where torch is not installed; agecls.predict uses it for `.onnx` models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SPEC_VERSION = 1

# The share of the resized image the centre crop keeps, unless a backbone's config says otherwise
# (conf/data/_base.yaml: data.crop_pct = backbone.crop_pct where set, else this): resize to
# image_size / crop_pct, crop image_size (224 of 256, as ImageNet evaluation does). Defined here, the
# torch-free reference for preprocessing; agecls.data.transforms and the Python defaults use it.
DEFAULT_CROP_PCT = 0.875

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def short_side(image_size: int, crop_pct: float) -> int:
    """Side the short edge is resized to before the centre crop (agecls.data.transforms.eval_resize)."""
    return int(math.floor(int(image_size) / float(crop_pct or 1.0)))


def preprocessing_spec(image_size: int, crop_pct: float, age_range: tuple[float, float], backbone: str,
                       input_name: str = "image") -> dict[str, Any]:
    """What the exported model's `.json` says: everything needed to feed it and read it."""
    size = int(image_size)
    return {
        "spec_version": SPEC_VERSION,
        "backbone": backbone,
        "image_size": size,
        "crop_pct": float(crop_pct),
        "input": {"name": input_name, "dtype": "float32", "layout": "NCHW", "channel_order": "RGB",
                  "value_range": [0.0, 1.0], "shape": ["N", 3, size, size],
                  "note": "uint8 pixels / 255; the backbone's mean/std normalisation is inside the graph"},
        "preprocess": [
            {"op": "decode", "to": "RGB", "bit_depth": 8, "transparent_background": [255, 255, 255]},
            {"op": "exif_transpose", "note": "turn the decoded image upright by its EXIF Orientation tag"},
            {"op": "resize", "short_side": short_side(size, crop_pct), "long_side": "int(short_side * long / short)",
             "interpolation": "bilinear", "antialias": True, "implementation": "PIL.Image.resize(..., BILINEAR)"},
            {"op": "center_crop", "size": [size, size], "offset": "round((w - size) / 2), round((h - size) / 2)",
             "rounding": "half to even (Python round)", "pad": "zeros, when the image is smaller"},
            {"op": "to_float", "scale": 1.0 / 255.0, "dtype": "float32"},
        ],
        "outputs": {"age": "age in years, clipped to age_range, shape (N,)",
                    "age_raw": "the unclipped output, shape (N,)"},
        "age_range": [float(age_range[0]), float(age_range[1])],
    }


def read_spec(model_path: str | Path) -> dict[str, Any]:
    """The `.json` beside an exported model."""
    path = Path(model_path).with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: an exported model needs the .json agecls.export writes beside it")
    spec = json.loads(path.read_text())
    if "preprocess" not in spec:  # written before the spec named its steps: what export did then
        spec = {**preprocessing_spec(spec["image_size"], spec.get("crop_pct", DEFAULT_CROP_PCT), spec.get("age_range") or (0.0, 100.0),
                                     spec.get("backbone", "")), **{k: spec[k] for k in ("image_size", "crop_pct") if k in spec}}
    return spec


def _step(spec: dict[str, Any], op: str) -> dict[str, Any]:
    return next((s for s in spec["preprocess"] if s.get("op") == op), {})


def preprocess(image: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """An upright RGB PIL image (agecls.data.images.load_rgb, cropped to the face if any) ->
    uint8 (3, S, S), RGB: the resize and centre crop of `spec`. Divide by 255 for the model."""
    resize, crop = _step(spec, "resize"), _step(spec, "center_crop")
    interpolation = resize.get("interpolation", "bilinear")
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation {interpolation!r} in the model's .json; known: {', '.join(_RESAMPLE)}")
    if resize.get("antialias") is False and interpolation != "nearest":
        raise ValueError("antialias=false: Pillow always antialiases when it downsizes; this spec needs another resizer")
    img = image if image.mode == "RGB" else image.convert("RGB")
    side = int(resize["short_side"])
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = side, int(side * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=_RESAMPLE[interpolation])
    ch, cw = (int(v) for v in crop.get("size", [spec["image_size"]] * 2))
    arr = np.asarray(img)
    if ch > arr.shape[0] or cw > arr.shape[1]:
        top, left = max(0, (ch - arr.shape[0]) // 2), max(0, (cw - arr.shape[1]) // 2)
        bottom, right = max(0, (ch - arr.shape[0] + 1) // 2), max(0, (cw - arr.shape[1] + 1) // 2)
        arr = np.pad(arr, ((top, bottom), (left, right), (0, 0)))
    y0 = int(round((arr.shape[0] - ch) / 2.0))
    x0 = int(round((arr.shape[1] - cw) / 2.0))
    return np.ascontiguousarray(arr[y0:y0 + ch, x0:x0 + cw].transpose(2, 0, 1))


def to_input(batch: np.ndarray) -> np.ndarray:
    """uint8 (N, 3, S, S) -> the model's float32 input in [0, 1]."""
    return batch.astype(np.float32) / np.float32(255.0)


class OnnxAgeModel:
    """An exported `.onnx` with its `.json`: ages from preprocessed uint8 batches, via onnxruntime."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.spec = read_spec(self.path)
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(self.path), providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.image_size = int(self.spec["image_size"])
        self.age_range = tuple(float(v) for v in self.spec.get("age_range") or (0.0, 100.0))

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """The unclipped ages of a uint8 (N, 3, S, S) batch."""
        outputs = self.session.run(None, {self.input_name: to_input(batch)})
        named = dict(zip(self.output_names, outputs, strict=True))
        return np.asarray(named.get("age_raw", outputs[0]), dtype=np.float64).reshape(-1)

    def clip(self, ages: np.ndarray) -> np.ndarray:
        return np.clip(ages, *self.age_range)
