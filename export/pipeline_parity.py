"""The export's end-to-end stages on the written fp32 bundle: its image against diffusers', a --decoder against the
base VAE decoder, the fp32 gate, and the prompt-match rate (export/build.py gives their order).

Each stage is `stage(run: ExportRun) -> None` (export/pipeline_run.py); one that does not apply returns at once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from sdedge.runtime.manifest import DecoderParity, ImageParity, PromptMatch

from .bundle_writer import write_manifest
from .onnx_export import ExportError
from .options import ExportOptions
from .pipeline_base import base_scheduler_config
from .pipeline_run import ExportRun

FP32_MIN_PSNR = 40.0  # dB: an fp32 bundle's image against diffusers'


# -- stages ---------------------------------------------------------------------------------------------------
def end_to_end_parity(run: ExportRun) -> None:
    """The runtime's image with the bundle against diffusers' on the same weights and latents (with the --decoder:
    also its images against the base's full VAE decoder), into the manifest."""
    opts, dec_pipe = run.opts, run.dec_pipe
    with run.stages("end-to-end parity vs diffusers" + (" (with that decoder)" if dec_pipe is not None else "")):
        image = image_parity(dec_pipe or run.pipe, run.tmp, opts, run.parity_size)
    decoder = None
    if dec_pipe is not None:
        with run.stages(f"the decoder vs the base's full VAE decoder ({opts.decoder_images} generations)"):
            decoder = decoder_parity(run.pipe, dec_pipe, run.dec_cfg, opts, run.parity_size)
    run.manifest = replace(run.manifest, parity=replace(run.manifest.parity, image=image, decoder=decoder))
    write_manifest(run.tmp, run.manifest)


def fp32_gate(run: ExportRun) -> None:
    """The fp32 bundle's image within --min-psnr (an fp32 export; 40 dB otherwise, or by default) of diffusers'."""
    opts = run.opts
    gate = opts.min_psnr if opts.min_psnr is not None and not run.optimise else FP32_MIN_PSNR
    psnr_db = run.manifest.parity.image.psnr_db
    if not psnr_db >= gate:
        raise ExportError(f"end-to-end parity: the bundle's image is {psnr_db:.1f} dB PSNR against diffusers, "
                          f"under the gate of {gate:g} dB")


def prompt_match_fp32(run: ExportRun) -> None:
    """How well the fp32 bundle's images match their prompts (a scorer the caller gives: the tiny base's)."""
    if run.prompt_match is None:
        return
    with run.stages("prompt match (fp32)"):
        run.match_fp32 = run.prompt_match(run.tmp)
    rate, prompts, seed = run.match_fp32
    run.manifest = replace(run.manifest, parity=replace(run.manifest.parity, prompt_match=PromptMatch(
        rate=rate, rate_fp32=None, prompts=prompts, seed=seed)))
    write_manifest(run.tmp, run.manifest)


def prompt_match_final(run: ExportRun) -> None:
    """The same for the optimised bundle, beside the fp32 rate."""
    if run.match_fp32 is None or not run.optimise:
        return
    with run.stages(f"prompt match ({run.opts.precision.value})"):
        rate, prompts, seed = run.prompt_match(run.tmp)
    run.manifest = replace(run.manifest, parity=replace(run.manifest.parity, prompt_match=PromptMatch(
        rate=rate, rate_fp32=run.match_fp32[0], prompts=prompts, seed=seed)))
    write_manifest(run.tmp, run.manifest)


# -- the parity runs ------------------------------------------------------------------------------------------
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

    from .park import is_parked, models_of, unparked
    from .reference import psnr, reference_images

    # fp32 ONNX against PyTorch: on ONNX Runtime, exact, whatever `auto` would pick on this CPU (OpenVINO bf16).
    # A parked (large) base: one component in memory at a time beside it, then diffusers' run unparked (park.py).
    memory = "low" if is_parked(pipe) else "normal"
    runtime = Pipeline.load(bundle_dir, device="cpu", backend="onnxruntime", verify="off", memory=memory)
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
    with unparked(*models_of(pipe)):
        ref = reference_images(pipe, opts.parity_prompt, "", latents=latents,
                               scheduler_config=runtime.manifest.scheduler, seed=seed, **kw)
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
