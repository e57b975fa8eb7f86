"""The export's stages on the PyTorch base, up to the fp32 bundle's manifest (export/build.py gives their order).

Each stage is `stage(run: ExportRun) -> None` (export/pipeline_run.py); one that does not apply returns at once.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from sdedge.runtime.environment import package_versions
from sdedge.runtime.errors import BadInput
from sdedge.runtime.files import scratch_dir
from sdedge.runtime.manifest import (
    AdapterInfo,
    BaseInfo,
    Defaults,
    LatentInfo,
    Manifest,
    Parity,
    Precision,
    Provenance,
    ShapeRange,
    TokenizerInfo,
)

from .bundle_writer import hash_files, staging_dir, write_manifest
from .markers import read_pruned_marker
from .onnx_export import ExportError, export_component
from .options import ExportOptions, check_lcm_steps
from .park import unparked
from .pipeline_run import ExportRun
from .specs import component_names, component_spec, is_sdxl

log = logging.getLogger("sdedge.export")

PARK_ABOVE_BYTES = 8 * 1024**3  # fp32 weights of a base parked while not in use (SDXL: 14.6 GB; SD 1.5: 4.3 GB)
TOOLCHAIN = ("sdedge", "torch", "diffusers", "transformers", "onnx", "onnxruntime")


def toolchain_versions() -> dict[str, str]:
    return package_versions(TOOLCHAIN)


# -- before the base loads ------------------------------------------------------------------------------------
def read_pruned_note(run: ExportRun) -> None:
    """A pruned base's note and its unpruned parent (the truth its gates compare with); what needs the PyTorch model
    to be optimised (a reduced precision, pruning, a pruned base)."""
    from .pruned_base import resolve_parent

    base, opts = run.base, run.opts
    run.pruned = read_pruned_marker(base) if Path(base).is_dir() else None
    if run.pruned is not None and opts.prune > 0:
        raise BadInput(f"{base} is a pruned base already (sdedge_pruned.json): export it without --prune, or prune "
                       "its parent by the ratio you want")
    if run.pruned is None and opts.reference_base:
        raise BadInput(f"--reference-base is for a pruned base (one written by `sdedge prune`); {base} is not one")
    run.parent = resolve_parent(base, run.pruned, opts.reference_base) if run.pruned is not None else None
    run.optimise = opts.precision is not Precision.FP32 or opts.prune > 0 or run.pruned is not None


def default_guidance(run: ExportRun) -> None:
    """An LCM bundle runs without a guidance pass unless asked for one; other bundles at the base's hint, else at
    diffusers' pipeline default (5.0 for SDXL, as StableDiffusionXLPipeline; 7.5 for SD 1.x)."""
    if run.opts.default_guidance is None:
        from .sdxl_base import base_guidance

        lcm = run.opts.default_scheduler == "lcm"
        run.opts = replace(run.opts, default_guidance=1.0 if lcm else base_guidance(run.base, run.opts.base_config))


def record_parent_truth(run: ExportRun) -> None:
    """A pruned base's truth is its unpruned parent: recorded, and released before the pruned base loads."""
    if run.parent is None:
        return
    from .bases import load_base

    with run.stages(f"load the unpruned parent {run.parent}"):
        ref_pipe = load_base(run.parent)
    run.reference = record_truth(ref_pipe, run, f"the unpruned parent {run.parent}")
    del ref_pipe
    gc.collect()


# -- the base -------------------------------------------------------------------------------------------------
def load(run: ExportRun) -> None:
    """The base pipeline and its description; the default scheduler (euler for SDXL, as diffusers; dpm++2m else)."""
    from .bases import describe_base, load_base

    with run.stages("load base"):
        run.base_desc = describe_base(run.base)
        run.pipe = load_base(run.base, allow_pickle=run.opts.allow_pickle, config=run.opts.base_config)
    pipe = run.pipe
    park_large_base(run)
    if run.opts.default_scheduler is None:
        run.opts = replace(run.opts, default_scheduler="euler" if is_sdxl(pipe) else "dpm++2m")
    if run.optimise and pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
        raise BadInput(f"{run.base} is an inpainting base ({pipe.unet.config.in_channels}-channel UNet): this sdedge "
                       "exports it in fp32 only, without pruning (its calibration and gates feed 4-channel latents)")


def park_large_base(run: ExportRun) -> None:
    """A base over PARK_ABOVE_BYTES of fp32 weights (SDXL), exported as it is (no LoRA, decoder, pruning or reduced
    precision changes its weights): the weights fp16 holds exactly are kept in fp16 until PyTorch runs them
    (export/park.py); each component is fp32 only while it is traced, and the pipeline while diffusers draws the
    parity image. The values PyTorch sees are unchanged."""
    from .park import models_of, park_pipeline

    opts = run.opts
    weights = sum(p.numel() * p.element_size() for m in models_of(run.pipe) for p in m.parameters())
    if weights <= PARK_ABOVE_BYTES or run.optimise or opts.loras or opts.decoder is not None:
        return
    with run.stages(f"park the fp16-exact weights of the {weights / 1e9:.1f} GB base in fp16"):
        freed = park_pipeline(run.pipe)
    log.info("parked %.1f GB of fp16-exact weights in fp16 (%.1f GB held instead of %.1f GB)", freed / 1e9,
             (weights - freed) / 1e9, weights / 1e9)


def lcm_step_limit(run: ExportRun) -> None:
    """An LCM bundle's default steps within the schedule's original_inference_steps, before anything is written."""
    check_lcm_steps(run.opts, base_scheduler_config(run.pipe))


def swap_decoder(run: ExportRun) -> None:
    """--decoder: a pipeline with that decoder in place of the base VAE (its vae_decoder and its parity truth)."""
    if run.opts.decoder is None:
        return
    from .decoder import decoder_pipeline, load_decoder

    with run.stages(f"load the decoder {run.opts.decoder}"):
        vae, run.dec_cfg = load_decoder(run.opts.decoder, run.pipe)
        run.dec_pipe = decoder_pipeline(run.pipe, vae)


def fuse(run: ExportRun) -> None:
    """The LoRAs fused into the weights, in order, at their scales."""
    if not run.opts.loras:
        return
    from .lora import fuse_loras

    with run.stages(f"fuse {len(run.opts.loras)} LoRA(s)"):
        fused = fuse_loras(run.pipe, list(run.opts.loras))
    run.adapters = tuple(AdapterInfo(file=Path(f.path).name, sha256=f.sha256, scale=f.scale) for f in fused.loras)


def record_fp32_truth(run: ExportRun) -> None:
    """The fp32 truth (LoRAs fused) of an optimised bundle, before pruning or quantising changes the model."""
    if run.optimise and run.reference is None:
        run.reference = record_truth(run.dec_pipe or run.pipe, run, "diffusers")


def geometry(run: ExportRun) -> None:
    """The bundle's shape range, and the square size parity (and calibration) runs at."""
    run.shapes, run.parity_size, run.latent_size = parity_geometry(run.pipe, run.opts)


def prune(run: ExportRun) -> None:
    """--prune: the UNet's channels pruned (a pruned base's report is carried over)."""
    run.prune_report = run.pruned.prune if run.pruned is not None else None
    if run.opts.prune <= 0:
        return
    from .prune import prune_unet

    opts = run.opts
    with run.stages(f"prune the UNet's channels by {opts.prune:.0%} ({opts.prune_criterion})"):
        run.prune_report = prune_unet(run.pipe, opts.prune, opts.prune_criterion, latent_size=run.latent_size)


# -- the bundle -----------------------------------------------------------------------------------------------
def open_staging(run: ExportRun) -> None:
    """The folder the bundle is written into, beside --out: renamed into place once every stage has passed."""
    run.tmp = run.exits.enter_context(staging_dir(run.out, overwrite=run.opts.overwrite, inputs=run.inputs))


def export_components(run: ExportRun) -> None:
    """Each component to ONNX, its parity against PyTorch checked on the traced and the extreme shapes."""
    pipe, opts, s = run.pipe, run.opts, run.shapes
    scale = pipe.vae_scale_factor
    lat, size = run.latent_size, run.parity_size
    trace_dims = {"B": 2, "h": lat, "w": lat, "H": size, "W": size}
    check_dims = [trace_dims, {"B": 1, "h": s.height_min // scale, "w": s.width_max // scale,
                               "H": s.height_min, "W": s.width_max}]
    for name in (n for n in component_names(pipe) if n != "vae_encoder" or opts.vae_encoder):
        src = run.dec_pipe if name == "vae_decoder" and run.dec_pipe is not None else pipe
        spec = component_spec(name, src)
        label = f"export {name}" + (f" ({type(src.vae).__name__} from {opts.decoder})" if src is run.dec_pipe else "")
        model = src.vae if name.startswith("vae_") else getattr(src, name)
        with run.stages(label), unparked(model) as repark:  # a parked model: fp32 while PyTorch runs it
            info, par, _ = export_component(spec, src, run.tmp, trace_dims, check_dims, opts.opset, after_torch=repark)
        run.components[name], run.component_parity[name] = info, par


def save_tokenizers(run: ExportRun) -> None:
    """The base's tokenizer(s), as fast-tokenizer JSON the runtime reads."""
    with run.stages("tokenizer"):
        for tok_name in ("tokenizer", "tokenizer_2") if is_sdxl(run.pipe) else ("tokenizer",):
            getattr(run.pipe, tok_name).save_pretrained(run.tmp / tok_name)
            if not (run.tmp / tok_name / "tokenizer.json").is_file():
                raise ExportError(f"the base's {tok_name} did not save a tokenizer.json (a fast CLIP tokenizer "
                                  "is needed)")


def describe_bundle(run: ExportRun) -> None:
    """The fp32 bundle's manifest: components, shapes, latent space, scheduler, defaults, provenance."""
    pipe, opts, pruned, report = run.pipe, run.opts, run.pruned, run.prune_report
    dec = run.dec_pipe
    run.manifest = Manifest(
        pipeline="sdxl" if is_sdxl(pipe) else "sd15", precision=opts.precision,
        components=dict(run.components), files={}, shapes=run.shapes,
        latent=LatentInfo(channels=pipe.vae.config.latent_channels, vae_scale_factor=pipe.vae_scale_factor,
                          scaling_factor=float(pipe.vae.config.scaling_factor),
                          decoder_scaling_factor=float(dec.vae.config.scaling_factor) if dec is not None else None),
        tokenizer=TokenizerInfo(dir="tokenizer", max_length=pipe.tokenizer.model_max_length),
        scheduler=base_scheduler_config(pipe),
        defaults=Defaults(steps=opts.default_steps, guidance=opts.default_guidance, scheduler=opts.default_scheduler),
        provenance=Provenance(
            base=BaseInfo(id=run.base_desc["id"], sha256=run.base_desc["sha256"]),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            toolchain=toolchain_versions(), adapters=run.adapters,
            prune_ratio=report.ratio if report is not None else 0.0, prune=report,
            pruned_from=(BaseInfo(id=pruned.parent.id, sha256=pruned.parent.sha256)
                         if pruned is not None else None)),
        parity=Parity(components=dict(run.component_parity)),
    )


def sdxl_fields(run: ExportRun) -> None:
    """An SDXL bundle's second tokenizer and conditioning settings (runtime/sdxl.py reads them)."""
    if is_sdxl(run.pipe):
        run.manifest = replace(run.manifest, **sdxl_manifest_fields(run.pipe))


def write_fp32_manifest(run: ExportRun) -> None:
    """The SHA-256 of every file into the manifest, written (the bundle runs from here on)."""
    run.manifest = run.manifest.with_files(hash_files(run.tmp))
    write_manifest(run.tmp, run.manifest)


# -- helpers of the stages above ------------------------------------------------------------------------------
def shape_range(pipe, opts: ExportOptions) -> ShapeRange:
    scale = pipe.vae_scale_factor
    up = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    multiple = scale * up
    native = pipe.unet.config.sample_size * scale
    lo = opts.size_min or max(multiple, native // 2)
    hi = opts.size_max or native * 2
    for label, v in (("minimum size", lo), ("maximum size", hi)):
        if v % multiple:
            raise BadInput(f"{label} {v}: must be a multiple of {multiple} for this base")
    if lo > hi:
        raise BadInput(f"size range {lo}-{hi} is empty")
    size = min(max(native, lo), hi)  # the native size, or the range's nearest end when the range leaves it out
    return ShapeRange(batch_min=opts.batch_min, batch_max=opts.batch_max, height_min=lo, height_max=hi,
                      width_min=lo, width_max=hi, pixel_multiple=multiple, default_height=size, default_width=size)


def parity_geometry(pipe, opts: ExportOptions) -> tuple[ShapeRange, int, int]:
    """The bundle's shape range, the square image size parity is measured at, and its latent size."""
    shapes = shape_range(pipe, opts)
    size = opts.parity_size or min(shapes.default_height, max(256, shapes.height_min))
    return shapes, size, size // pipe.vae_scale_factor


def record_truth(ref_pipe, run: ExportRun, truth: str):
    """Record the fp32 reference run the precision and pruning gates compare against (gates.py), into a scratch
    folder beside --out removed when the export ends. `ref_pipe` is the model before pruning and quantising (with
    its LoRAs fused; a pruned base's unpruned parent without them)."""
    from .gates import record_reference

    opts = run.opts
    lat = parity_geometry(ref_pipe, opts)[2]
    ref_dir = run.scratch(scratch_dir(Path(run.out).parent, "reference"))
    with run.stages(f"fp32 reference run ({truth})"):
        latents = np.random.default_rng(opts.parity_seed).standard_normal(
            (1, ref_pipe.vae.config.latent_channels, lat, lat), dtype=np.float32)  # (1, 4, h, w)
        return record_reference(ref_pipe, ref_dir, prompt=opts.parity_prompt, latents=latents,
                                steps=opts.parity_steps, guidance=opts.default_guidance,
                                scheduler=opts.parity_scheduler, scheduler_config=base_scheduler_config(ref_pipe))


def sdxl_manifest_fields(pipe) -> dict:
    """An SDXL bundle's second tokenizer and conditioning settings (runtime/sdxl.py reads them)."""
    from sdedge.runtime.manifest import SdxlInfo

    force_zeros = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    return {"tokenizer_2": TokenizerInfo(dir="tokenizer_2", max_length=pipe.tokenizer_2.model_max_length),
            "sdxl": SdxlInfo(force_zeros_for_empty_prompt=force_zeros)}


def base_scheduler_config(pipe) -> dict:
    """The base's scheduler config as the bundle records it (and the runtime's schedulers read it)."""
    config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    config.setdefault("timestep_spacing", "leading")  # explicit: diffusers' classes differ in default
    return config
