"""A bounded job queue in front of one `Pipeline`: one generation at a time, cancel by job id.

    submit(params) ──► [waiting: at most max_waiting] ──► worker thread ──► pipeline.generate(..., cancel=job.cancel_event)

- `submit` raises `QueueFull` when `max_waiting` jobs already wait (the HTTP server answers 429 + Retry-After).
- Every job has its own id and its own cancel event. `cancel(job_id)` sets that job's event and nothing else:
  a waiting job is dropped before it starts, a running one stops between denoising steps (`Cancelled`).
  There is no "interrupt whatever runs now" operation, so a late cancel can never hit the next job.
- `close()` refuses new jobs; with `wait=True` the running job (and, by default, those waiting) finish first.

Standard library only (no fastapi): an embedding application can use it too.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import SdedgeError

log = logging.getLogger("sdedge.runtime.jobs")

STATES = ("queued", "running", "done", "failed", "cancelled")


class QueueFull(SdedgeError):
    """The queue holds its maximum of waiting jobs; try again later."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class QueueClosed(SdedgeError):
    """The queue is shutting down and accepts no new job."""


class JobLost(SdedgeError):
    """The worker running the job went away before it finished (a Ray Serve replica died); try again."""


@dataclass
class Job:
    id: str
    params: dict[str, Any]
    submitted: float = field(default_factory=time.monotonic)
    state: str = "queued"
    started: float | None = None
    finished: float | None = None
    steps_done: int = 0
    steps_total: int = 0
    cancel_event: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (the replica that ran it)

    def status(self) -> dict[str, Any]:
        """What a client may see about a job: never its prompt."""
        return {"id": self.id, "state": self.state, "steps_done": self.steps_done, "steps_total": self.steps_total}


class JobQueue:
    """One worker thread running `run(job)` for each job in turn.

    run: called in the worker thread with the job; its return value is the job's future result. It should pass
    `job.cancel_event` to `Pipeline.generate(cancel=...)` and may update `job.steps_done` from `on_step`.
    """

    def __init__(self, run: Callable[[Job], Any], *, max_waiting: int = 8, history: int = 256,
                 on_finish: Callable[[Job], None] | None = None):
        if max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        self._run = run
        self.max_waiting = max_waiting
        self._on_finish = on_finish
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()  # live + recent, by id
        self._history = history
        self._running: Job | None = None
        self._closed = False
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        self._worker = threading.Thread(target=self._loop, name="sdedge-jobs", daemon=True)
        self._worker.start()

    # -- client side ------------------------------------------------------------------------------------------
    def submit(self, params: dict[str, Any], job_id: str | None = None) -> Job:
        with self._cond:
            if self._closed:
                raise QueueClosed("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the queue is full ({self.max_waiting} waiting)", self.retry_after())
            job_id = job_id or uuid.uuid4().hex
            live = self._jobs.get(job_id)
            if live is not None:
                raise ValueError(f"job id {job_id!r} is already in use")
            job = Job(id=job_id, params=params)
            self._waiting.append(job)
            self._remember(job)
            self._cond.notify_all()
            return job

    def cancel(self, job_id: str) -> bool:
        """Cancel the job with this id (only that one). True when it was waiting or running."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.state not in ("queued", "running"):
                return False
            job.cancel_event.set()
            if job.state == "queued":
                self._waiting.remove(job)
                self._finish(job, "cancelled")
                job.future.cancel()
            return True

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        with self._cond:
            return len(self._waiting)

    @property
    def running(self) -> Job | None:
        with self._cond:
            return self._running

    @property
    def closed(self) -> bool:
        return self._closed

    def retry_after(self) -> float:
        """A guess at when a slot frees: the mean recent job time (1 s before any job finished)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1.0, mean)

    def close(self, wait: bool = True, cancel_waiting: bool = False, timeout: float | None = None) -> None:
        """Accept no new job. wait: block until the worker is idle (the running job finishes, never killed)."""
        with self._cond:
            self._closed = True
            if cancel_waiting:
                while self._waiting:
                    job = self._waiting.popleft()
                    job.cancel_event.set()
                    self._finish(job, "cancelled")
                    job.future.cancel()
            self._cond.notify_all()
        if wait:
            self._worker.join(timeout)

    # -- worker side ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:  # closed and drained
                    return
                job = self._waiting.popleft()
                if not job.future.set_running_or_notify_cancel():  # cancelled through its future
                    self._finish(job, "cancelled")
                    continue
                job.state, job.started, self._running = "running", time.monotonic(), job
            try:
                result = self._run(job)
            except BaseException as exc:
                from .pipeline import Cancelled

                with self._cond:
                    self._finish(job, "cancelled" if isinstance(exc, Cancelled) else "failed")
                job.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                with self._cond:
                    self._durations.append(time.monotonic() - (job.started or job.submitted))
                    self._finish(job, "done")
                job.future.set_result(result)

    def _finish(self, job: Job, state: str) -> None:  # holds self._cond
        job.state, job.finished = state, time.monotonic()
        if self._running is job:
            self._running = None
        if self._on_finish is not None:
            try:
                self._on_finish(job)
            except Exception:
                log.exception("on_finish hook failed")

    def _remember(self, job: Job) -> None:  # holds self._cond
        self._jobs[job.id] = job
        while len(self._jobs) > self._history:
            old_id, old = next(iter(self._jobs.items()))
            if old.state in ("queued", "running"):
                break
            del self._jobs[old_id]
