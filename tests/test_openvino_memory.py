"""The OpenVINO engine's memory (issue 19's peak RSS goal for the fast int8 bundle): freed heap pages handed back
after each compile, and the fp32 components of an int8 bundle whose UNet is an OpenVINO IR held as fp16 under bf16
compute, as those of an fp32 bundle are."""

from __future__ import annotations

import ctypes.util
import dataclasses
from pathlib import Path

import pytest

from sdedge.runtime.bundle import Bundle
from sdedge.runtime.manifest import Precision
from sdedge.runtime.memory import release_freed_memory

ov = pytest.importorskip("openvino")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists() or not ctypes.util.find_library("c"),
                    reason="Linux and a C library with malloc_trim")
def test_release_freed_memory_hands_heap_pages_back():
    """200 MB of 96 KB buffers (under glibc's mmap threshold: on the heap, as most weights are) freed but for the
    last one, which pins the heap's top: the resident set stays up until release_freed_memory."""
    chunks = [b"\x01" * (96 << 10) for _ in range(2100)]
    keep = chunks[-1]
    before = _rss()
    del chunks
    after_free = _rss()
    release_freed_memory()
    trimmed = _rss()
    assert len(keep) == 96 << 10
    assert before - after_free < 50e6, "freed heap buffers went back without a trim: this test measures nothing"
    assert after_free - trimmed > 150e6, (before, after_free, trimmed)


def _int8_ir_manifest(tiny_bundle):
    m = Bundle.open(tiny_bundle).manifest
    unet = dataclasses.replace(m.components["unet"], openvino_ir=("unet/openvino_int8.xml", "unet/openvino_int8.bin"))
    return dataclasses.replace(m, precision=Precision.INT8, components={**m.components, "unet": unet})


def test_float_onnx_of_an_int8_bundle(tiny_bundle):
    """--int8-method openvino quantizes only the UNet's IR: the other components are the fp32 export's ONNX, recorded
    without a precision of their own. A QDQ int8 bundle (no IR) keeps its int8 components' constants as they are."""
    from sdedge.runtime.backends.openvino import _float_onnx

    ir = _int8_ir_manifest(tiny_bundle)
    assert _float_onnx(ir.components["text_encoder"], ir) and _float_onnx(ir.components["vae_decoder"], ir)
    qdq = dataclasses.replace(ir, components={**ir.components, "unet": dataclasses.replace(
        ir.components["unet"], openvino_ir=())})
    assert not _float_onnx(qdq.components["text_encoder"], qdq)
    marked = dataclasses.replace(qdq.components["text_encoder"], precision=Precision.FP32)
    assert _float_onnx(marked, qdq)
    fp32 = Bundle.open(tiny_bundle).manifest
    assert _float_onnx(fp32.components["unet"], fp32)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or not any(
    f in Path("/proc/cpuinfo").read_text() for f in ("avx512_bf16", "amx_bf16")), reason="needs a CPU with native bf16")
def test_int8_ir_bundle_text_encoder_held_fp16_and_heap_trimmed(tiny_bundle, monkeypatch):
    """The int8-IR bundle's text encoder (fp32 ONNX, bf16 compute) is compiled from fp16 constants, and every compile
    hands the heap's free pages back."""
    from sdedge.runtime.backends import openvino as ov_backend

    monkeypatch.setenv("SDEDGE_CACHE_DIR", "")
    trims = []
    monkeypatch.setattr(ov_backend, "release_freed_memory", lambda: trims.append(1))
    bundle = Bundle(root=Path(tiny_bundle), manifest=_int8_ir_manifest(tiny_bundle))
    engine = ov_backend.OvEngine(bundle, "text_encoder", bundle.manifest.components["text_encoder"])
    engine.load()
    assert engine.config["INFERENCE_PRECISION_HINT"] == "bf16" and engine.fp16_weights
    shapes = tuple(tuple(2 if isinstance(d, str) else d for d in t.shape) for t in engine.info.inputs)
    engine.prepare(shapes)
    assert engine.compiles == 1 and len(trims) == 1


def test_prepare_compiles_the_unet_first(tiny_bundle, monkeypatch):
    """The UNet's compile or import needs the most transient memory: prepared before the others, its peak does not
    add to what they hold."""
    from sdedge.runtime.backends import openvino as ov_backend
    from sdedge.runtime.pipeline import Pipeline

    monkeypatch.setenv("SDEDGE_CACHE_DIR", "")
    order = []
    real = ov_backend.OvEngine.prepare
    monkeypatch.setattr(ov_backend.OvEngine, "prepare", lambda self, shapes: (order.append(self.name), real(self, shapes)))
    Pipeline.load(tiny_bundle, backend="openvino", verify="off")
    assert order[0] == "unet" and {"text_encoder", "vae_decoder"} <= set(order[1:]), order
