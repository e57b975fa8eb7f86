"""`/v1/img2img`, `/v1/inpaint` and the progress stream on a real server on 127.0.0.1 with the tiny bundle: the same
images as `Pipeline.generate(image=, mask=)`, and hostile uploads (too many bytes, too many pixels, bombs, other
formats, damaged files) refused before they are decoded."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'sdedge[serve]'")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx")
import test_server
from conftest import bundle_without
from PIL import Image
from test_server import SLOW, ThreadServer, png_size

from sdedge.runtime.server import ServeSettings, create_app

unsigned_bundle, pipe = test_server.unsigned_bundle, test_server.pipe  # the tiny bundle's fixtures

LIMITS = {"max_upload_bytes": 200_000, "max_upload_pixels": 1_000_000}


@pytest.fixture(scope="module")
def server(pipe):
    with ThreadServer(create_app(pipe, ServeSettings(allow_unsigned=True, **LIMITS))) as srv:
        yield srv


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> str:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return base64.b64encode(buf.getvalue()).decode()


def init_image(size=(64, 48)) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    rgb = np.stack([np.tile(x, (size[1], 1)), np.full((size[1], size[0]), 40, np.uint8),
                    np.tile(x[::-1], (size[1], 1))], axis=-1)  # (H, W, 3)
    return Image.fromarray(rgb)


def half_mask(size=(64, 48)) -> Image.Image:
    m = np.zeros((size[1], size[0]), np.uint8)
    m[:, size[0] // 2:] = 255  # repaint the right half
    return Image.fromarray(m, "L")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width × height (8-bit RGB) followed by a few bytes of image data: what a decoder
    would allocate for is in the header; refusing it must not need the pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def post(c, route: str, **body):
    return c.post(route, json={"prompt": "a red circle", "steps": 4, "seed": 3, **body})


# -- the same images as the pipeline ---------------------------------------------------------------------------------
@pytest.mark.slow  # 5 s; fast: test_img2img_jobs_share_the_queue_and_cancel_by_id
def test_img2img_and_inpaint_answer_the_pipelines_images(server, pipe):
    image, mask = init_image(), half_mask()
    with server.client() as c:
        r = post(c, "/v1/img2img", image=encode(image), strength=0.6)
        assert r.status_code == 200, r.text
        assert png_size(r.content) == (64, 48)  # the image's own size
        direct = pipe.generate("a red circle", steps=4, seed=3, image=image, strength=0.6).to_pil()[0]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(direct))

        r = post(c, "/v1/inpaint", image=encode(image), mask=encode(mask))
        assert r.status_code == 200, r.text
        kept = server.server.config.app.state.queue.get(r.headers["x-job-id"]).params
        assert kept["kind"] == "inpaint" and "image" not in kept and "mask" not in kept  # history keeps no upload
        direct = pipe.generate("a red circle", steps=4, seed=3, image=image, mask=mask).to_pil()[0]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(direct))

        # width/height resize the upload (a JPEG here, with a data: URL prefix)
        r = post(c, "/v1/img2img", image="data:image/jpeg;base64," + encode(init_image((100, 80)), "JPEG"),
                 width=32, height=64, response_format="json")
        assert r.status_code == 200, r.text
        body = r.json()
        assert png_size(base64.b64decode(body["images"][0])) == (32, 64) and body["settings"]["strength"] == 0.8
        text = c.get("/metrics").text
    assert 'sdedge_generations_total{kind="img2img"} 2' in text and 'sdedge_generations_total{kind="inpaint"} 1' in text
    assert 'route="/v1/img2img",status="200"' in text


def test_img2img_jobs_share_the_queue_and_cancel_by_id(server):
    results = {}

    def slow():
        with server.client() as c:
            results["r"] = c.post("/v1/img2img", json={"prompt": "a", "image": encode(init_image((128, 128))),
                                                       "steps": SLOW["steps"], "strength": 1.0},
                                  headers={"x-job-id": "img2img-slow-job"})

    t = threading.Thread(target=slow)
    t.start()
    with server.client() as c:
        deadline = time.monotonic() + 20
        while (r := c.get("/v1/jobs/img2img-slow-job")).status_code == 404 or r.json()["state"] != "running":
            assert time.monotonic() < deadline, "the img2img job never ran"
            time.sleep(0.02)
        behind = threading.Thread(target=lambda: results.update(q=server.client().post(
            "/v1/generate", json={"prompt": "b", "steps": 2}, headers={"x-job-id": "text-job-behind"})))
        behind.start()  # waits behind it in the same queue
        while c.get("/v1/jobs/text-job-behind").status_code == 404:
            time.sleep(0.02)
        assert c.delete("/v1/jobs/img2img-slow-job").status_code == 200
        t.join(60)
        behind.join(60)
        assert results["r"].status_code == 503 and "cancelled" in results["r"].json()["detail"]
        assert results["q"].status_code == 200  # only the job named was cancelled
        job = c.get("/v1/jobs/img2img-slow-job").json()
        assert job["state"] == "cancelled" and job["steps_done"] < SLOW["steps"]


@pytest.mark.slow
def test_progress_events_stream_steps_then_end(server):
    events = []
    job_id = "events-job-1234"
    with server.client() as c:
        def later():
            time.sleep(0.5)  # the stream is opened before the job exists
            server.client().post("/v1/generate", json={"prompt": "a", "steps": 16, "width": 128, "height": 128},
                                 headers={"x-job-id": job_id})

        t = threading.Thread(target=later)
        t.start()
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
            block = []
            for line in stream.iter_lines():
                if line:
                    block.append(line)
                    continue
                kind = next((x[7:] for x in block if x.startswith("event: ")), "message")
                data = next((json.loads(x[6:]) for x in block if x.startswith("data: ")), None)
                events.append((kind, data))
                block = []
                if kind == "end":
                    break
        t.join(60)
        assert c.get("/v1/jobs/unknown-job-xx/events").status_code == 404
    steps = [d["steps_done"] for k, d in events if k == "message" and d["state"] == "running"]
    assert len(steps) >= 3 and steps == sorted(steps) and any(0 < x < 16 for x in steps), steps
    assert events[-1] == ("end", {"id": job_id, "state": "done", "steps_done": 16, "steps_total": 16})
    assert all("prompt" not in d for _, d in events)


# -- hostile uploads ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("upload, status, words", [
    (lambda: base64.b64encode(png_claiming(12_000, 12_000)).decode(), 413, "144,000,000 pixels"),
    (lambda: base64.b64encode(png_claiming(20_000, 20_000)).decode(), 413, "decompression bomb"),
    (lambda: base64.b64encode(png_claiming(2**31 - 1, 2**31 - 1)).decode(), 413, "pixels"),
    (lambda: encode(Image.new("RGB", (1024, 1024))), 413, "1,048,576 pixels"),  # a real one, past 1e6 pixels
    (lambda: base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 150_000 + b"x" * 60_000).decode(), 413, "bytes"),
    (lambda: encode(init_image(), "GIF"), 422, "not a PNG, JPEG or WebP"),
    (lambda: encode(init_image(), "BMP"), 422, "not a PNG, JPEG or WebP"),
    (lambda: encode(init_image(), "TIFF"), 422, "not a PNG, JPEG or WebP"),
    (lambda: base64.b64encode(base64.b64decode(encode(init_image()))[:120]).decode(), 422, "damaged"),
    (lambda: encode(init_image(), "PNG", save_all=True, append_images=[half_mask().convert("RGB")]), 422,
     "animated"),
    (lambda: "not base64 at all!", 422, "not base64"),
    (lambda: base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode(), 422, "not a PNG"),
])
def test_hostile_uploads_are_refused_with_a_message_before_decoding(server, upload, status, words):
    import psutil

    rss = psutil.Process().memory_info().rss
    with server.client() as c:
        for route, extra in (("/v1/img2img", {}), ("/v1/inpaint", {"image": encode(init_image())})):
            body = {"mask": upload(), **extra} if route == "/v1/inpaint" else {"image": upload()}
            t0 = time.monotonic()
            r = post(c, route, **body)
            assert r.status_code == status, r.text
            field = "mask" if route == "/v1/inpaint" else "image"
            assert r.json()["detail"].startswith(f"{field}: ") and words in r.json()["detail"], r.text
            assert time.monotonic() - t0 < 5
        assert c.get("/healthz").status_code == 200
    assert psutil.Process().memory_info().rss - rss < 100e6  # nothing near 20000² × 3 bytes was allocated


def test_a_body_over_the_upload_routes_limit_gets_413(server):
    with server.client() as c:
        r = post(c, "/v1/img2img", image="A" * 700_000)
        assert r.status_code == 413 and "bytes" in r.json()["detail"]
        r = post(c, "/v1/generate", negative_prompt="", image="x")  # the text route keeps its own model
        assert r.status_code == 422


def test_what_the_bundle_cannot_do_is_named(unsigned_bundle, tmp_path):
    from sdedge.runtime.pipeline import Pipeline

    p = Pipeline.load(bundle_without(unsigned_bundle, tmp_path / "no-encoder", "vae_encoder"), verify="off", threads=1)
    try:
        with ThreadServer(create_app(p, ServeSettings(allow_unsigned=True))) as srv, srv.client() as c:
            assert c.get("/v1/info").json()["abilities"] == {"txt2img": True, "img2img": False, "inpaint": False}
            for route in ("/v1/img2img", "/v1/inpaint"):
                masks = {"mask": encode(half_mask())} if route == "/v1/inpaint" else {}
                r = post(c, route, image=encode(init_image()), **masks)
                assert r.status_code == 422 and "vae_encoder" in r.json()["detail"], r.text
    finally:
        p.close()


def test_the_page_is_served_and_names_no_other_host(server):
    import re

    with server.client() as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self' blob:" in csp and "script-src 'self'" in csp
        for path in ("/", "/static/app.js", "/static/app.css"):
            text = c.get(path).text
            assert not re.search(r"(https?:)?//[a-z0-9]", text.replace("http://127.0.0.1:7860/", "")), path
        assert c.get("/docs").status_code == 404 and c.get("/redoc").status_code == 404  # they load from a CDN
        assert c.get("/v1/info").json()["limits"]["upload_pixels"] == LIMITS["max_upload_pixels"]
