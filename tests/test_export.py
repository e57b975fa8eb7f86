"""Export of the tiny base to a bundle: files, manifest, parity figures, atomic writes, clear refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import run_cli

from sdedge.cli import main as sdedge_main
from sdedge.runtime.bundle import Bundle, sha256_file
from sdedge.runtime.manifest import COMPONENTS, MANIFEST_NAME

SD15_COMPONENTS = tuple(c for c in COMPONENTS if c != "text_encoder_2")  # text_encoder_2: SDXL's (test_sdxl.py)


def test_bundle_layout_and_hashes(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    m = bundle.manifest
    assert set(m.components) == set(SD15_COMPONENTS)
    on_disk = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()}
    assert on_disk - {MANIFEST_NAME} == set(m.files)  # every file listed, nothing unlisted
    for rel, entry in m.files.items():
        assert sha256_file(tiny_bundle / rel) == entry.sha256
        assert (tiny_bundle / rel).stat().st_size == entry.bytes
    assert (tiny_bundle / "tokenizer" / "tokenizer.json").is_file()
    assert not list(tiny_bundle.parent.glob(".tiny.tmp-*")), "staging folder left behind"


def test_onnx_graphs_have_opset_and_dynamic_axes(tiny_bundle):
    m = Bundle.open(tiny_bundle).manifest
    for name, comp in m.components.items():
        model = onnx.load(str(tiny_bundle / comp.file))
        onnx.checker.check_model(model)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        first = model.graph.input[0].type.tensor_type.shape.dim
        assert first[0].dim_param == "batch", name
    unet = onnx.load(str(tiny_bundle / "unet/model.onnx"))
    dims = [d.dim_param for d in unet.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "latent_height", "latent_width"]


def test_parity_recorded_and_within_gates(tiny_bundle):
    m = Bundle.open(tiny_bundle).manifest
    for name in SD15_COMPONENTS:
        p = m.parity.components[name]
        assert 0 <= p.max_abs_err <= 1e-3 and len(p.shapes) == 2
    assert m.parity.image is not None and m.parity.image.psnr_db >= 40
    prov = m.provenance
    assert len(prov.base.sha256) == 64 and "torch" in prov.toolchain and "onnxruntime" in prov.toolchain


def test_external_data_is_consolidated_into_one_file(tmp_path):
    """A model whose tensors sit in several files (as the TorchScript exporter writes large models) ends in one."""
    from onnx import TensorProto, helper, numpy_helper

    from sdedge.export.onnx_export import EXTERNAL_DATA_NAME, consolidate_external_data

    w1 = numpy_helper.from_array(np.arange(2048, dtype=np.float32).reshape(32, 64), "w1")
    w2 = numpy_helper.from_array(np.ones((64, 8), dtype=np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(tmp_path.iterdir())) == 3
    files = consolidate_external_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", EXTERNAL_DATA_NAME])
    assert [p.name for p in files] == ["model.onnx", EXTERNAL_DATA_NAME]
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((1, 32), dtype=np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ np.arange(2048, dtype=np.float32).reshape(32, 64) @ np.ones((64, 8)), rtol=1e-5)


@pytest.mark.slow
def test_failed_parity_gate_leaves_no_bundle(tiny_base, tmp_path):
    from sdedge.export.build import ExportOptions, export_bundle
    from sdedge.export.onnx_export import ExportError

    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"dB PSNR against diffusers, under the gate of 1000 dB"):
        export_bundle(tiny_base, out, ExportOptions(min_psnr=1000, vae_encoder=False, parity_steps=2))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "a staging folder was left behind"


@pytest.mark.slow
def test_cli_refusals_exit_2_without_traceback(tiny_base, tmp_path):
    cases = [
        (["export", "--base", str(tiny_base), "--target", "trt", "--out", str(tmp_path / "t")], "TensorRT"),
        (["export", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "n")], "nope"),
        (["export", "--base", str(tiny_base), "--precision", "fp64", "--out", str(tmp_path / "p")], "fp64"),
        (["info", str(tmp_path)], "sdedge.json"),
    ]
    for args, needle in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "t").exists() and not (tmp_path / "p").exists()


def test_existing_output_is_not_clobbered(tiny_base, tmp_path, capsys):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = sdedge_main(["export", "--base", str(tiny_base), "--out", str(out)])  # in this process: no start-up
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_info_shows_parity_and_json(tiny_bundle):
    r = run_cli("info", str(tiny_bundle))
    assert r.returncode == 0, r.stderr
    assert "image parity vs diffusers" in r.stdout and "unet" in r.stdout
    r = run_cli("info", str(tiny_bundle), "--json")
    data = json.loads(r.stdout)
    assert (data["format"], data["version"]) == ("sdedge-bundle", 2) and data["precision"] == "fp32"


def test_bundle_is_readable_by_others(tiny_bundle):
    """Temp files are created private; the bundle a service user loads must not be."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    if umask & 0o044:
        pytest.skip(f"umask {umask:o} hides files from others anyway")
    for p in [tiny_bundle, *tiny_bundle.rglob("*")]:
        assert p.stat().st_mode & stat.S_IROTH, p


def test_tensorrt_probe_names_what_is_missing(tmp_path, monkeypatch):
    """No GPU here: the probe finds no nvidia-smi; with a stand-in nvidia-smi that lists a GPU (a real program
    run by the probe) only the missing packages remain."""
    from sdedge.runtime.backends import tensorrt_probe as probe
    from sdedge.runtime.errors import MissingDependency

    monkeypatch.setenv("PATH", str(tmp_path))
    missing = probe.missing_for_tensorrt()
    assert any("nvidia-smi not found" in m for m in missing) and probe.cuda_gpus() == []
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    assert probe.cuda_gpus() == ["GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"]
    with pytest.raises(MissingDependency) as exc:
        probe.require_tensorrt("--target trt")
    msg = str(exc.value)
    assert "a CUDA GPU" not in msg  # the stand-in driver lists one
    assert "pip install 'sdedge[trt]'" in msg and "import tensorrt failed" in msg


def test_trt_target_backend_and_build_engines_exit_2_and_write_nothing(tiny_bundle, tmp_path, capsys):
    """In this process (sdedge.cli.main): a fresh one would add only its start-up (test_cli_refusals_exit_2_without_
    traceback, slow, runs export --target trt as a process)."""
    out = tmp_path / "bundle-trt"
    cases = [
        ["export", "--base", str(tiny_bundle), "--target", "trt", "--precision", "fp16", "--out", str(out)],
        ["generate", str(tiny_bundle), "a red circle on a blue background", "--backend", "trt",
         "--out", str(tmp_path / "x.png")],
        ["build-engines", str(tiny_bundle), "--shapes", "64x64"],
    ]
    for args in cases:
        code = sdedge_main(args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert "TensorRT" in err and "missing:" in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "x.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert not (tiny_bundle / "engines").exists()


def test_the_default_steps_follow_the_scheduler_in_the_python_api_as_in_the_cli():
    """`ExportOptions(default_scheduler="lcm")` recorded 20 steps (the CLI alone chose 4): an LCM bundle made from
    Python ran 20 LCM steps by default."""
    from sdedge.export.options import ExportOptions
    from sdedge.runtime.strict import from_dict  # how a bench suite reads its prepare steps' options

    assert ExportOptions(default_scheduler="lcm").default_steps == 4
    assert ExportOptions().default_steps == 20 and ExportOptions(default_scheduler="euler").default_steps == 20
    assert ExportOptions(default_scheduler="lcm", default_steps=6).default_steps == 6
    assert from_dict(ExportOptions, {"default_scheduler": "lcm"}, "prepare").default_steps == 4


def test_the_default_size_lies_in_the_exported_range():
    """sdxl-arch exported with --size-range 512-512 recorded the native 1024² as its default size: a request with no
    size was refused by its own bundle."""
    from types import SimpleNamespace

    from sdedge.export.options import ExportOptions
    from sdedge.export.pipeline_base import shape_range

    pipe = SimpleNamespace(vae_scale_factor=8, unet=SimpleNamespace(config=SimpleNamespace(
        sample_size=128, block_out_channels=(320, 640, 1280))))  # SDXL's: native 1024², multiple 32
    assert shape_range(pipe, ExportOptions()).default_width == 1024
    r = shape_range(pipe, ExportOptions(size_min=512, size_max=512))
    assert (r.default_width, r.default_height) == (512, 512)
    assert shape_range(pipe, ExportOptions(size_min=1280, size_max=2048)).default_width == 1280
