"""Face detection with landmarks (mtcnn, from its wheel) and alignment to the training crops'
geometry: in predict (detect_faces=true) and in training from raw photos (data.align)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from agecls.data.align import add_alignment, upright_box
from agecls.data.images import load_rgb
from agecls.estimator import FaceOptions, image_faces
from agecls.faces import (
    DEFAULT_DETECTOR,
    Face,
    align_face,
    alignment_matrix,
    build_detector,
    face_template,
    similarity_transform,
    transform_points,
)
from agecls.predict import predict
from agecls.train import train
from tests.conftest import SYNTHETIC, TINY, compose_cfg, utkface_dir

UTK = sorted(utkface_dir().glob("*.jpg"))
CROPS = [UTK[i] for i in (100, 2500, 7000, 12000, 18000)]


def _similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), shift[0]],
                     [scale * math.sin(a), scale * math.cos(a), shift[1]]])


def _dots(points: np.ndarray, size: tuple[int, int], radius: float) -> np.ndarray:
    """A dark image with a bright disc (anti-aliased by supersampling) at each point."""
    w, h = size
    k = 4
    big = np.zeros((h * k, w * k), np.uint8)
    for x, y in points:
        cv2.circle(big, (int(round((x + 0.5) * k - 0.5)), int(round((y + 0.5) * k - 0.5))), int(radius * k), 255, -1)
    small = cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA)
    return np.repeat(small[..., None], 3, axis=2)


def _centroids(rgb: np.ndarray, near: np.ndarray, window: int) -> np.ndarray:
    """The brightness-weighted centre of each dot, searched in a window around its expected place."""
    gray = np.asarray(rgb, dtype=float)[..., 0]
    out = []
    for x, y in near:
        x0, y0 = max(0, int(x) - window), max(0, int(y) - window)
        part = gray[y0:int(y) + window + 1, x0:int(x) + window + 1]
        part = np.where(part > 20, part, 0)
        ys, xs = np.mgrid[0:part.shape[0], 0:part.shape[1]]
        out.append(((xs * part).sum() / part.sum() + x0, (ys * part).sum() / part.sum() + y0))
    return np.array(out)


# ------------------------------------------------------------------------------------ alignment
def test_similarity_transform_recovers_a_known_one_exactly() -> None:
    src = np.array([[10.0, 20.0], [60.0, 22.0], [35.0, 50.0], [15.0, 70.0], [58.0, 72.0]])
    m = _similarity(23.0, 1.7, (31.0, -12.0))
    assert np.allclose(similarity_transform(src, transform_points(m, src)), m, atol=1e-9)
    mirrored = src * (-1, 1)  # a reflection is not a similarity: the best rotation is returned instead
    assert np.linalg.det(similarity_transform(src, mirrored)[:, :2]) > 0


@pytest.mark.parametrize("angle, scale", [(0.0, 1.0), (17.0, 2.2), (-12.0, 0.55), (8.0, 0.25)])
def test_alignment_puts_known_landmarks_on_the_template_within_a_pixel(angle, scale) -> None:
    """A synthetic face: dots where the five landmarks are, in a photo where the face is turned and
    scaled (0.25: a face four times the crop's size, reduced before the warp). Aligned, each dot
    lands on the template's point within 1 px."""
    template = face_template(DEFAULT_DETECTOR)
    w, h = template["size"]
    target = np.asarray(template["landmarks"]) * (w, h)  # where the landmarks must land in the crop
    # the photo: the crop's geometry mapped by a known similarity (crop pixels -> photo pixels)
    to_photo = _similarity(angle, 1 / scale, (0, 0))
    corners = transform_points(to_photo, np.array([[0, 0], [w, 0], [0, h], [w, h]]))
    to_photo[:, 2] = 40 - corners.min(0)
    size = tuple(int(v) for v in np.ceil(transform_points(to_photo, np.array([[0, 0], [w, 0], [0, h], [w, h]])).max(0) + 40))
    marks = transform_points(to_photo, target)
    photo = _dots(marks, size, radius=2.5 / scale)
    face = Face((0, 0, size[0], size[1]), 1.0, marks)

    crop = np.asarray(align_face(photo, face, template))
    assert crop.shape == (h, w, 3)
    found = _centroids(crop, target, window=6)
    assert np.abs(found - target).max() <= 1.0, (found - target)


def test_a_face_without_landmarks_is_placed_by_its_box() -> None:
    template = {"size": [200, 200], "box": [0.1, 0.2, 0.9, 0.9], "landmarks": [[0.3, 0.3], [0.7, 0.3]]}
    m = alignment_matrix(Face((100, 50, 180, 120)), template)
    # the box's centre goes to the template box's centre, its size to the template box's size
    assert np.allclose(transform_points(m, [[140, 85]]), [[100, 110]])
    assert math.isclose(m[0, 0], math.sqrt(160 * 140 / (80 * 70)))


# ------------------------------------------------------------------------------------ detection
def _canvas(crops: list[tuple[Path, int, int, int]], size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Real crops pasted (scaled to `side`) at (x, y) on a smooth noisy background."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = cv2.GaussianBlur(rng.uniform(40, 200, (h // 8, w // 8, 3)).astype(np.float32), (0, 0), 2)
    canvas = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
    for path, x, y, side in crops:
        crop = np.asarray(Image.open(path).convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.float32)
        canvas[y:y + side, x:x + side] = crop
    return np.clip(canvas + rng.normal(0, 2, canvas.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def detector():
    return build_detector(DEFAULT_DETECTOR)


@pytest.mark.parametrize("k", range(len(CROPS)))
def test_the_detector_finds_a_pasted_crop_with_landmarks_inside_its_box(detector, k) -> None:
    x, y, side = 130 + 37 * k, 60 + 11 * k, 150 + 40 * k
    photo = _canvas([(CROPS[k], x, y, side)], (side + 320, side + 160), seed=k)
    faces = detector.detect(photo)
    assert len(faces) == 1
    face = faces[0]
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    assert abs(cx - (x + side / 2)) < side / 4 and abs(cy - (y + side / 2)) < side / 4
    marks = face.landmarks
    assert marks is not None and marks.shape == (5, 2)
    x0, y0, x1, y1 = face.box
    assert ((marks[:, 0] >= x0) & (marks[:, 0] <= x1) & (marks[:, 1] >= y0) & (marks[:, 1] <= y1)).all()
    assert marks[0, 0] < marks[1, 0] and marks[:2, 1].max() < marks[2, 1] < marks[3:, 1].min()  # eyes, nose, mouth


def test_a_two_face_photo_gives_two_faces_largest_first(detector) -> None:
    photo = _canvas([(CROPS[0], 40, 60, 240), (CROPS[2], 480, 90, 170)], (720, 380))
    faces = detector.detect(photo)
    assert len(faces) == 2 and faces[0].area > faces[1].area
    assert faces[0].box[2] < 330 and faces[1].box[0] > 430


def test_a_photo_without_a_face_gives_none(detector) -> None:
    assert detector.detect(_canvas([], (640, 480))) == []


# ---------------------------------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("faces-model")
    cfg = compose_cfg([*TINY, *SYNTHETIC, f"paths.cache_dir={cache_dir}"], out / "run")
    return Path(train(cfg)["best_checkpoint"])


def test_predict_aligns_a_wild_face_back_to_its_crop(detector, ckpt, tmp_path) -> None:
    """A crop pasted 1.6x larger, turned by 10 degrees, into a photo stored with an EXIF quarter
    turn: predict finds it, aligns it to (nearly) the crop itself, and gives the crop's age."""
    path = CROPS[3]
    crop = np.asarray(Image.open(path).convert("RGB"))
    side, angle, (cx, cy) = 320, 10.0, (330, 260)
    m = cv2.getRotationMatrix2D((100, 100), angle, side / 200)
    m[:, 2] += (cx - 100, cy - 100)
    background = _canvas([], (640, 520), seed=3).astype(np.float32)
    warped = cv2.warpAffine(crop.astype(np.float32), m, (640, 520), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ones((200, 200), np.float32), m, (640, 520))[..., None]
    upright = Image.fromarray(np.clip(background * (1 - mask) + warped * mask, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter; a viewer turns it back
    photo = tmp_path / "wild.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(photo, quality=95, exif=exif)

    # the aligned face predict sees is the crop itself, give or take the crop's own offset from the template
    img = load_rgb(photo)
    [(row, aligned)] = image_faces(img, detector, FaceOptions())
    assert aligned.size == (200, 200)
    diff = np.abs(np.asarray(aligned, dtype=float) - crop)[40:160, 40:160].mean()
    assert diff < 8, diff  # measured 3.3 (grey levels); 3-11 over five crops
    # without alignment (the box with a margin, resized to the crop's size) it is far from the crop
    boxed = image_faces(img, detector, FaceOptions(), template=None)[0][1].resize((200, 200), Image.BILINEAR)
    assert np.abs(np.asarray(boxed, dtype=float) - crop)[40:160, 40:160].mean() > 25  # measured 53

    over = [f"ckpt_path={ckpt}", "num_workers=0", "device=cpu"]
    wild = predict(compose_cfg([*over, f"input={photo}", "detect_faces=true"], tmp_path / "w", "predict"))
    plain = predict(compose_cfg([*over, f"input={path}", "detect_faces=false"], tmp_path / "c", "predict"))
    assert len(wild) == 1 and wild["status"].iloc[0] == "ok"
    assert abs((wild["x0"].iloc[0] + wild["x1"].iloc[0]) / 2 - cx) < side / 4
    assert abs(wild["predicted"].iloc[0] - plain["predicted"].iloc[0]) < 3.0


# ------------------------------------------------------------------------------------ data.align
def test_upright_box_follows_every_exif_turn() -> None:
    w, h = 40, 30
    box = (5, 4, 25, 20)
    arr = np.zeros((h, w), np.uint8)
    arr[4:20, 5:25] = 255
    stored = Image.fromarray(arr)
    views = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}
    for o, method in views.items():
        view = np.asarray(stored.transpose(method))
        ys, xs = np.nonzero(view)
        assert upright_box(box, o, (w, h)) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), o


def test_data_align_detects_once_and_loads_the_aligned_crop(tmp_path, detector) -> None:
    """Training from raw photos: the record's face is found once (cached), and loading the image
    gives the same aligned crop predict would."""
    photo = tmp_path / "raw.jpg"
    Image.fromarray(_canvas([(CROPS[3], 150, 70, 260)], (620, 420))).save(photo, quality=95)
    records = pd.DataFrame({"path": [str(photo)], "age": [30.0], "sha1": ["ab" * 20],
                            "face_box": [(150.0, 70.0, 410.0, 330.0)]})
    cache = tmp_path / "cache"
    aligned = add_alignment(records, DEFAULT_DETECTOR, cache)
    align = aligned["face_align"].iloc[0]
    assert align is not None and len(align) == 8 and tuple(align[6:]) == (200.0, 200.0)
    got = np.asarray(load_rgb(photo, records["face_box"].iloc[0], 0.4, align), dtype=float)
    face = detector.detect(np.asarray(load_rgb(photo)))[0]
    want = np.asarray(align_face(load_rgb(photo), face, face_template(DEFAULT_DETECTOR)), dtype=float)
    assert got.shape == (200, 200, 3) and np.abs(got - want).max() <= 1
    # cached: a second call does not detect again
    import agecls.data.align as align_module

    calls = []
    original = align_module._align_one
    align_module._align_one = lambda job: calls.append(job) or original(job)
    try:
        again = add_alignment(records, DEFAULT_DETECTOR, cache)
    finally:
        align_module._align_one = original
    assert calls == [] and tuple(again["face_align"].iloc[0]) == tuple(align)
    # a box elsewhere (no face there): no alignment, the box crop is kept
    elsewhere = records.assign(face_box=[(0.0, 0.0, 60.0, 60.0)])
    assert add_alignment(elsewhere, DEFAULT_DETECTOR, cache)["face_align"].iloc[0] is None


def test_data_align_keeps_the_faces_found_when_detection_is_interrupted(tmp_path, monkeypatch) -> None:
    """The detection cache is written as it goes: a run stopped midway (Ctrl-C, a crash) does not
    detect again the photos it had done, and the ones it had not are detected on the next run."""
    import agecls.data.align as align_module

    photos = []
    for k in range(3):
        photo = tmp_path / f"raw{k}.jpg"
        Image.fromarray(_canvas([(CROPS[k], 150, 70, 260)], (620, 420))).save(photo, quality=95)
        photos.append(str(photo))
    records = pd.DataFrame({"path": photos, "age": [30.0] * 3, "sha1": [f"{k}" * 40 for k in range(3)]})
    monkeypatch.setattr(align_module, "SAVE_EVERY", 1)
    original, calls = align_module._align_one, []

    def stop_at_third(job):
        calls.append(job[0])
        if job[0] == photos[2]:
            raise KeyboardInterrupt
        return original(job)

    monkeypatch.setattr(align_module, "_align_one", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        add_alignment(records, DEFAULT_DETECTOR, tmp_path / "cache")
    calls.clear()
    monkeypatch.setattr(align_module, "_align_one", lambda job: calls.append(job[0]) or original(job))
    aligned = add_alignment(records, DEFAULT_DETECTOR, tmp_path / "cache")
    assert calls == [photos[2]]  # only the photo the first run never finished
    assert all(a is not None and len(a) == 8 for a in aligned["face_align"])
