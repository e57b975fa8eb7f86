"""The memory mechanisms that let sdxl-arch's export fit a 24 GB machine, checked on sdxl-tiny: fp16-exact weights
parked in fp16 while PyTorch does not run them (export/park.py) give the same bundle as an unparked export, and the
external-data consolidation copies tensors file to file; the SDXL default guidance (diffusers' 5.0)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sdedge.export.park import PARKED, park, park_pipeline, unpark, unparked  # noqa: E402


def _mixed_module():
    """A Linear whose weight fp16 represents exactly and whose bias it does not."""
    lin = torch.nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).half().float())
        lin.bias.copy_(torch.tensor([0.1, 1 / 3, 1e-9, 70000.0]))  # none of them fp16-exact
    return lin


def test_park_keeps_only_exact_weights_and_restores_them_bit_for_bit():
    lin = _mixed_module()
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    assert park(lin) == 4 * 8 * 2  # the weight's bytes in fp16; the bias stays fp32
    assert lin.weight.dtype == torch.float16 and lin.bias.dtype == torch.float32
    assert getattr(lin, PARKED) == {"weight"}
    with pytest.raises(RuntimeError):  # a parked model cannot run by mistake on fp16 values
        lin(torch.ones(1, 8))
    assert unpark(lin) == {"weight"} and getattr(lin, PARKED) == set()
    for k, v in lin.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k
    park(lin)
    with unparked(lin) as repark:
        y = lin(torch.ones(1, 8))  # fp32 inside the block
        repark()
        assert lin.weight.dtype == torch.float16
    assert lin.weight.dtype == torch.float16 and torch.equal(y, torch.ones(1, 8) @ before["weight"].T + before["bias"])


@pytest.fixture(scope="module")
def fp16_base(tmp_path_factory):
    """sdxl-tiny saved in fp16 (as SDXL is distributed): its fp32 pipeline holds fp16-exact weights."""
    from sdedge.export.bases import load_base, write_builtin_base

    work = tmp_path_factory.mktemp("sdxl-park")
    pipe = load_base(write_builtin_base("sdxl-tiny", work / "fp32", seed=0))
    pipe.to(torch.float16).save_pretrained(str(work / "fp16"), safe_serialization=True)
    return work / "fp16"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # two sdxl-tiny exports, ~30 s
def test_a_parked_export_writes_the_same_bundle(fp16_base, tmp_path, monkeypatch):
    from sdedge.export import pipeline_base
    from sdedge.export.bases import load_base
    from sdedge.export.build import ExportOptions, export_bundle
    from sdedge.runtime.stages import Stages

    pipe = load_base(fp16_base)
    total = sum(p.numel() * 4 for p in pipe.unet.parameters())
    assert park_pipeline(pipe) >= total // 2  # every weight of an fp16 base is fp16-exact (the UNet's half freed)
    opts = ExportOptions(overwrite=True, parity_steps=2, vae_encoder=False)
    plain = export_bundle(fp16_base, tmp_path / "plain", opts)
    monkeypatch.setattr(pipeline_base, "PARK_ABOVE_BYTES", 0)  # park this small base as a large one is
    stages = Stages(quiet=True)
    parked = export_bundle(fp16_base, tmp_path / "parked", opts, stages)
    assert any(label.startswith("park the fp16-exact weights") for label in stages.seconds), stages.seconds
    for name in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):  # the same traced weights and graph
        assert _sha(tmp_path / "parked" / name / "model.onnx") == _sha(tmp_path / "plain" / name / "model.onnx"), name
        assert parked.parity.components[name] == plain.parity.components[name], name
    # the parked export's runtime runs one component at a time (memory="low"): ONNX Runtime's image then differs
    # from the normal mode's in the last bits (133.04 vs 133.12 dB measured); diffusers' is the same
    a, b = parked.parity.image, plain.parity.image
    assert a.psnr_db >= 40.0 and abs(a.psnr_db - b.psnr_db) < 1.0 and (a.steps, a.width) == (b.steps, b.width)
    assert parked.defaults.guidance == 5.0  # StableDiffusionXLPipeline's default


def test_sdxl_bases_default_to_diffusers_guidance(fp16_base, tmp_path):
    from sdedge.export.bases import write_builtin_base
    from sdedge.export.sdxl_base import base_guidance

    assert base_guidance(fp16_base) == 5.0
    assert base_guidance(tmp_path / "model.safetensors", config=fp16_base) == 5.0  # a single file: its --config
    sd = write_builtin_base("tiny-random", tmp_path / "sd", seed=0)
    assert base_guidance(sd) == 7.5 and base_guidance(tmp_path / "x.safetensors", config=sd) == 7.5


def test_consolidated_tensors_are_page_aligned_and_intact(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import ExternalDataInfo

    from sdedge.export.onnx_export import DATA_ALIGNMENT, EXTERNAL_DATA_NAME, consolidate_external_data

    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(shape).astype(np.float32) for shape in ((16, 33), (33, 7), (7, 5))]
    names = ["w0", "w1", "w2"]
    nodes = [helper.make_node("MatMul", [i, w], [o]) for i, w, o in zip(["x", "h0", "h1"], names, ["h0", "h1", "y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
                              [numpy_helper.from_array(w, n) for w, n in zip(ws, names)])
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    consolidate_external_data(path)
    model = onnx.load(str(path), load_external_data=False)
    infos = [ExternalDataInfo(t) for t in model.graph.initializer]
    assert {i.location for i in infos} == {EXTERNAL_DATA_NAME}
    assert [i.offset % DATA_ALIGNMENT for i in infos] == [0, 0, 0] and [i.length for i in infos] == [w.nbytes for w in ws]
    x = rng.standard_normal((2, 16)).astype(np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ ws[0] @ ws[1] @ ws[2], rtol=1e-5)


def test_large_external_data_is_read_by_onnx_runtime_from_a_checked_private_copy(tiny_bundle, tmp_path, monkeypatch):
    """Over LARGE_EXTERNAL_BYTES (SDXL's UNet) ONNX Runtime reads a checked copy by path, not the bytes from memory
    (which it copies: 2.1x the weights at load); a file swapped in the bundle after the check is not what runs."""
    import onnxruntime as ort
    from test_security_runtime import DATA, _copy, _engine, _externalise, _run

    from sdedge.runtime.backends import onnxruntime as ort_backend
    from sdedge.runtime.errors import BundleError

    out = _copy(tiny_bundle, tmp_path)
    _externalise(out)
    reference = _run(_engine(out))  # the bytes from memory, as below the limit
    monkeypatch.setattr(ort_backend, "LARGE_EXTERNAL_BYTES", 0)
    real, paths = ort.InferenceSession, []

    def swapping(model, *args, **kw):  # after the check, before ONNX Runtime reads: the bundle's weights become zeros
        paths.append(model)
        (out / DATA).write_bytes(bytes((out / DATA).stat().st_size))
        return real(model, *args, **kw)

    monkeypatch.setattr(ort, "InferenceSession", swapping)
    np.testing.assert_array_equal(_run(_engine(out)), reference)
    assert len(paths) == 1 and isinstance(paths[0], str) and "sdedge-ort-vae_decoder-" in paths[0], paths
    assert not Path(paths[0]).parent.exists()  # the private copy is gone once the session holds the weights
    with pytest.raises(BundleError, match=r"model\.onnx\.data: SHA-256 differs"):
        _engine(out).load()
