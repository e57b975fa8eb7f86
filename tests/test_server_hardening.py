"""`sdedge serve` against slow and hostile clients: a real server (the protocol and settings `serve` runs with) on
127.0.0.1, driven with raw sockets."""

from __future__ import annotations

import re
import select
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'sdedge[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'sdedge[serve]'")

import test_server
from conftest import REPO
from test_server import ThreadServer, free_port

from sdedge.runtime.errors import BadInput
from sdedge.runtime.server import KNOWN_METHODS, ServeSettings, check_bind, create_app, is_loopback, serve

unsigned_bundle, pipe = test_server.unsigned_bundle, test_server.pipe  # the tiny bundle's fixtures

GENERATE = b'{"prompt": "a red circle", "steps": 1, "seed": 1}'


class LiveServer(ThreadServer):
    """The app on 127.0.0.1 with the uvicorn configuration `serve` uses, in a thread; raw sockets to it."""

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)


def start(pipe, **kw) -> LiveServer:
    settings = ServeSettings(allow_unsigned=True, **{"header_timeout": 2.0, "body_timeout": 2.0, **kw})
    return LiveServer(create_app(pipe, settings))


def request(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{headers}"
    if body:
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response (status, headers, body); status 0 when the server closed without answering."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, {}, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes (EOF or reset) within `seconds`, reading whatever it sends first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            try:
                if not sock.recv(65536):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
    return False


def generate_ok(srv: LiveServer) -> int:
    with srv.connect() as s:
        s.sendall(request("POST", "/v1/generate", GENERATE))
        code, headers, body = read_response(s, 60)
    assert code != 200 or body.startswith(b"\x89PNG")
    return code


def trickle(sock: socket.socket, data: bytes, every: float, stop: float) -> int:
    """Send `data` one byte every `every` seconds for at most `stop` seconds; returns the bytes sent before the
    server closed the connection (or the time ran out)."""
    t_end = time.monotonic() + stop
    for i, byte in enumerate(data):
        if time.monotonic() > t_end:
            return i
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return i
        ready, _, _ = select.select([sock], [], [], every)
        if ready:
            return i + 1
    return len(data)


# -- slowloris ------------------------------------------------------------------------------------------------------
def test_a_client_trickling_its_headers_is_answered_408_and_closed_at_the_deadline(pipe):
    with start(pipe, header_timeout=2.0) as srv, srv.connect() as s:
        t0 = time.monotonic()
        sent = trickle(s, request("GET", "/healthz", headers="x-filler: " + "a" * 200 + "\r\n"), 0.25, 8)
        code, _, body = read_response(s, 5)
        held = time.monotonic() - t0
        assert code == 408 and b"headers" in body, (code, body)
        assert closed_within(s, 2)
        assert 1.8 < held < 3.5, held  # the slot is freed at the deadline, not when the client finishes
        assert sent < 20  # it was still sending its first header line
        assert generate_ok(srv) == 200


def test_the_header_deadline_applies_to_the_next_request_on_a_keep_alive_connection(pipe):
    with start(pipe, header_timeout=2.0, keep_alive=30.0) as srv, srv.connect() as s:
        s.sendall(request("GET", "/healthz"))
        assert read_response(s)[0] == 200
        t0 = time.monotonic()
        trickle(s, request("GET", "/healthz"), 0.25, 8)
        assert read_response(s, 5)[0] == 408
        assert time.monotonic() - t0 < 3.5


def test_a_silent_connection_is_closed_at_the_header_deadline(pipe):
    with start(pipe, header_timeout=1.0) as srv, srv.connect() as s:
        assert closed_within(s, 3)


def test_a_client_trickling_its_body_is_answered_408(pipe):
    with start(pipe, body_timeout=2.0) as srv, srv.connect() as s:
        head = request("POST", "/v1/generate", GENERATE)
        s.sendall(head[: -len(GENERATE)])
        t0 = time.monotonic()
        trickle(s, GENERATE, 0.3, 8)
        code, headers, body = read_response(s, 5)
        assert code == 408 and b"2 s" in body, (code, body)
        assert headers.get("connection") == "close"
        assert 1.8 < time.monotonic() - t0 < 3.5
        assert generate_ok(srv) == 200


def test_a_hundred_idle_sockets_do_not_lock_out_a_client(pipe):
    """100 sockets (silent, or with half a request line) held open: a well-behaved client still gets 200, with the
    default connection cap and with a cap below 100 (then the longest-idle sockets are closed to make room)."""
    for cap in (1000, 60):
        with start(pipe, header_timeout=30.0, max_connections=cap, max_queue=2) as srv:
            idle = [srv.connect() for _ in range(100)]
            for i, s in enumerate(idle):
                if i % 2:
                    s.sendall(b"POST /v1/gen")
            time.sleep(0.3)
            assert generate_ok(srv) == 200
            assert generate_ok(srv) == 200
            open_now = sum(not closed_within(s, 0.01) for s in idle)
            assert open_now == (100 if cap == 1000 else pytest.approx(cap - 1, abs=2)), (cap, open_now)
            for s in idle:
                s.close()


def test_requests_in_flight_past_the_limit_get_503_and_health_still_answers(pipe):
    with start(pipe, limit_concurrency=2, body_timeout=20.0) as srv:
        held = [srv.connect() for _ in range(2)]
        for s in held:  # in the app, their bodies unfinished
            s.sendall(request("POST", "/v1/generate", GENERATE)[:-5])
        time.sleep(0.3)
        with srv.connect() as s:
            s.sendall(request("POST", "/v1/generate", GENERATE))
            code, headers, _ = read_response(s)
            assert code == 503 and headers["retry-after"] == "1"
        with srv.connect() as s:
            s.sendall(request("GET", "/healthz"))
            assert read_response(s)[0] == 200
        for s in held:
            s.sendall(GENERATE[-5:])
            assert read_response(s, 60)[0] == 200
            s.close()
        assert generate_ok(srv) == 200


# -- bodies over the limit ------------------------------------------------------------------------------------------
def send_chunked_until_answered(sock: socket.socket, total: int, chunk: int = 4096) -> tuple[int, int]:
    """Send a chunked body of `total` bytes, stopping as soon as the server answers; (status, bytes sent)."""
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")
    sent = 0
    while sent < total:
        sock.sendall(b"%x\r\n" % chunk + b"x" * chunk + b"\r\n")
        sent += chunk
        if select.select([sock], [], [], 0.02)[0]:
            break
    else:
        sock.sendall(b"0\r\n\r\n")
    return read_response(sock)[0], sent


def test_a_chunked_body_over_the_limit_gets_413_like_a_sized_one(pipe):
    with start(pipe, max_body_bytes=20_000) as srv:
        with srv.connect() as s:  # declared size
            s.sendall(request("POST", "/v1/generate", b"x" * 20_001))
            code, headers, body = read_response(s)
            assert code == 413 and b"20000 bytes" in body and headers["connection"] == "close"
        with srv.connect() as s:  # no size: chunked
            code, sent = send_chunked_until_answered(s, 200_000)
            assert code == 413
            assert sent <= 28_000  # answered once the limit was passed, not after the whole body
        with srv.connect() as s:  # a chunked body under the limit is read whole and served
            s.sendall(b"POST /v1/generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"transfer-encoding: chunked\r\n\r\n")
            for part in (GENERATE[:10], GENERATE[10:]):
                s.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
            s.sendall(b"0\r\n\r\n")
            code, _, body = read_response(s, 60)
            assert code == 200 and body.startswith(b"\x89PNG")


# -- metrics labels -------------------------------------------------------------------------------------------------
def test_metric_labels_stay_bounded_whatever_the_method_or_path(pipe):
    with start(pipe) as srv:
        for i in range(30):
            with srv.connect() as s:
                s.sendall(request(f"BREW{i}", f"/pot/{i}?x={i}"))
                read_response(s)
        for path in ("/v1/jobs/abcdefgh12", "/v1/jobs/zzzzzzzz34", "/nope"):
            with srv.connect() as s:
                s.sendall(request("GET", path))
                read_response(s)
        with srv.connect() as s:
            s.sendall(request("GET", "/metrics"))
            _, _, text = read_response(s)
    series = re.findall(r'sdedge_http_requests_total\{method="([^"]*)",route="([^"]*)",status="(\d+)"\}',
                        text.decode())
    methods, routes = {m for m, _, _ in series}, {r for _, r, _ in series}
    assert "other" in methods and methods <= {*KNOWN_METHODS, "other"}, methods
    assert routes <= {"other", "/v1/jobs/{job_id}", "/healthz", "/metrics"}, routes
    assert b"BREW" not in text and b"pot" not in text and b"abcdefgh12" not in text
    assert len(series) <= 6, series


# -- refused configurations -----------------------------------------------------------------------------------------
def test_max_queue_zero_is_refused_with_a_message(unsigned_bundle, pipe):
    r = subprocess.run([sys.executable, "-m", "sdedge", "serve", str(unsigned_bundle), "--allow-unsigned",
                        "--max-queue", "0"], check=False, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and "--max-queue" in r.stderr and "at least 1" in r.stderr, r.stderr
    with pytest.raises(BadInput, match="--max-queue 0: must be at least 1"):
        create_app(pipe, ServeSettings(allow_unsigned=True, max_queue=0))


def test_a_non_loopback_address_needs_a_token_or_insecure_no_auth(unsigned_bundle, pipe):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "sdedge", "serve", str(unsigned_bundle), "--allow-unsigned",
                        "--host", "0.0.0.0", "--port", str(free_port())],
                       check=False, capture_output=True, text=True, cwd=REPO, timeout=60,
                       env={k: v for k, v in __import__("os").environ.items() if k != "SDEDGE_TOKEN"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "0.0.0.0" in r.stderr and "--insecure-no-auth" in r.stderr and "SDEDGE_TOKEN" in r.stderr
    assert time.monotonic() - t0 < 30
    app = create_app(pipe, ServeSettings(allow_unsigned=True))
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(BadInput, match="non-loopback"):
            serve(app, host, free_port())  # refused before anything listens
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost", "[::1]"):
        assert is_loopback(host)
        check_bind(host, ServeSettings())
    check_bind("0.0.0.0", ServeSettings(token="t" * 16))
    check_bind("0.0.0.0", ServeSettings(insecure_no_auth=True))


def test_unfinished_headers_are_not_buffered_past_16_kib(pipe):
    with start(pipe, header_timeout=30.0) as srv, srv.connect() as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000)  # no end of headers yet
        code, _, _ = read_response(s, 5)
        assert code == 400
        assert closed_within(s, 2)
