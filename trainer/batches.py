"""What one micro-step of training reads: its latents, noise, timesteps and captions (`Batches`), and the caches
of VAE latent distributions and text embeddings that spare the encoders at every step.

Every random draw of micro-step m for global batch slot s comes from a generator seeded by (seed, "sample", m, s)
(trainer/dataset.py's `seed_for`), so a batch is a pure function of the micro-step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .dataset import image_tensor, seed_for

__all__ = ["Batch", "Batches", "latent_cache", "text_cache", "timestep_weights", "tokenize"]


@dataclass
class Batch:
    latents: Any  # (b, 4, H/8, W/8), scaled by the VAE's scaling factor
    noise: Any  # (b, 4, H/8, W/8)
    timesteps: Any  # (b,) int64 in [0, T)
    captions: list[str]
    micro: int  # the micro-step it belongs to (for further seeded draws, e.g. LCM's)
    slots: list[int]  # the global batch slots of this process, one per row


def tokenize(tokenizer, texts):
    """Token ids (b, 77) of `texts`, padded and truncated to the tokenizer's length."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def latent_cache(vae, data, device) -> list:
    """(mean, std) of the VAE's latent distribution of every item, on the CPU in fp32."""
    import torch

    cache = []
    with torch.no_grad():
        for it in data.items:
            dist = vae.encode(image_tensor(it.image)[None].to(device)).latent_dist
            cache.append((dist.mean[0].float().cpu(), dist.std[0].float().cpu()))
    return cache


def text_cache(text_encoder, tokenizer, data, device) -> dict:
    """caption -> the text encoder's last hidden state (77, d) for every distinct caption, on the CPU in fp32."""
    import torch

    cache = {}
    with torch.no_grad():
        for text in sorted({it.text for it in data.items}):
            cache[text] = text_encoder(tokenize(tokenizer, [text]).to(device))[0][0].float().cpu()
    return cache


def timestep_weights(cfg, T: int):
    """The (T,) sampling weights of the training timesteps under --timestep-bias-strategy (None: uniform): the
    biased portion, the last (later, the noisiest) or first (earlier) round(portion · T) timesteps, weighs
    `timestep_bias_multiplier` times the rest, as diffusers' train_text_to_image_sdxl.py `generate_timestep_weights`."""
    import torch

    if cfg.timestep_bias_strategy == "none":
        return None
    weights = torch.ones(T, dtype=torch.float64)
    n = max(1, round(cfg.timestep_bias_portion * T))
    part = slice(T - n, T) if cfg.timestep_bias_strategy == "later" else slice(0, n)
    weights[part] *= cfg.timestep_bias_multiplier
    return weights / weights.sum()


class Batches:
    """The tensors of one micro-step on this process, from the plan and the per-slot generators."""

    stream = "sample"  # the label of this stream's seeds (trainer/prior.py's prior batches draw their own)

    def __init__(self, cfg, base, data, plan, accelerator, latent_cache):
        self.cfg, self.base, self.data, self.plan = cfg, base, data, plan
        self.acc = accelerator
        self.latent_cache = latent_cache
        self.scaling = float(base.vae.config.scaling_factor)
        self.T = int(base.noise_scheduler.config.num_train_timesteps)
        self.timestep_weights = timestep_weights(cfg, self.T)

    def _stats(self, mine: list[int]) -> list:
        import torch

        if self.latent_cache is not None:
            return [self.latent_cache[i] for i in mine]
        pixels = torch.stack([image_tensor(self.data.items[i].image) for i in mine]).to(self.acc.device)
        with torch.no_grad():
            dist = self.base.vae.encode(pixels).latent_dist
        return [(dist.mean[k].float().cpu(), dist.std[k].float().cpu()) for k in range(len(mine))]

    def __call__(self, micro: int) -> Batch:
        import torch

        indices = self.plan.global_indices(micro)
        slots = list(self.plan.local_slots(self.acc.process_index))
        mine = [indices[s] for s in slots]
        latents, noises, timesteps = [], [], []
        for (mean, std), slot in zip(self._stats(mine), slots):
            g = torch.Generator().manual_seed(seed_for(self.cfg.seed, self.stream, micro, slot))
            z = (mean + std * torch.randn(mean.shape, generator=g)) * self.scaling
            noise = torch.randn(z.shape, generator=g)
            if self.cfg.noise_offset:
                noise = noise + self.cfg.noise_offset * torch.randn((z.shape[0], 1, 1), generator=g)
            t = (torch.randint(0, self.T, (1,), generator=g) if self.timestep_weights is None
                 else torch.multinomial(self.timestep_weights, 1, generator=g))
            latents.append(z)
            noises.append(noise)
            timesteps.append(t)
        device = self.acc.device
        return Batch(latents=torch.stack(latents).to(device), noise=torch.stack(noises).to(device),
                     timesteps=torch.cat(timesteps).to(device), captions=[self.data.items[i].text for i in mine],
                     micro=micro, slots=slots)
