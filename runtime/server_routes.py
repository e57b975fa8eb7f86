"""The server's routes (runtime/server.py lists them), over one `AppState`: the model, its queue, metrics, settings.

    add_ops_routes       /healthz, /readyz, /metrics
    add_job_routes       /v1/jobs/{id} (GET, DELETE), /v1/jobs/{id}/events
    add_info_route       /v1/info
    add_page_routes      /, /static/app.js, /static/app.css
    add_generate_routes  /v1/generate, /v1/img2img, /v1/inpaint: queued, answered by `AppState.answer`

(No `from __future__ import annotations` here: FastAPI reads the endpoint annotations, some of which are the
bundle's request models, built at start by runtime/server_models.py.)
"""

import asyncio
import base64
import hmac
import json
import logging
import math
import time
from typing import Any

from .errors import BadInput
from .jobs import JobLost, QueueClosed, QueueFull
from .server_models import Models
from .uploads import UploadLimits, UploadTooLarge, read_upload, to_array

log = logging.getLogger("sdedge.server")

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/static/app.js": ("app.js", "text/javascript"),
              "/static/app.css": ("app.css", "text/css")}
# The page may reach this server and nothing else (no CDN, no fonts, no analytics).
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self' blob:; "
            "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


class AppState:
    """What the routes share: the model (or, with a remote queue, its description), the queue, metrics, settings,
    and what this bundle can do."""

    def __init__(self, pipeline, settings, queue, metrics, models: Models, *, schedulers: tuple[str, ...],
                 max_images: int, default_steps: int, stamper=None):
        m = pipeline.manifest
        self.pipeline, self.settings, self.queue, self.metrics, self.models = pipeline, settings, queue, metrics, models
        self.schedulers, self.max_images, self.default_steps, self.stamper = schedulers, max_images, default_steps, stamper
        self.verified = pipeline.signer is not None
        self.inpaint_unet = bool(getattr(pipeline, "is_inpaint", False))
        has_encoder = "vae_encoder" in m.components
        self.abilities = {"txt2img": not self.inpaint_unet, "img2img": has_encoder and not self.inpaint_unet,
                          "inpaint": has_encoder}
        self.upload_limits = UploadLimits(settings.max_upload_bytes, settings.max_upload_pixels)
        self.decode_slot = asyncio.Semaphore(1)  # one upload decoded at a time: bounded memory whatever the load

    def ready(self) -> bool:
        return not self.queue.closed and (self.verified or self.settings.allow_unsigned)

    def info(self) -> dict:
        s, d, st = self.pipeline.manifest.shapes, self.pipeline.manifest.defaults, self.settings
        return {"auth": st.token is not None, "abilities": self.abilities, "schedulers": list(self.schedulers),
                "defaults": {"steps": self.default_steps, "guidance": d.guidance, "scheduler": d.scheduler,
                             "width": s.default_width, "height": s.default_height},
                "limits": {"width": [s.width_min, s.width_max], "height": [s.height_min, s.height_max],
                           "multiple": s.pixel_multiple, "max_steps": st.max_steps, "max_images": self.max_images,
                           "max_prompt_chars": st.max_prompt_chars, "timeout": st.timeout,
                           "upload_bytes": st.max_upload_bytes, "upload_pixels": st.max_upload_pixels}}

    def job_status(self, job_id: str, cancel: bool) -> dict:
        from fastapi import HTTPException

        found = self.queue.get(job_id)
        if found is None:
            raise HTTPException(404, "no such job (unknown, or too old)")
        if cancel and not self.queue.cancel(job_id):
            raise HTTPException(409, f"job already {found.state}")
        return found.status()

    async def with_uploads(self, body, kind: str, request, x_job_id: str | None):
        """An img2img / inpaint request: its uploads decoded (one at a time), then queued as any generation."""
        from fastapi.responses import JSONResponse

        t0 = time.monotonic()
        if not self.abilities[kind]:
            why = ("this is an inpainting bundle (its UNet takes 9 channels): use /v1/inpaint with a mask"
                   if self.inpaint_unet else "this bundle has no vae_encoder component, which image-to-image and "
                                             "inpainting need: export it again without --no-vae-encoder")
            return JSONResponse({"detail": why}, status_code=422)
        try:
            async with self.decode_slot:
                init = await asyncio.to_thread(init_params, body, kind, self.upload_limits,
                                               self.pipeline.manifest.shapes)
        except UploadTooLarge as exc:
            return JSONResponse({"detail": str(exc)}, status_code=413)
        except BadInput as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        params = {**body.model_dump(exclude={"image", "mask"}), **init, "kind": kind}
        return await self.run_request(body, params, request, x_job_id, t0)

    async def run_request(self, body, params: dict, request, x_job_id: str | None, t0: float):
        """Queue one generation of any kind, wait for it within the timeout (cancelling it if the client goes away),
        and answer it (PNG or JSON, or the failure's status)."""
        from fastapi.responses import JSONResponse, Response

        queue, settings = self.queue, self.settings
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
        return await self.answer(job, fut, body, request, headers, t0)

    async def answer(self, job, fut, body, request, headers: dict, t0: float):
        """The finished job's answer: its images (PNG, or JSON when asked or n > 1), or its failure's status."""
        from fastapi.responses import JSONResponse, Response

        if fut.cancelled():
            return JSONResponse({"detail": f"job {job.id} was cancelled", "job_id": job.id}, status_code=503,
                                headers=headers)
        headers.update(job.headers)  # e.g. the Ray Serve replica that ran it
        exc = fut.exception()
        if exc is not None:
            return failure(job, exc, headers)
        result = fut.result()
        pngs = await asyncio.to_thread(_encode_pngs, result, self.stamper, body.prompt, body.negative_prompt)
        self.metrics.stages(result.timings, len(pngs))
        self.metrics.latency(time.monotonic() - t0)
        headers.update({"X-Seed": str(result.settings["seed"]),
                        "X-Generation-Seconds": f"{sum(result.timings.values()):.3f}"})
        want_json = body.response_format == "json" or body.n > 1 or (
            body.response_format is None and _prefers_json(request.headers.get("accept", "")))
        if want_json:
            return JSONResponse({"job_id": job.id, "seed": result.settings["seed"],
                                 "images": [base64.b64encode(p).decode("ascii") for p in pngs],
                                 "settings": result.settings,
                                 "timings": {k: round(v, 6) for k, v in result.timings.items()}}, headers=headers)
        return Response(pngs[0], media_type="image/png", headers=headers)


def failure(job, exc: BaseException, headers: dict):
    """The answer to a job that raised `exc`: 503 (lost, cancelled), 422 (bad input), else 500 without the error's
    text."""
    from fastapi.responses import JSONResponse

    from .pipeline import Cancelled

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


# -- authentication -------------------------------------------------------------------------------------------
def auth_dependencies(state: AppState) -> tuple[list, dict]:
    """The routes' dependencies and documented 401 answer: the bearer token's check, only when the server has a token
    (the security scheme appears in the schema only then)."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    settings = state.settings
    if not settings.token:
        return [], {}
    bearer = HTTPBearer(auto_error=False, description="Set when the server runs with a token (--token-env).")

    def require_token(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        given = creds.credentials.encode() if creds is not None else b""
        if not hmac.compare_digest(given, settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return [Depends(require_token)], {401: {"model": state.models.error}}


# -- routes ---------------------------------------------------------------------------------------------------
def add_ops_routes(app, state: AppState, auth: list, auth_responses: dict) -> None:
    from fastapi.responses import JSONResponse, PlainTextResponse

    error = {"model": state.models.error}

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        """The process answers (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: error})
    async def readyz():
        """The model is loaded and its signature verified (or the server was told to allow unsigned bundles)."""
        body = {"ready": state.ready(), "signature": "verified" if state.verified else "not verified",
                "backend": state.pipeline.backend, "queue_depth": state.queue.depth,
                "queue_capacity": state.queue.max_waiting}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse, dependencies=auth, responses=auth_responses)
    async def metrics_endpoint():
        """Prometheus text format."""
        return PlainTextResponse(state.metrics.render(state.queue, state.ready()), media_type="text/plain; version=0.0.4")


def add_info_route(app, state: AppState) -> None:
    @app.get("/v1/info", tags=["ops"])
    async def info() -> dict:
        """What a client (the page at /) needs to build its form: whether a token is needed, this bundle's limits
        and defaults, and which of txt2img / img2img / inpaint it can do. Nothing secret."""
        return state.info()


def add_job_routes(app, state: AppState, auth: list, auth_responses: dict) -> None:
    from fastapi import HTTPException, Request
    from fastapi.responses import StreamingResponse

    error = {"model": state.models.error}

    # One route serves both methods (so a 405 lists both in Allow); the two below only document them.
    @app.api_route("/v1/jobs/{job_id}", methods=["GET", "DELETE"], dependencies=auth, include_in_schema=False)
    async def job(job_id: str, request: Request) -> dict:
        return state.job_status(job_id, request.method == "DELETE")

    job_errors = {**auth_responses, 404: error}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], dependencies=auth, responses=job_errors, operation_id="get_job")
    async def get_job(job_id: str) -> dict:
        """A recent job's state and progress (its prompt is never shown)."""
        return state.job_status(job_id, False)

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"], dependencies=auth, operation_id="cancel_job",
                responses={**job_errors, 409: {**error, "description": "the job already finished"}})
    async def cancel_job(job_id: str) -> dict:
        """Cancel this job, and only this one: dropped if waiting, stopped between denoising steps if running."""
        return state.job_status(job_id, True)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], dependencies=auth, responses=job_errors,
             operation_id="job_events", response_class=StreamingResponse)
    async def job_events(job_id: str):
        """Server-sent events: `data: {id, state, steps_done, steps_total}` each time the job changes, then
        `event: end` with its final state. A job id chosen by the client (X-Job-Id) may be opened before its
        request arrives: the stream waits up to 5 s for it."""
        job = await _appearing(state.queue, job_id, 5.0)
        if job is None:
            raise HTTPException(404, "no such job (unknown, or too old)")
        return StreamingResponse(_job_stream(job, state.settings.timeout + 30), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def add_page_routes(app) -> None:
    """The page: plain files of this package, nothing fetched from elsewhere."""
    from fastapi import Request
    from fastapi.responses import Response

    page = {route: (_page_file(name), kind) for route, (name, kind) in PAGE_FILES.items()}

    async def page_file(request: Request):
        body, kind = page[request.url.path]
        return Response(body, media_type=kind, headers=PAGE_HEADERS)

    for route in PAGE_FILES:
        app.add_api_route(route, page_file, methods=["GET"], include_in_schema=False)


def add_generate_routes(app, state: AppState, auth: list, auth_responses: dict) -> None:
    from fastapi import Header, Request
    from fastapi.responses import JSONResponse, Response

    models = state.models
    png_or_json = generation_responses(models, auth_responses)
    upload_errors = {**png_or_json, 413: {"model": models.error, "description": "body or upload too large (bytes, "
                                                                                "or pixels read from the header)"}}
    job_id_header = Header(None, pattern=JOB_ID_PATTERN, description="Your own job id (to cancel it by id).")

    @app.post("/v1/generate", tags=["generate"], dependencies=auth, responses=png_or_json, operation_id="generate",
              response_class=Response)
    async def generate(body: models.generate, request: Request, x_job_id: str = job_id_header):
        """Generate images. One generation runs at a time; others wait in a bounded queue (429 when full)."""
        t0 = time.monotonic()
        if not state.abilities["txt2img"]:
            return JSONResponse({"detail": "this is an inpainting bundle (its UNet takes 9 channels): use "
                                           "/v1/inpaint with an image and a mask"}, status_code=422)
        return await state.run_request(body, {**body.model_dump(), "kind": "txt2img"}, request, x_job_id, t0)

    @app.post("/v1/img2img", tags=["generate"], dependencies=auth, responses=upload_errors, operation_id="img2img",
              response_class=Response)
    async def img2img(body: models.img2img, request: Request, x_job_id: str = job_id_header):
        """Image to image, in the same queue as /v1/generate (same limits, cancel by job id, answers)."""
        return await state.with_uploads(body, "img2img", request, x_job_id)

    @app.post("/v1/inpaint", tags=["generate"], dependencies=auth, responses=upload_errors, operation_id="inpaint",
              response_class=Response)
    async def inpaint(body: models.inpaint, request: Request, x_job_id: str = job_id_header):
        """Inpainting, in the same queue as /v1/generate (same limits, cancel by job id, answers)."""
        return await state.with_uploads(body, "inpaint", request, x_job_id)


def generation_responses(models: Models, auth_responses: dict) -> dict:
    """The documented answers of a generation route."""
    error = models.error
    return {
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                          "application/json": {"schema": models.answer.model_json_schema()}},
              "description": "image/png (n = 1), or JSON with base64 PNGs"},
        400: {"model": error, "description": "a body that is not JSON text"},
        **auth_responses, 409: {"model": error, "description": "X-Job-Id already in use"},
        413: {"model": error, "description": "body too large"}, 422: {"model": error},
        429: {"model": error, "description": "queue full; see Retry-After"},
        503: {"model": error, "description": "timed out (the job is cancelled) or shutting down"},
    }


# -- helpers --------------------------------------------------------------------------------------------------
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


def _prefers_json(accept: str) -> bool:
    accept = accept.lower()
    return "application/json" in accept and "image/png" not in accept


def _encode_pngs(result, stamper=None, prompt: str = "", negative: str = "") -> list[bytes]:
    """The PNGs of a result, without metadata; with a signed C2PA manifest when the server has a stamper."""
    from .provenance import encode_outputs

    return encode_outputs(result, "png", stamper, prompt, negative)
