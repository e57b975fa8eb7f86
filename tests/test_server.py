"""`sdedge serve`: a real uvicorn server on 127.0.0.1 with the tiny bundle (in a thread, or a subprocess where the
server's own RSS, signals or start-up refusal are under test)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'sdedge[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'sdedge[serve]'")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx")

from conftest import REPO

from sdedge.runtime.manifest import SIGNATURE_NAME
from sdedge.runtime.server import ServeSettings, create_app, server_config

TOKEN = "test-token-0123456789abcdef"
SLOW = {"steps": 150, "width": 128, "height": 128}  # several seconds on the tiny bundle: long enough to cancel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn.Server in a thread of this process, configured as `serve` configures it (server_config)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)


class ProcessServer:
    """`python -m sdedge serve BUNDLE ...` in a subprocess."""

    def __init__(self, bundle: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "sdedge", "serve", str(bundle), "--port", str(self.port),
                    "--server-log-level", "warning", *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"server exited: {self.proc.stdout.read()}"
            assert time.monotonic() < deadline, "server did not become ready"
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss


@pytest.fixture(scope="module")
def unsigned_bundle(tiny_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "bundle"
    shutil.copytree(tiny_bundle, out)
    (out / SIGNATURE_NAME).unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def pipe(unsigned_bundle):
    from sdedge.runtime.pipeline import Pipeline

    p = Pipeline.load(unsigned_bundle, verify="off", threads=1)
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(pipe):
    """A shared server: unsigned allowed, queue 4, timeout 30 s."""
    with ThreadServer(create_app(pipe, ServeSettings(allow_unsigned=True, max_queue=4, timeout=30))) as srv:
        yield srv


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im.size


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


# -- the contract ----------------------------------------------------------------------------------------------------
def test_generate_answers_a_png_the_same_as_the_pipeline(server, pipe):
    with server.client() as c:
        r = c.post("/v1/generate", json={"prompt": "a red circle", "seed": 7, "steps": 4})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert png_size(r.content) == (64, 64)
    assert r.headers["x-seed"] == "7" and len(r.headers["x-job-id"]) >= 8
    import numpy as np
    from PIL import Image

    direct = pipe.generate("a red circle", steps=4, seed=7).to_pil()[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(direct))


def test_json_with_base64_images(server):
    import base64

    with server.client() as c:
        r = c.post("/v1/generate", json={"prompt": "a blue square", "seed": 1, "steps": 2, "n": 2,
                                         "width": 32, "height": 48})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["images"]) == 2 and body["seed"] == 1
        assert png_size(base64.b64decode(body["images"][0])) == (32, 48)
        assert set(body["timings"]) >= {"text_encoder", "unet", "vae_decoder"}
        r = c.post("/v1/generate", json={"prompt": "x", "steps": 1}, headers={"accept": "application/json"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"


@pytest.mark.parametrize("body, field", [
    (b'{"prompt": "a", ', None),  # malformed JSON
    (b'[1, 2]', None),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "steps": "5"}, "steps"),
    ({"prompt": "a", "steps": True}, "steps"),
    ({"prompt": "a", "steps": 0}, "steps"),
    ({"prompt": "a", "steps": 10_000}, "steps"),
    ({"prompt": "a", "width": 513}, "width"),
    ({"prompt": "a", "width": 72}, "width"),  # inside the range, not a multiple of 16
    ({"prompt": "a", "height": 16}, "height"),
    ({"prompt": "x" * 100_000}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "a", "n": 99}, "n"),
    ({"prompt": "a", "n": 2, "response_format": "png"}, None),
    ({"prompt": "a", "guidance": "high"}, "guidance"),
    ({"prompt": "a", "scheduler": "nope"}, None),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "unknown": 1}, "unknown"),
    ({}, "prompt"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_stays_healthy(server, body, field):
    with server.client() as c:
        if isinstance(body, bytes):
            r = c.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        else:
            r = c.post("/v1/generate", json=body)
        assert 400 <= r.status_code < 500, r.text
        assert r.status_code == 422
        detail = r.json()["detail"]
        assert detail and all("msg" in d for d in detail)
        if field:
            assert any(d["loc"][-1] == field for d in detail), detail
        assert len(r.content) < 5000  # inputs are not echoed back
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").json()["ready"] is True


def test_oversized_body_is_refused(server):
    with server.client() as c:
        r = c.post("/v1/generate", content=b'{"prompt": "' + b"x" * 2_000_000 + b'"}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get("/healthz").status_code == 200


def test_openapi_states_the_bundles_limits(server):
    with server.client() as c:
        schema = c.get("/openapi.json").json()
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert props["width"]["minimum"] == 32 and props["width"]["maximum"] == 128
    assert props["width"]["multipleOf"] == 16
    assert props["steps"]["maximum"] == 150
    assert "securitySchemes" not in schema.get("components", {})  # no token, no scheme


def test_metrics_are_prometheus_text(server):
    with server.client() as c:
        c.post("/v1/generate", json={"prompt": "a", "steps": 1})
        text = c.get("/metrics").text
    assert 'sdedge_http_requests_total{method="POST",route="/v1/generate",status="200"}' in text
    assert metric(text, "sdedge_generate_duration_seconds_count") >= 1
    assert 'sdedge_stage_seconds_sum{stage="unet"}' in text
    assert metric(text, "sdedge_queue_depth") == 0
    assert metric(text, "sdedge_queue_capacity") == 4
    assert "a red circle" not in text


# -- timeouts and cancel by job id --------------------------------------------------------------------------------
def test_timeout_gets_503_and_cancels_that_job_not_the_next(server):
    results = {}

    def slow():
        with server.client() as c:
            results["a"] = c.post("/v1/generate", json={"prompt": "slow", **SLOW, "timeout": 1.0},
                                  headers={"x-job-id": "job-a-timeout"})

    t = threading.Thread(target=slow)
    t.start()
    with server.client() as c:
        deadline = time.monotonic() + 10
        while (r := c.get("/v1/jobs/job-a-timeout")).status_code == 404 or r.json()["state"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        b = c.post("/v1/generate", json={"prompt": "quick", "steps": 2, "seed": 3}, headers={"x-job-id": "job-b-quick"})
        t.join(60)
        a = results["a"]
        assert a.status_code == 503, a.text
        assert "job-a-timeout" in a.json()["detail"]
        assert b.status_code == 200, b.text  # the job behind it ran to the end
        job_a = c.get("/v1/jobs/job-a-timeout").json()
        assert job_a["state"] == "cancelled" and job_a["steps_done"] < SLOW["steps"]
        assert c.get("/v1/jobs/job-b-quick").json()["state"] == "done"
        assert metric(c.get("/metrics").text, "sdedge_jobs_running") == 0


def test_delete_cancels_only_the_job_named(server):
    results = {}

    def post(name, body):
        with server.client() as c:
            results[name] = c.post("/v1/generate", json=body, headers={"x-job-id": name})

    running = threading.Thread(target=post, args=("job-running-1", {"prompt": "a", **SLOW}))
    running.start()
    with server.client() as c:
        deadline = time.monotonic() + 10
        while (r := c.get("/v1/jobs/job-running-1")).status_code == 404 or r.json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        waiting = threading.Thread(target=post, args=("job-waiting-2", {"prompt": "b", "steps": 2}))
        waiting.start()
        while c.get("/v1/jobs/job-waiting-2").status_code == 404:
            time.sleep(0.02)
        assert c.delete("/v1/jobs/job-running-1").status_code == 200
        running.join(60)
        waiting.join(60)
        assert results["job-running-1"].status_code == 503
        assert results["job-waiting-2"].status_code == 200
        assert c.delete("/v1/jobs/job-running-1").status_code == 409  # already cancelled
        assert c.delete("/v1/jobs/no-such-job-x").status_code == 404
        # a job id in use is refused, not shared
        assert c.post("/v1/generate", json={"prompt": "c", "steps": 1},
                      headers={"x-job-id": "job-waiting-2"}).status_code == 409


# -- auth ---------------------------------------------------------------------------------------------------------
def test_bearer_token(pipe):
    app = create_app(pipe, ServeSettings(allow_unsigned=True, token=TOKEN))
    with ThreadServer(app) as srv, srv.client() as c:
        body = {"prompt": "a", "steps": 1}
        assert c.post("/v1/generate", json=body).status_code == 401
        r = c.post("/v1/generate", json=body, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/generate", json=body, headers={"authorization": f"Basic {TOKEN}"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/v1/jobs/whatever-id").status_code == 401
        ok = c.post("/v1/generate", json=body, headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        schema = c.get("/openapi.json")
        assert schema.status_code == 200 and TOKEN not in schema.text
        assert "securitySchemes" in schema.json()["components"]


# -- a subprocess server: queue bound, RSS, graceful shutdown -----------------------------------------------------
@pytest.mark.slow  # a subprocess server: 5-7 s; fast: test_timeout_gets_503_and_cancels_that_job_not_the_next
def test_forty_concurrent_requests_with_a_queue_of_four(unsigned_bundle):
    import psutil  # noqa: F401  (a base dependency)

    body = {"prompt": "a green triangle", "steps": 10, "seed": 5}

    def one(_):
        with httpx.Client(timeout=120) as c:
            return c.post(srv.url + "/v1/generate", json=body)

    with ProcessServer(unsigned_bundle, "--allow-unsigned", "--max-queue", "4", "--threads", "1") as srv:
        with httpx.Client(timeout=60) as c:
            assert c.post(srv.url + "/v1/generate", json=body).status_code == 200  # warm
        rss = [srv.rss()]
        latencies = []
        for _burst in range(2):
            t0 = time.monotonic()
            with ThreadPoolExecutor(40) as pool:
                responses = list(pool.map(one, range(40)))
            latencies.append(time.monotonic() - t0)
            codes = [r.status_code for r in responses]
            ok = [r for r in responses if r.status_code == 200]
            busy = [r for r in responses if r.status_code == 429]
            assert len(ok) + len(busy) == 40, codes
            assert ok and busy, codes
            assert all(r.content.startswith(b"\x89PNG") for r in ok)
            assert all(int(r.headers["retry-after"]) >= 1 for r in busy)
            assert srv.proc.poll() is None
            rss.append(srv.rss())
            print(f"\nburst {_burst}: {len(ok)} × 200, {len(busy)} × 429 in {latencies[-1]:.2f} s; "
                  f"server RSS {rss[-1] / 1e6:.1f} MB")
        with httpx.Client(timeout=60) as c:
            assert c.get(srv.url + "/healthz").status_code == 200
            text = c.get(srv.url + "/metrics").text
        assert metric(text, "sdedge_queue_depth") == 0
        print(f"server RSS before {rss[0] / 1e6:.1f} MB, after burst 1 {rss[1] / 1e6:.1f} MB, "
              f"after burst 2 {rss[2] / 1e6:.1f} MB")
        assert rss[2] - rss[1] < 30e6, rss  # no growth burst over burst
        assert rss[2] < rss[0] + 150e6, rss


@pytest.mark.slow  # a subprocess server: 4-7 s
def test_sigterm_finishes_the_running_request(unsigned_bundle):
    with ProcessServer(unsigned_bundle, "--allow-unsigned") as srv:
        result = {}

        def slow():
            with httpx.Client(timeout=120) as c:
                result["r"] = c.post(srv.url + "/v1/generate", json={"prompt": "a", **SLOW, "steps": 60},
                                     headers={"x-job-id": "job-shutdown"})

        t = threading.Thread(target=slow)
        t.start()
        with httpx.Client(timeout=10) as c:
            deadline = time.monotonic() + 20
            while (r := c.get(srv.url + "/v1/jobs/job-shutdown")).status_code == 404 or r.json()["state"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.02)
        srv.proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert result["r"].status_code == 200, result["r"].text
        assert result["r"].content.startswith(b"\x89PNG")
        # uvicorn exits by re-raising the signal it caught once the server has drained
        assert srv.proc.wait(60) in (0, -signal.SIGTERM)


# -- signatures at start ------------------------------------------------------------------------------------------
def test_unsigned_bundle_is_refused_at_start(unsigned_bundle, tmp_path):
    from sdedge.runtime.errors import BundleError

    r = subprocess.run([sys.executable, "-m", "sdedge", "serve", str(unsigned_bundle), "--port",
                        str(free_port())], check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--public-key" in r.stderr and "--allow-unsigned" in r.stderr
    with pytest.raises(BundleError, match="unsigned"):
        create_app(unsigned_bundle, ServeSettings(public_key=str(tmp_path / "public.pem")))


def test_signed_bundle_serves_with_its_key_and_refuses_another(unsigned_bundle, tmp_path):
    pytest.importorskip("model_signing", reason="the sign extra is not installed")
    from sdedge.export.signing import keygen, sign
    from sdedge.runtime.errors import BundleError

    signed = tmp_path / "signed"
    shutil.copytree(unsigned_bundle, signed)
    keys, other = keygen(tmp_path / "k"), keygen(tmp_path / "other")
    sign(signed, key=keys.private)
    r = subprocess.run([sys.executable, "-m", "sdedge", "serve", str(unsigned_bundle), "--port",
                        str(free_port()), "--public-key", str(keys.public)],
                       check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "unsigned" in r.stderr, r.stderr
    with pytest.raises(BundleError):
        create_app(signed, ServeSettings(public_key=str(other.public)))
    app = create_app(signed, ServeSettings(public_key=str(keys.public)))
    with ThreadServer(app) as srv, srv.client() as c:
        ready = c.get("/readyz").json()
        assert ready == {**ready, "ready": True, "signature": "verified"}
        assert str(tmp_path) not in c.get("/readyz").text  # no paths, no key material
        assert c.post("/v1/generate", json={"prompt": "a", "steps": 1}).status_code == 200


# -- schemathesis -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_schemathesis_bounded_run(unsigned_bundle):
    """Property-based requests from the OpenAPI schema: no 5xx, responses match the schema, invalid data refused.
    positive_data_acceptance is left out: one rule (n > 1 needs JSON) spans two fields and is not in the schema."""
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if st is None:
        pytest.skip("schemathesis is not installed")
    with ProcessServer(unsigned_bundle, "--allow-unsigned", "--max-steps", "3", "--threads", "1") as srv:
        r = subprocess.run([st, "run", srv.url + "/openapi.json", "--checks", "all",
                            "--exclude-checks", "positive_data_acceptance", "--phases", "examples,coverage,fuzzing",
                            "--max-examples", "5", "--max-time", "15", "--workers", "1", "--seed", "1",
                            "--warnings", "off"],
                           check=False, capture_output=True, text=True, timeout=90, cwd=REPO)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        assert httpx.get(srv.url + "/healthz").status_code == 200


# -- the embedding example ----------------------------------------------------------------------------------------
def test_embedding_example_progress_and_cancel(unsigned_bundle, tmp_path):
    script = str(REPO / "examples" / "embed.py")
    r = subprocess.run([sys.executable, script, str(unsigned_bundle), "a red circle", "--steps", "3", "--out",
                        str(tmp_path / "e.png")], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "step 3/3" in r.stderr and (tmp_path / "e.png").is_file()
    assert "3 threads shared one Pipeline: 3 results" in r.stdout
    r = subprocess.run([sys.executable, script, str(unsigned_bundle), "a red circle", "--steps", "1000",
                        "--cancel-after", "0.01", "--out", str(tmp_path / "c.png")],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, r.stderr
    assert "cancelled after" in r.stderr and not (tmp_path / "c.png").exists()
