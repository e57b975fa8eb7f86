"""Small pieces several schedulers share: timestep grids, the sigma (noise level) view of alpha-bar,
Karras sigmas, step-index lookup, random noise. NumPy only.

Legend (code name -> symbol in the papers):
    alphas_cumprod[t]   alpha-bar_t (DDPM eq. 4)
    sigma               sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t), the noise level of the
                        "variance exploding" view x / sqrt(alpha-bar_t) of a VP sample (Karras et al. 2022,
                        "EDM", section 2 and table 1; Song et al. 2021, DDIM section 4.3)
    log_sigmas          log sigma_t for t = 0 .. T-1, for mapping a sigma back to a (fractional) t
    karras sigmas       sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
                        rho = 7 (EDM eq. 5)

Timestep spacings (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
table 2): "leading" = 0, r, 2r, ... (+ steps_offset), "trailing" = T, T-r, ... (- 1), "linspace" = evenly
from 0 to T-1. Each scheduler writes the grid its diffusers twin uses (they differ in details).

Precision: scalar coefficients are computed in float32 like diffusers' 0-d torch tensors. `exp32` and
`log32` round float64 results to float32 (NumPy's float32 exp/log are SIMD approximations that miss the
correctly rounded value more often than torch's). Square roots use np.sqrt, which is correctly rounded;
torch's float32 sqrt (CPU build 2.13 here) is within 0.75 ulp but not always correctly rounded, so sigmas
and coefficients can differ from diffusers' by one ulp. That, not the algorithm, is the residual difference.
"""

from __future__ import annotations

import numpy as np


def exp32(x) -> np.float32:
    return np.float32(np.exp(np.float64(x)))


def log32(x) -> np.float32:
    return np.float32(np.log(np.float64(x)))


def vp_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t), float32, in float32 arithmetic as diffusers does."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """EDM eq. 5, in float64 (diffusers computes it with NumPy in float64)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The fractional timestep whose sigma is `sigma`: linear interpolation in log sigma (float64)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def index_for_timestep(timesteps: np.ndarray, timestep, missing: int | None = None) -> int:
    """Where `timestep` sits in the schedule; when it occurs twice, the second place (diffusers' rule,
    so that img2img starting mid-schedule does not skip a sigma). `missing` is returned when absent."""
    (places,) = np.nonzero(timesteps == timestep)
    if len(places) == 0:
        if missing is not None:
            return missing
        raise ValueError(f"timestep {timestep} is not in the schedule {timesteps.tolist()}")
    return int(places[1] if len(places) > 1 else places[0])


def noise_index(scheduler, timestep) -> int:
    """The sigma index `add_noise` uses, as diffusers' sigma schedulers: the timestep's place when no begin index is
    set; the current step once stepping started (inpainting re-noises the image after each step); else the begin
    index (img2img's initial noise)."""
    if scheduler.begin_index is None:
        return index_for_timestep(scheduler.timesteps, timestep)
    if scheduler.step_index is not None:
        return scheduler.step_index
    return scheduler.begin_index


def as_f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def draw_noise(noise, rng: np.random.Generator | None, shape) -> tuple[np.ndarray, np.random.Generator | None]:
    """The noise to inject: `noise` when given, else standard normal float32 drawn from `rng`
    (a fresh unseeded generator when there is none). Returns (noise, rng to keep)."""
    if noise is not None:
        noise = as_f32(noise)
        if noise.shape != tuple(shape):
            raise ValueError(f"noise has shape {noise.shape}, the sample has {tuple(shape)}")
        return noise, rng
    if rng is None:
        rng = np.random.default_rng()
    return rng.standard_normal(shape, dtype=np.float32), rng


class AlphaBarScheduler:
    """What DDIM, PNDM and LCM share: the noise schedule (betas, alpha-bar), alpha-bar of the step "before" t=0
    (`final_alpha_cumprod`: 1 with set_alpha_to_one, else alpha-bar_0), and the full training timestep grid
    until `set_timesteps` picks the inference one."""

    def _init_schedule(self, config) -> None:
        from .config import noise_schedule

        self.config = config
        self.betas, self.alphas_cumprod = noise_schedule(config)
        self.final_alpha_cumprod = np.float32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps: int | None = None
        self.begin_index: int | None = None
        self.timesteps = np.arange(config.num_train_timesteps, dtype=np.int64)[::-1].copy()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where in `timesteps` denoising starts (img2img); `set_timesteps` clears it. Only LCM's step reads it."""
        self.begin_index = int(begin_index)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        """The forward process q(x_t | x_0): sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) z (DDPM eq. 4)."""
        alpha_prod = self.alphas_cumprod[int(timestep)]
        out = np.sqrt(alpha_prod) * as_f32(original) + np.sqrt(np.float32(1.0) - alpha_prod) * as_f32(noise)
        return out.astype(np.float32, copy=False)
