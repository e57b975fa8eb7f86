"""Image-to-image and inpainting: the runtime against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline on the same weights and the same noise (one torch generator feeds both), for every
scheduler; the schedulers' add_noise and strength slicing; the inpainting base and its export; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import bundle_without, run_cli

from sdedge.export.build import parity_picture
from sdedge.export.reference import TorchNoise, diffusers_scheduler, psnr, reference_init_images
from sdedge.runtime.errors import BadInput
from sdedge.runtime.init_image import strength_timesteps
from sdedge.runtime.pipeline import Pipeline
from sdedge.runtime.schedulers import SchedulerConfig, make_scheduler

SCHEDULERS = ["ddim", "pndm", "euler", "euler_a", "dpm++2m", "dpm++2m-karras", "lcm"]
PROMPT, NEGATIVE = "a red circle", "blurry"
IMAGE, MASK = parity_picture(64)


def _loaded(bundle):
    p = Pipeline.load(bundle, device="cpu", backend="onnxruntime")  # fp32 parity: auto may pick bf16
    yield p
    p.close()


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    yield from _loaded(tiny_bundle)


@pytest.fixture(scope="module")
def inpaint_base(tmp_path_factory):
    from sdedge.export.bases import write_builtin_base

    return write_builtin_base("tiny-inpaint", tmp_path_factory.mktemp("bases") / "tiny-inpaint", seed=0)


@pytest.fixture(scope="module")
def inpaint_bundle(inpaint_base, tmp_path_factory):
    from sdedge.export.build import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-inpaint"
    export_bundle(inpaint_base, out, ExportOptions(overwrite=True))
    return out


@pytest.fixture(scope="module")
def inpaint_pipe(inpaint_bundle):
    yield from _loaded(inpaint_bundle)


@pytest.fixture(scope="module")
def inpaint_torch(inpaint_base):
    from sdedge.export.bases import load_base

    return load_base(inpaint_base)


def parity(runtime, torch_pipe, *, mask, strength, scheduler, steps=6, guidance=7.5, seed=3) -> float:
    kw = dict(image=IMAGE, mask=mask, strength=strength, steps=steps, guidance=guidance, scheduler=scheduler)
    ours = runtime.generate(PROMPT, NEGATIVE, rng=TorchNoise(seed), watermark=False, **kw).images
    ref = reference_init_images(torch_pipe, PROMPT, NEGATIVE, scheduler_config=runtime.manifest.scheduler, seed=seed,
                                **kw)
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    return psnr(ours, ref)


# -- the schedulers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_strength_timesteps_and_add_noise_match_diffusers(name, strength):
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from sdedge.export.bases import SD15_SCHEDULER

    steps = 10
    ours = make_scheduler(name, SchedulerConfig.from_dict(SD15_SCHEDULER))
    theirs = diffusers_scheduler(name, SD15_SCHEDULER)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    ts = strength_timesteps(ours, steps, strength)
    holder = type("P", (), {"scheduler": theirs})()  # diffusers' get_timesteps reads only self.scheduler
    their_ts, n = StableDiffusionImg2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")
    np.testing.assert_array_equal(ts, their_ts.numpy().astype(ts.dtype))
    assert n == len(ts) - (1 if name == "pndm" else 0)  # PNDM's warm-up repeats a timestep
    x0, z = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    t0 = their_ts[:1].repeat(2)
    expected = theirs.add_noise(x0, z, t0).numpy()
    np.testing.assert_allclose(ours.add_noise(x0.numpy(), z.numpy(), ts[0]), expected, rtol=1e-6, atol=1e-6)


# -- image-to-image -------------------------------------------------------------------------------------------
# slow: 4-11 s each; their steps are in the fast lane through tests/test_runtime.py::test_image_parity_with_diffusers
@pytest.mark.parametrize("scheduler", [pytest.param(s, marks=pytest.mark.slow) if s in (
    "euler", "euler_a", "dpm++2m", "dpm++2m-karras") else s for s in SCHEDULERS])
def test_img2img_parity_with_diffusers(pipe, tiny_pipe, scheduler):
    assert parity(pipe, tiny_pipe, mask=None, strength=0.6, scheduler=scheduler) >= 40.0


def test_img2img_is_seeded_and_follows_the_image(pipe):
    kw = dict(steps=6, guidance=3.0, seed=4, watermark=False)
    a = pipe.generate(PROMPT, image=IMAGE, strength=0.5, **kw)
    assert a.images.shape == (1, 64, 64, 3) and a.settings["strength"] == 0.5 and "vae_encoder" in a.timings
    np.testing.assert_array_equal(a.images, pipe.generate(PROMPT, image=IMAGE, strength=0.5, **kw).images)
    other = pipe.generate(PROMPT, image=IMAGE[::-1].copy(), strength=0.5, **kw).images
    assert not np.array_equal(a.images, other)
    # a low strength keeps more of the picture than a high one
    low = pipe.generate(PROMPT, image=IMAGE, strength=0.2, **kw).images[0]
    high = pipe.generate(PROMPT, image=IMAGE, strength=1.0, **kw).images[0]
    picture = IMAGE.astype(np.float32) / 255
    assert psnr(low, picture) > psnr(high, picture)


def test_pil_image_and_batches(pipe):
    from PIL import Image

    kw = dict(steps=4, seed=2, strength=0.5, watermark=False)
    arr = pipe.generate(PROMPT, image=IMAGE, **kw).images
    pil = pipe.generate(PROMPT, image=Image.fromarray(IMAGE).convert("RGBA"), **kw).images  # alpha dropped
    np.testing.assert_array_equal(arr, pil)
    two = pipe.generate(PROMPT, image=IMAGE, num_images=2, **kw).images
    assert two.shape == (2, 64, 64, 3) and not np.array_equal(two[0], two[1])


def test_steps_are_reported_and_cancel_works(pipe):
    import threading

    seen = []
    pipe.generate(PROMPT, image=IMAGE, strength=0.5, steps=8, seed=1, on_step=lambda i, n: seen.append((i, n)),
                  watermark=False)
    assert seen == [(i, 4) for i in range(1, 5)]  # int(8 × 0.5) steps run
    cancel = threading.Event()
    cancel.set()
    from sdedge.runtime.pipeline import Cancelled

    with pytest.raises(Cancelled):
        pipe.generate(PROMPT, image=IMAGE, strength=0.5, steps=8, cancel=cancel)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image=IMAGE, width=128), "image is 64×64 pixels but width=128"),
    (dict(image=IMAGE[:, :60]), "width=60: must be a multiple"),
    (dict(image=IMAGE, strength=0.0), r"strength=0.0: must be a number in \(0, 1\]"),
    (dict(image=IMAGE, strength=1.5), r"strength=1.5"),
    (dict(image=IMAGE, strength=0.1, steps=5), "leaves no denoising step"),
    (dict(strength=0.5), "strength= is for image-to-image"),
    (dict(mask=MASK), "mask= needs image="),
    (dict(image=IMAGE.astype(np.float32)), r"\(H, W, 3\) uint8 array"),
    (dict(image="picture.png"), "PIL image or an"),
    (dict(image=IMAGE, mask=MASK[:32]), "mask is 64×32 pixels, the image 64×64"),
    (dict(image=IMAGE, mask=np.stack([MASK] * 3, -1)), r"\(H, W\) uint8 array"),
    (dict(image=IMAGE, latents=np.zeros((1, 4, 16, 16), np.float32)), "latents= replaces text-to-image"),
])
def test_bad_requests_are_clear(pipe, kwargs, message):
    with pytest.raises(BadInput, match=message):
        pipe.generate(PROMPT, **{"steps": 4, **kwargs})


def test_bundle_without_vae_encoder_says_so(tiny_bundle, tmp_path):
    bundle = bundle_without(tiny_bundle, tmp_path / "no-encoder", "vae_encoder")
    p = Pipeline.load(bundle, device="cpu", verify="off")
    assert not p.supports_img2img
    with pytest.raises(BadInput, match="no vae_encoder component"):
        p.generate(PROMPT, image=IMAGE, steps=2)
    assert p.generate(PROMPT, steps=2, seed=0).images.shape == (1, 64, 64, 3)  # text-to-image still works


# -- inpainting -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_inpaint_parity_with_diffusers(inpaint_pipe, inpaint_torch, scheduler):
    assert parity(inpaint_pipe, inpaint_torch, mask=MASK, strength=1.0, scheduler=scheduler) >= 40.0


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpm++2m"])
def test_inpaint_parity_below_full_strength(inpaint_pipe, inpaint_torch, scheduler):
    assert parity(inpaint_pipe, inpaint_torch, mask=MASK, strength=0.7, scheduler=scheduler) >= 40.0


@pytest.mark.parametrize("scheduler, strength", [pytest.param("ddim", 1.0, marks=pytest.mark.slow),  # 7-12 s
                                                 pytest.param("euler", 0.7, marks=pytest.mark.slow), ("lcm", 1.0)])
def test_four_channel_unet_inpaints_by_blending(pipe, tiny_pipe, scheduler, strength):
    """diffusers' inpainting with an ordinary UNet: the image outside the mask is put back after every step."""
    assert parity(pipe, tiny_pipe, mask=MASK, strength=strength, scheduler=scheduler) >= 40.0


@pytest.mark.slow  # exports the inpainting bundle (module fixture): 5-16 s
def test_inpaint_bundle_is_told_apart(pipe, inpaint_pipe, inpaint_bundle):
    assert pipe.supports_img2img and not pipe.is_inpaint and pipe.unet_in_channels == 4
    assert inpaint_pipe.supports_img2img and inpaint_pipe.is_inpaint and inpaint_pipe.unet_in_channels == 9
    doc = json.loads((inpaint_bundle / "sdedge.json").read_text())
    unet_in = {t["name"]: t["shape"] for t in doc["components"]["unet"]["inputs"]}
    assert unet_in["sample"][1] == 9 and doc["latent"]["channels"] == 4
    assert doc["parity"]["image"]["psnr_db"] >= 40.0  # export measured its inpainting against diffusers
    with pytest.raises(BadInput, match="inpainting bundle.*give image= and mask="):
        inpaint_pipe.generate(PROMPT, steps=2)
    with pytest.raises(BadInput, match="give mask= with the image"):
        inpaint_pipe.generate(PROMPT, image=IMAGE, steps=2)


@pytest.mark.slow  # the inpainting bundle's export; fast: test_four_channel_unet_inpaints_by_blending[lcm-1.0]
def test_inpaint_keeps_what_the_mask_leaves(inpaint_pipe):
    """Only the masked part is painted anew: outside it the output follows the picture (up to the VAE's
    reconstruction), and a different mask changes the output."""
    kw = dict(image=IMAGE, steps=4, seed=0, watermark=False)
    a = inpaint_pipe.generate(PROMPT, mask=MASK, **kw).images
    b = inpaint_pipe.generate(PROMPT, mask=255 - MASK, **kw).images
    assert a.shape == (1, 64, 64, 3) and not np.array_equal(a, b)
    assert inpaint_pipe.generate(PROMPT, mask=MASK, **kw).settings["strength"] == 1.0


@pytest.mark.slow
def test_inpainting_single_file_checkpoint_loads(inpaint_base, inpaint_torch, tmp_path):
    """A user's SD1.5-inpainting checkpoint as one original-layout file: its 9-channel conv_in loads."""
    import torch

    from sdedge.export.bases import load_base
    from sdedge.export.single_file import save_single_file

    path = save_single_file(inpaint_torch, tmp_path / "inpaint.safetensors")
    loaded = load_base(path, config=inpaint_base)
    assert loaded.unet.config.in_channels == 9
    for name, p in inpaint_torch.unet.state_dict().items():
        assert torch.equal(p, loaded.unet.state_dict()[name]), name


# -- the command line ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_generate_with_image_and_mask(tiny_bundle, inpaint_bundle, tmp_path):
    from PIL import Image

    Image.fromarray(IMAGE).save(tmp_path / "in.png")
    Image.fromarray(IMAGE).save(tmp_path / "in.webp", lossless=True)
    Image.fromarray(MASK).save(tmp_path / "mask.png")
    Image.fromarray(IMAGE).save(tmp_path / "in.gif")
    r = run_cli("generate", str(tiny_bundle), PROMPT, "--image", str(tmp_path / "in.webp"), "--strength", "0.5",
                "--steps", "4", "--out", str(tmp_path / "out.png"))
    assert r.returncode == 0, r.stderr
    assert "strength 0.5" in r.stderr and Image.open(tmp_path / "out.png").size == (64, 64)
    r = run_cli("generate", str(inpaint_bundle), PROMPT, "--image", str(tmp_path / "in.png"), "--mask",
                str(tmp_path / "mask.png"), "--steps", "3", "--out", str(tmp_path / "inpainted.png"))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "inpainted.png").size == (64, 64)
    r = run_cli("generate", str(tiny_bundle), PROMPT, "--image", str(tmp_path / "in.gif"), "--steps", "2")
    assert r.returncode == 2 and "not a readable PNG, JPEG or WebP image" in r.stderr
    r = run_cli("generate", str(inpaint_bundle), PROMPT, "--steps", "2")
    assert r.returncode == 2 and "give image= and mask=" in r.stderr
