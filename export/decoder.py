"""A bundle's vae_decoder from another decoder than the base VAE's (`sdedge export --decoder DIR`).

    read_decoder_config(DIR)            config.json of a diffusers AutoencoderTiny (TAESD) or AutoencoderKL folder
    load_decoder(DIR, pipe)             the model, checked against the base's latent space (channels, scale factor)
    decoder_pipeline(pipe, vae)         diffusers' StableDiffusionPipeline using it (the parity truth)
    decoder_psnr(pipe, dec_pipe, ...)   its images against the base's own VAE decoder on the same final latents

A TAESD-architecture AutoencoderTiny decodes the UNet's latents divided by its own scaling_factor (1.0), not by the
base VAE's 0.18215: diffusers' pipeline divides by `vae.config.scaling_factor`, and so does the runtime, which
reads it from the manifest (`latent.decoder_scaling_factor`). The checks can only see shapes: TAESD for SDXL has
SD1.5's channels and scale factor, so the PSNR against the full decoder recorded in the manifest is what shows a
decoder for another latent space.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sdedge.runtime.bundle import sha256_file
from sdedge.runtime.errors import BadInput

DECODER_CLASSES = ("AutoencoderTiny", "AutoencoderKL")
WEIGHTS = "diffusion_pytorch_model.safetensors"
PROMPTS = ("a red circle on a blue background", "a green square on a yellow background",
           "a blue triangle on a white background", "a yellow star on a black background")


def read_decoder_config(folder: str | Path) -> dict:
    """The folder's config.json, refused unless it is an AutoencoderTiny or AutoencoderKL with safetensors weights."""
    folder = Path(folder)
    where = f"--decoder {folder}"
    if not folder.is_dir():
        raise BadInput(f"{where}: no such folder (a diffusers AutoencoderTiny folder, e.g. madebyollin/taesd)")
    path = folder / "config.json"
    if not path.is_file():
        raise BadInput(f"{where}: no config.json; expected a diffusers AutoencoderTiny folder (config.json + {WEIGHTS})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: not valid JSON ({exc})") from None
    kind = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if kind not in DECODER_CLASSES:
        raise BadInput(f"{path}: _class_name is {kind!r}, neither AutoencoderTiny (TAESD) nor AutoencoderKL: "
                       "not a decoder sdedge can export")
    if not (folder / WEIGHTS).is_file():
        raise BadInput(f"{where}: no {WEIGHTS} (weights are read as safetensors only)")
    return cfg


def scale_factor(cfg: dict) -> int:
    """Pixels per latent of a decoder's config."""
    if cfg["_class_name"] == "AutoencoderTiny":
        blocks = len(cfg.get("decoder_block_out_channels", (64, 64, 64, 64)))
        return int(cfg.get("upsampling_scaling_factor", 2)) ** (blocks - 1)
    return 2 ** (len(cfg.get("block_out_channels", (64,))) - 1)


def check_decoder(cfg: dict, folder: str | Path, pipe) -> None:
    """Refuse a decoder of another latent space: its latent channels and scale factor against the base's."""
    kind = cfg["_class_name"]
    channels, factor = int(cfg.get("latent_channels", 4)), scale_factor(cfg)
    want_c, want_f = int(pipe.unet.config.in_channels), int(pipe.vae_scale_factor)
    if (channels, factor) != (want_c, want_f):
        raise BadInput(
            f"--decoder {folder}: an {kind} with {channels} latent channels and a scale factor of {factor} (pixels per "
            f"latent), but the base has {want_c} latent channels and a scale factor of {want_f}: a decoder for "
            "another latent space (SD1.5's TAESD is madebyollin/taesd)")


def load_decoder(folder: str | Path, pipe):
    """(the decoder model, its config), checked against `pipe`'s latent space."""
    import diffusers

    from .bases import _quiet

    cfg = read_decoder_config(folder)
    check_decoder(cfg, folder, pipe)
    cls = getattr(diffusers, cfg["_class_name"])
    try:
        with _quiet():
            vae = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except Exception as exc:  # noqa: BLE001 - a folder diffusers cannot load: name it
        raise BadInput(f"--decoder {folder}: diffusers cannot load this {cfg['_class_name']}: {exc}") from None
    return vae.eval().float(), cfg


def decoder_pipeline(pipe, vae):
    """The base pipeline with `vae` in place of its VAE (the same UNet, text encoder, tokenizer and scheduler)."""
    from diffusers import StableDiffusionPipeline

    from .bases import _quiet

    parts = {k: v for k, v in pipe.components.items() if k not in ("safety_checker", "feature_extractor")}
    with _quiet():
        return StableDiffusionPipeline(**{**parts, "vae": vae}, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


def final_latents(pipe, size: int, *, images: int, steps: int, guidance: float, scheduler, seed: int) -> torch.Tensor:
    """Final latents of the base's own generations (B, C, size/f, size/f), the UNet's scale, for decoder figures."""
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(images)]
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                   generator=gen, output_type="latent")
    return out.images


def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """(B, C, h, w) UNet latents -> (B, H, W, 3) float images in [0, 1], dividing by the decoder's own scaling."""
    with torch.inference_mode():
        x = vae.decode(latents / float(vae.config.scaling_factor), return_dict=False)[0]  # (B, 3, H, W)
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


def mean_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the PSNR in dB of float images in [0, 1] (each capped at 99 dB)."""
    from .reference import psnr

    return float(np.mean([min(psnr(x, y), 99.0) for x, y in zip(a, b)]))


def decoder_psnr(full_vae, vae, latents: torch.Tensor) -> float:
    return mean_psnr(decode(vae, latents), decode(full_vae, latents))


def weights_sha256(folder: str | Path) -> str:
    return sha256_file(Path(folder) / WEIGHTS)
