"""Structural pruning of the UNet with torch-pruning: whole channels (and attention head dimensions) removed,
so the dense kernels genuinely do less work: fewer parameters and fewer multiply-accumulates, both counted
before and after and recorded in the manifest.

    report = prune_unet(pipe, ratio=0.3, criterion="magnitude", latent_size=32)

What `ratio` removes: the same fraction of every block's *inner* widths (`_plan`): each resnet's hidden
channels, each attention's head dimensions (same dimensions in every head, heads kept) and each feed-forward's
hidden width. torch-pruning's dependency graph finds the layers coupled to each (norm2, time_emb_proj, to_k,
to_v, to_out, the GEGLU halves) and the importance criterion ranks the channels. The residual streams, skip
concatenations, time embedding, conv_in and conv_out keep their widths. Widths are rounded to the GroupNorm
group count (32 in SD1.5). At 0.3 on SD1.5 that is 30 % of each inner width, about 28 % fewer MACs.

Why not torch-pruning's MetaPruner over the whole UNet (what sdedge did first): on SD1.5's UNet its coupled
groups (the skip concatenations join the same residual stream several times) are cut several times over: at
0.3, the 320- and 640-channel streams kept every channel while every 1280-wide layer lost 80 %, 78 % of the
parameters went, and the ratio no longer said what it did.

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
MAX_RATIO = 0.9  # beyond it too few channels are left for a recovery fine-tune to win anything back


def check_ratio(ratio: float, flag: str) -> None:
    """The one rule for a prune ratio, wherever it is given (`sdedge prune --ratio`, `export --prune`)."""
    if not 0.0 < ratio <= MAX_RATIO:
        raise BadInput(f"{flag} {ratio:g}: a ratio above 0 and at most {MAX_RATIO:g} of the UNet's channels")


def _example_inputs(unet, latent_size: int, batch: int = 1):
    import torch

    g = torch.Generator().manual_seed(0)
    c = unet.config
    return {
        "sample": torch.randn(batch, c.in_channels, latent_size, latent_size, generator=g),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 77, c.cross_attention_dim, generator=g),
        **_added_conditioning(c, batch, latent_size, g),
    }


def _added_conditioning(config, batch: int, latent_size: int, g) -> dict:
    """SDXL's added conditioning (addition_embed_type "text_time"): pooled text embeds (B, P) and the six
    micro-conditioning time ids (B, 6) at the example's pixel size; nothing for an SD 1.x UNet."""
    import torch

    if config.addition_embed_type != "text_time":
        return {}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    size = float(latent_size * 8)
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]]).repeat(batch, 1)  # (B, 6)
    return {"added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, generator=g), "time_ids": time_ids}}


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


def _keep(n: int, ratio: float, multiple: int) -> int:
    """Channels kept of `n` at `ratio`: the nearest multiple of `multiple`, at least one multiple, at most n."""
    return min(n, max(multiple, int(round(n * (1.0 - ratio) / multiple)) * multiple))


def _plan(unet, graph, importance, ratio: float, multiple: int):
    """(layer, pruning function, channel indices) for each block's inner widths, least important first.

    Each group is internal to one block, so the groups are disjoint and every width is cut exactly once:
    - a resnet's hidden channels (conv1 out, norm2, time_emb_proj out, conv2 in), kept a multiple of `multiple`
      and of norm2's groups;
    - an attention's head dimensions (to_q, to_k, to_v out and to_out in, coupled by torch-pruning's graph), the
      same dimensions in every head so the head count stays;
    - a GEGLU feed-forward's hidden width (both halves of proj, ff.net.2 in).
    The residual streams, skip connections and time embedding keep their widths."""
    import math

    import torch
    import torch_pruning as tp
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    def scores(layer, fn, n):
        return importance(graph.get_pruning_group(layer, fn, idxs=list(range(n)))).reshape(-1)[:n].float()

    for m in list(unet.modules()):
        if isinstance(m, ResnetBlock2D):
            n = m.conv1.out_channels
            keep = _keep(n, ratio, math.lcm(multiple, m.norm2.num_groups))
            if keep < n:
                order = torch.argsort(scores(m.conv1, tp.prune_conv_out_channels, n))
                yield m.conv1, tp.prune_conv_out_channels, order[: n - keep].tolist()
        elif isinstance(m, Attention):
            n, heads = m.to_q.out_features, m.heads
            d = n // heads
            keep = min(d, max(1, int(round(d * (1.0 - ratio)))))
            if keep < d:  # (heads * d,) -> (heads, d): one ranking of the dimensions over all heads
                per_dim = scores(m.to_q, tp.prune_linear_out_channels, n).reshape(heads, d).sum(0)
                drop = torch.argsort(per_dim)[: d - keep]
                yield m.to_q, tp.prune_linear_out_channels, sorted(int(h * d + j) for h in range(heads) for j in drop)
        elif isinstance(m, GEGLU):
            n = m.proj.out_features // 2  # proj -> (hidden, gate) halves
            keep = _keep(n, ratio, multiple)
            if keep < n:
                per_unit = scores(m.proj, tp.prune_linear_out_channels, 2 * n).reshape(2, n).sum(0)
                drop = torch.argsort(per_unit)[: n - keep]
                yield m.proj, tp.prune_linear_out_channels, sorted([int(j) for j in drop] + [int(j) + n for j in drop])


def prune_unet(pipe, ratio: float, criterion: str = "magnitude", *, latent_size: int = 32,
               round_to: int | None = None) -> PruneReport:
    """Prune `pipe.unet` in place by `ratio` of its channels; returns the parameter and MAC counts."""
    try:
        import torch
        import torch_pruning as tp
    except ImportError:
        raise MissingDependency("--prune needs torch-pruning: pip install torch-pruning") from None
    from diffusers.models.attention_processor import AttnProcessor

    if criterion not in CRITERIA:
        raise BadInput(f"prune criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
    check_ratio(ratio, "prune ratio")
    unet = pipe.unet.eval()
    processors = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())  # plain matmuls: torch-pruning traces them (not fused SDPA)
    inputs = _example_inputs(unet, latent_size)
    with torch.no_grad():
        macs0, params0 = count_macs_params(unet, inputs)
    importance = (tp.importance.TaylorImportance() if criterion == "taylor"
                  else tp.importance.MagnitudeImportance(p=2))
    if criterion == "taylor":
        unet.zero_grad()
        g = torch.Generator().manual_seed(1)
        for _ in range(2):  # denoising loss on random latents: enough to rank channels by first-order effect
            x = _example_inputs(unet, latent_size, batch=2)
            noise = torch.randn(x["sample"].shape, generator=g)
            x["timestep"] = torch.randint(0, 1000, (2,), generator=g).float()
            out = unet(**{**x, "sample": x["sample"] + noise}).sample
            torch.nn.functional.mse_loss(out, noise).backward()
    graph = tp.DependencyGraph().build_dependency(unet, example_inputs=inputs)
    for layer, fn, idxs in _plan(unet, graph, importance, ratio, round_to or (unet.config.norm_num_groups or 32)):
        graph.get_pruning_group(layer, fn, idxs=idxs).prune()
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

