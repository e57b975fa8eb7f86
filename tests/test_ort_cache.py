"""ONNX Runtime's optimised graph, cached per machine: the second load opens it with optimisation off and gives
the same outputs; a damaged entry is rebuilt, never run; a tampered bundle is refused even with a warm cache."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from sdedge.runtime.backends.onnxruntime import OrtEngine
from sdedge.runtime.bundle import Bundle
from sdedge.runtime.errors import BundleError
from sdedge.runtime.pipeline import Pipeline

CPU = ["CPUExecutionProvider"]


def _unet(bundle_dir, cache):
    bundle = Bundle.open(bundle_dir)
    return OrtEngine(bundle, "unet", bundle.manifest.components["unet"], CPU, threads=1, cache_dir=cache)


def _run(engine, feeds):
    engine.load()
    try:
        return engine.infer(feeds)[0]
    finally:
        engine.unload()


@pytest.fixture()
def feeds(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    info = bundle.manifest.components["unet"]
    rng = np.random.default_rng(0)
    out = {}
    for t in info.inputs:
        if t.name == "timestep":
            out[t.name] = np.array([500, 500], dtype=t.dtype)
        elif t.name == "sample":
            out[t.name] = rng.standard_normal((2, 4, 16, 16)).astype(t.dtype)
        else:
            dim = info.inputs[-1].shape[-1] if isinstance(info.inputs[-1].shape[-1], int) else 64
            out[t.name] = rng.standard_normal((2, 77, dim)).astype(t.dtype)
    return out


def test_second_load_opens_the_cached_graph_with_the_same_outputs(tiny_bundle, tmp_path, feeds):
    cache = tmp_path / "cache"
    plain = _run(_unet(tiny_bundle, None), feeds)
    first = _unet(tiny_bundle, cache)
    out1 = _run(first, feeds)
    assert not first.cache_hit
    entries = sorted(p.name for p in cache.iterdir())
    assert any(n.endswith(".onnx") for n in entries) and any(n.endswith(".json") for n in entries)
    assert not [n for n in entries if ".sdedge-" in n], "scratch folder left in the cache"
    second = _unet(tiny_bundle, cache)
    out2 = _run(second, feeds)
    assert second.cache_hit
    np.testing.assert_array_equal(out1, plain)
    np.testing.assert_array_equal(out2, plain)  # the same graph, optimised once


def test_damaged_entry_is_rebuilt_not_run(tiny_bundle, tmp_path, feeds, caplog):
    cache = tmp_path / "cache"
    plain = _run(_unet(tiny_bundle, cache), feeds)
    model = next(p for p in cache.iterdir() if p.suffix == ".onnx")
    data = model.with_name(model.name + ".data")
    target = data if data.is_file() else model
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    engine = _unet(tiny_bundle, cache)
    with caplog.at_level(logging.WARNING, logger="sdedge.runtime"):
        out = _run(engine, feeds)
    assert not engine.cache_hit and "does not match its SHA-256" in caplog.text
    np.testing.assert_array_equal(out, plain)
    again = _unet(tiny_bundle, cache)
    np.testing.assert_array_equal(_run(again, feeds), plain)
    assert again.cache_hit  # rewritten by the rebuild


def test_tampered_bundle_is_refused_with_a_warm_cache(tiny_bundle, tmp_path, feeds):
    cache = tmp_path / "cache"
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    _run(_unet(copy, cache), feeds)
    path = copy / "unet" / "model.onnx"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="SHA-256"):
        _unet(copy, cache).load()


def test_cache_off_and_pipeline_loads(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("SDEDGE_CACHE_DIR", "")
    engine = _unet(tiny_bundle, True)
    engine.load()
    assert not engine.cache_hit and engine._cache_entry() is None
    engine.unload()
    monkeypatch.setenv("SDEDGE_CACHE_DIR", str(tmp_path / "c"))
    kw = dict(steps=3, guidance=7.5, seed=1, width=64, height=64, scheduler="ddim")
    pipe = Pipeline.load(tiny_bundle, backend="onnxruntime", device="cpu", verify="off")
    first = pipe("a red circle", **kw)[0]
    assert not any(e.cache_hit for e in pipe.engines.values())
    pipe.close()
    pipe = Pipeline.load(tiny_bundle, backend="onnxruntime", device="cpu", verify="off")
    second = pipe("a red circle", **kw)[0]
    loaded = [e for e in pipe.engines.values() if e.loaded]
    assert pipe.engines["unet"] in loaded and all(e.cache_hit for e in loaded)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    pipe.close()
