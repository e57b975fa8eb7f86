"""The HTTP server behind `sdedge serve`: a FastAPI app around one loaded, verified `Pipeline`.

    GET  /                   the page (runtime/web/: plain HTML + a script, nothing loaded from elsewhere)
    POST /v1/generate        prompt ... ─► image/png (n = 1) or JSON with base64 PNGs
    POST /v1/img2img         the same + image (base64), strength;  POST /v1/inpaint: + mask (white = repaint)
    GET  /v1/jobs/{id}       a job's state (never its prompt);  DELETE /v1/jobs/{id}: cancel that job
    GET  /v1/jobs/{id}/events  server-sent events: the job's steps as they run, then `event: end`
    GET  /v1/info            what the page needs: token required?, this bundle's limits, defaults, abilities
    GET  /healthz            the process answers
    GET  /readyz             the model is loaded and its signature verified (or --allow-unsigned)
    GET  /metrics            Prometheus text: requests by status, latency histogram, queue depth, stage times
    GET  /openapi.json       the schema (request limits are this bundle's: sizes, multiples, n)

One generation at a time per model (runtime/jobs.py: one worker thread, a bounded wait queue → 429 with
Retry-After). A request waits at most `timeout` seconds (from arrival, queue included); past it the client
gets 503 and that job, by its id, is cancelled between denoising steps. A client that disconnects cancels
its job the same way. Prompts are never logged unless `log_prompts` is set.

Where it lives: this file has the settings, `create_app` (the app put together) and `serve`; the routes and their
shared state are runtime/server_routes.py, the bundle's request models runtime/server_models.py, /metrics
runtime/server_metrics.py. Slow and hostile clients (docs/security.md, "The HTTP server"): `serve` runs uvicorn with
runtime/server_guard.py's `guarded_h11_protocol` (a deadline on request headers; idle sockets closed first past
`max_connections`), and its `Guard` reads every body whole within its byte limit and `body_timeout`, caps the
requests in flight, and keeps metric labels bounded. Uploads are checked in runtime/uploads.py before a pixel is
decoded.

fastapi, pydantic and uvicorn come from the `serve` extra and are imported when `create_app` runs, so
`sdedge.runtime` imports without them.
"""

import asyncio
import ipaddress
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadInput, MissingDependency
from .jobs import Job, JobQueue
from .server_guard import KNOWN_METHODS, MAX_HEADER_BYTES, Guard, guarded_h11_protocol  # noqa: F401 (KNOWN_METHODS re-exported)
from .server_metrics import Metrics
from .server_models import request_models
from .server_routes import (
    AppState,
    add_generate_routes,
    add_info_route,
    add_job_routes,
    add_ops_routes,
    add_page_routes,
    auth_dependencies,
)
from .uploads import UploadLimits

log = logging.getLogger("sdedge.server")

INSTALL_HINT = "pip install 'sdedge[serve]' (fastapi and uvicorn)"


@dataclass
class ServeSettings:
    """What `sdedge serve` passes to `create_app`. `token`: the bearer token itself (None: no auth)."""

    max_queue: int = 8  # jobs waiting behind the running one
    timeout: float = 60.0  # seconds per request, queue wait included
    max_steps: int = 150
    max_prompt_chars: int = 2000
    max_images: int | None = None  # None: what the bundle's batch range allows with guidance
    token: str | None = None
    allow_unsigned: bool = False
    public_key: str | None = None
    identity: str | None = None
    issuer: str | None = None
    device: str = "auto"
    backend: str = "auto"
    memory: str = "normal"
    threads: int | None = None
    log_prompts: bool = False
    max_body_bytes: int = 1_000_000
    # slow and hostile clients (docs/security.md, "The HTTP server")
    header_timeout: float = 10.0  # seconds from connect (or the last response) to a request's complete headers
    body_timeout: float = 60.0  # seconds from the headers to the end of the body
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 1000  # open sockets; past it the longest-idle one is closed (never a busy one)
    limit_concurrency: int | None = None  # requests in the app at once before 503 (None: max_queue + 64)
    insecure_no_auth: bool = False  # listen on a non-loopback address without a token
    # uploads of /v1/img2img and /v1/inpaint (runtime/uploads.py)
    max_upload_bytes: int = 4_000_000  # per image file
    max_upload_pixels: int = 16_777_216  # width × height, read from the header before decoding
    # provenance (runtime/provenance.py, docs/provenance.md)
    watermark: bool = True  # sdedge's invisible watermark on every image
    c2pa: Any = None  # a runtime.provenance.C2paConfig: every PNG carries a signed C2PA manifest

    def check(self) -> None:
        """Refuse settings that cannot work, naming the option."""
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise BadInput(f"--max-queue {self.max_queue!r}: must be at least 1 (with 0 every request would be "
                           "refused with 429 while one runs)")
        for name in ("timeout", "header_timeout", "body_timeout", "keep_alive"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise BadInput(f"{name}={value!r}: must be a number of seconds > 0")
        for name in ("max_connections", "max_body_bytes", "max_upload_bytes", "max_upload_pixels"):
            if getattr(self, name) < 1:
                raise BadInput(f"{name}={getattr(self, name)!r}: must be at least 1")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise BadInput(f"--limit-concurrency {self.limit_concurrency}: must be at least 1")

    @property
    def inflight_limit(self) -> int:
        return self.max_queue + 64 if self.limit_concurrency is None else self.limit_concurrency


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or 0.0.0.0 / :: (every interface)


def check_bind(host: str, settings: ServeSettings) -> None:
    """Refuse to listen on a non-loopback address without a token, unless insecure_no_auth says so."""
    if settings.token is None and not settings.insecure_no_auth and not is_loopback(host):
        raise BadInput(f"--host {host}: refusing to listen on a non-loopback address without a token; set one in "
                       "$SDEDGE_TOKEN (see --token-env), or pass --insecure-no-auth to serve it unauthenticated")


def _require_fastapi():
    try:
        import fastapi  # noqa: F401
        import pydantic  # noqa: F401
    except ImportError as exc:
        raise MissingDependency(f"the server needs {exc.name or exc}: {INSTALL_HINT}") from None


def load_pipeline(path: str | os.PathLike, settings: ServeSettings):
    """Load a bundle for serving: the signature is required unless `allow_unsigned`; a key or identity given
    still makes it required (an unsigned bundle is then refused: runtime/signing.check_signature)."""
    from .pipeline import Pipeline

    verify, trust = verify_policy(settings)
    return Pipeline.load(path, device=settings.device, memory=settings.memory, threads=settings.threads,
                         backend=settings.backend, verify=verify, **trust)


def verify_policy(settings: ServeSettings) -> tuple[str, dict[str, Any]]:
    """The `verify` mode and trust arguments (for `open_bundle` / `Pipeline.load`) a server uses."""
    trust = {"public_key": settings.public_key, "identity": settings.identity, "issuer": settings.issuer}
    verify = "if-signed" if settings.allow_unsigned else "required"
    if settings.allow_unsigned and not any(trust.values()):
        verify = "off"  # nothing to verify with: only the manifest's SHA-256 of every file is checked
    return verify, trust


# -- the app ------------------------------------------------------------------------------------------------------
def create_app(pipeline_or_path, settings: ServeSettings | None = None, *, queue_factory=None):
    """A FastAPI app serving `pipeline_or_path`: a loaded `Pipeline`, or a bundle folder loaded (and verified)
    here, before the app exists, so that a bad or unsigned bundle fails at start rather than at first request.
    queue_factory(max_waiting=, on_finish=): a job queue that runs the jobs elsewhere, in place of the local
    JobQueue (runtime/ray_serve.py: Ray Serve replicas); `pipeline_or_path` then only describes the model
    (its `manifest`, `signer`, `backend`)."""
    _require_fastapi()
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

    settings = settings or ServeSettings()
    settings.check()
    owned = isinstance(pipeline_or_path, (str, os.PathLike))  # we loaded it, so we close it at shutdown
    pipeline = _the_pipeline(pipeline_or_path, settings, owned, queue_factory)
    state = _app_state(pipeline, settings, queue_factory)
    # No /docs or /redoc: FastAPI's Swagger UI and ReDoc load from a CDN (nothing here may need the internet).
    app = FastAPI(title="sdedge", version=_version(), lifespan=_lifespan(state, owned), docs_url=None, redoc_url=None,
                  description="Text to image with a signed sdedge bundle. Limits in the request schema are "
                              "this bundle's exported range.")
    app.state.pipeline, app.state.queue, app.state.metrics, app.state.settings = (pipeline, state.queue, state.metrics,
                                                                                  settings)
    app.add_exception_handler(RequestValidationError, _invalid)
    auth, auth_responses = auth_dependencies(state)
    add_ops_routes(app, state, auth, auth_responses)
    add_job_routes(app, state, auth, auth_responses)
    add_info_route(app, state)
    add_page_routes(app)
    add_generate_routes(app, state, auth, auth_responses)
    upload_body = 2 * UploadLimits(settings.max_upload_bytes).base64_chars() + settings.max_body_bytes
    app.add_middleware(Guard, metrics=state.metrics, settings=settings,
                       body_limits={"/v1/img2img": upload_body, "/v1/inpaint": upload_body})
    return app


def _the_pipeline(pipeline_or_path, settings: ServeSettings, owned: bool, queue_factory):
    from .pipeline import Pipeline

    if owned:
        return load_pipeline(Path(pipeline_or_path), settings)
    if isinstance(pipeline_or_path, Pipeline) or queue_factory is not None:
        return pipeline_or_path
    raise TypeError(f"create_app needs a Pipeline or a bundle path, not {type(pipeline_or_path).__name__}")


def _app_state(pipeline, settings: ServeSettings, queue_factory) -> AppState:
    """The routes' shared state: this bundle's limits and models, the metrics, the job queue (local or remote)."""
    from .schedulers import scheduler_names

    m = pipeline.manifest
    bundle_max_images = max(1, m.shapes.batch_max // 2)  # with guidance > 1 the negative prompts share the batch
    max_images = min(settings.max_images or bundle_max_images, bundle_max_images)
    default_steps = min(m.defaults.steps, settings.max_steps)
    schedulers = tuple(scheduler_names())
    metrics = Metrics()
    stamper = None
    if settings.c2pa is not None:  # key and certificate checked now: a bad one fails at start
        from .provenance import Stamper, bundle_identity

        stamper = Stamper.load(settings.c2pa, bundle_identity(pipeline))
    models = request_models(settings, m, schedulers, max_images, default_steps)

    def run(job: Job):
        def on_step(i: int, total: int) -> None:
            job.steps_done, job.steps_total = i, total

        job.steps_total = job.params["steps"]
        return run_job(pipeline, job.params, on_step=on_step, cancel=job.cancel_event, watermark=settings.watermark)

    def finished(job: Job) -> None:
        metrics.job_finished(job)
        if isinstance(job.params, dict):  # a finished job stays in the history: without its uploads
            job.params.pop("image", None)
            job.params.pop("mask", None)

    if queue_factory is None:
        queue = JobQueue(run, max_waiting=settings.max_queue, on_finish=finished)
    else:
        queue = queue_factory(max_waiting=settings.max_queue, on_finish=finished)
    return AppState(pipeline, settings, queue, metrics, models, schedulers=schedulers, max_images=max_images,
                    default_steps=default_steps, stamper=stamper)


def _lifespan(state: AppState, owned: bool):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped accepting and waited for open requests; let the running job finish.
        log.info("shutting down: finishing the running job")
        await asyncio.to_thread(state.queue.close, True, True, state.settings.timeout + 5)
        if owned:
            state.pipeline.close()

    return lifespan


async def _invalid(request, exc):
    """422 without the inputs echoed back (a 100,000-character prompt would come back whole, and prompts stay
    private)."""
    from fastapi.responses import JSONResponse

    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()][:20]
    return JSONResponse({"detail": detail}, status_code=422)


def run_job(pipeline, params: dict[str, Any], *, on_step=None, cancel: threading.Event | None = None,
            watermark: bool = True):
    """Run one request (its validated body's `model_dump()`) on `pipeline`: the job queue's worker calls this,
    and so does every Ray Serve replica (runtime/ray_serve.py)."""
    p = params
    init = {k: p[k] for k in ("image", "mask", "strength") if p.get(k) is not None}  # img2img, inpaint
    return pipeline.generate(p["prompt"], p["negative_prompt"], steps=p["steps"], guidance=p["guidance"],
                             seed=p["seed"], width=p["width"], height=p["height"], scheduler=p["scheduler"],
                             num_images=p["n"], on_step=on_step, cancel=cancel, watermark=watermark, **init)


def _version() -> str:
    from .environment import sdedge_version

    return sdedge_version()


def server_config(app, host: str = "127.0.0.1", port: int = 7860, *, log_level: str = "info"):
    """The uvicorn configuration `serve` runs `app` with (its ServeSettings' timeouts and connection cap)."""
    try:
        import uvicorn
    except ImportError:
        raise MissingDependency(f"the server needs uvicorn: {INSTALL_HINT}") from None
    s: ServeSettings = app.state.settings
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, server_header=False,
                          http=guarded_h11_protocol(s.header_timeout, s.max_connections), ws="none",
                          timeout_keep_alive=s.keep_alive, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          timeout_graceful_shutdown=None)


def serve(app, host: str = "127.0.0.1", port: int = 7860, *, log_level: str = "info",
          limit_concurrency: int | None = None) -> None:
    """Run `app` with uvicorn until SIGINT/SIGTERM; the running request finishes before the process exits.
    limit_concurrency: requests in flight before 503 (replaces the app settings' value when given)."""
    settings: ServeSettings = app.state.settings
    check_bind(host, settings)
    if limit_concurrency is not None:
        settings.limit_concurrency = limit_concurrency
        settings.check()
    import uvicorn

    server = uvicorn.Server(server_config(app, host, port, log_level=log_level))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:  # uvicorn has logged why (the port in use, ...)
        raise BadInput(f"could not listen on {host}:{port} (see the message above)")
