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
    from sdedge.runtime.pipeline import Pipeline

    second = Pipeline.load(tiny_bundle, backend="openvino", verify="off")  # the blob is imported at load
    assert {n: (e.compiles, e.cache_hits) for n, e in second.engines.items() if n != "vae_encoder"} == {
        "text_encoder": (0, 1), "unet": (0, 1), "vae_decoder": (0, 1)}
    lat = np.random.default_rng(3).standard_normal((1, 4, 16, 16), dtype=np.float32)
    second.generate("a red circle", steps=2, guidance=7.5, latents=lat, watermark=False)
    assert second.engines["unet"].compiles == 0 and second.engines["unet"].cache_hits == 1


@pytest.mark.slow  # 4-5 s; fast: test_compiled_model_cache_makes_second_load_skip_compiling
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


@pytest.mark.slow  # a new shape compiling again is in the fast lane: test_compiled_at_load_for_the_request_expected
# (compiles == 2); that two used shapes stay compiled side by side is checked here only
def test_new_shape_compiles_again(tiny_bundle, cache):
    from sdedge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_bundle, backend="openvino", verify="off")
    pipe.generate("a", steps=2, width=64, height=64, seed=1)
    pipe.generate("a", steps=2, width=128, height=64, seed=1)
    assert pipe.engines["unet"].compiles == 2 and len(pipe.engines["unet"].compiled) == 2


def test_compiled_at_load_for_the_request_expected(tiny_bundle, monkeypatch):
    """Compiled at load (the bundle's default request, or the size asked), so the first image compiles nothing; a
    prepared shape no call used is dropped when another comes (one compiled UNet held, not two)."""
    from sdedge.runtime.pipeline import Pipeline

    monkeypatch.setenv("SDEDGE_CACHE_DIR", "")
    pipe = Pipeline.load(tiny_bundle, backend="openvino", verify="off")  # default: 64x64, guidance 7.5, one image
    unet, decoder = pipe.engines["unet"], pipe.engines["vae_decoder"]
    assert list(unet.compiled) == [((2, 4, 16, 16), (2,), (2, 77, 64))] and unet.compiles == 1
    assert list(decoder.compiled) == [((1, 4, 16, 16),)] and pipe.load_seconds["unet"] > 0
    pipe.generate("a", steps=2, seed=1)
    assert unet.compiles == 1 and pipe.engines["text_encoder"].compiles == 1 and not unet.unrun
    sized = Pipeline.load(tiny_bundle, backend="openvino", verify="off",
                          prepare={"width": 128, "height": 64, "guidance": 1.0, "num_images": 2})
    assert list(sized.engines["unet"].compiled) == [((2, 4, 16, 32), (2,), (2, 77, 64))]
    assert list(sized.engines["text_encoder"].compiled) == [((2, 77),)]
    sized.generate("a", steps=2, width=64, height=64, seed=1)  # not what was prepared
    assert sized.engines["unet"].compiles == 2 and list(sized.engines["unet"].compiled) == [
        ((2, 4, 16, 16), (2,), (2, 77, 64))]
    assert not Pipeline.load(tiny_bundle, backend="openvino", verify="off", prepare=False).engines["unet"].compiled


MODEL_FILES = (".onnx", ".xml", ".bin", ".data", ".blob")


@pytest.mark.slow  # 5-9 s
def test_nothing_read_is_held_after_load(tiny_bundle, cache, monkeypatch):
    """After load (compiled, or imported from the cache) no ov.Model is alive and Python holds under a fifth of the
    model bytes it read (traced allocations: bytes, NumPy buffers): the compiled model is the one copy."""
    import gc
    import tracemalloc
    import weakref

    from sdedge.runtime.backends import openvino as ov_backend
    from sdedge.runtime.backends import ort_cache
    from sdedge.runtime.pipeline import Pipeline

    sizes, models = [], []

    def counted(fn):
        def wrapped(*args, **kw):
            out = fn(*args, **kw)
            if str(args[1]).endswith(MODEL_FILES):
                sizes.append(len(out))
            return out
        return wrapped

    def recorded(fn):
        def wrapped(*args, **kw):
            out = fn(*args, **kw)
            models.append(weakref.ref(out))
            return out
        return wrapped

    monkeypatch.setattr(Bundle, "read", counted(Bundle.read))
    monkeypatch.setattr(ort_cache, "read_nofollow", counted(ort_cache.read_nofollow))  # the cached blobs
    ov_core = ov_backend.core()
    monkeypatch.setattr(ov_backend, "core", lambda: _Recording(ov_core, recorded))
    for round_ in ("compiled", "imported"):
        sizes.clear(), models.clear(), gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            pipe = Pipeline.load(tiny_bundle, backend="openvino", verify="off")
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        unet = pipe.engines["unet"]
        assert (unet.compiles, unet.cache_hits) == ((1, 0) if round_ == "compiled" else (0, 1))
        assert len(sizes) >= 3 and held < sum(sizes) / 5, (round_, held, sizes)
        assert len(models) == (3 if round_ == "compiled" else 0) and all(m() is None for m in models)
        pipe.generate("a", steps=1, seed=0)
        pipe.close()


class _Recording:
    """openvino.Core with read_model wrapped (its models weakly referenced by the test)."""

    def __init__(self, core, wrap):
        self._core, self.read_model = core, wrap(core.read_model)

    def __getattr__(self, name):
        return getattr(self._core, name)


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


@pytest.mark.slow  # a CLI process: 2-4 s; fast: test_openvino_matches_onnxruntime
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


def test_external_data_is_copied_checked_and_only_the_copy_read(tiny_bundle, tmp_path, monkeypatch):
    """An ONNX model with external data (the SD1.5 UNet's case) is copied in chunks into a private folder, hashed as
    it is copied: a file changed in the bundle after that copy is not what runs, and a corrupt one is refused."""
    from test_security_runtime import DATA, LATENT, VAE, _copy, _externalise

    from sdedge.runtime.backends import openvino as ov_backend
    from sdedge.runtime.errors import BundleError

    def run(bundle_dir):
        bundle = Bundle.open(bundle_dir)
        engine = ov_backend.OvEngine(bundle, VAE, bundle.manifest.components[VAE], cache_dir=None)
        engine.prepare([LATENT.shape])  # compiled here, before any call
        assert engine.compiles == 1
        return engine.infer({"latent_sample": LATENT})[0]

    good = run(tiny_bundle)
    out = _copy(tiny_bundle, tmp_path)
    _externalise(out)
    real = Bundle.copy_checked
    swaps = []

    def then_swapped(bundle, rel, dest):  # the bundle's file becomes zeros right after the checked copy
        real(bundle, rel, dest)
        (out / DATA).write_bytes(bytes((out / DATA).stat().st_size))
        swaps.append(rel)

    monkeypatch.setattr(Bundle, "copy_checked", then_swapped)
    np.testing.assert_allclose(run(out), good, atol=1e-5)
    assert swaps == [DATA]
    monkeypatch.setattr(Bundle, "copy_checked", real)
    with pytest.raises(BundleError, match=r"model\.onnx\.data: SHA-256 differs"):  # the zeros, now read and checked
        run(out)


@pytest.mark.slow  # 5-7 s
@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or not any(
    f in Path("/proc/cpuinfo").read_text() for f in ("avx512_bf16", "amx_bf16")), reason="needs a CPU with native bf16")
def test_bf16_compute_holds_fp16_constants_within_parity(tiny_bundle, monkeypatch):
    """With bf16 compute the weights are held as fp16 (half the memory the plugin keeps, half the blob), the small
    constants as fp32: the image stays as close to ONNX Runtime fp32 as with fp32 constants. Measured on the tiny
    base (AMD EPYC, avx512_bf16, 12 steps): 46.8 dB either way, the two images identical (with every constant fp16,
    the time embedding's frequencies included: 46.6 dB)."""
    from sdedge.export.reference import psnr
    from sdedge.runtime.backends import openvino as ov_backend
    from sdedge.runtime.pipeline import Pipeline

    monkeypatch.setenv("SDEDGE_CACHE_DIR", "")
    lat = np.random.default_rng(3).standard_normal((1, 4, 16, 16), dtype=np.float32)
    kw = dict(steps=12, guidance=7.5, latents=lat, watermark=False)
    ref = Pipeline.load(tiny_bundle, backend="onnxruntime", verify="off").generate("a red circle", "", **kw).images
    images, keys = {}, {}
    for name in ("fp16", "fp32"):
        if name == "fp32":
            monkeypatch.setattr(ov_backend, "_fp16_pass", lambda: None)
        pipe = Pipeline.load(tiny_bundle, backend="openvino", precision_hint="bf16", verify="off")
        unet = pipe.engines["unet"]
        assert unet.fp16_weights == (name == "fp16") and unet.config["INFERENCE_PRECISION_HINT"] == "bf16"
        keys[name] = unet._cache_key(next(iter(unet.compiled)))
        images[name] = pipe.generate("a red circle", "", **kw).images
    exact = Pipeline.load(tiny_bundle, backend="openvino", precision_hint="fp32", verify="off")
    assert not exact.engines["unet"].fp16_weights  # exact fp32 compute keeps fp32 constants
    assert keys["fp16"] != keys["fp32"]  # a blob of one is never imported for the other
    fp16_db, fp32_db = psnr(images["fp16"], ref), psnr(images["fp32"], ref)
    assert 40.0 <= fp16_db < 90.0 and fp16_db >= fp32_db - 0.5, (fp16_db, fp32_db)
