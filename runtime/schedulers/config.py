"""The noise schedule a model was trained with, and the one helper every scheduler builds on.

Legend (code name -> symbol in the papers; DDPM = Ho et al. 2020, DDIM = Song et al. 2021):
    num_train_timesteps    T, the number of training noise levels t = 0 .. T-1
    betas[t]               beta_t, the variance added at step t (DDPM eq. 2)
    alphas[t]              alpha_t = 1 - beta_t (DDPM section 2)
    alphas_cumprod[t]      alpha-bar_t = prod_{s<=t} alpha_s (DDPM eq. 4; DDIM writes it alpha_t, eq. 12)
    "linear"               beta_t evenly spaced from beta_start to beta_end (DDPM section 4)
    "scaled_linear"        sqrt(beta_t) evenly spaced, squared (Stable Diffusion's schedule)
    "squaredcos_cap_v2"    alpha-bar(t) = cos^2(((t/T + 0.008) / 1.008) * pi/2), beta_t capped at 0.999
                           (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17)

`SchedulerConfig` mirrors the keys of a diffusers `scheduler_config.json` that change the maths of the
schedulers in this package. `SchedulerConfig.from_dict` reads such a JSON dict: it keeps the keys it knows,
ignores the keys that only name or select an algorithm (the scheduler *name* given to `make_scheduler`
selects the algorithm here), and raises `BadInput`, naming the key, for any value it cannot honour
(and for a key it does not know, since it cannot tell whether that key changes the maths).

`noise_schedule(config)` is the single place betas and alpha-bar are computed. It reproduces diffusers'
float32 arithmetic bit for bit (torch.linspace's two-sided formula with a fused multiply-add, and
torch.cumprod's float64 accumulator), so every scheduler starts from exactly diffusers' alpha-bar.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadInput

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule plus the sampling options the schedulers read.

    Defaults are Stable Diffusion 1.5's `scheduler_config.json` (with `clip_sample` false).
    `clip_sample`/`clip_sample_range` are read by DDIM and LCM, `use_karras_sigmas` by Euler and
    DPM-Solver++, `original_inference_steps`/`timestep_scaling` by LCM, as in diffusers.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    use_karras_sigmas: bool = False
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    def __post_init__(self) -> None:
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        for key in ("num_train_timesteps", "steps_offset", "original_inference_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise BadInput(f"scheduler config: {key} must be an integer, got {value!r}")
        for key in ("beta_start", "beta_end", "clip_sample_range", "timestep_scaling"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise BadInput(f"scheduler config: {key} must be a number, got {value!r}")
        for key in ("set_alpha_to_one", "clip_sample", "use_karras_sigmas"):
            if not isinstance(getattr(self, key), (bool, np.bool_)):
                raise BadInput(f"scheduler config: {key} must be true or false, got {getattr(self, key)!r}")
        if self.num_train_timesteps < 2:
            raise BadInput(f"scheduler config: num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise BadInput(
                f"scheduler config: beta_schedule {self.beta_schedule!r} is not supported; "
                f"choose one of {', '.join(BETA_SCHEDULES)}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise BadInput(
                f"scheduler config: prediction_type {self.prediction_type!r} is not supported; "
                f"choose one of {', '.join(PREDICTION_TYPES)}"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise BadInput(
                f"scheduler config: timestep_spacing {self.timestep_spacing!r} is not supported; "
                f"choose one of {', '.join(TIMESTEP_SPACINGS)}"
            )
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise BadInput(
                f"scheduler config: trained_betas has {len(self.trained_betas)} values, "
                f"num_train_timesteps is {self.num_train_timesteps}"
            )
        if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            raise BadInput(
                f"scheduler config: original_inference_steps must be in 1..{self.num_train_timesteps}, "
                f"got {self.original_inference_steps}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SchedulerConfig:
        """Read a diffusers `scheduler_config.json` dict (of any scheduler class) or a `to_dict()` output."""
        if not isinstance(d, dict):
            raise BadInput(f"scheduler config must be a JSON object, got {type(d).__name__}")
        kept: dict[str, Any] = {}
        for key, value in d.items():
            if key in _FIELDS:
                if key == "trained_betas" and value is not None:
                    try:
                        value = tuple(float(b) for b in value)
                    except (TypeError, ValueError) as exc:
                        raise BadInput(f"scheduler config: trained_betas must be a list of numbers ({exc})") from exc
                kept[key] = value
            elif key in _IGNORED_KEYS:
                continue
            elif key in _KEYS_WITH_ONE_HONOURED_VALUE:
                if not _KEYS_WITH_ONE_HONOURED_VALUE[key](value):
                    raise BadInput(
                        f"scheduler config: {key}={value!r} is not supported by sdedge's schedulers "
                        f"(only {_HONOURED_VALUE_TEXT[key]})"
                    )
            else:
                raise BadInput(
                    f"scheduler config: unknown key {key!r}; sdedge cannot tell whether it changes the maths"
                )
        return cls(**kept)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["trained_betas"] is not None:
            d["trained_betas"] = list(d["trained_betas"])
        return d


_FIELDS = frozenset(f.name for f in dataclasses.fields(SchedulerConfig))

# Keys that never change the maths here: metadata, and knobs that only choose an algorithm, which
# `make_scheduler`'s name chooses instead (PRK warm-up, solver order/type/variant, UniPC's and EDM's
# own knobs), or that are read only together with an option rejected below (thresholding, flow sigmas).
_IGNORED_KEYS = frozenset(
    {
        "_class_name",
        "_diffusers_version",
        "_use_default_values",
        "skip_prk_steps",
        "solver_order",
        "algorithm_type",
        "solver_type",
        "lower_order_final",
        "predict_x0",
        "solver_p",
        "disable_corrector",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "flow_shift",
        "time_shift_type",
        "rho",
        "sigma_data",
        "sigma_schedule",
    }
)

# Keys accepted only with the value the schedulers here implement (diffusers' default).
_KEYS_WITH_ONE_HONOURED_VALUE = {
    "thresholding": lambda v: v is False,
    "rescale_betas_zero_snr": lambda v: v is False,
    "euler_at_final": lambda v: v is False,
    "use_lu_lambdas": lambda v: v is False,
    "use_exponential_sigmas": lambda v: v is False,
    "use_beta_sigmas": lambda v: v is False,
    "use_flow_sigmas": lambda v: v is False,
    "use_dynamic_shifting": lambda v: v is False,
    "final_sigmas_type": lambda v: v == "zero",
    "interpolation_type": lambda v: v == "linear",
    "timestep_type": lambda v: v == "discrete",
    "lambda_min_clipped": lambda v: isinstance(v, float) and math.isinf(v) and v < 0,
    "sigma_min": lambda v: v is None,
    "sigma_max": lambda v: v is None,
    "shift_terminal": lambda v: v is None,
    "variance_type": lambda v: v is None or not str(v).startswith("learned"),
}
_HONOURED_VALUE_TEXT = {
    "thresholding": "false",
    "rescale_betas_zero_snr": "false",
    "euler_at_final": "false",
    "use_lu_lambdas": "false",
    "use_exponential_sigmas": "false",
    "use_beta_sigmas": "false",
    "use_flow_sigmas": "false",
    "use_dynamic_shifting": "false",
    "final_sigmas_type": '"zero"',
    "interpolation_type": '"linear"',
    "timestep_type": '"discrete"',
    "lambda_min_clipped": "-inf",
    "sigma_min": "null",
    "sigma_max": "null",
    "shift_terminal": "null",
    "variance_type": "null or a fixed variance",
}


def noise_schedule(config: SchedulerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Return (betas, alphas_cumprod), both float32 of length T, exactly as diffusers computes them."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)
    elif config.beta_schedule == "linear":
        betas = _torch_linspace_f32(config.beta_start, config.beta_end, T)
    elif config.beta_schedule == "scaled_linear":
        betas = _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, T) ** 2
    else:  # "squaredcos_cap_v2", computed in float64 then stored as float32, as diffusers does
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=np.float32
        )
    alphas = np.float32(1.0) - betas
    # torch.cumprod on CPU accumulates float32 in float64 and rounds each partial product.
    alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    return betas, alphas_cumprod


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU: float32 step, the first half counted up
    from start and the second half down from end, each value one fused multiply-add (one rounding)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    idx = np.arange(steps, dtype=np.float64)
    up = np.float64(start32) + np.float64(step) * idx
    down = np.float64(end32) - np.float64(step) * (steps - 1 - idx)
    return np.where(idx < steps // 2, up, down).astype(np.float32)
