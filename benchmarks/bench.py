"""`sdedge bench`: time a bundle (or several) against diffusers' eager pipeline on the same weights, prompts,
seeds and initial latents, and write report.json / report.md / report.png / samples.png.

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
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from sdedge.runtime.environment import cpu_model, package_versions
from sdedge.runtime.errors import BadInput, SdedgeError

from .suite import (
    DEFAULT_PROMPTS,
    EngineSpec,
    ReferenceSpec,
    Settings,
    Suite,
    SuiteError,
    check_inputs,
    validate_suite,
)

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

STAGES = ("tokenize", "text_encoder", "unet", "vae_decoder", "other")
PSNR_CAP = 999.0
REPLY_PREFIX = "@@sdedge-bench "
VERSION_PACKAGES = ("sdedge", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "torch", "diffusers",
                    "transformers", "numpy")


class BenchError(SdedgeError):
    """A benchmark that cannot run or whose worker failed; the message names the engine and the cause."""


# == image metrics ==========================================================================================
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two float images in [0, 1]; identical images give PSNR_CAP (JSON has no infinity)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10.0 * float(np.log10(1.0 / mse)))


def _gaussian(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _filter(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of (H, W, ...) by the 1-D window w on both axes."""
    k = len(w)
    h, wd = img.shape[:2]
    rows = sum(w[i] * img[i : h - k + 1 + i] for i in range(k))
    return sum(w[i] * rows[:, i : wd - k + 1 + i] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004) of two images (H, W) or (H, W, C) in [0, data_range].

    Gaussian window 11×11 with σ = 1.5 (smaller for images under 11 px), 'valid' filtering, K1 = 0.01,
    K2 = 0.03, computed per channel and averaged. Identical images give exactly 1.0.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise BadInput(f"ssim: images of different shapes {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    size = min(11, a.shape[0], a.shape[1])
    size -= 1 - size % 2  # odd
    w = _gaussian(size, 1.5 * size / 11)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter(a, w), _filter(b, w)
    s_aa = _filter(a * a, w) - mu_a * mu_a
    s_bb = _filter(b * b, w) - mu_b * mu_b
    s_ab = _filter(a * b, w) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (s_aa + s_bb + c2)
    return float(np.mean(num / den))


def summarize(values) -> dict[str, float] | None:
    """min / median / p95 (linear interpolation) / max / mean of a list of numbers; None when empty."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return None
    return {"n": int(v.size), "min": float(v.min()), "median": float(np.median(v)),
            "p95": float(np.percentile(v, 95)), "max": float(v.max()), "mean": float(v.mean())}


# == the machine ============================================================================================
def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in have]
    except OSError:
        pass
    return []


def _gpus() -> list[dict[str, Any]]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=False, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            try:
                gpus.append({"name": parts[0], "driver": parts[1], "memory_bytes": int(float(parts[2]) * 2**20)})
            except ValueError:
                continue
    return gpus


def _git(repo: Path) -> dict[str, Any] | None:
    if not (repo / ".git").exists() or not shutil.which("git"):
        return None
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=False, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)} if commit else None


def _load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (other work on the machine skews every timing)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def describe_machine() -> dict[str, Any]:
    """CPU model, cores, memory, GPUs, OS, Python, package versions and the sdedge git commit."""
    try:
        import psutil

        physical, memory = psutil.cpu_count(logical=False), int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - informational
        physical, memory = None, None
    versions = package_versions(VERSION_PACKAGES)
    return {
        "cpu": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "memory_bytes": memory,
        "gpus": _gpus(),
        "load_average": _load_average(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git": _git(Path(__file__).resolve().parents[1]),
    }


def machine_slug(machine: dict[str, Any], device: str) -> str:
    """A short folder-safe name of the machine: the GPU's on a GPU run, else the CPU's and its core count."""
    name = machine["gpus"][0]["name"] if device != "cpu" and machine.get("gpus") else machine.get("cpu") or "machine"
    name = re.sub(r"\((R|TM)\)|CPU|Processor|@.*$|\bIntel\b|\bAMD\b|\bNVIDIA\b", "", name, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "machine"
    return slug if device != "cpu" else f"{slug}-{machine.get('logical_cores')}c"


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


# == workers (run in the child process, or inline) ===========================================================
def _peak_rss() -> int:
    """This process's peak RSS. On Linux, VmHWM of /proc/self/status: the high-water mark of this program's
    own address space. (getrusage's ru_maxrss survives fork + exec, so a child started by a large parent
    would report at least the parent's size.) Elsewhere, sdedge.runtime.memory.peak_rss_bytes."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    from sdedge.runtime.memory import peak_rss_bytes

    return peak_rss_bytes()


class _SdedgeWorker:
    """The PyTorch-free runtime on a bundle."""

    def __init__(self, spec: dict, settings: dict):
        self.spec, self.settings = spec, settings
        self.pipe = None

    def load(self) -> dict:
        t0 = time.perf_counter()
        from sdedge.runtime.pipeline import Pipeline

        t1 = time.perf_counter()
        s = self.settings
        kw = {"device": self.spec["device"], "memory": self.spec["memory"], "threads": self.spec["threads"],
              "verify": self.spec["verify"]}
        if self.spec.get("backend", "auto") != "auto":
            kw["backend"] = self.spec["backend"]
        self.pipe = Pipeline.load(self.spec["bundle"], **kw)
        t2 = time.perf_counter()
        m = self.pipe.manifest
        prov = m.provenance
        return {
            "import_seconds": t1 - t0,
            "load_seconds": t2 - t1,
            "component_load_seconds": dict(self.pipe.load_seconds),
            "backend": self.pipe.backend,
            "backend_reason": getattr(self.pipe, "backend_reason", ""),
            "precision": m.precision.value,
            "signed": bool(getattr(self.pipe, "signer", None)),
            "provenance": {"base_id": prov.base.id, "base_sha256": prov.base.sha256, "quantisation": prov.quantisation,
                           "prune_ratio": prov.prune_ratio, "adapters": len(prov.adapters)},
            "scheduler": s["scheduler"],
            "peak_rss_bytes": _peak_rss(),
        }

    def run(self, req: dict) -> dict:
        s = self.settings
        latents = np.load(req["latents"])
        t0 = time.perf_counter()
        r = self.pipe.generate(s["prompt_list"][req["prompt_index"]], s["negative"], steps=s["steps"],
                               guidance=s["guidance"], scheduler=s["scheduler"], width=s["size"], height=s["size"],
                               num_images=s["batch"], latents=latents)
        wall = time.perf_counter() - t0
        stages = {k: float(r.timings.get(k, 0.0)) for k in STAGES if k != "other"}
        stages["other"] = max(0.0, wall - sum(stages.values()))
        if req.get("image"):
            np.save(req["image"], r.images.astype(np.float32))
        return {"seconds": wall, "stages": stages, "step_seconds": [float(x) for x in r.step_times],
                "peak_rss_bytes": _peak_rss()}

    def final(self) -> dict:
        return {"peak_rss_bytes": _peak_rss(), "peak_gpu_allocated_bytes": None}

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None


class _DiffusersWorker:
    """diffusers' eager StableDiffusionPipeline, with hooks timing each stage."""

    def __init__(self, spec: dict, settings: dict):
        self.spec, self.settings = spec, settings
        self.pipe = None
        self.rec: dict[str, Any] = {}

    def load(self) -> dict:
        t0 = time.perf_counter()
        import torch
        from sdedge.export.bases import load_base
        from sdedge.export.reference import diffusers_scheduler

        t1 = time.perf_counter()
        self.torch = torch
        self.make_scheduler = diffusers_scheduler
        self.threads_before = torch.get_num_threads()  # restored at close (inline mode shares the process)
        torch.set_num_threads(self.spec["threads"])
        device = self.spec["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise BenchError("reference: device cuda asked for, but this torch build sees no CUDA GPU")
        self.device = device
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.spec["dtype"]]
        pipe = load_base(self.spec["base"])
        if self.dtype != torch.float32 or device != "cpu":
            pipe = pipe.to(device=device, dtype=self.dtype)
        pipe.set_progress_bar_config(disable=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t2 = time.perf_counter()
        self.pipe = pipe
        self._instrument()
        return {
            "import_seconds": t1 - t0,
            "load_seconds": t2 - t1,
            "component_load_seconds": {},
            "backend": f"torch-eager:{device}",
            "backend_reason": "the PyTorch reference",
            "precision": self.spec["dtype"],
            "signed": False,
            "provenance": None,
            "scheduler": self.settings["scheduler"],
            "peak_rss_bytes": _peak_rss(),
        }

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _instrument(self) -> None:
        rec, pipe, clock = self.rec, self.pipe, time.perf_counter

        def pre(name):
            def hook(module, args):
                self._sync()
                rec[f"{name}_t0"] = clock()
                if name == "unet":
                    rec["step_starts"].append(rec["unet_t0"])
            return hook

        def post(name):
            def hook(module, args, output):
                self._sync()
                rec[name] += clock() - rec[f"{name}_t0"]
            return hook

        for name in ("text_encoder", "unet"):
            module = getattr(pipe, name)
            module.register_forward_pre_hook(pre(name))
            module.register_forward_hook(post(name))
        decode = pipe.vae.decode

        def timed_decode(*args, **kwargs):
            self._sync()
            t = clock()
            rec["vae_start"] = t
            try:
                return decode(*args, **kwargs)
            finally:
                self._sync()
                rec["vae_decoder"] += clock() - t

        pipe.vae.decode = timed_decode
        tok = pipe.tokenizer
        try:
            base_cls = type(tok)

            def call(this, *args, **kwargs):
                t = clock()
                try:
                    return base_cls.__call__(this, *args, **kwargs)
                finally:
                    rec["tokenize"] += clock() - t

            tok.__class__ = type(base_cls.__name__, (base_cls,), {"__call__": call})
            self.tokenizer_timed = True
        except TypeError:  # pragma: no cover - a tokenizer class that refuses it: its time lands in "other"
            self.tokenizer_timed = False

    def run(self, req: dict) -> dict:
        torch, s = self.torch, self.settings
        lat = torch.from_numpy(np.load(req["latents"])).to(device=self.device, dtype=self.dtype)
        prompt = s["prompt_list"][req["prompt_index"]]
        b = lat.shape[0]
        self.pipe.scheduler = self.make_scheduler(s["scheduler"], s["scheduler_config"])
        self.rec.clear()
        self.rec.update(tokenize=0.0, text_encoder=0.0, unet=0.0, vae_decoder=0.0, step_starts=[], vae_start=None)
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe([prompt] * b, negative_prompt=[s["negative"]] * b, num_inference_steps=s["steps"],
                            guidance_scale=s["guidance"], latents=lat, height=s["size"], width=s["size"],
                            output_type="np")
        self._sync()
        t_end = time.perf_counter()
        wall = t_end - t0
        images = np.asarray(out.images, dtype=np.float32)
        starts = self.rec["step_starts"]
        ends = starts[1:] + [self.rec["vae_start"] or t_end]
        steps = [e - a for a, e in zip(starts, ends)]
        stages = {"tokenize": self.rec["tokenize"], "text_encoder": self.rec["text_encoder"], "unet": float(sum(steps)),
                  "vae_decoder": self.rec["vae_decoder"]}
        stages["other"] = max(0.0, wall - sum(stages.values()))
        if req.get("image"):
            np.save(req["image"], images)
        return {"seconds": wall, "stages": stages, "step_seconds": steps, "peak_rss_bytes": _peak_rss()}

    def final(self) -> dict:
        gpu = None
        if self.device == "cuda":
            gpu = int(self.torch.cuda.max_memory_allocated())
        return {"peak_rss_bytes": _peak_rss(), "peak_gpu_allocated_bytes": gpu}

    def close(self) -> None:
        self.pipe = None
        if hasattr(self, "threads_before"):
            self.torch.set_num_threads(self.threads_before)


def _make_worker(role: str, spec: dict, settings: dict):
    return _DiffusersWorker(spec, settings) if role == "reference" else _SdedgeWorker(spec, settings)


def _handle(worker_box: list, msg: dict) -> dict:
    """One protocol message → its reply (shared by the child process and inline mode)."""
    op = msg.get("op")
    try:
        if op == "init":
            worker_box[:] = [_make_worker(msg["role"], msg["spec"], msg["settings"])]
            return {"ok": True, **worker_box[0].load()}
        if op == "run":
            return {"ok": True, **worker_box[0].run(msg)}
        if op == "final":
            return {"ok": True, **worker_box[0].final()}
        if op == "close":
            if worker_box:
                worker_box[0].close()
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}", "user_error": False}
    except SdedgeError as exc:
        return {"ok": False, "error": str(exc), "user_error": True}
    except Exception as exc:  # noqa: BLE001 - reported to the parent with its traceback
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                "user_error": False}


def worker_main() -> int:
    """The child process: JSON requests on stdin, one prefixed JSON reply line each on the original stdout.
    Everything else anything prints goes to stderr (the parent's log file for this engine)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    box: list = []
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg.get("op") == "exit":
            break
        reply = _handle(box, msg)
        proto.write(REPLY_PREFIX + json.dumps(reply) + "\n")
    return 0


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
            self.proc = subprocess.Popen([sys.executable, "-m", "sdedge.benchmarks.bench", "--worker"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                         env=env, bufsize=1)
            self.pid = self.proc.pid
        else:
            self.pid = os.getpid()
        self.info = self.call({"op": "init", "role": self.role, "spec": self.spec, "settings": self.settings})
        self.cold_start_seconds = time.perf_counter() - t0

    def call(self, msg: dict) -> dict:
        if self.proc is None:
            reply = _handle(self.box, msg)
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
                _handle(self.box, {"op": "close"})
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

    try:
        report = _build_report(suite, engines, s, size, machine, created, notes, poller)
        if clip_model:
            _add_clip(report, engines, s, clip_model, console)
        else:
            report["clip"] = {"model": None, "skipped": "no --clip-model given"}
        samples = _save_samples(report, engines, out)
        report_mod.write_report(report, out, samples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


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
            "kind": "diffusers" if e.role == "reference" else "sdedge",
            "path": e.spec.get("base") or e.spec.get("bundle"),
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
            if row["role"] == "reference":
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
    machine = {**machine, "load_average_after": _load_average()}
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


def clip_scores(model_dir: str | Path, images: dict[str, list[np.ndarray]], prompts: list[str]) -> dict[str, list[float]]:
    """CLIP score 100 · max(cos(image embedding, prompt embedding), 0) of each image (per engine, per run, per
    image in the batch) with a local CLIP model folder (transformers' CLIPModel + its processor)."""
    try:
        import torch
        from PIL import Image
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as exc:
        raise BenchError(f"the CLIP score needs torch and transformers ({exc})") from None
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - an older transformers
        pass
    try:
        model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a skip with its reason
        raise BenchError(f"cannot load the CLIP model at {model_dir}: {exc}") from None
    out: dict[str, list[float]] = {}
    for name, runs in images.items():
        pil, texts = [], []
        for r, batch in enumerate(runs):
            for img in batch:
                pil.append(Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)))
                texts.append(prompts[r])
        with torch.no_grad():
            inputs = processor(text=texts, images=pil, return_tensors="pt", padding=True, truncation=True)
            res = model(**inputs)
            a = torch.nn.functional.normalize(res.image_embeds, dim=-1)
            b = torch.nn.functional.normalize(res.text_embeds, dim=-1)
            cos = (a * b).sum(-1)
        out[name] = [float(100 * max(c, 0.0)) for c in cos.tolist()]
    return out


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
                threads: int | None = None) -> dict:
    """A short bench of one bundle against its base (the quickstart's last step: a few seconds on tiny).

    Runs inline (this process) by default, so no interpreter or torch import is paid again; peak RSS is then
    the shared process's and the report says so. Returns the report dict; files are written to out_dir.
    """
    settings = Settings(runs=runs, warmup=warmup, steps=steps, size=size, prompts=DEFAULT_PROMPTS[:2],
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


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        raise SystemExit(worker_main())
    from sdedge.cli import main

    raise SystemExit(main(["bench", *sys.argv[1:]]))
