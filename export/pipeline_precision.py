"""The export's stages that turn the fp32 staging bundle into a reduced precision, measured and gated against the fp32
truth (export/build.py gives their order; the transforms are export/quantize.py's, the measurements export/gates.py's).

    calibration (int8) ─► transform each component ─► speed gate per backend ─► parity gates per backend
      ─► (int8 under --min-cosine: sensitivity sweep) ─► image parity ─► figures into the manifest ─► the user's gates

The fp32 UNet is kept aside in a work folder, the speed gate's baseline, removed after the gates. The same stages
serve an export from a base (after the fp32 bundle is written and checked) and a bundle derived from an fp32 bundle
(`derive_stages`: the fp32 bundle copied, its own run the truth). Each stage is `stage(run: ExportRun) -> None`
(export/pipeline_run.py); they do nothing for an fp32 export that is not optimised.
"""

from __future__ import annotations

import functools
import gc
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from sdedge.runtime.bundle import Bundle
from sdedge.runtime.errors import BadInput
from sdedge.runtime.files import scratch_dir
from sdedge.runtime.manifest import BackendHint, Precision, PrecisionParity
from sdedge.runtime.memory import peak_rss_bytes

from . import quantize
from .bundle_writer import hash_files, write_manifest
from .gates import (
    available_backends,
    check_gates,
    choose_preferred,
    engine_for,
    engine_parity,
    image_psnr,
    size_report,
    speed_gate,
)
from .pipeline_run import ExportRun, Stage

log = logging.getLogger("sdedge.export")


def optimising(stage: Stage) -> Stage:
    """`stage`, run only when this export makes an optimised bundle (a reduced precision, pruning, a pruned base)."""
    @functools.wraps(stage)
    def only_when_optimising(run: ExportRun) -> None:
        if run.optimise:
            stage(run)

    return only_when_optimising


def generic(stage: Stage) -> Stage:
    """`stage`, run only when optimising and no stage of its own made and gated the reduced precision already
    (`run.precision_done`, e.g. a stage for a method these transforms do not know)."""
    @functools.wraps(stage)
    def unless_done(run: ExportRun) -> None:
        if run.optimise and not run.precision_done:
            stage(run)

    return unless_done


# -- before the transforms ------------------------------------------------------------------------------------
@optimising
def read_calibration_prompts(run: ExportRun) -> None:
    """--calibration's prompts (the built-in set without it), for static int8."""
    from .calibration import read_prompts

    run.prompts, run.prompts_source = read_prompts(run.opts.calibration)


@optimising
def release_pytorch(run: ExportRun) -> None:
    """The PyTorch model out of memory before quantising: bounded memory."""
    run.pipe = run.dec_pipe = None
    gc.collect()


@optimising
def open_work(run: ExportRun) -> None:
    """A work folder beside the staging folder; the fp32 manifest kept (the speed baseline's, the sizes' before)."""
    run.fp32_manifest = run.manifest
    run.work = run.scratch(scratch_dir(run.tmp.parent, "quant"))


@optimising
def calibrate(run: ExportRun) -> None:
    """Static int8's calibration data: the UNet's inputs from the still-fp32 bundle, streamed to the work folder."""
    if run.opts.precision is not Precision.INT8:
        return
    from .calibration import collect

    steps = run.opts.calibration_steps
    with run.stages(f"calibration: UNet inputs from {len(run.prompts)} prompts"):
        run.calibration = collect(run.tmp, run.prompts, run.work / "calibration", steps=steps,
                                  timesteps_per_prompt=steps, size=run.parity_size, source=run.prompts_source)


# -- the transforms -------------------------------------------------------------------------------------------
@generic
def transform_components(run: ExportRun) -> None:
    """Each component to its precision (quantize.component_plan), the fp32 UNet moved aside first; the manifest
    rewritten with the new files. A pruned fp32 bundle keeps its files, its UNet its own speed baseline."""
    precision, manifest, opts = run.opts.precision, run.manifest, run.opts
    components = dict(manifest.components)
    if precision is not Precision.FP32:
        plan = quantize.component_plan(precision, manifest.pipeline)
        fp32_root = quantize.set_fp32_unet_aside(run.tmp, manifest, run.work)
        for name, info in manifest.components.items():
            p = plan[name]
            if p is Precision.FP32:  # kept as exported
                components[name] = replace(info, precision=p)
                continue
            src = (fp32_root if name == "unet" else run.tmp) / info.file
            with run.stages(f"{p.value} {name}"):
                components[name] = quantize.transform_component(
                    name, info, p, precision, src, run.tmp, run.work, calibration=run.calibration,
                    int8_method=opts.int8_method, int8_samples=opts.int8_samples)
    run.manifest = replace(manifest, precision=precision, components=components).with_files(hash_files(run.tmp))
    write_manifest(run.tmp, run.manifest)


# -- the gates ------------------------------------------------------------------------------------------------
@generic
def speed_gates(run: ExportRun) -> None:
    """The optimised UNet against the fp32 one on every installed (or --speed-backends) backend, same inputs."""
    precision, opts = run.opts.precision, run.opts
    feeds = next(iter(run.reference.samples()))
    feeds.pop("out_sample")
    fp32_bundle = Bundle(root=run.work / "fp32", manifest=run.fp32_manifest)
    test_bundle = Bundle(root=run.tmp, manifest=run.manifest)
    for backend in list(opts.speed_backends) if opts.speed_backends else available_backends():
        with run.stages(f"speed gate on {backend}"):
            make_fp32 = None if precision is Precision.FP32 else (lambda b=backend: engine_for(b, fp32_bundle))
            r = speed_gate(make_fp32, lambda b=backend: engine_for(b, test_bundle), feeds, backend=backend,
                           calls=opts.speed_calls)
        run.speed.append(r)
        log.info("speed gate %s: fp32 %.3f s, %s %.3f s per UNet call: %.2fx", backend, r.fp32_seconds,
                 precision.value, r.seconds, r.ratio)
        if r.ratio < 1.0 and run.prune_report is None:
            log.warning("the %s UNet is NOT faster than fp32 on %s on this machine (%.2fx: %.3f s vs %.3f s "
                        "per call)", precision.value, backend, r.ratio, r.seconds, r.fp32_seconds)


@generic
def parity_gates(run: ExportRun) -> None:
    """The UNet's cosines against the truth on every timed backend (the same file may run accurately on one and not
    on another); the fastest accurate one becomes the bundle's preferred backend."""
    bundle = Bundle(root=run.tmp, manifest=run.manifest)
    for r in run.speed:
        with run.stages(f"parity gates on {r.backend}"):
            run.parities[r.backend] = engine_parity(r.backend, bundle, run.reference, run.manifest.defaults.guidance)
        log.info("parity %s: UNet cosine %.5f, after guidance %.4f", r.backend, *run.parities[r.backend][:2])
    guided = {b: p[1] for b, p in run.parities.items()}
    best = run.best = choose_preferred(run.speed, guided, run.opts.min_cosine)
    reason = (f"{best.backend} {best.seconds:.3f} s per UNet call at {best.shape}, {best.ratio:.2f}x its fp32, "
              f"cosine after guidance {guided[best.backend]:.4f}"
              + "".join(f"; {r.backend} {r.seconds:.3f} s, cosine {guided[r.backend]:.4f}"
                        for r in run.speed if r is not best))
    run.manifest = replace(run.manifest, speed=tuple(run.speed), backend=BackendHint(preferred=best.backend,
                                                                                     reason=reason))
    write_manifest(run.tmp, run.manifest)


@generic
def sensitivity_sweep(run: ExportRun) -> None:
    """An int8 UNet under --min-cosine: greedily put back in fp32 (remove the activation QDQ of) the node group whose
    removal helps the cosine after guidance most, until the gate is met or four groups are out."""
    raw, gui, n = run.parities[run.best.backend]
    min_cosine = run.opts.min_cosine
    if run.opts.precision is Precision.INT8 and min_cosine is not None and gui < min_cosine:
        with run.stages("sensitivity sweep: layers kept in fp32"):
            gui, raw = _sweep(run, min_cosine, gui, raw)
        run.parities[run.best.backend] = (raw, gui, n)


def _sweep(run: ExportRun, min_cosine: float, gui: float, raw: float, max_groups: int = 4) -> tuple[float, float]:
    manifest, backend, guidance = run.manifest, run.best.backend, run.manifest.defaults.guidance
    info = manifest.components["unet"]
    src = run.tmp / info.file
    groups, kept = quantize.unet_groups(src), run.kept_fp32
    for _ in range(max_groups):
        best = None
        for g in (g for g in groups if g not in kept):
            with tempfile.TemporaryDirectory(dir=run.tmp.parent) as tmp:
                root = Path(tmp)
                comp = quantize.without_activation_qdq(src, [*kept, g], root / "unet", info)
                trial = replace(manifest, components={**manifest.components, "unet": comp}, files=hash_files(root))
                r, c, _ = engine_parity(backend, Bundle(root=root, manifest=trial), run.reference, guidance)
            log.info("sensitivity: fp32 %s -> guided cosine %.4f", g, c)
            if best is None or c > best[1]:
                best = (g, c, r)
        if best is None or best[1] <= gui:
            break
        kept.append(best[0])
        gui, raw = best[1], best[2]
        if gui >= min_cosine:
            break
    if kept:
        comp = quantize.without_activation_qdq(src, kept, run.tmp / "unet", info)
        run.manifest = replace(manifest, components={**manifest.components, "unet": comp})
        run.manifest = run.manifest.with_files(hash_files(run.tmp))
        write_manifest(run.tmp, run.manifest)
        log.info("sensitivity sweep kept %s in fp32: guided cosine %.4f", kept, gui)
    return gui, raw


@generic
def image_parity_gate(run: ExportRun) -> None:
    """The runtime's image with the optimised bundle, on the preferred backend, against the truth's image."""
    with run.stages(f"image parity on {run.best.backend}"):
        run.image_psnr_db = image_psnr(run.tmp, run.best.backend, run.reference)


@generic
def record_precision(run: ExportRun) -> None:
    """The figures into the manifest: parity, how it was quantised and calibrated, the export's peak memory, sizes."""
    opts, manifest = run.opts, run.manifest
    raw, gui, n = run.parities[run.best.backend]
    parity = PrecisionParity(unet_cosine=round(raw, 6), guided_cosine=round(gui, 6),
                             guidance=manifest.defaults.guidance, samples=n, image_psnr_db=round(run.image_psnr_db, 2),
                             backend=run.best.backend, min_cosine=opts.min_cosine, min_psnr=opts.min_psnr)
    described = quantize.describe(opts.precision, opts.int8_method)
    if run.kept_fp32:
        described += f"; activations kept in fp32 in {', '.join(run.kept_fp32)} (sensitivity sweep)"
    prov = replace(manifest.provenance, quantisation=described,
                   calibration=run.calibration.source if run.calibration is not None else None,
                   export_peak_rss_bytes=peak_rss_bytes())
    run.manifest = replace(manifest, parity=replace(manifest.parity, precision=parity), provenance=prov,
                           sizes=size_report(run.fp32_manifest, manifest))
    write_manifest(run.tmp, run.manifest)


@generic
def user_gates(run: ExportRun) -> None:
    """--min-cosine and --min-psnr: the export fails, naming the figures, when one is missed."""
    opts = run.opts
    check_gates(guided_cosine=run.parities[run.best.backend][1], image_psnr_db=run.image_psnr_db,
                min_cosine=opts.min_cosine, min_psnr=opts.min_psnr, what=f"the {opts.precision.value} bundle")


@optimising
def drop_work(run: ExportRun) -> None:
    """The work folder (calibration data, the fp32 UNet) removed now, not at the end of the export."""
    shutil.rmtree(run.work, ignore_errors=True)


# -- a reduced precision derived from an fp32 bundle ----------------------------------------------------------
def check_fp32_source(run: ExportRun) -> None:
    """The source is an fp32 bundle, the request a reduced precision without pruning; the parity geometry from the
    bundle's own parity record."""
    src, opts = Path(run.base), run.opts
    fp32 = Bundle.open(src).manifest
    if fp32.precision is not Precision.FP32 or fp32.provenance.quantisation:
        raise BadInput(f"{src}: a {fp32.precision.value} bundle; derive from an fp32 bundle")
    if opts.prune:
        raise BadInput("--prune needs the PyTorch base (a diffusers folder), not a bundle")
    if opts.precision is Precision.FP32:
        raise BadInput(f"{src} is already fp32")
    run.manifest, run.optimise = fp32, True
    run.parity_size = opts.parity_size or (fp32.parity.image.width if fp32.parity.image else fp32.shapes.default_width)


def copy_fp32_bundle(run: ExportRun) -> None:
    """The fp32 bundle's files into the staging folder."""
    with run.stages("copy the fp32 bundle"):
        for rel in run.manifest.files:
            (run.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(run.base) / rel, run.tmp / rel)
        write_manifest(run.tmp, run.manifest)


def record_bundle_truth(run: ExportRun) -> None:
    """The truth: the fp32 bundle's own run on ONNX Runtime (checked against diffusers when it was exported)."""
    from .gates import record_reference_bundle

    opts, lat, size = run.opts, run.manifest.latent, run.parity_size
    latents = np.random.default_rng(opts.parity_seed).standard_normal(
        (1, lat.channels, size // lat.vae_scale_factor, size // lat.vae_scale_factor), dtype=np.float32)  # (1, 4, h, w)
    ref_dir = run.scratch(scratch_dir(run.out.parent, "reference"))
    with run.stages("fp32 reference run (the fp32 bundle)"):
        run.reference = record_reference_bundle(run.base, ref_dir, prompt=opts.parity_prompt, latents=latents,
                                                steps=opts.parity_steps, guidance=run.manifest.defaults.guidance,
                                                scheduler=opts.parity_scheduler)

