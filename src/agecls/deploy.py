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

The graph returns `age` (years, clipped to `age_range`), `age_raw` (the unclipped output) and,
exports that carry an `interval`, `age_low_raw` / `age_high_raw`: the base of the per-face interval, which
the spec's `interval` (coverage, margin; agecls.intervals) widens into the calibrated interval.

The same spec is stored in the `.onnx` file itself (metadata_props, key `agecls_spec`), so an
`.onnx` alone predicts correctly; `read_spec` checks every field (types, the spec version, the
steps, short_side against image_size and crop_pct, the input against the graph's, the age range)
and, where a `.json` sits beside the `.onnx`, that it says what the graph's copy says. A bad or
edited spec raises SpecError naming the file and the key.

This module imports only numpy, Pillow and (to run a model) onnxruntime, so it is the reference
for deploying where torch is not installed; agecls.predict uses it for `.onnx` models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agecls.intervals import Calibration, CalibrationError

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


class SpecError(ValueError):
    """An exported model's spec (its `.json`, or the copy in the `.onnx` file's metadata) is invalid
    or disagrees with the graph: the message names the file and the key."""


# The key of the spec (JSON text) in an exported .onnx file's metadata_props: the graph's own copy,
# so an .onnx alone says how to feed it; where a .json sits beside it as well, the two must agree.
METADATA_KEY = "agecls_spec"

# Spec versions this module reads: 0 = the first exports' .json (no `preprocess`; rebuilt from
# image_size and crop_pct), then every version up to SPEC_VERSION.
KNOWN_SPEC_VERSIONS = tuple(range(0, SPEC_VERSION + 1))

# The steps `preprocess` implements, in order: a spec naming other steps (or these in another
# order) describes a preprocessing this module cannot reproduce.
PREPROCESS_OPS = ("decode", "exif_transpose", "resize", "center_crop", "to_float")

FORMATS = ("onnx", "torchscript")


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, str, bool)) or value is None else repr(value)


class _Checker:
    """Checks of one spec from one file; every failure names the file and the key."""

    def __init__(self, spec: Any, source: str) -> None:
        self.spec, self.source = spec, source

    def fail(self, key: str, value: Any, allowed: str) -> None:
        raise SpecError(f"{self.source}: {key}={_show(value)}: {allowed}")

    def get(self, key: str, container: Any = None, required: bool = True) -> Any:
        container = self.spec if container is None else container
        name = key.rsplit(".", 1)[-1].split("]")[-1]
        if name not in container:
            if required:
                raise SpecError(f"{self.source}: {key} is missing; export the model again (python -m agecls.export)")
            return None
        return container[name]

    def integer(self, key: str, value: Any, minimum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, value, "must be an integer")
        if minimum is not None and value < minimum:
            self.fail(key, value, f"must be an integer >= {minimum}")
        return int(value)

    def number(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            self.fail(key, value, "must be a finite number")
        return float(value)

    def text(self, key: str, value: Any, allowed: Sequence[str] = ()) -> str:
        if not isinstance(value, str):
            self.fail(key, value, "must be a string" + (f": one of {', '.join(allowed)}" if allowed else ""))
        if allowed and value not in allowed:
            self.fail(key, value, f"must be one of {', '.join(allowed)}")
        return value

    def mapping(self, key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, value, "must be a JSON object")
        return value

    def sequence(self, key: str, value: Any, length: int | None = None) -> list[Any]:
        if not isinstance(value, list) or (length is not None and len(value) != length):
            self.fail(key, value, "must be a list" + (f" of {length} values" if length is not None else ""))
        return value


def check_spec(spec: Any, source: str) -> dict[str, Any]:
    """`spec` (a parsed .json or metadata copy) checked field by field; raises SpecError naming
    `source` and the key. Returns it unchanged."""
    c = _Checker(spec, source)
    if not isinstance(spec, dict):
        raise SpecError(f"{source}: the spec is a {type(spec).__name__}, not a JSON object")
    version = c.integer("spec_version", c.get("spec_version"))
    if version not in KNOWN_SPEC_VERSIONS:
        c.fail("spec_version", version, f"this agecls reads spec versions {KNOWN_SPEC_VERSIONS[0]} to "
                                        f"{KNOWN_SPEC_VERSIONS[-1]}; export the model again with this agecls, or upgrade agecls")
    c.text("backbone", c.get("backbone"))
    size = c.integer("image_size", c.get("image_size"), minimum=1)
    crop_pct = c.number("crop_pct", c.get("crop_pct"))
    if not 0 < crop_pct <= 1:
        c.fail("crop_pct", crop_pct, "must be in (0, 1]")
    fmt = c.get("format", required=False)
    if fmt is not None:
        c.text("format", fmt, FORMATS)

    inp = c.mapping("input", c.get("input"))
    c.text("input.name", c.get("input.name", inp))
    for key, want in (("dtype", "float32"), ("layout", "NCHW"), ("channel_order", "RGB")):
        c.text(f"input.{key}", c.get(f"input.{key}", inp), (want,))
    vrange = c.sequence("input.value_range", c.get("input.value_range", inp), 2)
    if [c.number("input.value_range", v) for v in vrange] != [0.0, 1.0]:
        c.fail("input.value_range", vrange, "must be [0.0, 1.0] (uint8 pixels / 255)")
    shape = c.sequence("input.shape", c.get("input.shape", inp), 4)
    if shape[1:] != [3, size, size]:
        c.fail("input.shape", shape, f"must be [\"N\", 3, {size}, {size}] (NCHW at image_size={size})")

    steps = c.sequence("preprocess", c.get("preprocess"))
    ops = [c.text(f"preprocess[{i}].op", c.get(f"preprocess[{i}].op", c.mapping(f"preprocess[{i}]", s)))
           for i, s in enumerate(steps)]
    unknown = [op for op in ops if op not in PREPROCESS_OPS]
    if unknown:
        c.fail("preprocess", ops, f"unknown step {unknown[0]!r}; agecls.deploy implements {', '.join(PREPROCESS_OPS)}")
    if ops != list(PREPROCESS_OPS):
        c.fail("preprocess", ops, f"must be the steps {', '.join(PREPROCESS_OPS)}, in this order")
    i = PREPROCESS_OPS.index("resize")
    resize = steps[i]
    side = c.integer(f"preprocess[{i}].short_side", c.get(f"preprocess[{i}].short_side", resize), minimum=1)
    want_side = short_side(size, crop_pct)
    if side != want_side:
        c.fail(f"preprocess[{i}].short_side", side, f"must be floor(image_size / crop_pct) = floor({size} / {crop_pct:g}) "
                                                    f"= {want_side}, the resize the model was trained and evaluated with")
    c.text(f"preprocess[{i}].interpolation", resize.get("interpolation", "bilinear"), tuple(_RESAMPLE))
    if not isinstance(resize.get("antialias", True), bool):
        c.fail(f"preprocess[{i}].antialias", resize["antialias"], "must be true or false")
    i = PREPROCESS_OPS.index("center_crop")
    crop = c.sequence(f"preprocess[{i}].size", c.get(f"preprocess[{i}].size", steps[i]), 2)
    if [c.integer(f"preprocess[{i}].size", v) for v in crop] != [size, size]:
        c.fail(f"preprocess[{i}].size", crop, f"must be [{size}, {size}] (image_size)")
    i = PREPROCESS_OPS.index("to_float")
    scale = c.number(f"preprocess[{i}].scale", c.get(f"preprocess[{i}].scale", steps[i]))
    if not math.isclose(scale, 1.0 / 255.0, rel_tol=1e-6):
        c.fail(f"preprocess[{i}].scale", scale, "must be 1/255 (the graph takes pixels in [0, 1])")

    low, high = (c.number("age_range", v) for v in c.sequence("age_range", c.get("age_range"), 2))
    if not low < high:
        c.fail("age_range", [low, high], "must be [low, high] with low < high (years)")
    outputs = c.get("outputs", required=False)
    if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)
                                    and "age_raw" in outputs):
        c.fail("outputs", outputs, "must be a list of the graph's output names, age_raw among them")
    if spec.get("interval") is not None:
        try:
            Calibration.from_spec(spec["interval"], source)
        except CalibrationError as err:
            raise SpecError(str(err)) from None
        if outputs is not None and not {"age_low_raw", "age_high_raw"} <= set(outputs):
            c.fail("outputs", outputs, "an `interval` needs the graph outputs age_low_raw and age_high_raw")
    return spec


def _differences(a: Any, b: Any, key: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(key, value in a, value in b) wherever two specs differ (numbers compared to 1e-9)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            yield from _differences(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        if not any(isinstance(v, (dict, list)) for v in (*a, *b)):  # a list of values (age_range): as a whole
            if any(True for _ in (d for x, y in zip(a, b, strict=True) for d in _differences(x, y))):
                yield key, a, b
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _differences(x, y, f"{key}[{i}]")
    elif (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
          and not isinstance(b, bool)):
        if not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9):
            yield key, a, b
    elif a != b:
        yield key, a, b


def _legacy(spec: dict[str, Any]) -> dict[str, Any]:
    """A .json written before the spec named its steps (version 0: image_size, crop_pct, backbone):
    the spec of what export did then."""
    if not isinstance(spec.get("image_size"), int) or isinstance(spec.get("image_size"), bool):
        raise SpecError(f"image_size={_show(spec.get('image_size'))}: must be an integer")
    new = preprocessing_spec(spec["image_size"], spec.get("crop_pct", DEFAULT_CROP_PCT),
                             spec.get("age_range") or (0.0, 100.0), spec.get("backbone", ""))
    return {**new, **{k: spec[k] for k in ("image_size", "crop_pct", "format") if k in spec}}


def graph_metadata(session: Any) -> dict[str, str]:
    """The metadata_props of an onnxruntime session's model (custom_metadata_map)."""
    return dict(session.get_modelmeta().custom_metadata_map or {})


def _onnx_session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_graph(spec: dict[str, Any], session: Any, source: str) -> None:
    """The spec's input against the graph's own input."""
    graph_input = session.get_inputs()[0]
    want = spec["input"]
    if graph_input.name != want["name"]:
        raise SpecError(f"{source}: input.name={_show(want['name'])}, but the graph's input is named {graph_input.name!r}")
    names = [o.name for o in session.get_outputs()]
    missing = [o for o in spec.get("outputs") or ["age_raw"] if o not in names]
    if missing:
        raise SpecError(f"{source}: outputs names {missing}, which the graph does not have (it has {names}); "
                        f"the .json belongs to another model")
    dims = list(graph_input.shape)
    if len(dims) != 4 or any(isinstance(g, int) and g != w for g, w in zip(dims[1:], want["shape"][1:], strict=True)):
        raise SpecError(f"{source}: input.shape={_show(want['shape'])} (image_size={spec['image_size']}), but the "
                        f"graph takes {dims}; the .json belongs to another model")


def read_spec(model_path: str | Path, session: Any = None) -> dict[str, Any]:
    """The checked spec of an exported model: the copy in the `.onnx` file's metadata (the graph's
    own) and the `.json` beside the model, whichever exist; where both do, they must agree. For an
    .onnx the spec's input is also checked against the graph's input (`session`: an onnxruntime
    session of it, built here if None). Raises SpecError naming the file and the key."""
    path = Path(model_path)
    json_path = path.with_suffix(".json")
    specs: dict[str, dict[str, Any]] = {}
    if path.suffix.lower() == ".onnx" and path.is_file():
        session = session if session is not None else _onnx_session(path)
        text = graph_metadata(session).get(METADATA_KEY)
        if text is not None:
            source = f"{path} (metadata_props[{METADATA_KEY!r}])"
            try:
                specs[source] = check_spec(json.loads(text), source)
            except json.JSONDecodeError as err:
                raise SpecError(f"{source}: not valid JSON ({err})") from None
    if json_path.is_file() and json_path != path:
        try:
            spec = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise SpecError(f"{json_path}: not valid JSON ({err})") from None
        if isinstance(spec, dict) and "spec_version" not in spec and "preprocess" not in spec:
            try:
                spec = _legacy(spec)
            except SpecError as err:
                raise SpecError(f"{json_path}: {err}") from None
        specs[str(json_path)] = check_spec(spec, str(json_path))
    if not specs:
        raise FileNotFoundError(f"{json_path} is missing (and {path.name} carries no spec in its metadata): an exported "
                                f"model needs the .json agecls.export writes beside it")
    (graph_source, spec), *others = specs.items()
    for other_source, other in others:
        diffs = list(_differences(other, spec))
        if diffs:
            key, mine, theirs = diffs[0]
            more = f" (and {len(diffs) - 1} more: {', '.join(k for k, _, _ in diffs[1:6])})" if len(diffs) > 1 else ""
            raise SpecError(f"{key} differs: {_show(mine)} in {other_source}, but {_show(theirs)} in {graph_source}, "
                            f"the copy the graph was exported with{more}; delete or replace the .json (the .onnx "
                            f"carries its spec), or export the model again")
    if session is not None:
        _check_graph(spec, session, graph_source)
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
    """An exported `.onnx` (its spec from its metadata, or the `.json` beside it; read_spec):
    ages from preprocessed uint8 batches, via onnxruntime."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(self.path), providers=providers)
        self.spec = read_spec(self.path, self.session)  # checked, and against this graph
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.image_size = int(self.spec["image_size"])
        self.age_range = tuple(float(v) for v in self.spec.get("age_range") or (0.0, 100.0))
        interval = self.spec.get("interval")
        # the calibrated margin of the graph's base interval, at the one coverage it was exported for
        # (None: exported from a model without calibration, or by an older agecls)
        self.calibration = None if interval is None else Calibration.from_spec(interval, str(self.path))
        self.coverage = None if interval is None else float(interval["coverage"])

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """age_raw, low_raw, high_raw (years, unclipped; the interval before its margin) of a uint8
        (N, 3, S, S) batch. A graph without the interval outputs gives the age as both ends."""
        outputs = self.session.run(None, {self.input_name: to_input(batch)})
        named = dict(zip(self.output_names, outputs, strict=True))
        raw = np.asarray(named.get("age_raw", outputs[0]), dtype=np.float64).reshape(-1)
        return {"age_raw": raw,
                "low_raw": np.asarray(named.get("age_low_raw", raw), dtype=np.float64).reshape(-1),
                "high_raw": np.asarray(named.get("age_high_raw", raw), dtype=np.float64).reshape(-1)}

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """The unclipped ages of a uint8 (N, 3, S, S) batch."""
        return self.outputs(batch)["age_raw"]

    def clip(self, ages: np.ndarray) -> np.ndarray:
        return np.clip(ages, *self.age_range)
