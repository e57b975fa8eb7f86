"""Diffusers pipeline <-> one A1111/original-SD `.safetensors` file: key names and the writer.

The original (CompVis/LDM) layout that A1111, ComfyUI and diffusers' `from_single_file` read:

- UNet under `model.diffusion_model.` (input_blocks / middle_block / output_blocks, ...),
- VAE under `first_stage_model.` (encoder.down.N.block.M, mid.attn_1 with 1x1-conv q/k/v/proj_out, ...),
- CLIP text encoder under `cond_stage_model.transformer.text_model.` (transformers' own names).

`ldm_key_shapes(unet, vae, text_encoder)` gives the key -> shape map a checkpoint of that architecture must
have (used by `bases.load_base` to name a missing or mismatched tensor before loading);
`save_single_file(pipe, path)` writes the file atomically.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.tensor_files import write_safetensors

__all__ = [
    "UNET_PREFIX",
    "VAE_PREFIX",
    "TEXT_ENCODER_PREFIX",
    "unet_key_to_ldm",
    "vae_key_to_ldm",
    "text_encoder_key_to_ldm",
    "ldm_key_shapes",
    "to_ldm_state_dict",
    "save_single_file",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."

# diffusers ResnetBlock2D names -> LDM ResBlock names (UNet)
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time added conditioning
    "add_embedding.linear_2": "label_emb.0.2",
}
# diffusers VAE attention names -> LDM AttnBlock names
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}


def _cfg(config, name):
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    if value is None:
        raise SdedgeError(f"model config has no {name!r}")
    return value


def _split_param(key: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight')."""
    module, _, param = key.rpartition(".")
    return module, param


def _unmappable(component: str, key: str) -> SdedgeError:
    return SdedgeError(
        f"{component} parameter {key!r} has no place in the original SD layout "
        "(only SD1.x-architecture UNet2DConditionModel/AutoencoderKL/CLIPTextModel are supported)"
    )


def unet_key_to_ldm(key: str, config) -> str:
    """A UNet2DConditionModel state-dict key -> its original-layout key (without `model.diffusion_model.`)."""
    per_block = _cfg(config, "layers_per_block")
    if not isinstance(per_block, int):
        raise SdedgeError(f"UNet layers_per_block={per_block!r}: only one integer for all blocks is supported")
    stride = per_block + 1
    module, param = _split_param(key)
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"

    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + block * stride + layer
        if kind == "resnets":
            return f"input_blocks.{idx}.0.{_resnet_rest(rest, key)}"
        return f"input_blocks.{idx}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key)
    if m:
        return f"input_blocks.{1 + int(m[1]) * stride + per_block}.0.op.{m[2]}"

    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, layer, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * layer}.{_resnet_rest(rest, key)}"
        return f"middle_block.{2 * layer + 1}.{rest}"

    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = block * stride + layer
        if kind == "resnets":
            return f"output_blocks.{idx}.0.{_resnet_rest(rest, key)}"
        return f"output_blocks.{idx}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key)
    if m:
        block = int(m[1])
        up_types = _cfg(config, "up_block_types")
        has_attention = "CrossAttn" in up_types[block]
        return f"output_blocks.{block * stride + per_block}.{2 if has_attention else 1}.conv.{m[2]}"
    raise _unmappable("UNet", key)


def _resnet_rest(rest: str, key: str) -> str:
    module, param = _split_param(rest)
    if module not in _UNET_RESNET:
        raise _unmappable("UNet", key)
    return f"{_UNET_RESNET[module]}.{param}"


def vae_key_to_ldm(key: str, config) -> str:
    """An AutoencoderKL state-dict key -> its original-layout key (without `first_stage_model.`)."""
    n_blocks = len(_cfg(config, "up_block_types"))
    module, param = _split_param(key)
    if module in _VAE_TOP:
        return f"{_VAE_TOP[module]}.{param}"
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        part, direction, block, layer, rest = m[1], m[2], int(m[3]), int(m[4]), m[5]
        if direction == "up":
            block = n_blocks - 1 - block
        return f"{part}.{direction}.{block}.block.{layer}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key)
    if m:
        return f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
    if m and m[2] in _VAE_ATTN:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    raise _unmappable("VAE", key)


def _vae_needs_conv_shape(ldm_key: str) -> bool:
    """The LDM VAE attention projections are 1x1 convolutions: (C, C, 1, 1) where diffusers has (C, C)."""
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def text_encoder_key_to_ldm(key: str) -> str:
    """A CLIPTextModel state-dict key (flattened in transformers >= 5.6, or under `text_model.`) -> the
    original-layout key without `cond_stage_model.transformer.text_model.`."""
    return key.removeprefix("text_model.")


def _component_items(unet, vae, text_encoder) -> Iterable[tuple[str, str, object, Callable | None]]:
    """(ldm key, diffusers key, tensor, reshape) for every tensor of the three models."""
    ucfg, vcfg = unet.config, vae.config
    for key, t in unet.state_dict().items():
        yield UNET_PREFIX + unet_key_to_ldm(key, ucfg), key, t, None
    for key, t in vae.state_dict().items():
        ldm = vae_key_to_ldm(key, vcfg)
        reshape = (lambda x: x.reshape(*x.shape, 1, 1)) if _vae_needs_conv_shape(ldm) and t.dim() == 2 else None
        yield VAE_PREFIX + ldm, key, t, reshape
    for key, t in text_encoder.state_dict().items():
        yield TEXT_ENCODER_PREFIX + text_encoder_key_to_ldm(key), key, t, None


def ldm_key_shapes(unet, vae, text_encoder) -> dict[str, tuple[int, ...]]:
    """Original-layout key -> shape that a checkpoint for these models (meta-device models are fine) must hold."""
    shapes: dict[str, tuple[int, ...]] = {}
    for ldm, _key, t, reshape in _component_items(unet, vae, text_encoder):
        shape = tuple(t.shape)
        if reshape is not None:
            shape = shape + (1, 1)
        shapes[ldm] = shape
    return shapes


def to_ldm_state_dict(unet, vae, text_encoder, dtype=None) -> dict:
    """The three models' weights under original-layout keys (contiguous CPU tensors, optionally cast)."""
    out = {}
    storages: set[int] = set()
    for ldm, _key, t, reshape in _component_items(unet, vae, text_encoder):
        if ldm in out:
            raise SdedgeError(f"two parameters map to the same original key {ldm!r}")
        if t.device.type == "meta":
            raise SdedgeError(f"{ldm} has no data (a meta tensor): load the weights first")
        t = t.detach().to("cpu")
        if reshape is not None:
            t = reshape(t)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        # No copy of the weights (a 4 GB UNet stays 4 GB), except where two tensors share memory
        # (tied weights), which safetensors refuses.
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[ldm] = t
    return out


def save_single_file(pipe, path: str | os.PathLike, *, dtype=None, overwrite: bool = True) -> Path:
    """Write a diffusers SD1.x pipeline (unet, vae, text_encoder) as one original-layout `.safetensors`.

    Written through the one safetensors writer (runtime/tensor_files.py): atomically, the same bytes for the same
    weights, each tensor streamed from the models' memory (no second copy of the checkpoint). `dtype` (e.g.
    torch.float16) casts the floating-point tensors; default: as stored. Returns the path.
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise SdedgeError(f"single-file checkpoints are written as .safetensors, not {path.name!r}")
    if path.exists() and not overwrite:
        raise SdedgeError(f"{path} exists (pass overwrite=True to replace it)")
    for name in ("unet", "vae", "text_encoder"):
        if getattr(pipe, name, None) is None:
            raise SdedgeError(f"the pipeline has no {name}: cannot write a single-file checkpoint")

    state = to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, dtype=dtype)
    # SD1.x checkpoints carry CLIP's position ids; some readers (A1111 with older transformers) expect them.
    n_pos = pipe.text_encoder.config.max_position_embeddings
    state.setdefault(
        TEXT_ENCODER_PREFIX + "embeddings.position_ids", torch.arange(n_pos, dtype=torch.int64).unsqueeze(0)
    )
    return write_safetensors(path, state, {"format": "pt", "writer": "sdedge.export.single_file"}, save_file)
