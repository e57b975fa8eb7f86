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
so `load_pruned_unet` (export/pruned_unet.py) builds the UNet from the config on the meta device, narrows each layer to the shapes
in the weights file and then assigns the weights: the result is the same module, bit for bit, as the one
pruned in memory (the attention scale stays the parent's, as it does in memory).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sdedge.runtime.errors import BadInput

from .markers import PRUNED, PRUNED_MARKER, ParentInfo, PrunedMarker, read_pruned_marker
from .sdxl_base import base_guidance

log = logging.getLogger("sdedge.export")

def resolve_parent(folder: str | os.PathLike, note: PrunedMarker, override: str | os.PathLike | None = None) -> Path:
    """The unpruned parent of the pruned base at `folder` (its `note`), found where the note says (or at
    `override`) and checked by SHA-256."""
    from .bases import describe_base

    parent = Path(override) if override else Path(note.parent.path)
    if not parent.exists():
        raise BadInput(f"{folder} was pruned from {note.parent.path}, which is not there: pass the unpruned "
                       "base with --reference-base DIR (the parity gates measure the pruned model against it)")
    desc = describe_base(parent)
    if desc["sha256"] != note.parent.sha256:
        raise BadInput(f"--reference-base {parent}: its weights (SHA-256 {desc['sha256'][:12]}…) are not the base "
                       f"{folder} was pruned from ({note.parent.sha256[:12]}…)")
    return parent


def write_pruned_base(base: str | os.PathLike, out: str | os.PathLike, ratio: float, criterion: str = "magnitude",
                      *, latent_size: int | None = None, overwrite: bool = False, allow_pickle: bool = False,
                      config: str | os.PathLike | None = None, stages=None) -> PrunedMarker:
    """Prune `base`'s UNet by `ratio` and write the pruned base folder at `out`; returns its note."""
    import contextlib

    from .bases import _atomic_dir, _quiet, check_base_out, describe_base, hub_layout_text_encoder, load_base
    from .prune import CRITERIA, check_ratio, prune_unet

    # checked before the base is loaded (prune_unet checks again, after a load that takes a while on SD1.5)
    check_ratio(ratio, "--ratio")
    if criterion not in CRITERIA:
        raise BadInput(f"--criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
    stage = stages or (lambda _label: contextlib.nullcontext())
    if read_pruned_marker(base) is not None:
        raise BadInput(f"{base} is pruned already; prune its parent with the combined ratio instead")
    check_base_out(Path(out), overwrite, (base, config))  # before the load, and again before the write
    with stage("load base"):
        desc = describe_base(base)
        pipe = load_base(base, allow_pickle=allow_pickle, config=config)
    lat = latent_size or min(pipe.unet.config.sample_size, 32)  # the MACs are counted at 256x256 for SD1.5
    with stage(f"prune the UNet's channels by {ratio:.0%} ({criterion})"):
        report = prune_unet(pipe, ratio, criterion, latent_size=lat)
    doc = PrunedMarker(ParentInfo(desc["id"], desc["sha256"], desc["path"]), report, base_guidance(base))
    with stage("write the pruned base"), _atomic_dir(Path(out), overwrite, (base, config)) as tmp, _quiet():
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        hub_layout_text_encoder(tmp / "text_encoder")
        PRUNED.write(tmp / PRUNED_MARKER, doc)
    return doc
