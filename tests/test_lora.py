"""LoRA fusing for export (export/lora.py): key formats, parity with diffusers' unfused LoRAs, recomputation from
the base, and clear errors for LoRAs of another base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdedge.export.bases import load_base
from sdedge.export.lora import LoraError, fuse_loras, parse_lora_arg, read_lora, unfuse_loras
from sdedge.export.reference import psnr, reference_images

UNET_T = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_T = ("q_proj", "k_proj", "v_proj", "out_proj")


def _layers(pipe, rank, seed, text=True, std=0.15):
    """{(component, module path): (down, up)} of a random LoRA on the attention projections."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    parts = [("unet", pipe.unet, UNET_T)] + ([("text_encoder", pipe.text_encoder, TEXT_T)] if text else [])
    for comp, model, targets in parts:
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith(targets):
                out[(comp, name)] = (torch.randn(rank, mod.in_features, generator=g) * std,
                                     torch.randn(mod.out_features, rank, generator=g) * std)
    return out


def _te_path(path):
    return path if path.startswith("text_model.") else "text_model." + path


def write_peft(path, layers, rank, alpha):
    sd = {}
    for (comp, p), (a, b) in layers.items():
        p = _te_path(p) if comp == "text_encoder" else p
        sd[f"{comp}.{p}.lora_A.weight"] = a
        sd[f"{comp}.{p}.lora_B.weight"] = b
    meta = {}
    for comp, t in (("unet", UNET_T), ("text_encoder", TEXT_T)):
        meta.update({f"{comp}.r": rank, f"{comp}.lora_alpha": alpha, f"{comp}.target_modules": list(t)})
    save_file(sd, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def write_kohya(path, layers, alpha, unet_names=None):
    sd = {}
    for (comp, p), (a, b) in layers.items():
        if comp == "unet":
            key = "lora_unet_" + (unet_names or {}).get(p, p).replace(".", "_")
        else:
            key = "lora_te_" + _te_path(p).replace(".", "_")
        sd[f"{key}.lora_down.weight"] = a
        sd[f"{key}.lora_up.weight"] = b
        sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


@pytest.fixture(scope="module")
def shapes_pipe(tiny_base):
    return load_base(tiny_base)


@pytest.fixture(scope="module")
def loras(shapes_pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    a = _layers(shapes_pipe, 4, seed=1)
    b = _layers(shapes_pipe, 2, seed=2, text=False)
    return {
        "a_layers": a,
        "b_layers": b,
        "a": write_peft(d / "a.safetensors", a, rank=4, alpha=8),  # alpha != rank: scale 2
        "b": write_kohya(d / "b.safetensors", b, alpha=1),  # kohya, alpha 1 of rank 2
        "a_kohya": write_kohya(d / "a_kohya.safetensors", a, alpha=8),
        "dir": d,
    }


LATENTS = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)  # 64 px / 4


def image(pipe):
    return reference_images(pipe, "a red circle on a blue background", "", latents=LATENTS, steps=6, guidance=7.5,
                            scheduler="ddim", scheduler_config=dict(pipe.scheduler.config))


def test_fused_image_equals_diffusers_unfused(tiny_base, loras):
    """The acceptance test: two LoRAs with scales fused into the weights give diffusers' image with the same
    LoRAs loaded unfused (load_lora_weights + set_adapters) at >= 40 dB, while the LoRAs visibly change it."""
    scales = (0.8, 0.5)
    fused_pipe = load_base(tiny_base)
    base_img = image(fused_pipe)
    report = fuse_loras(fused_pipe, [(loras["a"], scales[0]), (loras["b"], scales[1])])
    fused = image(fused_pipe)

    ref = load_base(tiny_base)
    ref.load_lora_weights(str(loras["a"]), adapter_name="a")
    ref.load_lora_weights(str(loras["b"]), adapter_name="b")
    ref.set_adapters(["a", "b"], list(scales))
    unfused = image(ref)

    assert psnr(fused, unfused) >= 40.0
    assert psnr(base_img, unfused) < 30.0, "the LoRAs should change the image"
    # coverage: every key of both files matched
    assert report.complete
    a, b = report.loras
    assert a.keys == a.matched_keys == 2 * len(loras["a_layers"])
    assert b.keys == b.matched_keys == 3 * len(loras["b_layers"])
    assert a.layers == {"unet": 80, "text_encoder": 8} and b.layers == {"unet": 80, "text_encoder": 0}
    assert (a.format, b.format, a.scale) == ("peft", "kohya", 0.8)
    assert len(a.sha256) == 64 and report.modules == {"unet": 80, "text_encoder": 8}


def test_weights_recomputed_from_base_never_accumulated(tiny_base, loras):
    pipe = load_base(tiny_base)
    q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    base = q.detach().clone()
    fuse_loras(pipe, [(loras["a"], 1.0)])
    after_a = q.detach().clone()
    fuse_loras(pipe, [(loras["b"], 1.0)])
    fuse_loras(pipe, [(loras["a"], 1.0)])  # A -> B -> A gives A exactly, not a blend
    assert torch.equal(q, after_a)
    down, up = loras["a_layers"][("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")]
    torch.testing.assert_close(after_a, base + 2.0 * up @ down, rtol=0, atol=1e-6)  # alpha 8 / rank 4
    fuse_loras(pipe, [(loras["a"], 0.0)])
    assert torch.equal(q, base)
    fuse_loras(pipe, [(loras["a"], 0.3), (loras["b"], -1.0)])
    unfuse_loras(pipe)
    assert torch.equal(q, base)
    te = pipe.text_encoder.encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(te, load_base(tiny_base).text_encoder.encoder.layers[0].self_attn.q_proj.weight)


def _fused_state(tiny_base, spec):
    pipe = load_base(tiny_base)
    fuse_loras(pipe, spec)
    return {**{f"u.{k}": v for k, v in pipe.unet.state_dict().items()},
            **{f"t.{k}": v for k, v in pipe.text_encoder.state_dict().items()}}


def _assert_same_state(x, y):
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-6, msg=k)


def test_kohya_keys_with_ldm_names_and_old_diffusers_keys_equal_peft(tiny_base, loras, shapes_pipe):
    from sdedge.export.single_file import unet_key_to_ldm

    layers = loras["a_layers"]
    # kohya with the original LDM module names (lora_unet_input_blocks_1_1_...), as A1111 LoRAs often have
    ldm = {p: unet_key_to_ldm(p + ".weight", shapes_pipe.unet.config).removesuffix(".weight")
           for c, p in layers if c == "unet"}
    assert any(n.startswith("input_blocks.") for n in ldm.values())
    kohya_ldm = write_kohya(loras["dir"] / "a_kohya_ldm.safetensors", layers, alpha=8, unet_names=ldm)
    # older diffusers: attention-processor keys for the UNet, lora_linear_layer for the text encoder, .alpha keys
    old = {}
    for (comp, p), (a, b) in layers.items():
        if comp == "unet":
            parent, proj = (p[: -len(".to_out.0")], "to_out") if p.endswith(".to_out.0") else p.rsplit(".", 1)
            old[f"unet.{parent}.processor.{proj}_lora.down.weight"] = a
            old[f"unet.{parent}.processor.{proj}_lora.up.weight"] = b
            old[f"unet.{parent}.{'to_out.0' if proj == 'to_out' else proj}.alpha"] = torch.tensor(8.0)
        else:
            old[f"text_encoder.{_te_path(p)}.lora_linear_layer.down.weight"] = a
            old[f"text_encoder.{_te_path(p)}.lora_linear_layer.up.weight"] = b
            old[f"text_encoder.{_te_path(p)}.alpha"] = torch.tensor(8.0)
    old_path = loras["dir"] / "a_old.safetensors"
    save_file(old, str(old_path))

    want = _fused_state(tiny_base, [(loras["a"], 0.7)])
    for other in (loras["a_kohya"], kohya_ldm, old_path):
        _assert_same_state(_fused_state(tiny_base, [(other, 0.7)]), want)
    assert read_lora(old_path).format == "diffusers-old"


def test_raw_peft_keys_with_adapter_name_and_base_layer(tiny_base, loras):
    """peft's own names (`base_model.model.` prefix, `.lora_A.default.weight`, `.base_layer`) fuse too."""
    sd = {}
    for (_component, p), (a, b) in loras["b_layers"].items():
        sd[f"base_model.model.{p}.base_layer.lora_A.default.weight"] = a
        sd[f"base_model.model.{p}.base_layer.lora_B.default.weight"] = b
    path = loras["dir"] / "raw_peft.safetensors"
    save_file(sd, str(path))
    # no alpha anywhere: alpha = rank (scale 1), like diffusers; the kohya file has alpha 1 of rank 2 (scale 0.5)
    _assert_same_state(_fused_state(tiny_base, [(path, 0.5)]), _fused_state(tiny_base, [(loras["b"], 1.0)]))


def test_shape_mismatch_names_first_key_and_both_shapes(tiny_pipe, loras, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(loras["a"]))
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    sd[key] = torch.randn(4, 2048)  # SDXL's cross-attention width
    bad = tmp_path / "xl.safetensors"
    save_file(sd, str(bad))
    pipe = load_base_copy(tiny_pipe)
    before = pipe.unet.state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"].clone()
    with pytest.raises(LoraError) as e:
        fuse_loras(pipe, [(loras["b"], 1.0), (bad, 1.0)])
    msg = str(e.value)
    assert key in msg and "[4, 2048]" in msg and "[32, 64]" in msg and "xl.safetensors" in msg
    # nothing was fused: the good LoRA listed first did not touch the weights either
    assert torch.equal(pipe.unet.state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
                       before)


def load_base_copy(tiny_pipe):
    import copy

    return copy.deepcopy(tiny_pipe)


def test_sdxl_lora_is_named(tiny_pipe, tmp_path):
    sd = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, 4),
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.randn(4, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.randn(640, 4),
    }
    path = tmp_path / "sdxl.safetensors"
    save_file(sd, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(LoraError, match=r"lora_te1_text_model_encoder_layers_0_self_attn_q_proj\.lora_down\.weight.*SDXL"):
        fuse_loras(load_base_copy(tiny_pipe), [(path, 1.0)])


def test_unmatched_keys_named_or_reported(tiny_pipe, loras, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(loras["a"]))
    sd["unet.no_such_block.to_q.lora_A.weight"] = torch.zeros(4, 32)
    sd["unet.no_such_block.to_q.lora_B.weight"] = torch.zeros(32, 4)
    sd["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a"] = torch.zeros(4, 4)
    sd["something_else"] = torch.zeros(1)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoraError) as e:
        fuse_loras(load_base_copy(tiny_pipe), [(path, 1.0)])
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a" in str(e.value)
    assert "3 more unmatched" in str(e.value)
    report = fuse_loras(load_base_copy(tiny_pipe), [f"{path}:0.5"], strict=False)
    unmatched = dict(report.loras[0].unmatched)
    assert set(unmatched) == {"unet.no_such_block.to_q.lora_A.weight", "unet.no_such_block.to_q.lora_B.weight",
                              "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", "something_else"}
    assert "LoHa" in unmatched["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a"]
    assert "no module 'no_such_block.to_q'" in unmatched["unet.no_such_block.to_q.lora_A.weight"]
    assert report.loras[0].scale == 0.5 and not report.complete


def test_conv_lora_locon(tiny_pipe, tmp_path):
    """A kohya LoCon layer on a 3x3 convolution: delta = up @ down reshaped to the kernel."""
    pipe = load_base_copy(tiny_pipe)
    conv = pipe.unet.down_blocks[0].resnets[0].conv1
    out_c, in_c, kh, kw = conv.weight.shape
    down, up = torch.randn(2, in_c, kh, kw), torch.randn(out_c, 2, 1, 1)
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    path = tmp_path / "locon.safetensors"
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)},
              str(path))
    base = conv.weight.detach().clone()
    fuse_loras(pipe, [(path, 1.0)])
    want = base + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
    torch.testing.assert_close(conv.weight.detach(), want, rtol=0, atol=1e-5)


def test_bad_files(tiny_pipe, tmp_path):
    pipe = load_base_copy(tiny_pipe)
    with pytest.raises(LoraError, match="not found"):
        fuse_loras(pipe, [(tmp_path / "missing.safetensors", 1.0)])
    pkl = tmp_path / "lora.pt"
    pkl.write_bytes(b"\x80\x04")
    with pytest.raises(LoraError, match="pickle"):
        fuse_loras(pipe, [(pkl, 1.0)])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraError, match="junk.safetensors"):
        fuse_loras(pipe, [(junk, 1.0)])
    half = tmp_path / "half.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32)},
              str(half))
    with pytest.raises(LoraError, match=r"lora_A\.weight.*up \(lora_B\) weight is missing"):
        fuse_loras(pipe, [(half, 1.0)])


def test_parse_lora_arg():
    assert parse_lora_arg("lora/adapter.safetensors:0.8") == ("lora/adapter.safetensors", 0.8)
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("C:/x/style.safetensors") == ("C:/x/style.safetensors", 1.0)
    assert parse_lora_arg("a.safetensors:-0.5") == ("a.safetensors", -0.5)


@pytest.mark.slow
def test_exported_bundle_with_loras_matches_diffusers_unfused(tiny_base, loras, tmp_path):
    """`sdedge export --lora a:0.8 --lora b:0.5`: the runtime's image equals diffusers with the same LoRAs loaded
    unfused (≥ 40 dB), the manifest records the adapters, and the LoRAs change the image."""
    from conftest import run_cli

    from sdedge.runtime.pipeline import Pipeline

    out = tmp_path / "bundle"
    r = run_cli("export", "--base", str(tiny_base), "--out", str(out), "--no-vae-encoder", "--parity-steps", "2",
                "--lora", f"{loras['a']}:0.8", "--lora", f"{loras['b']}:0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    runtime = Pipeline.load(out, device="cpu", verify="off", backend="onnxruntime")
    adapters = runtime.manifest.provenance.adapters
    assert [(a.file, a.scale) for a in adapters] == [("a.safetensors", 0.8), ("b.safetensors", 0.5)]
    ours = runtime.generate("a red circle on a blue background", "", latents=LATENTS, steps=6, guidance=7.5,
                            scheduler="ddim", watermark=False).images

    ref = load_base(tiny_base)
    base_img = image(ref)
    ref.load_lora_weights(str(loras["a"]), adapter_name="a")
    ref.load_lora_weights(str(loras["b"]), adapter_name="b")
    ref.set_adapters(["a", "b"], [0.8, 0.5])
    assert psnr(ours, image(ref)) >= 40.0
    assert psnr(ours, base_img) < 30.0


@pytest.mark.slow
def test_export_refuses_a_lora_for_another_base(tiny_base, tmp_path):
    from conftest import run_cli

    bad = tmp_path / "other.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 320),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(320, 4)},
              str(bad))
    r = run_cli("export", "--base", str(tiny_base), "--out", str(tmp_path / "b"), "--lora", str(bad))
    assert r.returncode == 2 and "to_q" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "b").exists()
