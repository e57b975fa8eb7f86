"""Base models: the built-in ones (built from configs, seeded) and loading a user's base, offline.

- `write_builtin_base("tiny" | "tiny-random" | "sd15-arch", out_dir, seed=0)` writes a diffusers folder
  (`StableDiffusionPipeline.save_pretrained`, safetensors) with SD1.5's PNDM scheduler config.
  "tiny" is the *trained* tiny base (tinyworld/base.py: a ~6 M-parameter SD1.5-architecture pipeline for
  64x64 images of coloured shapes, with a small CLIP tokenizer; its weights ship with sdedge);
  "tiny-random" is the same architecture with seeded random weights; "sd15-arch" is the real SD1.5
  architecture (860 M-parameter UNet) with seeded random weights and the real SD1.5 CLIP tokenizer;
  "tiny-inpaint" is tiny-random with SD1.5-inpainting's 9-channel UNet input (latents ⊕ mask ⊕ masked-image
  latents), written as a `StableDiffusionInpaintPipeline` folder.
- `load_base(source, allow_pickle=False, config=None)`: a local diffusers folder, or a single-file
  original-layout checkpoint (`.safetensors`; a pickle only when allowed) with `config` a local diffusers
  folder of the same architecture. Everything is checked before loading, so a problem is reported as an
  `SdedgeError` naming the file or tensor at fault; the hub is never contacted.
- `describe_base(source)`: id and SHA-256 for the bundle's provenance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sdedge.runtime.bundle import sha256_file
from sdedge.runtime.errors import SdedgeError

from .base_io import (  # noqa: F401 (re-exported: pruned_base, decoder and the tests import them from here)
    _ST_DTYPE_BYTES,
    _atomic_dir,
    _check_meta_free,
    _check_shapes,
    _is_zip,
    _pickle_key_shapes,
    _quiet,
    _rehome,
    _squeeze_trailing_ones,
    check_base_out,
    check_folder_weights,
    finish_loading,
    force_offline,
    hub_layout_text_encoder,
    read_safetensors_header,
)
from .markers import (  # noqa: F401 (read_base_marker re-exported)
    BASE_MARKER,
    MARKER_FILE,
    PRUNED_MARKER,
    BaseMarker,
    read_base_marker,
    read_pruned_marker,
)

__all__ = [
    "BUILTIN_BASES",
    "PICKLE_SUFFIXES",
    "builtin_configs",
    "build_builtin_pipeline",
    "builtin_parameter_counts",
    "write_builtin_base",
    "load_base",
    "describe_base",
    "read_safetensors_header",
    "force_offline",
]

logger = logging.getLogger(__name__)

BUILTIN_BASES = ("tiny", "tiny-random", "sd15-arch", "tiny-inpaint", "sdxl-tiny", "sdxl-arch")  # sdxl-*: sdxl_base.py
# the trained tiny base, and its architecture with seeded random weights (tiny-inpaint: with a 9-channel UNet input)
TINY_BASES = ("tiny", "tiny-random", "tiny-inpaint")
INPAINT_CHANNELS = 9  # SD1.5-inpainting's UNet input: 4 latent + 1 mask + 4 masked-image latent channels
SD_PARTS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)

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


# --- offline ------------------------------------------------------------------------------------------




# --- built-in bases -----------------------------------------------------------------------------------


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


# --- safetensors headers ------------------------------------------------------------------------------











# --- loading ------------------------------------------------------------------------------------------


def _check_diffusers_folder(folder: Path, role: str) -> None:
    if not folder.is_dir():
        raise SdedgeError(f"{role} {folder} is not a folder")
    if not (folder / "model_index.json").is_file():
        raise SdedgeError(
            f"{role} {folder} has no model_index.json: not a diffusers pipeline folder "
            "(write one with `sdedge base tiny DIR`, or save a pipeline with save_pretrained)"
        )
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdedgeError(f"{folder / 'model_index.json'} is corrupt: {e}") from e
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        entry = index.get(part)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            raise SdedgeError(f"{folder / 'model_index.json'} has no {part}: not a Stable Diffusion pipeline")
        if not (folder / part).is_dir():
            raise SdedgeError(f"{role} {folder} lacks the {part}/ folder named in model_index.json")


def _meta_models(config_dir: Path):
    """The three models of a diffusers folder built from its configs on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        unet_cfg = UNet2DConditionModel.load_config(str(config_dir), subfolder="unet", local_files_only=True)
        vae_cfg = AutoencoderKL.load_config(str(config_dir), subfolder="vae", local_files_only=True)
        text_cfg = CLIPTextConfig.from_pretrained(str(config_dir), subfolder="text_encoder", local_files_only=True)
    except Exception as e:
        raise SdedgeError(f"cannot read the model configs in {config_dir}: {e}") from e
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text_encoder = CLIPTextModel(text_cfg)
    return unet, vae, text_encoder










def _check_folder_weights(folder: Path, allow_pickle: bool, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """SD's unet, vae and text_encoder weight files checked against the folder's configs (base_io)."""
    return check_folder_weights(folder, allow_pickle, dict(zip(SD_PARTS, _meta_models(folder))), skip)


def _finish(pipe, source: Path):
    return finish_loading(pipe, source, SD_PARTS, _check_loaded)


def _check_loaded(pipe, source: Path) -> None:
    _check_meta_free(pipe, source)
    hidden = pipe.text_encoder.config.hidden_size
    cross = pipe.unet.config.cross_attention_dim
    if hidden != cross:
        raise SdedgeError(
            f"{source}: text encoder width {hidden} does not match the UNet's cross_attention_dim {cross}"
        )


def load_base(source: str | os.PathLike, *, allow_pickle: bool = False, config: str | os.PathLike | None = None):
    """Load a base as an fp32 CPU `StableDiffusionPipeline` (no safety checker), never using the network.

    `source`: a local diffusers folder (with model_index.json; safetensors weights, or pickled .bin weights
    only with `allow_pickle=True`), or a single-file checkpoint in the original SD layout: `.safetensors`,
    or a pickle (`.ckpt`/`.pt`/`.pth`/`.bin`) only with `allow_pickle=True`.
    A single file needs `config`, a local diffusers folder of the same architecture (for example one written
    by `sdedge base`), which gives the model configs, tokenizer and scheduler.
    """
    force_offline()
    source = Path(source)
    if not source.exists():
        raise SdedgeError(f"base not found: {source}")

    from .sdxl_base import check_checkpoint_matches, folder_kind, load_sdxl_folder, load_sdxl_single_file

    if source.is_dir():
        if (source / "model_index.json").is_file() and folder_kind(source) != "sd":
            return load_sdxl_folder(source, allow_pickle)
        _check_diffusers_folder(source, "base")
        if config is not None:
            logger.info("config %s ignored: the base %s is a diffusers folder", config, source)
        from .pruned_unet import load_pruned_unet

        pruned = read_pruned_marker(source) is not None  # its UNet is narrower than its config says
        load_kwargs = _check_folder_weights(source, allow_pickle, skip=("unet",) if pruned else ())
        if pruned:
            load_kwargs["unet"] = load_pruned_unet(source / "unet")
        from diffusers import StableDiffusionPipeline

        pipe = _diffusers_load(lambda: StableDiffusionPipeline.from_pretrained(str(source), **NO_SAFETY_CHECKER,
                                                                               **load_kwargs),
                               f"the diffusers folder {source}")
        return _finish(pipe, source)

    suffix = source.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise SdedgeError(
            f"{source} is a pickle checkpoint ({suffix}); pickles can run arbitrary code when loaded, so sdedge "
            "does not open them by default. Convert it to .safetensors, or pass allow_pickle=True "
            "(--allow-pickle) if you trust where it came from."
        )
    if suffix not in WEIGHT_SUFFIXES:
        raise SdedgeError(
            f"{source}: unknown base format {suffix or '(no suffix)'!r}: give a diffusers folder, a .safetensors "
            "single-file checkpoint, or (with allow_pickle) a .ckpt/.pt/.pth/.bin"
        )
    if config is None:
        raise SdedgeError(
            f"{source} is a single-file checkpoint: pass --config DIR (config=DIR), a local diffusers folder of "
            "the same architecture whose configs, tokenizer and scheduler go with it "
            "(for an SD1.5 checkpoint, e.g. one written by `sdedge base sd15-arch DIR`)"
        )
    config_dir = Path(config)
    if not config_dir.exists():
        raise SdedgeError(f"config folder not found: {config_dir}")
    if (config_dir / "model_index.json").is_file() and folder_kind(config_dir) != "sd":
        found = read_safetensors_header(source) if suffix == ".safetensors" else _pickle_key_shapes(source)
        return load_sdxl_single_file(source, found, config_dir)
    _check_diffusers_folder(config_dir, "config")

    found = read_safetensors_header(source) if suffix == ".safetensors" else _pickle_key_shapes(source)
    check_checkpoint_matches(source, found, config_dir)
    from .single_file import ldm_key_shapes

    expected = ldm_key_shapes(*_meta_models(config_dir))
    _check_shapes(found, expected, source, f"the config in {config_dir}")

    from diffusers import StableDiffusionPipeline

    pipe = _diffusers_load(lambda: StableDiffusionPipeline.from_single_file(str(source), config=str(config_dir),
                                                                            **NO_SAFETY_CHECKER),
                           f"the checkpoint {source} with the configs of {config_dir}")
    return _finish(pipe, source)


# offline, and without the safety checker and feature extractor SD1.5 folders name but sdedge never runs
NO_SAFETY_CHECKER = dict(local_files_only=True, safety_checker=None, feature_extractor=None,
                         requires_safety_checker=False)


def _diffusers_load(load, what: str):
    """diffusers' loader, quiet; its failures become an SdedgeError naming `what`."""
    try:
        with _quiet():
            return load()
    except SdedgeError:
        raise
    except Exception as e:
        raise SdedgeError(f"cannot load {what}: {e}") from e








# --- provenance ---------------------------------------------------------------------------------------


def describe_base(source: str | os.PathLike) -> dict[str, Any]:
    """Provenance of a base: {"id", "kind", "path", "sha256", "size_bytes", "files", ("builtin", "seed")}.

    For a single file, sha256 is the file's. For a folder it is the SHA-256 of the lines
    "<relative path>  <sha256 of the file>\\n" over its weight files (.safetensors/.bin/.ckpt/.pt/.pth) sorted
    by relative path: stable whatever the order files were written in, and changed by any weight change.
    """
    source = Path(source)
    if not source.exists():
        raise SdedgeError(f"base not found: {source}")
    if source.is_file():
        sha = sha256_file(source)
        return {
            "id": source.name,
            "kind": "single-file",
            "path": str(source.resolve()),
            "sha256": sha,
            "size_bytes": source.stat().st_size,
            "files": {source.name: sha},
        }
    _check_diffusers_folder(source, "base")
    weight_files = sorted(
        (p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES),
        key=lambda p: p.relative_to(source).as_posix(),
    )
    if not weight_files:
        raise SdedgeError(f"base {source} has no weight files")
    files = {p.relative_to(source).as_posix(): sha256_file(p) for p in weight_files}
    combined = hashlib.sha256("".join(f"{rel}  {sha}\n" for rel, sha in files.items()).encode("utf-8")).hexdigest()
    desc: dict[str, Any] = {
        "id": source.resolve().name,
        "kind": "diffusers-folder",
        "path": str(source.resolve()),
        "sha256": combined,
        "size_bytes": sum(p.stat().st_size for p in weight_files),
        "files": files,
    }
    info = read_base_marker(source)
    if info is not None:  # an unreadable marker (one without builtin/seed) was logged: a plain folder
        desc["builtin"], desc["seed"] = info.builtin, info.seed
        desc["id"] = f"builtin:{info.builtin}@seed{info.seed}"
    return desc
