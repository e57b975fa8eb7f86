"""The server's /metrics: counters in Prometheus text format (no prometheus_client dependency).

Requests by method, route and status (labels bounded by runtime/server_guard.py), the latency histogram of answered
generations, seconds per pipeline stage, jobs by final state and kind, images, and gauges of the queue, readiness
and resident memory. runtime/ray_serve.py aggregates its replicas' figures with the same buckets.
"""

from __future__ import annotations

import logging
import threading

from .jobs import Job, JobQueue

log = logging.getLogger("sdedge.server")

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
KINDS = {"/v1/generate": "txt2img", "/v1/img2img": "img2img", "/v1/inpaint": "inpaint"}


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
