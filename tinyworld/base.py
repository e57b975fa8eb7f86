"""The trained tiny base: its architecture and the weights that ship inside sdedge.

`scripts/train_tiny_base.py` trains a small SD1.5-architecture pipeline (AutoencoderKL, UNet2DConditionModel,
CLIPTextModel with a small CLIP tokenizer) on the shapes world (`sdedge.tinyworld.shapes`) and writes:

- `tinyworld/data/tiny-base.safetensors`: the three models' weights in fp16 (keys prefixed `unet.`, `vae.`,
  `text_encoder.`), upcast to fp32 when a base is written;
- `tinyworld/data/shape-classifier.safetensors`: the prompt-match classifier (`sdedge.tinyworld.classifier`);
- `tinyworld/data/tiny-base.json`: the configs the weights were trained with (the VAE's measured scaling factor
  included), the tokenizer's words, the SHA-256 of both weight files and the training record.

`TINY_ARCH` is the architecture the script starts from; a base is always built from the configs in
`tiny-base.json`, so weights and configs cannot drift apart. "tiny-random" is the same architecture with
seeded random weights (for tests that need several distinct models).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from sdedge.runtime.bundle import sha256_file
from sdedge.runtime.errors import SdedgeError

__all__ = ["TINY_ARCH", "WEIGHTS_FILE", "META_FILE", "packaged_file", "tiny_meta", "load_trained_weights"]

WEIGHTS_FILE = "tiny-base.safetensors"
META_FILE = "tiny-base.json"
PREFIXES = ("unet", "vae", "text_encoder")

# 64×64 images, a 4× VAE (16×16×4 latents), a 3-level UNet with cross-attention everywhere, a 2-layer CLIP text
# encoder of width 64. GroupNorm with 8 groups: with one group per channel a flat-coloured image loses its
# colours in the normalisation (each channel is normalised to zero mean on its own).
TINY_ARCH: dict[str, dict[str, Any]] = {
    "unet": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
        norm_num_groups=8,
        scaling_factor=1.0,  # measured by the training script: 1 / std of the training latents
    ),
    "text_encoder": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=64,
        hidden_act="quick_gelu",
        # vocab_size and the bos/eos/pad ids come from the small tokenizer
    ),
}


def packaged_file(name: str) -> Path:
    """A file shipped in `sdedge.export/data`, its SHA-256 checked against `tiny-base.json` when listed there."""
    path = Path(str(resources.files("sdedge.tinyworld").joinpath("data", name)))
    if not path.is_file():
        raise SdedgeError(f"the packaged file {path} is missing (reinstall sdedge, or run scripts/train_tiny_base.py)")
    if name != META_FILE:
        expected = tiny_meta()["files"].get(name)
        if expected is None:
            raise SdedgeError(f"{path} is not listed in {META_FILE}")
        if sha256_file(path) != expected:
            raise SdedgeError(f"{path}: SHA-256 differs from the one recorded in {META_FILE}; the file is damaged")
    return path


@lru_cache(maxsize=1)
def tiny_meta() -> dict[str, Any]:
    """The parsed `tiny-base.json` (configs, words, file hashes, training record)."""
    path = packaged_file(META_FILE)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SdedgeError(f"cannot read {path}: {e}") from e
    for key in ("configs", "words", "files"):
        if key not in meta:
            raise SdedgeError(f"{path}: no {key!r} key")
    return meta


def load_trained_weights(unet, vae, text_encoder) -> None:
    """Load the shipped fp16 weights into the three fp32 models (every key must match)."""
    from safetensors.torch import load_file

    path = packaged_file(WEIGHTS_FILE)
    tensors = load_file(str(path))
    for prefix, model in zip(PREFIXES, (unet, vae, text_encoder)):
        state = {k[len(prefix) + 1:]: v.float() for k, v in tensors.items() if k.startswith(prefix + ".")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SdedgeError(f"{path}: {prefix} weights do not fit its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
