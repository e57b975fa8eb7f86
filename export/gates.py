"""Parity, speed and size gates for optimised bundles.

The reference is the fp32 PyTorch/diffusers pipeline of the base (before pruning), run once on the parity
prompt with the parity latents: every UNet call's inputs and output are written to disk (`Reference`), with
the final image. Each optimised bundle is then measured against it:

- UNet raw-output cosine: the optimised UNet engine on the recorded inputs vs the recorded outputs, the mean of
  the per-call cosines over the guided batch (both halves);
- cosine after guidance: the same on `u + g·(c − u)` at the bundle's default guidance g. Guidance magnifies
  the error about g-fold, so this figure, not the raw one, predicts the image;
- final-image PSNR: the runtime pipeline with the optimised bundle, same prompt, scheduler, steps and initial
  latents, against the reference image.

The speed gate times the optimised UNet against the fp32 one on the same backend, same inputs, a few calls each,
interleaved; the size report counts bytes per component (every file of it) before and after.
"""

from __future__ import annotations

import gc
import logging
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdedge.runtime.conditioning import guide, runs_guidance
from sdedge.runtime.manifest import Manifest, SizeReport, SpeedReport

from .onnx_export import ExportError

log = logging.getLogger("sdedge.export")


class GateFailed(ExportError):
    """An optimised bundle missed a parity gate the user set (--min-cosine, --min-psnr)."""


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.dot(a, b) / den) if den > 0 else (1.0 if np.array_equal(a, b) else 0.0)


def guided(out: np.ndarray, guidance: float) -> np.ndarray:
    """u + g·(c − u) of a guided batch (negative half first, as the runtime and diffusers order it). At guidance
    ≤ 1 the runtime and diffusers run no guidance pass, so the batch is the conditional output itself (halving it
    would leave nothing to compare, and every cosine would read 1)."""
    if not runs_guidance(guidance):
        return out.astype(np.float64)
    if out.shape[0] % 2:
        raise ValueError(f"a guided UNet batch of {out.shape[0]}: guidance {guidance} needs negative and positive halves")
    half = out.shape[0] // 2
    return guide(out[:half].astype(np.float64), out[half:].astype(np.float64), guidance)


@dataclass
class Reference:
    """The fp32 reference run: per UNet call an .npz (inputs + `out_sample`), and the final image."""

    files: list[Path]
    image: np.ndarray  # (1, H, W, 3) in [0, 1]
    latents: np.ndarray  # initial latents (1, 4, h, w)
    prompt: str
    steps: int
    guidance: float
    scheduler: str
    size: int

    def samples(self):
        for path in self.files:
            with np.load(path) as data:
                yield {k: data[k] for k in data.files}


def record_reference(pipe, out_dir: Path, *, prompt: str, latents: np.ndarray, steps: int, guidance: float,
                     scheduler: str, scheduler_config: dict) -> Reference:
    """Run diffusers (fp32, PyTorch) once, recording every UNet call's inputs and output to `out_dir`."""
    import torch

    from .reference import reference_images

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    def hook(module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        ehs = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        out = output[0] if isinstance(output, tuple) else output.sample
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        path = out_dir / f"ref-{len(files):03d}.npz"
        added = {k: v.float().numpy() for k, v in (kwargs.get("added_cond_kwargs") or {}).items()}  # SDXL's
        np.savez(path, sample=sample.float().numpy(), timestep=t.numpy().astype(np.float32),
                 encoder_hidden_states=ehs.float().numpy(), out_sample=out.float().numpy(), **added)
        files.append(path)

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        image = reference_images(pipe, prompt, "", latents=latents, steps=steps, guidance=guidance,
                                 scheduler=scheduler, scheduler_config=scheduler_config)
    finally:
        handle.remove()
    return Reference(files=files, image=image, latents=latents, prompt=prompt, steps=steps, guidance=guidance,
                     scheduler=scheduler, size=latents.shape[-1] * pipe.vae_scale_factor)


def unet_parity(engine, reference: Reference, guidance: float) -> tuple[float, float, int]:
    """(mean raw-output cosine, mean cosine after guidance, calls) of `engine` on the reference's UNet calls."""
    raw, gui = [], []
    for i, s in enumerate(reference.samples()):
        ref = s.pop("out_sample")
        out = engine.infer(s)[0]
        if not np.isfinite(out).all():  # a cosine of NaN compares false with everything: fail here, by name
            raise GateFailed(f"the optimised UNet's output at reference call {i} holds "
                             f"{int(np.size(out) - np.isfinite(out).sum())} NaN or infinite values")
        raw.append(cosine(out, ref))
        gui.append(cosine(guided(out, guidance), guided(ref, guidance)))
    return float(np.mean(raw)), float(np.mean(gui)), len(raw)


def image_psnr(bundle_dir: Path, backend: str, reference: Reference) -> float:
    """PSNR (dB) of the runtime's image with this bundle against the reference image, same latents."""
    from sdedge.runtime.pipeline import Pipeline

    from .reference import psnr

    pipe = Pipeline.load(bundle_dir, device="cpu", backend=backend, verify="off",
                         prepare={"width": reference.size, "height": reference.size, "guidance": reference.guidance})
    try:
        ours = pipe.generate(reference.prompt, "", steps=reference.steps, guidance=reference.guidance,
                             width=reference.size, height=reference.size, scheduler=reference.scheduler,
                             latents=reference.latents, watermark=False).images
    finally:
        pipe.close()
    return float(min(psnr(ours, reference.image), 999.0))


def time_calls(engine, feeds: dict[str, np.ndarray], calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        engine.infer(feeds)
        times.append(time.perf_counter() - t0)
    return times


def speed_gate(make_fp32, make_test, feeds: dict[str, np.ndarray], *, backend: str, calls: int = 3,
               threads: int | None = None) -> SpeedReport:
    """Median seconds per UNet call, fp32 vs optimised, on the same backend and inputs.

    `make_fp32` / `make_test` build (unloaded) engines. Each is loaded and warmed (one call, which also
    compiles for these shapes), then both are timed in alternating rounds so drift in the machine's load
    hits both alike; both are held meanwhile. `make_fp32=None`: the bundle's UNet is its own fp32 baseline
    (a pruned fp32 bundle, whose gain over the unpruned base `sdedge bench` measures): only it is loaded and
    timed, and the report gives ratio 1.
    """
    test = make_test()
    fp32 = make_fp32() if make_fp32 is not None else None
    held = [e for e in (fp32, test) if e is not None]
    for engine in held:
        engine.load()
        engine.infer(feeds)
    a, b = [], []
    for _ in range(calls):
        if fp32 is not None:
            a += time_calls(fp32, feeds, 1)
        b += time_calls(test, feeds, 1)
    for engine in held:
        engine.unload()
    del fp32, test, held
    gc.collect()
    tb = statistics.median(b)
    ta = statistics.median(a) if a else tb
    shape = "x".join(str(d) for d in feeds["sample"].shape)
    import os

    return SpeedReport(backend=backend, fp32_seconds=round(ta, 6), seconds=round(tb, 6), ratio=round(ta / tb, 3),
                       calls=calls, shape=shape, threads=threads or os.cpu_count() or 1, machine=machine_name())


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores, {cpu_features()}"


def cpu_features() -> str:
    """The SIMD features that decide int8/bf16 speed: avx2, avx512f, VNNI, BF16, AMX (runtime.environment)."""
    from sdedge.runtime.environment import engine_flags

    return "+".join(engine_flags()) or "no AVX2"


def component_bytes(manifest: Manifest) -> dict[str, int]:
    """Bytes on disk per component: its ONNX file, external data and OpenVINO IR."""
    return {name: sum(manifest.files[f].bytes for f in (c.file, *c.external_data, *c.openvino_ir))
            for name, c in manifest.components.items()}


def size_report(before: Manifest, after: Manifest) -> SizeReport:
    b, a = component_bytes(before), component_bytes(after)
    b["total"], a["total"] = sum(before.files[f].bytes for f in before.files), sum(after.files[f].bytes for f in after.files)
    return SizeReport(before=b, after=a)


def check_gates(*, guided_cosine: float, image_psnr_db: float | None, min_cosine: float | None,
                min_psnr: float | None, what: str) -> None:
    """Raise GateFailed with the figures and the gate when one is missed."""
    problems = []
    if min_cosine is not None and not guided_cosine >= min_cosine:
        problems.append(f"the UNet's cosine after guidance is {guided_cosine:.6f}, under --min-cosine {min_cosine}")
    if min_psnr is not None and image_psnr_db is not None and not image_psnr_db >= min_psnr:
        problems.append(f"the final image is {image_psnr_db:.1f} dB PSNR against the fp32 reference, under "
                        f"--min-psnr {min_psnr:g} dB")
    if problems:
        raise GateFailed(f"{what}: " + "; ".join(problems) + ". Try a higher precision (int8-weights or bf16), "
                         "more --calibration prompts, or a lower gate if this quality is acceptable.")


def record_reference_bundle(bundle_dir: Path, out_dir: Path, *, prompt: str, latents: np.ndarray, steps: int,
                            guidance: float, scheduler: str) -> Reference:
    """The same reference from an fp32 bundle (itself checked against diffusers at export, ≥ 40 dB), run with
    ONNX Runtime: no PyTorch model needed, so a bundle can be re-quantised on a machine without it."""
    from sdedge.runtime.backends.select import choose_backend, engine_factory
    from sdedge.runtime.bundle import Bundle
    from sdedge.runtime.pipeline import Pipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = Bundle.open(bundle_dir)
    inner = engine_factory(choose_backend(bundle.manifest, "onnxruntime", "cpu"), bundle.manifest,
                           cache_dir=None)  # a scratch bundle: nothing for the user's cache
    files: list[Path] = []

    class Recorder:
        def __init__(self, engine):
            self.engine = engine

        @property
        def loaded(self):
            return self.engine.loaded

        def load(self):
            self.engine.load()

        def unload(self):
            self.engine.unload()

        def infer(self, feeds):
            out = self.engine.infer(feeds)
            path = out_dir / f"ref-{len(files):03d}.npz"
            np.savez(path, **{k: np.asarray(v) for k, v in feeds.items()}, out_sample=out[0])
            files.append(path)
            return out

    def factory(b, name, info):
        engine = inner(b, name, info)
        return Recorder(engine) if name == "unet" else engine

    pipe = Pipeline(bundle, device="cpu", engine_factory=factory)
    size = latents.shape[-1] * bundle.manifest.latent.vae_scale_factor
    image = pipe.generate(prompt, "", steps=steps, guidance=guidance, width=size, height=size, scheduler=scheduler,
                          latents=latents, watermark=False).images
    pipe.close()
    return Reference(files=files, image=image, latents=latents, prompt=prompt, steps=steps, guidance=guidance,
                     scheduler=scheduler, size=size)


def available_backends() -> list[str]:
    """The backends the speed gate times when none are named: ONNX Runtime, and OpenVINO when installed."""
    from sdedge.runtime.backends.openvino import openvino_available

    return ["onnxruntime"] + (["openvino"] if openvino_available() else [])


def engine_for(backend: str, bundle, name: str = "unet"):
    """An (unloaded) engine of `bundle`'s component `name` on `backend`, on the CPU, with no compiled-model cache."""
    info = bundle.manifest.components[name]
    if backend == "openvino":
        from sdedge.runtime.backends.openvino import OvEngine

        return OvEngine(bundle, name, info, cache_dir=None,
                        precision_hint=bundle.manifest.backend.openvino_inference_precision)
    from sdedge.runtime.backends.onnxruntime import OrtEngine

    return OrtEngine(bundle, name, info, ["CPUExecutionProvider"], cache_dir=None)


def engine_parity(backend: str, bundle, reference: Reference, guidance: float) -> tuple[float, float, int]:
    """unet_parity of `bundle`'s UNet on `backend`, the engine loaded for the measurement and released after."""
    engine = engine_for(backend, bundle)
    engine.load()
    try:
        return unet_parity(engine, reference, guidance)
    finally:
        engine.unload()
        del engine
        gc.collect()


def choose_preferred(reports, guided: dict[str, float], min_cosine: float | None, slack: float = 0.01):
    """The fastest backend among those whose cosine after guidance meets `min_cosine` (when set) and is
    within `slack` of the best one measured: a faster but less exact engine is not preferred."""
    top = max(guided.values())
    ok = [r for r in reports if guided[r.backend] >= top - slack
          and (min_cosine is None or guided[r.backend] >= min_cosine)]
    return min(ok or [max(reports, key=lambda r: guided[r.backend])], key=lambda r: r.seconds)
