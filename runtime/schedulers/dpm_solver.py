"""DPM-Solver++(2M): the second-order multistep solver of the diffusion ODE in data prediction
(Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++", Algorithm 2), as diffusers' DPMSolverMultistepScheduler
with algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
final_sigmas_type="zero", optionally with Karras sigmas ("dpm++2m-karras").

Legend (code name -> symbol in the DPM-Solver++ paper):
    sigmas[i]            the VE noise level sqrt((1 - alpha-bar_t) / alpha-bar_t) at t = timesteps[i]; sigmas[N] = 0
    alpha_t, sigma_t     alpha_t = 1 / sqrt(sigma^2 + 1) = sqrt(alpha-bar_t) and sigma_t = sigma alpha_t
                         = sqrt(1 - alpha-bar_t): the VP signal and noise scales (section 2)
    lambda_t             lambda_t = log(alpha_t / sigma_t), the half log-SNR (section 2)
    s0, s1, t            t_{i-1}, t_{i-2} (the two previous points) and t_i (the target)
    h, h_0               h_i = lambda_{t_i} - lambda_{t_{i-1}} and h_{i-1}
    r0                   r_i = h_{i-1} / h_i
    x0_pred (m0, m1)     x_theta(x_{t_{i-1}}, t_{i-1}) and x_theta(x_{t_{i-2}}, t_{i-2}), the data predictions
                         x_theta = (x - sigma_t eps_theta) / alpha_t (v_prediction: alpha_t x - sigma_t v)
    D0, D1               m0 and (m0 - m1) / r0; Algorithm 2's D_i = (1 + 1/(2 r_i)) m0 - 1/(2 r_i) m1 = D0 + D1/2
    first order          x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) x_theta (eq. 9 with k = 1, i.e. DDIM)
    second order         x_t = (sigma_t / sigma_s0) x - alpha_t (e^{-h} - 1) D0 - 0.5 alpha_t (e^{-h} - 1) D1
Karras sigmas: EDM eq. 5 (rho = 7) from the largest to the smallest training sigma; timesteps[i] is the
training t whose sigma is nearest sigmas[i] (interpolated in log sigma, rounded).

The first step is first order (no history yet), and so is the last (its target sigma is 0: lambda = +inf,
e^{-h} = 0 and the update returns x_theta itself; `lower_order_final`).

Usage: `s = DPMSolverMultistepScheduler(config, use_karras_sigmas=False)`, `s.set_timesteps(n)`, then for each
t in `s.timesteps`: `x = s.step(eps, t, x)`. Deterministic: `noise` and `rng` are accepted and unused.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadInput
from .common import (
    as_f32,
    exp32,
    index_for_timestep,
    karras_sigmas,
    log32,
    noise_index,
    sigma_to_t,
    vp_sigmas,
)
from .config import SchedulerConfig, noise_schedule


class DPMSolverMultistepScheduler:
    order = 1
    init_noise_sigma = 1.0
    solver_order = 2

    def __init__(self, config: SchedulerConfig, use_karras_sigmas: bool | None = None):
        self.config = config
        self.use_karras_sigmas = config.use_karras_sigmas if use_karras_sigmas is None else bool(use_karras_sigmas)
        self.betas, self.alphas_cumprod = noise_schedule(config)
        T = config.num_train_timesteps
        self.sigmas = vp_sigmas(self.alphas_cumprod)
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(T, dtype=np.int64)[::-1].copy()
        self._reset()

    def _reset(self) -> None:
        self.model_outputs: list[np.ndarray | None] = [None] * self.solver_order
        self.lower_order_nums = 0
        self.step_index: int | None = None
        self.begin_index: int | None = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where in `timesteps` denoising starts (img2img): the first step's index; `set_timesteps` clears it."""
        self.begin_index = int(begin_index)

    def _index(self, timestep) -> int:
        return index_for_timestep(self.timesteps, timestep, missing=len(self.timesteps) - 1)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        """x_0 noised to the level of `timestep`: alpha_t x_0 + sigma_t z."""
        index = self._index(timestep) if self.begin_index is None else noise_index(self, timestep)
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[index])
        return (alpha_t * as_f32(original) + sigma_t * as_f32(noise)).astype(np.float32, copy=False)

    def set_timesteps(self, num_inference_steps: int, rng: np.random.Generator | None = None) -> None:
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise BadInput(f"DPM-Solver++: num_inference_steps must be in 1..{T}, got {num_inference_steps}")
        n = num_inference_steps
        spacing = self.config.timestep_spacing
        # lambda_min_clipped = -inf (diffusers' default) keeps the whole training range: last_timestep = T.
        if spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            timesteps = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64)
            timesteps = timesteps + self.config.steps_offset
        else:  # "trailing"
            timesteps = np.arange(T, 0, -T / n).round().astype(np.int64) - 1

        train_sigmas = vp_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        if self.use_karras_sigmas:
            descending = train_sigmas[::-1].copy()
            sigmas = karras_sigmas(float(descending[-1]), float(descending[0]), n)
            timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
            if self.config.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self._reset()

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return as_f32(sample)

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        alpha_t = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
        return alpha_t, sigma * alpha_t

    @staticmethod
    def _lambda(alpha_t: np.float32, sigma_t: np.float32) -> np.float32:
        with np.errstate(divide="ignore"):  # sigma_t = 0 at the end: lambda = +inf, as in diffusers
            return log32(alpha_t) - log32(sigma_t)

    def _data_prediction(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self.step_index])
        if self.config.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output  # "v_prediction"

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("DPM-Solver++: call set_timesteps before step")
        if self.step_index is None:
            self.step_index = self._index(timestep) if self.begin_index is None else self.begin_index
        model_output, sample = as_f32(model_output), as_f32(sample)
        # final_sigmas_type "zero": the last step is always first order.
        last_step = self.step_index == len(self.timesteps) - 1

        x0_pred = self._data_prediction(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [x0_pred]

        if self.lower_order_nums < 1 or last_step:
            prev_sample = self._first_order_update(x0_pred, sample)
        else:
            prev_sample = self._second_order_update(sample)
        if self.lower_order_nums < self.solver_order:
            self.lower_order_nums += 1

        self.step_index += 1
        return prev_sample.astype(np.float32, copy=False)

    def _first_order_update(self, x0_pred: np.ndarray, sample: np.ndarray) -> np.ndarray:
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self.step_index + 1])
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[self.step_index])
        h = self._lambda(alpha_t, sigma_t) - self._lambda(alpha_s, sigma_s)
        return (sigma_t / sigma_s) * sample - (alpha_t * (exp32(-h) - np.float32(1.0))) * x0_pred

    def _second_order_update(self, sample: np.ndarray) -> np.ndarray:
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self.step_index + 1])
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[self.step_index])
        alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[self.step_index - 1])
        lambda_t = self._lambda(alpha_t, sigma_t)
        lambda_s0 = self._lambda(alpha_s0, sigma_s0)
        lambda_s1 = self._lambda(alpha_s1, sigma_s1)

        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (np.float32(1.0) / r0) * (m0 - m1)
        phi = alpha_t * (exp32(-h) - np.float32(1.0))
        return (sigma_t / sigma_s0) * sample - phi * D0 - np.float32(0.5) * phi * D1
