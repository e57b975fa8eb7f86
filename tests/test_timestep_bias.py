"""`sdedge train --timestep-bias-strategy later|earlier` (trainer/batches.py `timestep_weights`): the training
timesteps a run draws are biased to the noisiest (or least noisy) part of the schedule, as diffusers'
train_text_to_image_sdxl.py does; uniform without it; bad settings refused naming the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import disc_dataset

from sdedge.runtime.strict import ConfigError
from sdedge.trainer.batches import timestep_weights
from sdedge.trainer.config import TrainConfig, add_config_flags, config_from_args, resolve
from sdedge.trainer.lora_trainer import Trainer

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    from sdedge.export.bases import write_builtin_base

    root = tmp_path_factory.mktemp("tbias")
    return write_builtin_base("tiny-random", root / "base", seed=0), disc_dataset(root / "data", COLOURS, n=4)


def drawn_timesteps(setup, out: Path, micro_steps: int = 100, **kw) -> list[int]:
    """The timesteps the trainer's own batches draw over `micro_steps` micro-steps of batch 4."""
    base, data = setup
    trainer = Trainer(TrainConfig(base=str(base), data=str(data), out=str(out), rank=4, batch_size=4,
                                  progress=False, tensorboard=False, **kw))
    trainer.setup_models()
    trainer.build_caches()
    return [int(t) for m in range(micro_steps) for t in trainer.batches(m).timesteps]


def test_weights_bias_the_portion_named():
    cfg = TrainConfig(timestep_bias_strategy="later", timestep_bias_portion=0.25, timestep_bias_multiplier=5.0)
    w = timestep_weights(cfg, 1000)
    assert w.shape == (1000,) and abs(float(w.sum()) - 1.0) < 1e-12
    assert float(w[750] / w[749]) == pytest.approx(5.0) and float(w[:750].std()) < 1e-15 and float(w[750:].std()) < 1e-15
    assert float(w[750:].sum()) == pytest.approx(250 * 5 / (750 + 250 * 5))  # 0.625 of the draws
    early = timestep_weights(TrainConfig(timestep_bias_strategy="earlier", timestep_bias_portion=0.1,
                                         timestep_bias_multiplier=3.0), 1000)
    assert float(early[99] / early[100]) == pytest.approx(3.0)
    assert timestep_weights(TrainConfig(), 1000) is None


def test_the_trainer_draws_biased_timesteps(setup, tmp_path):
    uniform = drawn_timesteps(setup, tmp_path / "u")
    later = drawn_timesteps(setup, tmp_path / "l", timestep_bias_strategy="later", timestep_bias_portion=0.5,
                            timestep_bias_multiplier=3.0)
    share = lambda ts: sum(t >= 500 for t in ts) / len(ts)  # noqa: E731
    # 400 draws each: expected 0.5 and 0.75, one standard error about 0.025 and 0.022
    assert 0.40 < share(uniform) < 0.60
    assert 0.66 < share(later) < 0.84
    assert all(0 <= t < 1000 for t in later)
    again = drawn_timesteps(setup, tmp_path / "l2", timestep_bias_strategy="later", timestep_bias_portion=0.5,
                            timestep_bias_multiplier=3.0)
    assert again == later  # seeded per micro-step and slot, as every other draw


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_flags(p)
    return config_from_args(p.parse_args(argv))


def test_flags_and_refusals():
    c = _parse(["--timestep-bias-strategy", "later", "--timestep-bias-multiplier", "2", "--timestep-bias-portion",
                "0.3"])
    assert (c.timestep_bias_strategy, c.timestep_bias_multiplier, c.timestep_bias_portion) == ("later", 2.0, 0.3)
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        _parse(["--timestep-bias-strategy", "middle"])
    ok = dict(base="b", data="d", out="o")
    for bad, key in [(dict(timestep_bias_multiplier=0.0), "timestep_bias_multiplier"),
                     (dict(timestep_bias_portion=1.0), "timestep_bias_portion"),
                     (dict(timestep_bias_portion=0.0), "timestep_bias_portion"),
                     (dict(timestep_bias_strategy="middle"), "timestep_bias_strategy"),
                     (dict(timestep_bias_strategy="later", lcm=True), "timestep_bias_strategy")]:
        with pytest.raises(ConfigError, match=key):
            resolve(TrainConfig(**ok, **bad))
