"""The reader of a pruned base's UNet (its writer is pruned_base.py).

diffusers' config cannot describe per-layer widths (torch-pruning narrows every coupled group separately),
so `load_pruned_unet` builds the UNet from the config on the meta device, narrows each layer to the shapes
in the weights file and then assigns the weights: the result is the same module, bit for bit, as the one
pruned in memory (the attention scale stays the parent's, as it does in memory).
"""

from __future__ import annotations

import os
from pathlib import Path

from sdedge.runtime.errors import SdedgeError


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
