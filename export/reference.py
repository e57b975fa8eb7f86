"""The PyTorch/diffusers reference: the truth every sdedge engine is compared against.

`reference_images` runs diffusers' StableDiffusionPipeline with the scheduler twin of an sdedge scheduler
name and the same initial latents, and returns float images (N, H, W, 3) in [0, 1] like the runtime's.
"""

from __future__ import annotations

import numpy as np
import torch

from sdedge.runtime.errors import BadInput


def diffusers_scheduler(name: str, config: dict):
    """diffusers' scheduler matching an sdedge scheduler name, built from the same config."""
    import diffusers

    table = {
        "ddim": (diffusers.DDIMScheduler, {}),
        "pndm": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
        "plms": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "dpm++2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpm++2m-karras": (diffusers.DPMSolverMultistepScheduler,
                           {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
        "lcm": (diffusers.LCMScheduler, {}),
    }
    if name not in table:
        raise BadInput(f"no diffusers twin for scheduler {name!r}; known: {', '.join(table)}")
    cls, extra = table[name]
    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    return cls.from_config({**keep, **extra})


def reference_images(pipe, prompt: str | list[str], negative_prompt: str | list[str], *, latents: np.ndarray,
                     steps: int, guidance: float, scheduler: str, scheduler_config: dict) -> np.ndarray:
    """diffusers' images for the given initial latents (B, 4, H/8, W/8), as float32 (B, H, W, 3) in [0, 1]."""
    pipe.scheduler = diffusers_scheduler(scheduler, scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    b, _, h, w = latents.shape
    scale = pipe.vae_scale_factor
    prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt)
    with torch.inference_mode():
        out = pipe(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance,
                   latents=torch.from_numpy(np.ascontiguousarray(latents)), height=h * scale, width=w * scale,
                   output_type="np")
    return np.asarray(out.images, dtype=np.float32)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two float images in [0, 1] (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)
