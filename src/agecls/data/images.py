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


# EXIF orientation (tag 0x0112) -> the transpose that makes the stored pixels upright: the table
# of PIL.ImageOps.exif_transpose. It is applied here rather than by calling exif_transpose on the
# opened file because a face box must be cropped first (see load_rgb), and a crop or a mode
# conversion does not reliably carry the tag along (TIFF keeps it outside info["exif"]).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation of an opened (loaded) image: 1 (as stored) when absent, invalid or unreadable."""
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block must not make the pixels unreadable
        return 1
    return value if value in _UPRIGHT else 1


def upright(im: Image.Image, orientation: int) -> Image.Image:
    """`im` (stored pixels, or a crop of them) turned the way EXIF `orientation` says it is viewed."""
    method = _UPRIGHT.get(orientation)
    return im if method is None else im.transpose(method)


def load_rgb(path: str | Path, box: Sequence[float] | None = None, margin: float = 0.0,
             align: Sequence[float] | None = None) -> Image.Image:
    """Decode `path` fully (so truncation raises here), convert to RGB, crop `box` if given, and
    turn it upright by its EXIF orientation, as a photo viewer (and OpenCV's imread) shows it.

    `box` is in the stored pixel orientation, so it is cropped before the EXIF transpose: the
    IMDB-WIKI boxes in its .mat files were found on images read by MATLAB's imread, which ignores
    EXIF, and a crop in stored coordinates followed by the transpose is exactly the upright face.
    (Boxes found on the upright image, as agecls.predict's detector finds them, are cropped from
    the result of load_rgb(path) instead.)

    `align` (data.align, agecls.data.align): a 2x3 matrix (6 numbers, upright pixels -> crop pixels)
    and the crop's width and height: the upright image warped to that aligned crop, instead of
    cropping `box` (agecls.faces.warp_face, as agecls.predict aligns a detected face)."""
    with Image.open(path) as im:
        return decode_rgb(im, box, margin, align)


def decode_rgb(im: Image.Image, box: Sequence[float] | None = None, margin: float = 0.0,
               align: Sequence[float] | None = None) -> Image.Image:
    """load_rgb's decoding of an image Pillow has opened (only its header read so far): decode it
    fully, convert to RGB, crop `box` (stored pixels) and turn it upright by its EXIF orientation.
    For callers that open the file themselves, e.g. to check its format and size before decoding
    an upload (agecls.serve)."""
    im.load()
    orientation = exif_orientation(im)
    rgb = to_rgb(im)
    if align is not None and len(align) == 8 and np.all(np.isfinite(np.asarray(align, dtype=float))):
        from agecls.faces import warp_face

        values = [float(v) for v in align]
        return warp_face(upright(rgb, orientation), np.reshape(values[:6], (2, 3)), (int(values[6]), int(values[7])))
    if box is not None and len(box) == 4 and np.all(np.isfinite(np.asarray(box, dtype=float))):
        rgb = crop_box(rgb, box, margin)
    return upright(rgb, orientation)


def jpeg_truncated(data: bytes) -> bool:
    """A JPEG whose last scan has no end-of-image marker (FFD9) after it: cut short, perhaps padded.

    Pillow decodes some of these without an error (a file missing only its last bytes, or cut and
    padded to its old size), filling what is missing with grey or garbage. Entropy-coded data
    cannot contain FFDA or FFD9 (byte stuffing), so the last start-of-scan must be followed by an
    end-of-image; an EXIF thumbnail's own markers come before the main image's scans."""
    if not data.startswith(b"\xff\xd8"):
        return False
    sos = data.rfind(b"\xff\xda")
    return sos >= 0 and data.rfind(b"\xff\xd9") < sos


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
    if jpeg_truncated(data):
        out["error"] = "truncated JPEG (no end-of-image marker after its last scan)"
        return out
    try:
        import io

        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = to_rgb(im)
            width, height = rgb.size
            if exif_orientation(im) in (5, 6, 7, 8):  # a quarter turn: the upright image is height x width
                width, height = height, width
            out["width"], out["height"] = width, height
        out["ok"] = True
    except UnidentifiedImageError:
        out["error"] = "not an image Pillow can read (unknown format)"
    except Exception as err:  # Pillow raises many kinds for broken files
        out["error"] = f"{type(err).__name__}: {err}"
    return out
