"""A local web page and JSON API for a trained model: drop a photo, see every face boxed with its age.

    python -m agecls.serve ckpt_path=PATH                # then open http://127.0.0.1:7860
    agecls-serve ckpt_path=model.onnx port=8000 detector=haar faces=largest

The page is a Gradio app mounted in a FastAPI app, served by uvicorn; everything it loads comes
from this server (no CDN, no web fonts, Gradio's telemetry off), so it works offline. Besides
the page:

    GET  /health             {"status": "ok", "model": ..., "detector": ..., "align": ..., "age_range": [lo, hi], ...}
    POST /api/predict        multipart/form-data, field `image` (a JPEG, PNG, WebP, BMP, GIF or TIFF)
                             -> {"faces": [{"box": [x0, y0, x1, y1], "score": s, "age": a}, ...],
                                 "status": "ok" | "no_face", "image_size": [width, height]}
    GET  /api/model_card     the model card (markdown) shown under the page

Boxes are in pixels of the upright photo (EXIF orientation applied; x1, y1 exclusive), largest
face first; `age` is clipped to the model's age range. A bad upload gets a 4xx with a `detail`
message and the server goes on: not multipart or no `image` field 400, empty 400, over
`max_upload_mb` 413, more pixels than `max_pixels` 413 (checked from the header, before decoding:
a decompression bomb is never decoded), not an image 415, a broken image 400. The prediction is
agecls.predict's (predict_image: the same detector, alignment, model and clipping as
`agecls.predict detect_faces=true`), the decoding agecls.data.images' (decode_rgb). The page takes
the photo as a file (not Gradio's image component, which would decode it before these checks), so
it shows the same messages.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from agecls.data.images import decode_rgb, jpeg_truncated
from agecls.faces import FaceDetector, build_detector, face_template
from agecls.model_card import (
    checkpoint_hparams,
    find_model_card,
    read_run_files,
    render_model_card,
    run_dir_of,
)
from agecls.predict import FACES, CheckpointAges, OnnxAges, load_model, predict_image
from agecls.utils.hydra_utils import config_dir, entry_point

# Read by gradio when it runs (it is imported only where the page is built): no telemetry, no
# version check, no look-ups on the hub.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

log = logging.getLogger(__name__)

# What an upload may be. Pillow opens more (EPS, which runs Ghostscript; PSD, ICO, ...): not from strangers.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG includes MPO (phone photos)
FORMAT_NAMES = "JPEG, PNG, WebP, BMP, GIF or TIFF"
MULTIPART_SLACK = 64 * 1024  # a request body may exceed the file by its multipart framing


class UploadError(Exception):
    """A bad upload: the HTTP status to answer with and a message for the person who sent it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = int(status), message


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}".rstrip("0").rstrip(".")


def decode_upload(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """An uploaded file's bytes -> the upright RGB image, or UploadError. The size is read from the
    header and checked before any pixel is decoded; only FORMATS are opened."""
    if not data:
        raise UploadError(400, "The upload is empty (0 bytes): send a photo.")
    if len(data) > max_bytes:
        raise UploadError(413, f"The upload is {_mb(len(data))} MB; this server takes photos up to {_mb(max_bytes)} MB.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit follows
            im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as err:  # over twice Pillow's own limit: refused from the header too
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{_mb(int(found.group(1)))} megapixels" if found else "far too many pixels"
        raise UploadError(413, f"The image has {size}; this server takes up to {_mb(max_pixels)} megapixels "
                               "(a larger one is refused before decoding).") from None
    except UnidentifiedImageError:
        raise UploadError(415, f"This is not an image this server reads: send a {FORMAT_NAMES} photo.") from None
    except Exception as err:  # Pillow raises many kinds for broken headers
        raise UploadError(400, f"The image's header cannot be read ({type(err).__name__}: {err}).") from None
    with im:
        width, height = im.size
        if width < 1 or height < 1:
            raise UploadError(400, f"The image is {width} x {height} pixels: nothing to see.")
        if width * height > max_pixels:
            raise UploadError(413, f"The image is {width} x {height} = {_mb(width * height)} megapixels; this server "
                                   f"takes up to {_mb(max_pixels)} megapixels (a larger one is refused before decoding).")
        if jpeg_truncated(data):
            raise UploadError(400, "The JPEG is cut short (no end-of-image marker): the file is incomplete.")
        try:
            return decode_rgb(im)
        except Exception as err:
            raise UploadError(400, f"The image cannot be decoded ({type(err).__name__}: {err}).") from None


def age_range(model: CheckpointAges | OnnxAges) -> tuple[float, float]:
    if isinstance(model, OnnxAges):
        return tuple(float(v) for v in model.model.age_range)
    return float(model.model.net.age_min), float(model.model.net.age_max)


def model_card(path: str | Path, model: CheckpointAges | OnnxAges) -> str:
    """The run's MODEL_CARD.md (checkpoints/../ or beside the model) if there is one; else a card
    rendered from the checkpoint's hyperparameters (an ONNX model: its .json) and the run's
    metrics.json / cleaning.json where they are."""
    found = find_model_card(path)
    if found is not None:
        log.info("Model card: %s", found)
        return found.read_text(encoding="utf-8", errors="replace")
    if isinstance(model, OnnxAges):
        spec = model.model.spec
        hparams: dict[str, Any] = {"backbone": spec.get("backbone") or None, "image_size": spec.get("image_size"),
                                   "crop_pct": spec.get("crop_pct")}
    else:
        from agecls.utils.checkpoint import read_checkpoint

        hparams = checkpoint_hparams(read_checkpoint(path))
    metrics, cleaning = read_run_files(run_dir_of(path))
    log.info("Model card: rendered from %s%s", Path(path).name, " and its run's metrics.json" if metrics else "")
    return render_model_card(hparams, metrics, cleaning, {"model": Path(path).name, "age_range": list(age_range(model))})


class AgeServer:
    """The model, its detector and settings; `predict` is safe to call from several threads."""

    def __init__(self, model: CheckpointAges | OnnxAges, detector: FaceDetector, *, name: str = "model",
                 detector_name: str = "", faces: str = "all", margin: float = 0.4, tta: bool = False,
                 template: dict[str, Any] | str | None = "auto", max_upload_mb: float = 20.0,
                 max_pixels: int = 40_000_000, card: str = "") -> None:
        if faces not in FACES:
            raise ValueError(f"faces={faces!r}; choose {' or '.join(FACES)}")
        self.model, self.detector = model, detector
        self.name, self.detector_name, self.faces = name, detector_name, faces
        self.margin, self.tta = float(margin), bool(tta)
        self.template = template  # face alignment, as agecls.predict (image_faces): "auto", a template or None
        self.max_bytes, self.max_pixels = int(float(max_upload_mb) * 1e6), int(max_pixels)
        self.card = card
        self._lock = threading.Lock()  # one prediction at a time: the detector is not thread-safe

    @classmethod
    def from_config(cls, cfg: DictConfig) -> AgeServer:
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if cfg.device == "auto" else cfg.device))
        model = load_model(cfg.ckpt_path, device)
        detector_name = str(cfg.detector)
        # as agecls.predict: each face aligned by the template measured for this detector, or (align=false) its box
        template = face_template(detector_name) if bool(cfg.get("align", True)) else None
        return cls(model, build_detector(detector_name, int(cfg.min_face_size)), name=Path(cfg.ckpt_path).name,
                   detector_name=detector_name, faces=str(cfg.faces), margin=float(cfg.face_margin), tta=bool(cfg.tta),
                   template=template,
                   max_upload_mb=float(cfg.max_upload_mb), max_pixels=int(cfg.max_pixels),
                   card=model_card(cfg.ckpt_path, model))

    def predict(self, img: Image.Image) -> dict[str, Any]:
        with self._lock:
            rows = predict_image(img, self.model, self.detector, self.faces, "skip", self.margin, self.tta,
                                 self.template)
        faces = [{"box": [int(v) for v in r["box"]],
                  "score": round(r["score"], 4) if math.isfinite(r["score"]) else None,
                  "age": round(r["predicted"], 2)} for r in rows if r["status"] == "ok"]
        return {"faces": faces, "status": "ok" if faces else "no_face", "image_size": [img.width, img.height]}

    def predict_bytes(self, data: bytes) -> tuple[dict[str, Any], Image.Image]:
        img = decode_upload(data, self.max_bytes, self.max_pixels)
        return self.predict(img), img

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.name, "detector": self.detector_name, "faces": self.faces,
                "align": self.template is not None,
                "age_range": list(age_range(self.model)), "max_upload_mb": self.max_bytes / 1e6,
                "max_pixels": self.max_pixels}


# ------------------------------------------------------------------------------------------ HTTP
class BodyLimit:
    """ASGI middleware: a request under `prefix` whose body exceeds `limit` bytes gets 413 before
    the app parses it (by its Content-Length, or counted as it streams in)."""

    def __init__(self, app: Any, limit: int, prefix: str = "/api/") -> None:
        self.app, self.limit, self.prefix = app, int(limit), prefix

    async def _too_large(self, send: Any) -> None:
        body = json.dumps({"detail": f"The request is over {_mb(self.limit)} MB; send a smaller photo."}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._too_large(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Any:
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)


def create_app(server: AgeServer, ui: bool = True) -> FastAPI:
    """The FastAPI app: /health, /api/predict, /api/model_card and (ui=True) the Gradio page at /."""
    # No /docs or /redoc: their pages load Swagger UI and ReDoc from a CDN.
    app = FastAPI(title="agecls", docs_url=None, redoc_url=None)
    app.state.server = server

    @app.get("/health")
    def health() -> dict[str, Any]:
        return server.health()

    @app.get("/api/model_card", response_class=PlainTextResponse)
    def card() -> PlainTextResponse:
        return PlainTextResponse(server.card, media_type="text/markdown; charset=utf-8")

    @app.post("/api/predict")
    async def api_predict(request: Request) -> JSONResponse:
        kind = request.headers.get("content-type", "")
        if not kind.startswith("multipart/form-data"):
            raise HTTPException(400, "Send the photo as multipart/form-data with the file in the field `image` "
                                     "(curl -F image=@photo.jpg URL).")
        try:
            form = await request.form(max_files=1, max_fields=10)
        except Exception as err:  # malformed multipart, too many parts
            raise HTTPException(400, f"The multipart body cannot be read: {err}") from None
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise HTTPException(400, "No file in the field `image`: send the photo as multipart/form-data "
                                         "field `image` (curl -F image=@photo.jpg URL).")
            data = await upload.read(server.max_bytes + 1)
        finally:
            await form.close()
        try:
            result, _ = await run_in_threadpool(server.predict_bytes, data)
        except UploadError as err:
            log.info("Refused an upload (%d): %s", err.status, err.message)
            raise HTTPException(err.status, err.message) from None
        return JSONResponse(result)

    app.add_middleware(BodyLimit, limit=server.max_bytes + MULTIPART_SLACK, prefix="/api/")
    if ui:
        import gradio as gr

        gr.mount_gradio_app(app, build_ui(server), path="/", theme=_theme(), footer_links=[],
                            max_file_size=server.max_bytes, ssr_mode=False, show_error=True, pwa=False,
                            mcp_server=False, enable_monitoring=False, css=CSS)
    return app


# -------------------------------------------------------------------------------------- the page
CSS = """
#summary table { margin-top: 0.5em; }
#model-card { border-top: 1px solid var(--border-color-primary); margin-top: 1em; padding-top: 0.5em; }
"""


def _theme() -> Any:
    import gradio as gr

    # System fonts only: Gradio's default theme would fetch web fonts.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


def summary_markdown(result: dict[str, Any]) -> str:
    faces = result["faces"]
    if not faces:
        return "**No face found** in this photo: no age. (A face seen from the side, very small or hidden may be missed.)"
    lines = [f"**{len(faces)} face{'s' if len(faces) != 1 else ''}** found, largest first:", "",
             "| face | age (years) | box (x0, y0, x1, y1) | detector score |", "| --- | --- | --- | --- |"]
    for k, face in enumerate(faces, 1):
        score = "" if face["score"] is None else f"{face['score']:.2f}"
        lines.append(f"| {k} | {face['age']:.1f} | {', '.join(map(str, face['box']))} | {score} |")
    return "\n".join(lines)


def build_ui(server: AgeServer) -> Any:
    import gradio as gr

    def run(path: str | None) -> tuple[Any, str]:
        if not path:
            return None, ""
        try:
            data = Path(path).read_bytes()
            result, img = server.predict_bytes(data)
        except UploadError as err:
            raise gr.Error(err.message) from None
        boxes = [(tuple(face["box"]), f"face {k}: {face['age']:.1f} years") for k, face in enumerate(result["faces"], 1)]
        return (img, boxes), summary_markdown(result)

    with gr.Blocks(title="agecls: how old do they look?", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# How old do they look?\nDrop a photo (or click to choose one): every face found is boxed "
                    "with its estimated age. The photo stays on this machine.")
        with gr.Row():
            # a file, not gr.Image: Gradio would decode the upload itself (and the browser preview it)
            # before decode_upload could check its format and size and say what is wrong
            photo = gr.File(label="Photo: drop it here or click to choose", file_types=["image"], type="filepath",
                            file_count="single", elem_id="photo", height=160)
            result = gr.AnnotatedImage(label="Faces and ages", elem_id="result", show_legend=True)
        summary = gr.Markdown(elem_id="summary")
        gr.Markdown(server.card, elem_id="model-card")
        photo.change(run, inputs=photo, outputs=[result, summary], concurrency_limit=1)
    return demo


# ------------------------------------------------------------------------------------- command
@entry_point
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="serve")
def main(cfg: DictConfig) -> None:
    import uvicorn

    server = AgeServer.from_config(cfg)
    app = create_app(server, ui=bool(cfg.get("ui", True)))
    log.info("Serving %s on http://%s:%d (detector %s, faces=%s): open it in a browser; POST photos to /api/predict",
             server.name, cfg.host, int(cfg.port), server.detector_name, server.faces)
    uvicorn.run(app, host=str(cfg.host), port=int(cfg.port), log_level=str(cfg.get("log_level", "info")))


if __name__ == "__main__":
    main()
