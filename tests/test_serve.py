"""agecls.serve: the JSON API with good and hostile uploads (FastAPI's TestClient), the model
card, and the page itself in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
upload a photo through the page, see the boxes and ages, and every request stays on 127.0.0.1."""

from __future__ import annotations

import io
import math
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from agecls import serve
from agecls.model_card import checkpoint_hparams, render_model_card
from agecls.predict import predict
from agecls.serve import AgeServer, create_app
from agecls.train import train
from agecls.utils.checkpoint import read_checkpoint
from tests.conftest import SYNTHETIC, TINY, compose_cfg, utkface_dir

UTK = sorted(utkface_dir().glob("*.jpg"))
CHROMIUM = Path("/usr/bin/chromium")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


# ------------------------------------------------------------------------------------ no network
@pytest.fixture(autouse=True, scope="module")
def no_outside_network():
    """Any connection this process (the server included) opens to a non-loopback address fails
    the test: the page and the API must work offline."""
    tried: list[object] = []
    connect = socket.socket.connect

    def guarded(sock: socket.socket, address: object) -> object:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and str(address[0]) not in LOOPBACK:  # type: ignore[index]
            tried.append(address)
            raise OSError(f"test_serve: no network, refused a connection to {address}")
        return connect(sock, address)

    socket.socket.connect = guarded  # type: ignore[method-assign]
    try:
        yield tried
    finally:
        socket.socket.connect = connect  # type: ignore[method-assign]
    assert not tried, f"the server tried to reach the outside: {tried}"


# ---------------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    """A tiny trained model (synthetic faces, 32 px) and its run directory (no torch.compile of the
    augmentation: it would double the time and the page does not care)."""
    out = tmp_path_factory.mktemp("serve")
    cfg = compose_cfg([*TINY, *SYNTHETIC, f"paths.cache_dir={cache_dir}", "data.augment.compile=false"], out / "run")
    metrics = train(cfg)
    return {"dir": out / "run", "ckpt": Path(metrics["best_checkpoint"]), "base": out}


@pytest.fixture(scope="module")
def examples(trained: dict) -> Path:
    """The folder of example photos the page is started with: the two-face photo."""
    folder = trained["base"] / "examples"
    folder.mkdir(exist_ok=True)
    _two_faces()[0].save(folder / "two people.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def server(trained: dict, examples: Path) -> AgeServer:
    cfg = compose_cfg([f"ckpt_path={trained['ckpt']}", "device=cpu", f"examples={examples}"], trained["base"] / "serve",
                      "serve")
    return AgeServer.from_config(cfg)


@pytest.fixture(scope="module")
def client(server: AgeServer) -> TestClient:
    return TestClient(create_app(server, ui=True))


# --------------------------------------------------------------------------------------- photos
def _two_faces() -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """Two real UTKFace crops on a grey canvas: the left 200 px, the right 150 px."""
    big = Image.open(UTK[500]).convert("RGB")
    small = Image.open(UTK[3000]).convert("RGB").resize((150, 150))
    canvas = Image.new("RGB", (700, 400), (120, 130, 140))
    canvas.paste(big, (40, 80))
    canvas.paste(small, (450, 120))
    return canvas, [(40, 80, 240, 280), (450, 120, 600, 270)]


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit grey) and whose pixels are all zeros: a
    decompression bomb of a few hundred kB (30000 x 30000 is 900 megapixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    pixels = zlib.compressobj(9)
    body = b"".join(pixels.compress(row) for _ in range(height)) + pixels.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _post(client: TestClient, data: bytes, name: str = "photo.jpg", kind: str = "image/jpeg"):
    return client.post("/api/predict", files={"image": (name, data, kind)})


def _inside(box: list[int], pasted: tuple[int, int, int, int]) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return pasted[0] < cx < pasted[2] and pasted[1] < cy < pasted[3]


# ------------------------------------------------------------------------------------------ API
def test_api_boxes_every_face_with_the_age_agecls_predict_gives(client, server, trained, tmp_path) -> None:
    photo, pasted = _two_faces()
    data = _encode(photo, quality=95)
    res = _post(client, data)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["status"] == "ok" and body["image_size"] == [700, 400]
    faces = body["faces"]
    assert len(faces) == 2 and all(set(f) == {"box", "landmarks", "score", "age", "predicted_low", "predicted_high"}
                                   for f in faces)
    assert _inside(faces[0]["box"], pasted[0]) and _inside(faces[1]["box"], pasted[1])  # largest first
    lo, hi = server.estimator.age_range
    assert all(lo <= f["age"] <= hi and math.isfinite(f["score"]) for f in faces)
    assert all(f["predicted_low"] <= f["age"] <= f["predicted_high"] for f in faces)
    assert body["coverage"] == 0.9 and all(len(f["landmarks"]) == 5 for f in faces)

    # one copy of the logic: the same rows as `agecls.predict` (its defaults) on the same file
    (tmp_path / "two.jpg").write_bytes(data)
    cfg = compose_cfg([f"ckpt_path={trained['ckpt']}", f"input={tmp_path / 'two.jpg'}", "num_workers=0",
                       "device=cpu"], tmp_path / "p", "predict")
    table = predict(cfg)
    assert [list(r) for r in table[["x0", "y0", "x1", "y1"]].to_numpy()] == [f["box"] for f in faces]
    for col, key in (("predicted", "age"), ("predicted_low", "predicted_low"), ("predicted_high", "predicted_high")):
        assert np.allclose(table[col], [f[key] for f in faces], atol=0.011), col

    # EXIF: the same pixels stored on their side with orientation 6 give the same faces and ages
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = _encode(photo.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)
    upright = client.post("/api/predict", files={"image": ("a.png", _encode(photo, "PNG"), "image/png")}).json()
    rotated = client.post("/api/predict", files={"image": ("b.png", turned, "image/png")}).json()
    assert rotated == upright and rotated["status"] == "ok" and len(rotated["faces"]) == 2


def test_api_photo_without_a_face(client) -> None:
    res = _post(client, _encode(Image.new("RGB", (320, 240), (90, 90, 90))))
    assert res.status_code == 200
    assert res.json() == {"faces": [], "status": "no_face", "coverage": 0.9, "image_size": [320, 240]}


def test_health_and_model_card_routes(client, server) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["age_range"] == list(server.estimator.age_range)
    assert health.json()["detector"] == "mtcnn" and health.json()["calibrated"] is True
    card = client.get("/api/model_card")
    assert card.status_code == 200 and card.text == server.card and "# Model card" in card.text
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    # Swagger UI and ReDoc would load from a CDN: they are off
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def _bad_uploads() -> list[tuple[str, dict, int, str]]:
    ps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    return [
        ("text", {"files": {"image": ("notes.txt", b"just some text, not a photo\n", "text/plain")}}, 415, "not an image"),
        ("eps", {"files": {"image": ("x.eps", ps, "application/postscript")}}, 415, "not an image"),
        ("empty", {"files": {"image": ("empty.jpg", b"", "image/jpeg")}}, 400, "empty"),
        ("bomb", {"files": {"image": ("bomb.png", _png_header_only(30000, 30000), "image/png")}}, 413, "pixels"),
        ("truncated", {"files": {"image": ("cut.jpg", _encode(_two_faces()[0])[:5000], "image/jpeg")}}, 400, "cut short"),
        ("cut mid-scan, end marker added", {"files": {"image": ("cut2.jpg", _encode(_two_faces()[0])[:9000] + b"\xff\xd9",
                                                                "image/jpeg")}}, 400, "cut short"),
        ("no field", {"files": {"photo": ("a.jpg", b"\xff\xd8", "image/jpeg")}}, 400, "field `image`"),
        ("not multipart", {"content": b"\xff\xd8\xff", "headers": {"content-type": "image/jpeg"}}, 400, "multipart"),
        ("too large", {"files": {"image": ("big.jpg", b"\xff" * 21_000_000, "image/jpeg")}}, 413, "MB"),
    ]


@pytest.mark.parametrize("case", _bad_uploads(), ids=lambda c: c[0])
def test_bad_uploads_get_a_clear_4xx_and_the_server_goes_on(client, case) -> None:
    _, request, status, words = case
    res = client.post("/api/predict", **request)
    assert res.status_code == status, res.text
    assert words.lower() in res.json()["detail"].lower()
    assert client.get("/health").status_code == 200
    assert _post(client, _encode(Image.new("RGB", (64, 64)))).status_code == 200


def test_limits_are_the_configured_ones_and_pixels_are_checked_before_decoding(server, monkeypatch) -> None:
    small = AgeServer(server.estimator, max_upload_mb=0.05, max_pixels=100_000, card="card")
    client = TestClient(create_app(small, ui=False))
    decoded: list[object] = []
    real = serve.decode_rgb
    monkeypatch.setattr(serve, "decode_rgb", lambda im, *a: decoded.append(im.size) or real(im, *a))

    # 400 x 300 = 120 000 pixels, under Pillow's own bomb limit but over this server's: refused from the header
    res = _post(client, _encode(Image.new("RGB", (400, 300)), "PNG"), "a.png", "image/png")
    assert res.status_code == 413 and "400 x 300" in res.json()["detail"] and decoded == []
    assert _post(client, _encode(Image.new("RGB", (300, 300)), "PNG"), "b.png", "image/png").status_code == 200
    assert decoded == [(300, 300)]
    # a body over max_upload_mb is refused before it is parsed, streamed (no Content-Length) or not
    res = _post(client, b"\x00" * 60_000)
    assert res.status_code == 413 and "MB" in res.json()["detail"]
    chunks = (b"\x00" * 10_000 for _ in range(20))
    res = client.post("/api/predict", content=chunks, headers={"content-type": "multipart/form-data; boundary=x"})
    assert res.status_code == 413
    assert client.get("/health").status_code == 200


# ------------------------------------------------------------------------- only what was uploaded
def _secret(tmp_path: Path) -> tuple[Path, bytes]:
    """A server-side photo no client uploaded, carrying a marker in its bytes."""
    path = tmp_path / "server-side.png"
    info = __import__("PIL.PngImagePlugin", fromlist=["PngInfo"]).PngInfo()
    info.add_text("comment", "SERVER-SIDE-SECRET-7f3a")
    _two_faces()[0].save(path, "PNG", pnginfo=info)
    return path, b"SERVER-SIDE-SECRET-7f3a"


def _file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def test_the_page_reads_and_serves_only_uploaded_files(client, server, tmp_path) -> None:
    secret, marker = _secret(tmp_path)
    data = secret.read_bytes()
    # the request: the page's API called with a server-side path
    for call in (f"/gradio_api/call/{name}" for name in ("show", "run")):
        res = client.post(call, json={"data": [_file_data(str(secret))]})
        assert 400 <= res.status_code < 500, (call, res.status_code, res.text[:200])
        assert marker not in res.content and data[:64] not in res.content
    # the same through the queue, and as a URL of Gradio's file route
    res = client.post("/gradio_api/queue/join", json={"data": [_file_data(str(secret))], "fn_index": 0,
                                                      "session_hash": "x1"})
    assert res.status_code == 403 and marker not in res.content
    url = {"path": "x.png", "url": f"http://testserver/gradio_api/file={secret}", "meta": {"_type": "gradio.FileData"}}
    assert client.post("/gradio_api/call/show", json={"data": [url]}).status_code == 403
    # Gradio's file route serves no file that was not uploaded
    for route in (f"/gradio_api/file={secret}", f"/file={secret}", "/gradio_api/file=/etc/passwd"):
        res = client.get(route)
        assert res.status_code == 403 and marker not in res.content and b"root:" not in res.content, route

    # an upload through the page's own route is read, and its result served
    up = client.post("/gradio_api/upload", files={"files": ("mine.png", data, "image/png")})
    assert up.status_code == 200, up.text
    [uploaded] = up.json()
    assert server.is_uploaded(uploaded) and Path(uploaded).resolve().is_relative_to(server.upload_dir.resolve())
    res = client.post("/gradio_api/call/show", json={"data": [_file_data(uploaded)]})
    assert res.status_code == 200 and "event_id" in res.json()
    assert client.get(f"/gradio_api/file={uploaded}").content == data


def test_decoding_is_bounded_and_health_answers_meanwhile(server, monkeypatch) -> None:
    """Four uploads at once: at most max_decodes are decoded together; /health answers at once."""
    client = TestClient(create_app(server, ui=False))
    active, peak, lock, release = [0], [0], threading.Lock(), threading.Event()
    real = serve.decode_upload

    def slow(data: bytes, max_bytes: int, max_pixels: int):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        release.wait(20)
        with lock:
            active[0] -= 1
        return real(data, max_bytes, max_pixels)

    monkeypatch.setattr(serve, "decode_upload", slow)
    photo = _encode(Image.new("RGB", (64, 64)), "PNG")
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(_post(client, photo, "a.png", "image/png").status_code))
               for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while peak[0] < server.max_decodes and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # the other two are waiting for a slot, not decoding
    t0 = time.monotonic()
    assert client.get("/health").status_code == 200
    assert time.monotonic() - t0 < 2.0
    assert active[0] == server.max_decodes == 2
    release.set()
    for t in threads:
        t.join(60)
    assert codes == [200] * 4 and peak[0] == 2


# ----------------------------------------------------------------------------------- model card
def test_model_card_from_hyperparameters_metrics_and_cleaning(trained) -> None:
    hparams = checkpoint_hparams(read_checkpoint(trained["ckpt"]))
    metrics = {"test/mae": 5.4321, "test/cs5": 0.61, "test/pearson": 0.9, "test/n_images": 12,
               "mae_by_decade/20-29": 4.5, "mae_by_decade/30-39": 6.25,
               "mae_by_gender/female": 5.1, "mae_by_gender/male": 5.7}
    cleaning = {"records_in": 120, "removed": {"unreadable": 3, "duplicate": 2}, "records_out": 115,
                "splits": {"train": 92, "val": 11, "test": 12}, "split_version": "hash-v2"}
    card = render_model_card(hparams, metrics, cleaning, {"model": "epoch_000.ckpt"})
    backbone = hparams["backbone"]["name"]
    for text in (f"| Backbone | {backbone}", "| Head |", "| Backbone frozen |", "32 x 32 RGB",
                 f"{hparams['age_min']:g} to {hparams['age_max']:g} years", "| Data set | synthetic",
                 "| Removed: unreadable | 3 |", "| Records kept | 115 |", "train 92, val 11, test 12",
                 "| MAE (years) | 5.43 |", "## MAE by decade", "| 30-39 | 6.25 |", "## MAE by gender",
                 "| female | 5.10 |", "## Intended use", "## Known limits", "`epoch_000.ckpt`"):
        assert text in card, text
    bare = render_model_card({}, None, None, None)
    assert bare.startswith("# Model card") and "No metrics.json" in bare


def test_the_page_shows_the_runs_model_card_or_renders_one(trained, server, tmp_path) -> None:
    # no MODEL_CARD.md in the run: rendered from the checkpoint and the run's metrics.json
    assert "## Model" in server.card and "## Metrics (test split)" in server.card
    assert f"| Backbone | {read_checkpoint(trained['ckpt'])['hyper_parameters']['backbone']['name']}" in server.card
    # a run that has one (checkpoints/../MODEL_CARD.md): shown as written
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained["ckpt"], run / "checkpoints" / "best.ckpt")
    (run / "MODEL_CARD.md").write_text("# The card this run wrote\n\nMAE 4.2 years.\n")
    assert serve.model_card(run / "checkpoints" / "best.ckpt", server.estimator) == "# The card this run wrote\n\nMAE 4.2 years.\n"


# -------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def live(server: AgeServer):
    """The app (page and API) served by uvicorn in a thread on a free port of 127.0.0.1."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(create_app(server, ui=True), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not web.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    web.should_exit = True
    thread.join(10)


# The colours' sampled pixels: on each box's outline (left and right edges, halfway down) and in its
# label's filled tag (just above the box's top-left corner, or below the box where there is no room).
_PIXELS_JS = """(img, points) => {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d');
    g.drawImage(img, 0, 0);
    return points.map(([x, y]) => Array.from(g.getImageData(x, y, 1, 1).data.slice(0, 3)));
}"""


def _face_points(box: list[int], height: int) -> dict[str, list[int]]:
    x0, y0, x1, y1 = box
    mid = (y0 + y1) // 2
    tag_y = y0 - 4 if y0 > 30 else min(y1 + 4, height - 1)
    return {"left edge": [x0 + 1, mid], "right edge": [x1 - 2, mid], "label": [x0 + 2, tag_y]}


def test_page_in_headless_chromium_outlines_and_labels_every_face(live, server, examples, tmp_path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's Chromium is missing: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    from agecls.estimator import COLOURS

    photo, _ = _two_faces()
    photo.save(tmp_path / "two people.jpg", quality=95)
    want = server.predict(Image.open(tmp_path / "two people.jpg").convert("RGB"))
    assert want["status"] == "ok" and len(want["faces"]) == 2
    requests: list[str] = []
    shots = Path(os.environ.get("AGECLS_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(live + "/", wait_until="load", timeout=60_000)  # not networkidle: Gradio keeps a heartbeat open
            # the model card is on the page before any photo, with no absolute path in it
            card = page.locator("#model-card")
            card.get_by_text("Model card").first.wait_for(timeout=30_000)
            text = card.inner_text()
            assert "Known limits" in text and "Backbone" in text
            assert str(server.estimator.name) in text or "epoch_" in text
            assert "/tmp/" not in text and str(Path.home()) + "/" not in text

            page.locator("#photo input[type=file]").set_input_files(str(tmp_path / "two people.jpg"))
            page.locator("#summary table").wait_for(timeout=60_000)
            summary = page.locator("#summary").inner_text()
            assert "2 faces" in summary and "90 % interval" in summary
            for face in want["faces"]:
                assert f"{face['age']:.1f}" in summary and ", ".join(map(str, face["box"])) in summary
                assert f"{face['predicted_low']:.0f} to {face['predicted_high']:.0f}" in summary
            # the photo itself, each face outlined in its colour with its label on a tag of that colour
            img = page.locator("#result img").first
            img.wait_for(timeout=30_000)
            page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=img.element_handle(), timeout=30_000)
            assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [700, 400]
            for k, face in enumerate(want["faces"]):
                points = _face_points(face["box"], 400)
                got = img.evaluate(_PIXELS_JS, list(points.values()))
                for (where, _), rgb in zip(points.items(), got, strict=True):
                    assert np.abs(np.array(rgb) - COLOURS[k]).max() <= 40, (k, where, rgb, COLOURS[k])
            page.screenshot(path=str(shots / "serve-page.png"), full_page=True)

            # an example photo, clicked, gives the same faces
            page.locator("#photo button[aria-label='Clear']").click()
            page.get_by_text("No face found").or_(page.locator("#summary")).first.wait_for(timeout=10_000)
            page.locator("#examples").get_by_text("two people.jpg").first.click()
            page.locator("#summary table").wait_for(timeout=60_000)
            assert "2 faces" in page.locator("#summary").inner_text()

            # a photo without a face says so
            Image.new("RGB", (300, 200), (90, 90, 90)).save(tmp_path / "wall.jpg")
            page.locator("#photo button[aria-label='Clear']").click()
            page.locator("#photo input[type=file]").set_input_files(str(tmp_path / "wall.jpg"))
            page.get_by_text("No face found").wait_for(timeout=60_000)
            # a file that is no image: the server's message, shown to the person
            (tmp_path / "notes.png").write_bytes(b"just some text, not a photo\n")
            page.locator("#photo button[aria-label='Clear']").click()
            page.locator("#photo input[type=file]").set_input_files(str(tmp_path / "notes.png"))
            page.locator(".toast-body").get_by_text("not an image this server reads").wait_for(timeout=60_000)
        finally:
            browser.close()
    assert (shots / "serve-page.png").stat().st_size > 10_000
    assert requests, "the page made no request"
    outside = [u for u in requests if not u.startswith(("data:", "blob:")) and urlsplit(u).hostname != "127.0.0.1"]
    assert not outside, f"the page fetched from outside: {outside}"
