"""`sdedge export`: a base and LoRA adapters in, a bundle folder out.

    load base ─► fuse LoRAs (export/lora.py) ─► export each component (specs.py + onnx_export.py, parity per component)
              ─► tokenizer ─► manifest with SHA-256 of every file ─► end-to-end image parity
              ─► rename the staging folder into place
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from sdedge.runtime.environment import package_versions
from sdedge.runtime.errors import BadInput, MissingDependency
from sdedge.runtime.files import check_replaceable, scratch_dir
from sdedge.runtime.manifest import (
    AdapterInfo,
    BaseInfo,
    DecoderParity,
    Defaults,
    ImageParity,
    LatentInfo,
    Manifest,
    Parity,
    Precision,
    PromptMatch,
    Provenance,
    ShapeRange,
    TokenizerInfo,
)
from sdedge.runtime.stages import Stages

from .bases import describe_base, load_base
from .bundle_writer import hash_files, staging_dir, write_manifest
from .markers import guidance_hint, read_pruned_marker
from .onnx_export import ExportError, export_component
from .specs import component_names, component_spec, is_sdxl

log = logging.getLogger("sdedge.export")

TOOLCHAIN = ("sdedge", "torch", "diffusers", "transformers", "onnx", "onnxruntime")
DETERMINISTIC_SCHEDULERS = ("ddim", "pndm", "euler", "dpm++2m", "dpm++2m-karras")


@dataclass(frozen=True)
class ExportOptions:
    target: str = "onnx"
    precision: Precision = Precision.FP32
    opset: int = 17
    batch_min: int = 1
    batch_max: int = 8
    size_min: int | None = None  # pixels; default: half the base's native size
    size_max: int | None = None  # pixels; default: twice the base's native size
    vae_encoder: bool = True
    default_scheduler: str | None = None  # None: the base's (euler for SDXL, as diffusers; dpm++2m else)
    default_steps: int = 20  # lcm: at most the schedule's original_inference_steps
    default_guidance: float | None = None  # None: the base's hint (sdedge_base.json), else 7.5
    parity_prompt: str = "a red circle on a blue background"
    parity_seed: int = 0
    parity_steps: int = 10
    parity_scheduler: str = "ddim"
    parity_size: int | None = None  # pixels; default: the native size, at most 256
    min_psnr: float | None = None  # dB; None: 40 for an fp32 bundle (vs diffusers), recorded but not gated otherwise
    min_cosine: float | None = None  # gate on the UNet's cosine after guidance vs fp32 (reduced precisions, pruning)
    calibration: str | None = None  # prompts file (one per line) for static int8; None: the built-in set
    calibration_steps: int = 10  # steps per calibration prompt (each recorded)
    int8_method: str = "nncf"  # static int8 quantiser: nncf | ort
    int8_samples: int = 16  # UNet calls the quantiser calibrates on, spread over prompts and timesteps
    prune: float = 0.0  # structural pruning ratio of the UNet's channels (torch-pruning)
    prune_criterion: str = "magnitude"
    reference_base: str | None = None  # a pruned base's unpruned parent, where it is not at the path its note records
    speed_calls: int = 3  # UNet calls per engine in the speed gate
    speed_backends: tuple[str, ...] | None = None  # backends the speed gate times (None: every installed one)
    loras: tuple[tuple[str, float], ...] = ()  # (adapter .safetensors, scale), fused into the weights in order
    allow_pickle: bool = False
    base_config: str | None = None  # local diffusers folder with the configs, for a single-file base
    decoder: str | None = None  # a diffusers AutoencoderTiny (TAESD) or AutoencoderKL folder: the bundle's vae_decoder
    decoder_images: int = 4  # generations whose decodes are compared with the full VAE decoder's
    overwrite: bool = False


def toolchain_versions() -> dict[str, str]:
    return package_versions(TOOLCHAIN)


def check_options(opts: ExportOptions) -> None:
    if opts.target != "onnx":
        if opts.target == "trt":
            from sdedge.runtime.backends.tensorrt_probe import require_tensorrt

            require_tensorrt("--target trt")
            raise MissingDependency(
                "--target trt: TensorRT is usable here, but this sdedge version does not build TensorRT engines yet; "
                "export with --target onnx and run it with --backend onnxruntime --device cuda"
            )
        raise BadInput(f"--target {opts.target!r}: choose onnx or trt")
    if opts.int8_method not in ("nncf", "ort"):
        raise BadInput(f"--int8-method {opts.int8_method!r}: choose nncf or ort")
    if opts.prune != 0.0:  # 0: no pruning
        from .prune import check_ratio

        check_ratio(opts.prune, "--prune")
    if opts.min_cosine is not None and not -1.0 <= opts.min_cosine <= 1.0:
        raise BadInput(f"--min-cosine {opts.min_cosine:g}: a cosine is between -1 and 1")
    if not 1 <= opts.batch_min <= opts.batch_max:
        raise BadInput(f"batch range {opts.batch_min}-{opts.batch_max} is empty")
    check_defaults(opts)
    if opts.decoder is not None:
        from .decoder import read_decoder_config

        read_decoder_config(opts.decoder)
    if opts.parity_scheduler not in DETERMINISTIC_SCHEDULERS:
        raise BadInput(f"parity scheduler must be deterministic: one of {', '.join(DETERMINISTIC_SCHEDULERS)}")


def check_defaults(opts: ExportOptions) -> None:
    """The bundle's default scheduler, steps and guidance (the LCM step limit needs the base: check_lcm_steps)."""
    from sdedge.runtime.pipeline import MAX_STEPS
    from sdedge.runtime.schedulers import scheduler_names

    if opts.default_scheduler is not None and opts.default_scheduler not in scheduler_names():
        raise BadInput(f"--scheduler {opts.default_scheduler!r}: choose one of {', '.join(scheduler_names())}")
    steps = opts.default_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise BadInput(f"--steps {steps!r}: must be an integer from 1 to {MAX_STEPS}")
    g = opts.default_guidance
    if g is not None and not (isinstance(g, (int, float)) and math.isfinite(g) and g >= 0):
        raise BadInput(f"--guidance {g!r}: must be a finite number >= 0 (<= 1: no guidance pass)")


def check_lcm_steps(opts: ExportOptions, sched_config: dict) -> None:
    """An LCM bundle's default steps against the schedule's original_inference_steps, before anything is written."""
    if opts.default_scheduler != "lcm":
        return
    from sdedge.runtime.schedulers import SchedulerConfig

    n = SchedulerConfig.from_dict(sched_config).original_inference_steps
    if opts.default_steps > n:
        raise BadInput(f"--steps {opts.default_steps} with --scheduler lcm: the LCM schedule has "
                       f"original_inference_steps = {n}, so at most {n} steps (LCM-LoRAs run 2 to 8)")


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
    return ShapeRange(batch_min=opts.batch_min, batch_max=opts.batch_max, height_min=lo, height_max=hi,
                      width_min=lo, width_max=hi, pixel_multiple=multiple, default_height=native, default_width=native)


def parity_geometry(pipe, opts: ExportOptions) -> tuple[ShapeRange, int, int]:
    """The bundle's shape range, the square image size parity is measured at, and its latent size."""
    shapes = shape_range(pipe, opts)
    size = opts.parity_size or min(shapes.default_height, max(256, shapes.height_min))
    return shapes, size, size // pipe.vae_scale_factor


def record_truth(ref_pipe, out: str | Path, opts: ExportOptions, stages: Stages, truth: str, scratch: list[Path]):
    """Record the fp32 reference run the precision and pruning gates compare against (gates.py), into a scratch
    folder beside `out` that is added to `scratch` for the caller to remove. `ref_pipe` is the model before
    pruning and quantising (with its LoRAs fused; a pruned base's unpruned parent without them)."""
    from .gates import record_reference

    lat = parity_geometry(ref_pipe, opts)[2]
    ref_dir = scratch_dir(Path(out).parent, "reference")
    scratch.append(ref_dir)
    with stages(f"fp32 reference run ({truth})"):
        sched = {k: v for k, v in dict(ref_pipe.scheduler.config).items() if not k.startswith("_")}
        sched.setdefault("timestep_spacing", "leading")
        latents = np.random.default_rng(opts.parity_seed).standard_normal(
            (1, ref_pipe.vae.config.latent_channels, lat, lat), dtype=np.float32)
        reference = record_reference(ref_pipe, ref_dir, prompt=opts.parity_prompt, latents=latents,
                                     steps=opts.parity_steps, guidance=opts.default_guidance,
                                     scheduler=opts.parity_scheduler, scheduler_config=sched)
    return reference


def export_bundle(base: str | Path, out: str | Path, opts: ExportOptions = ExportOptions(),
                  stages: Stages | None = None, prompt_match=None) -> Manifest:
    """Export `base` to a bundle at `out`; returns the manifest written.

    `prompt_match(bundle_dir) -> (rate, prompts, seed)` scores how well a bundle's images match their prompts
    (for the trained tiny base the CLI hands in `sdedge.tinyworld.classifier.bundle_prompt_match`): recorded
    for the fp32 bundle and, when optimised, for the final one, in `parity.prompt_match`.

    `base` may also be an fp32 sdedge bundle: then a reduced precision is derived from it without the PyTorch model
    (export/quantize.py: derive_bundle)."""
    check_options(opts)
    # before the (long) load: a non-empty --out is replaced only when it is a bundle and holds no input
    inputs = (base, opts.base_config, opts.reference_base, opts.calibration, *(p for p, _ in opts.loras))
    check_replaceable(out, {"sdedge.json": None}, inputs, overwrite=opts.overwrite)
    if (Path(base) / "sdedge.json").is_file():
        from .quantize import derive_bundle

        if opts.decoder is not None:
            raise BadInput(f"--decoder: {base} is a bundle; a decoder is exported from the base (--base a diffusers "
                           "folder), not derived from a bundle")

        return derive_bundle(base, out, opts, stages)
    scratch: list[Path] = []  # scratch folders beside `out`, removed however the export ends
    try:
        return _export_from_base(base, out, opts, stages or Stages(quiet=True), prompt_match, scratch)
    finally:
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)


def _export_from_base(base: str | Path, out: str | Path, opts: ExportOptions, stages: Stages, prompt_match,
                      scratch: list[Path]) -> Manifest:
    from .pruned_base import resolve_parent

    pruned = read_pruned_marker(base) if Path(base).is_dir() else None
    if pruned is not None and opts.prune > 0:
        raise BadInput(f"{base} is a pruned base already (sdedge_pruned.json): export it without --prune, or prune "
                       "its parent by the ratio you want")
    if pruned is None and opts.reference_base:
        raise BadInput(f"--reference-base is for a pruned base (one written by `sdedge prune`); {base} is not one")
    parent = resolve_parent(base, pruned, opts.reference_base) if pruned is not None else None
    if opts.default_guidance is None:  # an LCM bundle runs without a guidance pass unless asked for one
        opts = replace(opts, default_guidance=1.0 if opts.default_scheduler == "lcm" else guidance_hint(base))
    optimise = opts.precision is not Precision.FP32 or opts.prune > 0 or pruned is not None
    reference = None
    if parent is not None:  # its truth is the unpruned parent, recorded and released before the pruned base loads
        with stages(f"load the unpruned parent {parent}"):
            ref_pipe = load_base(parent)
        reference = record_truth(ref_pipe, out, opts, stages, f"the unpruned parent {parent}", scratch)
        ref_pipe = None
        gc.collect()
    with stages("load base"):
        base_desc = describe_base(base)
        pipe = load_base(base, allow_pickle=opts.allow_pickle, config=opts.base_config)
    if opts.default_scheduler is None:
        opts = replace(opts, default_scheduler="euler" if is_sdxl(pipe) else "dpm++2m")
    if optimise and pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
        raise BadInput(f"{base} is an inpainting base ({pipe.unet.config.in_channels}-channel UNet): this sdedge "
                       "exports it in fp32 only, without pruning (its calibration and gates feed 4-channel latents)")
    check_lcm_steps(opts, base_scheduler_config(pipe))
    dec_pipe, dec_cfg = None, None  # the pipeline with the --decoder in place of the base VAE
    if opts.decoder is not None:
        from .decoder import decoder_pipeline, load_decoder

        with stages(f"load the decoder {opts.decoder}"):
            vae, dec_cfg = load_decoder(opts.decoder, pipe)
            dec_pipe = decoder_pipeline(pipe, vae)
    adapters: tuple[AdapterInfo, ...] = ()
    if opts.loras:
        from .lora import fuse_loras

        with stages(f"fuse {len(opts.loras)} LoRA(s)"):
            fused = fuse_loras(pipe, list(opts.loras))
        adapters = tuple(AdapterInfo(file=Path(f.path).name, sha256=f.sha256, scale=f.scale) for f in fused.loras)
    if optimise and reference is None:  # the fp32 truth (LoRAs fused), before pruning or quantising changes it
        reference = record_truth(dec_pipe or pipe, out, opts, stages, "diffusers", scratch)
    shapes, parity_size, lat = parity_geometry(pipe, opts)
    scale = pipe.vae_scale_factor
    prune_report = pruned["prune"] if pruned is not None else None
    if opts.prune > 0:
        from .prune import prune_unet

        with stages(f"prune the UNet's channels by {opts.prune:.0%} ({opts.prune_criterion})"):
            prune_report = prune_unet(pipe, opts.prune, opts.prune_criterion, latent_size=lat)
    trace_dims = {"B": 2, "h": lat, "w": lat, "H": parity_size, "W": parity_size}
    check_dims = [trace_dims, {"B": 1, "h": shapes.height_min // scale, "w": shapes.width_max // scale,
                               "H": shapes.height_min, "W": shapes.width_max}]
    names = [n for n in component_names(pipe) if n != "vae_encoder" or opts.vae_encoder]
    with staging_dir(Path(out), overwrite=opts.overwrite) as tmp:
        components, parity = {}, {}
        for name in names:
            src = dec_pipe if name == "vae_decoder" and dec_pipe is not None else pipe
            spec = component_spec(name, src)
            with stages(f"export {name}" + (f" ({type(src.vae).__name__} from {opts.decoder})" if src is dec_pipe else "")):
                info, par, _ = export_component(spec, src, tmp, trace_dims, check_dims, opts.opset)
            components[name], parity[name] = info, par
        with stages("tokenizer"):
            for tok_name in ("tokenizer", "tokenizer_2") if is_sdxl(pipe) else ("tokenizer",):
                getattr(pipe, tok_name).save_pretrained(tmp / tok_name)
                if not (tmp / tok_name / "tokenizer.json").is_file():
                    raise ExportError(f"the base's {tok_name} did not save a tokenizer.json (a fast CLIP tokenizer "
                                      "is needed)")
        sched_config = base_scheduler_config(pipe)
        manifest = Manifest(
            pipeline="sdxl" if is_sdxl(pipe) else "sd15",
            precision=opts.precision,
            components=components,
            files={},
            shapes=shapes,
            latent=LatentInfo(channels=pipe.vae.config.latent_channels, vae_scale_factor=scale,
                              scaling_factor=float(pipe.vae.config.scaling_factor),
                              decoder_scaling_factor=(float(dec_pipe.vae.config.scaling_factor)
                                                      if dec_pipe is not None else None)),
            tokenizer=TokenizerInfo(dir="tokenizer", max_length=pipe.tokenizer.model_max_length),
            scheduler=sched_config,
            defaults=Defaults(steps=opts.default_steps, guidance=opts.default_guidance,
                              scheduler=opts.default_scheduler),
            provenance=Provenance(
                base=BaseInfo(id=base_desc["id"], sha256=base_desc["sha256"]),
                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                toolchain=toolchain_versions(),
                adapters=adapters,
                prune_ratio=prune_report.ratio if prune_report is not None else 0.0,
                prune=prune_report,
                pruned_from=(BaseInfo(id=pruned["parent"]["id"], sha256=pruned["parent"]["sha256"])
                             if pruned is not None else None),
            ),
            parity=Parity(components=parity),
            **(sdxl_manifest_fields(pipe) if is_sdxl(pipe) else {}),
        )
        manifest = manifest.with_files(hash_files(tmp))
        write_manifest(tmp, manifest)
        with stages("end-to-end parity vs diffusers" + (" (with that decoder)" if dec_pipe is not None else "")):
            image = image_parity(dec_pipe or pipe, tmp, opts, parity_size)
        decoder = None
        if dec_pipe is not None:
            with stages(f"the decoder vs the base's full VAE decoder ({opts.decoder_images} generations)"):
                decoder = decoder_parity(pipe, dec_pipe, dec_cfg, opts, parity_size)
        manifest = replace(manifest, parity=Parity(components=parity, image=image, decoder=decoder))
        write_manifest(tmp, manifest)
        fp32_gate = opts.min_psnr if opts.min_psnr is not None and not optimise else 40.0
        if not image.psnr_db >= fp32_gate:
            raise ExportError(
                f"end-to-end parity: the bundle's image is {image.psnr_db:.1f} dB PSNR against diffusers, "
                f"under the gate of {fp32_gate:g} dB"
            )
        match_fp32 = None
        if prompt_match is not None:
            with stages("prompt match (fp32)"):
                match_fp32 = prompt_match(tmp)
            manifest = replace(manifest, parity=replace(manifest.parity, prompt_match=PromptMatch(
                rate=match_fp32[0], rate_fp32=None, prompts=match_fp32[1], seed=match_fp32[2])))
            write_manifest(tmp, manifest)
        if optimise:
            from .calibration import read_prompts
            from .quantize import apply_precision

            pipe = dec_pipe = None  # release PyTorch before quantising: bounded memory
            gc.collect()
            prompts, source = read_prompts(opts.calibration)
            manifest = apply_precision(
                tmp, manifest, reference, precision=opts.precision, calibration_prompts=prompts,
                calibration_source=source, calibration_steps=opts.calibration_steps, calibration_size=parity_size,
                int8_method=opts.int8_method, int8_samples=opts.int8_samples, min_cosine=opts.min_cosine,
                min_psnr=opts.min_psnr, speed_calls=opts.speed_calls, pruned=prune_report is not None, stages=stages,
                backends=list(opts.speed_backends) if opts.speed_backends else None)
            if match_fp32 is not None:
                with stages(f"prompt match ({opts.precision.value})"):
                    rate, n, seed = prompt_match(tmp)
                manifest = replace(manifest, parity=replace(manifest.parity, prompt_match=PromptMatch(
                    rate=rate, rate_fp32=match_fp32[0], prompts=n, seed=seed)))
                write_manifest(tmp, manifest)
    pipe = dec_pipe = None
    gc.collect()
    return manifest


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


def parity_run(opts: ExportOptions) -> tuple[str, int, float, int | None]:
    """(scheduler, steps, guidance, seed) of the end-to-end parity run: an LCM bundle is measured as it runs (its
    default steps, the runtime's seeded noise fed to diffusers' LCMScheduler), other bundles on the deterministic
    parity scheduler."""
    if opts.default_scheduler == "lcm":
        return "lcm", opts.default_steps, opts.default_guidance, opts.parity_seed
    return opts.parity_scheduler, opts.parity_steps, opts.default_guidance, None


def decoder_parity(pipe, dec_pipe, cfg: dict, opts: ExportOptions, size: int) -> DecoderParity:
    """The --decoder's images against the base VAE decoder's on the final latents of the base's generations."""
    from .decoder import decoder_psnr, final_latents, weights_sha256
    from .reference import diffusers_scheduler

    name, steps, guidance, _ = parity_run(opts)
    sched = diffusers_scheduler(name, base_scheduler_config(pipe))
    latents = final_latents(pipe, size, images=opts.decoder_images, steps=steps, guidance=guidance, scheduler=sched,
                            seed=opts.parity_seed)  # (N, C, h, w)
    return DecoderParity(kind=cfg["_class_name"], source=Path(opts.decoder).name, sha256=weights_sha256(opts.decoder),
                         psnr_vs_full_db=round(decoder_psnr(pipe.vae, dec_pipe.vae, latents), 3),
                         images=int(latents.shape[0]), width=size, height=size)


def image_parity(pipe, bundle_dir: Path, opts: ExportOptions, size: int) -> ImageParity:
    """Runtime image vs diffusers' StableDiffusionPipeline on the same weights, seed and initial latents."""
    from sdedge.runtime.pipeline import Pipeline

    from .reference import psnr, reference_images

    # fp32 ONNX against PyTorch: on ONNX Runtime, exact, whatever `auto` would pick on this CPU (OpenVINO bf16)
    runtime = Pipeline.load(bundle_dir, device="cpu", backend="onnxruntime", verify="off")  # not signed yet
    if runtime.is_inpaint:
        return inpaint_parity(pipe, runtime, opts, size)
    lat = runtime.manifest.latent
    latents = np.random.default_rng(opts.parity_seed).standard_normal(
        (1, lat.channels, size // lat.vae_scale_factor, size // lat.vae_scale_factor), dtype=np.float32)
    scheduler, steps, guidance, seed = parity_run(opts)
    kw = dict(steps=steps, guidance=guidance, scheduler=scheduler)
    ours = runtime.generate(opts.parity_prompt, "", width=size, height=size, latents=latents, seed=seed,
                            watermark=False, **kw).images
    runtime.close()
    ref = reference_images(pipe, opts.parity_prompt, "", latents=latents, scheduler_config=runtime.manifest.scheduler,
                           seed=seed, **kw)
    return ImageParity(psnr_db=min(psnr(ours, ref), 999.0), scheduler=scheduler, steps=steps, guidance=guidance,
                       width=size, height=size, seed=opts.parity_seed)


def parity_picture(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed (size, size, 3) uint8 picture (colour ramps, a disc) and an (size, size) uint8 mask (a centred square,
    white = repaint) for image-to-image and inpainting parity runs."""
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    disc = ((x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.06).astype(np.float64)
    rgb = np.stack([x, y, np.clip(1 - x * y + disc, 0, 1)], axis=-1)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return (rgb * 255).round().astype(np.uint8), mask


def inpaint_parity(pipe, runtime, opts: ExportOptions, size: int) -> ImageParity:
    """An inpainting bundle's end-to-end parity: its inpainting of the parity picture against diffusers'
    StableDiffusionInpaintPipeline, the same noise for both (drawn from one torch generator)."""
    from .reference import TorchNoise, psnr, reference_init_images

    scheduler, steps, guidance = opts.parity_scheduler, opts.parity_steps, opts.default_guidance
    image, mask = parity_picture(size)
    kw = dict(image=image, mask=mask, strength=1.0, steps=steps, guidance=guidance, scheduler=scheduler)
    ours = runtime.generate(opts.parity_prompt, "", rng=TorchNoise(opts.parity_seed), watermark=False, **kw).images
    runtime.close()
    ref = reference_init_images(pipe, opts.parity_prompt, "", scheduler_config=runtime.manifest.scheduler,
                                seed=opts.parity_seed, **kw)
    return ImageParity(psnr_db=min(psnr(ours, ref), 999.0), scheduler=scheduler, steps=steps, guidance=guidance,
                       width=size, height=size, seed=opts.parity_seed)
