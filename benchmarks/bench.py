"""`sdedge bench`: time a bundle (or several) against diffusers' eager pipeline on the same weights, prompts,
seeds and initial latents, and write report.json / report.md / report.png / samples.png.

This module orchestrates; each engine's process is driven from engines.py and runs workers.py's code (the
protocol: worker_process.py), the report is assembled in assemble.py and written by report.py (its schema and
files), the image metrics are in metrics.py, the machine's description in machine.py, suites in suite.py.

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
  (NumPy's default_rng(seed).standard_normal) and handed to every engine as the same array; the seed also
  draws the noise LCM injects between steps, in sdedge's runtime and in the diffusers workers alike
  (export/reference.py runtime_noise_lcm), so an LCM row's parity measures the engine, not two noise streams.
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
import shutil
import tempfile
from pathlib import Path

import numpy as np

from sdedge.runtime.conditioning import runs_guidance
from sdedge.runtime.errors import SdedgeError

from .assemble import add_clip, add_shape_scores, build_report, save_samples
from .engines import EngineProcess, GpuPoller
from .machine import describe_machine, machine_slug
from .metrics import psnr, ssim, summarize
from .report import STAGES
from .suite import (
    DEFAULT_PROMPTS,
    BenchError,
    EngineSpec,
    ReferenceSpec,
    Settings,
    Suite,
    check_inputs,
    run_settings,
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
        per_call = s.batch * (2 if runs_guidance(s.guidance if e.guidance is None else e.guidance) else 1)
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
            for note in check_reference(manifests[e.name], e.bundle, r.base):  # refuses another architecture
                if e.parity_against is None and note not in notes:  # the notes are about parity vs the reference
                    notes.append(note)
        out.append((r.name, "reference", {"base": r.base, "dtype": r.dtype, "device": r.device or s.device,
                                          "threads": _threads(r.threads, s), "loras": r.loras, "decoder": r.decoder,
                                          "run": run_settings(r)}))
    for e in suite.engines:
        out.append((e.name, "engine", {"bundle": e.bundle, "backend": e.backend, "memory": e.memory,
                                       "device": e.device or s.device, "threads": _threads(e.threads, s),
                                       "verify": e.verify, "public_key": e.public_key, "identity": e.identity,
                                       "issuer": e.issuer, "run": run_settings(e), "parity_against": e.parity_against}))
    for p in suite.peers:
        out.append((p.name, "peer", {"kind": p.kind, "model": p.model, "python": p.python, "device": "cpu",
                                     "threads": _threads(p.threads, s), "static_shapes": p.static_shapes,
                                     "loras": p.loras, "decoder": p.decoder, "run": run_settings(p),
                                     "parity_against": p.parity_against}))
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


def _write_latents(work: Path, s, manifest, size: int) -> list[Path]:
    """One seeded initial-latents file per timed run (run r: seed + r), the same for every engine."""
    lat_shape = (s.batch, manifest.latent.channels, size // manifest.latent.vae_scale_factor,
                 size // manifest.latent.vae_scale_factor)
    latents = []
    for r in range(s.runs):
        path = work / f"latents-{r}.npy"
        np.save(path, np.random.default_rng(s.seed + r).standard_normal(lat_shape, dtype=np.float32))
        latents.append(path)
    return latents


def _run_engines(engines: list[EngineProcess], s, latents: list[Path], work: Path, poller: GpuPoller | None,
                 console, progress: bool) -> None:
    """Start the engines, then their warm-ups and timed runs (alternated ABBA with --interleave, else one engine
    after the other), filling each engine's warmups, runs, images and final; every engine is stopped at the end."""

    def request(e: EngineProcess, r: int, warmup: bool) -> dict:
        if poller is not None:
            poller.current = e.pid
        req = {"op": "run", "prompt_index": r % len(s.prompts), "latents": str(latents[r]), "seed": s.seed + r,
               "image": None if warmup else str(work / f"{len(engines)}-{engines.index(e)}-{r}.npy")}
        reply = e.call(req)
        (e.warmups if warmup else e.runs).append(reply)
        if not warmup:
            e.images.append(np.load(req["image"]))
        return reply

    def warmups(e: EngineProcess) -> int:  # an engine's own (a compile-at-first-use engine's), else the suite's
        return e.spec.get("run", {}).get("warmup", s.warmup)

    total = sum(warmups(e) + s.runs for e in engines)
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
                for w in range(max(map(warmups, group))):
                    for e in (e for e in group if w < warmups(e)):
                        bar.update(task, description=f"warm-up {w + 1}/{warmups(e)} {e.name}")
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
        # each engine's settings: the suite's, with its own steps / scheduler / guidance (a few-step bundle's)
        engines = [EngineProcess(name, role, spec, {**settings_for_worker, **spec.get("run", {})}, s.isolation, work)
                   for name, role, spec in specs]
        devices = {spec.get("device") for _, _, spec in specs}
        poller = GpuPoller() if devices & {"cuda", "auto"} and GpuPoller.available() else None
        latents = _write_latents(work, s, manifest, size)
        _run_engines(engines, s, latents, work, poller, console, progress)

        report = build_report(suite, engines, s, size, machine, created, notes, poller)
        if clip_model:
            add_clip(report, engines, s, clip_model, console)
        else:
            report["clip"] = {"model": None, "skipped": "no --clip-model given"}
        add_shape_scores(report, engines, s)
        samples = save_samples(report, engines, out)
        report_mod.write_report(report, out, samples)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


# == convenience ============================================================================================
def quick_bench(bundle_dir: str | os.PathLike, reference_base: str | os.PathLike | None, out_dir: str | os.PathLike,
                runs: int = 2, steps: int = 4, size: int | None = None, warmup: int = 1, *, console=None,
                progress: bool = False, target_seconds: float | None = None, isolation: str = "inline",
                threads: int | None = None, prompts: tuple[str, ...] = DEFAULT_PROMPTS[:2], backend: str = "auto") -> dict:
    """A short bench of one bundle against its base (the quickstart's last step: a few seconds on tiny).

    Runs inline (this process) by default, so no interpreter or torch import is paid again; peak RSS is then
    the shared process's and the report says so. Returns the report dict; files are written to out_dir.
    """
    settings = Settings(runs=runs, warmup=warmup, steps=steps, size=size, prompts=prompts,
                        isolation=isolation, target_seconds=target_seconds, threads=threads)
    suite = Suite(name="quick", description="quick bench of one bundle against its base", settings=settings,
                  reference=ReferenceSpec(base=str(Path(reference_base).resolve())) if reference_base else None,
                  engines=(EngineSpec(name="sdedge", bundle=str(Path(bundle_dir).resolve()), backend=backend),))
    return run_bench(suite, out_dir, console=console, progress=progress)


def default_results_dir(suite: Suite, machine: dict | None = None) -> Path:
    """benchmarks/results/<suite>/<date>_<machine>_<commit7> (the layout of benchmarks/results/README.md)."""
    machine = machine or describe_machine()
    git = machine.get("git") or {}
    commit = (git.get("commit") or "nogit")[:7] + ("-dirty" if git.get("dirty") else "")
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    return (Path(__file__).resolve().parent / "results" / suite.name
            / f"{date}_{machine_slug(machine, suite.settings.device)}_{commit}")
