"""SDXL end to end on the sdxl-tiny base: the base writer and loader (folder and single file, with their refusals),
the export (two text encoders, the UNet's text_embeds / time_ids, manifest `pipeline: sdxl`) and the runtime's
SDXL conditioning, each against diffusers' StableDiffusionXLPipeline on the same weights and latents."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sdedge.export.bases import builtin_parameter_counts, load_base, write_builtin_base  # noqa: E402
from sdedge.export.reference import TorchNoise, diffusers_scheduler, psnr, reference_images  # noqa: E402
from sdedge.export.sdxl_base import save_sdxl_single_file, sdxl_ldm_state_dict  # noqa: E402
from sdedge.runtime.errors import BadInput, BundleError, SdedgeError  # noqa: E402
from sdedge.runtime.manifest import parse_manifest  # noqa: E402
from sdedge.runtime.pipeline import Pipeline  # noqa: E402
from sdedge.runtime.sdxl import MicroConditioning  # noqa: E402

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PROMPTS = ["a red circle", "a blue square"]
NEGATIVES = ["green", "yellow"]
DETERMINISTIC = ("ddim", "pndm", "euler", "dpm++2m", "dpm++2m-karras")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("sdxl")


@pytest.fixture(scope="module")
def base(work):
    return write_builtin_base("sdxl-tiny", work / "base", seed=0)


@pytest.fixture(scope="module")
def pipe(base):
    return load_base(base)


@pytest.fixture(scope="module")
def single_file(pipe, work):
    return save_sdxl_single_file(pipe, work / "sdxl-tiny.safetensors")


@pytest.fixture(scope="module")
def bundle(base, work):
    from sdedge.export.build import ExportOptions, export_bundle

    out = work / "bundle"
    export_bundle(base, out, ExportOptions(overwrite=True, parity_steps=4))
    return out


@pytest.fixture(scope="module")
def runtime(bundle):
    rt = Pipeline.load(bundle, verify="off", backend="onnxruntime")  # fp32 parity: auto may pick bf16
    yield rt
    rt.close()


def _latents(batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, 16, 16), dtype=np.float32)  # (B, 4, h, w)


def _equal_weights(a, b) -> None:
    for part in PARTS:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        bad = [k for k in sa if k not in sb or not torch.equal(sa[k], sb[k])]
        assert not bad, f"{part}: {bad[:3]}"


# -- bases ---------------------------------------------------------------------------------------------------------
def test_sdxl_arch_is_sdxl_size_on_meta():
    counts = builtin_parameter_counts("sdxl-arch")
    assert counts["unet"] == 2_567_463_684  # SDXL 1.0 base's UNet
    assert counts["text_encoder"] == 123_060_480  # CLIP ViT-L/14's text tower
    assert counts["text_encoder_2"] == 694_659_840  # OpenCLIP bigG's, with its projection


def test_sdxl_tiny_folder_loads_as_sdxl(base, pipe):
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == (pipe.text_encoder.config.hidden_size
                                                    + pipe.text_encoder_2.config.hidden_size)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert all(p.dtype == torch.float32 for part in PARTS for p in getattr(pipe, part).parameters())
    assert getattr(pipe, "watermark", None) is None


@pytest.mark.slow  # 4-6 s
def test_sdxl_seeded_writes_are_identical(base, work):
    from sdedge import cli

    again = work / "again"
    assert cli.main(["base", "sdxl-tiny", "--out", str(again)]) == 0
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        assert (again / part).read_bytes() == (base / part).read_bytes()
    other = write_builtin_base("sdxl-tiny", work / "other", seed=1)
    assert (other / "unet/diffusion_pytorch_model.safetensors").read_bytes() != \
        (base / "unet/diffusion_pytorch_model.safetensors").read_bytes()


def test_single_file_round_trip(pipe, base, single_file):
    from safetensors import safe_open

    with safe_open(str(single_file), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # SDXL's added conditioning
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys  # OpenCLIP layout
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    _equal_weights(pipe, load_base(single_file, config=base))


def test_single_file_refusals(pipe, base, single_file, work):
    from safetensors.torch import save_file

    with pytest.raises(SdedgeError, match="--config"):
        load_base(single_file)
    ckpt = work / "sdxl.ckpt"
    shutil.copy(single_file, ckpt)
    with pytest.raises(SdedgeError, match="pickle"):
        load_base(ckpt, config=base)
    truncated = work / "truncated.safetensors"
    truncated.write_bytes(single_file.read_bytes()[:-1000])
    with pytest.raises(SdedgeError, match="truncated"):
        load_base(truncated, config=base)
    state = sdxl_ldm_state_dict(pipe)
    key = "conditioner.embedders.1.model.text_projection"
    state[key] = torch.zeros(3, 3)
    wrong = work / "wrong.safetensors"
    save_file(state, str(wrong))
    with pytest.raises(SdedgeError, match=r"text_projection.*\[3, 3\].*\[48, 48\]"):
        load_base(wrong, config=base)


def test_other_architectures_refused(base, single_file, work):
    from sdedge.export.bases import build_builtin_pipeline
    from sdedge.export.single_file import save_single_file

    sd15_dir = write_builtin_base("tiny-random", work / "sd15", seed=0)
    sd15_file = save_single_file(build_builtin_pipeline("tiny-random"), work / "sd15.safetensors")
    with pytest.raises(SdedgeError, match=r"sd15\.safetensors is an SD 1\.x checkpoint .* is an SDXL base folder"):
        load_base(sd15_file, config=base)
    with pytest.raises(SdedgeError, match=r"is an SDXL base checkpoint \(conditioner\.embedders\.1.* SD 1\.x folder"):
        load_base(single_file, config=sd15_dir)
    refiner = work / "refiner"
    shutil.copytree(base, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None], tokenizer=[None, None],
                 requires_aesthetics_score=True)
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SdedgeError, match="refiner"):
        load_base(refiner)


# -- export --------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # the module's bundle: one sdxl-tiny export, ~25 s
def test_export_writes_an_sdxl_bundle(bundle):
    m = Pipeline.load(bundle, verify="off", memory="low").manifest
    assert m.pipeline == "sdxl"
    assert set(m.components) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert [t.name for t in m.components["unet"].inputs] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert [t.shape for t in m.components["text_encoder_2"].outputs] == [("batch", 77, 48), ("batch", 48)]
    assert m.components["unet"].inputs[2].shape == ("batch", 77, 80)
    assert m.tokenizer_2 is not None and m.sdxl.force_zeros_for_empty_prompt
    assert m.defaults.scheduler == "euler" and m.defaults.guidance == 5.0  # StableDiffusionXLPipeline's defaults
    assert (m.shapes.default_width, m.shapes.default_height) == (128, 128)  # sdxl-tiny's native size
    assert all(p.max_abs_err <= 1e-3 for p in m.parity.components.values())
    assert m.parity.image.psnr_db >= 40.0


@pytest.mark.slow  # the module's bundle: one sdxl-tiny export, ~25 s
def test_manifest_pipeline_field(bundle):
    data = json.loads((bundle / "sdedge.json").read_text())
    older = {k: v for k, v in data.items() if k not in ("pipeline", "tokenizer_2", "sdxl")}
    older["components"] = {k: v for k, v in data["components"].items() if k != "text_encoder_2"}
    assert parse_manifest(older).pipeline == "sd15"  # written before SDXL
    with pytest.raises(BundleError, match="unknown pipeline 'sd3'"):
        parse_manifest({**data, "pipeline": "sd3"})
    with pytest.raises(BundleError, match="sdxl bundle has no 'text_encoder_2'"):
        parse_manifest({**data, "components": older["components"]})


# -- runtime -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("scheduler", DETERMINISTIC)
def test_every_scheduler_matches_diffusers_with_negatives_and_batch(runtime, pipe, scheduler):
    lat = _latents(2)
    ours = runtime.generate(PROMPTS, NEGATIVES, steps=3, guidance=5.0, scheduler=scheduler, latents=lat,
                            watermark=False).images
    ref = reference_images(pipe, PROMPTS, NEGATIVES, latents=lat, steps=3, guidance=5.0, scheduler=scheduler,
                           scheduler_config=runtime.manifest.scheduler)
    assert psnr(ours, ref) >= 40.0


@pytest.mark.slow  # the module's bundle: one sdxl-tiny export, ~25 s
def test_stochastic_schedulers_match_diffusers(runtime, pipe):
    lat = _latents(1)
    ours = runtime.generate(PROMPTS[0], steps=3, guidance=1.0, scheduler="lcm", latents=lat, seed=5,
                            watermark=False).images
    ref = reference_images(pipe, PROMPTS[0], "", latents=lat, steps=3, guidance=1.0, scheduler="lcm",
                           scheduler_config=runtime.manifest.scheduler, seed=5)
    assert psnr(ours, ref) >= 40.0
    ours = runtime.generate(PROMPTS[0], steps=3, scheduler="euler_a", rng=TorchNoise(3), watermark=False).images
    pipe.scheduler = diffusers_scheduler("euler_a", runtime.manifest.scheduler)
    with torch.inference_mode():
        ref = pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
                   height=128, width=128, output_type="np").images
    assert psnr(ours, ref) >= 40.0


@pytest.mark.slow  # the module's bundle: one sdxl-tiny export, ~25 s
def test_defaults_empty_negative_and_micro_conditioning(runtime, pipe):
    """No negative prompt: zero embeddings (force_zeros_for_empty_prompt); the size and crop conditioning as
    diffusers builds add_time_ids; both change the image."""
    lat = _latents(1)
    plain = runtime.generate(PROMPTS[0], steps=3, latents=lat, watermark=False)
    assert plain.settings["scheduler"] == "euler" and plain.images.shape == (1, 128, 128, 3)
    ref = reference_images(pipe, PROMPTS[0], "", latents=lat, steps=3, guidance=5.0, scheduler="euler",
                           scheduler_config=runtime.manifest.scheduler)
    assert psnr(plain.images, ref) >= 40.0
    micro = dict(original_size=(512, 512), crops_coords_top_left=(8, 16), target_size=(128, 96),
                 negative_original_size=(64, 64), negative_target_size=(128, 128))
    ours = runtime.generate(PROMPTS[0], steps=3, latents=lat, watermark=False,
                            micro_conditioning=MicroConditioning(**micro)).images
    pipe.scheduler = diffusers_scheduler("euler", runtime.manifest.scheduler)
    with torch.inference_mode():
        ref = pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=5.0, latents=torch.from_numpy(lat), height=128,
                   width=128, output_type="np", **micro).images
    assert psnr(ours, ref) >= 40.0
    assert psnr(ours, plain.images) < 40.0


@pytest.mark.slow  # the module's bundle: one sdxl-tiny export, ~25 s
def test_low_memory_gives_the_same_image(bundle, runtime):
    lat = _latents(2)
    kw = dict(steps=2, guidance=5.0, latents=lat, watermark=False)
    low = Pipeline.load(bundle, verify="off", memory="low", backend="onnxruntime")
    assert not any(e.loaded for e in low.engines.values())
    a = low.generate(PROMPTS, NEGATIVES, **kw).images
    assert np.array_equal(a, runtime.generate(PROMPTS, NEGATIVES, **kw).images)
    assert not any(e.loaded for e in low.engines.values())


@pytest.mark.slow  # the module's bundle: one sdxl-tiny export, ~25 s
def test_bad_requests_named(runtime, bundle):
    with pytest.raises(BadInput, match="width=120: must be a multiple of 16"):
        runtime.generate("x", width=120, steps=1)
    with pytest.raises(BadInput, match=r"height=512: outside the range .* \(64–256\)"):
        runtime.generate("x", height=512, steps=1)
    with pytest.raises(BadInput, match="original_size=.*two integers"):
        MicroConditioning(original_size=(512,))
    from conftest import run_cli

    out = run_cli("generate", str(bundle), "x", "--width", "136", "--verify", "off", "--steps", "1")
    assert out.returncode == 2 and "width=136" in out.stderr and "multiple of 16" in out.stderr
    out = run_cli("generate", str(bundle), "x", "--original-size", "512,512", "--crops-top-left", "0,8", "--verify",
                  "off", "--steps", "1", "--out", str(bundle.parent / "micro.png"))
    assert out.returncode == 0, out.stderr


# -- LoRA ----------------------------------------------------------------------------------------------------------
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _lora_layers(pipe, rank: int = 4, seed: int = 1) -> dict:
    """{(component, module path): (down, up)}: a seeded LoRA on the attention projections of all three models."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for comp in ("unet", *TEXT_ENCODERS):
        for name, mod in getattr(pipe, comp).named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith(LORA_TARGETS):
                out[(comp, name)] = (torch.randn(rank, mod.in_features, generator=g) * 0.15,
                                     torch.randn(mod.out_features, rank, generator=g) * 0.15)
    return out


def _hub(comp: str, path: str) -> str:
    return path if comp == "unet" or path.startswith("text_model.") else "text_model." + path


def _write_lora(path, layers, rank, alpha, kohya: bool, unet_config=None):
    from safetensors.torch import save_file

    from sdedge.export.single_file import unet_key_to_ldm

    sd, prefix = {}, {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    for (comp, p), (down, up) in layers.items():
        if kohya:  # kohya's SDXL names: LDM names for the UNet, lora_te1_/lora_te2_ for the text encoders
            name = unet_key_to_ldm(p + ".weight", unet_config).removesuffix(".weight") if comp == "unet" else \
                _hub(comp, p)
            key = f"{prefix[comp]}_{name.replace('.', '_')}"
            sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                       f"{key}.alpha": torch.tensor(float(alpha))})
        else:
            sd.update({f"{comp}.{_hub(comp, p)}.lora_A.weight": down, f"{comp}.{_hub(comp, p)}.lora_B.weight": up})
    meta = {f"{c}.{k}": v for c in ("unet", *TEXT_ENCODERS) for k, v in (("r", rank), ("lora_alpha", alpha))}
    save_file(sd, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def _peft_adapted(model, layers, comp, rank, alpha):
    """The truth: a copy of `model` with the LoRA injected by peft, unmerged."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS)),
                                    copy.deepcopy(model))
    with torch.no_grad():
        for (c, p), (down, up) in layers.items():
            if c == comp:
                mod = model.get_submodule(p)
                mod.lora_A["default"].weight.copy_(down)
                mod.lora_B["default"].weight.copy_(up)
    return model.eval()


def _outputs(unet, te1, te2, g_seed: int = 0):
    g = torch.Generator().manual_seed(g_seed)
    ids = torch.randint(0, 300, (2, 77), generator=g)
    sample, hidden = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 80, generator=g)
    cond = {"text_embeds": torch.randn(2, 48, generator=g), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)}
    with torch.inference_mode():
        return (unet(sample, torch.tensor([500.0, 20.0]), hidden, added_cond_kwargs=cond).sample,
                te1(ids, output_hidden_states=True).hidden_states[-2], te2(ids).text_embeds)


@pytest.mark.slow  # three adapted models and two fuses: ~10 s
def test_sdxl_loras_fuse_to_the_peft_adapted_model(base, pipe, work):
    from sdedge.export.lora import fuse_loras, unfuse_loras

    rank, alpha = 4, 8
    layers = _lora_layers(pipe, rank)
    truth = _outputs(*(_peft_adapted(getattr(pipe, c), layers, c, rank, alpha) for c in ("unet", *TEXT_ENCODERS)))
    files = {"peft": _write_lora(work / "peft.safetensors", layers, rank, alpha, kohya=False),
             "kohya": _write_lora(work / "kohya.safetensors", layers, rank, alpha, kohya=True,
                                  unet_config=pipe.unet.config)}
    fresh = load_base(base)
    for fmt, path in files.items():
        report = fuse_loras(fresh, [(path, 1.0)])
        assert report.complete and report.modules == {
            c: sum(1 for k in layers if k[0] == c) for c in ("unet", *TEXT_ENCODERS)}, fmt
        for got, want in zip(_outputs(fresh.unet, fresh.text_encoder, fresh.text_encoder_2), truth):
            assert float((got - want).abs().max()) <= 1e-4, fmt
        unfuse_loras(fresh)
    _equal_weights(fresh, pipe)


@pytest.mark.slow
def test_loras_of_the_other_architecture_refused(pipe, work):
    """An SDXL LoRA on an SD 1.5 pipeline and an SD 1.5 LoRA on an SDXL one: errors naming key and reason."""
    from sdedge.export.bases import build_builtin_pipeline
    from sdedge.export.lora import LoraError, fuse_loras

    sdxl_lora = _write_lora(work / "xl.safetensors", _lora_layers(pipe), 4, 4, kohya=True,
                            unet_config=pipe.unet.config)
    sd15 = build_builtin_pipeline("tiny-random")
    with pytest.raises(LoraError, match=r"xl\.safetensors: key 'lora_te\d_.*SDXL|xl\.safetensors.*an SDXL LoRA"):
        fuse_loras(sd15, [(sdxl_lora, 1.0)])
    g = torch.Generator().manual_seed(0)
    sd15_layers = {("unet", n): (torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g))
                   for n, m in sd15.unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("to_q")}
    sd15_lora = _write_lora(work / "sd15.safetensors", sd15_layers, 2, 2, kohya=False)
    with pytest.raises(LoraError, match=r"sd15\.safetensors: key 'unet\..*SD 1\.x LoRA on an SDXL base"):
        fuse_loras(pipe, [(sd15_lora, 1.0)])


# -- precision and signing -----------------------------------------------------------------------------------------
@pytest.mark.slow  # a bf16 export with its gates: ~50 s
def test_bf16_sdxl_bundle_gated_against_fp32(base, work):
    from sdedge.export.build import ExportOptions, export_bundle
    from sdedge.runtime.manifest import Precision

    m = export_bundle(base, work / "bf16", ExportOptions(precision=Precision.BF16, parity_steps=4, speed_calls=1,
                                                         speed_backends=("onnxruntime",)))
    assert m.pipeline == "sdxl" and m.precision is Precision.BF16
    assert m.parity.precision.guided_cosine >= 0.99 and m.parity.precision.image_psnr_db >= 35.0
    rt = Pipeline.load(work / "bf16", verify="off", backend="onnxruntime")
    assert np.isfinite(rt.generate(PROMPTS[0], steps=2, watermark=False).images).all()


@pytest.mark.slow
def test_signed_sdxl_bundle_verified_before_load(bundle, work):
    from sdedge.export.signing import keygen, sign

    keys = keygen(work / "keys")
    signed = work / "signed"
    shutil.copytree(bundle, signed)
    sign(signed, key=keys.private)
    rt = Pipeline.load(signed, verify="required", public_key=keys.public, memory="low")
    assert rt.signer is not None and rt.manifest.pipeline == "sdxl"
    tok2 = signed / "tokenizer_2" / "tokenizer_config.json"
    tok2.write_text(tok2.read_text().replace('"!"', '"<|endoftext|>"'))  # tampered: the second tokenizer's pad
    with pytest.raises(SdedgeError, match="tokenizer_2/tokenizer_config.json"):
        Pipeline.load(signed, verify="required", public_key=keys.public)


@pytest.mark.slow
def test_sdxl_img2img_matches_diffusers(runtime, pipe):
    from sdedge.export.reference import reference_init_images

    img = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
    kw = dict(image=img, mask=None, strength=0.6, steps=4, guidance=7.5, scheduler="euler")
    ours = runtime.generate(PROMPTS[0], "", rng=TorchNoise(2), watermark=False, **kw).images
    ref = reference_init_images(pipe, PROMPTS[0], "", scheduler_config=runtime.manifest.scheduler, seed=2, **kw)
    assert psnr(ours, ref) >= 40.0
