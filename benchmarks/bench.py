"""`sdedge bench`: time a bundle (or several) against diffusers' eager pipeline on the same weights, prompts,
seeds and initial latents, and write report.json / report.md / report.png / samples.png.

This module orchestrates; the engines run in workers.py, the image metrics are in metrics.py, the machine's
description in machine.py, the report's schema and files in report.py, suites in suite.py.

How it measures (what makes the figures honest):
- Each engine runs in its own child process (`isolation: process`, the default), so its peak RSS is its
  own and no engine inherits another's imports or allocator state. The parent only orchestrates: it never
  imports torch or onnxruntime while engines run. (`isolation: inline` runs everything in this process, for
  the quickstart's few-second bench: peak RSS is then the shared process's and is marked so.)
- Cold start is measured apart from image times: `cold_start_seconds` (process start, imports and model
  load, as the parent sees it), with the child's own split into `import_seconds` and `load_seconds` (and the
  runtime's load time per component). The first (warm-up) image is reported as `first_image_seconds`.
- `warmup` untimed images per engine, then `runs` timed images. With `interleave: true` (default) all
  workers stay loaded and the rounds alternate between them, reference first, and the order is reversed
  every other round (ABBA), so slow drifts of the machine (other tenants, heat) hit every engine alike.
  Run r uses prompts[r % len(prompts)], seed + r and initial latents drawn once by the parent from that seed
  (NumPy's default_rng(seed).standard_normal) and handed to every engine as the same array.
- Per call: wall seconds, and per stage tokenize, text_encoder, unet (the denoising loop: every step's
  UNet call, guidance and scheduler step, each step timed), vae_decoder, other (the rest of the wall time).
  diffusers' stages come from hooks on its modules (forward hooks on the text encoder and UNet, a wrapper on
  vae.decode and on the tokenizer's __call__), with CUDA synchronised inside them on a GPU.
- Summary per engine: min / median / p95 / max / mean seconds per image, images per minute (from the
  median), median per stage, per-UNet-step statistics, peak RSS (the child's getrusage high-water mark), and
  on a GPU the peak device memory (torch's allocator for diffusers; nvidia-smi's per-process figure, polled
  by the parent, for every engine).
- With a reference: the time ratio reference/engine for every run pair (> 1: the engine is faster), and
  PSNR (dB, capped at 999 for identical images) and SSIM (Gaussian 11×11, σ 1.5, per channel, data range 1)
  of every engine image against the reference image of the same run. `clip_model` adds a CLIP score
  (100 · max(cos(image, prompt), 0)) per image when that local CLIP model exists.
- Target: the `target_statistic` (default median) of seconds per image of each engine, held against
  `target_seconds`; the verdict is PASS only when every engine (not the reference) meets it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from sdedge.runtime.errors import SdedgeError

from .machine import describe_machine, load_average, machine_slug
from .metrics import clip_scores, psnr, ssim, summarize
from .suite import (
    DEFAULT_PROMPTS,
    BenchError,
    EngineSpec,
    ReferenceSpec,
    Settings,
    Suite,
    SuiteError,
    check_inputs,
    validate_suite,
)
from .report import STAGES
from .worker_process import REPLY_PREFIX, handle

__all__ = [
    "STAGES",
    "BenchError",
    "check_reference",
    "describe_machine",
    "psnr",
    "quick_bench",
    "run_bench",
    "ssim",
    "summarize",
]




# == architecture check ========================================================================================
def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchError(f"reference {path.parent.parent}: {path.relative_to(path.parent.parent)} is missing "
                         f"(not a diffusers Stable Diffusion folder; need {what})") from None
    except (OSError, ValueError) as exc:
        raise BenchError(f"{path}: unreadable ({exc})") from None


def _last_dim(info, tensor: str) -> int | None:
    for t in (*info.inputs, *info.outputs):
        if t.name == tensor and t.shape and isinstance(t.shape[-1], int):
            return t.shape[-1]
    return None


def check_reference(manifest, bundle_dir: str | Path, base_dir: str | Path) -> list[str]:
    """Refuse a reference base of another architecture than the bundle's; return notes (e.g. other weights).

    Compared from the files alone (no model loaded): the UNet's cross-attention dim and the text encoder's
    hidden size against the bundle's encoder_hidden_states / last_hidden_state, the latent channels and the
    VAE scale factor. Different weights of the same architecture are allowed, with a note: the parity
    figures then compare different models.
    """
    base = Path(base_dir)
    if base.is_file():
        raise BenchError(f"reference {base}: a single-file checkpoint; bench's reference must be a diffusers folder "
                         "(write one with `sdedge base` or diffusers' save_pretrained)")
    if not (base / "model_index.json").is_file():
        raise BenchError(f"reference {base}: not a diffusers folder (no model_index.json)")
    unet = _read_json(base / "unet" / "config.json", "unet/config.json")
    vae = _read_json(base / "vae" / "config.json", "vae/config.json")
    text = _read_json(base / "text_encoder" / "config.json", "text_encoder/config.json")
    comps = manifest.components
    cross = unet.get("cross_attention_dim")
    cross = cross[0] if isinstance(cross, list) and cross else cross
    checks = [
        ("cross-attention dim", cross, "unet/config.json cross_attention_dim",
         _last_dim(comps["unet"], "encoder_hidden_states"), "unet input encoder_hidden_states"),
        ("text encoder hidden size", text.get("hidden_size"), "text_encoder/config.json hidden_size",
         _last_dim(comps["text_encoder"], "last_hidden_state"), "text_encoder output last_hidden_state"),
        ("latent channels", unet.get("in_channels"), "unet/config.json in_channels",
         manifest.latent.channels, "latent.channels"),
        ("latent channels", vae.get("latent_channels"), "vae/config.json latent_channels",
         manifest.latent.channels, "latent.channels"),
        ("VAE scale factor", 2 ** (len(vae.get("block_out_channels", [])) - 1) if vae.get("block_out_channels") else None,
         "vae/config.json block_out_channels", manifest.latent.vae_scale_factor, "latent.vae_scale_factor"),
    ]
    wrong = [f"{label} {b} in the base ({bwhere}) but {m} in the bundle ({mwhere})"
             for label, b, bwhere, m, mwhere in checks if b is not None and m is not None and b != m]
    if wrong:
        raise BenchError(f"reference {base} is not the architecture of bundle {bundle_dir}: " + "; ".join(wrong)
                         + ". Pass the base the bundle was exported from.")
    notes = []
    from sdedge.export.bases import describe_base  # hashing only; no torch at import

    sha = describe_base(base)["sha256"]
    prov = manifest.provenance
    if sha != prov.base.sha256:
        notes.append(f"reference {base} has other weights than bundle {bundle_dir}'s base {prov.base.id} "
                     f"(sha256 {sha[:12]}… vs {prov.base.sha256[:12]}…): PSNR/SSIM compare different models")
    if prov.adapters:
        notes.append(f"bundle {bundle_dir} has {len(prov.adapters)} adapter(s) fused in; the reference base has "
                     "none, so PSNR/SSIM measure the adapters' effect as well as the engine's error")
    return notes


# == parent side: engines as processes or inline ===============================================================
class _Engine:
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


class _GpuPoller(threading.Thread):
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


# == orchestration ===========================================================================================
def _engine_settings(settings: Settings, size: int, scheduler_config: dict) -> dict:
    return {"prompt_list": list(settings.prompts), "negative": settings.negative, "steps": settings.steps,
            "guidance": settings.guidance, "scheduler": settings.scheduler, "size": size, "batch": settings.batch,
            "scheduler_config": scheduler_config}


def _threads(spec_threads: int | None, settings: Settings) -> int:
    return spec_threads or settings.threads or os.cpu_count() or 1


def _prepare_engines(suite: Suite) -> tuple[list[tuple[str, str, dict]], dict, int, list[str]]:
    """Validate the inputs against each other; return (name, role, spec) per engine, the first manifest,
    the image size, and notes."""
    from sdedge.runtime.manifest import read_manifest

    s = suite.settings
    notes: list[str] = []
    manifests = {}
    for e in suite.engines:
        try:
            manifests[e.name] = read_manifest(Path(e.bundle))
        except SdedgeError as exc:
            raise BenchError(f"engine {e.name!r}: {exc}") from None
    first = manifests[suite.engines[0].name]
    size = s.size or first.shapes.default_height
    for e in suite.engines:
        m = manifests[e.name]
        sh = m.shapes
        if size % sh.pixel_multiple or not (sh.height_min <= size <= sh.height_max and sh.width_min <= size <= sh.width_max):
            raise BenchError(f"engine {e.name!r}: size {size} is outside what bundle {e.bundle} accepts "
                             f"({sh.width_min}–{sh.width_max} px, multiple of {sh.pixel_multiple})")
        per_call = s.batch * (2 if s.guidance > 1 else 1)
        if per_call > sh.batch_max:
            raise BenchError(f"engine {e.name!r}: batch {s.batch} needs {per_call} UNet samples per call; bundle "
                             f"{e.bundle} accepts at most {sh.batch_max}")
        if (m.latent.channels, m.latent.vae_scale_factor) != (first.latent.channels, first.latent.vae_scale_factor):
            raise BenchError(f"engine {e.name!r}: latents of {m.latent.channels} channels at 1/{m.latent.vae_scale_factor} "
                             f"scale, unlike {suite.engines[0].name!r}: they cannot share initial latents")
    out: list[tuple[str, str, dict]] = []
    if suite.reference is not None:
        r = suite.reference
        for e in suite.engines:
            for note in check_reference(manifests[e.name], e.bundle, r.base):
                if note not in notes:
                    notes.append(note)
        out.append((r.name, "reference", {"base": r.base, "dtype": r.dtype, "device": r.device or s.device,
                                          "threads": _threads(r.threads, s)}))
    for e in suite.engines:
        out.append((e.name, "engine", {"bundle": e.bundle, "backend": e.backend, "memory": e.memory,
                                       "device": e.device or s.device, "threads": _threads(e.threads, s),
                                       "verify": e.verify}))
    for p in suite.peers:
        out.append((p.name, "peer", {"kind": p.kind, "model": p.model, "python": p.python, "device": "cpu",
                                     "threads": _threads(p.threads, s), "static_shapes": p.static_shapes}))
    return out, first, size, notes


def _progress(console, enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(TextColumn("[bold]bench[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, disable=not enabled, transient=False)


def run_bench(suite: Suite, out_dir: str | os.PathLike, *, console=None, progress: bool = True,
              clip_model: str | None = None) -> dict:
    """Run a resolved suite (absolute paths; see suite.resolve_suite), write the report files into out_dir,
    and return the report dict (schema: sdedge.benchmarks.report.SCHEMA)."""
    from rich.console import Console

    from . import report as report_mod

    validate_suite(suite)
    check_inputs(suite)
    console = console or Console(stderr=True, soft_wrap=True)
    s = suite.settings
    specs, manifest, size, notes = _prepare_engines(suite)
    clip_model = clip_model or suite.clip_model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    machine = describe_machine()
    settings_for_worker = _engine_settings(s, size, dict(manifest.scheduler))
    work = Path(tempfile.mkdtemp(prefix="sdedge-bench-"))
    try:  # the scratch folder goes however the run ends (a worker that fails to start included)
        engines = [_Engine(name, role, spec, settings_for_worker, s.isolation, work) for name, role, spec in specs]
        devices = {spec.get("device") for _, _, spec in specs}
        poller = _GpuPoller() if devices & {"cuda", "auto"} and _GpuPoller.available() else None
        lat_shape = (s.batch, manifest.latent.channels, size // manifest.latent.vae_scale_factor,
                     size // manifest.latent.vae_scale_factor)
        latents = []
        for r in range(s.runs):
            path = work / f"latents-{r}.npy"
            np.save(path, np.random.default_rng(s.seed + r).standard_normal(lat_shape, dtype=np.float32))
            latents.append(path)

        def request(e: _Engine, r: int, warmup: bool) -> dict:
            if poller is not None:
                poller.current = e.pid
            req = {"op": "run", "prompt_index": r % len(s.prompts), "latents": str(latents[r]),
                   "image": None if warmup else str(work / f"{len(engines)}-{engines.index(e)}-{r}.npy")}
            reply = e.call(req)
            (e.warmups if warmup else e.runs).append(reply)
            if not warmup:
                e.images.append(np.load(req["image"]))
            return reply

        total = len(engines) * (s.warmup + s.runs)
        try:
            if poller is not None:
                poller.start()
            with _progress(console, progress) as bar:
                task = bar.add_task("starting", total=total)
                order_groups = [engines] if s.interleave else [[e] for e in engines]
                for group in order_groups:
                    for e in group:
                        bar.update(task, description=f"loading {e.name}")
                        if poller is not None:
                            poller.current = e.pid
                        e.start()
                    for w in range(s.warmup):
                        for e in group:
                            bar.update(task, description=f"warm-up {w + 1}/{s.warmup} {e.name}")
                            request(e, 0, warmup=True)
                            bar.advance(task)
                    for r in range(s.runs):
                        for e in group if r % 2 == 0 else list(reversed(group)):
                            bar.update(task, description=f"run {r + 1}/{s.runs} {e.name}")
                            request(e, r, warmup=False)
                            bar.advance(task)
                    for e in group:
                        e.final = e.call({"op": "final"})
                        if not s.interleave:
                            e.stop()
                bar.update(task, description="done")
        finally:
            if poller is not None:
                poller.stop()
            for e in engines:
                try:
                    e.stop()
                except Exception:  # noqa: BLE001, S110 - best effort on the way out; the first error is raised
                    pass

        report = _build_report(suite, engines, s, size, machine, created, notes, poller)
        if clip_model:
            _add_clip(report, engines, s, clip_model, console)
        else:
            report["clip"] = {"model": None, "skipped": "no --clip-model given"}
        _add_shape_scores(report, engines, s)
        samples = _save_samples(report, engines, out)
        report_mod.write_report(report, out, samples)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_report(suite: Suite, engines: list[_Engine], s: Settings, size: int, machine: dict, created: str,
                  notes: list[str], poller: _GpuPoller | None) -> dict:
    from . import report as report_mod

    ref = next((e for e in engines if e.role == "reference"), None)
    rows = []
    for e in engines:
        per_image = [r["seconds"] / s.batch for r in e.runs]
        seconds = summarize(per_image)
        stage_median = {k: float(np.median([r["stages"][k] for r in e.runs])) for k in STAGES}
        steps = [x for r in e.runs for x in r["step_seconds"]]
        gpu_bytes, gpu_method = (poller.peak_for(e.pid) if poller is not None else (None, None))
        if e.final.get("peak_gpu_allocated_bytes") is not None:
            gpu_bytes, gpu_method = e.final["peak_gpu_allocated_bytes"], "torch.cuda.max_memory_allocated"
        first = (e.warmups or e.runs)[0]["seconds"]
        entry = {
            "name": e.name,
            "role": e.role,
            "kind": {"reference": "diffusers", "peer": e.spec.get("kind")}.get(e.role, "sdedge"),
            "path": e.spec.get("base") or e.spec.get("bundle") or e.spec.get("model"),
            "backend": e.info.get("backend"),
            "backend_reason": e.info.get("backend_reason") or "",
            "precision": e.info.get("precision"),
            "device": e.spec.get("device"),
            "threads": e.spec.get("threads"),
            "memory_mode": e.spec.get("memory"),
            "signed": bool(e.info.get("signed")),
            "provenance": e.info.get("provenance"),
            "load": {
                "cold_start_seconds": e.cold_start_seconds,
                "import_seconds": e.info.get("import_seconds"),
                "load_seconds": e.info.get("load_seconds"),
                "components": e.info.get("component_load_seconds") or {},
                "first_image_seconds": first,
            },
            "warmup_seconds": [w["seconds"] for w in e.warmups],
            "runs": [{"index": i, "prompt_index": i % len(s.prompts), "seed": s.seed + i, "seconds": r["seconds"],
                      "stages": r["stages"], "step_seconds": r["step_seconds"]} for i, r in enumerate(e.runs)],
            "seconds_per_image": seconds,
            "images_per_minute": 60.0 / seconds["median"] if seconds["median"] > 0 else None,
            "stages_median_seconds": stage_median,
            "unet_step_seconds": summarize(steps),
            "memory": {
                "peak_rss_bytes": int(e.final.get("peak_rss_bytes") or max(r["peak_rss_bytes"] for r in e.runs)),
                "rss_scope": "own process" if e.proc is not None else "shared process (inline)",
                "peak_gpu_bytes": gpu_bytes,
                "gpu_method": gpu_method,
            },
            "speedup_vs_reference": None,
            "parity": None,
            "clip_score": None,
        }
        if ref is not None and e is not ref:
            pairs = [{"run": i, "reference_seconds": a["seconds"], "engine_seconds": b["seconds"],
                      "ratio": a["seconds"] / b["seconds"]} for i, (a, b) in enumerate(zip(ref.runs, e.runs))]
            entry["speedup_vs_reference"] = {"pairs": pairs, "median": float(np.median([p["ratio"] for p in pairs]))}
            images = []
            for i, (a, b) in enumerate(zip(ref.images, e.images)):
                for j in range(a.shape[0]):
                    images.append({"run": i, "image": j, "psnr_db": psnr(b[j], a[j]), "ssim": ssim(b[j], a[j])})
            entry["parity"] = {"against": ref.name, "images": images,
                               "psnr_db": summarize(x["psnr_db"] for x in images),
                               "ssim": summarize(x["ssim"] for x in images)}
        rows.append(entry)

    target = None
    if s.target_seconds is not None:
        per, verdict_ok = {}, True
        for row in rows:
            if row["role"] != "engine":  # the reference and the peers are what sdedge is held against
                continue
            value = row["seconds_per_image"][s.target_statistic]
            ok = value <= s.target_seconds
            verdict_ok &= ok
            per[row["name"]] = {"seconds": value, "pass": ok}
        lines = [f"{name}: {s.target_statistic} {v['seconds']:.3f} s per image "
                 f"{'≤' if v['pass'] else '>'} target {s.target_seconds:g} s" for name, v in per.items()]
        verdict = "pass" if verdict_ok else "fail"
        target = {"seconds": s.target_seconds, "statistic": s.target_statistic, "verdict": verdict,
                  "engines": per, "statement": f"{verdict.upper()}: " + "; ".join(lines)}
    machine = {**machine, "load_average_after": load_average()}
    load, cores = machine.get("load_average"), machine.get("logical_cores") or 1
    if load and load[0] > 0.75 * cores:
        notes = [*notes, (f"the machine was busy when the bench started (1-minute load average {load[0]:g} on "
                          f"{cores} logical cores): other work competes for the CPU, so times are inflated and noisy")]
    return {
        "schema_version": report_mod.SCHEMA_VERSION,
        "kind": "sdedge-bench",
        "created": created,
        "suite": {"name": suite.name, "file": suite.file, "description": suite.description},
        "machine": machine,
        "settings": {
            "runs": s.runs, "warmup": s.warmup, "steps": s.steps, "width": size, "height": size,
            "guidance": s.guidance, "scheduler": s.scheduler, "prompts": list(s.prompts), "negative": s.negative,
            "seed": s.seed, "batch": s.batch, "device": s.device, "interleave": s.interleave,
            "isolation": s.isolation,
        },
        "reference": ref.name if ref is not None else None,
        "target": target,
        "engines": rows,
        "clip": None,
        "notes": list(notes),
        "files": {},
    }


def _add_clip(report: dict, engines: list[_Engine], s: Settings, model: str, console) -> None:
    path = Path(model)
    if not (path / "config.json").is_file():
        msg = f"CLIP score skipped: no local CLIP model at {path}"
        console.print(msg, style="yellow", markup=False)
        report["clip"] = {"model": str(path), "skipped": msg}
        report["notes"].append(msg)
        return
    try:
        scores = clip_scores(path, {e.name: e.images for e in engines}, [s.prompts[i % len(s.prompts)]
                                                                         for i in range(s.runs)])
    except SdedgeError as exc:
        msg = f"CLIP score skipped: {exc}"
        console.print(msg, style="yellow", markup=False)
        report["clip"] = {"model": str(path), "skipped": msg}
        report["notes"].append(msg)
        return
    report["clip"] = {"model": str(path), "skipped": None}
    for row in report["engines"]:
        per = scores[row["name"]]
        row["clip_score"] = {"per_image": per, "mean": float(np.mean(per))}


def _add_shape_scores(report: dict, engines: list[_Engine], s: Settings) -> None:
    """Prompt-match rate and KID from the shapes classifier, when every prompt is a shapes-world caption (the
    trained tiny base's domain); otherwise recorded as skipped."""
    prompts = [s.prompts[i % len(s.prompts)] for i in range(s.runs)]
    from sdedge.tinyworld.shapes import parse_caption

    # checked here, not only in score_engines: shape_score imports torch, which a bench of bundles alone needs not
    if any(parse_caption(p) is None for p in prompts):
        report["shapes"] = {"skipped": "the prompts are not all shapes-world captions ('a red circle on a blue "
                                       "background'), so the tiny base's classifier does not apply",
                            "real_images_per_image": 0}
        return
    from sdedge.tinyworld.classifier import score_engines

    scores = score_engines({e.name: e.images for e in engines}, prompts)
    report["shapes"] = {"skipped": None, "real_images_per_image": scores["real_images_per_image"]}
    for row in report["engines"]:
        row.update(scores["engines"][row["name"]])


def _save_samples(report: dict, engines: list[_Engine], out: Path) -> dict[str, list[np.ndarray]]:
    """PNG of every timed image under out/samples/<engine>/; returns uint8 images per engine for the grid."""
    from PIL import Image

    grid: dict[str, list[np.ndarray]] = {}
    for e, row in zip(engines, report["engines"]):
        folder = out / "samples" / re.sub(r"[^A-Za-z0-9_.-]+", "_", e.name)
        folder.mkdir(parents=True, exist_ok=True)
        files, first = [], []
        for r, batch in enumerate(e.images):
            u8 = (np.clip(batch, 0, 1) * 255).round().astype(np.uint8)
            for j, img in enumerate(u8):
                name = f"run{r}.png" if u8.shape[0] == 1 else f"run{r}-{j}.png"
                Image.fromarray(img).save(folder / name)
                files.append(str((folder / name).relative_to(out)))
            first.append(u8[0])
        row["samples"] = files
        grid[e.name] = first
    return grid


# == convenience ============================================================================================
def quick_bench(bundle_dir: str | os.PathLike, reference_base: str | os.PathLike | None, out_dir: str | os.PathLike,
                runs: int = 2, steps: int = 4, size: int | None = None, warmup: int = 1, *, console=None,
                progress: bool = False, target_seconds: float | None = None, isolation: str = "inline",
                threads: int | None = None, prompts: tuple[str, ...] = DEFAULT_PROMPTS[:2]) -> dict:
    """A short bench of one bundle against its base (the quickstart's last step: a few seconds on tiny).

    Runs inline (this process) by default, so no interpreter or torch import is paid again; peak RSS is then
    the shared process's and the report says so. Returns the report dict; files are written to out_dir.
    """
    settings = Settings(runs=runs, warmup=warmup, steps=steps, size=size, prompts=prompts,
                        isolation=isolation, target_seconds=target_seconds, threads=threads)
    suite = Suite(name="quick", description="quick bench of one bundle against its base", settings=settings,
                  reference=ReferenceSpec(base=str(Path(reference_base).resolve())) if reference_base else None,
                  engines=(EngineSpec(name="sdedge", bundle=str(Path(bundle_dir).resolve())),))
    return run_bench(suite, out_dir, console=console, progress=progress)


def bench_from_args(bundle: str, reference: str | None, *, runs: int = 3, warmup: int = 1, steps: int = 20,
                    size: int | None = None, target_seconds: float | None = None, **settings_kw) -> Suite:
    """The suite a plain `sdedge bench BUNDLE [--reference BASE] ...` runs."""
    if not Path(bundle).exists():
        raise BenchError(f"bundle not found: {bundle}")
    if not (Path(bundle) / "sdedge.json").is_file():
        raise BenchError(f"{bundle}: no sdedge.json; is it an sdedge bundle (made by `sdedge export`)?")
    if reference is not None and not Path(reference).exists():
        raise BenchError(f"reference base not found: {reference}")
    try:
        settings = Settings(runs=runs, warmup=warmup, steps=steps, size=size, target_seconds=target_seconds,
                            **{k: v for k, v in settings_kw.items() if v is not None})
    except TypeError as exc:
        raise SuiteError(str(exc)) from None
    return Suite(name="bench", settings=settings,
                 reference=ReferenceSpec(base=str(Path(reference).resolve())) if reference else None,
                 engines=(EngineSpec(name="sdedge", bundle=str(Path(bundle).resolve())),))


def default_results_dir(suite: Suite, machine: dict | None = None) -> Path:
    """benchmarks/results/<suite>/<date>_<machine>_<commit7> (the layout of benchmarks/results/README.md)."""
    machine = machine or describe_machine()
    git = machine.get("git") or {}
    commit = (git.get("commit") or "nogit")[:7] + ("-dirty" if git.get("dirty") else "")
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    return (Path(__file__).resolve().parent / "results" / suite.name
            / f"{date}_{machine_slug(machine, suite.settings.device)}_{commit}")
