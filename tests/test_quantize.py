"""Reduced-precision exports of the tiny base: what the files hold, and the parity, speed and size figures
recorded in the manifest, with gates that fail the export. Real engines (ONNX Runtime, OpenVINO, NNCF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cli

from sdedge.runtime.bundle import Bundle
from sdedge.runtime.manifest import Precision

FAST = dict(vae_encoder=False, parity_steps=3, speed_calls=1, calibration_steps=3, int8_samples=6, overwrite=True)


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "prompts.txt"
    p.write_text("# calibration prompts\na red circle\n\na blue square on green\n", encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def int8_bundle(tiny_base, prompts_file, tmp_path_factory) -> Path:
    pytest.importorskip("nncf")
    from sdedge.export.build import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "int8"
    export_bundle(tiny_base, out, ExportOptions(precision=Precision.INT8, calibration=str(prompts_file), **FAST))
    return out


@pytest.fixture(scope="session")
def wint8_bundle(tiny_base, tmp_path_factory) -> Path:
    from sdedge.export.build import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "wint8"
    export_bundle(tiny_base, out, ExportOptions(precision=Precision.INT8_WEIGHTS, **FAST))
    return out


def _ops(bundle: Path, name: str):
    from sdedge.export.graph_passes import count_ops

    return count_ops(onnx.load(str(bundle / f"{name}/model.onnx")))


@pytest.mark.slow  # the int8 bundles take ~45 s to export (module fixtures)
def test_static_int8_bundle(int8_bundle):
    m = Bundle.open(int8_bundle).manifest
    assert m.precision is Precision.INT8
    unet = _ops(int8_bundle, "unet")
    assert unet["QuantizeLinear"] > 10 and unet["DequantizeLinear"] > unet["QuantizeLinear"]  # activations + weights
    te = _ops(int8_bundle, "text_encoder")
    assert te["QuantizeLinear"] == 0 and te["DequantizeLinear"] > 0  # weight-only there
    assert m.components["text_encoder"].precision is Precision.INT8_WEIGHTS and m.components["unet"].precision is None
    assert m.provenance.calibration == "prompts.txt (2 prompts)"
    assert "static int8" in m.provenance.quantisation and m.provenance.export_peak_rss_bytes > 0


@pytest.mark.slow  # the int8 bundles take ~45 s to export (module fixtures)
def test_parity_figures_recorded(int8_bundle, wint8_bundle):
    q = Bundle.open(int8_bundle).manifest.parity.precision
    w = Bundle.open(wint8_bundle).manifest.parity.precision
    guidance = Bundle.open(int8_bundle).manifest.defaults.guidance  # the trained tiny base's default
    for p in (q, w):
        assert -1 <= p.guided_cosine <= p.unet_cosine <= 1.0 and p.samples == 3 and p.guidance == guidance
        assert p.image_psnr_db is not None and p.image_psnr_db > 10
    # weight-only int8 is the safe middle setting: nearly exact; static int8 of a tiny random UNet is not
    assert w.guided_cosine > 0.995 and w.image_psnr_db > 35
    assert q.unet_cosine < w.unet_cosine


@pytest.mark.slow  # the int8 bundles take ~45 s to export (module fixtures)
def test_speed_and_backend_hint_recorded(int8_bundle):
    m = Bundle.open(int8_bundle).manifest
    backends = {r.backend for r in m.speed}
    assert "onnxruntime" in backends and "openvino" in backends
    for r in m.speed:
        assert r.seconds > 0 and r.fp32_seconds > 0 and r.ratio == pytest.approx(r.fp32_seconds / r.seconds, rel=0.02)
        assert r.shape == "2x4x16x16" and "cores" in r.machine
    assert m.backend.preferred in backends and m.parity.precision.backend == m.backend.preferred
    assert "cosine after guidance" in m.backend.reason  # the choice weighs exactness, not speed alone


@pytest.mark.slow  # the int8 bundles take ~45 s to export (module fixtures)
def test_size_report(int8_bundle, wint8_bundle):
    for b in (int8_bundle, wint8_bundle):
        s = Bundle.open(b).manifest.sizes
        assert set(s.before) == set(s.after) == {"text_encoder", "unet", "vae_decoder", "total"}
        for name in ("text_encoder", "unet", "vae_decoder"):
            assert s.after[name] < 0.5 * s.before[name], name
        on_disk = sum(p.stat().st_size for p in b.rglob("*") if p.is_file() and p.name != "sdedge.json")
        assert s.after["total"] == on_disk


@pytest.mark.slow  # the int8 bundles take ~45 s to export (module fixtures)
def test_quantised_bundles_run_on_both_backends(int8_bundle):
    from sdedge.runtime.pipeline import Pipeline

    images = {}
    for backend in ("onnxruntime", "openvino"):
        pipe = Pipeline.load(int8_bundle, backend=backend, verify="off")
        images[backend] = pipe.generate("a red circle", steps=3, seed=5).images
        assert np.isfinite(images[backend]).all()
    auto = Pipeline.load(int8_bundle, verify="off")
    assert auto.backend.split(":")[0] == Bundle.open(int8_bundle).manifest.backend.preferred
    assert "rule 4" in auto.backend_reason


@pytest.mark.slow
def test_min_cosine_gate_fails_export_with_a_clear_message(tiny_base, tmp_path):
    from sdedge.export.build import ExportOptions, export_bundle
    from sdedge.export.gates import GateFailed

    out = tmp_path / "gated"
    with pytest.raises(GateFailed, match=r"cosine after guidance is 0\.\d+, under --min-cosine 0\.99999999"):
        export_bundle(tiny_base, out, ExportOptions(precision=Precision.INT8_WEIGHTS, min_cosine=0.99999999, **FAST))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no bundle, no staging folder, no reference run left


def test_cosine_after_guidance_at_guidance_1_compares_the_outputs_themselves():
    """An LCM bundle's gates run at guidance 1: one unguided UNet batch. Halving that batch compared two empty
    arrays, so every engine read cosine 1.0000 after guidance, however wrong (seen on the sd15 fast int8 bundle:
    raw cosine 0.984, 'after guidance' 1.0)."""
    from sdedge.export.gates import cosine, guided

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    out = ref + 0.5 * rng.standard_normal(ref.shape).astype(np.float32)
    assert cosine(guided(out, 1.0), guided(ref, 1.0)) == pytest.approx(cosine(out, ref))
    assert cosine(guided(out, 1.0), guided(ref, 1.0)) < 0.95
    pair = np.concatenate([ref, out])  # (2, 4, 8, 8): negative half, positive half
    np.testing.assert_allclose(guided(pair, 7.5), ref.astype(np.float64) + 7.5 * (out.astype(np.float64) - ref), rtol=1e-12)
    with pytest.raises(ValueError, match="guided UNet batch of 1"):
        guided(out, 7.5)


def test_check_gates_messages():
    from sdedge.export.gates import GateFailed, check_gates

    check_gates(guided_cosine=0.98, image_psnr_db=30.0, min_cosine=0.97, min_psnr=25.0, what="x")
    check_gates(guided_cosine=0.1, image_psnr_db=1.0, min_cosine=None, min_psnr=None, what="x")
    with pytest.raises(GateFailed, match=r"24\.0 dB PSNR .* under --min-psnr 25 dB"):
        check_gates(guided_cosine=0.98, image_psnr_db=24.0, min_cosine=0.97, min_psnr=25.0, what="x")


@pytest.mark.slow
def test_bf16_bundle_stores_fp16_weights_and_hints_bf16(tiny_base, tmp_path):
    from sdedge.export.build import ExportOptions, export_bundle

    out = tmp_path / "bf16"
    m = export_bundle(tiny_base, out, ExportOptions(precision=Precision.BF16, **{**FAST, "speed_calls": 1}))
    assert m.precision is Precision.BF16
    assert _ops(out, "unet")["Cast"] > 10
    assert m.sizes.after["unet"] < 0.6 * m.sizes.before["unet"]
    p = m.parity.precision
    assert p.guided_cosine > 0.999 and p.image_psnr_db > 35  # fp16 storage, and bf16 or fp32 compute


@pytest.mark.slow
def test_cli_export_int8_weights_prints_the_figures(tiny_base, tmp_path):
    out = tmp_path / "cli"
    r = run_cli("export", "--base", str(tiny_base), "--out", str(out), "--precision", "int8-weights",
                "--no-vae-encoder", "--parity-steps", "2", "--min-cosine", "0.99")
    assert r.returncode == 0, r.stderr
    assert "int8-weights vs fp32" in r.stderr and "cosine" in r.stderr
    assert "speed onnxruntime" in r.stderr and "speed openvino" in r.stderr
    import re

    assert re.search(r"size text_encoder [\d.]+ [kKM]i?B -> [\d.]+ [kKM]i?B, unet [\d.]+ [kKM]i?B -> ", r.stderr)
    # the trained tiny base: the prompt-match rate of the fp32 and the int8-weights bundle, by its shape classifier
    pm = Bundle.open(out).manifest.parity.prompt_match
    assert pm is not None and pm.prompts == 30 and "prompt match" in r.stderr
    assert pm.rate_fp32 >= 0.6 and pm.rate >= pm.rate_fp32 - 0.15, pm  # the base draws its prompts; int8-weights too


def test_calibration_is_streamed_to_disk(tiny_bundle, tmp_path, prompts_file):
    from sdedge.export.calibration import DEFAULT_PROMPTS, collect, read_prompts

    prompts, source = read_prompts(prompts_file)
    assert prompts == ("a red circle", "a blue square on green") and source == "prompts.txt (2 prompts)"
    assert read_prompts(None)[0] == DEFAULT_PROMPTS
    calib = collect(tiny_bundle, prompts, tmp_path / "c", steps=4, timesteps_per_prompt=2, source=source)
    assert len(calib) == 4 and all(f.is_file() and f.suffix == ".npz" for f in calib.files)
    first = next(iter(calib))
    assert set(first) == {"sample", "timestep", "encoder_hidden_states"}
    assert first["sample"].shape == (2, 4, 16, 16)  # the guided batch, as the engine sees it
    # step-major order: the first two files are the first recorded step of each prompt
    assert [f.name.split("-")[1] for f in calib.files[:2]] == ["p000", "p001"]
    ts = [float(s["timestep"][0]) for s in calib]
    assert len(set(ts)) == 2  # two timesteps spread over the schedule
    assert len(calib.subset(2)) == 2


def test_read_prompts_refuses_empty_or_missing(tmp_path):
    from sdedge.export.calibration import read_prompts
    from sdedge.runtime.errors import BadInput

    with pytest.raises(BadInput, match="no such file"):
        read_prompts(tmp_path / "nope.txt")
    (tmp_path / "e.txt").write_text("# only a comment\n\n")
    with pytest.raises(BadInput, match="no prompts"):
        read_prompts(tmp_path / "e.txt")


def test_fp16_keeps_io_fp32_and_sensitive_ops_fp32(tiny_bundle):
    from onnx import TensorProto

    from sdedge.export.quantize import load_model, to_fp16

    m = to_fp16(load_model(tiny_bundle / "unet/model.onnx"))
    assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in m.graph.input)
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in m.graph.output)
    assert any(i.data_type == TensorProto.FLOAT16 for i in m.graph.initializer)
    import onnxruntime as ort

    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32), "timestep": np.array([10, 10], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 64), dtype=np.float32)}
    ref = ort.InferenceSession(str(tiny_bundle / "unet/model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    out = sess.run(None, feeds)[0]
    assert out.dtype == np.float32
    assert float(np.sum(out * ref) / np.linalg.norm(out) / np.linalg.norm(ref)) > 0.999


@pytest.mark.slow
def test_derive_from_an_fp32_bundle(tiny_bundle, tmp_path):
    """`export --base <fp32 bundle>`: the precision stage alone, with the fp32 bundle as the reference; no
    PyTorch model is built (diffusers is never imported)."""
    import subprocess
    import sys

    out = tmp_path / "derived"
    code = (
        "import sys\n"
        "from sdedge.export.build import ExportOptions, export_bundle\n"
        "from sdedge.runtime.manifest import Precision\n"
        f"m = export_bundle({str(tiny_bundle)!r}, {str(out)!r}, ExportOptions(precision=Precision.INT8_WEIGHTS,"
        " parity_steps=3, speed_calls=1))\n"
        "assert 'diffusers' not in sys.modules, 'derive loaded diffusers'\n"
        "print(m.parity.precision.guided_cosine)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = Bundle.open(out).manifest
    assert m.precision is Precision.INT8_WEIGHTS and m.parity.precision.guided_cosine > 0.995
    assert m.parity.image is not None  # the fp32 bundle's own parity against diffusers is kept
    assert m.sizes.after["unet"] < 0.5 * m.sizes.before["unet"]


@pytest.mark.slow  # the int8 bundles take ~45 s to export (module fixtures)
def test_derive_refuses_prune_and_non_fp32_source(wint8_bundle, tiny_bundle, tmp_path):
    from sdedge.export.build import ExportOptions, export_bundle
    from sdedge.runtime.errors import BadInput

    with pytest.raises(BadInput, match="derive from an fp32 bundle"):
        export_bundle(wint8_bundle, tmp_path / "x", ExportOptions(precision=Precision.INT8))
    with pytest.raises(BadInput, match="--prune needs the PyTorch base"):
        export_bundle(tiny_bundle, tmp_path / "y", ExportOptions(precision=Precision.INT8, prune=0.3))


def test_activation_matmuls_are_found():
    from onnx import TensorProto, helper, numpy_helper

    from sdedge.export.quantize import activation_matmuls

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="linear"),
             helper.make_node("Transpose", ["w"], ["wt"], name="t"),
             helper.make_node("MatMul", ["h", "wt"], ["h2"], name="linear_t"),
             helper.make_node("MatMul", ["h2", "x"], ["y"], name="scores")]
    f = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4])  # noqa: E731
    m = helper.make_model(helper.make_graph(nodes, "g", [f("x")], [f("y")], [w]))
    assert activation_matmuls(m) == ["scores"]


def test_preferred_backend_is_the_fastest_of_the_exact_ones():
    from sdedge.export.gates import choose_preferred
    from sdedge.runtime.manifest import SpeedReport

    def r(b, s):
        return SpeedReport(backend=b, fp32_seconds=1.0, seconds=s, ratio=1 / s, calls=1, shape="x", threads=2, machine="m")

    fast, slow = r("openvino", 0.5), r("onnxruntime", 0.9)
    assert choose_preferred([fast, slow], {"openvino": 0.99, "onnxruntime": 0.995}, None) is fast
    assert choose_preferred([fast, slow], {"openvino": 0.29, "onnxruntime": 0.97}, None) is slow
    assert choose_preferred([fast, slow], {"openvino": 0.99, "onnxruntime": 0.995}, 0.993) is slow
    assert choose_preferred([fast, slow], {"openvino": 0.5, "onnxruntime": 0.6}, 0.9) is slow  # none meets: most exact
