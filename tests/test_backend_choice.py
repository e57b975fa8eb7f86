"""The GPU side of backend choice that runs on any machine: engine shape profiles from --shapes/--batch, ONNX
Runtime's provider order and TensorRT-provider options, and the `auto` rule saying why it passed over TensorRT
and CUDA. Nothing here is mocked: the probe, onnxruntime and the CLI run for real on this (GPU-less) machine."""

from __future__ import annotations

import pytest
from conftest import run_cli

from sdedge.runtime.backends import profiles
from sdedge.runtime.backends.onnxruntime import available_providers, choose_providers, provider_entries
from sdedge.runtime.backends.select import choose_backend
from sdedge.runtime.bundle import Bundle
from sdedge.runtime.errors import BadInput, MissingDependency

NO_CUDA = "CUDAExecutionProvider" not in available_providers()


def test_parse_sizes_and_batch():
    assert profiles.parse_sizes("512x512, 768X640") == [(512, 512), (768, 640)]
    assert profiles.parse_batch("1-4") == (1, 4) and profiles.parse_batch("2") == (2, 2)
    for bad in ("512", "512x", "ax512", "0x512", "512x512;768x768"):
        with pytest.raises(BadInput, match="WIDTHxHEIGHT"):
            profiles.parse_sizes(bad)
    for bad in ("0", "4-1", "1-", "x"):
        with pytest.raises(BadInput, match="--batch"):
            profiles.parse_batch(bad)


def test_profiles_follow_the_bundle_manifest(tiny_bundle):
    m = Bundle.open(tiny_bundle).manifest
    s, f = m.shapes, m.latent.vae_scale_factor
    small, large = (s.width_min, s.height_min), (s.width_max, s.height_max)
    p = profiles.engine_profiles(m, [large, small], (1, 2))
    assert set(p) == set(m.components)
    unet = p["unet"]["sample"]
    c = m.latent.channels
    # min over the sizes, opt the first size, max over the sizes; the UNet sees the guided batch
    assert unet.min == (1, c, s.height_min // f, s.width_min // f)
    assert unet.opt == (2, c, s.height_max // f, s.width_max // f)
    assert unet.max == (4, c, s.height_max // f, s.width_max // f)
    assert p["unet"]["timestep"].max == (4,)
    ids = p["text_encoder"]["input_ids"]
    assert ids.min[1] == ids.max[1] == m.tokenizer.max_length  # fixed axes stay fixed
    dec = p["vae_decoder"]["latent_sample"]
    assert dec.max == (2, c, s.height_max // f, s.width_max // f)  # the decoder sees the images, not 2x
    static = profiles.engine_profiles(m, [(s.default_width, s.default_height)], (1, 1))
    assert all(pr.static for pr in static["vae_decoder"].values())
    assert not static["unet"]["sample"].static  # unguided (1) and guided (2) calls both fit


def test_profiles_refuse_what_the_bundle_was_not_exported_for(tiny_bundle):
    m = Bundle.open(tiny_bundle).manifest
    s = m.shapes
    with pytest.raises(BadInput, match=f"widths {s.width_min}–{s.width_max}"):
        profiles.engine_profiles(m, [(s.width_max + s.pixel_multiple, s.height_max)], (1, 1))
    with pytest.raises(BadInput, match=f"multiples of {s.pixel_multiple}"):
        profiles.engine_profiles(m, [(s.width_min + 1, s.height_min)], (1, 1))
    over = s.batch_max // 2 + 1
    with pytest.raises(BadInput, match=f"model batches {s.batch_min}–{s.batch_max}"):
        profiles.engine_profiles(m, [(s.default_width, s.default_height)], (1, over))


def test_provider_order_and_refusals():
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    providers, why = choose_providers("auto", gpu_build)
    assert providers == gpu_build and "TensorRT provider goes first" in why
    assert choose_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0][0] == "CUDAExecutionProvider"
    assert choose_providers("cpu", gpu_build)[0] == ["CPUExecutionProvider"]
    assert choose_providers("auto", ["CPUExecutionProvider"]) == (["CPUExecutionProvider"],
                                                                  "no CUDA provider in this onnxruntime build")
    with pytest.raises(MissingDependency, match="sdedge\\[gpu\\]"):
        choose_providers("cuda", ["CPUExecutionProvider"])


def test_tensorrt_provider_gets_engine_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("SDEDGE_CACHE_DIR", str(tmp_path))
    entries = provider_entries(["TensorrtExecutionProvider", "CUDAExecutionProvider"], "unet-abc")
    name, opts = entries[0]
    assert name == "TensorrtExecutionProvider" and entries[1] == "CUDAExecutionProvider"
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_engine_cache_path"] == str(tmp_path / "onnxruntime-trt" / "unet-abc")
    monkeypatch.setenv("SDEDGE_CACHE_DIR", "")  # caches off
    assert provider_entries(["TensorrtExecutionProvider"], "unet-abc") == ["TensorrtExecutionProvider"]


@pytest.mark.skipif(not NO_CUDA, reason="this onnxruntime has a CUDA provider: auto would pick the GPU")
def test_auto_says_why_it_passed_over_the_gpu(tiny_bundle, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi, as on CI
    m = Bundle.open(tiny_bundle).manifest
    c = choose_backend(m, "auto", "auto")
    assert c.device == "cpu" and "rule" in c.reason
    trt, cuda = c.skipped
    assert trt.startswith("TensorRT: missing") and "a CUDA GPU with the NVIDIA driver (nvidia-smi not found)" in trt
    assert cuda.startswith("ONNX Runtime on CUDA") and "sdedge[gpu]" in cuda
    assert choose_backend(m, "auto", "cpu").skipped == ("TensorRT and ONNX Runtime on CUDA: asked for the CPU",)
    assert choose_backend(m, "onnxruntime", "cpu").skipped == ()  # an explicit choice passes nothing over
    with pytest.raises(MissingDependency, match="onnxruntime-gpu"):
        choose_backend(m, "auto", "cuda")


@pytest.mark.skipif(not NO_CUDA, reason="this onnxruntime has a CUDA provider")
def test_cli_generate_prints_the_backend_and_what_it_passed_over(tiny_bundle, tmp_path):
    r = run_cli("generate", str(tiny_bundle), "a red circle", "--steps", "2", "--out", str(tmp_path / "a.png"),
                "--verbose")
    assert r.returncode == 0, r.stderr
    assert "backend onnxruntime:CPUExecutionProvider (rule" in r.stderr
    assert "not used: TensorRT: missing" in r.stderr and "not used: ONNX Runtime on CUDA" in r.stderr


def test_build_engines_checks_the_request_against_the_bundle_first(tiny_bundle):
    s = Bundle.open(tiny_bundle).manifest.shapes
    r = run_cli("build-engines", str(tiny_bundle), "--shapes", f"{s.width_max * 2}x{s.height_max}")
    assert r.returncode == 2 and f"widths {s.width_min}–{s.width_max}" in r.stderr, r.stderr
    assert "TensorRT" not in r.stderr  # the size is wrong on any machine: said before the GPU check
    r = run_cli("build-engines", str(tiny_bundle), "--shapes", "64x64", "--batch", "1-x")
    assert r.returncode == 2 and "--batch '1-x'" in r.stderr, r.stderr
