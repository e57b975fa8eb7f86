"""Static int8 as OpenVINO's own model (export/openvino_int8.py, issue 19 must 4): NNCF on the OpenVINO model read
from the fp32 bundle's ONNX, the IR stored in the bundle beside the unchanged fp32 ONNX UNet and hashed like every
file, its speed and parity gates recorded, tampering refused, and `auto`'s choice by the CPU's flags (injected with
SDEDGE_CPU_FLAGS) and the export's gates. Derived from the tiny fp32 bundle (no PyTorch); OpenVINO and NNCF run
for real."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from conftest import run_cli

pytest.importorskip("nncf")
pytest.importorskip("openvino")

from sdedge.export.build import ExportOptions, export_bundle  # noqa: E402
from sdedge.export.gates import GateFailed  # noqa: E402
from sdedge.export.openvino_int8 import IR_FILES  # noqa: E402
from sdedge.runtime.backends.select import INT8_IR_FLOOR, choose_backend, int8_ir_gate  # noqa: E402
from sdedge.runtime.bundle import Bundle  # noqa: E402
from sdedge.runtime.errors import BundleError  # noqa: E402
from sdedge.runtime.manifest import Precision  # noqa: E402
from sdedge.runtime.pipeline import Pipeline  # noqa: E402

PROMPT = "a red circle on a blue background"
VNNI = "avx2 avx512f avx512_vnni"  # a VNNI CPU without native bf16: rule 5 decides (the export measured elsewhere)
AVX2 = "avx2"
# the tiny UNet (32-64 channels) loses more to int8 than SD1.5's: 0.889 measured (8 prompts x 4 steps), 0.984 on sd15
TINY_FLOOR = 0.85


@pytest.fixture(scope="module")
def ir_bundle(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8-ir") / "bundle"
    export_bundle(tiny_bundle, out, ExportOptions(precision=Precision.INT8, int8_method="openvino", parity_steps=4,
                                                  calibration_steps=4, int8_samples=16, overwrite=True))
    return out


@pytest.mark.slow  # the module's bundle takes ~40 s to derive
def test_the_ir_is_in_the_bundle_hashed_beside_the_fp32_onnx(ir_bundle, tiny_bundle):
    m, fp32 = Bundle.open(ir_bundle).manifest, Bundle.open(tiny_bundle).manifest
    unet = m.components["unet"]
    assert m.precision is Precision.INT8 and unet.openvino_ir == IR_FILES
    for rel in IR_FILES:
        assert m.files[rel].bytes == (ir_bundle / rel).stat().st_size > 0
    xml = (ir_bundle / IR_FILES[0]).read_text()
    assert xml.count('type="FakeQuantize"') > 20 and 'element_type="i8"' in xml  # int8 activations, weights
    # the UNet's ONNX is the fp32 bundle's own file (ONNX Runtime runs it exactly)
    assert m.files[unet.file].sha256 == fp32.files[unet.file].sha256
    assert {r.backend for r in m.speed} == {"openvino", "onnxruntime"}
    assert "OpenVINO IR" in m.provenance.quantisation and m.sizes.after["unet"] > m.sizes.before["unet"]


@pytest.mark.slow
def test_parity_floor_and_openvino_reads_the_ir(ir_bundle, tiny_bundle):
    p = Bundle.open(ir_bundle).manifest.parity.precision
    assert p.backend == "openvino" and p.samples == 4
    assert TINY_FLOOR <= p.guided_cosine <= p.unet_cosine < 0.9999, p  # quantised: close, not identical
    assert p.image_psnr_db is not None and p.image_psnr_db > 15
    lat = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    images = {}
    for name, bundle, backend in (("ir", ir_bundle, "openvino"), ("fp32", tiny_bundle, "onnxruntime")):
        pipe = Pipeline.load(bundle, backend=backend, verify="off")
        images[name] = pipe.generate(PROMPT, "", steps=4, latents=lat, watermark=False).images
        if name == "ir":
            engine = pipe._load("unet")
            assert engine._source_files() == IR_FILES and engine.compiles + engine.cache_hits == 1
        pipe.close()
    mse = float(np.mean((images["ir"] - images["fp32"]) ** 2))
    assert 0 < mse < 10 ** (-15 / 10)  # within 15 dB of the fp32 image, and not the fp32 UNet run again


@pytest.mark.slow
@pytest.mark.parametrize("rel", IR_FILES)
def test_a_tampered_ir_is_refused(ir_bundle, tmp_path, rel, monkeypatch):
    monkeypatch.setenv("SDEDGE_CACHE_DIR", "")  # no compiled blob: the IR itself must be read and checked
    bad = tmp_path / "bad"
    shutil.copytree(ir_bundle, bad)
    data = bytearray((bad / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / rel).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{rel.split('/')[-1]}: SHA-256 differs"):
        pipe = Pipeline.load(bad, backend="openvino", verify="off")
        try:
            pipe.generate(PROMPT, "", steps=2, seed=0)
        finally:
            pipe.close()
    r = run_cli("generate", str(bad), PROMPT, "--backend", "openvino", "--steps", "2", "--out", str(tmp_path / "x.png"),
                env={"SDEDGE_CACHE_DIR": ""})
    assert r.returncode == 2 and "SHA-256 differs" in r.stderr and not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_auto_follows_the_flags_and_the_gates(ir_bundle, monkeypatch):
    m = Bundle.open(ir_bundle).manifest
    ok, figures = int8_ir_gate(m)
    measured = m.parity.precision.guided_cosine
    assert ok is (measured >= INT8_IR_FLOOR and m.speed[0].ratio > 1 and m.speed[0].seconds < m.speed[1].seconds)
    assert f"{measured:.4f}" in figures and m.backend.preferred == ("openvino" if ok else "onnxruntime")
    # The figures as if taken on a CPU with other flags than every case below (rule 4 would otherwise follow the
    # export's own measurement wherever the host's flags equal a case's, e.g. on an AVX2-only host).
    elsewhere = "a CPU of other flags, 2 cores, sse4_2"
    passing = dataclasses.replace(m, parity=dataclasses.replace(m.parity, precision=dataclasses.replace(
        m.parity.precision, guided_cosine=0.99)), speed=(
            dataclasses.replace(m.speed[0], seconds=0.001, ratio=5.0, machine=elsewhere),
            dataclasses.replace(m.speed[1], machine=elsewhere)))
    failing = dataclasses.replace(passing, parity=dataclasses.replace(passing.parity, precision=dataclasses.replace(
        passing.parity.precision, guided_cosine=0.9)))
    for flags, manifest, backend, words in (
            (VNNI, passing, "openvino", "avx512_vnni: OpenVINO's int8 kernels run the bundle's int8 IR"),
            (VNNI, failing, "onnxruntime", "do not favour the int8 IR"),
            (AVX2, passing, "onnxruntime", "no VNNI")):
        monkeypatch.setenv("SDEDGE_CPU_FLAGS", flags)
        choice = choose_backend(manifest, "auto", "cpu")
        assert choice.backend == backend and words in choice.reason, choice.reason
        assert choice.reason.startswith("rule 5: the export measured")  # measured on a CPU of other flags
    assert "under the parity floor" in choose_backend(failing, "auto", "cpu", cpu_flags=frozenset(VNNI.split())).reason
    assert "fp32 ONNX UNet exactly" in choose_backend(passing, "auto", "cpu", cpu_flags=frozenset({"avx2"})).reason


@pytest.mark.slow
def test_min_cosine_gate_fails_and_writes_nothing(tiny_bundle, tmp_path):
    out = tmp_path / "strict"
    opts = ExportOptions(precision=Precision.INT8, int8_method="openvino", parity_steps=2, calibration_steps=2,
                         int8_samples=4, speed_calls=1, min_cosine=0.99999)
    with pytest.raises(GateFailed, match=r"int8 \(OpenVINO IR\) bundle: the UNet's cosine after guidance is .*"
                                         r"under --min-cosine 0.99999"):
        export_bundle(tiny_bundle, out, opts)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name != "strict"]
