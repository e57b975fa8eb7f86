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

from ..errors import BadInput
from .common import as_f32, draw_noise, index_for_timestep, vp_sigmas
from .config import SchedulerConfig, noise_schedule


class EulerAncestralDiscreteScheduler:
    order = 1

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.betas, self.alphas_cumprod = noise_schedule(config)
        T = config.num_train_timesteps
        self.num_inference_steps: int | None = None
        self.timesteps = np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy()
        self.sigmas = np.concatenate([vp_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        self.step_index: int | None = None
        self.rng: np.random.Generator | None = None

    @property
    def init_noise_sigma(self) -> float:
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma * max_sigma + np.float32(1.0)))

    def set_timesteps(self, num_inference_steps: int, rng: np.random.Generator | None = None) -> None:
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise BadInput(f"Euler ancestral: num_inference_steps must be in 1..{T}, got {num_inference_steps}")
        n = num_inference_steps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        elif spacing == "leading":
            timesteps = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + np.float32(self.config.steps_offset)
        else:  # "trailing"
            timesteps = np.arange(T, 0, -T / n).round().astype(np.float32) - np.float32(1.0)

        train_sigmas = vp_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)  # float64
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps
        self.num_inference_steps = n
        self.step_index = None
        self.rng = rng

    def _init_step_index(self, timestep) -> None:
        if self.step_index is None:
            self.step_index = index_for_timestep(self.timesteps, np.float32(timestep))

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        return as_f32(sample) / np.sqrt(sigma * sigma + np.float32(1.0))

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("Euler ancestral: call set_timesteps before step")
        self._init_step_index(timestep)
        model_output, sample = as_f32(model_output), as_f32(sample)
        sigma = self.sigmas[self.step_index]

        if self.config.prediction_type == "epsilon":
            pred_original_sample = sample - sigma * model_output
        else:  # "v_prediction"
            sigma2_plus_1 = sigma * sigma + np.float32(1.0)
            pred_original_sample = model_output * (-sigma / np.sqrt(sigma2_plus_1)) + sample / sigma2_plus_1

        sigma_from = sigma
        sigma_to = self.sigmas[self.step_index + 1]
        sigma_up = np.sqrt(sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from))
        sigma_down = np.sqrt(sigma_to * sigma_to - sigma_up * sigma_up)

        derivative = (sample - pred_original_sample) / sigma
        dt = sigma_down - sigma
        prev_sample = sample + derivative * dt

        noise, self.rng = draw_noise(noise, self.rng, model_output.shape)
        prev_sample = prev_sample + noise * sigma_up

        self.step_index += 1
        return prev_sample.astype(np.float32, copy=False)
