"""A local web page and JSON API for a trained model: drop a photo, see every face outlined with its age.

    python -m agecls.serve ckpt_path=PATH                # then open http://127.0.0.1:7860
    agecls-serve ckpt_path=model.onnx port=8000 detector=haar faces=largest examples=~/photos

A thin shell over agecls.AgeEstimator (the same detector, alignment, model, clipping and interval
as `agecls.predict` and the Python API). The page is a Gradio app mounted in a FastAPI app, served
by uvicorn; everything it loads comes from this server (no CDN, no web fonts, Gradio's telemetry
off), so it works offline. Besides the page:

    GET  /health             {"status": "ok", "model": ..., "detector": ..., "age_range": [lo, hi], ...}
    POST /api/predict        multipart/form-data, field `image` (a JPEG, PNG, WebP, BMP, GIF or TIFF)
                             -> {"faces": [{"box": [x0, y0, x1, y1], "landmarks": [[x, y], ...], "score": s,
                                            "age": a, "predicted_low": l, "predicted_high": h}, ...],
                                 "status": "ok" | "no_face", "coverage": 0.9, "image_size": [width, height]}
    GET  /api/model_card     the model card (markdown) shown under the page

Boxes are in pixels of the upright photo (EXIF orientation applied; x1, y1 exclusive), largest
face first; `age` is clipped to the model's age range; [predicted_low, predicted_high] holds the
true age with probability `coverage`. A bad upload gets a 4xx with a `detail` message and the server
goes on: not multipart or no `image` field 400, empty 400, over `max_upload_mb` 413, more pixels
than `max_pixels` 413 (checked from the header, before decoding: a decompression bomb is never
decoded), not an image 415, a broken image 400. At most `max_decodes` photos are decoded at once
(the others wait); /health never waits for them.

The page reads only files uploaded to this server: they land in a private folder made when the
server starts, and any other path a request names (Gradio's API takes file paths) is refused with
403, as is any file Gradio would serve from elsewhere. The page takes the photo as a file (not
Gradio's image component, which would decode it before these checks), shows it as soon as it is
checked, then draws each face's outline and age on it (AgeEstimator.draw).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import hydra
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from agecls.data.images import decode_rgb, jpeg_scan_ends_early, jpeg_truncated, list_images
from agecls.estimator import AgeEstimator, FaceAge
from agecls.model_card import (
    checkpoint_hparams,
    find_model_card,
    read_run_files,
    render_model_card,
    run_dir_of,
)
from agecls.utils.checks import check_number
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
DECODE_WAIT_S = 60.0  # an upload waiting longer than this for a decoding slot gets 503


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
        is_jpeg = im.format in ("JPEG", "MPO")
        try:
            img = decode_rgb(im)
        except Exception as err:
            raise UploadError(400, f"The image cannot be decoded ({type(err).__name__}: {err}).") from None
    if is_jpeg and jpeg_scan_ends_early(data):
        raise UploadError(400, "The JPEG is cut short (its image data ends early, then an end marker): the file is "
                               "incomplete.")
    return img


def model_card(path: str | Path, estimator: AgeEstimator) -> str:
    """The run's MODEL_CARD.md (checkpoints/../ or beside the model) if there is one; else a card
    rendered from the model's hyperparameters (an ONNX model: its spec) and the run's
    metrics.json / cleaning.json where they are."""
    found = find_model_card(path)
    if found is not None:
        log.info("Model card: %s", found)
        return found.read_text(encoding="utf-8", errors="replace")
    if Path(path).suffix.lower() == ".onnx":
        hparams: dict[str, Any] = dict(estimator.backend.hparams)
    else:
        from agecls.utils.checkpoint import read_checkpoint

        hparams = checkpoint_hparams(read_checkpoint(path))
    metrics, cleaning = read_run_files(run_dir_of(path))
    log.info("Model card: rendered from %s%s", Path(path).name, " and its run's metrics.json" if metrics else "")
    return render_model_card(hparams, metrics, cleaning, {"model": Path(path).name, "age_range": list(estimator.age_range)})


def face_json(face: FaceAge) -> dict[str, Any]:
    d = face.to_dict()
    return {"box": d["box"], "landmarks": d["landmarks"], "score": d["score"], "age": d["age"],
            "predicted_low": d["interval"][0], "predicted_high": d["interval"][1]}


class AgeServer:
    """The estimator and the upload limits; `predict` is safe to call from several threads."""

    def __init__(self, estimator: AgeEstimator, *, max_upload_mb: float = 20.0, max_pixels: int = 40_000_000,
                 max_decodes: int = 2, card: str = "", examples: str | Path | None = None) -> None:
        check_number("max_decodes", max_decodes, minimum=1, integer=True)
        self.estimator = estimator
        self.max_bytes, self.max_pixels = int(float(max_upload_mb) * 1e6), int(max_pixels)
        self.card = card
        self.examples = [str(p) for p in list_images(Path(examples).expanduser())] if examples else []
        if examples and not self.examples:
            log.warning("examples=%s holds no photos: the page shows none", examples)
        self._lock = threading.Lock()  # one prediction at a time: the detector is not thread-safe
        self._decodes = threading.BoundedSemaphore(int(max_decodes))
        self.max_decodes = int(max_decodes)
        # The only folder the page may read files from: where Gradio stores this server's uploads
        # (create_app points Gradio at it). Private to this process (mkdtemp: mode 0700).
        self.upload_dir = Path(tempfile.mkdtemp(prefix="agecls-serve-"))

    @classmethod
    def from_config(cls, cfg: DictConfig) -> AgeServer:
        estimator = AgeEstimator.from_config(cfg)
        return cls(estimator, max_upload_mb=float(cfg.max_upload_mb), max_pixels=int(cfg.max_pixels),
                   max_decodes=int(cfg.get("max_decodes", 2)), card=model_card(estimator.path, estimator),
                   examples=cfg.get("examples"))

    def predict(self, img: Image.Image) -> dict[str, Any]:
        with self._lock:
            rows = self.estimator.predict_image(img)
        faces = [face_json(r) for r in rows if r.status == "ok"]
        return {"faces": faces, "status": "ok" if faces else "no_face", "coverage": self.estimator.coverage,
                "image_size": [img.width, img.height], "_rows": rows}

    def decode(self, data: bytes) -> Image.Image:
        """decode_upload under the bound of max_decodes concurrent decodes."""
        if not self._decodes.acquire(timeout=DECODE_WAIT_S):
            raise UploadError(503, "The server is busy decoding other photos; try again in a minute.")
        try:
            return decode_upload(data, self.max_bytes, self.max_pixels)
        finally:
            self._decodes.release()

    def predict_bytes(self, data: bytes) -> tuple[dict[str, Any], Image.Image]:
        img = self.decode(data)
        return self.predict(img), img

    def is_uploaded(self, path: str | os.PathLike[str]) -> bool:
        """Whether `path` (links resolved) lies in this server's upload folder or is an example photo."""
        try:
            real = Path(os.path.realpath(path))
        except (OSError, ValueError):
            return False
        return real.is_relative_to(self.upload_dir.resolve()) or str(real) in {os.path.realpath(e) for e in self.examples}

    def read_upload(self, path: str | os.PathLike[str]) -> bytes:
        """The bytes of a file the page was given, only if it was uploaded to this server or is one
        of the example photos (is_uploaded); else UploadError 403."""
        real = Path(os.path.realpath(path))
        if not self.is_uploaded(path) or not real.is_file():
            log.warning("Refused a request for a file that was not uploaded: %s", path)
            raise UploadError(403, "Only photos uploaded to this page can be read: upload the photo.")
        size = real.stat().st_size
        if size > self.max_bytes:
            raise UploadError(413, f"The upload is {_mb(size)} MB; this server takes photos up to {_mb(self.max_bytes)} MB.")
        return real.read_bytes()

    def health(self) -> dict[str, Any]:
        return {"status": "ok", **self.estimator.describe(), "max_upload_mb": self.max_bytes / 1e6,
                "max_pixels": self.max_pixels, "max_decodes": self.max_decodes}


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
    async def health() -> dict[str, Any]:  # async: never waits for a thread behind decoding uploads
        return server.health()

    @app.get("/api/model_card", response_class=PlainTextResponse)
    async def card() -> PlainTextResponse:
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
        result.pop("_rows")
        return JSONResponse(result)

    app.add_middleware(BodyLimit, limit=server.max_bytes + MULTIPART_SLACK, prefix="/api/")
    if ui:
        import gradio as gr

        # Gradio stores uploads (and its own outputs) under GRADIO_TEMP_DIR, read when its app is made
        os.environ["GRADIO_TEMP_DIR"] = str(server.upload_dir)
        gr.mount_gradio_app(app, build_ui(server), path="/", theme=_theme(), footer_links=[],
                            max_file_size=server.max_bytes, ssr_mode=False, show_error=True, pwa=False,
                            mcp_server=False, enable_monitoring=False, css=CSS,
                            allowed_paths=[], blocked_paths=[])
        app.add_middleware(FileGuard, server=server)
    return app


class FileGuard:
    """ASGI middleware between the world and the mounted Gradio app (which skips Gradio's own
    "must be an upload" check when mounted), refusing with 403 before Gradio sees the request:

    - Gradio's file route (`/gradio_api/file=PATH`) for any file not under the server's upload
      folder and not an example photo;
    - a call of the page's API (a JSON body under `/gradio_api/`) naming a file (a FileData: any
      object with a `path` or `url`) that was not uploaded to this server: a client cannot make
      the page read, or fetch, a file of its choosing.
    """

    PREFIXES = ("/gradio_api/file=", "/file=")
    API = "/gradio_api/"
    MAX_JSON = 1_000_000  # an API call's JSON body: file references and a few values, never a photo

    def __init__(self, app: Any, server: AgeServer) -> None:
        self.app, self.server = app, server

    @staticmethod
    async def _refuse(send: Any, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def foreign_files(self, value: Any) -> list[str]:
        """The files a JSON value names (FileData `path` / `url`) that were not uploaded here."""
        found: list[str] = []
        if isinstance(value, dict):
            for key in ("path", "url"):
                ref = value.get(key)
                if isinstance(ref, str) and ref:
                    local = ref
                    if key == "url":  # Gradio's own URL of an upload: .../gradio_api/file=PATH
                        marker = next((p for p in self.PREFIXES if p in ref), None)
                        local = unquote(ref.split(marker, 1)[1]) if marker else ""
                    if not local or not self.server.is_uploaded(local):
                        found.append(ref)
            for v in value.values():
                found += self.foreign_files(v)
        elif isinstance(value, list):
            for v in value:
                found += self.foreign_files(v)
        return found

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        prefix = next((p for p in self.PREFIXES if path.startswith(p)), None)
        if prefix is not None and not self.server.is_uploaded(unquote(path[len(prefix):])):
            log.warning("Refused to serve a file that was not uploaded: %s", unquote(path[len(prefix):]))
            return await self._refuse(send, 403, "Only files uploaded to this server are served.")
        headers = dict(scope.get("headers") or [])
        if not (scope.get("method") == "POST" and path.startswith(self.API)
                and headers.get(b"content-type", b"").startswith(b"application/json")):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.MAX_JSON:
                return await self._refuse(send, 413, "The request is too large for an API call; upload the photo.")
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            foreign = self.foreign_files(json.loads(body))
        except (ValueError, RecursionError):
            foreign = []  # not JSON: Gradio answers it
        if foreign:
            log.warning("Refused an API call naming files that were not uploaded: %s", foreign[:3])
            return await self._refuse(send, 403, "Only photos uploaded to this page can be read: upload the photo.")
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def replayed() -> Any:
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)


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
    cover = f"{100 * result['coverage']:.0f} %"
    lines = [f"**{len(faces)} face{'s' if len(faces) != 1 else ''}** found, largest first:", "",
             f"| face | age (years) | {cover} interval | box (x0, y0, x1, y1) | detector score |",
             "| --- | --- | --- | --- | --- |"]
    for k, face in enumerate(faces, 1):
        score = "" if face["score"] is None else f"{face['score']:.2f}"
        low, high = face["predicted_low"], face["predicted_high"]
        interval = "" if low is None or high is None else f"{low:.0f} to {high:.0f}"
        lines.append(f"| {k} | {face['age']:.1f} | {interval} | {', '.join(map(str, face['box']))} | {score} |")
    return "\n".join(lines)


def build_ui(server: AgeServer) -> Any:
    import gradio as gr

    def show(path: str | None) -> tuple[Any, Any, str]:
        """The checked, decoded upload, shown at once (before any face is looked for)."""
        if not path:
            return None, None, ""
        try:
            img = server.decode(server.read_upload(path))
        except UploadError as err:
            raise gr.Error(err.message) from None
        return img, img, "Looking for faces..."

    def run(img: Image.Image | None) -> tuple[Any, str]:
        if img is None:
            return None, ""
        result = server.predict(img)
        return server.estimator.draw(img, result.pop("_rows")), summary_markdown(result)

    with gr.Blocks(title="agecls: how old do they look?", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# How old do they look?\nDrop a photo (or click to choose one): every face found is outlined "
                    f"with its estimated age and the range that holds the true age {100 * server.estimator.coverage:.0f} "
                    "times in 100. The photo stays on this machine.")
        decoded = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                # a file, not gr.Image: Gradio would decode the upload itself (and the browser preview it)
                # before decode_upload could check its format and size and say what is wrong
                photo = gr.File(label="Photo: drop it here or click to choose", file_types=["image"],
                                type="filepath", file_count="single", elem_id="photo", height=160)
                if server.examples:
                    gr.Examples(examples=[[e] for e in server.examples], inputs=photo, label="Example photos: click one",
                                examples_per_page=12, elem_id="examples")
            result = gr.Image(label="Faces and ages", elem_id="result", type="pil", format="png", interactive=False,
                              scale=2)
        summary = gr.Markdown(elem_id="summary")
        gr.Markdown(server.card, elem_id="model-card")
        photo.change(show, inputs=photo, outputs=[result, decoded, summary], concurrency_limit=server.max_decodes
                     ).then(run, inputs=decoded, outputs=[result, summary], concurrency_limit=1)
    return demo


# ------------------------------------------------------------------------------------- command
@entry_point
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="serve")
def main(cfg: DictConfig) -> None:
    import uvicorn

    server = AgeServer.from_config(cfg)
    app = create_app(server, ui=bool(cfg.get("ui", True)))
    options = server.estimator.options
    log.info("Serving %s on http://%s:%d (detector %s, faces=%s): open it in a browser; POST photos to /api/predict",
             server.estimator.name, cfg.host, int(cfg.port), options.detector if options.detect_faces else "none",
             options.faces)
    uvicorn.run(app, host=str(cfg.host), port=int(cfg.port), log_level=str(cfg.get("log_level", "info")))


if __name__ == "__main__":
    main()
