"""DDIM: denoising diffusion implicit models (Song, Meng & Ermon 2021), as diffusers' DDIMScheduler.

Legend (code name -> symbol in the DDIM paper):
    timestep, prev_timestep   t and t-1 of eq. 12 (here t - T // num_inference_steps: the next coarser step)
    alpha_prod_t              alpha-bar_t (the paper writes alpha_t for the cumulative product)
    alpha_prod_t_prev         alpha-bar_{t-1}; alpha-bar_0 or 1 past the end (`set_alpha_to_one`)
    beta_prod_t               1 - alpha-bar_t
    pred_original_sample      x0-hat = (x_t - sqrt(1 - alpha-bar_t) eps_theta) / sqrt(alpha-bar_t), "predicted x0" of eq. 12
    pred_epsilon              eps_theta(x_t, t)
    variance                  sigma_t^2 / eta^2 = (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t)
                                                  · (1 - alpha-bar_t / alpha-bar_{t-1}) (eq. 16)
    std_dev_t                 sigma_t(eta) = eta * sqrt(variance); eta = 0 is DDIM, eta = 1 is DDPM
    pred_sample_direction     sqrt(1 - alpha-bar_{t-1} - sigma_t^2) eps_theta, "direction pointing to x_t" (eq. 12)
    prev_sample               x_{t-1} = sqrt(alpha-bar_{t-1}) x0-hat + direction + sigma_t eps (eq. 12)
    v_prediction              v = sqrt(alpha-bar_t) eps - sqrt(1 - alpha-bar_t) x0 (Salimans & Ho 2022, section 4), so
                              x0-hat = sqrt(alpha-bar_t) x_t - sqrt(1 - alpha-bar_t) v and
                              eps_theta = sqrt(alpha-bar_t) v + sqrt(1 - alpha-bar_t) x_t

Usage: `s = DDIMScheduler(config, eta=0.0)`, `s.set_timesteps(n, rng=None)`, then for each t in `s.timesteps`:
`x = s.step(eps, t, x, noise=None)`. With eta > 0 the step injects sigma_t * noise: pass `noise`
(standard normal, the sample's shape) or let it be drawn from the `rng` given to `set_timesteps`.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadInput
from .common import AlphaBarScheduler, as_f32, draw_noise
from .config import SchedulerConfig


class DDIMScheduler(AlphaBarScheduler):
    order = 1
    init_noise_sigma = 1.0

    def __init__(self, config: SchedulerConfig, eta: float = 0.0):
        if eta < 0:
            raise BadInput(f"DDIM eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self._init_schedule(config)
        self.rng: np.random.Generator | None = None

    def set_timesteps(self, num_inference_steps: int, rng: np.random.Generator | None = None) -> None:
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise BadInput(f"DDIM: num_inference_steps must be in 1..{T}, got {num_inference_steps}")
        n = num_inference_steps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            timesteps = (np.arange(0, n) * (T // n))[::-1].astype(np.int64) + self.config.steps_offset
        else:  # "trailing"
            timesteps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        self.timesteps = timesteps.copy()
        self.num_inference_steps = n
        self.begin_index = None
        self.rng = rng

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return as_f32(sample)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("DDIM: call set_timesteps before step")
        model_output, sample = as_f32(model_output), as_f32(sample)
        timestep = int(timestep)
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps

        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = np.float32(1.0) - alpha_prod_t

        if self.config.prediction_type == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
            pred_epsilon = model_output
        else:  # "v_prediction"
            pred_original_sample = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output
            pred_epsilon = np.sqrt(alpha_prod_t) * model_output + np.sqrt(beta_prod_t) * sample

        if self.config.clip_sample:
            r = np.float32(self.config.clip_sample_range)
            pred_original_sample = np.clip(pred_original_sample, -r, r)

        beta_prod_t_prev = np.float32(1.0) - alpha_prod_t_prev
        variance = (beta_prod_t_prev / beta_prod_t) * (np.float32(1.0) - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = np.float32(self.eta) * np.sqrt(variance)

        pred_sample_direction = np.sqrt(np.float32(1.0) - alpha_prod_t_prev - std_dev_t**2) * pred_epsilon
        prev_sample = np.sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction

        if self.eta > 0:
            noise, self.rng = draw_noise(noise, self.rng, model_output.shape)
            prev_sample = prev_sample + std_dev_t * noise
        return prev_sample.astype(np.float32, copy=False)
