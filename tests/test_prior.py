"""Prior preservation (`sdedge train --prior-data DIR --prior-weight w`, trainer/prior.py): a LoRA that learns
purple on the trained tiny base drifts less on held-out base captions when rendered scenes of other base captions
join each step (measured 2026-12-04, 2-core EPYC: 0.0016 against 0.0040 without a prior). The base's own generated
images as the prior do not help (0.0048): they teach the base its own mistakes, as the quickstart measured
(docs/tiny-base.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdedge.runtime.strict import ConfigError
from sdedge.trainer.config import TrainConfig, add_config_flags, config_from_args, resolve

QUIET = dict(progress=False, tensorboard=False, log_steps=10, overwrite=True)
TIMESTEPS = (150, 400, 650, 900)


def test_prior_flags_and_ranges(tmp_path):
    p = argparse.ArgumentParser()
    add_config_flags(p)
    args = p.parse_args(["--prior-data", "prior/", "--prior-weight", "0.5"])
    cfg = config_from_args(args)
    assert (cfg.prior_data, cfg.prior_weight) == ("prior/", 0.5)
    base = dict(base="b", data="d", out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="prior_weight"):
        resolve(TrainConfig(**base, prior_data="p", prior_weight=0.0))
    with pytest.raises(ConfigError, match="prior_data"):
        resolve(TrainConfig(**base, prior_data="p", lcm=True))
    assert TrainConfig().prior_data is None  # off by default


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base, tiny_pipe):
    """Purple concept data, class images for 12 base captions (the base's own, and rendered scenes), and 6 held-out
    base captions."""
    from sdedge.tinyworld.classifier import base_captions
    from sdedge.tinyworld.shapes import NEW_COLOUR, parse_caption, render, write_dataset
    from sdedge.trainer.prepare import PrepareOptions, prepare_dataset
    from sdedge.trainer.prior import write_class_images

    root = tmp_path_factory.mktemp("prior")
    opts = PrepareOptions(resolution=64, dedup=None)
    concept = prepare_dataset(write_dataset(root / "purple", 32, colours=(NEW_COLOUR,), seed=5), root / "concept", opts)
    captions = base_captions()
    held_out = captions[::15][:6]
    class_prompts = [c for c in captions[1::7] if c not in held_out][:12]
    assert not set(class_prompts) & set(held_out)

    def generate(prompt, seed):
        g = torch.Generator().manual_seed(seed)
        return tiny_pipe(prompt, num_inference_steps=12, guidance_scale=7.5, generator=g, output_type="np").images[0] \
            .__mul__(255).round().astype(np.uint8)

    raw = write_class_images(generate, class_prompts, root / "class-images", seeds=(0,))
    assert sorted(p.name for p in raw.iterdir())[:2] == ["0000.png", "0000.txt"]
    assert (raw / "0003.txt").read_text().strip() == class_prompts[3]
    prior = prepare_dataset(raw, root / "prior", opts)
    # the quickstart's kind of prior: rendered scenes of the same 12 captions (3 each), not the base's own images
    rng = np.random.default_rng(7)
    rendered = write_class_images(lambda prompt, seed: render(parse_caption(prompt), rng), class_prompts,
                                  root / "rendered-images", seeds=(0, 1, 2))
    return {"root": root, "concept": concept.out, "prior": prior.out, "held_out": held_out,
            "rendered": prepare_dataset(rendered, root / "rendered", opts).out}


def _train(tiny_base, setup, name, **kw):
    from sdedge.trainer.train import train

    cfg = TrainConfig(base=str(tiny_base), data=str(setup["concept"]), out=str(setup["root"] / name), rank=8,
                      learning_rate=4e-3, batch_size=4, max_steps=60, train_text_encoder=True, seed=0, **QUIET, **kw)
    return train(cfg)


def _eps(pipe, prompts, latents, noise):
    """The UNet's noise prediction (n·len(TIMESTEPS), 4, 16, 16) on fixed noisy latents of each prompt (noised as
    training noises them: DDPM's schedule)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
        out = []
        for t in TIMESTEPS:
            tt = torch.full((len(prompts),), t)
            noisy = sched.add_noise(latents, noise, tt)
            out.append(pipe.unet(noisy, tt, hidden).sample)
    return torch.cat(out)


def _latents(pipe, prompts, seed=0):
    """VAE latents (n, 4, 16, 16) of freshly rendered scenes of the prompts, and fixed noise of that shape."""
    from sdedge.tinyworld.shapes import parse_caption, render

    rng = np.random.default_rng(seed)
    pixels = np.stack([np.asarray(render(parse_caption(p), rng)) for p in prompts]).astype(np.float32) / 127.5 - 1
    with torch.no_grad():
        z = pipe.vae.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)).latent_dist.mean  # (n, 4, 16, 16)
    z = z * pipe.vae.config.scaling_factor
    return z, torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_prior_preservation_reduces_drift(tiny_base, tiny_pipe, setup):
    from sdedge.export.lora import fuse_loras, unfuse_loras
    from sdedge.quickstart_lora import concept_prompts

    plain = _train(tiny_base, setup, "plain")
    kept = _train(tiny_base, setup, "prior", prior_data=str(setup["rendered"]), prior_weight=1.0)
    generated = _train(tiny_base, setup, "generated", prior_data=str(setup["prior"]), prior_weight=1.0)
    doc = json.loads((kept.out / "adapter.json").read_text())
    assert doc["prior"]["weight"] == 1.0 and doc["prior"]["images"] == 36 and len(doc["prior"]["sha256"]) == 64
    assert json.loads((generated.out / "adapter.json").read_text())["prior"]["images"] == 12
    assert json.loads((plain.out / "adapter.json").read_text())["prior"] is None

    held, purple = setup["held_out"], concept_prompts()[:6]
    z_held, n_held = _latents(tiny_pipe, held)
    z_purple, n_purple = _latents(tiny_pipe, purple, seed=1)
    base_held = _eps(tiny_pipe, held, z_held, n_held)
    target_purple = n_purple.repeat(len(TIMESTEPS), 1, 1, 1)
    base_purple_loss = float(((_eps(tiny_pipe, purple, z_purple, n_purple) - target_purple) ** 2).mean())
    drift, purple_loss = {}, {}
    try:
        for name, run in (("plain", plain), ("prior", kept), ("generated", generated)):
            fuse_loras(tiny_pipe, [(run.adapter, 1.0)])
            drift[name] = float(((_eps(tiny_pipe, held, z_held, n_held) - base_held) ** 2).mean())
            purple_loss[name] = float(((_eps(tiny_pipe, purple, z_purple, n_purple) - target_purple) ** 2).mean())
    finally:
        unfuse_loras(tiny_pipe)
    print(f"\ndrift on held-out base captions: {drift}; purple denoising loss: base {base_purple_loss:.4f}, "
          f"{purple_loss}")
    # both learn the new colour (its denoising loss falls below the base's) ...
    assert purple_loss["plain"] < base_purple_loss and purple_loss["prior"] < base_purple_loss
    # ... and the rendered class images hold the held-out base captions' predictions closer to the base's, closer
    # than the base's own generated images do
    assert drift["prior"] < 0.8 * drift["plain"] and drift["prior"] < drift["generated"], drift


def test_prior_resolution_mismatch_refused(tiny_base, tmp_path):
    """Rendered shapes stand in for the generated class images (the module's `setup`, 6 s of generation, is what
    the slow tests need): the refusal reads only the prepared resolution."""
    from sdedge.runtime.errors import SdedgeError
    from sdedge.tinyworld.shapes import NEW_COLOUR, write_dataset
    from sdedge.trainer.prepare import PrepareOptions, prepare_dataset
    from sdedge.trainer.train import train

    concept = prepare_dataset(write_dataset(tmp_path / "purple", 4, colours=(NEW_COLOUR,), seed=5),
                              tmp_path / "concept", PrepareOptions(resolution=64, dedup=None))
    other = prepare_dataset(write_dataset(tmp_path / "class-images", 4, seed=1), tmp_path / "prior-32",
                            PrepareOptions(resolution=32, dedup=None))
    cfg = TrainConfig(base=str(tiny_base), data=str(concept.out), out=str(tmp_path / "run"), max_steps=1,
                      prior_data=str(other.out), **QUIET)
    with pytest.raises(SdedgeError, match=r"--prior-data .*prepared at 32 px.*64 px"):
        train(cfg)
    assert not (Path(cfg.out) / "adapter.safetensors").exists()


@pytest.mark.slow
def test_prior_run_resumes_on_its_curve_and_refuses_other_prior_data(tiny_base, setup, tmp_path):
    import shutil

    from sdedge.runtime.errors import SdedgeError
    from sdedge.trainer.prepare import PrepareOptions, prepare_dataset
    from sdedge.trainer.train import train

    kw = {**QUIET, "log_steps": 1, "base": str(tiny_base), "data": str(setup["concept"]), "max_steps": 3,
          "batch_size": 2, "train_text_encoder": True, "prior_weight": 0.5, "checkpoint_steps": 2}
    prior = tmp_path / "prior"
    shutil.copytree(setup["prior"], prior)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), prior_data=str(prior), **kw))
    part = TrainConfig(out=str(tmp_path / "part"), prior_data=str(prior), **kw)
    assert train(part, stop_after=2).adapter is None
    resumed = train(TrainConfig(**{**part.__dict__, "resume": "latest", "overwrite": False}))
    assert resumed.resumed_from == 2 and resumed.losses == pytest.approx(whole.losses, rel=1e-6)
    # other class images under the same path: the checkpoint's prior SHA-256 no longer matches
    other = tmp_path / "other"
    shutil.copytree(setup["root"] / "class-images", other)
    (other / "0000.txt").write_text("a green circle on a red background\n")
    shutil.rmtree(prior)
    prepare_dataset(other, prior, PrepareOptions(resolution=64, dedup=None))
    with pytest.raises(SdedgeError, match="prior data changed"):
        train(TrainConfig(**{**part.__dict__, "resume": "latest", "overwrite": False}))
