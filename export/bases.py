"""Loading a user's base, offline, and its provenance (the built-in bases: export/builtin_bases.py).

- `load_base(source, allow_pickle=False, config=None)`: a local diffusers folder, or a single-file
  original-layout checkpoint (`.safetensors`; a pickle only when allowed) with `config` a local diffusers
  folder of the same architecture. Everything is checked before loading, so a problem is reported as an
  `SdedgeError` naming the file or tensor at fault; the hub is never contacted. SDXL folders and files go to
  export/sdxl_base.py; what both share (offline, headers, shapes, atomic folders) is export/base_io.py's.
- `describe_base(source)`: id and SHA-256 for the bundle's provenance.

The built-in bases' names are re-exported here, where the rest of sdedge has always imported them from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
from .builtin_bases import (  # noqa: F401 (re-exported: sdedge imports the built-ins from here)
    BUILTIN_BASES,
    SD15_SCHEDULER,
    build_builtin_pipeline,
    builtin_configs,
    builtin_parameter_counts,
    write_builtin_base,
)
from .markers import read_base_marker, read_pruned_marker  # noqa: F401 (read_base_marker re-exported)

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

SD_PARTS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


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
