"""SDXL bundles reduced (issue 21, must 5) and made fast: an fp16 bundle whose VAE stays fp32, a pruned SDXL UNet
(`sdedge prune` and `export --prune`), and an SDXL LCM-LoRA in latent-consistency/lcm-lora-sdxl's layout fused at
export with parity against the peft-adapted UNet and the LCM defaults of `--scheduler lcm`. All on sdxl-tiny."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import test_sdxl  # noqa: E402
from conftest import run_cli  # noqa: E402
from test_fast_path import LCM_TARGETS, lora_layers, peft_adapt, write_lora  # noqa: E402

from sdedge.export.bases import load_base  # noqa: E402
from sdedge.export.build import ExportOptions, export_bundle  # noqa: E402
from sdedge.export.lora import fuse_loras  # noqa: E402
from sdedge.export.reference import psnr, reference_images  # noqa: E402
from sdedge.runtime.manifest import Precision  # noqa: E402
from sdedge.runtime.pipeline import Pipeline  # noqa: E402

base, pipe, work = test_sdxl.base, test_sdxl.pipe, test_sdxl.work  # the sdxl-tiny base, its pipeline, per module
PROMPT = "a red circle"
SEED = 3
QUICK = dict(parity_steps=4, speed_calls=1, speed_backends=("onnxruntime",), overwrite=True)


def _latents(seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 16, 16), dtype=np.float32)  # (1, 4, 128/8, 128/8)


def _added(batch: int, g) -> dict:
    """sdxl-tiny's added conditioning: pooled embeds (B, 48) and the six time ids (B, 6) of a 128² image."""
    return {"text_embeds": torch.randn(batch, 48, generator=g),
            "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]]).repeat(batch, 1)}


# -- fp16 ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # one fp16 export with its gates: ~40 s
def test_fp16_bundle_keeps_the_sdxl_vae_fp32(base, work):
    import onnx

    m = export_bundle(base, work / "fp16", ExportOptions(precision=Precision.FP16, **QUICK))
    assert m.pipeline == "sdxl" and m.precision is Precision.FP16
    kinds = {}
    for name in ("unet", "text_encoder_2", "vae_decoder", "vae_encoder"):
        model = onnx.load(str(work / "fp16" / m.components[name].file), load_external_data=False)
        kinds[name] = {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    assert "FLOAT16" in kinds["unet"] and "FLOAT16" in kinds["text_encoder_2"], kinds
    assert "FLOAT16" not in kinds["vae_decoder"] | kinds["vae_encoder"], kinds  # SDXL's VAE overflows in fp16
    assert m.parity.precision.guided_cosine >= 0.99, m.parity.precision
    rt = Pipeline.load(work / "fp16", verify="off", backend="onnxruntime")
    try:
        image = rt.generate(PROMPT, steps=3, latents=_latents(), watermark=False).images
    finally:
        rt.close()
    ref = reference_images(load_base(base), PROMPT, "", latents=_latents(), steps=3, guidance=5.0, scheduler="euler",
                           scheduler_config=m.scheduler)
    assert np.isfinite(image).all() and psnr(image, ref) >= 30.0


# -- pruning -------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # sdedge prune (~15 s) and one pruned export (~40 s)
def test_pruned_sdxl_base_exports_with_its_parity(base, work):
    out = work / "pruned"
    r = run_cli("prune", str(base), "--out", str(out), "--ratio", "0.3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "UNet parameters 2.0 M -> 1.5 M" in r.stdout + r.stderr
    m = export_bundle(out, work / "pruned-bundle", ExportOptions(**QUICK))
    assert m.pipeline == "sdxl" and m.provenance.prune.params_after < m.provenance.prune.params_before
    assert [t.name for t in m.components["unet"].inputs][-2:] == ["text_embeds", "time_ids"]
    assert m.parity.image.psnr_db >= 40.0  # the pruned UNet's ONNX against its own PyTorch model
    assert m.parity.precision is not None and 0.0 < m.parity.precision.guided_cosine < 1.0  # vs the unpruned parent
    rt = Pipeline.load(work / "pruned-bundle", verify="off", backend="onnxruntime")
    try:
        assert np.isfinite(rt.generate(PROMPT, steps=2, watermark=False).images).all()
    finally:
        rt.close()


@pytest.mark.slow  # up to 10 s; fast: tests/test_prune.py::test_prune_taylor_criterion_runs
def test_prune_taylor_criterion_on_sdxl(pipe):
    """Taylor importance needs gradients of the UNet on SDXL's added conditioning (text_embeds, time_ids)."""
    import copy

    from sdedge.export.prune import prune_unet

    clone = copy.copy(pipe)
    clone.unet = copy.deepcopy(pipe.unet)
    report = prune_unet(clone, 0.25, "taylor", latent_size=16)
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = clone.unet(torch.randn(1, 4, 16, 16, generator=g), torch.tensor([10.0]),
                         torch.randn(1, 77, 80, generator=g), added_cond_kwargs=_added(1, g)).sample
    assert out.shape == (1, 4, 16, 16)


# -- LCM-LoRA ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lcm(pipe, work):
    """A seeded SDXL LCM-LoRA in lcm-lora-sdxl's layout: kohya keys on diffusers' module names
    (`lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight`, `.alpha`), UNet only, the 14 module kinds."""
    layers = lora_layers(pipe.unet, LCM_TARGETS, rank=4, seed=21)
    return layers, write_lora(work / "lcm-lora-sdxl.safetensors", layers, 4, 8, "kohya")


def _peft_unet_output(base, layers):
    ref = load_base(base)
    peft_adapt(ref, "lcm", layers, 4, 8, 1.0)
    return ref


def test_lcm_lora_layout_covers_sdxl_module_kinds(lcm):
    layers, _ = lcm
    kinds = {next(t for t in LCM_TARGETS if p.endswith("." + t)) for p in layers}
    assert kinds == set(LCM_TARGETS)


def test_sdxl_lcm_lora_fuse_equals_peft(base, lcm):
    layers, path = lcm
    ref = _peft_unet_output(base, layers)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999.0, 259.0]), torch.randn(2, 77, 80, generator=g)
    added = _added(2, g)
    fused = load_base(base)
    report = fuse_loras(fused, [(path, 1.0)])
    assert report.complete and report.modules == {"unet": len(layers), "text_encoder": 0, "text_encoder_2": 0}
    with torch.inference_mode():
        truth = ref.unet(x, t, ctx, added_cond_kwargs=added).sample
        err = float((fused.unet(x, t, ctx, added_cond_kwargs=added).sample - truth).abs().max())
        plain = float((load_base(base).unet(x, t, ctx, added_cond_kwargs=added).sample - truth).abs().max())
    print(f"LCM-LoRA fused vs peft-adapted UNet: max abs {err:.2e} (the base without it: {plain:.3f})")
    assert err <= 1e-4 and plain > 100 * err, (err, plain)


@pytest.mark.slow  # one sdxl-tiny export with the LCM-LoRA: ~40 s
def test_sdxl_lcm_bundle_defaults_and_parity_with_peft(base, lcm, work):
    layers, path = lcm
    out = work / "lcm-bundle"
    r = run_cli("export", "--base", str(base), "--out", str(out), "--lora", f"{path}:1.0", "--scheduler", "lcm",
                "--no-vae-encoder")
    assert r.returncode == 0, r.stderr[-3000:]
    rt = Pipeline.load(out, verify="off", backend="onnxruntime")
    m = rt.manifest
    assert m.pipeline == "sdxl"
    assert (m.defaults.scheduler, m.defaults.steps, m.defaults.guidance) == ("lcm", 4, 1.0)
    assert (m.parity.image.scheduler, m.parity.image.steps) == ("lcm", 4) and m.parity.image.psnr_db >= 40.0
    try:
        result = rt.generate(PROMPT, latents=_latents(), seed=SEED, watermark=False)  # the bundle's defaults
    finally:
        rt.close()
    assert (result.settings["steps"], result.settings["scheduler"], result.settings["guidance"]) == (4, "lcm", 1.0)
    kw = dict(latents=_latents(), steps=4, guidance=1.0, scheduler="lcm", scheduler_config=m.scheduler, seed=SEED)
    truth = reference_images(_peft_unet_output(base, layers), PROMPT, "", **kw)
    print(f"LCM bundle vs peft-adapted diffusers: {psnr(result.images, truth):.1f} dB (export's own parity "
          f"{m.parity.image.psnr_db:.1f} dB)")
    assert psnr(result.images, truth) >= 40.0
    assert psnr(result.images, reference_images(load_base(base), PROMPT, "", **kw)) < 30.0, "the LoRA changes it"
