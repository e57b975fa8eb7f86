"""Image-to-image and inpainting inputs, as diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline
prepare them: the init image and mask as arrays, the VAE posterior sample, the strength's timesteps. NumPy only.

    image (H, W, 3) uint8 ─► x = 2 · image/255 − 1                                  (1, 3, H, W) in [−1, 1]
    vae_encoder(x) ─► moments = mean ⊕ log-variance                                 (1, 2C, h, w)
    latents = scaling_factor · (mean + exp(½ · clip(logvar, −30, 20)) · z),  z ~ N(0, I)   (1, C, h, w)
    mask (H, W) uint8 ─► m = [mask/255 ≥ ½]  (1 = repaint)                          (1, 1, H, W)
    masked image = x · [m < ½];  mask at latent size = m[..., ::s, ::s] (nearest)   (1, 1, h, w)
    strength: the last min(int(steps · strength), steps) steps of the schedule run, from the noise level of the
    first of them (diffusers' get_timesteps)

Images are never resized: an image whose size differs from the requested width/height is refused (diffusers would
resize it with Lanczos; resizing stays with the caller, who knows the crop they want).
"""

from __future__ import annotations

import numpy as np

from .errors import BadInput


def rgb_array(image, label: str = "image") -> np.ndarray:
    """A PIL image (converted to RGB: alpha dropped) or an (H, W, 3) uint8 array, as an (H, W, 3) uint8 array."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image; PIL itself is not imported here
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise BadInput(f"{label} must be a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BadInput(f"{label} must be an (H, W, 3) uint8 array, got {image.dtype} of shape {image.shape}")
    return image


def mask_array(mask, label: str = "mask") -> np.ndarray:
    """A PIL image (converted to grayscale "L", as diffusers' mask processor does) or an (H, W) uint8 array; white
    (≥ 128) marks what is repainted."""
    if hasattr(mask, "convert") and hasattr(mask, "size"):
        mask = np.asarray(mask.convert("L"))
    if not isinstance(mask, np.ndarray):
        raise BadInput(f"{label} must be a PIL image or an (H, W) uint8 array, got {type(mask).__name__}")
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise BadInput(f"{label} must be an (H, W) uint8 array (white = repaint), got {mask.dtype} of shape {mask.shape}")
    return mask


def check_size(array: np.ndarray, label: str, width: int | None, height: int | None) -> tuple[int, int]:
    """(width, height): the image's own size; a requested width/height that differs is refused."""
    h, w = array.shape[:2]
    for name, asked, have in (("width", width, w), ("height", height, h)):
        if asked is not None and asked != have:
            raise BadInput(f"{label} is {w}×{h} pixels but {name}={asked} was asked: resize the {label} to the "
                           f"size you want (or leave width/height unset to use the {label}'s size)")
    return w, h


def to_model_range(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [−1, 1] (diffusers' VaeImageProcessor: /255, then 2x − 1)."""
    x = image.astype(np.float32) / np.float32(255.0)
    return (np.float32(2.0) * x - np.float32(1.0)).transpose(2, 0, 1)[None].copy()


def binarize(mask: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (1, 1, H, W) float32 of 0 and 1 (diffusers' mask processor: /255, then ≥ 0.5)."""
    m = mask.astype(np.float32) / np.float32(255.0)
    return (m >= np.float32(0.5)).astype(np.float32)[None, None]


def posterior_sample(moments: np.ndarray, rng, scaling_factor: float) -> np.ndarray:
    """A sample of the VAE's diagonal Gaussian posterior, scaled to the UNet's latent space, as diffusers'
    DiagonalGaussianDistribution.sample: moments (B, 2C, h, w) -> (B, C, h, w); z drawn from `rng`."""
    mean, logvar = np.split(moments.astype(np.float32, copy=False), 2, axis=1)
    std = np.exp(np.float32(0.5) * np.clip(logvar, np.float32(-30.0), np.float32(20.0))).astype(np.float32)
    z = rng.standard_normal(mean.shape, dtype=np.float32)
    return (np.float32(scaling_factor) * (mean + std * z)).astype(np.float32, copy=False)


def check_strength(strength, steps: int) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise BadInput(f"strength={strength!r}: must be a number in (0, 1] (1 repaints everything)")
    if int(steps * strength) < 1:
        raise BadInput(f"strength={strength:g} with steps={steps} leaves no denoising step "
                       f"(int(steps × strength) = 0): raise the strength or the steps")
    return float(strength)


def strength_timesteps(sched, steps: int, strength: float) -> np.ndarray:
    """The timesteps img2img runs (diffusers' get_timesteps): the last int(steps · strength) steps, `* order` for
    multistep-order schedulers; the scheduler is told where it starts (set_begin_index)."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0) * sched.order
    sched.set_begin_index(t_start)
    return sched.timesteps[t_start:]
