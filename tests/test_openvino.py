"""The OpenVINO backend and the backend rule, on the tiny fp32 bundle: same images as ONNX Runtime, a
compiled-model cache that makes the second load skip compiling, and `auto` choosing by the documented rule."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli

from sdedge.runtime.bundle import Bundle
from sdedge.runtime.errors import BadInput
from sdedge.runtime.manifest import BackendHint, Precision, SpeedReport

ov = pytest.importorskip("openvino")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("SDEDGE_CACHE_DIR", str(d))
    return d / "openvino"


def _generate(bundle_dir, backend, **kw):
    from sdedge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle_dir, backend=backend, verify="off", **kw)
    lat = np.random.default_rng(3).standard_normal((1, 4, 16, 16), dtype=np.float32)
    result = pipe.generate("a red circle", steps=4, guidance=7.5, scheduler="ddim", latents=lat, watermark=False)
    return pipe, result


def test_openvino_matches_onnxruntime(tiny_bundle, cache):
    ort_pipe, a = _generate(tiny_bundle, "onnxruntime")
    ov_pipe, b = _generate(tiny_bundle, "openvino")
    assert ort_pipe.backend.startswith("onnxruntime") and ov_pipe.backend == "openvino:CPU"
    assert np.max(np.abs(a.images - b.images)) < 1e-3


def test_compiled_model_cache_makes_second_load_skip_compiling(tiny_bundle, cache):
    first, _ = _generate(tiny_bundle, "openvino")
    assert first.engines["unet"].compiles == 1 and first.engines["unet"].cache_hits == 0
    blobs = sorted(p.name for p in cache.glob("unet-*.blob"))
    assert len(blobs) == 1 and (cache / blobs[0]).with_suffix(".sha256").is_file()
    second, r2 = _generate(tiny_bundle, "openvino")
    assert second.engines["unet"].compiles == 0 and second.engines["unet"].cache_hits == 1
    assert second.engines["text_encoder"].cache_hits == 1


def test_tampered_cache_blob_is_recompiled(tiny_bundle, cache):
    _generate(tiny_bundle, "openvino")
    blob = next(cache.glob("unet-*.blob"))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    pipe, result = _generate(tiny_bundle, "openvino")
    assert pipe.engines["unet"].compiles == 1 and pipe.engines["unet"].cache_hits == 0
    assert np.isfinite(result.images).all()


def test_cache_can_be_turned_off(tiny_bundle, monkeypatch, tmp_path):
    monkeypatch.setenv("SDEDGE_CACHE_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    pipe, _ = _generate(tiny_bundle, "openvino")
    assert pipe.engines["unet"].cache_dir is None and not (tmp_path / ".cache").exists()


def test_new_shape_compiles_again(tiny_bundle, cache):
    from sdedge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_bundle, backend="openvino", verify="off")
    pipe.generate("a", steps=2, width=64, height=64, seed=1)
    pipe.generate("a", steps=2, width=128, height=64, seed=1)
    assert pipe.engines["unet"].compiles == 2 and len(pipe.engines["unet"].compiled) == 2


def _manifest(tiny_bundle, **changes):
    m = Bundle.open(tiny_bundle).manifest
    return dataclasses.replace(m, **changes)


def test_auto_rule(tiny_bundle):
    from sdedge.runtime.backends.select import choose_backend

    avx2 = frozenset({"avx2"})  # an AVX2-only CPU; the rule for other CPUs: tests/test_backend_choice.py
    fp32 = _manifest(tiny_bundle)
    c = choose_backend(fp32, "auto", "cpu", cpu_flags=avx2)
    assert c.backend == "onnxruntime" and "rule 5" in c.reason
    for p in (Precision.BF16, Precision.INT8_WEIGHTS):
        c = choose_backend(_manifest(tiny_bundle, precision=p), "auto", "cpu", cpu_flags=avx2)
        assert c.backend == "openvino" and "fp32 compute" in c.reason
    c = choose_backend(_manifest(tiny_bundle, precision=Precision.INT8), "auto", "cpu", cpu_flags=avx2)
    assert c.backend == "onnxruntime" and "no VNNI" in c.reason
    speed = SpeedReport(backend="onnxruntime", fp32_seconds=0.1, seconds=0.1, ratio=1.0, calls=1, shape="2x4x8x8",
                        threads=2, machine="some CPU, 2 cores, avx2")
    hinted = _manifest(tiny_bundle, precision=Precision.INT8, speed=(speed,),
                       backend=BackendHint(preferred="onnxruntime", reason="ort 0.1 s"))
    c = choose_backend(hinted, "auto", "cpu", cpu_flags=avx2)
    assert c.backend == "onnxruntime" and "rule 4" in c.reason and "ort 0.1 s" in c.reason
    assert choose_backend(hinted, "openvino", "cpu").backend == "openvino"  # explicit wins
    with pytest.raises(BadInput, match="backend 'tensorrt'"):
        choose_backend(fp32, "tensorrt", "cpu")
    with pytest.raises(BadInput, match="openvino"):
        choose_backend(fp32, "openvino", "cuda")


def test_bf16_precision_hint_follows_the_cpu():
    from sdedge.runtime.backends.openvino import cpu_has_bf16, inference_precision

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = ("avx512_bf16" in flags) or ("amx_bf16" in flags)
    assert cpu_has_bf16() == native
    hint, why = inference_precision(Precision.BF16)
    if native:
        assert hint == "bf16"
    else:
        assert hint == "f32" and "no native bf16" in why
    assert inference_precision(Precision.FP32)[0] == "f32"  # bf16 only when asked (auto rule, hint)


def test_cli_generate_backend_openvino(tiny_bundle, tmp_path, cache):
    out = tmp_path / "o.png"
    r = run_cli("generate", str(tiny_bundle), "a red circle", "--backend", "openvino", "--steps", "2", "--seed", "1",
                "--verify", "off", "--out", str(out), "-v", env={"SDEDGE_CACHE_DIR": str(cache.parent)})
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "backend openvino:CPU (asked for openvino)" in r.stderr


def test_runtime_with_openvino_imports_no_torch(tiny_bundle, tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from sdedge.runtime.pipeline import Pipeline\n"
        f"p = Pipeline.load({str(tiny_bundle)!r}, backend='openvino', verify='off')\n"
        "p.generate('a', steps=1, seed=0)\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'nncf') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={"SDEDGE_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode == 0, r.stderr
