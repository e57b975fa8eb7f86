"""LCM: multistep sampling of a latent consistency model (Luo, Tan, Huang, Li & Zhao 2023, "Latent Consistency
Models", Algorithm 3; Song et al. 2023, "Consistency Models", Algorithm 1), as diffusers' LCMScheduler.

Legend (code name -> symbol in the LCM paper):
    original_inference_steps  N, the length of the skipping-step schedule the model was distilled on
    k                         T // N, the skipping interval
    lcm_origin_timesteps      k i - 1 for i = 1 .. N, the distillation timesteps tau
    timesteps                 num_inference_steps of those, evenly picked from the top (tau_n)
    alpha_prod_t              alpha-bar_t at the current tau_n
    alpha_prod_t_prev         alpha-bar at tau_{n-1}, the next (lower) timestep; at the last step the same t
    predicted_original_sample x0-hat = (x - sqrt(1 - alpha-bar_t) eps_theta) / sqrt(alpha-bar_t)
                              (v_prediction: sqrt(alpha-bar_t) x - sqrt(1 - alpha-bar_t) v)
    c_skip, c_out             the consistency boundary scalings c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2) and
                              c_out(t) = s t / sqrt((s t)^2 + sigma_data^2), sigma_data = 0.5, s = timestep_scaling
                              (LCM eq. 4 / Consistency Models appendix C)
    denoised                  f_theta(x, t) = c_skip x + c_out x0-hat
    prev_sample               x_{tau_{n-1}} = sqrt(alpha-bar_{tau_{n-1}}) f_theta + sqrt(1 - alpha-bar_{tau_{n-1}}) z,
                              z ~ N(0, I) (Algorithm 3); the last step returns f_theta itself, with no noise

Usage: `s = LCMScheduler(config)`, `s.set_timesteps(n, rng=np.random.default_rng(seed))` (n <= N), then for each
t in `s.timesteps`: `x = s.step(eps, t, x, noise=None)`. Every step but the last takes z from `noise` when given
(ignored at the last step), else draws it from the `rng` passed to `set_timesteps` (a fresh unseeded
generator when none was). `timestep_spacing` and `steps_offset` do not apply (as in diffusers).
"""

from __future__ import annotations

import numpy as np

from ..errors import BadInput
from .common import AlphaBarScheduler, as_f32, draw_noise, index_for_timestep
from .config import SchedulerConfig

SIGMA_DATA = np.float32(0.5)


class LCMScheduler(AlphaBarScheduler):
    order = 1
    init_noise_sigma = 1.0

    def __init__(self, config: SchedulerConfig):
        self._init_schedule(config)
        self.step_index: int | None = None
        self.rng: np.random.Generator | None = None

    def set_timesteps(self, num_inference_steps: int, rng: np.random.Generator | None = None) -> None:
        N = self.config.original_inference_steps
        if not 1 <= num_inference_steps <= N:
            raise BadInput(
                f"LCM: num_inference_steps must be in 1..{N} (original_inference_steps), got {num_inference_steps}"
            )
        k = self.config.num_train_timesteps // N
        lcm_origin_timesteps = (np.arange(1, N + 1) * k - 1)[::-1].copy()
        inference_indices = np.floor(
            np.linspace(0, len(lcm_origin_timesteps), num=num_inference_steps, endpoint=False)
        ).astype(np.int64)
        self.timesteps = lcm_origin_timesteps[inference_indices].astype(np.int64)
        self.num_inference_steps = num_inference_steps
        self.step_index = None
        self.begin_index = None
        self.rng = rng

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return as_f32(sample)

    def _boundary_scalings(self, timestep: int) -> tuple[np.float32, np.float32]:
        scaled_timestep = np.float32(timestep) * np.float32(self.config.timestep_scaling)
        st2 = scaled_timestep * scaled_timestep
        c_skip = SIGMA_DATA * SIGMA_DATA / (st2 + SIGMA_DATA * SIGMA_DATA)
        c_out = scaled_timestep / np.sqrt(st2 + SIGMA_DATA * SIGMA_DATA)
        return c_skip, c_out

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("LCM: call set_timesteps before step")
        timestep = int(timestep)
        if self.step_index is None:
            self.step_index = (index_for_timestep(self.timesteps, timestep) if self.begin_index is None
                               else self.begin_index)
        model_output, sample = as_f32(model_output), as_f32(sample)

        prev_step_index = self.step_index + 1
        prev_timestep = int(self.timesteps[prev_step_index]) if prev_step_index < len(self.timesteps) else timestep

        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = np.float32(1.0) - alpha_prod_t
        beta_prod_t_prev = np.float32(1.0) - alpha_prod_t_prev

        c_skip, c_out = self._boundary_scalings(timestep)
        if self.config.prediction_type == "epsilon":
            predicted_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
        else:  # "v_prediction"
            predicted_original_sample = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output
        if self.config.clip_sample:
            r = np.float32(self.config.clip_sample_range)
            predicted_original_sample = np.clip(predicted_original_sample, -r, r)

        denoised = c_out * predicted_original_sample + c_skip * sample

        if self.step_index != self.num_inference_steps - 1:
            noise, self.rng = draw_noise(noise, self.rng, model_output.shape)
            prev_sample = np.sqrt(alpha_prod_t_prev) * denoised + np.sqrt(beta_prod_t_prev) * noise
        else:
            prev_sample = denoised

        self.step_index += 1
        return prev_sample.astype(np.float32, copy=False)
