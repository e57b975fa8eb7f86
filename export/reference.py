"""The PyTorch/diffusers reference: the truth every sdedge engine is compared against.

`reference_images` runs diffusers' StableDiffusionPipeline with the scheduler twin of an sdedge scheduler
name and the same initial latents, and returns float images (N, H, W, 3) in [0, 1] like the runtime's.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from sdedge.runtime.errors import BadInput


def runtime_noise_lcm(config: dict, seed: int):
    """diffusers' LCMScheduler drawing the noise it injects between steps as sdedge's runtime does (NumPy's
    default_rng([seed, 1]), one standard-normal draw per step but the last), so that a multi-step LCM image can be
    compared with the runtime's on the same latents and the same noise. Everything else is diffusers' own step."""
    import diffusers

    class RuntimeNoiseLCMScheduler(diffusers.LCMScheduler):
        def step(self, model_output, timestep, sample, generator=None, return_dict=True):
            prev, denoised = super().step(model_output, timestep, sample, generator=generator, return_dict=False)
            if self.step_index < self.num_inference_steps:  # not the last step: re-noise with the runtime's z
                z = torch.from_numpy(self.noise_rng.standard_normal(tuple(sample.shape), dtype=np.float32))
                a = self.alphas_cumprod[self.timesteps[self.step_index]]  # alpha-bar of the next timestep
                prev = a.sqrt() * denoised + (1 - a).sqrt() * z.to(denoised.dtype)
            return diffusers.schedulers.scheduling_lcm.LCMSchedulerOutput(prev, denoised) if return_dict \
                else (prev, denoised)

    known = inspect.signature(diffusers.LCMScheduler.__init__).parameters  # not PNDM's skip_prk_steps: no warning
    sched = RuntimeNoiseLCMScheduler.from_config({k: v for k, v in config.items() if k in known})
    sched.noise_rng = np.random.default_rng([seed, 1])
    return sched


def diffusers_scheduler(name: str, config: dict, seed: int | None = None):
    """diffusers' scheduler matching an sdedge scheduler name, built from the same config. `seed`: LCM draws the
    noise it injects as the runtime does for that seed (runtime_noise_lcm)."""
    import diffusers

    if name == "lcm" and seed is not None:
        return runtime_noise_lcm(config, seed)

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
                     steps: int, guidance: float, scheduler: str, scheduler_config: dict,
                     seed: int | None = None) -> np.ndarray:
    """diffusers' images for the given initial latents (B, 4, H/8, W/8), as float32 (B, H, W, 3) in [0, 1].
    `seed`: the runtime's seed, for the noise a stochastic scheduler injects (LCM only)."""
    pipe.scheduler = diffusers_scheduler(scheduler, scheduler_config, seed)
    pipe.set_progress_bar_config(disable=True)
    b, _, h, w = latents.shape
    scale = pipe.vae_scale_factor
    prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt)
    if getattr(pipe, "text_encoder_2", None) is not None and all(n == "" for n in negatives):
        negatives = None  # SDXL: no negative prompt (zero embeddings), as sdedge's runtime reads an empty one
    with torch.inference_mode():
        out = pipe(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance,
                   latents=torch.from_numpy(np.ascontiguousarray(latents)), height=h * scale, width=w * scale,
                   output_type="np")
    return np.asarray(out.images, dtype=np.float32)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two float images in [0, 1] (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


class TorchNoise:
    """Standard normal noise from a seeded torch generator, with NumPy Generator's `standard_normal(shape, dtype=)`.

    Handed to the runtime as `generate(rng=TorchNoise(seed))`, it gives the runtime the numbers, in the order, that
    diffusers' pipelines draw with `generator=torch.Generator().manual_seed(seed)` (posterior samples, initial noise,
    per-step noise): parity from the same noise for img2img, inpainting and the stochastic schedulers."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, size, dtype=np.float32) -> np.ndarray:
        return torch.randn(tuple(size), generator=self.generator, dtype=torch.float32).numpy().astype(dtype, copy=False)


def reference_init_images(pipe, prompt: str, negative_prompt: str, *, image: np.ndarray, mask: np.ndarray | None,
                          strength: float, steps: int, guidance: float, scheduler: str, scheduler_config: dict,
                          seed: int) -> np.ndarray:
    """diffusers' StableDiffusionImg2ImgPipeline (mask None) or StableDiffusionInpaintPipeline image for an
    (H, W, 3) uint8 image and (H, W) uint8 mask, on the modules of `pipe`, with a torch generator seeded `seed`;
    float32 (1, H, W, 3) in [0, 1]."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from PIL import Image

    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: its own img2img / inpainting pipelines
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

        cls = StableDiffusionXLImg2ImgPipeline if mask is None else StableDiffusionXLInpaintPipeline
        parts = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")
        twin = cls(**{k: getattr(pipe, k) for k in parts}, add_watermarker=False,
                   scheduler=diffusers_scheduler(scheduler, scheduler_config))
        if negative_prompt == "":
            negative_prompt = None  # no negative prompt: zero embeddings, as the runtime reads an empty one
    else:
        components = {k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet")}
        cls = StableDiffusionImg2ImgPipeline if mask is None else StableDiffusionInpaintPipeline
        twin = cls(**components, scheduler=diffusers_scheduler(scheduler, scheduler_config), safety_checker=None,
                   feature_extractor=None, requires_safety_checker=False)
    twin.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt=negative_prompt, image=Image.fromarray(image), strength=strength,
              num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
              output_type="np")
    if mask is not None:
        kw.update(mask_image=Image.fromarray(mask, mode="L"), height=image.shape[0], width=image.shape[1])
    with torch.inference_mode():
        out = twin(prompt, **kw)
    return np.asarray(out.images, dtype=np.float32)
