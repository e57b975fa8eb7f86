"""The server against slow and hostile clients (docs/security.md, "The HTTP server"), in front of the app:

- `Guard`, ASGI middleware: requests in flight capped, every body read whole within its byte limit and
  `body_timeout`, responses counted for /metrics with bounded labels;
- `guarded_h11_protocol`, uvicorn's h11 protocol with a deadline on request headers, idle sockets closed first
  past `max_connections`.

`settings` is the app's runtime/server.py ServeSettings (`inflight_limit`, `max_body_bytes`, `body_timeout`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from .server_metrics import Metrics

log = logging.getLogger("sdedge.server")

ROUTES = ("/v1/generate", "/v1/img2img", "/v1/inpaint", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/info",
          "/healthz", "/readyz", "/metrics", "/openapi.json", "/", "/static/app.js", "/static/app.css")
KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")
MAX_HEADER_BYTES = 16 * 1024  # request line + headers; h11 answers 400 past it
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 31\r\n"
                    b"connection: close\r\n\r\nrequest headers took too long\r\n")


class Guard:
    """ASGI middleware in front of every route.

    - Counts responses by method, route and status for /metrics, with bounded labels (an unknown method is
      "other", an unknown path "other", job ids collapsed to the route template).
    - Admits at most `settings.inflight_limit` requests into the app at once (503 + Retry-After past it); idle
      connections do not count (the protocol below deals with those).
    - Reads the whole body before the app runs: over the route's limit (declared or chunked) 413, not complete
      `settings.body_timeout` seconds after the headers 408; both close the connection.
    """

    def __init__(self, app, metrics: Metrics, settings, body_limits: dict[str, int] | None = None):
        self.app, self.metrics, self.settings = app, metrics, settings
        self.body_limits = body_limits or {}  # route -> bytes, for routes that take more than max_body_bytes
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")  # root_path: mounted under a prefix
        route = _route_label(path[len(root):] if root and path.startswith(root) else path)
        method = _method_label(scope.get("method", ""))
        status = {"code": 500, "started": False}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            if self.inflight >= self.settings.inflight_limit and route not in ("/healthz", "/readyz"):
                await _send_json(send_counted, 503, b'{"detail":"too many requests in flight"}',
                                 [(b"retry-after", b"1")])
                return
            self.inflight += 1
            try:
                limit = self.body_limits.get(route, self.settings.max_body_bytes)
                replay = await _read_body(scope, receive, send_counted, limit, self.settings.body_timeout)
                if replay is not None:
                    await self.app(scope, replay, send_counted)
            finally:
                self.inflight -= 1
        finally:
            self.metrics.request(method, route, status["code"])


async def _read_body(scope, receive, send, limit: int, timeout: float):
    """The request body read whole, within `limit` bytes and `timeout` seconds; returns a `receive` that replays
    it to the app, or None once it has answered 413/408 (or the client went away)."""
    headers = dict(scope.get("headers") or ())
    length = headers.get(b"content-length")
    if length is None and b"transfer-encoding" not in headers:
        return receive  # no body
    too_large = f'{{"detail":"request body too large (limit {limit} bytes)"}}'.encode()
    if length is not None and (not length.isdigit() or int(length) > limit):
        await _send_json(send, 413, too_large, [(b"connection", b"close")])
        return None
    chunks, size = [], 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            await _send_json(send, 408, f'{{"detail":"request body not received within {timeout:g} s"}}'.encode(),
                             [(b"connection", b"close")])
            return None
        if message["type"] != "http.request":  # http.disconnect
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            await _send_json(send, 413, too_large, [(b"connection", b"close")])
            return None
        if not message.get("more_body", False):
            break
    body, given = b"".join(chunks), False

    async def replay():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: only http.disconnect

    return replay


async def _send_json(send, code: int, body: bytes, extra_headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _route_label(path: str) -> str:
    """A bounded set of label values: known routes, jobs collapsed to their template, the rest 'other'."""
    if path.startswith("/v1/jobs/"):
        return "/v1/jobs/{job_id}/events" if path.endswith("/events") else "/v1/jobs/{job_id}"
    return path if path in ROUTES else "other"


def _method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


def guarded_h11_protocol(header_timeout: float, max_connections: int):
    """uvicorn's h11 protocol, hardened against slow and idle clients:

    - a request's headers must be complete `header_timeout` seconds after the connection opened (or after the
      previous response): a client trickling one byte a second is answered 408 and closed at the deadline;
    - past `max_connections` open sockets the one idle longest (no request in progress) is closed to make room,
      so idle sockets never lock out a client that sends its request (a busy connection is never closed).
    uvicorn's own `limit_concurrency` is not used: it counts idle sockets, and answers 503 to everyone once
    enough of them are open."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            self._header_timer, self._partial, self._idle_since = None, False, time.monotonic()
            super().connection_made(transport)
            self._arm()
            if len(self.connections) > max_connections:
                _evict_idle(self.connections, self)

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._waiting_for_headers():
                self._partial = True
            super().data_received(data)
            if not self._waiting_for_headers():
                self._disarm()

        def on_response_complete(self) -> None:
            self._idle_since, self._partial = time.monotonic(), False
            super().on_response_complete()  # may parse a pipelined request
            if not self.transport.is_closing() and self._waiting_for_headers():
                self._arm()

        def idle(self) -> bool:
            busy = self.cycle is not None and not self.cycle.response_complete
            return not busy and self._waiting_for_headers()

        def _waiting_for_headers(self) -> bool:
            return self.conn.their_state is h11.IDLE

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self._waiting_for_headers():
                return
            if self._partial:
                self.transport.write(_REQUEST_TIMEOUT)
            self.transport.close()

    return GuardedH11Protocol


def _evict_idle(connections, newcomer) -> None:
    idle = [c for c in connections if c is not newcomer and getattr(c, "idle", lambda: False)()]
    victim = min(idle, key=lambda c: c._idle_since) if idle else newcomer
    log.warning("%d connections open: closing the one idle longest", len(connections))
    victim.transport.close()
