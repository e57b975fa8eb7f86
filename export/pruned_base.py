"""A pruned base: an ordinary diffusers folder whose UNet has fewer channels, and the note of where it came from.

    sdedge prune sd15/ --ratio 0.3 --out sd15-p30/                           # write_pruned_base
    sdedge train --base sd15-p30/ --distill-from sd15/ --data d/ --out rec/    # recovery fine-tune (a LoRA)
    sdedge export --base sd15-p30/ --lora rec/adapter.safetensors --out bundle/  # gates measured against sd15/

Layout: the parent's folder (text encoder, VAE, tokenizer, scheduler, model_index.json) with `unet/` holding
the pruned weights and the parent's unchanged config, plus `sdedge_pruned.json`:

    {"format": "sdedge-pruned-base", "version": 1,
     "parent": {"id", "sha256", "path"},        # the unpruned base: the truth the parity gates measure against
     "prune": {ratio, criterion, params_before, params_after, macs_before, macs_after, macs_shape},
     "default_guidance": 7.5}

diffusers' config cannot describe per-layer widths (torch-pruning narrows every coupled group separately),
so `load_pruned_unet` builds the UNet from the config on the meta device, narrows each layer to the shapes
in the weights file and then assigns the weights: the result is the same module, bit for bit, as the one
pruned in memory (the attention scale stays the parent's, as it does in memory).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sdedge.runtime.errors import BadInput, SdedgeError
from sdedge.runtime.manifest import PruneReport

log = logging.getLogger("sdedge.export")

PRUNED_MARKER = "sdedge_pruned.json"
FORMAT = "sdedge-pruned-base"


def read_pruned_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The pruned base's note, or None for an ordinary base; a damaged note is an error naming the file."""
    path = Path(folder) / PRUNED_MARKER
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT or doc.get("version") != 1:
            raise ValueError(f"not an {FORMAT} version 1 note")
        doc["prune"] = PruneReport(**doc["prune"])
        for key in ("id", "sha256", "path"):
            if not isinstance(doc["parent"][key], str):
                raise ValueError(f"parent.{key} missing")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SdedgeError(f"{path} is damaged ({e}); prune the parent base again with `sdedge prune`") from e
    return doc


def resolve_parent(folder: str | os.PathLike, note: dict[str, Any], override: str | os.PathLike | None = None) -> Path:
    """The unpruned parent of the pruned base at `folder` (its `note`), found where the note says (or at
    `override`) and checked by SHA-256."""
    from .bases import describe_base

    parent = Path(override) if override else Path(note["parent"]["path"])
    if not parent.exists():
        raise BadInput(f"{folder} was pruned from {note['parent']['path']}, which is not there: pass the unpruned "
                       "base with --reference-base DIR (the parity gates measure the pruned model against it)")
    desc = describe_base(parent)
    if desc["sha256"] != note["parent"]["sha256"]:
        raise BadInput(f"--reference-base {parent}: its weights (SHA-256 {desc['sha256'][:12]}…) are not the base "
                       f"{folder} was pruned from ({note['parent']['sha256'][:12]}…)")
    return parent


def write_pruned_base(base: str | os.PathLike, out: str | os.PathLike, ratio: float, criterion: str = "magnitude",
                      *, latent_size: int | None = None, overwrite: bool = False, allow_pickle: bool = False,
                      config: str | os.PathLike | None = None, stages=None) -> dict[str, Any]:
    """Prune `base`'s UNet by `ratio` and write the pruned base folder at `out`; returns its note."""
    import contextlib

    from .bases import _atomic_dir, _quiet, describe_base, hub_layout_text_encoder, load_base
    from .build import guidance_hint
    from .prune import CRITERIA, check_ratio, prune_unet

    # checked before the base is loaded (prune_unet checks again, after a load that takes a while on SD1.5)
    check_ratio(ratio, "--ratio")
    if criterion not in CRITERIA:
        raise BadInput(f"--criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
    stage = stages or (lambda _label: contextlib.nullcontext())
    if read_pruned_marker(base) is not None:
        raise BadInput(f"{base} is pruned already; prune its parent with the combined ratio instead")
    with stage("load base"):
        desc = describe_base(base)
        pipe = load_base(base, allow_pickle=allow_pickle, config=config)
    lat = latent_size or min(pipe.unet.config.sample_size, 32)  # the MACs are counted at 256x256 for SD1.5
    with stage(f"prune the UNet's channels by {ratio:.0%} ({criterion})"):
        report = prune_unet(pipe, ratio, criterion, latent_size=lat)
    doc = {"format": FORMAT, "version": 1,
           "parent": {"id": desc["id"], "sha256": desc["sha256"], "path": desc["path"]},
           "prune": asdict(report), "default_guidance": guidance_hint(base)}
    with stage("write the pruned base"), _atomic_dir(Path(out), overwrite) as tmp, _quiet():
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        hub_layout_text_encoder(tmp / "text_encoder")
        (tmp / PRUNED_MARKER).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    doc["prune"] = report
    return doc


# -- loading ------------------------------------------------------------------------------------------------------
def _narrow(module, name: str, shape: tuple[int, ...]) -> None:
    """Give `module` the widths that a weight of `shape` at `name` implies (the attributes forward() reads)."""
    import torch

    kind = type(module).__name__
    if name == "weight":
        if isinstance(module, torch.nn.Conv2d):
            module.out_channels, module.in_channels = shape[0], shape[1] * module.groups
        elif isinstance(module, torch.nn.Linear):
            module.out_features, module.in_features = shape[0], shape[1]
        elif isinstance(module, torch.nn.GroupNorm):
            module.num_channels = shape[0]
        elif isinstance(module, torch.nn.LayerNorm):
            module.normalized_shape = tuple(shape)
        else:
            raise SdedgeError(f"pruned UNet: cannot narrow a {kind} ({name} {shape})")
    setattr(module, name, torch.nn.Parameter(torch.empty(shape, device="meta")))


def load_pruned_unet(unet_dir: str | os.PathLike):
    """The pruned UNet in `unet_dir` (config.json + diffusion_pytorch_model.safetensors), in fp32 on the CPU."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from .prune import fix_attributes

    unet_dir = Path(unet_dir)
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise SdedgeError(f"{unet_dir}: no diffusion_pytorch_model.safetensors (a pruned UNet is saved as safetensors)")
    try:
        config = UNet2DConditionModel.load_config(str(unet_dir), local_files_only=True)
        state = load_file(str(weights))
    except Exception as e:
        raise SdedgeError(f"cannot read the pruned UNet in {unet_dir}: {e}") from e
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    own = dict(unet.named_parameters())
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unknown or missing:
        raise SdedgeError(f"{weights}: keys do not match the UNet of its config.json "
                          f"(unexpected {unknown[:3]}, missing {missing[:3]})")
    for key, tensor in state.items():
        owner, _, attr = key.rpartition(".")
        if tuple(own[key].shape) != tuple(tensor.shape):
            _narrow(unet.get_submodule(owner), attr, tuple(tensor.shape))
    unet.load_state_dict({k: v.float() for k, v in state.items()}, assign=True, strict=True)
    fix_attributes(unet)
    for name, buf in unet.named_buffers():
        if buf.device.type == "meta":  # pragma: no cover - SD1.x UNets have no buffers
            raise SdedgeError(f"pruned UNet: buffer {name} has no value in {weights}")
    return unet.eval()
