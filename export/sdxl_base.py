"""SDXL bases: the built-in ones (seeded, written as diffusers folders) and loading a user's SDXL base, offline.

- `write_sdxl_base("sdxl-tiny" | "sdxl-arch", out_dir, seed=0)` writes a `StableDiffusionXLPipeline` folder:
  tokenizer + tokenizer_2 (CLIP BPE; tokenizer_2 pads with "!" as SDXL's does), text_encoder (CLIPTextModel),
  text_encoder_2 (CLIPTextModelWithProjection), a UNet with `text_time` added conditioning, the VAE and SDXL's
  Euler scheduler. "sdxl-tiny" is the SDXL topology at test size (the tiny base's small tokenizer, fp32);
  "sdxl-arch" is the real SDXL architecture (2.6 B-parameter UNet) with seeded random weights, built and written
  in fp16 one component at a time (no fp32 copy: ~5 GB for the UNet instead of 10 + 5).
- `load_sdxl_base(...)`: a local SDXL diffusers folder, or an SDXL single-file checkpoint (A1111/ComfyUI keys:
  `model.diffusion_model.`, `first_stage_model.`, `conditioner.embedders.0.transformer.text_model.`,
  `conditioner.embedders.1.model.` in OpenCLIP's layout) with a config folder, with the SD 1.5 refusals
  (export/bases.py: pickles, truncated files, mismatched keys) plus those of SDXL (a refiner-only folder, a
  checkpoint of another architecture).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.tensor_files import write_safetensors

__all__ = [
    "SDXL_BASES",
    "SDXL_SCHEDULER",
    "sdxl_configs",
    "sdxl_parameter_counts",
    "build_sdxl_pipeline",
    "write_sdxl_base",
    "folder_kind",
    "checkpoint_kind",
    "load_sdxl_folder",
    "load_sdxl_single_file",
    "sdxl_ldm_key_shapes",
    "save_sdxl_single_file",
]

logger = logging.getLogger(__name__)

SDXL_BASES = ("sdxl-tiny", "sdxl-arch")
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
SD_GUIDANCE, SDXL_GUIDANCE = 7.5, 5.0  # the default guidance of diffusers' StableDiffusionPipeline and ...XLPipeline
TE1_PREFIX = "conditioner.embedders.0.transformer.text_model."
TE2_PREFIX = "conditioner.embedders.1.model."
REFINER_TE_PREFIX = "conditioner.embedders.0.model."
TOKENIZER_2_PAD = "!"  # SDXL's tokenizer_2 (OpenCLIP bigG) pads with "!" (id 0), tokenizer with <|endoftext|>

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (EulerDiscreteScheduler)
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="leading",
    steps_offset=1,
)
# and what the SD 1.5-era schedulers read from the same file (diffusers' SDXL config carries them too)
SDXL_SCHEDULER_EXTRA = dict(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0)

_ARCH = {
    "unet": dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 × 256 + 1280
        norm_num_groups=32,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_eps=1e-5,
    ),
    "vae": dict(  # SD 1.5's VAE architecture, at SDXL's size and latent scaling
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, latent_channels=4, sample_size=1024, norm_num_groups=32, act_fn="silu",
        scaling_factor=0.13025, force_upcast=True,  # SDXL's VAE overflows in fp16
    ),
    "text_encoder": dict(  # CLIP ViT-L/14's text tower
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    ),
    "text_encoder_2": dict(  # OpenCLIP ViT-bigG/14's text tower
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
    ),
}

# The SDXL topology at test size: two text encoders of different widths (32 + 48 = the UNet's cross-attention
# width 80; different widths also keep diffusers' single-file loader from mistaking one for the other), a
# DownBlock2D first, two transformer layers in the second block, an 8x VAE: 128x128 images, 16x16 latents.
_TINY = {
    "unet": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=80,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=96,  # 6 × 8 + 48
        norm_num_groups=8,
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        sample_size=128,
        norm_num_groups=8,
        scaling_factor=0.13025,
        force_upcast=True,
    ),
    "text_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32),
    "text_encoder_2": dict(hidden_size=48, intermediate_size=53, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=48),
}


def _check_name(name: str) -> None:
    if name not in SDXL_BASES:
        raise SdedgeError(f"unknown SDXL base {name!r}; choose one of {', '.join(SDXL_BASES)}")


def _tokenizer_words(name: str) -> tuple[str, ...] | None:
    """sdxl-tiny uses the trained tiny base's small tokenizer; sdxl-arch the full CLIP one."""
    if name == "sdxl-arch":
        return None
    from sdedge.tinyworld.base import tiny_meta

    return tuple(tiny_meta()["words"])


def sdxl_configs(name: str, vocab_size: int | None = None) -> dict[str, dict[str, Any]]:
    """Constructor arguments of a built-in SDXL base's unet / vae / text_encoder / text_encoder_2 (copies).
    `vocab_size`: the tokenizer's (sdxl-tiny's text encoders are as wide as its small tokenizer)."""
    _check_name(name)
    cfg = {k: dict(v) for k, v in (_ARCH if name == "sdxl-arch" else _TINY).items()}
    vocab = vocab_size or cfg["text_encoder"].get("vocab_size", 49408)
    for part in ("text_encoder", "text_encoder_2"):
        cfg[part].update(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1)
    cfg["text_encoder"]["pad_token_id"] = vocab - 1
    cfg["text_encoder_2"]["pad_token_id"] = 0  # "!"
    return cfg


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build_part(part: str, cfg: dict[str, Any], seed: int | None, dtype=None):
    """One component, initialised from `seed` (diffusers'/transformers' default initialisation) in `dtype`
    directly (no fp32 copy), without touching the caller's RNG. seed=None: no seeding (meta-device counting)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    makers = {
        "unet": lambda: UNet2DConditionModel(**cfg),
        "vae": lambda: AutoencoderKL(**cfg),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**cfg)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
    }
    with torch.random.fork_rng(devices=[]), _default_dtype(dtype or torch.float32), _quiet_transformers():
        if seed is not None:
            torch.manual_seed(seed)
        return makers[part]().eval()


@contextlib.contextmanager
def _quiet_transformers():
    """transformers warns that the tiny tokenizer's special ids are outside a default config's vocabulary."""
    try:
        from transformers.utils import logging as tlog

        level = tlog.get_verbosity()
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover
        yield
        return
    try:
        yield
    finally:
        tlog.set_verbosity(level)


def sdxl_parameter_counts(name: str) -> dict[str, int]:
    """Parameters per component of a built-in SDXL base, counted on the meta device (no memory, no init)."""
    import torch

    cfg = sdxl_configs(name, vocab_size=None if name == "sdxl-arch" else 1000)
    counts = {}
    with torch.device("meta"):
        for part in PARTS:
            counts[part] = sum(p.numel() for p in _build_part(part, cfg[part], None).parameters())
    counts["total"] = sum(counts.values())
    return counts


def _write_tokenizers(name: str, out: Path) -> int:
    """tokenizer/ and tokenizer_2/ (pad "!") into `out`; returns the vocabulary size."""
    from .tokenizer_files import write_clip_tokenizer

    words = _tokenizer_words(name)
    write_clip_tokenizer(out / "tokenizer", words=words)
    write_clip_tokenizer(out / "tokenizer_2", words=words)
    cfg_path = out / "tokenizer_2" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["pad_token"] = TOKENIZER_2_PAD
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    vocab = json.loads((out / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    return len(vocab)


def _model_index() -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    scheduler.register_to_config(**SDXL_SCHEDULER_EXTRA)
    return scheduler


def write_sdxl_base(name: str, out_dir: str | os.PathLike, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write a built-in SDXL base as a diffusers folder (safetensors) at `out_dir`, atomically; return its path.

    Each component is built from its own seed (seed, seed+1, ... in PARTS order), saved and released before the
    next is built; sdxl-arch is built and saved in fp16, sdxl-tiny in fp32. Same name and seed: same weights.
    """
    import gc

    import torch

    from .base_io import _atomic_dir, _quiet, force_offline, hub_layout_text_encoder
    from .markers import BASE_MARKER, MARKER_FILE, BaseMarker

    force_offline()
    _check_name(name)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SdedgeError(f"seed must be a non-negative integer, got {seed!r}")
    dtype = torch.float16 if name == "sdxl-arch" else torch.float32
    out_dir = Path(out_dir)
    counts: dict[str, int] = {}
    with _atomic_dir(out_dir, overwrite) as tmp, _quiet():
        vocab = _write_tokenizers(name, tmp)
        cfg = sdxl_configs(name, vocab_size=vocab)
        for i, part in enumerate(PARTS):
            model = _build_part(part, cfg[part], seed + i, dtype)
            counts[part] = sum(p.numel() for p in model.parameters())
            model.save_pretrained(str(tmp / part), safe_serialization=True)
            del model
            gc.collect()
            logger.info("%s: %s written (%d parameters)", name, part, counts[part])
        hub_layout_text_encoder(tmp / "text_encoder")
        _scheduler().save_pretrained(str(tmp / "scheduler"))
        (tmp / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n", encoding="utf-8")
        BASE_MARKER.write(tmp / MARKER_FILE, BaseMarker(name, seed, "sdedge.export.sdxl_base", counts, trained=False,
                                                       dtype=str(dtype).removeprefix("torch.")))
    logger.info("wrote built-in base %s (seed %d) to %s", name, seed, out_dir)
    return out_dir


def build_sdxl_pipeline(name: str, seed: int = 0):
    """A built-in SDXL base as an in-memory fp32 CPU `StableDiffusionXLPipeline` (through a scratch folder)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sdedge-sdxl-") as tmp:
        folder = write_sdxl_base(name, Path(tmp) / name, seed)
        return load_sdxl_folder(folder, allow_pickle=False)


# --- which architecture is it -------------------------------------------------------------------------


def _model_index_of(folder: Path) -> dict[str, Any]:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdedgeError(f"{folder / 'model_index.json'} is corrupt: {e}") from e
    if not isinstance(index, dict):
        raise SdedgeError(f"{folder / 'model_index.json'} is not a JSON object")
    return index


def _present(index: dict[str, Any], part: str) -> bool:
    entry = index.get(part)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def folder_kind(folder: str | os.PathLike) -> str:
    """"sdxl", "sdxl-refiner" or "sd" (SD 1.x/2.x) for a diffusers folder with a model_index.json."""
    index = _model_index_of(Path(folder))
    cls = str(index.get("_class_name", ""))
    if _present(index, "text_encoder_2") or cls.startswith("StableDiffusionXL"):
        if not _present(index, "text_encoder") or index.get("requires_aesthetics_score"):
            return "sdxl-refiner"
        return "sdxl"
    return "sd"


def is_sdxl_source(base: str | os.PathLike, config: str | os.PathLike | None = None) -> bool:
    """Whether an export's base is SDXL, before it loads: a diffusers folder by its model_index.json, a single-file
    checkpoint by the --config folder it goes with (what cannot be read is not SDXL here; loading says why)."""
    folder = Path(base) if Path(base).is_dir() else (Path(config) if config is not None else None)
    if folder is None or not (folder / "model_index.json").is_file():
        return False
    try:
        return folder_kind(folder) != "sd"
    except SdedgeError:
        return False


def base_guidance(base: str | os.PathLike, config: str | os.PathLike | None = None) -> float:
    """The guidance a bundle of `base` defaults to: the base's own hint (export/markers.py), else diffusers' pipeline
    default (StableDiffusionXLPipeline 5.0, StableDiffusionPipeline 7.5)."""
    from .markers import guidance_hint

    return guidance_hint(base, SDXL_GUIDANCE if is_sdxl_source(base, config) else SD_GUIDANCE)


def checkpoint_kind(keys) -> str:
    """The architecture of a single-file checkpoint from its key names: "sdxl", "sdxl-refiner", "sd1", "sd2" or
    "unknown"."""
    keys = set(keys)
    if TE2_PREFIX + "positional_embedding" in keys:
        return "sdxl"
    if REFINER_TE_PREFIX + "positional_embedding" in keys:
        return "sdxl-refiner"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    return "unknown"


_KIND_NAMES = {"sdxl": "an SDXL base", "sdxl-refiner": "an SDXL refiner", "sd1": "an SD 1.x", "sd2": "an SD 2.x",
               "sd": "an SD 1.x", "unknown": "an unrecognised"}


def check_checkpoint_matches(source: Path, keys, config_dir: Path) -> str:
    """Refuse a single-file checkpoint whose architecture is not the config folder's; returns the kind."""
    ckpt, cfg = checkpoint_kind(keys), folder_kind(config_dir)
    if ckpt == "sdxl-refiner":
        raise SdedgeError(f"{source} is an SDXL refiner checkpoint (it has {REFINER_TE_PREFIX}positional_embedding "
                          "and no CLIP ViT-L text encoder): sdedge exports SDXL base models, not the refiner")
    if cfg == "sdxl-refiner":
        raise SdedgeError(f"config {config_dir} is an SDXL refiner folder: pass the SDXL base's folder as --config")
    want_sdxl = cfg == "sdxl"
    if (ckpt == "sdxl") != want_sdxl and ckpt != "unknown":
        clue = (f"{TE2_PREFIX}positional_embedding" if ckpt == "sdxl"
                else "cond_stage_model.* keys" if ckpt in ("sd1", "sd2") else "its keys")
        raise SdedgeError(
            f"{source} is {_KIND_NAMES[ckpt]} checkpoint ({clue}) but the config {config_dir} is "
            f"{_KIND_NAMES[cfg]} folder: pass --config with a folder of the checkpoint's own architecture"
            + (" (e.g. one written by `sdedge base sdxl-arch DIR`)" if ckpt == "sdxl" else
               " (e.g. one written by `sdedge base sd15-arch DIR`)")
        )
    return ckpt


# --- single-file keys ---------------------------------------------------------------------------------

_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def _openclip_items(text_encoder_2):
    """(OpenCLIP key without prefix, value or shape builder) for CLIPTextModelWithProjection's state dict:
    q/k/v projections concatenated into in_proj_weight/bias, text_projection transposed, as diffusers'
    `convert_open_clip_checkpoint` undoes. Yields (key, [tensors], combine) with combine: "cat" | "T" | None."""
    import re

    state = text_encoder_2.state_dict()
    for key in state:
        if key.endswith("position_ids"):
            continue
        if key in _OPENCLIP_TOP:
            yield _OPENCLIP_TOP[key], [state[key]], None
        elif key == "text_projection.weight":
            yield "text_projection", [state[key]], "T"
        else:
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
            if m is None:
                raise SdedgeError(f"text_encoder_2 parameter {key!r} has no place in the OpenCLIP layout")
            layer, module, param = m[1], m[2], m[3]
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module == "self_attn.q_proj":
                    parts = [state[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                    yield f"transformer.resblocks.{layer}.attn.in_proj_{param}", parts, "cat"
                continue
            if module not in _OPENCLIP_LAYER:
                raise SdedgeError(f"text_encoder_2 parameter {key!r} has no place in the OpenCLIP layout")
            yield f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER[module]}.{param}", [state[key]], None


def _combined_shape(tensors, combine) -> tuple[int, ...]:
    shape = tuple(tensors[0].shape)
    if combine == "cat":
        return (sum(t.shape[0] for t in tensors), *shape[1:])
    if combine == "T":
        return shape[::-1]
    return shape


def _sd_parts_items(unet, vae, text_encoder):
    """The UNet, VAE and first text encoder in the original layout (SD's writer; the text encoder moved)."""
    from .single_file import TEXT_ENCODER_PREFIX, _component_items

    for ldm, _key, t, reshape in _component_items(unet, vae, text_encoder):
        if ldm.startswith(TEXT_ENCODER_PREFIX):
            ldm = TE1_PREFIX + ldm.removeprefix(TEXT_ENCODER_PREFIX)
        yield ldm, t, reshape


def sdxl_ldm_key_shapes(unet, vae, text_encoder, text_encoder_2) -> dict[str, tuple[int, ...]]:
    """Original-layout key -> shape an SDXL checkpoint for these models (meta-device models are fine) must hold."""
    shapes = {}
    for ldm, t, reshape in _sd_parts_items(unet, vae, text_encoder):
        shapes[ldm] = tuple(t.shape) + ((1, 1) if reshape is not None else ())
    for key, tensors, combine in _openclip_items(text_encoder_2):
        shapes[TE2_PREFIX + key] = _combined_shape(tensors, combine)
    return shapes


def sdxl_ldm_state_dict(pipe, dtype=None) -> dict:
    """An SDXL pipeline's four models under original-layout keys (CPU tensors, optionally cast)."""
    import torch

    out = {}
    for ldm, t, reshape in _sd_parts_items(pipe.unet, pipe.vae, pipe.text_encoder):
        out[ldm] = reshape(t) if reshape is not None else t
    for key, tensors, combine in _openclip_items(pipe.text_encoder_2):
        t = torch.cat(tensors) if combine == "cat" else tensors[0].T if combine == "T" else tensors[0]
        out[TE2_PREFIX + key] = t
    seen: set[int] = set()
    for k, t in out.items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        if t.untyped_storage().data_ptr() in seen:  # tied or shared storage: safetensors refuses it
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_sdxl_single_file(pipe, path: str | os.PathLike, *, dtype=None) -> Path:
    """Write an SDXL pipeline as one original-layout `.safetensors` (A1111/ComfyUI keys), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise SdedgeError(f"single-file checkpoints are written as .safetensors, not {path.name!r}")
    return write_safetensors(path, sdxl_ldm_state_dict(pipe, dtype),
                             {"format": "pt", "writer": "sdedge.export.sdxl_base"}, save_file)


# --- loading ------------------------------------------------------------------------------------------


def _meta_models(config_dir: Path):
    """The four models of an SDXL diffusers folder, built from its configs on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    try:
        unet_cfg = UNet2DConditionModel.load_config(str(config_dir), subfolder="unet", local_files_only=True)
        vae_cfg = AutoencoderKL.load_config(str(config_dir), subfolder="vae", local_files_only=True)
        te_cfg = CLIPTextConfig.from_pretrained(str(config_dir), subfolder="text_encoder", local_files_only=True)
        te2_cfg = CLIPTextConfig.from_pretrained(str(config_dir), subfolder="text_encoder_2", local_files_only=True)
    except Exception as e:
        raise SdedgeError(f"cannot read the SDXL model configs in {config_dir}: {e}") from e
    with torch.device("meta"), _quiet_transformers():
        return {"unet": UNet2DConditionModel.from_config(unet_cfg), "vae": AutoencoderKL.from_config(vae_cfg),
                "text_encoder": CLIPTextModel(te_cfg), "text_encoder_2": CLIPTextModelWithProjection(te2_cfg)}


def _check_sdxl_folder(folder: Path, role: str) -> None:
    kind = folder_kind(folder)
    if kind == "sdxl-refiner":
        raise SdedgeError(
            f"{role} {folder} is an SDXL refiner (model_index.json has no text_encoder"
            f"{' and requires_aesthetics_score' if _model_index_of(folder).get('requires_aesthetics_score') else ''}): "
            "sdedge exports SDXL base models; the refiner is an img2img stage of its own and is not supported"
        )
    index = _model_index_of(folder)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        if not _present(index, part):
            raise SdedgeError(f"{folder / 'model_index.json'} has no {part}: not an SDXL base pipeline")
        if not (folder / part).is_dir():
            raise SdedgeError(f"{role} {folder} lacks the {part}/ folder named in model_index.json")


def _check_unet_conditioning(unet_config, source: Path) -> None:
    if unet_config.get("addition_embed_type") != "text_time":
        raise SdedgeError(f"{source}: the UNet's addition_embed_type is {unet_config.get('addition_embed_type')!r}, "
                          "SDXL's is 'text_time'")


def _check_loaded(pipe, source: Path) -> None:
    from .base_io import _check_meta_free

    _check_meta_free(pipe, source, PARTS)
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    cross = pipe.unet.config.cross_attention_dim
    if widths != cross:
        raise SdedgeError(f"{source}: the text encoders' widths {pipe.text_encoder.config.hidden_size} + "
                          f"{pipe.text_encoder_2.config.hidden_size} do not add up to the UNet's cross_attention_dim "
                          f"{cross}")
    ucfg = pipe.unet.config
    time_dim = ucfg.addition_time_embed_dim
    proj = pipe.text_encoder_2.config.projection_dim
    if ucfg.projection_class_embeddings_input_dim != 6 * time_dim + proj:
        raise SdedgeError(
            f"{source}: the UNet's projection_class_embeddings_input_dim {ucfg.projection_class_embeddings_input_dim} "
            f"is not 6 × addition_time_embed_dim {time_dim} + text_encoder_2's projection_dim {proj} "
            f"= {6 * time_dim + proj} (a refiner's UNet takes 5 time ids)")


def load_sdxl_folder(source: Path, allow_pickle: bool):
    """An SDXL diffusers folder as an fp32 CPU StableDiffusionXLPipeline (no watermarker), offline."""
    from diffusers import StableDiffusionXLPipeline

    from .base_io import _quiet, check_folder_weights, finish_loading
    from .markers import read_pruned_marker

    source = Path(source)
    _check_sdxl_folder(source, "base")
    meta = _meta_models(source)
    _check_unet_conditioning(meta["unet"].config, source)
    pruned = read_pruned_marker(source) is not None  # `sdedge prune`: its UNet is narrower than its config says
    load_kwargs = check_folder_weights(source, allow_pickle, meta, skip=("unet",) if pruned else ())
    if pruned:
        from .pruned_unet import load_pruned_unet

        load_kwargs["unet"] = load_pruned_unet(source / "unet")
    try:
        with _quiet(), _quiet_transformers():
            pipe = StableDiffusionXLPipeline.from_pretrained(str(source), local_files_only=True, add_watermarker=False,
                                                             **load_kwargs)
    except Exception as e:
        raise SdedgeError(f"cannot load the SDXL diffusers folder {source}: {e}") from e
    return finish_loading(pipe, source, PARTS, _check_loaded)


def load_sdxl_single_file(source: Path, found: dict[str, tuple[int, ...]], config_dir: Path):
    """An SDXL single-file checkpoint (keys already read into `found`) with the configs of `config_dir`."""
    from diffusers import StableDiffusionXLPipeline

    from .base_io import _check_shapes, _quiet, finish_loading

    check_checkpoint_matches(source, found, config_dir)
    _check_sdxl_folder(config_dir, "config")
    meta = _meta_models(config_dir)
    _check_unet_conditioning(meta["unet"].config, config_dir)
    _check_shapes(found, sdxl_ldm_key_shapes(*(meta[p] for p in PARTS)), source, f"the SDXL config in {config_dir}")
    try:
        with _quiet(), _quiet_transformers():
            pipe = StableDiffusionXLPipeline.from_single_file(str(source), config=str(config_dir),
                                                              local_files_only=True, add_watermarker=False)
    except Exception as e:
        raise SdedgeError(f"cannot load the SDXL checkpoint {source} with the configs of {config_dir}: {e}") from e
    return finish_loading(pipe, source, PARTS, _check_loaded)
