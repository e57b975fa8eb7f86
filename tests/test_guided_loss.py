"""`sdedge train --guided-loss-scale W` (trainer/lora_trainer.py `Trainer.loss`): the denoising loss is taken on the
guided prediction u + W·(c − u) that sampling at guidance W denoises with (c: the caption's prediction, u: the empty
caption's, from the model being trained, without gradient), checked against the formula computed by hand on a
tiny base, value and gradients; the flag's range and refusals; adapter.json records it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import disc_dataset

from sdedge.runtime.errors import BadInput
from sdedge.runtime.strict import ConfigError
from sdedge.trainer.batches import tokenize
from sdedge.trainer.config import HELP, TrainConfig, add_config_flags, config_from_args, resolve
from sdedge.trainer.lora_trainer import Trainer
from sdedge.trainer.train import train

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220)}
W = 3.0


@pytest.fixture(scope="module")
def setup(tiny_base, tmp_path_factory) -> tuple[Path, Path]:
    """The trained tiny base (its predictions depend on the caption, so u and c differ) and four captioned discs."""
    return tiny_base, disc_dataset(tmp_path_factory.mktemp("guided") / "data", COLOURS, n=4)


def _trainer(setup, out: Path, **kw) -> Trainer:
    """A trainer ready for `loss` (models, caches, optimizer), its LoRA B weights made non-zero so that the LoRA
    moves both the conditional and the unconditional prediction."""
    base, data = setup
    trainer = Trainer(TrainConfig(base=str(base), data=str(data), out=str(out), rank=4, batch_size=4, progress=False,
                                  tensorboard=False, **kw))
    trainer.setup_models()
    trainer.build_caches()
    trainer.prepare_optimizer(None, None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.lora_params().items():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return trainer


def _grads(trainer, loss) -> dict[str, torch.Tensor]:
    for p in trainer.lora_params().values():
        p.grad = None
    loss.backward()
    return {n: p.grad.clone() for n, p in trainer.lora_params().items()}


def _by_hand(trainer, batch, w: float, u_gradient: bool = False):
    """The guided loss written out: ‖u + w·(c − u) − ε‖², u from the empty caption (without gradient unless
    `u_gradient`, the wrong loss this test must tell apart)."""
    unet, text, tok = trainer.unet, trainer.text_encoder, trainer.base.tokenizer
    noisy = trainer.noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    c = unet(noisy, batch.timesteps, encoder_hidden_states=text(tokenize(tok, batch.captions))[0]).sample
    with torch.set_grad_enabled(u_gradient):
        empty = text(tokenize(tok, [""] * len(batch.captions)))[0]
        u = unet(noisy, batch.timesteps, encoder_hidden_states=empty).sample
    return torch.nn.functional.mse_loss(u + w * (c - u), batch.noise)


# the empty caption's embedding from the text cache (frozen text encoder) / from the text encoder being trained; the
# second is slow (over 3 s on 2 shared cores) and the first its fast-lane cover
@pytest.mark.parametrize("train_text_encoder", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_the_loss_is_the_guided_prediction_error(setup, tmp_path, train_text_encoder):
    trainer = _trainer(setup, tmp_path / "g", guided_loss_scale=W, train_text_encoder=train_text_encoder)
    batch = trainer.batches(0)
    loss = trainer.loss(batch)
    got = _grads(trainer, loss)
    ref = _by_hand(trainer, batch, W)
    want = _grads(trainer, ref)
    loss, ref = float(loss.detach()), float(ref.detach())
    assert loss == pytest.approx(ref, rel=1e-5)
    assert all(torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-8) for n in want)
    # the wrong losses are told apart: the plain one (w = 1) and one whose gradient also flows through u
    plain = float(_by_hand(trainer, batch, 1.0).detach())
    assert abs(loss - plain) > 0.05 * plain
    through_u = _grads(trainer, _by_hand(trainer, batch, W, u_gradient=True))
    diff = max(float((through_u[n] - want[n]).abs().max() / (want[n].abs().max() + 1e-12)) for n in want)
    assert diff > 0.05


def test_a_run_records_it(setup, tmp_path):
    base, data = setup
    result = train(TrainConfig(base=str(base), data=str(data), out=str(tmp_path / "run"), rank=4, batch_size=2,
                               max_steps=2, guided_loss_scale=7.5, progress=False, tensorboard=False))
    doc = json.loads((tmp_path / "run" / "adapter.json").read_text())
    assert doc["config"]["guided_loss_scale"] == 7.5 and len(result.losses) == 2


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_flags(p)
    return config_from_args(p.parse_args(argv))


def test_flag_range_and_refusals(tmp_path):
    assert _parse(["--guided-loss-scale", "7.5"]).guided_loss_scale == 7.5
    assert "guidance" in HELP["guided_loss_scale"]
    assert resolve(TrainConfig(base="b", data="d", out="o")).guided_loss_scale is None
    ok = dict(base="b", data="d", out="o")
    for bad in [dict(guided_loss_scale=0.5), dict(guided_loss_scale=float("inf")),
                dict(guided_loss_scale=7.5, lcm=True), dict(guided_loss_scale=7.5, distill_from="teacher")]:
        with pytest.raises(ConfigError, match="guided_loss_scale"):
            resolve(TrainConfig(**ok, **bad))
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    with pytest.raises(BadInput, match="--guided-loss-scale"):
        train(TrainConfig(base=str(sdxl), data="d", out=str(tmp_path / "o"), guided_loss_scale=7.5))
