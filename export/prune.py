"""Structural pruning of the UNet with torch-pruning: whole channels (and attention head dimensions) removed,
so the dense kernels genuinely do less work: fewer parameters and fewer multiply-accumulates, both counted
before and after and recorded in the manifest.

    report = prune_unet(pipe, ratio=0.3, criterion="magnitude", latent_size=32)

torch-pruning's dependency graph keeps every coupled layer consistent (residual adds, the up blocks' skip
concatenations, the time embedding projections, GroupNorm). Channel counts are rounded to the GroupNorm group
count (32 in SD1.5) so every GroupNorm keeps its groups; conv_in and conv_out keep the latent channels; each
attention keeps its head count and loses the same dimensions in every head (`prune_head_dims`).

Criteria: "magnitude" (L2 norm of each channel's weights; no data needed) and "taylor" (first-order Taylor
importance, |w · dL/dw|, from a few denoising-loss gradients on random latents and timesteps).

Pruning random or trained weights without a recovery fine-tune costs quality: the parity gates measure how
much (UNet cosine, image PSNR against the unpruned fp32 reference). A short recovery fine-tune through the
trainer is the way to win it back. Unstructured (magnitude, per-weight) sparsity is NOT offered: zeros in a
dense weight tensor do not make dense CPU or GPU kernels any faster.
"""

from __future__ import annotations

import logging

from sdedge.runtime.errors import BadInput, MissingDependency
from sdedge.runtime.manifest import PruneReport

log = logging.getLogger("sdedge.export")

CRITERIA = ("magnitude", "taylor")


def _example_inputs(unet, latent_size: int, batch: int = 1):
    import torch

    g = torch.Generator().manual_seed(0)
    c = unet.config
    return {
        "sample": torch.randn(batch, c.in_channels, latent_size, latent_size, generator=g),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 77, c.cross_attention_dim, generator=g),
    }


def count_macs_params(unet, inputs) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(unet, inputs)
    return int(macs), int(params)


def fix_attributes(unet) -> None:
    """diffusers modules cache channel counts in attributes that forward() asserts on: bring them in line."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    for m in unet.modules():
        if isinstance(m, Attention):
            m.inner_dim = m.to_q.out_features
            m.inner_kv_dim = m.to_k.out_features
        elif isinstance(m, (Upsample2D, Downsample2D)) and getattr(m, "conv", None) is not None:
            conv = m.conv
            m.channels, m.out_channels = conv.in_channels, conv.out_channels


def prune_unet(pipe, ratio: float, criterion: str = "magnitude", *, latent_size: int = 32,
               round_to: int | None = None) -> PruneReport:
    """Prune `pipe.unet` in place by `ratio` of its channels; returns the parameter and MAC counts."""
    try:
        import torch
        import torch_pruning as tp
    except ImportError:
        raise MissingDependency("--prune needs torch-pruning: pip install torch-pruning") from None
    from diffusers.models.attention_processor import Attention, AttnProcessor

    if criterion not in CRITERIA:
        raise BadInput(f"prune criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
    if not 0.0 < ratio < 1.0:
        raise BadInput(f"prune ratio {ratio:g}: must be between 0 and 1")
    unet = pipe.unet.eval()
    processors = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())  # plain matmuls: torch-pruning traces them (not fused SDPA)
    inputs = _example_inputs(unet, latent_size)
    with torch.no_grad():
        macs0, params0 = count_macs_params(unet, inputs)
    num_heads = {}
    for m in unet.modules():
        if isinstance(m, Attention):
            for lin in (m.to_q, m.to_k, m.to_v):
                num_heads[lin] = m.heads
    groups = unet.config.norm_num_groups or 32
    importance = (tp.importance.TaylorImportance() if criterion == "taylor"
                  else tp.importance.MagnitudeImportance(p=2))
    pruner = tp.pruner.MetaPruner(
        unet, inputs, importance=importance, pruning_ratio=ratio, ignored_layers=[unet.conv_in, unet.conv_out],
        round_to=round_to or groups, num_heads=num_heads, prune_head_dims=True, prune_num_heads=False,
    )
    if criterion == "taylor":
        unet.zero_grad()
        g = torch.Generator().manual_seed(1)
        for _ in range(2):  # denoising loss on random latents: enough to rank channels by first-order effect
            x = _example_inputs(unet, latent_size, batch=2)
            noise = torch.randn(x["sample"].shape, generator=g)
            x["timestep"] = torch.randint(0, 1000, (2,), generator=g).float()
            out = unet(x["sample"] + noise, x["timestep"], x["encoder_hidden_states"]).sample
            torch.nn.functional.mse_loss(out, noise).backward()
    pruner.step()
    unet.zero_grad(set_to_none=True)
    fix_attributes(unet)
    with torch.no_grad():
        macs1, params1 = count_macs_params(unet, inputs)
        out = unet(**inputs).sample
    if out.shape != inputs["sample"].shape:
        raise BadInput(f"pruning broke the UNet: output {tuple(out.shape)} for input {tuple(inputs['sample'].shape)}")
    try:
        unet.set_attn_processor(processors)
    except Exception:  # processors bound to the old shapes: the defaults work for any width
        unet.set_default_attn_processor()
    log.info("pruned UNet %.0f%% (%s): %.1f M -> %.1f M parameters, %.2f -> %.2f GMACs", ratio * 100, criterion,
             params0 / 1e6, params1 / 1e6, macs0 / 1e9, macs1 / 1e9)
    shape = "x".join(str(d) for d in inputs["sample"].shape)
    return PruneReport(ratio=ratio, criterion=criterion, params_before=params0, params_after=params1,
                       macs_before=macs0, macs_after=macs1, macs_shape=shape)

