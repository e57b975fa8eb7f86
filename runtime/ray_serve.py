"""`sdedge serve --ray`: the same HTTP API as `sdedge serve` (runtime/server.py), on Ray Serve replicas.

    client ─► Ray Serve proxy ─► ingress (create_app: same routes, request models, limits, auth, errors, /metrics)
                                   │ RayJobs: one streaming call per job, cancelled by job id
                                   ▼
                                 ModelReplica × N (each: one verified Pipeline, one generation at a time)

- Every replica opens the bundle with `sdedge serve`'s policy (server.load_pipeline: signature required unless
  allow_unsigned); the ingress verifies it too before it reads the manifest for the request limits. A refused
  bundle fails the deployment with the message (`serve.run` raises it).
- max_ongoing_requests=1 per replica; Ray Serve's router queues the rest. The ingress admits at most one job per
  replica (`--max-replicas` with autoscaling) plus `settings.max_queue` waiting (RayJobs.submit, exact, as
  JobQueue's); the next answers 429 with Retry-After. Ray's own max_queued_requests is not used: it is approximate
  under a burst, both ways (2 replicas + 6 waiting: 6 of 20 concurrent requests admitted in one run, more than 8 of
  12 in another; tests/test_ray_serve.py).
- A request's timeout (queue included) answers 503 and cancels the Ray call, which cancels the job in its
  replica between denoising steps. A job whose replica dies is sent again (`RayOptions.retries`), then 503.
- Metrics: the ingress's /metrics aggregates every replica (server.Metrics); each replica also records
  sdedge_jobs_total, sdedge_images_total, sdedge_stage_seconds and sdedge_jobs_running through
  ray.serve.metrics, exported (prefixed `ray_`, tagged by replica) on Ray's metrics export port.

Ray is optional (`pip install 'sdedge[ray]'`) and imported only when these functions run. Ray itself moves
the request parameters and results between processes with its own serialisation; nothing is written to disk.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from .errors import BadInput, BundleError, MissingDependency
from .jobs import Job, JobLost, QueueClosed, QueueFull
from .pipeline import Pipeline

log = logging.getLogger("sdedge.ray")

INSTALL_HINT = "pip install 'sdedge[ray]' (Ray Serve)"
REPLICA_HEADER = "X-Sdedge-Replica"
PROGRESS_EVERY = 0.25  # seconds between progress messages from a replica
LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report to anyone
    # On Linux Ray resolves 127.0.0.1 to the host's outward address; this keeps a local cluster on loopback.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


@dataclass(frozen=True)
class RayOptions:
    """How the model deployment scales. Fixed `replicas`, or autoscaling when `max_replicas` is set."""

    replicas: int = 1
    min_replicas: int | None = None  # autoscaling: default 1
    max_replicas: int | None = None  # set: autoscale between min and max on ongoing requests
    target_ongoing_requests: float = 1.0  # per replica, for the autoscaler
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica
    retries: int = 2  # times a job whose replica died is sent again
    name: str = "sdedge"  # the Ray Serve application

    def check(self) -> None:
        if self.replicas < 1:
            raise BadInput(f"--replicas {self.replicas}: must be at least 1")
        if self.max_replicas is not None:
            low = 1 if self.min_replicas is None else self.min_replicas
            if not 0 <= low <= self.max_replicas or self.max_replicas < 1:
                raise BadInput(f"--min-replicas {low} / --max-replicas {self.max_replicas}: need 0 <= min <= max, "
                               "max >= 1")
        elif self.min_replicas is not None:
            raise BadInput("--min-replicas needs --max-replicas (autoscaling)")
        if not self.target_ongoing_requests > 0:
            raise BadInput(f"--target-ongoing {self.target_ongoing_requests}: must be > 0")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise BadInput("--replica-cpus / --replica-gpus must be >= 0")
        if self.retries < 0:
            raise BadInput(f"retries {self.retries}: must be >= 0")

    @property
    def slots(self) -> int:
        """Generations the model deployment runs at once at most (one per replica)."""
        return self.replicas if self.max_replicas is None else self.max_replicas

    def scaling(self) -> dict[str, Any]:
        """Ray Serve deployment options for these settings."""
        if self.max_replicas is None:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": {
            "min_replicas": 1 if self.min_replicas is None else self.min_replicas,
            "max_replicas": self.max_replicas, "target_ongoing_requests": self.target_ongoing_requests}}


def ray_installed() -> None:
    """MissingDependency without Ray, without importing it (start_ray sets Ray's environment first)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise MissingDependency(f"--ray needs ray: {INSTALL_HINT}")


def require_ray():
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise MissingDependency(f"--ray needs {exc.name or 'ray'}: {INSTALL_HINT}") from None
    return ray, serve


# -- the model replicas -------------------------------------------------------------------------------------------
class ReplicaMetrics:
    """sdedge's metric names through Ray's metrics API (exported by Ray, tagged with the replica)."""

    def __init__(self):
        from ray.serve import metrics

        from .server_metrics import LATENCY_BUCKETS

        self.jobs = metrics.Counter("sdedge_jobs_total", "Jobs by final state.", tag_keys=("state",))
        self.images = metrics.Counter("sdedge_images_total", "Images generated.")
        self.stages = metrics.Histogram("sdedge_stage_seconds", "Seconds per pipeline stage.",
                                        boundaries=list(LATENCY_BUCKETS), tag_keys=("stage",))
        self.running = metrics.Gauge("sdedge_jobs_running", "Jobs running in this replica (0 or 1).")
        self.running.set(0)

    def finished(self, state: str, result=None) -> None:
        self.jobs.inc(1, tags={"state": state})
        if result is not None:
            self.images.inc(len(result.images))
            for stage, secs in result.timings.items():
                self.stages.observe(secs, tags={"stage": stage})


class ModelReplica:
    """One verified Pipeline. `run(params)` streams ("started", replica id), ("step", (i, total)), ("result", r)."""

    def __init__(self, bundle: str, settings):
        from ray import serve

        from .server import load_pipeline

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.watermark = settings.watermark
        self.pipeline = load_pipeline(bundle, settings)  # BundleError here fails the deployment, with its message
        self.metrics = ReplicaMetrics()
        log.info("replica %s: %s loaded (%s)", self.replica, bundle, self.pipeline.backend)

    async def run(self, params: dict[str, Any]):
        from .pipeline import Cancelled
        from .server import run_job

        yield "started", self.replica
        loop, cancel, progress = asyncio.get_running_loop(), threading.Event(), [0, params.get("steps", 0)]

        def on_step(i: int, total: int) -> None:
            progress[:] = [i, total]

        self.metrics.running.set(1)
        work = loop.run_in_executor(None, partial(run_job, self.pipeline, params, on_step=on_step, cancel=cancel,
                                                     watermark=self.watermark))
        sent = 0
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=PROGRESS_EVERY)
                if progress[0] != sent:
                    sent = progress[0]
                    yield "step", tuple(progress)
            result = work.result()
        except BaseException as exc:  # cancelled by the ingress (timeout, client gone, DELETE) or failed
            cancel.set()
            await _settle(work)  # one generation at a time: the next job starts only once this one stopped
            self.metrics.finished("cancelled" if isinstance(exc, (asyncio.CancelledError, Cancelled)) else "failed")
            raise
        finally:
            self.metrics.running.set(0)
        self.metrics.finished("done", result)
        yield "result", result

    def __del__(self):
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.close()


async def _settle(work) -> None:
    while not work.done():
        try:
            await asyncio.wait({work})
        except asyncio.CancelledError:
            continue


# -- the ingress --------------------------------------------------------------------------------------------------
@dataclass
class RemoteModel:
    """What create_app needs to know about the model when the replicas run it (what the bundle can do is read
    from its manifest by Pipeline's own properties)."""

    bundle: Any
    manifest: Any
    signer: Any
    backend: str

    supports_img2img = Pipeline.supports_img2img
    unet_in_channels = Pipeline.unet_in_channels
    is_inpaint = Pipeline.is_inpaint

    @classmethod
    def open(cls, bundle: str, settings) -> RemoteModel:
        from .server import verify_policy
        from .signing import open_bundle

        verify, trust = verify_policy(settings)
        opened, signer = open_bundle(bundle, verify, **trust)
        return cls(bundle=opened, manifest=opened.manifest, signer=signer, backend=f"ray serve ({settings.backend})")


class RayJobs:
    """The job queue of create_app, with the jobs run by the model deployment. Used on the ingress's event loop
    (close() may come from another thread)."""

    def __init__(self, model, *, slots: int, max_waiting: int, on_finish=None, retries: int = 2,
                 history: int = 256):
        self._model, self.max_waiting, self._on_finish, self._retries = model, max_waiting, on_finish, retries
        self.slots = slots  # jobs the replicas run at once; beyond slots + max_waiting, QueueFull
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._tasks: dict[str, asyncio.Task] = {}
        self._history = history
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        self._lock = threading.Lock()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, params: dict[str, Any], job_id: str | None = None) -> Job:
        with self._lock:
            if self._closed:
                raise QueueClosed("the server is shutting down")
            if sum(j.state in ("queued", "running") for j in self._jobs.values()) >= self.slots + self.max_waiting:
                raise QueueFull(f"the queue is full ({self.max_waiting} waiting, {self.slots} running)",
                                self.retry_after())
            job_id = job_id or uuid.uuid4().hex
            if job_id in self._jobs:
                raise ValueError(f"job id {job_id!r} is already in use")
            job = Job(id=job_id, params=params, steps_total=params.get("steps", 0))
            self._jobs[job_id] = job
            self._trim()
        self._loop = asyncio.get_running_loop()
        self._tasks[job_id] = self._loop.create_task(self._drive(job))
        return job

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state not in ("queued", "running"):
                return False
            job.cancel_event.set()
            task = self._tasks.get(job_id)
        if task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(task.cancel)
        return True

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    @property
    def depth(self) -> int:
        with self._lock:
            return sum(j.state == "queued" for j in self._jobs.values())

    @property
    def running(self) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs.values() if j.state == "running"), None)

    @property
    def closed(self) -> bool:
        return self._closed

    def retry_after(self) -> float:
        return max(1.0, sum(self._durations) / len(self._durations)) if self._durations else 1.0

    def close(self, wait: bool = True, cancel_waiting: bool = False, timeout: float | None = None) -> None:
        with self._lock:
            self._closed = True
            live = [j.id for j in self._jobs.values() if j.state in ("queued", "running")]
        jobs = [j for j in map(self.get, live) if j is not None]
        if cancel_waiting:
            for job in jobs:
                if job.state == "queued":
                    self.cancel(job.id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while wait and any(j.state in ("queued", "running") for j in jobs):
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.1)

    # -- one job ----------------------------------------------------------------------------------------------
    async def _drive(self, job: Job) -> None:
        try:
            result = await self._with_retries(job)
        except asyncio.CancelledError:
            self._finish(job, "cancelled")
            job.future.cancel()
        except Exception as exc:  # noqa: BLE001 - handed to the endpoint, which maps it to a status
            from .pipeline import Cancelled

            cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the replica's exception
            self._finish(job, "cancelled" if isinstance(cause, Cancelled) else "failed")
            job.future.set_exception(cause)
        else:
            self._durations.append(time.monotonic() - (job.started or job.submitted))
            self._finish(job, "done")
            job.future.set_result(result)
        finally:
            self._tasks.pop(job.id, None)

    async def _with_retries(self, job: Job):
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import ReplicaUnavailableError

        for attempt in range(self._retries + 1):
            try:
                return await self._call(job)
            except (RayActorError, ReplicaUnavailableError) as exc:
                lost = f"{type(exc).__name__} on replica {job.headers.get(REPLICA_HEADER, '?')}"
                if attempt == self._retries:
                    raise JobLost(f"job {job.id}: its replica went away ({lost}), {self._retries} retries "
                                  "failed; try again") from None
                log.warning("job %s: %s; sending it again", job.id, lost)
                job.state = "queued"
                await asyncio.sleep(0.5 * (attempt + 1))

    async def _call(self, job: Job):
        stream = self._model.options(stream=True).run.remote(job.params)
        result = None
        try:
            async for kind, value in stream:
                if kind == "started":
                    job.state, job.started = "running", time.monotonic()
                    job.headers[REPLICA_HEADER] = value
                elif kind == "step":
                    job.steps_done, job.steps_total = value
                else:
                    result = value
        except asyncio.CancelledError:
            stream.cancel()  # the replica sees CancelledError and stops the job between steps
            raise
        if result is None:
            raise JobLost(f"job {job.id}: its replica returned no result")
        return result

    def _finish(self, job: Job, state: str) -> None:
        job.state, job.finished = state, time.monotonic()
        if self._on_finish is not None:
            try:
                self._on_finish(job)
            except Exception:
                log.exception("on_finish hook failed")

    def _trim(self) -> None:  # holds self._lock
        while len(self._jobs) > self._history:
            old_id, old = next(iter(self._jobs.items()))
            if old.state in ("queued", "running"):
                break
            del self._jobs[old_id]


class Ingress:
    """The HTTP front: runtime/server.py's app, with RayJobs sending each job to the model deployment."""

    def __init__(self, model, bundle: str, settings, retries: int, slots: int):
        self.model, self.bundle, self.settings, self.retries, self.slots = model, bundle, settings, retries, slots

    def __serve_build_asgi_app__(self):
        from .server import create_app

        described = RemoteModel.open(self.bundle, self.settings)
        return create_app(described, self.settings, queue_factory=partial(RayJobs, self.model, retries=self.retries,
                                                                         slots=self.slots))


# -- building and running the application -------------------------------------------------------------------------
def ray_app(bundle: str | os.PathLike, settings=None, options: RayOptions | None = None):
    """A Ray Serve application serving `bundle` with `sdedge serve`'s API: `serve.run(ray_app(...))`.

    settings: server.ServeSettings (limits, auth token, signature policy; threads default to the replica's
    CPUs). options: RayOptions (replicas or autoscaling, CPUs/GPUs per replica)."""
    _, serve = require_ray()
    from .server import ServeSettings

    settings, options = settings or ServeSettings(), options or RayOptions()
    settings.check()
    options.check()
    bundle = os.fspath(os.path.abspath(bundle))
    if settings.threads is None and options.num_cpus >= 1:
        settings = replace(settings, threads=int(options.num_cpus))
    model = serve.deployment(
        ModelReplica, name=f"{options.name}-model", max_ongoing_requests=1,
        graceful_shutdown_timeout_s=settings.timeout + 5,
        max_constructor_retry_count=3,  # a refused bundle is refused again: fail the deployment soon
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus}, **options.scaling(),
    ).bind(bundle, replace(settings, token=None))  # the model replicas never see the bearer token
    ingress = serve.deployment(serve.ingress()(Ingress), name=f"{options.name}-ingress", num_replicas=1,
                               max_ongoing_requests=settings.inflight_limit,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(model, bundle, settings, options.retries, options.slots)


def app_builder(args: dict[str, Any]):
    """For a Ray Serve config file / KubeRay RayService (`import_path: sdedge.runtime.ray_serve:app_builder`).
    args: bundle, and any ServeSettings or RayOptions field; the bearer token comes from $SDEDGE_TOKEN."""
    from dataclasses import fields

    from .server import ServeSettings

    args = dict(args)
    if "bundle" not in args:
        raise BadInput("app_builder: args need 'bundle' (the bundle folder on every node)")
    bundle = args.pop("bundle")
    setting_names = {f.name for f in fields(ServeSettings)} - {"token"}
    option_names = {f.name for f in fields(RayOptions)}
    unknown = sorted(set(args) - setting_names - option_names)
    if unknown:
        raise BadInput(f"app_builder: unknown args {', '.join(unknown)}")
    settings = ServeSettings(token=os.environ.get("SDEDGE_TOKEN") or None,
                             **{k: v for k, v in args.items() if k in setting_names})
    return ray_app(bundle, settings, RayOptions(**{k: v for k, v in args.items() if k in option_names}))


def local_env() -> dict[str, str]:
    """The environment a local Ray cluster starts with: loopback only, no usage stats, and token
    authentication between Ray's processes with a fresh token (none written to ~/.ray). Ray reads the
    authentication mode when it is first imported: once imported without one, Ray's own default stays."""
    env = {k: v for k, v in LOCAL_ENV.items() if k not in os.environ}
    if not os.environ.get("RAY_AUTH_MODE") and "ray" not in sys.modules:
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN")
                    or secrets.token_hex(32)})
    return env


def start_ray(address: str | None = None, *, num_cpus: float | None = None, num_gpus: float | None = None,
              metrics_export_port: int | None = None, log_to_driver: bool = False):
    """Connect to the cluster at `address`, or start a local one on 127.0.0.1 (no dashboard). Sets this
    process's environment for Ray (inherited by the processes of a local cluster) before importing it."""
    os.environ.update({k: v for k, v in LOCAL_ENV.items() if k not in os.environ} if address else local_env())
    ray, _ = require_ray()
    if address:
        return ray.init(address=address, log_to_driver=log_to_driver)
    kw = {"_metrics_export_port": metrics_export_port} if metrics_export_port else {}
    return ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                    _node_ip_address="127.0.0.1", log_to_driver=log_to_driver, configure_logging=False, **kw)


def start_serve(host: str, port: int) -> None:
    """Ray Serve's HTTP proxy on host:port (the head node only)."""
    _, serve = require_ray()
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")


def deploy(application, name: str, route_prefix: str = "/") -> None:
    """`serve.run`, with a failed deployment's own reason (a replica's BundleError: which file, which
    signature) raised as a BundleError rather than Ray's "Failed to update the deployments"."""
    _, serve = require_ray()
    try:
        serve.run(application, name=name, route_prefix=route_prefix)
    except RuntimeError as exc:
        reasons = _failure_reasons(serve, name)
        if not reasons:
            raise
        raise BundleError(f"Ray Serve could not start {name!r}: " + "; ".join(reasons)) from exc


def _failure_reasons(serve, name: str) -> list[str]:
    try:
        app = serve.status().applications[name]
    except Exception:  # noqa: BLE001 - nothing more to say than Ray's own error
        return []
    reasons = []
    for deployment, status in app.deployments.items():
        lines = [ln.strip() for ln in (status.message or "").splitlines() if ln.strip()]
        sdedge = [ln for ln in lines if "sdedge.runtime.errors." in ln or ln.startswith(("BundleError", "BadInput"))]
        if sdedge or lines:
            reasons.append(f"{deployment}: {(sdedge or lines)[-1]}")
    return reasons


def serve_on_ray(bundle: str, settings, options: RayOptions, *, host: str, port: int,
                 address: str | None = None, num_cpus: float | None = None, ready=None) -> None:
    """`sdedge serve --ray`: deploy, then wait for SIGINT/SIGTERM; Serve and a cluster started here are shut
    down however this ends. ready(): called once the application answers."""
    import signal

    ray_installed()
    stop, previous = threading.Event(), {}
    try:
        start_ray(address, num_cpus=num_cpus)
        # after ray.init, which installs its own SIGTERM handler (it aborts the process)
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        start_serve(host, port)
        deploy(ray_app(bundle, settings, options), options.name)
        if ready is not None:
            ready()
        while not stop.wait(0.5):
            pass
    finally:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)
