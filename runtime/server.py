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

Slow and hostile clients (docs/security.md, "The HTTP server"): `serve` runs uvicorn with `guarded_h11_protocol`
(a deadline on request headers; idle sockets closed first past `max_connections`), and `_Guard` reads every body
whole within its byte limit and `body_timeout`, caps the requests in flight, and keeps metric labels bounded.
Uploads are checked in runtime/uploads.py before a pixel is decoded.

fastapi, pydantic and uvicorn come from the `serve` extra and are imported when `create_app` runs, so
`sdedge.runtime` imports without them. (No `from __future__ import annotations` here: FastAPI reads the
endpoint annotations, some of which are classes built inside `create_app`.)
"""

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import BadInput, MissingDependency
from .jobs import Job, JobLost, JobQueue, QueueClosed, QueueFull
from .uploads import UploadLimits, UploadTooLarge, read_upload, to_array

log = logging.getLogger("sdedge.server")

INSTALL_HINT = "pip install 'sdedge[serve]' (fastapi and uvicorn)"
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
ROUTES = ("/v1/generate", "/v1/img2img", "/v1/inpaint", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/info",
          "/healthz", "/readyz", "/metrics", "/openapi.json", "/", "/static/app.js", "/static/app.css")
KINDS = {"/v1/generate": "txt2img", "/v1/img2img": "img2img", "/v1/inpaint": "inpaint"}
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/static/app.js": ("app.js", "text/javascript"),
              "/static/app.css": ("app.css", "text/css")}
# The page may reach this server and nothing else (no CDN, no fonts, no analytics).
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self' blob:; "
            "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


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


# -- metrics ------------------------------------------------------------------------------------------------------
class Metrics:
    """Counters for /metrics, in Prometheus text format (no prometheus_client dependency)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}  # (method, route, status) -> count
        self.latency_buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.stage_sum: dict[str, float] = {}
        self.stage_count: dict[str, int] = {}
        self.jobs: dict[str, int] = {}  # final state -> count
        self.kinds: dict[str, int] = {}  # txt2img | img2img | inpaint -> jobs done
        self.images = 0

    def request(self, method: str, route: str, status: int) -> None:
        with self._lock:
            key = (method, route, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def latency(self, seconds: float) -> None:
        with self._lock:
            self.latency_sum += seconds
            self.latency_count += 1
            for i, edge in enumerate(LATENCY_BUCKETS):
                if seconds <= edge:
                    self.latency_buckets[i] += 1

    def job_finished(self, job: Job) -> None:
        with self._lock:
            self.jobs[job.state] = self.jobs.get(job.state, 0) + 1
            kind = job.params.get("kind", "txt2img") if isinstance(job.params, dict) else "txt2img"
            if job.state == "done" and kind in KINDS.values():
                self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def stages(self, timings: dict[str, float], images: int) -> None:
        with self._lock:
            self.images += images
            for stage, secs in timings.items():
                self.stage_sum[stage] = self.stage_sum.get(stage, 0.0) + secs
                self.stage_count[stage] = self.stage_count.get(stage, 0) + 1

    def render(self, queue: JobQueue, ready: bool) -> str:
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            head("sdedge_http_requests_total", "counter", "HTTP requests by method, route and status code.")
            for (method, route, status), n in sorted(self.requests.items()):
                out.append(f'sdedge_http_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
            head("sdedge_generate_duration_seconds", "histogram",
                 "Time from arrival to response of a generation (/v1/generate, /v1/img2img, /v1/inpaint) answered 200.")
            for edge, n in zip(LATENCY_BUCKETS, self.latency_buckets):
                out.append(f'sdedge_generate_duration_seconds_bucket{{le="{edge}"}} {n}')
            out.append(f'sdedge_generate_duration_seconds_bucket{{le="+Inf"}} {self.latency_count}')
            out.append(f"sdedge_generate_duration_seconds_sum {self.latency_sum:.6f}")
            out.append(f"sdedge_generate_duration_seconds_count {self.latency_count}")
            head("sdedge_stage_seconds", "summary", "Seconds spent per pipeline stage (finished generations).")
            for stage in sorted(self.stage_sum):
                out.append(f'sdedge_stage_seconds_sum{{stage="{stage}"}} {self.stage_sum[stage]:.6f}')
                out.append(f'sdedge_stage_seconds_count{{stage="{stage}"}} {self.stage_count[stage]}')
            head("sdedge_jobs_total", "counter", "Jobs by final state (done, failed, cancelled).")
            for state in ("done", "failed", "cancelled"):
                out.append(f'sdedge_jobs_total{{state="{state}"}} {self.jobs.get(state, 0)}')
            head("sdedge_generations_total", "counter", "Jobs done by kind (txt2img, img2img, inpaint).")
            for kind in KINDS.values():
                out.append(f'sdedge_generations_total{{kind="{kind}"}} {self.kinds.get(kind, 0)}')
            head("sdedge_images_total", "counter", "Images generated.")
            out.append(f"sdedge_images_total {self.images}")
        head("sdedge_queue_depth", "gauge", "Jobs waiting behind the running one.")
        out.append(f"sdedge_queue_depth {queue.depth}")
        head("sdedge_queue_capacity", "gauge", "The most jobs that may wait.")
        out.append(f"sdedge_queue_capacity {queue.max_waiting}")
        head("sdedge_jobs_running", "gauge", "Jobs running now (0 or 1).")
        out.append(f"sdedge_jobs_running {0 if queue.running is None else 1}")
        head("sdedge_ready", "gauge", "1 when the model is loaded and verified.")
        out.append(f"sdedge_ready {int(ready)}")
        try:
            import psutil

            head("process_resident_memory_bytes", "gauge", "Resident memory of the server process.")
            out.append(f"process_resident_memory_bytes {psutil.Process().memory_info().rss}")
        except Exception as exc:  # noqa: BLE001 - metrics are best effort
            log.debug("no RSS figure: %s", exc)
        return "\n".join(out) + "\n"


# -- the app ------------------------------------------------------------------------------------------------------
def create_app(pipeline_or_path, settings: ServeSettings | None = None, *, queue_factory=None):
    """A FastAPI app serving `pipeline_or_path`: a loaded `Pipeline`, or a bundle folder loaded (and verified)
    here, before the app exists, so that a bad or unsigned bundle fails at start rather than at first request.
    queue_factory(max_waiting=, on_finish=): a job queue that runs the jobs elsewhere, in place of the local
    JobQueue (runtime/ray_serve.py: Ray Serve replicas); `pipeline_or_path` then only describes the model
    (its `manifest`, `signer`, `backend`)."""
    _require_fastapi()
    from typing import Annotated

    from fastapi import Depends, FastAPI, Header, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

    Int = Annotated[int, BeforeValidator(_json_integer)]

    from .pipeline import Pipeline
    from .schedulers import scheduler_names

    settings = settings or ServeSettings()
    settings.check()
    owned = isinstance(pipeline_or_path, (str, os.PathLike))  # we loaded it, so we close it at shutdown
    if owned:
        pipeline = load_pipeline(Path(pipeline_or_path), settings)
    elif isinstance(pipeline_or_path, Pipeline) or queue_factory is not None:
        pipeline = pipeline_or_path
    else:
        raise TypeError(f"create_app needs a Pipeline or a bundle path, not {type(pipeline_or_path).__name__}")

    m = pipeline.manifest
    s = m.shapes
    bundle_max_images = max(1, s.batch_max // 2)  # with guidance > 1 the negative prompts share the batch
    max_images = min(settings.max_images or bundle_max_images, bundle_max_images)
    default_steps = min(m.defaults.steps, settings.max_steps)
    schedulers = tuple(scheduler_names())
    metrics = Metrics()
    verified = pipeline.signer is not None
    stamper = None
    if settings.c2pa is not None:  # key and certificate checked now: a bad one fails at start
        from .provenance import Stamper, bundle_identity

        stamper = Stamper.load(settings.c2pa, bundle_identity(pipeline))

    # -- request model: this bundle's limits, so the OpenAPI schema states them ------------------------------
    class GenerateRequest(BaseModel):
        """Text to image. Unknown fields are refused; types are strict (no "5" for 5)."""

        model_config = ConfigDict(strict=True, extra="forbid")

        prompt: str = Field(min_length=1, max_length=settings.max_prompt_chars, pattern=r"\S",
                            description="What to draw (CLIP keeps the first 77 tokens).")
        negative_prompt: str = Field("", max_length=settings.max_prompt_chars)
        steps: Int = Field(default_steps, ge=1, le=settings.max_steps, description="Denoising steps.")
        guidance: float = Field(m.defaults.guidance, ge=0.0, le=30.0, allow_inf_nan=False,
                                description="Classifier-free guidance scale (≤ 1 disables it).")
        seed: Annotated[int, Field(ge=0, le=2 ** 32 - 1), BeforeValidator(_json_integer)] | None = Field(
            None, description="Omitted: a random seed (returned).")
        width: Int = Field(s.default_width, ge=s.width_min, le=s.width_max, multiple_of=s.pixel_multiple)
        height: Int = Field(s.default_height, ge=s.height_min, le=s.height_max, multiple_of=s.pixel_multiple)
        scheduler: str = Field(m.defaults.scheduler, json_schema_extra={"enum": list(schedulers)})
        n: Int = Field(1, ge=1, le=max_images, description="Images per request (n > 1 answers JSON).")
        response_format: Literal["png", "json"] | None = Field(
            None,
            description="png: image/png (n = 1); json: base64 PNGs. Default: png unless Accept asks for JSON or n > 1.")
        timeout: Annotated[float, Field(ge=min(1.0, settings.timeout), le=settings.timeout, allow_inf_nan=False)] | None = Field(
            None, description=f"Seconds to wait at most (≤ the server's {settings.timeout:g}).")

        @model_validator(mode="after")
        def _check(self):
            if self.scheduler not in schedulers:
                raise ValueError(f"scheduler {self.scheduler!r}: choose one of {', '.join(schedulers)}")
            if self.response_format == "png" and self.n > 1:
                raise ValueError("n > 1 needs response_format 'json' (one PNG per response)")
            return self

    upload_limits = UploadLimits(settings.max_upload_bytes, settings.max_upload_pixels)
    upload_doc = (f"base64 PNG, JPEG or WebP file (a data: URL too), at most {settings.max_upload_bytes:,} bytes "
                  f"and {settings.max_upload_pixels:,} pixels")
    size_doc = "Omitted: the image's own. The image (and mask) are resized to width × height."

    class Img2ImgRequest(GenerateRequest):
        """Image to image: the image, noised to `strength`, is denoised with the prompt (the bundle needs its
        vae_encoder). The output has width × height (default: the image's size)."""

        image: str = Field(min_length=1, description=f"The init image: {upload_doc}.")
        strength: float = Field(0.8, gt=0.0, le=1.0, allow_inf_nan=False,
                                description="How much to change the image: the share of the steps that run.")
        width: Int | None = Field(None, ge=s.width_min, le=s.width_max, multiple_of=s.pixel_multiple,
                                  description=size_doc)
        height: Int | None = Field(None, ge=s.height_min, le=s.height_max, multiple_of=s.pixel_multiple,
                                   description=size_doc)

    class InpaintRequest(Img2ImgRequest):
        """Inpainting: the white part of the mask is repainted, the rest kept (a 9-channel inpainting UNet, or any
        bundle with a vae_encoder by blending)."""

        mask: str = Field(min_length=1, description=f"White = repaint, black = keep: {upload_doc}.")
        strength: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False,
                                description="1 repaints the masked part from noise.")

    inpaint_unet = bool(getattr(pipeline, "is_inpaint", False))
    has_encoder = "vae_encoder" in m.components
    abilities = {"txt2img": not inpaint_unet, "img2img": has_encoder and not inpaint_unet, "inpaint": has_encoder}
    decode_slot = asyncio.Semaphore(1)  # one upload decoded at a time: bounded memory whatever the load

    class GenerateJSON(BaseModel):
        job_id: str
        seed: int
        images: list[str] = Field(description="base64 PNG images")
        settings: dict[str, Any]
        timings: dict[str, float]

    class ErrorBody(BaseModel):
        detail: Any

    # -- jobs -------------------------------------------------------------------------------------------------
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

    # -- app --------------------------------------------------------------------------------------------------
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped accepting and waited for open requests; let the running job finish.
        log.info("shutting down: finishing the running job")
        await asyncio.to_thread(queue.close, True, True, settings.timeout + 5)
        if owned:
            pipeline.close()

    # No /docs or /redoc: FastAPI's Swagger UI and ReDoc load from a CDN (nothing here may need the internet).
    app = FastAPI(title="sdedge", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Text to image with a signed sdedge bundle. Limits in the request schema are "
                              "this bundle's exported range.")
    app.state.pipeline, app.state.queue, app.state.metrics, app.state.settings = pipeline, queue, metrics, settings

    bearer = HTTPBearer(auto_error=False, description="Set when the server runs with a token (--token-env).")

    def require_token(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if settings.token is None:
            return
        given = creds.credentials.encode() if creds is not None else b""
        if not hmac.compare_digest(given, settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    # The security scheme appears in the schema (and is enforced) only when the server has a token.
    auth = [Depends(require_token)] if settings.token else []
    auth_responses = {401: {"model": ErrorBody}} if settings.token else {}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # The inputs are not echoed back (a 100,000-character prompt would come back whole, and prompts stay private).
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()][:20]
        return JSONResponse({"detail": detail}, status_code=422)

    def ready() -> bool:
        return not queue.closed and (verified or settings.allow_unsigned)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        """The process answers (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorBody}})
    async def readyz():
        """The model is loaded and its signature verified (or the server was told to allow unsigned bundles)."""
        body = {"ready": ready(), "signature": "verified" if verified else "not verified",
                "backend": pipeline.backend, "queue_depth": queue.depth, "queue_capacity": queue.max_waiting}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse, dependencies=auth, responses=auth_responses)
    async def metrics_endpoint():
        """Prometheus text format."""
        return PlainTextResponse(metrics.render(queue, ready()), media_type="text/plain; version=0.0.4")

    def job_response(job_id: str, cancel: bool) -> dict:
        found = queue.get(job_id)
        if found is None:
            raise HTTPException(404, "no such job (unknown, or too old)")
        if cancel and not queue.cancel(job_id):
            raise HTTPException(409, f"job already {found.state}")
        return found.status()

    # One route serves both methods (so a 405 lists both in Allow); the two below only document them.
    @app.api_route("/v1/jobs/{job_id}", methods=["GET", "DELETE"], dependencies=auth, include_in_schema=False)
    async def job(job_id: str, request: Request) -> dict:
        return job_response(job_id, request.method == "DELETE")

    job_errors = {**auth_responses, 404: {"model": ErrorBody}}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], dependencies=auth, responses=job_errors, operation_id="get_job")
    async def get_job(job_id: str) -> dict:
        """A recent job's state and progress (its prompt is never shown)."""
        return job_response(job_id, False)

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"], dependencies=auth, operation_id="cancel_job",
                responses={**job_errors, 409: {"model": ErrorBody, "description": "the job already finished"}})
    async def cancel_job(job_id: str) -> dict:
        """Cancel this job, and only this one: dropped if waiting, stopped between denoising steps if running."""
        return job_response(job_id, True)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], dependencies=auth, responses=job_errors,
             operation_id="job_events", response_class=StreamingResponse)
    async def job_events(job_id: str):
        """Server-sent events: `data: {id, state, steps_done, steps_total}` each time the job changes, then
        `event: end` with its final state. A job id chosen by the client (X-Job-Id) may be opened before its
        request arrives: the stream waits up to 5 s for it."""
        job = await _appearing(queue, job_id, 5.0)
        if job is None:
            raise HTTPException(404, "no such job (unknown, or too old)")
        return StreamingResponse(_job_stream(job, settings.timeout + 30), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/v1/info", tags=["ops"])
    async def info() -> dict:
        """What a client (the page at /) needs to build its form: whether a token is needed, this bundle's limits
        and defaults, and which of txt2img / img2img / inpaint it can do. Nothing secret."""
        return {"auth": settings.token is not None, "abilities": abilities, "schedulers": list(schedulers),
                "defaults": {"steps": default_steps, "guidance": m.defaults.guidance, "scheduler": m.defaults.scheduler,
                             "width": s.default_width, "height": s.default_height},
                "limits": {"width": [s.width_min, s.width_max], "height": [s.height_min, s.height_max],
                           "multiple": s.pixel_multiple, "max_steps": settings.max_steps, "max_images": max_images,
                           "max_prompt_chars": settings.max_prompt_chars, "timeout": settings.timeout,
                           "upload_bytes": settings.max_upload_bytes, "upload_pixels": settings.max_upload_pixels}}

    page = {route: (_page_file(name), kind) for route, (name, kind) in PAGE_FILES.items()}

    async def page_file(request: Request):
        body, kind = page[request.url.path]
        return Response(body, media_type=kind, headers=PAGE_HEADERS)

    for route in PAGE_FILES:  # the page: plain files of this package, nothing fetched from elsewhere
        app.add_api_route(route, page_file, methods=["GET"], include_in_schema=False)

    png_or_json = {
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                          "application/json": {"schema": GenerateJSON.model_json_schema()}},
              "description": "image/png (n = 1), or JSON with base64 PNGs"},
        400: {"model": ErrorBody, "description": "a body that is not JSON text"},
        **auth_responses, 409: {"model": ErrorBody, "description": "X-Job-Id already in use"},
        413: {"model": ErrorBody, "description": "body too large"}, 422: {"model": ErrorBody},
        429: {"model": ErrorBody, "description": "queue full; see Retry-After"},
        503: {"model": ErrorBody, "description": "timed out (the job is cancelled) or shutting down"},
    }

    job_id_header = Header(None, pattern=JOB_ID_PATTERN, description="Your own job id (to cancel it by id).")

    @app.post("/v1/generate", tags=["generate"], dependencies=auth, responses=png_or_json, operation_id="generate",
              response_class=Response)
    async def generate(body: GenerateRequest, request: Request, x_job_id: str = job_id_header):
        """Generate images. One generation runs at a time; others wait in a bounded queue (429 when full)."""
        t0 = time.monotonic()
        if not abilities["txt2img"]:
            return JSONResponse({"detail": "this is an inpainting bundle (its UNet takes 9 channels): use "
                                           "/v1/inpaint with an image and a mask"}, status_code=422)
        return await run_request(body, {**body.model_dump(), "kind": "txt2img"}, request, x_job_id, t0)

    async def with_uploads(body, kind: str, request: Request, x_job_id: str | None):
        t0 = time.monotonic()
        if not abilities[kind]:
            why = ("this is an inpainting bundle (its UNet takes 9 channels): use /v1/inpaint with a mask"
                   if inpaint_unet else "this bundle has no vae_encoder component, which image-to-image and "
                                        "inpainting need: export it again without --no-vae-encoder")
            return JSONResponse({"detail": why}, status_code=422)
        try:
            async with decode_slot:
                init = await asyncio.to_thread(init_params, body, kind, upload_limits, s)
        except UploadTooLarge as exc:
            return JSONResponse({"detail": str(exc)}, status_code=413)
        except BadInput as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        params = {**body.model_dump(exclude={"image", "mask"}), **init, "kind": kind}
        return await run_request(body, params, request, x_job_id, t0)

    upload_errors = {**png_or_json, 413: {"model": ErrorBody, "description": "body or upload too large (bytes, "
                                                                             "or pixels read from the header)"}}

    @app.post("/v1/img2img", tags=["generate"], dependencies=auth, responses=upload_errors, operation_id="img2img",
              response_class=Response)
    async def img2img(body: Img2ImgRequest, request: Request, x_job_id: str = job_id_header):
        """Image to image, in the same queue as /v1/generate (same limits, cancel by job id, answers)."""
        return await with_uploads(body, "img2img", request, x_job_id)

    @app.post("/v1/inpaint", tags=["generate"], dependencies=auth, responses=upload_errors, operation_id="inpaint",
              response_class=Response)
    async def inpaint(body: InpaintRequest, request: Request, x_job_id: str = job_id_header):
        """Inpainting, in the same queue as /v1/generate (same limits, cancel by job id, answers)."""
        return await with_uploads(body, "inpaint", request, x_job_id)

    async def run_request(body, params: dict, request: Request, x_job_id: str | None, t0: float):
        """Queue one generation of any kind and answer it (PNG or JSON, or the failure's status)."""
        want_json = body.response_format == "json" or body.n > 1 or (
            body.response_format is None and _prefers_json(request.headers.get("accept", "")))
        try:
            job = queue.submit(params, x_job_id)
        except QueueFull as exc:
            return JSONResponse({"detail": str(exc)}, status_code=429,
                                headers={"Retry-After": str(math.ceil(exc.retry_after))})
        except QueueClosed as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=409)
        headers = {"X-Job-Id": job.id}
        if settings.log_prompts:
            log.info("job %s: prompt %r", job.id, body.prompt)
        log.info("job %s: %s %dx%d, %d steps, n=%d", job.id, params["kind"], params["width"], params["height"],
                 body.steps, body.n)

        timeout = min(body.timeout or settings.timeout, settings.timeout)
        fut = asyncio.wrap_future(job.future)
        fut.add_done_callback(_retrieve)  # a job cancelled after its client got 503 must not log "never retrieved"
        deadline = t0 + timeout
        while not fut.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                queue.cancel(job.id)
                log.info("job %s: timed out after %.1f s; cancelled", job.id, timeout)
                return JSONResponse({"detail": f"timed out after {timeout:g} s; job {job.id} cancelled",
                                     "job_id": job.id}, status_code=503, headers=headers)
            await asyncio.wait({fut}, timeout=min(remaining, 0.25))
            if not fut.done() and await request.is_disconnected():
                queue.cancel(job.id)
                log.info("job %s: client went away; cancelled", job.id)
                return Response(status_code=499, headers=headers)

        if fut.cancelled():
            return JSONResponse({"detail": f"job {job.id} was cancelled", "job_id": job.id}, status_code=503,
                                headers=headers)
        headers.update(job.headers)  # e.g. the Ray Serve replica that ran it
        exc = fut.exception()
        if exc is not None:
            from .pipeline import Cancelled

            if isinstance(exc, QueueFull):  # a remote queue (runtime/ray_serve.py) refuses after submit
                return JSONResponse({"detail": str(exc)}, status_code=429,
                                    headers={**headers, "Retry-After": str(math.ceil(exc.retry_after))})
            if isinstance(exc, JobLost):
                return JSONResponse({"detail": str(exc), "job_id": job.id}, status_code=503,
                                    headers={**headers, "Retry-After": "1"})
            if isinstance(exc, Cancelled):
                return JSONResponse({"detail": f"job {job.id} was cancelled ({exc})", "job_id": job.id},
                                    status_code=503, headers=headers)
            if isinstance(exc, BadInput):
                return JSONResponse({"detail": str(exc)}, status_code=422, headers=headers)
            log.error("job %s failed: %s: %s", job.id, type(exc).__name__, exc)
            return JSONResponse({"detail": f"generation failed ({type(exc).__name__})", "job_id": job.id},
                                status_code=500, headers=headers)

        result = fut.result()
        pngs = await asyncio.to_thread(_encode_pngs, result, stamper, body.prompt, body.negative_prompt)
        metrics.stages(result.timings, len(pngs))
        metrics.latency(time.monotonic() - t0)
        headers.update({"X-Seed": str(result.settings["seed"]),
                        "X-Generation-Seconds": f"{sum(result.timings.values()):.3f}"})
        if want_json:
            return JSONResponse({"job_id": job.id, "seed": result.settings["seed"],
                                 "images": [base64.b64encode(p).decode("ascii") for p in pngs],
                                 "settings": result.settings,
                                 "timings": {k: round(v, 6) for k, v in result.timings.items()}}, headers=headers)
        return Response(pngs[0], media_type="image/png", headers=headers)

    upload_body = 2 * UploadLimits(settings.max_upload_bytes).base64_chars() + settings.max_body_bytes
    app.add_middleware(_Guard, metrics=metrics, settings=settings,
                       body_limits={"/v1/img2img": upload_body, "/v1/inpaint": upload_body})
    return app


def run_job(pipeline, params: dict[str, Any], *, on_step=None, cancel: threading.Event | None = None,
            watermark: bool = True):
    """Run one request (its validated body's `model_dump()`) on `pipeline`: the job queue's worker calls this,
    and so does every Ray Serve replica (runtime/ray_serve.py)."""
    p = params
    init = {k: p[k] for k in ("image", "mask", "strength") if p.get(k) is not None}  # img2img, inpaint
    return pipeline.generate(p["prompt"], p["negative_prompt"], steps=p["steps"], guidance=p["guidance"],
                             seed=p["seed"], width=p["width"], height=p["height"], scheduler=p["scheduler"],
                             num_images=p["n"], on_step=on_step, cancel=cancel, watermark=watermark, **init)


def init_params(body, kind: str, limits: UploadLimits, shapes) -> dict[str, Any]:
    """An img2img / inpaint request's uploads as arrays of the output size, and that size: {"image", "mask",
    "strength", "width", "height"}. Raises UploadTooLarge (413) or BadInput (422) naming the field."""
    image = read_upload(body.image, "image", limits, "RGB")
    width, height = body.width or image.size[0], body.height or image.size[1]
    for label, value, lo, hi in (("width", width, shapes.width_min, shapes.width_max),
                                 ("height", height, shapes.height_min, shapes.height_max)):
        if not lo <= value <= hi or value % shapes.pixel_multiple:
            raise BadInput(f"image is {image.size[0]}×{image.size[1]} pixels: a {label} of {value} does not fit this "
                           f"bundle ({lo}–{hi}, a multiple of {shapes.pixel_multiple}); give width and height (the "
                           "image is resized to them)")
    out = {"image": to_array(image, (width, height)), "mask": None, "strength": body.strength,
           "width": width, "height": height}
    if kind == "inpaint":
        out["mask"] = to_array(read_upload(body.mask, "mask", limits, "L"), (width, height))  # (H, W) uint8
    return out


PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _page_file(name: str) -> bytes:
    from importlib.resources import files

    return (files(__package__) / "web" / name).read_bytes()


async def _appearing(queue, job_id: str, wait: float):
    """The job with this id, waiting up to `wait` seconds for it to be submitted."""
    deadline = time.monotonic() + wait
    while (job := queue.get(job_id)) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return job


async def _job_stream(job, limit: float):
    """Server-sent events of a job's status, polled every 50 ms, sent when it changes (a comment every 10 s keeps
    the connection alive); ends with `event: end` when the job does, or after `limit` seconds."""
    last, said, end = None, time.monotonic(), time.monotonic() + limit
    while True:
        status, now = job.status(), time.monotonic()
        if status != last:
            yield f"data: {json.dumps(status)}\n\n"
            last, said = status, now
        if status["state"] in ("done", "failed", "cancelled"):
            yield f"event: end\ndata: {json.dumps(status)}\n\n"
            return
        if now > end:
            return
        if now - said > 10:
            yield ": waiting\n\n"
            said = now
        await asyncio.sleep(0.05)


def _retrieve(fut) -> None:
    if not fut.cancelled():
        fut.exception()


def _json_integer(value):
    """JSON Schema counts 128.0 as an integer: accept an integral float, refuse strings and booleans."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _prefers_json(accept: str) -> bool:
    accept = accept.lower()
    return "application/json" in accept and "image/png" not in accept


def _encode_pngs(result, stamper=None, prompt: str = "", negative: str = "") -> list[bytes]:
    """The PNGs of a result, without metadata; with a signed C2PA manifest when the server has a stamper."""
    from .provenance import encode_outputs

    return encode_outputs(result, "png", stamper, prompt, negative)


def _version() -> str:
    from .environment import sdedge_version

    return sdedge_version()


KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")
MAX_HEADER_BYTES = 16 * 1024  # request line + headers; h11 answers 400 past it
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 31\r\n"
                    b"connection: close\r\n\r\nrequest headers took too long\r\n")


class _Guard:
    """ASGI middleware in front of every route.

    - Counts responses by method, route and status for /metrics, with bounded labels (an unknown method is
      "other", an unknown path "other", job ids collapsed to the route template).
    - Admits at most `settings.inflight_limit` requests into the app at once (503 + Retry-After past it); idle
      connections do not count (the protocol below deals with those).
    - Reads the whole body before the app runs: over the route's limit (declared or chunked) 413, not complete
      `settings.body_timeout` seconds after the headers 408; both close the connection.
    """

    def __init__(self, app, metrics: Metrics, settings: ServeSettings, body_limits: dict[str, int] | None = None):
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
