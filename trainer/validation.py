"""Validation images during training: the validation prompts rendered with the current LoRA to PNGs,
OUT/validation/step-000100-00.png, with a fixed seed per prompt so images of different steps compare.

Rendering uses its own seeded generator and puts the models back in training mode afterwards: it changes
nothing the training loop depends on, so a run with validation has the loss curve of a run without.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["render_validation"]


def render_validation(base, unet, text_encoder, prompts, *, negative: str, steps: int, guidance: float, seed: int,
                      width: int, height: int, out_dir: Path, step: int, autocast=None) -> list[Path]:
    import contextlib

    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    sched_cls = getattr(diffusers, base.scheduler_class, None) or diffusers.PNDMScheduler
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=text_encoder, tokenizer=base.tokenizer, unet=unet,
                                   scheduler=sched_cls.from_config(base.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    device = next(unet.parameters()).device
    was_training = unet.training, text_encoder.training
    unet.eval()
    text_encoder.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
            for i, prompt in enumerate(prompts):
                g = torch.Generator(device="cpu").manual_seed(seed + i)
                latents = torch.randn((1, unet.config.in_channels, height // pipe.vae_scale_factor,
                                       width // pipe.vae_scale_factor), generator=g).to(device)
                image = pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps,
                             guidance_scale=guidance, latents=latents, height=height, width=width).images[0]
                path = out_dir / f"step-{step:06d}-{i:02d}.png"
                tmp = path.with_name(f".{path.name}.tmp")
                image.save(tmp, format="PNG")
                tmp.replace(path)
                paths.append(path)
    finally:
        unet.train(was_training[0])
        text_encoder.train(was_training[1])
    return paths
