"""`sdedge serve --ray`: a real local Ray cluster on 127.0.0.1 (started here, shut down however the tests end),
Ray Serve's real HTTP proxy, two model replicas on the signed tiny bundle. No mocks."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

if importlib.util.find_spec("ray") is None:  # not imported here: start_ray sets Ray's environment first
    pytest.skip("the ray extra is not installed: pip install 'sdedge[ray]'", allow_module_level=True)
pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("model_signing", reason="the sign extra is not installed (the replicas verify a signature)")
httpx = pytest.importorskip("httpx")

from conftest import REPO

from sdedge.runtime.manifest import SIGNATURE_NAME

TOKEN = "ray-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = {"steps": 2, "width": 64, "height": 64}
SLOW = {"steps": 150, "width": 128, "height": 128}  # seconds on the tiny bundle: long enough to kill a replica
CLIENT_TIMEOUT = 90  # no request may hang: every client call is bounded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from sdedge.export.signing import keygen

    return keygen(tmp_path_factory.mktemp("ray-keys") / "k")


@pytest.fixture(scope="module")
def signed_bundle(tiny_bundle, keys, tmp_path_factory) -> Path:
    from sdedge.export.signing import sign

    out = tmp_path_factory.mktemp("ray") / "signed"
    shutil.copytree(tiny_bundle, out)
    (out / SIGNATURE_NAME).unlink(missing_ok=True)
    sign(out, key=keys.private)
    return out


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster (2 CPUs, no dashboard, loopback only) and Serve's proxy; torn down however it ends."""
    from sdedge.runtime.ray_serve import start_ray, start_serve

    saved = dict(os.environ)
    port, metrics_port = free_port(), free_port()
    try:
        start_ray(num_cpus=2, metrics_export_port=metrics_port)
        start_serve("127.0.0.1", port)
        yield {"url": f"http://127.0.0.1:{port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved)


def deploy(bundle, name: str, keys, **options):
    from sdedge.runtime import ray_serve
    from sdedge.runtime.server import ServeSettings

    settings = ServeSettings(public_key=str(keys.public), token=TOKEN, max_queue=6, timeout=60, threads=1)
    opts = ray_serve.RayOptions(replicas=2, num_cpus=0.5, name=name, **options)
    ray_serve.deploy(ray_serve.ray_app(bundle, settings, opts), name, route_prefix=f"/{name}")


@pytest.fixture(scope="module")
def app(cluster, signed_bundle, keys):
    deploy(signed_bundle, "two", keys)
    return cluster["url"] + "/two"


def model_replicas(app_name: str) -> dict[str, str]:
    """Live replica id -> actor name of the app's model deployment (from Ray's GCS, no dashboard)."""
    import ray

    out = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if name.startswith(f"SERVE_REPLICA::{app_name}#{app_name}-model#"):
            out[name.rsplit("#", 1)[1]] = name
    return out


@pytest.mark.slow
def test_cli_serve_ray_answers_then_stops_its_cluster_on_sigterm(signed_bundle, keys):
    """`sdedge serve --ray` end to end in a subprocess (its own local cluster), before the module's cluster."""
    import signal

    port = free_port()
    env = {**os.environ, "SDEDGE_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "sdedge", "serve", str(signed_bundle), "--ray", "--port", str(port),
                             "--public-key", str(keys.public), "--replicas", "1", "--replica-cpus", "0.5",
                             "--ray-cpus", "1", "--threads", "1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "not ready in 120 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "cli", **FAST}, headers=AUTH,
                       timeout=CLIENT_TIMEOUT)
        assert r.status_code == 200 and r.headers["X-Sdedge-Replica"]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
        assert "serving" in out and "Ray Serve" in out
        assert "Generated new authentication token" not in out  # its own token, in the environment only
        assert not (Path.home() / ".ray" / "auth_token").exists()
    finally:
        if proc.poll() is None:  # SIGTERM first: the server shuts its cluster down itself
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_twenty_concurrent_requests_spread_over_two_replicas(app, cluster):
    with httpx.Client(base_url=app, timeout=CLIENT_TIMEOUT, headers=AUTH) as c:
        assert c.get("/readyz").json()["signature"] == "verified"
        assert httpx.post(app + "/v1/generate", json={"prompt": "a", **FAST}, timeout=30).status_code == 401

        def post(i: int):
            return c.post("/v1/generate", json={"prompt": f"shape {i}", "seed": i, **FAST})

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(post, range(20)))
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 429}, codes
        done = [r for r in answers if r.status_code == 200]
        assert len(done) >= 8, codes  # 2 running + 6 queued at least
        assert all(r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG") for r in done)
        assert len({r.headers["X-Sdedge-Replica"] for r in done}) == 2  # both replicas worked
        assert all(int(r.headers["Retry-After"]) >= 1 for r in answers if r.status_code == 429)

        # the ingress aggregates every replica in sdedge's own names
        text = c.get("/metrics").text
        assert f'sdedge_jobs_total{{state="done"}} {len(done)}' in text
        assert f'sdedge_http_requests_total{{method="POST",route="/v1/generate",status="200"}} {len(done)}' in text
        # 422 for a bad body, as from `sdedge serve` (the same request model)
        assert c.post("/v1/generate", json={"prompt": "a", "steps": "5"}).status_code == 422

    # and each replica exports them through Ray's metrics port, tagged with its replica
    deadline, per_replica = time.monotonic() + 60, {}
    while time.monotonic() < deadline and len(per_replica) < 2:
        for line in httpx.get(cluster["metrics"], timeout=10).text.splitlines():
            if line.startswith("ray_sdedge_jobs_total{") and 'state="done"' in line and 'application="two"' in line:
                replica = line.split('replica="', 1)[1].split('"', 1)[0]
                per_replica[replica] = float(line.rsplit(" ", 1)[1])
        time.sleep(2)
    assert len(per_replica) == 2 and sum(per_replica.values()) >= len(done), per_replica


@pytest.mark.slow
def test_a_burst_is_admitted_to_exactly_the_replicas_plus_the_queue(app):
    """12 requests at once, each long enough that none ends during the burst: the 2 replicas' running jobs plus
    max_queue 6 waiting are admitted, exactly, and the other 4 answer 429. Ray Serve's own max_queued_requests,
    which the ingress relied on before, is approximate both ways: in CI it admitted 6 of a 20-request burst, and
    on this test more than 8 of these 12 (the test failed at index 8), so the ingress counts instead."""
    burst = {"steps": 60, "width": 128, "height": 128}
    with httpx.Client(base_url=app, timeout=CLIENT_TIMEOUT, headers=AUTH) as c:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: c.post("/v1/generate", json={"prompt": f"burst {i}", "seed": i,
                                                                           **burst}), range(12)))
    codes = [r.status_code for r in answers]
    assert sorted(codes) == [200] * 8 + [429] * 4, codes
    assert all("6 waiting, 2 running" in r.json()["detail"] for r in answers if r.status_code == 429)


@pytest.mark.slow
def test_timeout_answers_503_and_cancels_the_job_in_its_replica(app):
    with httpx.Client(base_url=app, timeout=CLIENT_TIMEOUT, headers=AUTH) as c:
        r = c.post("/v1/generate", json={"prompt": "slow", **SLOW, "timeout": 2.0},
                   headers={"X-Job-Id": "ray-timeout-1"})
        assert r.status_code == 503 and "cancelled" in r.json()["detail"]
        deadline = time.monotonic() + 30
        while (job := c.get("/v1/jobs/ray-timeout-1").json())["state"] not in ("cancelled", "failed", "done"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert job["state"] == "cancelled" and job["steps_done"] < SLOW["steps"]
        assert c.post("/v1/generate", json={"prompt": "next", **FAST}).status_code == 200


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_its_requests_never_hang(app):
    import ray

    before = model_replicas("two")
    assert len(before) == 2
    answers: list = []

    def post(i: int):
        try:
            with httpx.Client(base_url=app, timeout=CLIENT_TIMEOUT, headers=AUTH) as c:
                answers.append(c.post("/v1/generate", json={"prompt": f"k{i}", **SLOW, "steps": 60}))
        except httpx.TimeoutException as exc:  # a hang: the test fails below
            answers.append(exc)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)  # both replicas are generating now
    victim = sorted(before)[0]
    ray.kill(ray.get_actor(before[victim], namespace="serve"), no_restart=True)
    for t in threads:
        t.join(CLIENT_TIMEOUT + 10)
    assert len(answers) == 4 and not any(isinstance(a, Exception) for a in answers), answers
    for r in answers:  # finished on a retry, or a clear 5xx
        assert r.status_code == 200 or (r.status_code == 503 and "replica" in r.json()["detail"]), r.text
    assert any(r.status_code == 200 for r in answers)

    deadline = time.monotonic() + 90
    while True:  # Serve starts a new replica in place of the dead one
        now = model_replicas("two")
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, now
        time.sleep(1)
    with httpx.Client(base_url=app, timeout=CLIENT_TIMEOUT, headers=AUTH) as c:
        seen = {c.post("/v1/generate", json={"prompt": "after", **FAST}).headers["X-Sdedge-Replica"]
                for _ in range(6)}
    assert seen <= set(now)


@pytest.mark.slow
def test_a_tampered_bundle_is_refused_by_every_replica(cluster, signed_bundle, keys, tmp_path):
    from ray import serve

    bad = tmp_path / "tampered"
    shutil.copytree(signed_bundle, bad)
    with open(bad / "unet" / "model.onnx", "ab") as f:
        f.write(b"\0")
    from sdedge.runtime.errors import BundleError

    with pytest.raises(BundleError) as info:
        deploy(bad, "bad", keys)
    try:
        print(info.value)
        assert "bad-model" in str(info.value) and "unet/model.onnx" in str(info.value), str(info.value)
        # Serve keeps retrying a failed replica's start, so a replica actor may exist for a moment; none ever runs
        app = serve.status().applications["bad"]
        assert str(app.status).endswith("DEPLOY_FAILED"), app.status
        states = {str(k).rsplit(".", 1)[-1]: v for k, v in app.deployments["bad-model"].replica_states.items()}
        assert not states.get("RUNNING"), states
    finally:
        serve.delete("bad")


@pytest.mark.slow
def test_ray_binds_loopback_only(app):
    """Every socket the cluster listens on is on 127.0.0.1, except the inter-deployment gRPC port Ray Serve 2.60
    opens in each replica on [::] (hard-coded in ray/serve/_private/replica.py; docs/serving.md says so)."""
    import ipaddress

    import psutil

    ray_pids = {p.pid: p.name() for p in psutil.process_iter(["name"]) if _is_ray(p)}
    wide = []
    for conn in psutil.net_connections("inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in ray_pids:
            ip = ipaddress.ip_address(conn.laddr.ip)
            loopback = ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)
            if not loopback and not ray_pids[conn.pid].startswith("ray::ServeRepli"):
                wide.append((ray_pids[conn.pid], conn.laddr))
    assert len(ray_pids) > 3 and not wide, wide


def _is_ray(p) -> bool:
    try:
        name, cmd = p.name(), " ".join(p.cmdline()[:3])
    except Exception:  # noqa: BLE001 - gone meanwhile
        return False
    return name.startswith("ray::") or name in ("raylet", "gcs_server") or "site-packages/ray/" in cmd


def test_without_ray_the_cli_says_how_to_install(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from sdedge.cli import main; "  # as if not installed
            f"sys.exit(main(['serve', {str(tmp_path)!r}, '--ray', '--allow-unsigned']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "pip install 'sdedge[ray]'" in r.stderr, (r.returncode, r.stderr)


def test_scaling_options_map_to_ray_serve_and_bad_ones_are_named():
    from sdedge.runtime.errors import BadInput
    from sdedge.runtime.ray_serve import RayOptions

    assert RayOptions(replicas=3).scaling() == {"num_replicas": 3}
    assert RayOptions(min_replicas=0, max_replicas=4, target_ongoing_requests=2).scaling() == {
        "autoscaling_config": {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 2}}
    for bad, flag in ((RayOptions(replicas=0), "--replicas"), (RayOptions(min_replicas=2), "--max-replicas"),
                      (RayOptions(min_replicas=5, max_replicas=2), "--min-replicas"),
                      (RayOptions(num_gpus=-1), "--replica-gpus")):
        with pytest.raises(BadInput, match=flag):
            bad.check()
