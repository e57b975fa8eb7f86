"""Euler: the first-order (Euler) solver of the probability-flow ODE in the sigma parameterisation of
Karras, Aittala, Aila & Laine 2022 ("EDM", Algorithm 2 without churn), as diffusers' EulerDiscreteScheduler.

Legend (code name -> symbol in the EDM paper):
    sigmas[i]             sigma_i = sqrt((1 - alpha-bar_t) / alpha-bar_t) at t = timesteps[i] (linear in t between
                          training steps), then sigma_N = 0; with `use_karras_sigmas`, EDM eq. 5 between the first
                          and last of those, rho = 7, and timesteps[i] the fractional t of each sigma_i
    sample                x_i, the latent in the "variance exploding" scale x_VP / sqrt(alpha-bar) = x_VP sqrt(1 + sigma^2);
                          its initial noise has std `init_noise_sigma` (sigma_0, or sqrt(sigma_0^2 + 1) for "leading")
    scale_model_input     c_in(sigma) x = x / sqrt(sigma^2 + 1), the VP-scaled input the UNet was trained on
    pred_original_sample  D(x_i; sigma_i) = x_i - sigma_i eps_theta, the denoised estimate
                          (v_prediction: D = -sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1))
    derivative            d_i = (x_i - D(x_i; sigma_i)) / sigma_i = dx/dsigma (EDM eq. 3 / Alg. 2 line 7)
    dt                    sigma_{i+1} - sigma_i
    prev_sample           x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i (Alg. 2 line 8)

`timesteps` are float32, as in diffusers: whole numbers for "leading" and "trailing", fractional for
"linspace" and Karras sigmas; pass them to the UNet unrounded, as diffusers does.

Usage: `s = EulerDiscreteScheduler(config)`, `s.set_timesteps(n)`, `x = noise * s.init_noise_sigma`, then for each
t in `s.timesteps`: `eps = unet(s.scale_model_input(x, t), t)`, `x = s.step(eps, t, x)`. Deterministic:
`noise` and `rng` are accepted and unused.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadInput
from .common import as_f32, index_for_timestep, karras_sigmas, noise_index, sigma_to_t, vp_sigmas
from .config import SchedulerConfig, noise_schedule


class EulerDiscreteScheduler:
    order = 1

    def __init__(self, config: SchedulerConfig, use_karras_sigmas: bool | None = None):
        self.config = config
        self.use_karras_sigmas = config.use_karras_sigmas if use_karras_sigmas is None else bool(use_karras_sigmas)
        self.betas, self.alphas_cumprod = noise_schedule(config)
        T = config.num_train_timesteps
        self.num_inference_steps: int | None = None
        self.timesteps = np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy()
        self.sigmas = np.concatenate([vp_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        self.step_index: int | None = None
        self.begin_index: int | None = None

    @property
    def init_noise_sigma(self) -> float:
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma * max_sigma + np.float32(1.0)))

    def set_timesteps(self, num_inference_steps: int, rng: np.random.Generator | None = None) -> None:
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise BadInput(f"Euler: num_inference_steps must be in 1..{T}, got {num_inference_steps}")
        n = num_inference_steps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        elif spacing == "leading":
            timesteps = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + np.float32(self.config.steps_offset)
        else:  # "trailing"
            timesteps = np.arange(T, 0, -T / n).round().astype(np.float32) - np.float32(1.0)

        train_sigmas = vp_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)  # float64
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
            timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)
        self.num_inference_steps = n
        self.step_index = None
        self.begin_index = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where in `timesteps` denoising starts (img2img): the first step's sigma index; `set_timesteps` clears it."""
        self.begin_index = int(begin_index)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        """x_0 noised to the level of `timestep`: x_0 + sigma z (the "variance exploding" scale of `sample`)."""
        sigma = self.sigmas[noise_index(self, np.float32(timestep))]
        return (as_f32(original) + as_f32(noise) * sigma).astype(np.float32, copy=False)

    def _init_step_index(self, timestep) -> None:
        if self.step_index is None:
            self.step_index = (index_for_timestep(self.timesteps, np.float32(timestep)) if self.begin_index is None
                               else self.begin_index)

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        return as_f32(sample) / np.sqrt(sigma * sigma + np.float32(1.0))

    def _denoised(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
        """(model_output, sample) as float32 and D(x_i; sigma_i), with sigma_i: the part of a step both Euler
        schedulers share."""
        if self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps before step")
        self._init_step_index(timestep)
        model_output, sample = as_f32(model_output), as_f32(sample)
        sigma = self.sigmas[self.step_index]
        if self.config.prediction_type == "epsilon":
            pred_original_sample = sample - sigma * model_output
        else:  # "v_prediction"
            sigma2_plus_1 = sigma * sigma + np.float32(1.0)
            pred_original_sample = model_output * (-sigma / np.sqrt(sigma2_plus_1)) + sample / sigma2_plus_1
        return sample, pred_original_sample, sigma

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        sample, pred_original_sample, sigma = self._denoised(model_output, timestep, sample)
        derivative = (sample - pred_original_sample) / sigma
        dt = self.sigmas[self.step_index + 1] - sigma
        prev_sample = sample + derivative * dt

        self.step_index += 1
        return prev_sample.astype(np.float32, copy=False)
