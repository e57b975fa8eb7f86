"""PLMS: the pseudo linear multistep method of PNDM (Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods
for Diffusion Models on Manifolds"), as diffusers' PNDMScheduler with skip_prk_steps=True (Stable Diffusion 1.5's).

Legend (code name -> symbol in the PNDM paper):
    timestep, prev_timestep   t and t - delta, delta = T // num_inference_steps
    alpha_prod_t              alpha-bar_t
    alpha_prod_t_prev         alpha-bar_{t-delta}; alpha-bar_0 or 1 past the end (`set_alpha_to_one`)
    model_output              e_t = eps_theta(x_t, t), the noise prediction
    ets                       [e_{t+3delta}, e_{t+2delta}, e_{t+delta}, e_t], the last four noise predictions
    _transfer(...)            the transfer part phi(x_t, e, t, t - delta) of eq. 11:
                                x_{t-delta} = sqrt(alpha-bar_{t-delta} / alpha-bar_t) x_t
                                            - (alpha-bar_{t-delta} - alpha-bar_t) e
                                              / (alpha-bar_t sqrt(1 - alpha-bar_{t-delta})
                                                 + sqrt(alpha-bar_t (1 - alpha-bar_t) alpha-bar_{t-delta}))
    PLMS gradient             e' = (55 e_t - 59 e_{t+delta} + 37 e_{t+2delta} - 9 e_{t+3delta}) / 24 (eq. 12)
    v_prediction              v = sqrt(alpha-bar_t) eps - sqrt(1 - alpha-bar_t) x0 (Salimans & Ho 2022), so
                              e = sqrt(alpha-bar_t) v + sqrt(1 - alpha-bar_t) x_t

Warm-up without Runge-Kutta steps (diffusers' skip_prk_steps): the first step moves x_t to t - delta with e_t
alone; the model is then called at t - delta on that estimate, and the mean (e_t + e_{t-delta}) / 2 redoes the
move from x_t (a Heun-like correction); the model is called at t - delta once more, on the corrected sample,
and the Adams-Bashforth gradients of order 2 ((3 e_t - e_{t+delta}) / 2) and 3 ((23 e_t - 16 e_{t+delta}
+ 5 e_{t+2delta}) / 12) follow until four predictions exist. So t - delta appears twice in `timesteps`,
which has num_inference_steps + 1 entries (1 for a single step).

Usage: `s = PNDMScheduler(config)`, `s.set_timesteps(n)`, then for each t in `s.timesteps`:
`x = s.step(eps, t, x)`. Deterministic: `noise` and `rng` are accepted and unused.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadInput
from .common import AlphaBarScheduler, as_f32
from .config import SchedulerConfig


class PNDMScheduler(AlphaBarScheduler):
    order = 1
    init_noise_sigma = 1.0

    def __init__(self, config: SchedulerConfig):
        self._init_schedule(config)
        self._reset()

    def _reset(self) -> None:
        self.ets: list[np.ndarray] = []
        self.counter = 0
        self.cur_sample: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int, rng: np.random.Generator | None = None) -> None:
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise BadInput(f"PNDM: num_inference_steps must be in 1..{T}, got {num_inference_steps}")
        n = num_inference_steps
        spacing = self.config.timestep_spacing
        # The base grid, ascending.
        if spacing == "linspace":
            grid = np.linspace(0, T - 1, n).round().astype(np.int64)
        elif spacing == "leading":
            grid = np.arange(0, n, dtype=np.int64) * (T // n) + self.config.steps_offset
        else:  # "trailing"
            grid = np.round(np.arange(T, 0, -T / n))[::-1].astype(np.int64) - 1
        # PLMS order: descending, with the second-highest timestep repeated for the warm-up correction.
        self.timesteps = np.concatenate([grid[:-1], grid[-2:-1], grid[-1:]])[::-1].astype(np.int64).copy()
        self.num_inference_steps = n
        self.begin_index = None
        self._reset()

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return as_f32(sample)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("PNDM: call set_timesteps before step")
        model_output, sample = as_f32(model_output), as_f32(sample)
        timestep = int(timestep)
        delta = self.config.num_train_timesteps // self.num_inference_steps
        prev_timestep = timestep - delta

        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:  # the repeated timestep: redo the first transfer, from t, with the averaged prediction
            prev_timestep = timestep
            timestep = timestep + delta

        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            e = model_output
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            e = (model_output + ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])

        prev_sample = self._transfer(sample, timestep, prev_timestep, e)
        self.counter += 1
        return prev_sample

    def _transfer(self, sample: np.ndarray, timestep: int, prev_timestep: int, e: np.ndarray) -> np.ndarray:
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = np.float32(1.0) - alpha_prod_t
        beta_prod_t_prev = np.float32(1.0) - alpha_prod_t_prev

        if self.config.prediction_type == "v_prediction":
            e = np.sqrt(alpha_prod_t) * e + np.sqrt(beta_prod_t) * sample

        sample_coeff = np.sqrt(alpha_prod_t_prev / alpha_prod_t)
        e_denom_coeff = alpha_prod_t * np.sqrt(beta_prod_t_prev) + np.sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev)
        prev_sample = sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * e / e_denom_coeff
        return prev_sample.astype(np.float32, copy=False)
