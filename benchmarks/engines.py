"""The bench's parent side of each engine: a worker in a child process (or inline), started, called with the
protocol of worker_process.py, its log kept, stopped; and a poller of nvidia-smi for per-process GPU memory."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .suite import BenchError
from .worker_process import REPLY_PREFIX, handle


class EngineProcess:
    """The parent's handle on one engine: its spec, its worker, and everything measured."""

    def __init__(self, name: str, role: str, spec: dict, settings: dict, isolation: str, log_dir: Path):
        self.name, self.role, self.spec, self.settings = name, role, spec, settings
        self.isolation = isolation
        self.log_path = log_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"
        self.proc: subprocess.Popen | None = None
        self.box: list = []
        self.info: dict = {}
        self.cold_start_seconds: float | None = None
        self.warmups: list[dict] = []
        self.runs: list[dict] = []
        self.images: list[np.ndarray] = []  # per run, (B, H, W, 3)
        self.final: dict = {}
        self.pid: int | None = None

    def start(self) -> None:
        t0 = time.perf_counter()
        if self.isolation == "process":
            env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
            self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
            python = self.spec.get("python") or sys.executable  # a peer: its own venv's interpreter
            self.proc = subprocess.Popen([python, "-m", "sdedge.benchmarks.worker_process", "--worker"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                         env=env, bufsize=1)
            self.pid = self.proc.pid
        else:
            self.pid = os.getpid()
        self.info = self.call({"op": "init", "role": self.role, "spec": self.spec, "settings": self.settings})
        self.cold_start_seconds = time.perf_counter() - t0

    def call(self, msg: dict) -> dict:
        if self.proc is None:
            reply = handle(self.box, msg)
        else:
            try:
                self.proc.stdin.write(json.dumps(msg) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
            reply = None
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    break
                if line.startswith(REPLY_PREFIX):
                    reply = json.loads(line[len(REPLY_PREFIX):])
                    break
            if reply is None:
                code = self.proc.wait(timeout=30)
                raise BenchError(f"engine {self.name!r}: its worker process ended (exit {code}) during "
                                 f"{msg.get('op')!r}{self._log_tail()}")
        if not reply.get("ok"):
            if reply.get("user_error"):
                raise BenchError(f"engine {self.name!r}: {reply['error']}")
            raise BenchError(f"engine {self.name!r} failed during {msg.get('op')!r}: {reply['error']}"
                             + (f"\n{reply['traceback']}" if reply.get("traceback") else "") + self._log_tail())
        return reply

    def _log_tail(self, n: int = 2000) -> str:
        try:
            self._log.flush()
            text = self.log_path.read_text(errors="replace")[-n:]
        except (OSError, AttributeError):
            return ""
        return f"\n--- last lines of its log ({self.log_path}) ---\n{text}" if text.strip() else ""

    def stop(self) -> None:
        try:
            if self.proc is None:
                handle(self.box, {"op": "close"})
            elif self.proc.poll() is None:
                try:
                    self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                    self.proc.stdin.close()
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            if hasattr(self, "_log"):
                self._log.close()


class GpuPoller(threading.Thread):
    """Polls nvidia-smi for the device memory each engine process holds (and the whole device's use)."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval = interval
        self.per_pid: dict[int, int] = {}
        self.device_max = 0
        self.device_baseline: int | None = None
        self.current: int | None = None  # pid whose work is in progress (for the device-total fallback)
        self.per_pid_device: dict[int, int] = {}
        self._stop_event = threading.Event()

    @staticmethod
    def available() -> bool:
        return shutil.which("nvidia-smi") is not None

    def _query(self, args: list[str]) -> str:
        try:
            return subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True,
                                  text=True, check=False, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    def run(self) -> None:
        while not self._stop_event.is_set():
            for line in self._query(["--query-compute-apps=pid,used_memory"]).splitlines():
                try:
                    pid, mib = (int(float(x)) for x in line.split(","))
                except ValueError:
                    continue
                self.per_pid[pid] = max(self.per_pid.get(pid, 0), mib * 2**20)
            used = self._query(["--query-gpu=memory.used"]).strip().splitlines()
            if used:
                try:
                    total = int(float(used[0])) * 2**20
                except ValueError:
                    total = None
                if total is not None:
                    if self.device_baseline is None:
                        self.device_baseline = total
                    if self.current is not None:
                        self.per_pid_device[self.current] = max(self.per_pid_device.get(self.current, 0),
                                                                total - self.device_baseline)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def peak_for(self, pid: int | None) -> tuple[int | None, str | None]:
        if pid in self.per_pid:
            return self.per_pid[pid], "nvidia-smi per-process used memory (peak of 0.2 s samples)"
        if pid in self.per_pid_device:
            return self.per_pid_device[pid], "nvidia-smi device memory used above the baseline while this engine ran"
        return None, None
