"""Euler ancestral: an Euler step of the probability-flow ODE down to sigma_down, then fresh noise of std
sigma_up (k-diffusion's sample_euler_ancestral, Crowson 2022, after Karras et al. 2022 "EDM"; ancestral
sampling as in DDPM, Ho et al. 2020), as diffusers' EulerAncestralDiscreteScheduler.

Legend (code name -> symbol):
    sigmas[i]             sigma_i = sqrt((1 - alpha-bar_t) / alpha-bar_t) at t = timesteps[i], then sigma_N = 0
    sample                x_i in the "variance exploding" scale x_VP sqrt(1 + sigma^2) (EDM section 2)
    scale_model_input     c_in(sigma) x = x / sqrt(sigma^2 + 1)
    pred_original_sample  D(x_i; sigma_i) = x_i - sigma_i eps_theta
                          (v_prediction: D = -sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1))
    sigma_from, sigma_to  sigma_i, sigma_{i+1}
    sigma_up              sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2), the std of the fresh noise:
                          the DDPM posterior std between the two levels (eta = 1)
    sigma_down            sqrt(sigma_to^2 - sigma_up^2), the level the deterministic part reaches
    derivative            d_i = (x_i - D) / sigma_i (EDM eq. 3)
    prev_sample           x_{i+1} = x_i + (sigma_down - sigma_i) d_i + sigma_up z, z ~ N(0, I)

`timesteps` are float32, as in diffusers (fractional for "linspace").

Usage: `s = EulerAncestralDiscreteScheduler(config)`, `s.set_timesteps(n, rng=np.random.default_rng(seed))`,
`x = noise * s.init_noise_sigma`, then for each t in `s.timesteps`: `eps = unet(s.scale_model_input(x, t), t)`,
`x = s.step(eps, t, x, noise=None)`. Every step (the last one too, where sigma_up = 0, as diffusers draws it)
takes z from `noise` when given, else draws it from the `rng` passed to `set_timesteps`
(a fresh unseeded generator when none was).
"""

from __future__ import annotations

import numpy as np

from .common import draw_noise
from .config import SchedulerConfig
from .euler import EulerDiscreteScheduler


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler's timesteps, sigmas, input scaling and denoised estimate; its own (stochastic) step."""

    def __init__(self, config: SchedulerConfig):
        super().__init__(config, use_karras_sigmas=False)
        self.rng: np.random.Generator | None = None

    def set_timesteps(self, num_inference_steps: int, rng: np.random.Generator | None = None) -> None:
        super().set_timesteps(num_inference_steps)
        self.rng = rng

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        sample, pred_original_sample, sigma = self._denoised(model_output, timestep, sample)
        sigma_from = sigma
        sigma_to = self.sigmas[self.step_index + 1]
        sigma_up = np.sqrt(sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from))
        sigma_down = np.sqrt(sigma_to * sigma_to - sigma_up * sigma_up)

        derivative = (sample - pred_original_sample) / sigma
        dt = sigma_down - sigma
        prev_sample = sample + derivative * dt

        noise, self.rng = draw_noise(noise, self.rng, sample.shape)
        prev_sample = prev_sample + noise * sigma_up

        self.step_index += 1
        return prev_sample.astype(np.float32, copy=False)
