"""Backend choice. The GPU side that runs on any machine: engine shape profiles from --shapes/--batch, ONNX
Runtime's provider order and TensorRT-provider options, and the `auto` rule saying why it passed over TensorRT
and CUDA. The CPU side: the `auto` rule by the CPU's flags (injected with SDEDGE_CPU_FLAGS / cpu_flags= for
BF16, VNNI-only and AVX2-only CPUs, each choice and its reason asserted), the export's measured preference
only on a CPU with the same flags, --precision-hint, and one real run of the rule's choice on this machine
(OpenVINO bf16 where the CPU has it) against the fp32 ONNX Runtime image. Nothing here is mocked: the probe,
onnxruntime, OpenVINO and the CLI run for real."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import run_cli

from sdedge.runtime.backends import profiles
from sdedge.runtime.backends.onnxruntime import available_providers, choose_providers, provider_entries
from sdedge.runtime.backends.openvino import openvino_available
from sdedge.runtime.backends.select import choose_backend, engine_factory
from sdedge.runtime.bundle import Bundle
from sdedge.runtime.environment import cpu_flags
from sdedge.runtime.errors import BadInput, MissingDependency
from sdedge.runtime.manifest import BackendHint, Precision, PrecisionParity, SpeedReport

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
    assert opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == str(tmp_path / "onnxruntime-trt" / "unet-abc")
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
                "--verbose", env={"SDEDGE_CPU_FLAGS": "avx2 fma"})  # AVX2-only: fp32 stays on ONNX Runtime
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


# == the CPU rule, by the CPU's flags ==========================================================================
BF16_CPU = "avx2 avx512f avx512_vnni avx512_bf16"  # this machine's kind (AMD EPYC, AVX-512 VNNI + BF16)
AMX_CPU = "avx2 avx512f avx512_vnni amx_tile amx_bf16 amx_int8"  # a Sapphire Rapids without avx512_bf16 listed
VNNI_CPU = "avx2 avx512f avx512_vnni"
AVX2_CPU = "avx2 fma"
needs_openvino = pytest.mark.skipif(not openvino_available(), reason="OpenVINO not installed (sdedge[openvino])")


def _choose(manifest, flags: str, precision=None, **kw):
    m = manifest if precision is None else dataclasses.replace(manifest, precision=precision)
    return choose_backend(m, "auto", "cpu", cpu_flags=frozenset(flags.split()), **kw)


def _with_openvino_ir(manifest):
    """An int8 bundle whose UNet carries an OpenVINO IR that the export's gates measured faster within parity
    (export/openvino_int8.py writes those figures; tests/test_openvino_int8.py runs it)."""
    unet = dataclasses.replace(manifest.components["unet"], openvino_ir=("unet/model.xml", "unet/model.bin"))
    speed = tuple(SpeedReport(backend=b, fp32_seconds=f, seconds=t, ratio=round(f / t, 3), calls=3, shape="2x4x32x32",
                              threads=2, machine="cpu, 2 cores, avx2+avx512f+avx512_vnni+avx512_bf16")
                  for b, f, t in (("openvino", 0.92, 0.58), ("onnxruntime", 4.7, 4.7)))
    parity = PrecisionParity(unet_cosine=0.991, guided_cosine=0.984, guidance=7.5, samples=10, backend="openvino")
    return dataclasses.replace(manifest, precision=Precision.INT8, components={**manifest.components, "unet": unet},
                               speed=speed, parity=dataclasses.replace(manifest.parity, precision=parity))


@needs_openvino
def test_bf16_cpu_runs_fp32_and_bf16_bundles_on_openvino_bf16(tiny_bundle, monkeypatch):
    m = Bundle.open(tiny_bundle).manifest
    monkeypatch.setenv("SDEDGE_CPU_FLAGS", BF16_CPU)  # the env var the rule reads when no cpu_flags= is given
    c = choose_backend(m, "auto", "cpu")
    assert (c.backend, c.precision_hint) == ("openvino", "bf16")
    assert c.reason.startswith("rule 5: avx512_bf16: OpenVINO runs bf16 compute") and "issue 19" in c.reason
    assert "--precision-hint fp32" in c.reason
    engine = engine_factory(c, m)(Bundle.open(tiny_bundle), "unet", m.components["unet"])
    assert engine.precision_hint == "bf16"  # what OpenVINO is compiled with
    b = _choose(m, BF16_CPU, Precision.BF16)
    assert (b.backend, b.precision_hint) == ("openvino", "bf16") and "avx512_bf16" in b.reason
    amx = _choose(m, AMX_CPU)
    assert (amx.backend, amx.precision_hint) == ("openvino", "bf16") and amx.reason.startswith("rule 5: amx_bf16")
    w8 = _choose(m, BF16_CPU, Precision.INT8_WEIGHTS)
    assert (w8.backend, w8.precision_hint) == ("openvino", "bf16") and "bf16 compute (avx512_bf16)" in w8.reason
    # exact fp32 on request: ONNX Runtime under auto, OpenVINO compiled f32 when asked for
    exact = _choose(m, BF16_CPU, precision_hint="fp32")
    assert exact.backend == "onnxruntime" and "--precision-hint fp32: exact fp32 compute" in exact.reason
    ov = choose_backend(m, "openvino", "cpu", precision_hint="fp32")
    assert (ov.backend, ov.precision_hint, ov.reason) == ("openvino", "f32", "asked for openvino, fp32 compute")
    assert choose_backend(m, "openvino", "cpu").precision_hint is None  # the bundle's own: f32 for fp32
    with pytest.raises(BadInput, match="--precision-hint bf16 needs OpenVINO"):
        choose_backend(m, "onnxruntime", "cpu", precision_hint="bf16")
    with pytest.raises(BadInput, match="precision hint 'fp16'"):
        choose_backend(m, "auto", "cpu", precision_hint="fp16")


@needs_openvino
def test_vnni_cpu_runs_int8_on_openvino_only_with_its_ir(tiny_bundle):
    m = Bundle.open(tiny_bundle).manifest
    fp32 = _choose(m, VNNI_CPU)
    assert fp32.backend == "onnxruntime" and "no native bf16 (avx512_bf16, amx)" in fp32.reason
    ir = _choose(_with_openvino_ir(m), VNNI_CPU)
    assert ir.backend == "openvino" and ir.reason.startswith("rule 5: avx512_vnni: OpenVINO's int8 kernels")
    assert _choose(_with_openvino_ir(m), "avx2 avx_vnni").reason.startswith("rule 5: avx_vnni")
    qdq = _choose(m, VNNI_CPU, Precision.INT8)
    assert qdq.backend == "onnxruntime" and "QDQ ONNX without an OpenVINO IR" in qdq.reason and "0.63" in qdq.reason
    bf16 = _choose(m, VNNI_CPU, Precision.BF16)
    assert (bf16.backend, bf16.precision_hint) == ("openvino", "f32") and "fp32 compute" in bf16.reason


@needs_openvino
def test_avx2_cpu_keeps_fp32_on_onnxruntime_and_says_int8_is_not_fast_there(tiny_bundle):
    m = Bundle.open(tiny_bundle).manifest
    fp32 = _choose(m, AVX2_CPU)
    assert (fp32.backend, fp32.providers) == ("onnxruntime", ("CPUExecutionProvider",))
    assert "no native bf16" in fp32.reason
    # why: the memory it saves, with the speed OpenVINO fp32 measured beside it, and how to ask for OpenVINO
    assert "smaller peak memory" in fp32.reason and "1.15x faster" in fp32.reason and "--backend openvino" in fp32.reason
    for manifest in (dataclasses.replace(m, precision=Precision.INT8), _with_openvino_ir(m)):
        c = _choose(manifest, AVX2_CPU)
        assert c.backend == "onnxruntime" and "no VNNI (avx512_vnni, avx_vnni, amx_int8): int8 is not the fast " \
            "path on this CPU" in c.reason and "saturate" in c.reason
    assert _choose(m, AVX2_CPU, Precision.BF16).precision_hint == "f32"


@needs_openvino
def test_the_exports_measurement_wins_only_on_a_cpu_with_the_same_flags(tiny_bundle):
    m = Bundle.open(tiny_bundle).manifest
    report = SpeedReport(backend="openvino", fp32_seconds=1.0, seconds=0.5, ratio=2.0, calls=3, shape="2x4x32x32",
                         threads=2, machine="AMD EPYC 9R14, 2 cores, avx2+avx512f+avx512_vnni")
    measured = dataclasses.replace(m, precision=Precision.INT8, speed=(report,),
                                   backend=BackendHint(preferred="openvino", reason="openvino 0.500 s per UNet call"))
    same = _choose(measured, VNNI_CPU + " fma sse4_2")  # flags that do not decide the engine do not matter
    assert same.backend == "openvino"
    assert same.reason == ("rule 4: measured fastest at export on a CPU with the same flags (avx2+avx512f+avx512_vnni):"
                           " openvino 0.500 s per UNet call")
    other = _choose(measured, AVX2_CPU)
    assert other.backend == "onnxruntime"
    assert other.reason.startswith("rule 5: the export measured openvino fastest on another CPU (AMD EPYC 9R14, 2 "
                                   "cores, avx2+avx512f+avx512_vnni), this one has avx2; no VNNI")
    unrecorded = _choose(dataclasses.replace(measured, speed=()), VNNI_CPU)
    assert "on another CPU (a CPU the bundle does not record)" in unrecorded.reason


@needs_openvino
def test_cli_precision_hint(tiny_bundle, tmp_path):
    flags = {"SDEDGE_CPU_FLAGS": BF16_CPU}
    r = run_cli("generate", str(tiny_bundle), "a red circle", "--steps", "2", "--out", str(tmp_path / "a.png"),
                "--precision-hint", "fp32", env=flags)
    assert r.returncode == 0, r.stderr
    assert "backend onnxruntime:CPUExecutionProvider (rule 5: --precision-hint fp32: exact fp32 compute" in r.stdout + r.stderr
    r = run_cli("generate", str(tiny_bundle), "a red circle", "--steps", "2", "--out", str(tmp_path / "b.png"),
                "--precision-hint", "fp16")
    assert r.returncode == 2 and "--precision-hint" in r.stderr


REAL_BF16 = next((f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in cpu_flags()), None)


@pytest.mark.slow  # three pipelines on the tiny bundle, OpenVINO compiles included: ~15 s
@pytest.mark.skipif(not openvino_available() or REAL_BF16 is None, reason="needs OpenVINO and a CPU with native bf16")
def test_auto_runs_the_fp32_bundle_in_bf16_on_this_cpu_within_parity(tiny_bundle, monkeypatch):
    """The rule's real choice here (no injected flags): OpenVINO bf16, and its image against the fp32 ONNX
    Runtime one. Measured on the tiny base (AMD EPYC, avx512_bf16): 46.8 dB; OpenVINO f32 121.6 dB."""
    from sdedge.export.reference import psnr
    from sdedge.runtime.pipeline import Pipeline

    monkeypatch.delenv("SDEDGE_CPU_FLAGS", raising=False)
    m = Bundle.open(tiny_bundle).manifest
    f, size = m.latent.vae_scale_factor, m.shapes.default_width
    lat = np.random.default_rng(3).standard_normal((1, m.latent.channels, size // f, size // f),
                                                   dtype=np.float32)  # (B, C, H/f, W/f)
    kw = dict(steps=12, guidance=7.5, latents=lat, watermark=False)
    images = {}
    for name, opts in {"auto": {}, "ort": {"backend": "onnxruntime"},
                       "ov-f32": {"backend": "openvino", "precision_hint": "fp32"}}.items():
        pipe = Pipeline.load(tiny_bundle, device="cpu", verify="off", **opts)
        images[name] = pipe.generate("a red circle", "", **kw).images
        if name == "auto":
            assert pipe.backend == "openvino:CPU" and pipe.backend_reason.startswith(f"rule 5: {REAL_BF16}")
            assert pipe.engines["unet"].config["INFERENCE_PRECISION_HINT"] == "bf16"
        pipe.close()
    bf16_db, f32_db = psnr(images["auto"], images["ort"]), psnr(images["ov-f32"], images["ort"])
    assert 35.0 <= bf16_db < 90.0, bf16_db  # within parity, and bf16 really ran (not the fp32 result)
    assert f32_db >= 90.0, f32_db  # --precision-hint fp32 keeps OpenVINO exact
