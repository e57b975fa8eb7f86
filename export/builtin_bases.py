"""The built-in bases: built from configs, seeded, written as diffusers folders (export/bases.py loads a user's).

- `write_builtin_base("tiny" | "tiny-random" | "sd15-arch" | "tiny-inpaint" | "sdxl-tiny" | "sdxl-arch", out_dir,
  seed=0)` writes a diffusers folder (`StableDiffusionPipeline.save_pretrained`, safetensors) with SD1.5's PNDM
  scheduler config. "tiny" is the *trained* tiny base (tinyworld/base.py: a ~6 M-parameter SD1.5-architecture
  pipeline for 64x64 images of coloured shapes, with a small CLIP tokenizer; its weights ship with sdedge);
  "tiny-random" is the same architecture with seeded random weights; "sd15-arch" is the real SD1.5
  architecture (860 M-parameter UNet) with seeded random weights and the real SD1.5 CLIP tokenizer;
  "tiny-inpaint" is tiny-random with SD1.5-inpainting's 9-channel UNet input (latents ⊕ mask ⊕ masked-image
  latents), written as a `StableDiffusionInpaintPipeline` folder. The sdxl-* ones are export/sdxl_base.py's.
- `build_builtin_pipeline(name, seed)`: the same pipeline in memory; `builtin_configs(name)`,
  `builtin_parameter_counts(name)`: its constructor arguments and sizes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sdedge.runtime.errors import SdedgeError

from .base_io import _atomic_dir, _quiet, force_offline, hub_layout_text_encoder
from .markers import BASE_MARKER, MARKER_FILE, BaseMarker

__all__ = ["BUILTIN_BASES", "SD15_SCHEDULER", "builtin_configs", "build_builtin_pipeline", "builtin_parameter_counts",
           "write_builtin_base"]

logger = logging.getLogger("sdedge.export.bases")  # the name its messages always had

BUILTIN_BASES = ("tiny", "tiny-random", "sd15-arch", "tiny-inpaint", "sdxl-tiny", "sdxl-arch")  # sdxl-*: sdxl_base.py
# the trained tiny base, and its architecture with seeded random weights (tiny-inpaint: with a 9-channel UNet input)
TINY_BASES = ("tiny", "tiny-random", "tiny-inpaint")
INPAINT_CHANNELS = 9  # SD1.5-inpainting's UNet input: 4 latent + 1 mask + 4 masked-image latent channels

# SD1.5's scheduler/scheduler_config.json. clip_sample is not a PNDM argument, but SD1.5 carries it so that
# a DDIM scheduler made from this config does not clip (DDIM's default is to clip).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd15-arch": {
        "unet": dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
            act_fn="silu",
            center_input_sample=False,
            downsample_padding=1,
            flip_sin_to_cos=True,
            freq_shift=0,
            mid_block_scale_factor=1,
            norm_eps=1e-5,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            norm_num_groups=32,
            act_fn="silu",
            scaling_factor=0.18215,
        ),
        "text_encoder": dict(  # CLIP ViT-L/14's text tower
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=768,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
    },
}


def _check_builtin(name: str) -> None:
    if name not in BUILTIN_BASES:
        raise SdedgeError(f"unknown built-in base {name!r}; choose one of {', '.join(BUILTIN_BASES)}")


def builtin_configs(name: str) -> dict[str, dict[str, Any]]:
    """The unet / vae / text_encoder constructor arguments of a built-in base (copies)."""
    _check_builtin(name)
    if name.startswith("sdxl"):
        from .sdxl_base import sdxl_configs

        return sdxl_configs(name)
    if name in TINY_BASES:
        from sdedge.tinyworld.base import tiny_meta

        configs = {k: dict(v) for k, v in tiny_meta()["configs"].items()}
        if name == "tiny-inpaint":
            configs["unet"]["in_channels"] = INPAINT_CHANNELS
        return configs
    return {k: dict(v) for k, v in _CONFIGS[name].items()}


def _tokenizer_words(name: str) -> tuple[str, ...] | None:
    """The words of a built-in base's small tokenizer; None: the full SD1.5 CLIP tokenizer."""
    if name in TINY_BASES:
        from sdedge.tinyworld.base import tiny_meta

        return tuple(tiny_meta()["words"])
    return None


def _check_seed(name: str, seed: object) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SdedgeError(f"seed must be a non-negative integer, got {seed!r}")
    if name == "tiny" and seed != 0:
        raise SdedgeError("the built-in tiny base is trained: its weights are fixed, so --seed does not apply "
                          "(use tiny-random for seeded random weights of the same architecture)")


def _build_models(name: str, seed: int | None):
    """UNet, VAE and text encoder of a built-in base, each initialised from its own seed (seed, seed+1,
    seed+2) with diffusers' and transformers' default initialisation, without touching the caller's RNG;
    "tiny" then gets its trained weights. seed=None builds without seeding (for meta-device construction)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = builtin_configs(name)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg["unet"])
        if seed is not None:
            torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**cfg["vae"])
        if seed is not None:
            torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    if name == "tiny" and seed is not None:
        from sdedge.tinyworld.base import load_trained_weights

        load_trained_weights(unet, vae, text_encoder)
    return unet.eval(), vae.eval(), text_encoder.eval()


def builtin_parameter_counts(name: str) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, no init)."""
    import torch

    if name.startswith("sdxl"):
        from .sdxl_base import sdxl_parameter_counts

        return sdxl_parameter_counts(name)

    with torch.device("meta"):
        unet, vae, text_encoder = _build_models(name, seed=None)
    counts = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
    }
    counts["total"] = sum(counts.values())
    return counts


def _sd15_scheduler():
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(**SD15_SCHEDULER)
    scheduler.register_to_config(clip_sample=False)
    return scheduler


def build_builtin_pipeline(name: str, seed: int = 0, *, tokenizer_dir: str | os.PathLike | None = None):
    """A built-in base as an in-memory fp32 CPU `StableDiffusionPipeline` (tiny-inpaint:
    `StableDiffusionInpaintPipeline`)."""
    force_offline()
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from .tokenizer_files import write_clip_tokenizer

    _check_builtin(name)
    _check_seed(name, seed)
    if name.startswith("sdxl"):
        from .sdxl_base import build_sdxl_pipeline

        return build_sdxl_pipeline(name, seed)
    unet, vae, text_encoder = _build_models(name, seed)
    with tempfile.TemporaryDirectory(prefix="sdedge-tok-") as tmp:
        tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else \
            write_clip_tokenizer(Path(tmp) / "tokenizer", words=_tokenizer_words(name))
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    cls = StableDiffusionInpaintPipeline if unet.config.in_channels == INPAINT_CHANNELS else StableDiffusionPipeline
    return cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_builtin_base(name: str, out_dir: str | os.PathLike, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Build a built-in base and write it as a diffusers folder (safetensors) at `out_dir`; return its path.

    Written to a temporary folder and renamed into place. An existing non-empty `out_dir` is refused unless
    `overwrite=True`. Two writes with the same name and seed give identical weights.
    """
    force_offline()
    from .tokenizer_files import write_clip_tokenizer

    _check_builtin(name)
    _check_seed(name, seed)
    if name.startswith("sdxl"):
        from .sdxl_base import write_sdxl_base

        return write_sdxl_base(name, out_dir, seed, overwrite=overwrite)
    out_dir = Path(out_dir)
    with _atomic_dir(out_dir, overwrite) as tmp, _quiet():
        tok_dir = write_clip_tokenizer(tmp / ".tokenizer", words=_tokenizer_words(name))
        pipe = build_builtin_pipeline(name, seed, tokenizer_dir=tok_dir)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        hub_layout_text_encoder(tmp / "text_encoder")
        # Our tokenizer files are canonical (vocab.json/merges.txt plus the config SD1.5 pipelines expect).
        shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
        os.replace(tok_dir, tmp / "tokenizer")
        guidance = None
        if name == "tiny":
            from sdedge.tinyworld.base import tiny_meta

            guidance = tiny_meta()["default_guidance"]
        BASE_MARKER.write(tmp / MARKER_FILE, BaseMarker(name, seed, "sdedge.export.bases", _param_counts(pipe),
                                                       trained=name == "tiny", default_guidance=guidance))
    logger.info("wrote built-in base %s (seed %d) to %s", name, seed, out_dir)
    return out_dir


def _param_counts(pipe) -> dict[str, int]:
    return {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "vae", "text_encoder")}
