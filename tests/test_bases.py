"""Built-in bases, loading bases offline, and the single-file round trip."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safetensors.torch import load_file, save_file  # noqa: E402

from sdedge.export import bases, builtin_bases  # noqa: E402
from sdedge.export.bases import (  # noqa: E402
    BUILTIN_BASES,
    builtin_parameter_counts,
    describe_base,
    load_base,
    read_safetensors_header,
    write_builtin_base,
)
from sdedge.export.single_file import save_single_file  # noqa: E402
from sdedge.runtime.errors import SdedgeError  # noqa: E402

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bases")


@pytest.fixture(scope="module")
def tiny_dir(tiny_base):
    """The session's tiny base (conftest: write_builtin_base("tiny", seed=0)); its pipeline is conftest's tiny_pipe."""
    return tiny_base


@pytest.fixture(scope="module")
def single_file(tiny_pipe, work):
    return save_single_file(tiny_pipe, work / "tiny.safetensors")


def _weights(folder):
    return {f: load_file(str(folder / f)) for f in WEIGHT_FILES}


@torch.no_grad()
def _outputs(pipe) -> dict[str, torch.Tensor]:
    """Each component on a fixed input."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.from_numpy(
        pipe.tokenizer(["a red circle on a blue background"], padding="max_length", max_length=77,
                       truncation=True, return_tensors="np").input_ids
    )
    hidden = pipe.text_encoder(ids)[0]
    latents = torch.randn(1, 4, 16, 16, generator=g)  # (1, 4, 64/4, 64/4)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    return {
        "text_encoder": hidden,
        "unet": pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=hidden).sample,
        "vae_encode": pipe.vae.encode(image).latent_dist.mean,
        "vae_decode": pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample,
    }


def _max_diff(a: dict, b: dict) -> dict[str, float]:
    return {k: float((a[k] - b[k]).abs().max()) for k in a}


# --- built-in bases -------------------------------------------------------------------------------------


def test_tiny_is_written_small_and_complete(tiny_dir, record_property):
    size = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    weights = sum((tiny_dir / f).stat().st_size for f in WEIGHT_FILES)
    record_property("tiny_folder_bytes", size)
    record_property("tiny_weight_bytes", weights)
    print(f"\ntiny base: {size / 1e6:.1f} MB in all, {weights / 1e6:.1f} MB of weights")
    assert weights < 30e6 and size < 35e6  # fp32 here; what ships inside sdedge is fp16 (test_tiny_world)
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    sched = json.loads((tiny_dir / "scheduler/scheduler_config.json").read_text())
    expected = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    assert {k: sched[k] for k in expected} == expected
    tok_cfg = json.loads((tiny_dir / "tokenizer/tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == 77 and tok_cfg["pad_token"] == "<|endoftext|>"
    from sdedge.tinyworld.base import tiny_meta

    vocab = json.loads((tiny_dir / "tokenizer/vocab.json").read_text())  # the small tokenizer of the shapes world
    assert len(vocab) == tiny_meta()["configs"]["text_encoder"]["vocab_size"] < 1000
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and "purple</w>" in vocab
    marker = json.loads((tiny_dir / "sdedge_base.json").read_text())
    assert marker["trained"] is True and marker["default_guidance"] == tiny_meta()["default_guidance"]
    assert not list(tiny_dir.parent.glob(".tiny.*")), "temporary folders left behind"


def test_text_encoder_written_in_hub_layout(tiny_dir, tmp_path):
    """transformers 5 saves CLIPTextModel without `text_model.`; transformers 4 (optimum, A1111) then loads
    every weight as random with a mere warning. The written base keeps the Hub's prefix, which both read."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from sdedge.export.bases import hub_layout_text_encoder

    with safe_open(str(tiny_dir / "text_encoder/model.safetensors"), "np") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)
    # a transformers-5 layout file is rewritten once, values kept; a second pass changes nothing
    folder = tmp_path / "te"
    folder.mkdir()
    original = load_file(str(tiny_dir / "text_encoder/model.safetensors"))
    save_file({k.removeprefix("text_model."): v for k, v in original.items()}, str(folder / "model.safetensors"))
    assert hub_layout_text_encoder(folder) == len(original)
    assert hub_layout_text_encoder(folder) == 0
    again = load_file(str(folder / "model.safetensors"))
    assert again.keys() == original.keys() and all((again[k] == original[k]).all() for k in original)
    assert not list(folder.glob("*.tmp"))


def test_tiny_loads_and_runs(tiny_pipe):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    assert isinstance(tiny_pipe, StableDiffusionPipeline)
    assert isinstance(tiny_pipe.scheduler, PNDMScheduler)
    assert tiny_pipe.safety_checker is None
    for part in ("unet", "vae", "text_encoder"):
        params = list(getattr(tiny_pipe, part).parameters())
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    assert tiny_pipe.vae_scale_factor == 4 and tiny_pipe.unet.config.sample_size * 4 == 64
    out = _outputs(tiny_pipe)
    for name, t in out.items():  # trained weights: neither vanishing nor exploding
        assert torch.isfinite(t).all(), name
        assert 1e-3 < float(t.std()) < 1e3, (name, float(t.std()))
    image = tiny_pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_tiny_tokenizer_matches_runtime(tiny_dir, tiny_pipe):
    from sdedge.runtime.tokenizer import ClipTokenizer

    prompts = ["a photo of a cat", "Émoji 🐱 and CAPS!!", ""]
    ours = ClipTokenizer.from_dir(tiny_dir / "tokenizer")(prompts)
    theirs = tiny_pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="np").input_ids
    assert np.array_equal(ours, theirs)


def test_seeded_writes_are_identical_and_overwrite(tiny_dir, work):
    again = write_builtin_base("tiny", work / "tiny-again", seed=0)
    a, b = _weights(tiny_dir), _weights(again)
    for f in WEIGHT_FILES:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), (f, k)
    assert describe_base(tiny_dir)["sha256"] == describe_base(again)["sha256"]

    # the trained base has no seed; a non-empty folder is refused, then replaced with overwrite=True;
    # tiny-random is the same architecture, and another seed gives other weights
    with pytest.raises(SdedgeError, match="trained.*tiny-random"):
        write_builtin_base("tiny", work / "tiny-seeded", seed=1)
    with pytest.raises(SdedgeError, match="not empty.*overwrite"):
        write_builtin_base("tiny-random", again, seed=1)
    write_builtin_base("tiny-random", again, seed=1, overwrite=True)
    c = _weights(again)
    assert a[WEIGHT_FILES[0]].keys() == c[WEIGHT_FILES[0]].keys()
    assert not torch.equal(a[WEIGHT_FILES[0]]["conv_in.weight"], c[WEIGHT_FILES[0]]["conv_in.weight"])
    r0 = _weights(write_builtin_base("tiny-random", work / "random-0", seed=0))
    r0b = _weights(write_builtin_base("tiny-random", work / "random-0b", seed=0))
    assert torch.equal(r0[WEIGHT_FILES[0]]["conv_in.weight"], r0b[WEIGHT_FILES[0]]["conv_in.weight"])
    assert json.loads((again / "sdedge_base.json").read_text())["seed"] == 1
    assert not [p for p in work.iterdir() if p.name.startswith(".tiny-again.")]


def test_unknown_builtin(work):
    with pytest.raises(SdedgeError, match="tiny"):
        write_builtin_base("sdxl", work / "nope")
    assert BUILTIN_BASES == ("tiny", "tiny-random", "sd15-arch", "tiny-inpaint", "sdxl-tiny", "sdxl-arch")


def test_sd15_arch_parameter_count_on_meta():
    counts = builtin_parameter_counts("sd15-arch")
    assert counts["unet"] == 859_520_964  # SD1.5's UNet
    assert abs(counts["unet"] - 859.5e6) < 0.1e6
    assert counts["vae"] == 83_653_863 and counts["text_encoder"] == 123_060_480
    cfg = bases.builtin_configs("sd15-arch")
    assert cfg["unet"]["block_out_channels"] == (320, 640, 1280, 1280)
    assert cfg["vae"]["scaling_factor"] == 0.18215


# --- single file ----------------------------------------------------------------------------------------


def test_single_file_layout(single_file):
    keys = read_safetensors_header(single_file)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in keys  # tiny's first up block upsampler
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert keys["first_stage_model.encoder.mid.attn_1.q.weight"] == (64, 64, 1, 1)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert not list(single_file.parent.glob(f".{single_file.name}.*"))


def test_single_file_round_trip(tiny_pipe, tiny_dir, single_file):
    loaded = load_base(single_file, config=tiny_dir)
    diffs = _max_diff(_outputs(tiny_pipe), _outputs(loaded))
    print("\nround-trip max abs diff:", diffs)
    assert all(d <= 1e-6 for d in diffs.values()), diffs
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_pipe, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_fp16_single_file_loads_as_fp32(tiny_pipe, tiny_dir, work):
    half = save_single_file(tiny_pipe, work / "tiny-fp16.safetensors", dtype=torch.float16)
    loaded = load_base(half, config=tiny_dir)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_pipe, part).state_dict(), getattr(loaded, part).state_dict()
        for k in a:
            assert b[k].dtype == a[k].dtype, (part, k)
            if a[k].is_floating_point():
                assert torch.equal(a[k].half().float(), b[k]), (part, k)


def test_sd15_layout_agrees_with_diffusers_converter():
    """Our diffusers -> original key map, inverted by diffusers' own converters, gives back every
    sd15-arch (and tiny) parameter with its shape; on the meta device, so nothing is allocated."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from sdedge.export.single_file import ldm_key_shapes

    for name, n_keys in (("sd15-arch", (686, 248, 196)), ("tiny", None)):
        with torch.device("meta"):
            unet, vae, text_encoder = builtin_bases._build_models(name, seed=None)
        shapes = ldm_key_shapes(unet, vae, text_encoder)
        if n_keys:  # SD1.5's checkpoint: 686 UNet, 248 VAE and 196 (+ position_ids) CLIP tensors
            counts = tuple(sum(k.startswith(p) for k in shapes) for p in
                           ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
            assert counts == n_keys
            assert shapes["model.diffusion_model.output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
            assert shapes["first_stage_model.decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
        ckpt = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        for convert, model in ((convert_ldm_unet_checkpoint, unet), (convert_ldm_vae_checkpoint, vae)):
            back, sd = convert(ckpt, dict(model.config)), model.state_dict()
            assert set(back) == set(sd)
            assert all(tuple(back[k].shape) == tuple(sd[k].shape) for k in sd)
        back = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}
        sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
        assert set(back) == set(sd)


def test_single_file_needs_config(single_file):
    with pytest.raises(SdedgeError, match="--config DIR"):
        load_base(single_file)
    with pytest.raises(SdedgeError, match="nowhere-else.*not found|not found.*nowhere-else"):
        load_base(single_file, config=single_file.parent / "nowhere-else")
    # a folder that is not a diffusers folder
    empty = single_file.parent / "empty-config"
    empty.mkdir(exist_ok=True)
    with pytest.raises(SdedgeError, match="model_index.json"):
        load_base(single_file, config=empty)


def test_pickle_refused_unless_allowed(tiny_pipe, tiny_dir, single_file, work):
    ckpt = work / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(single_file))}, ckpt)
    with pytest.raises(SdedgeError) as e:
        load_base(ckpt, config=tiny_dir)
    msg = str(e.value)
    assert "pickle" in msg and "arbitrary code" in msg and "safetensors" in msg and "allow_pickle" in msg
    loaded = load_base(ckpt, config=tiny_dir, allow_pickle=True)
    assert all(d <= 1e-6 for d in _max_diff(_outputs(tiny_pipe), _outputs(loaded)).values())


def test_folder_pickles_refused_and_variants_found(tiny_pipe, tiny_dir, work):
    folder = work / "tiny-bin"
    shutil.copytree(tiny_dir, folder)
    unet_st = folder / "unet/diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(unet_st)), folder / "unet/diffusion_pytorch_model.bin")
    unet_st.unlink()
    with pytest.raises(SdedgeError, match=r"diffusion_pytorch_model\.bin.*arbitrary code"):
        load_base(folder)
    loaded = load_base(folder, allow_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(tiny_pipe.unet.parameters(), loaded.unet.parameters()))

    folder = work / "tiny-variant"
    shutil.copytree(tiny_dir, folder)
    for f in WEIGHT_FILES:
        (folder / f).rename((folder / f).with_suffix(".fp16.safetensors"))
    loaded = load_base(folder)
    assert all(torch.equal(a, b) for a, b in zip(tiny_pipe.vae.parameters(), loaded.vae.parameters()))


def test_missing_and_bad_sources(work, tiny_dir):
    with pytest.raises(SdedgeError, match="not found"):
        load_base(work / "no-such-base")
    bare = work / "bare-folder"
    bare.mkdir()
    (bare / "unet").mkdir()
    with pytest.raises(SdedgeError, match="model_index.json"):
        load_base(bare)
    odd = work / "model.onnx"
    odd.write_bytes(b"xx")
    with pytest.raises(SdedgeError, match="unknown base format"):
        load_base(odd, config=tiny_dir)


def test_truncated_safetensors_named(single_file, tiny_dir, work):
    data = single_file.read_bytes()
    cut = work / "cut.safetensors"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SdedgeError, match="cut.safetensors") as e:
        load_base(cut, config=tiny_dir)
    assert "truncated" in str(e.value)
    cut.write_bytes(data[:5])
    with pytest.raises(SdedgeError, match="cut.safetensors"):
        load_base(cut, config=tiny_dir)
    cut.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + b"\0" * 10)
    with pytest.raises(SdedgeError, match="cut.safetensors.*header"):
        load_base(cut, config=tiny_dir)

    # the same inside a diffusers folder: the error names the component's file
    folder = work / "tiny-cut"
    shutil.copytree(tiny_dir, folder)
    vae_file = folder / "vae/diffusion_pytorch_model.safetensors"
    vae_bytes = vae_file.read_bytes()
    vae_file.write_bytes(vae_bytes[: len(vae_bytes) - 1000])
    with pytest.raises(SdedgeError, match=r"vae/diffusion_pytorch_model\.safetensors"):
        load_base(folder)


def test_mismatched_checkpoint_names_key_and_shapes(single_file, tiny_dir, work):
    state = load_file(str(single_file))
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    good_shape = list(state[key].shape)
    state[key] = torch.zeros(good_shape[0] * 2, *good_shape[1:])
    bad = work / "bad-shape.safetensors"
    save_file(state, str(bad))
    with pytest.raises(SdedgeError) as e:
        load_base(bad, config=tiny_dir)
    msg = str(e.value)
    assert key in msg and "bad-shape.safetensors" in msg
    assert str([good_shape[0] * 2, *good_shape[1:]]) in msg and str(good_shape) in msg

    state = load_file(str(single_file))
    gone = "first_stage_model.decoder.up.2.block.0.conv2.bias"
    del state[gone]
    missing = work / "missing-key.safetensors"
    save_file(state, str(missing))
    with pytest.raises(SdedgeError, match=gone.replace(".", r"\.") + r".*missing"):
        load_base(missing, config=tiny_dir)

    # a folder whose weights do not fit its config
    folder = work / "tiny-wrong"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "unet/config.json").read_text())
    cfg["cross_attention_dim"] = 96
    (folder / "unet/config.json").write_text(json.dumps(cfg))
    with pytest.raises(SdedgeError, match=r"attn2\.to_k\.weight.*\[32, (64|96)\].*\[32, (64|96)\]"):
        load_base(folder)


def test_describe_base(tiny_dir, single_file):
    import hashlib

    d = describe_base(tiny_dir)
    assert d["id"] == "builtin:tiny@seed0" and d["kind"] == "diffusers-folder"
    assert set(d["files"]) == set(WEIGHT_FILES) and len(d["sha256"]) == 64
    combined = "".join(f"{rel}  {sha}\n" for rel, sha in sorted(d["files"].items()))
    assert d["sha256"] == hashlib.sha256(combined.encode()).hexdigest()
    s = describe_base(single_file)
    assert s["kind"] == "single-file" and s["sha256"] == hashlib.sha256(single_file.read_bytes()).hexdigest()
    with pytest.raises(SdedgeError):
        describe_base(single_file.parent / "absent")


# --- offline --------------------------------------------------------------------------------------------


def test_load_base_forces_offline(tiny_pipe):
    import huggingface_hub.constants as c

    assert c.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.slow
def test_loads_offline_without_any_network(tiny_dir, single_file):
    """In a fresh process with HF_HUB_OFFLINE=1 and every socket connection refused, both kinds load."""
    code = textwrap.dedent(
        f"""
        import socket
        import sys
        def refuse(*a, **k):
            print("NETWORK-ATTEMPT", a[:2], flush=True)  # seen even if a library swallows the error
            raise OSError("network access attempted")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from sdedge.export.bases import load_base
        pipe = load_base({str(tiny_dir)!r})
        pipe2 = load_base({str(single_file)!r}, config={str(tiny_dir)!r})
        print("LOADED", type(pipe).__name__, type(pipe2).__name__)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED StableDiffusionPipeline StableDiffusionPipeline" in out.stdout
    assert "NETWORK-ATTEMPT" not in out.stdout, out.stdout


def test_guidance_hint_reads_the_base_marker(tmp_path, caplog):
    from sdedge.export.markers import MARKER_FILE, guidance_hint, read_base_marker

    assert guidance_hint(tmp_path) == 7.5 and read_base_marker(tmp_path) is None  # a plain folder
    (tmp_path / MARKER_FILE).write_text('{"builtin": "tiny", "seed": 0, "default_guidance": 3.5}', encoding="utf-8")
    assert guidance_hint(tmp_path) == 3.5 and read_base_marker(tmp_path).builtin == "tiny"
    for bad in ('{"default_guidance": true}', '{"default_guidance": -1}', "[1, 2]", "{not json"):
        (tmp_path / MARKER_FILE).write_text(bad, encoding="utf-8")
        assert guidance_hint(tmp_path) == 7.5, bad
    assert "unreadable" in caplog.text  # the last two: logged, then treated as a plain folder
