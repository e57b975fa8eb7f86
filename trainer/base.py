"""The base model for training: a local diffusers SD1.x or SDXL folder, loaded component by component, offline.

An SDXL folder (`text_encoder_2` in model_index.json) adds the second text encoder (CLIP with its projection) and
tokenizer; the trainer for it is trainer/sdxl_train.py.

The trainer does not import `sdedge.export` (the two meet only through files), so it reads the folder with
diffusers and transformers directly, refusing anything that is not a Stable Diffusion pipeline folder.

A pruned base (`sdedge prune`, marked by `sdedge_pruned.json`) has a UNet narrower than its config says, which
diffusers cannot load: its reader lives with the writer (`sdedge.export.pruned_unet.load_pruned_unet`), and the
caller hands it in as `unet_loader` (the `sdedge train` command does).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sdedge.runtime.errors import SdedgeError

from .hashing import base_sha256

__all__ = ["Base", "load_training_base", "PRUNED_MARKER"]

PRUNED_MARKER = "sdedge_pruned.json"  # written by sdedge.export.pruned_base (the note's name, export/markers.py)


@dataclass
class Base:
    path: Path
    id: str
    sha256: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler with the base's training schedule
    scheduler_config: dict  # the base's own scheduler config (for validation images)
    scheduler_class: str
    text_encoder_2: Any = None  # SDXL's second text encoder (CLIPTextModelWithProjection), else None
    tokenizer_2: Any = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def load_training_base(path: str | Path, unet_loader: Callable[[Path], Any] | None = None) -> Base:
    """The base at `path`, frozen, in fp32. `unet_loader(unet_dir)` reads a pruned base's UNet."""
    _offline()
    path = Path(path)
    if not path.is_dir():
        kind = "a single-file checkpoint" if path.is_file() else "not found"
        raise SdedgeError(
            f"--base {path}: {kind}; training needs a diffusers folder (write one with `sdedge base tiny --out DIR`, "
            "or save a pipeline with save_pretrained)"
        )
    index_file = path / "model_index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdedgeError(f"--base {path}: no model_index.json, not a diffusers pipeline folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdedgeError(f"{index_file} is corrupt: {e}") from e
    sdxl = "text_encoder_2" in index
    if sdxl and (index.get("requires_aesthetics_score") or not (index.get("text_encoder") or [None])[0]):
        raise SdedgeError(f"--base {path}: an SDXL refiner (no text_encoder, or requires_aesthetics_score); "
                          "train a LoRA on the SDXL base instead")
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (("text_encoder_2", "tokenizer_2") if sdxl else ())
    for part in parts:
        if not isinstance(index.get(part), list) or not (path / part).is_dir():
            raise SdedgeError(f"--base {path}: no {part}/ (model_index.json), not a Stable Diffusion pipeline folder")

    import logging

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dl
        from transformers.utils import logging as tl

        dl.disable_progress_bar()
        tl.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    try:
        if (path / PRUNED_MARKER).is_file():
            if unet_loader is None:
                raise SdedgeError(f"--base {path} is a pruned base: load it with "
                                  "unet_loader=sdedge.export.pruned_unet.load_pruned_unet (needs sdedge[export])")
            unet = unet_loader(path / "unet")
        else:
            unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer", local_files_only=True)
        text_encoder_2 = tokenizer_2 = None
        if sdxl:
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(str(path), subfolder="text_encoder_2",
                                                                         local_files_only=True)
            tokenizer_2 = CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer_2", local_files_only=True)
        sched_cfg = DDPMScheduler.load_config(str(path), subfolder="scheduler", local_files_only=True)
    except SdedgeError:
        raise
    except Exception as e:
        raise SdedgeError(f"cannot load the base {path}: {e}") from e
    width = text_encoder.config.hidden_size + (text_encoder_2.config.hidden_size if sdxl else 0)
    if width != unet.config.cross_attention_dim:
        which = "text encoders' widths add up to" if sdxl else "text encoder width"
        raise SdedgeError(f"--base {path}: the {which} {width}, which does not match the UNet's cross_attention_dim "
                          f"{unet.config.cross_attention_dim}")
    sched_cfg = {k: v for k, v in dict(sched_cfg).items()}
    noise_scheduler = DDPMScheduler.from_config({k: v for k, v in sched_cfg.items() if not k.startswith("_")})
    for m in (unet, vae, text_encoder) + ((text_encoder_2,) if sdxl else ()):
        m.requires_grad_(False)
        m.float()
    return Base(path=path, id=path.resolve().name, sha256=base_sha256(path), unet=unet, vae=vae,
                text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=noise_scheduler,
                scheduler_config={k: v for k, v in sched_cfg.items() if not k.startswith("_")},
                scheduler_class=str(sched_cfg.get("_class_name", "PNDMScheduler")), text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2)
