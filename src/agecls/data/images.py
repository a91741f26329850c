"""Reading face images robustly: every mode Pillow opens becomes 8-bit RGB, or a clear error."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Truncated files must fail when indexed, not decode half-grey mid-epoch.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Background for transparent pixels (RGBA, LA, palette with transparency): white, as a viewer shows them.
_BACKGROUND = (255, 255, 255)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted so the order never depends on the file system."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p.name))


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (16-bit and float images are rescaled, not clipped)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255) else 255.0
        if mode == "F":
            top = max(float(arr.max(initial=1.0)), 1.0) if arr.max(initial=0) > 1.0 else 1.0
        gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def crop_box(im: Image.Image, box: Sequence[float], margin: float) -> Image.Image:
    """Crop the face box (x1, y1, x2, y2) widened by `margin` times its size on every side."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    x1, x2 = x1 - margin * w, x2 + margin * w
    y1, y2 = y1 - margin * h, y2 + margin * h
    x1, y1 = max(0.0, x1), max(0.0, y1)
    x2, y2 = min(float(im.width), x2), min(float(im.height), y2)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return im
    return im.crop((int(x1), int(y1), int(round(x2)), int(round(y2))))


def load_rgb(path: str | Path, box: Sequence[float] | None = None, margin: float = 0.0) -> Image.Image:
    """Decode `path` fully (so truncation raises here), convert to RGB, crop `box` if given."""
    with Image.open(path) as im:
        im.load()
        rgb = to_rgb(im)
    if box is not None and len(box) == 4 and np.all(np.isfinite(np.asarray(box, dtype=float))):
        rgb = crop_box(rgb, box, margin)
    return rgb


def check_image(path: str | Path, decode: bool = True) -> dict[str, object]:
    """Hash a file's bytes and (optionally) decode it: the facts an index caches per file."""
    path = Path(path)
    out: dict[str, object] = {"sha1": "", "ok": False, "error": "", "width": 0, "height": 0}
    try:
        data = path.read_bytes()
    except OSError as err:
        out["error"] = f"{type(err).__name__}: {err}"
        return out
    out["sha1"] = hashlib.sha1(data).hexdigest()
    if not data:
        out["error"] = "empty file (0 bytes)"
        return out
    if not decode:
        out["ok"] = True
        return out
    try:
        import io

        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = to_rgb(im)
            out["width"], out["height"] = rgb.size
        out["ok"] = True
    except UnidentifiedImageError:
        out["error"] = "not an image Pillow can read (unknown format)"
    except Exception as err:  # Pillow raises many kinds for broken files
        out["error"] = f"{type(err).__name__}: {err}"
    return out
