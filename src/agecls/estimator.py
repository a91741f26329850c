"""`agecls.AgeEstimator`: faces and ages in photos, from a trained checkpoint or an exported model.

    import agecls

    est = agecls.AgeEstimator.from_checkpoint("outputs/.../checkpoints/best.ckpt")  # or "model.onnx"
    faces = est.predict("group.jpg")         # a path, a PIL image, an RGB uint8 numpy array, or a list
    for face in faces:
        print(face.box, face.age, face.interval, face.status)
    est.draw("group.jpg", faces).save("group.annotated.jpg")

The one inference object of agecls: `agecls.predict` (the CLI) and `agecls.serve` (the web page and
JSON API) are thin shells over it, so all three find, align and age faces the same way.

Per photo, `predict` returns a list of `FaceAge`, largest face first:

- `box` (x0, y0, x1, y1) in pixels of the upright photo (EXIF orientation applied; x1, y1
  exclusive), `landmarks` (five points for mtcnn), the detector's `score`;
- `age` in years, clipped to the model's age range (`age_raw`: unclipped);
- `interval` (low, high): the range that holds the true age with probability `coverage` (90 % by
  default), split-conformal on the model's validation split (agecls.models.intervals); NaN for a
  model that was never calibrated;
- `status`: `ok`, or `whole_image` (no face found and `no_face="whole_image"`: the frame is
  aged), `no_face` (no face found: no age), `error` (the file could not be read: `error` says why).

With `detect_faces=False` each image is taken as one face crop (what `agecls.eval` tests on).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from agecls.data.images import crop_box, decode_rgb, load_rgb
from agecls.faces import (
    DEFAULT_DETECTOR,
    DETECTORS,
    Face,
    FaceDetector,
    align_face,
    build_detector,
    detector_template,
    face_template,
    largest_first,
)
from agecls.intervals import DEFAULT_COVERAGE
from agecls.utils.checks import ConfigValueError, check_number, check_tta

log = logging.getLogger(__name__)

STATUSES = ("ok", "whole_image", "no_face", "error")
FACES = ("all", "largest")
NO_FACE = ("skip", "whole_image")


@dataclass
class FaceAge:
    """One face of a photo (or the whole frame, or the photo's lack of a face): see the module docstring."""

    face: int | None
    box: tuple[int, int, int, int] | None
    landmarks: list[list[float]] | None
    score: float
    age: float
    age_raw: float
    interval: tuple[float, float]
    status: str
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes None, tuples lists."""
        def plain(v: Any) -> Any:
            if isinstance(v, float):
                return None if not math.isfinite(v) else round(v, 4)
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            return v
        return {k: plain(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class FaceOptions:
    """How faces are found and cut out: the options agecls.predict, agecls.serve and the API share
    (conf/estimator/default.yaml)."""

    detect_faces: bool = True
    detector: str = DEFAULT_DETECTOR
    min_score: float | None = None  # None: the detector's own default (agecls.faces)
    min_face_size: int = 30
    align: bool = True
    faces: str = "all"
    no_face: str = "skip"
    face_margin: float = 0.4

    def __post_init__(self) -> None:
        for key, value, choices in (("faces", self.faces, FACES), ("no_face", self.no_face, NO_FACE),
                                    ("detector", self.detector, tuple(DETECTORS))):
            if value not in choices:
                raise ConfigValueError(f"{key}={value!r}; choose {' or '.join(choices)}")
        if self.min_score is not None:
            check_number("min_score", self.min_score)
        check_number("min_face_size", self.min_face_size, minimum=1, integer=True)
        check_number("face_margin", self.face_margin, minimum=0.0)

    @classmethod
    def from_config(cls, cfg: Any) -> FaceOptions:
        """The options from a command's config (conf/estimator/default.yaml), their absence the defaults."""
        kinds = {"detect_faces": bool, "detector": str, "min_score": float, "min_face_size": int, "align": bool,
                 "faces": str, "no_face": str, "face_margin": float}
        return cls(**{k: kind(cfg[k]) for k, kind in kinds.items() if cfg.get(k) is not None})

    def build_detector(self) -> FaceDetector | None:
        """The configured detector (None without detection), thresholded at min_score where given."""
        if not self.detect_faces:
            return None
        detector = build_detector(self.detector, self.min_face_size)
        if self.min_score is None:
            return detector
        if hasattr(detector, "min_score"):
            detector.min_score = float(self.min_score)
            return detector
        return _ScoreFilter(detector, self.min_score)

    def template(self) -> dict[str, Any] | None:
        """The alignment template of the detector (None: box crops widened by face_margin)."""
        return face_template(self.detector) if self.detect_faces and self.align else None


class _ScoreFilter:
    """A detector without its own threshold, its faces kept where score >= min_score (NaN: kept)."""

    def __init__(self, detector: FaceDetector, min_score: float) -> None:
        self.inner, self.min_score, self.name = detector, float(min_score), getattr(detector, "name", None)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        return [f for f in self.inner.detect(rgb) if not math.isfinite(f.score) or f.score >= self.min_score]


# ------------------------------------------------------------------------------ the two backends
class CheckpointAges:
    """A .ckpt: preprocessing as in evaluation, the torch model, its age range and calibration."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        from agecls.data.transforms import eval_transform
        from agecls.eval import load_checkpoint

        model, _ = load_checkpoint(path)
        self.model = model.to(device).eval()
        self.device = device
        self.image_size = int(model.hparams.image_size)
        self.preprocess = eval_transform(self.image_size, float(model.hparams.crop_pct))
        self.calibration = getattr(model, "calibration", None)
        self.age_range = (float(model.net.age_min), float(model.net.age_max))
        self.hparams = dict(model.hparams)

    def __call__(self, batch: torch.Tensor, tta: str, coverage: float) -> dict[str, np.ndarray]:
        """age_raw, low_raw, high_raw (years, unclipped, before the conformal margin) of a uint8 (N, 3, S, S) batch."""
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            raw, low, high = self.model.net.predict_interval(x, coverage, tta)
            return {k: v.float().cpu().numpy().astype(np.float64) for k, v in
                    (("age_raw", raw), ("low_raw", low), ("high_raw", high))}


class OnnxAges:
    """An exported .onnx run by onnxruntime, fed as its spec says (agecls.deploy)."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        from agecls.deploy import OnnxAgeModel

        self.model = OnnxAgeModel(path, device=device.type)
        self.image_size = self.model.image_size
        self.preprocess = _OnnxPreprocess(self.model.spec)
        self.calibration = self.model.calibration
        self.age_range = tuple(float(v) for v in self.model.age_range)
        self.hparams = {"backbone": self.model.spec.get("backbone"), "image_size": self.image_size,
                        "crop_pct": self.model.spec.get("crop_pct")}

    def __call__(self, batch: torch.Tensor, tta: str, coverage: float) -> dict[str, np.ndarray]:
        if self.model.coverage is not None and not math.isclose(coverage, self.model.coverage):
            raise ConfigValueError(f"coverage={coverage:g}: {self.model.path.name} was exported for intervals at "
                                   f"coverage {self.model.coverage:g}; use coverage={self.model.coverage:g}, or export "
                                   f"again with agecls.export coverage={coverage:g}")
        x = batch.numpy()
        out = self.model.outputs(x)
        if tta == "flip":  # as AgeNet.tta_views and interval_from_outputs: the views' ages and interval ends averaged
            flipped = self.model.outputs(np.ascontiguousarray(x[..., ::-1]))
            out = {k: (out[k] + flipped[k]) / 2 for k in out}
        return {k: np.asarray(out[k], dtype=np.float64).reshape(-1) for k in ("age_raw", "low_raw", "high_raw")}


class _OnnxPreprocess:
    """agecls.deploy.preprocess with the model's spec, as a picklable callable for worker processes."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    def __call__(self, image: Any) -> torch.Tensor:
        from agecls.deploy import preprocess

        return torch.from_numpy(preprocess(image, self.spec))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigValueError(f"device={device!r}; choose auto, cpu or cuda") from None


def model_file(path: str | Path) -> Path:
    """The model file `path` names: a .ckpt or .onnx itself, or a training run's directory (its
    metrics.json's best checkpoint, else the one epoch_*.ckpt in its checkpoints/)."""
    p = Path(path).expanduser()
    if p.is_dir():
        run = p.parent if p.name == "checkpoints" else p
        import json

        try:
            best = json.loads((run / "metrics.json").read_text()).get("best_checkpoint")
        except (OSError, ValueError, AttributeError):
            best = None
        if best and Path(best).is_file():
            return Path(best)
        found = sorted((run / "checkpoints").glob("epoch_*.ckpt")) or sorted(run.glob("*.ckpt")) + sorted(run.glob("*.onnx"))
        if len(found) == 1:
            return found[0]
        raise FileNotFoundError(f"ckpt_path={str(path)!r} is a folder with {len(found) or 'no'} model files"
                                f"{': ' + ', '.join(f.name for f in found[:5]) if found else ''}; name the .ckpt or "
                                ".onnx (a training run's directory names its best checkpoint in metrics.json)")
    if not p.is_file():
        raise FileNotFoundError(f"ckpt_path={str(path)!r} is not a file; give a .ckpt written by agecls.train, an "
                                ".onnx written by agecls.export, or a training run's directory")
    return p


def load_backend(path: str | Path, device: torch.device) -> CheckpointAges | OnnxAges:
    """A checkpoint (.ckpt) or an exported ONNX model (.onnx), checked to exist first (model_file)."""
    p = model_file(path)
    return OnnxAges(p, device) if p.suffix.lower() == ".onnx" else CheckpointAges(p, device)


# ------------------------------------------------------------------------------- inputs
def as_image(x: Any) -> Image.Image:
    """An upright RGB PIL image from a path, a PIL image (its EXIF orientation applied) or an RGB
    uint8 numpy array (H, W, 3) or (H, W)."""
    if isinstance(x, (str, os.PathLike)):
        return load_rgb(x)
    if isinstance(x, Image.Image):
        return decode_rgb(x)
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (3, 4)):
            raise ValueError(f"a numpy image must be uint8 RGB (H, W, 3), RGBA (H, W, 4) or grey (H, W); got "
                             f"{x.dtype} {x.shape}. (OpenCV's BGR: pass img[..., ::-1])")
        return Image.fromarray(np.ascontiguousarray(x)).convert("RGB")
    raise TypeError(f"cannot read a photo from a {type(x).__name__}; give a path, a PIL image or an RGB uint8 numpy array")


def _no_age(status: str, face: int | None = None, box: Sequence[int] | None = None, score: float = math.nan,
            landmarks: Any = None, error: str = "") -> FaceAge:
    return FaceAge(face, None if box is None else tuple(int(v) for v in box),
                   None if landmarks is None else np.round(np.asarray(landmarks, dtype=float), 2).tolist(),
                   float(score), math.nan, math.nan, (math.nan, math.nan), status, error)


def image_faces(img: Image.Image, detector: FaceDetector | None, options: FaceOptions,
                template: dict[str, Any] | str | None = "auto") -> list[tuple[FaceAge, Image.Image | None]]:
    """The rows of one decoded, upright RGB image, each with the crop its age is predicted from
    (None: no age), ages not yet filled in. With `detector` None the whole frame is one face;
    otherwise each face found (options.faces), aligned by `template` ("auto": the detector's own,
    None: its box widened by options.face_margin). The one copy of the row logic."""
    whole = (0, 0, img.width, img.height)
    if detector is None:
        return [(_no_age("ok", 0, whole), img)]
    found: list[Face] = largest_first(detector.detect(np.asarray(img)))
    if options.faces == "largest":
        found = found[:1]
    if not found:
        if options.no_face == "whole_image":
            return [(_no_age("whole_image", None, whole), img)]
        return [(_no_age("no_face"), None)]
    if isinstance(template, str):
        template = detector_template(getattr(detector, "inner", detector))
    return [(_no_age("ok", k, face.box, face.score, face.landmarks),
             align_face(img, face, template) if template else crop_box(img, face.box, options.face_margin))
            for k, face in enumerate(found)]


class PhotoDataset(Dataset):
    """Per photo: its rows and their preprocessed crops, for a DataLoader over many files (the CLI).
    Never raises: a file that cannot be read yields one row with status `error`."""

    def __init__(self, items: Sequence[Any], preprocess: Callable[[Any], torch.Tensor], image_size: int,
                 options: FaceOptions, detector: FaceDetector | Callable[[], FaceDetector | None] | None,
                 template: dict[str, Any] | str | None) -> None:
        self.items, self.preprocess, self.image_size = list(items), preprocess, int(image_size)
        self.options, self.template = options, template
        self._detector = detector if hasattr(detector, "detect") else None
        self._make = None if self._detector is not None else detector  # built once per worker process

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rows: list[FaceAge] = []
        crops: list[torch.Tensor] = []
        try:
            img = as_image(self.items[i])  # upright: boxes are in the upright image's pixels
            if self._detector is None and self._make is not None:
                self._detector = self._make()
                self._make = None
            for row, crop in image_faces(img, self._detector, self.options, self.template):
                rows.append(row)
                if crop is not None:
                    crops.append(self.preprocess(crop))
        except Exception as err:  # noqa: BLE001 - a bad file is a row, not the end of the run
            rows, crops = [_no_age("error", error=f"{type(err).__name__}: {err}")], []
        images = torch.stack(crops) if crops else torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return {"index": i, "rows": rows, "images": images}


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def default_threads() -> int:
    """Torch threads for inference on CPU: the cores this process may use, at most 4 (measured in
    benchmarks/inference_speed.py: more threads do not help at batch 1 and hurt on a busy machine)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class AgeEstimator:
    """Faces and ages from photos: see the module docstring."""

    def __init__(self, backend: CheckpointAges | OnnxAges, options: FaceOptions | None = None, *,
                 tta: str = "none", coverage: float = DEFAULT_COVERAGE, batch_size: int = 16, name: str = "model",
                 detector: FaceDetector | None = None) -> None:
        self.backend = backend
        self.options = options or FaceOptions()
        self.tta = check_tta(tta)
        check_number("coverage", coverage, minimum=0.0, maximum=1.0)
        self.coverage = float(coverage)
        check_number("batch_size", batch_size, minimum=1, integer=True)
        self.batch_size = int(batch_size)
        self.name = name
        if self.backend.calibration is not None:
            self.backend.calibration.margin(self.coverage)  # the coverage is one it was calibrated at: fails here
        self._own_detector = detector is None  # built from the options: worker processes can build their own
        self.detector = detector if detector is not None else self.options.build_detector()
        # an object given as the detector: its own template if build_detector made it, else box crops
        self.template: dict[str, Any] | str | None = (
            ("auto" if detector is not None else self.options.template()) if self.options.align else None)
        self._warned_uncalibrated = False
        self.path: Path | None = None  # the model file, where it was loaded from one

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "auto", threads: int | None = None,
                        tta: str = "none", coverage: float = DEFAULT_COVERAGE, batch_size: int = 16,
                        face_detector: FaceDetector | None = None, **face_options: Any) -> AgeEstimator:
        """A .ckpt written by agecls.train or an .onnx written by agecls.export. `face_options`:
        those of FaceOptions (detect_faces, detector, min_score, min_face_size, align, faces,
        no_face, face_margin). `face_detector`: an object with detect(rgb) -> list[Face]
        to use instead of the configured detector. `threads`: torch's CPU threads (None: default_threads())."""
        options = FaceOptions(**face_options)  # checked before the model loads
        dev = resolve_device(device)
        if dev.type == "cpu":  # torch's threads, and OpenCV's (its DNN runs the MTCNN detector)
            n = int(threads) if threads else default_threads()
            torch.set_num_threads(n)
            import cv2

            cv2.setNumThreads(n)
        file = model_file(path)
        est = cls(load_backend(file, dev), options, tta=tta, coverage=coverage, batch_size=batch_size,
                  name=file.name, detector=face_detector)
        est.path = file
        return est

    @classmethod
    def from_config(cls, cfg: Any, face_detector: FaceDetector | None = None) -> AgeEstimator:
        """From a command's config: ckpt_path, device, threads, tta, coverage, batch_size and the
        face options (conf/estimator/default.yaml)."""
        options = FaceOptions.from_config(cfg)
        return cls.from_checkpoint(cfg.ckpt_path, device=str(cfg.get("device", "auto")), threads=cfg.get("threads"),
                                   tta=cfg.get("tta", "none"), coverage=float(cfg.get("coverage", DEFAULT_COVERAGE)),
                                   batch_size=int(cfg.get("batch_size", 16)), face_detector=face_detector,
                                   **asdict(options))

    # ------------------------------------------------------------------ what the model is
    @property
    def age_range(self) -> tuple[float, float]:
        return self.backend.age_range

    @property
    def calibration(self) -> Any:
        return self.backend.calibration

    # ------------------------------------------------------------------ prediction
    def predict(self, x: Any) -> list[FaceAge] | list[list[FaceAge]]:
        """The faces of one photo (a path, a PIL image, a numpy array), or of each photo of a list."""
        if isinstance(x, (list, tuple)):
            return [rows for _, rows in self.predict_many(x)]
        img = as_image(x)  # errors on a single photo are raised, not turned into a row
        return self.predict_image(img)

    def predict_image(self, img: Image.Image) -> list[FaceAge]:
        """The faces of one decoded, upright RGB image, in one batch."""
        found = image_faces(img, self.detector, self.options, self.template)
        crops = [self.backend.preprocess(c) for _, c in found if c is not None]
        rows = [r for r, _ in found]
        self._fill([r for r, c in found if c is not None], torch.stack(crops) if crops else None)
        return rows

    def predict_many(self, items: Sequence[Any], num_workers: int = 0, show_progress: bool = False,
                     ) -> Iterable[tuple[int, list[FaceAge]]]:
        """(index, faces) for each photo of `items`, in order, batched over faces; decoding and
        detection in `num_workers` processes (0: here). A file that cannot be read yields one row
        with status `error` and its reason."""
        workers = min(int(num_workers), max(0, len(items) // self.batch_size))
        # worker processes build their own detector (none is pickled), unless it was given as an object
        detector: Any = self.options.build_detector if workers and self._own_detector else self.detector
        dataset = PhotoDataset(items, self.backend.preprocess, self.backend.image_size, self.options,
                               detector, self.template)
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=workers, collate_fn=_collate)
        batches: Iterable[Any] = loader
        if show_progress:
            from agecls.utils.progress import progress

            batches = progress(loader, desc="Predicting", unit="batch")
        for batch in batches:
            rows = [r for item in batch for r in item["rows"] if r.status in ("ok", "whole_image")]
            images = torch.cat([item["images"] for item in batch])
            self._fill(rows, images if len(images) else None)
            for item in batch:
                yield item["index"], item["rows"]

    def _fill(self, rows: list[FaceAge], images: torch.Tensor | None) -> None:
        """Ages and intervals of `rows` from their preprocessed crops, at most batch_size at a time."""
        if images is None or not rows:
            return
        parts = [self.backend(images[s:s + self.batch_size], self.tta, self.coverage)
                 for s in range(0, len(images), self.batch_size)]
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        lo_age, hi_age = self.age_range
        age = np.clip(out["age_raw"], lo_age, hi_age)
        calibration = self.calibration
        if calibration is not None:
            low, high = calibration.apply(out["low_raw"], out["high_raw"], self.coverage, self.age_range)
        else:
            low = high = np.full(len(age), np.nan)
            if not self._warned_uncalibrated:
                log.warning("%s has no calibrated age interval (trained before agecls recorded one): intervals are "
                            "empty; calibrate it with python -m agecls.calibrate ckpt_path=...", self.name)
                self._warned_uncalibrated = True
        for k, row in enumerate(rows):
            row.age, row.age_raw = float(age[k]), float(out["age_raw"][k])
            row.interval = (float(low[k]), float(high[k]))

    # ------------------------------------------------------------------ pictures
    def draw(self, image: Any, faces: Sequence[FaceAge]) -> Image.Image:
        """A copy of `image` (upright) with each face's box outlined and its age (and interval) written beside it."""
        return draw_faces(as_image(image), faces)

    def describe(self) -> dict[str, Any]:
        """What /health and the model card show: the model and how faces are found."""
        return {"model": self.name, "backbone": self.backend.hparams.get("backbone"),
                "image_size": self.backend.image_size, "age_range": list(self.age_range),
                "coverage": self.coverage, "calibrated": self.calibration is not None, "tta": self.tta,
                **{k: v for k, v in asdict(self.options).items()}}


# ------------------------------------------------------------------------------- drawing
COLOURS = ((255, 196, 0), (0, 200, 255), (255, 64, 160), (64, 255, 96), (255, 128, 0), (160, 96, 255))


def face_label(face: FaceAge) -> str:
    if not math.isfinite(face.age):
        return ""
    low, high = face.interval
    if math.isfinite(low) and math.isfinite(high):
        return f"{face.age:.0f} ({low:.0f}-{high:.0f})"
    return f"{face.age:.0f}"


@functools.cache
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def draw_faces(img: Image.Image, faces: Sequence[FaceAge]) -> Image.Image:
    """`img` copied, each face with a box: an outline and its label (age, interval) on a filled
    tag just above the box (below it when there is no room above)."""
    from PIL import ImageDraw

    out = img.convert("RGB").copy()
    pen = ImageDraw.Draw(out)
    scale = max(out.width, out.height)
    width = max(2, round(scale / 300))
    font = _font(max(12, round(scale / 40)))
    for k, face in enumerate(f for f in faces if f.box is not None):
        colour = COLOURS[k % len(COLOURS)]
        x0, y0, x1, y1 = face.box
        pen.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=width)
        label = face_label(face)
        if not label:
            continue
        left, top, right, bottom = pen.textbbox((0, 0), label, font=font)
        tw, th = right - left + 2 * width, bottom - top + 2 * width
        ty = y0 - th if y0 - th >= 0 else min(y1, out.height - th)
        tx = min(max(0, x0), max(0, out.width - tw))
        pen.rectangle((tx, ty, tx + tw, ty + th), fill=colour)
        pen.text((tx + width - left, ty + width - top), label, fill=(0, 0, 0), font=font)
    return out

