"""Validation images during training: the validation prompts rendered with the current LoRA to PNGs,
OUT/validation/step-000100-00.png, with a fixed seed per prompt so images of different steps compare, and
OUT/validation/grid.png: the steps rendered so far (rows, "step 100"; the
latest MAX_GRID_ROWS) by prompt (columns), labelled.

Rendering uses its own seeded generator and puts the models back in training mode afterwards: it changes
nothing the training loop depends on, so a run with validation has the loss curve of a run without.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from sdedge.runtime.files import atomic_write_bytes

__all__ = ["render_validation", "write_validation_grid"]

MAX_GRID_ROWS = 16  # the grid shows the latest steps
_STEP_PNG = re.compile(r"step-(\d{6})-(\d{2})\.png")


def write_validation_grid(out_dir: Path, prompts) -> Path:
    """OUT/validation/grid.png from the step PNGs in `out_dir`: one row per step, one column per prompt."""
    from PIL import Image

    from sdedge.runtime.grid import GridLayout, labelled_grid, write_grid

    found: dict[int, dict[int, Path]] = {}
    for path in Path(out_dir).glob("step-*.png"):
        m = _STEP_PNG.fullmatch(path.name)
        if m and int(m[2]) < len(prompts):
            found.setdefault(int(m[1]), {})[int(m[2])] = path
    steps = sorted(found)[-MAX_GRID_ROWS:]

    def load(path: Path):
        with Image.open(path) as im:
            return im.convert("RGB")

    cells = [[load(found[s][i]) if i in found[s] else None for i in range(len(prompts))] for s in steps]
    side = max([im.width for row in cells for im in row if im is not None] or [128])
    layout = GridLayout(cell=max(128, min(256, side)), label_w=100)
    return write_grid(labelled_grid(cells, [f"step {s}" for s in steps], list(prompts), layout),
                      Path(out_dir) / "grid.png")


def render_validation(base, unet, text_encoder, prompts, *, negative: str, steps: int, guidance: float, seed: int,
                      width: int, height: int, out_dir: Path, step: int, autocast=None) -> list[Path]:
    import contextlib

    import torch

    pipe = _pipeline(base, unet, text_encoder)
    pipe.set_progress_bar_config(disable=True)
    device = next(unet.parameters()).device
    models = [m for m in (unet, text_encoder, getattr(base, "text_encoder_2", None)) if m is not None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
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
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                atomic_write_bytes(path, buf.getvalue())
                paths.append(path)
        write_validation_grid(out_dir, prompts)
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    return paths


def _pipeline(base, unet, text_encoder):
    """diffusers' pipeline of the base with the LoRA-adapted models: StableDiffusionXLPipeline for an SDXL base
    (its second text encoder is the base's, LoRA-adapted in place when trained), no watermark or safety checker."""
    import diffusers

    sched = (getattr(diffusers, base.scheduler_class, None) or diffusers.PNDMScheduler).from_config(base.scheduler_config)
    if getattr(base, "text_encoder_2", None) is not None:
        return diffusers.StableDiffusionXLPipeline(vae=base.vae, text_encoder=text_encoder, text_encoder_2=base.text_encoder_2,
                                                   tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet,
                                                   scheduler=sched, add_watermarker=False)
    return diffusers.StableDiffusionPipeline(vae=base.vae, text_encoder=text_encoder, tokenizer=base.tokenizer, unet=unet,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
