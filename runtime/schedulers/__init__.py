"""NumPy noise schedulers for the runtime's denoise loop, step-for-step twins of diffusers' schedulers.

    from sdedge.runtime.schedulers import SchedulerConfig, make_scheduler

    config = SchedulerConfig.from_dict(manifest["scheduler"])   # a diffusers scheduler_config.json dict
    s = make_scheduler("dpm++2m-karras", config)
    s.set_timesteps(25, rng=np.random.default_rng(seed))        # rng: only stochastic schedulers use it
    x = rng.standard_normal(shape, dtype=np.float32) * s.init_noise_sigma
    for t in s.timesteps:
        eps = unet(s.scale_model_input(x, t), t)                # + classifier-free guidance
        x = s.step(eps, t, x)                                   # or step(eps, t, x, noise=z) to supply z

Every scheduler has `set_timesteps(num_inference_steps, rng=None)`, `timesteps` (int64; float32 for the
Euler family, as diffusers), `init_noise_sigma` (float), `scale_model_input(sample, timestep)`,
`step(model_output, timestep, sample, noise=None) -> float32 ndarray` and `order`; for image-to-image,
`add_noise(x0, noise, timestep)` (the forward process to `timestep`'s noise level) and `set_begin_index(i)` (denoising
starts at `timesteps[i]`), as diffusers' (runtime/init_image.py: strength_timesteps). Stochastic schedulers
(euler_a, lcm, ddim with eta > 0) take their standard-normal noise from `noise` when given, else from the
`rng` given to the latest `set_timesteps` (a fresh unseeded generator when none was given).
Schedulers are stateful (multistep history, step index): one generation at a time per object;
`set_timesteps` starts a new one.

This package imports NumPy only: never torch or diffusers.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable

from ..errors import BadInput
from .config import SchedulerConfig, noise_schedule
from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler

# name -> factory(config, **options). Options are forwarded: ddim takes eta; euler and dpm++2m take
# use_karras_sigmas (default: config.use_karras_sigmas).
SCHEDULERS: dict[str, Callable[..., Any]] = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "dpm++2m-karras": partial(DPMSolverMultistepScheduler, use_karras_sigmas=True),
    "lcm": LCMScheduler,
}
ALIASES = {"plms": "pndm", "euler-ancestral": "euler_a"}


def scheduler_names() -> list[str]:
    """The accepted names, canonical ones first, then aliases."""
    return list(SCHEDULERS) + list(ALIASES)


def make_scheduler(name: str, config: SchedulerConfig | None = None, **options: Any):
    """Build the scheduler called `name` (see `scheduler_names()`) for the noise schedule `config`
    (SD1.5's when None). Raises BadInput for an unknown name or option."""
    key = ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in SCHEDULERS:
        raise BadInput(f"unknown scheduler {name!r}; valid names: {', '.join(scheduler_names())}")
    factory = SCHEDULERS[key]
    fixed = factory.keywords if isinstance(factory, partial) else {}
    accepted = [p for p in inspect.signature(factory).parameters if p != "config" and p not in fixed]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise BadInput(f"scheduler {name!r}: unknown option(s) {unknown}; it accepts {accepted or 'none'}")
    return factory(config if config is not None else SchedulerConfig(), **options)


__all__ = [
    "SCHEDULERS",
    "SchedulerConfig",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LCMScheduler",
    "PNDMScheduler",
    "make_scheduler",
    "noise_schedule",
    "scheduler_names",
]
