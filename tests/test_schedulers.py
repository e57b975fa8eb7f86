"""The runtime's NumPy schedulers against diffusers' own, step by step over whole schedules.

Each case builds our scheduler and its diffusers twin from the same config (SD1.5's noise schedule), runs the
full schedule with a deterministic fake UNet (its output depends on the sample and t, so any error propagates),
feeds both the same model output and, for stochastic schedulers, the same noise (drawn from a torch generator
in the order diffusers draws it), and compares timesteps, init_noise_sigma, scale_model_input and every sample.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdedge.runtime.errors import BadInput  # noqa: E402
from sdedge.runtime.schedulers import (  # noqa: E402
    SCHEDULERS,
    SchedulerConfig,
    make_scheduler,
    noise_schedule,
    scheduler_names,
)

TOL = 1e-5
SHAPE = (2, 4, 8, 8)

# Stable Diffusion 1.5's scheduler_config.json, as shipped.
SD15_JSON = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# name -> (diffusers class, extra diffusers config, draws noise at step i of n)
TWINS = {
    "ddim": (diffusers.DDIMScheduler, {}, None),
    "pndm": (diffusers.PNDMScheduler, {"skip_prk_steps": True}, None),
    "euler": (diffusers.EulerDiscreteScheduler, {}, None),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}, lambda i, n: True),
    "dpm++2m": (diffusers.DPMSolverMultistepScheduler, {}, None),
    "dpm++2m-karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, None),
    "lcm": (diffusers.LCMScheduler, {}, lambda i, n: i != n - 1),
}


def fake_unet(x: np.ndarray, t, prediction_type: str, alphas_cumprod: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for the UNet, a function of the (scaled) sample and t: a denoiser that steers
    towards a fixed latent image x0 (so latents keep SD's magnitudes), off by a t-dependent sin pattern and a
    term in x, so that any difference in the sample changes the next model output. float64 inside, float32 out."""
    pattern = np.linspace(-3.0, 3.0, x.size).reshape(x.shape)
    x0 = 1.5 * np.sin(2.0 * pattern)
    abar = np.interp(float(t), np.arange(len(alphas_cumprod)), alphas_cumprod)
    x64 = x.astype(np.float64)
    eps = (x64 - np.sqrt(abar) * x0) / np.sqrt(1 - abar) + 0.1 * np.sin(pattern + 0.013 * float(t)) + 0.05 * x64
    if prediction_type == "v_prediction":
        return (np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0).astype(np.float32)
    return eps.astype(np.float32)


def run_side_by_side(name, *, steps, diffusers_overrides=None, options=None, step_kwargs=None, seed=0):
    """Run ours and diffusers' over a whole schedule; return the largest |ours - theirs| seen at any step."""
    cls, extra, draws_noise = TWINS[name]
    # SD1.5's JSON has no timestep_spacing key, so each diffusers class would fall back to its own default
    # ("linspace" for Euler and DPM-Solver); name SchedulerConfig's default, "leading", for all of them.
    their_config = {**SD15_JSON, "timestep_spacing": "leading", **extra, **(diffusers_overrides or {})}
    theirs = cls.from_config(their_config)
    # Ours reads the twin's own full config (diffusers-only keys and all), as a bundle manifest would carry it.
    ours = make_scheduler(name, SchedulerConfig.from_dict(dict(theirs.config)), **(options or {}))
    step_kwargs = dict(step_kwargs or {})
    if name == "ddim" and options and options.get("eta", 0) > 0:
        step_kwargs["eta"] = options["eta"]
        draws_noise = lambda i, n: True  # noqa: E731

    pred = ours.config.prediction_type
    abar = theirs.alphas_cumprod.double().numpy()
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    their_t = theirs.timesteps.numpy()
    assert ours.timesteps.dtype == their_t.dtype, (ours.timesteps.dtype, their_t.dtype)
    if their_t.dtype == np.int64:
        np.testing.assert_array_equal(ours.timesteps, their_t)
    else:
        # Euler's float32 timesteps. Fractional ones mapped back from Karras sigmas may differ by one ulp:
        # the training sigmas come from torch's float32 sqrt, which is not always correctly rounded (NumPy's is).
        np.testing.assert_allclose(ours.timesteps, their_t, rtol=3e-7, atol=0)
    their_sigma = float(theirs.init_noise_sigma)
    assert isinstance(ours.init_noise_sigma, float)
    assert math.isclose(ours.init_noise_sigma, their_sigma, rel_tol=2e-7), (ours.init_noise_sigma, their_sigma)

    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    x_theirs = start * theirs.init_noise_sigma
    x_ours = start.numpy() * np.float32(ours.init_noise_sigma)
    their_gen = torch.Generator().manual_seed(seed + 1)  # handed to diffusers
    our_gen = torch.Generator().manual_seed(seed + 1)  # replays the same draws for ours
    n = len(their_t)
    worst = float(np.abs(x_ours - x_theirs.numpy()).max())
    for i, (t_ours, t_theirs) in enumerate(zip(ours.timesteps, theirs.timesteps)):
        in_ours = ours.scale_model_input(x_ours, t_ours)
        in_theirs = theirs.scale_model_input(x_theirs, t_theirs)
        assert in_ours.dtype == np.float32
        diff_in = float(np.abs(in_ours - in_theirs.numpy()).max())
        assert diff_in <= TOL, f"{name} step {i}/{n} t={t_ours}: scale_model_input differs by {diff_in}"

        eps_ours = fake_unet(in_ours, t_ours, pred, abar)
        eps_theirs = torch.from_numpy(fake_unet(in_theirs.numpy(), float(t_theirs), pred, abar))
        noise = None
        if draws_noise is not None and draws_noise(i, n):
            noise = torch.randn(SHAPE, generator=our_gen).numpy()
        kwargs = {"generator": their_gen} if draws_noise is not None else {}
        x_theirs = theirs.step(eps_theirs, t_theirs, x_theirs, **kwargs, **step_kwargs).prev_sample
        x_ours = ours.step(eps_ours, t_ours, x_ours, noise=noise)

        assert x_ours.dtype == np.float32 and x_ours.shape == SHAPE
        diff = float(np.abs(x_ours - x_theirs.numpy()).max())
        assert diff <= TOL, f"{name} step {i}/{n} t={t_ours}: samples differ by {diff}"
        worst = max(worst, diff, diff_in)
    assert np.isfinite(x_ours).all()
    return worst


ALL = list(TWINS)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("steps", [1, 4, 20, 50])
def test_parity_sd15_leading_epsilon(name, steps):
    run_side_by_side(name, steps=steps)


def test_lcm_boundary_scalings_match_diffusers():
    """c_skip and c_out barely move the samples at LCM's timesteps, so check them directly, down to t = 0."""
    ours = make_scheduler("lcm", SchedulerConfig())
    theirs = diffusers.LCMScheduler.from_config(SD15_JSON)
    for t in [0, 1, 2, 5, 19, 99, 499, 999]:
        c_skip, c_out = ours._boundary_scalings(t)
        their_skip, their_out = theirs.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert math.isclose(c_skip, float(their_skip), rel_tol=1e-6, abs_tol=1e-12), (t, c_skip, their_skip)
        assert math.isclose(c_out, float(their_out), rel_tol=1e-6, abs_tol=1e-12), (t, c_out, their_out)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("steps", [4, 20])
def test_parity_v_prediction(name, steps):
    run_side_by_side(name, steps=steps, diffusers_overrides={"prediction_type": "v_prediction"})


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("name", [n for n in ALL if n != "lcm"])
@pytest.mark.parametrize("steps", [4, 25])
def test_parity_timestep_spacing(name, spacing, steps):
    run_side_by_side(name, steps=steps, diffusers_overrides={"timestep_spacing": spacing})


@pytest.mark.parametrize("steps", [4, 20])
def test_parity_euler_karras_sigmas(steps):
    run_side_by_side("euler", steps=steps, diffusers_overrides={"use_karras_sigmas": True})


@pytest.mark.parametrize("steps", [4, 20])
def test_parity_ddim_eta_noise(steps):
    run_side_by_side("ddim", steps=steps, options={"eta": 1.0})


def test_parity_ddim_clip_and_alpha_one():
    run_side_by_side("ddim", steps=10, diffusers_overrides={"clip_sample": True, "set_alpha_to_one": True})


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++2m"])
def test_parity_other_beta_schedules(name, schedule):
    overrides = {"beta_schedule": schedule, "beta_start": 0.0001, "beta_end": 0.02}
    # sigma_max reaches 157 ("linear") and ~20000 ("squaredcos_cap_v2"): a stress test of the float32 maths.
    run_side_by_side(name, steps=10, diffusers_overrides=overrides)


def test_parity_catches_a_wrong_scheduler():
    """The harness can fail: plain Euler against diffusers' Euler ancestral shares timesteps, sigmas and
    input scaling, and must fail on the samples."""
    TWINS["euler-vs-ancestral"] = (diffusers.EulerAncestralDiscreteScheduler, {}, lambda i, n: True)
    SCHEDULERS["euler-vs-ancestral"] = SCHEDULERS["euler"]
    try:
        with pytest.raises(AssertionError, match="samples differ"):
            run_side_by_side("euler-vs-ancestral", steps=20)
    finally:
        TWINS.pop("euler-vs-ancestral")
        SCHEDULERS.pop("euler-vs-ancestral")


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_noise_schedule_is_diffusers_bit_for_bit(schedule):
    cfg = {**SD15_JSON, "beta_schedule": schedule}
    theirs = diffusers.DDIMScheduler.from_config(cfg)
    betas, alphas_cumprod = noise_schedule(SchedulerConfig.from_dict(cfg))
    assert betas.dtype == alphas_cumprod.dtype == np.float32
    np.testing.assert_array_equal(betas, theirs.betas.numpy())
    np.testing.assert_array_equal(alphas_cumprod, theirs.alphas_cumprod.numpy())


def test_trained_betas():
    betas = np.linspace(1e-4, 2e-2, 1000).tolist()
    theirs = diffusers.DDIMScheduler.from_config({**SD15_JSON, "trained_betas": betas})
    cfg = SchedulerConfig.from_dict({**SD15_JSON, "trained_betas": betas})
    np.testing.assert_array_equal(noise_schedule(cfg)[1], theirs.alphas_cumprod.numpy())


# --- config --------------------------------------------------------------------------------------


def test_from_dict_sd15_json_and_round_trip():
    cfg = SchedulerConfig.from_dict(json.loads(json.dumps(SD15_JSON)))
    assert cfg == SchedulerConfig()  # the defaults are SD1.5's
    assert SchedulerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg2 = SchedulerConfig.from_dict({"prediction_type": "v_prediction", "timestep_spacing": "trailing"})
    assert (cfg2.prediction_type, cfg2.timestep_spacing) == ("v_prediction", "trailing")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta_start = 0.1  # frozen


def test_from_dict_reads_a_saved_dpm_json_with_infinity():
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(SD15_JSON)
    text = theirs.to_json_string()  # writes lambda_min_clipped as -Infinity
    cfg = SchedulerConfig.from_dict(json.loads(text))
    assert cfg.timestep_spacing == "linspace" and cfg.steps_offset == 1


@pytest.mark.parametrize(
    "key,value",
    [
        ("beta_schedule", "sigmoid"),
        ("prediction_type", "sample"),
        ("timestep_spacing", "middle"),
        ("thresholding", True),
        ("rescale_betas_zero_snr", True),
        ("use_exponential_sigmas", True),
        ("final_sigmas_type", "sigma_min"),
        ("interpolation_type", "log_linear"),
        ("lambda_min_clipped", -5.1),
        ("variance_type", "learned_range"),
        ("sigma_max", 80.0),
        ("num_train_timesteps", "1000"),
        ("trained_betas", [0.1, 0.2]),
        ("some_future_knob", 3),
    ],
)
def test_from_dict_rejects_what_it_cannot_honour(key, value):
    with pytest.raises(BadInput, match=key):
        SchedulerConfig.from_dict({**SD15_JSON, key: value})


def test_from_dict_ignores_algorithm_selectors():
    cfg = SchedulerConfig.from_dict(
        {**SD15_JSON, "solver_order": 3, "algorithm_type": "sde-dpmsolver++", "skip_prk_steps": False, "thresholding": False}
    )
    assert cfg == SchedulerConfig()


# --- registry ------------------------------------------------------------------------------------


def test_names_and_aliases():
    names = scheduler_names()
    for n in ["ddim", "pndm", "plms", "euler", "euler_a", "euler-ancestral", "dpm++2m", "dpm++2m-karras", "lcm"]:
        assert n in names
    assert type(make_scheduler("plms", SchedulerConfig())) is type(make_scheduler("pndm", SchedulerConfig()))
    assert type(make_scheduler("euler-ancestral", SchedulerConfig())).__name__ == "EulerAncestralDiscreteScheduler"
    assert make_scheduler("dpm++2m-karras", SchedulerConfig()).use_karras_sigmas is True
    assert make_scheduler("dpm++2m", SchedulerConfig()).use_karras_sigmas is False
    for n in names:
        s = make_scheduler(n, SchedulerConfig())
        assert s.order == 1 and callable(s.step) and callable(s.scale_model_input)


def test_unknown_name_lists_valid_names():
    with pytest.raises(BadInput) as exc:
        make_scheduler("heun", SchedulerConfig())
    for n in scheduler_names():
        assert n in str(exc.value)


def test_unknown_option_is_bad_input():
    with pytest.raises(BadInput, match="foo"):
        make_scheduler("ddim", SchedulerConfig(), foo=1)


def test_importing_schedulers_does_not_import_torch():
    code = (
        "import sys, sdedge.runtime.schedulers as s; s.make_scheduler('euler_a', s.SchedulerConfig()).set_timesteps(5); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers')); print(bad); "
        "sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- noise and rng ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", [("euler_a", {}), ("lcm", {}), ("ddim", {"eta": 0.7})])
def test_rng_from_set_timesteps_is_reproducible_and_used(name, options):
    def run(seed):
        s = make_scheduler(name, SchedulerConfig(), **options)
        s.set_timesteps(6, rng=np.random.default_rng(seed))
        x = np.random.default_rng(99).standard_normal(SHAPE, dtype=np.float32) * np.float32(s.init_noise_sigma)
        for t in s.timesteps:
            x = s.step(fake_unet(s.scale_model_input(x, t), t, "epsilon", s.alphas_cumprod), t, x)
        return x

    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_explicit_noise_equals_rng_draws():
    rng = np.random.default_rng(5)
    s1 = make_scheduler("euler_a", SchedulerConfig())
    s1.set_timesteps(4, rng=np.random.default_rng(5))
    s2 = make_scheduler("euler_a", SchedulerConfig())
    s2.set_timesteps(4)
    x1 = x2 = np.ones(SHAPE, dtype=np.float32)
    for t in s1.timesteps:
        x1 = s1.step(fake_unet(x1, t, "epsilon", s1.alphas_cumprod), t, x1)
        x2 = s2.step(fake_unet(x2, t, "epsilon", s2.alphas_cumprod), t, x2, noise=rng.standard_normal(SHAPE, dtype=np.float32))
    np.testing.assert_array_equal(x1, x2)
