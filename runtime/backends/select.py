"""Which backend runs a bundle: `--backend auto | onnxruntime | openvino`, and the engines for it.

Both backends give one engine per component with the same lifecycle (`load()`, `infer(feeds) -> [arrays]`,
`unload()`, `loaded`), so the pipeline does not know which it holds.

The `auto` rule, in order (the first that applies decides; the reason is logged):
1. device "cuda", or device "auto" with a CUDA provider in onnxruntime: ONNX Runtime on CUDA (the GPU path).
2. OpenVINO not installed: ONNX Runtime, with a hint to install `sdedge[openvino]` for reduced-precision bundles.
3. The bundle records a backend measured fastest at export (`backend.preferred`, from the speed gate on the
   exporting machine): that one.
4. By precision: fp32 → ONNX Runtime (as fast as OpenVINO in fp32 and a smaller peak RSS); bf16, weight-only
   int8 and static int8 → OpenVINO (ONNX Runtime has no bf16 CPU kernels, decompresses int8 weights per
   call rather than in its kernels, and runs static int8 slower than OpenVINO); fp16 → OpenVINO (ONNX
   Runtime's CPU provider has few fp16 kernels and casts around the rest).
An explicit `onnxruntime` or `openvino` is obeyed, or refused with the reason (never a silent fallback).
`trt` is refused with exit code 2 naming what is missing (tensorrt_probe.py); TensorRT engines are not built yet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..bundle import Bundle
from ..errors import BadInput, MissingDependency
from ..manifest import ComponentInfo, Manifest, Precision

log = logging.getLogger("sdedge.runtime")

BACKENDS = ("auto", "onnxruntime", "openvino", "trt")
OPENVINO_PRECISIONS = (Precision.BF16, Precision.INT8_WEIGHTS, Precision.INT8, Precision.FP16)


class Engine(Protocol):
    name: str

    @property
    def loaded(self) -> bool: ...

    def load(self) -> None: ...

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def unload(self) -> None: ...


EngineFactory = Callable[[Bundle, str, ComponentInfo], Any]


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "onnxruntime" | "openvino"
    device: str  # "cpu" | "cuda"
    reason: str
    providers: tuple[str, ...] = ()  # onnxruntime's execution providers

    @property
    def label(self) -> str:
        return f"onnxruntime:{self.providers[0]}" if self.backend == "onnxruntime" else f"openvino:{self.device.upper()}"


def choose_backend(manifest: Manifest, backend: str = "auto", device: str = "auto") -> BackendChoice:
    """Apply the documented rule (module docstring) for this bundle and device."""
    from .onnxruntime import available_providers, choose_providers
    from .openvino import openvino_available

    if backend not in BACKENDS:
        raise BadInput(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if device not in ("auto", "cpu", "cuda"):
        raise BadInput(f"device {device!r}: choose one of auto, cpu, cuda")
    precision = manifest.precision
    if backend == "trt":
        from .tensorrt_probe import require_tensorrt

        require_tensorrt("--backend trt")
        raise MissingDependency("--backend trt: this sdedge version has no TensorRT engine runner yet, and this bundle "
                                "has no engines/ folder; use --backend onnxruntime --device cuda on this GPU")
    if backend == "openvino":
        if device == "cuda":
            raise BadInput("backend 'openvino' runs on the CPU here; use --backend onnxruntime for --device cuda")
        if not openvino_available():
            raise MissingDependency("backend 'openvino' needs the OpenVINO runtime: pip install 'sdedge[openvino]'")
        return BackendChoice("openvino", "cpu", "asked for openvino")
    if backend == "onnxruntime":
        providers, why = choose_providers(device)
        return BackendChoice("onnxruntime", "cuda" if "CUDA" in providers[0] else "cpu", f"asked for onnxruntime; {why}",
                             tuple(providers))
    # auto
    if device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available_providers()):
        providers, why = choose_providers(device)
        return BackendChoice("onnxruntime", "cuda", f"rule 1: a CUDA device ({why})", tuple(providers))
    cpu = ("CPUExecutionProvider",)
    if not openvino_available():
        hint = "" if precision is Precision.FP32 else (
            f"; a {precision.value} bundle runs faster on OpenVINO: pip install 'sdedge[openvino]'")
        return BackendChoice("onnxruntime", "cpu", f"rule 2: OpenVINO is not installed{hint}", cpu)
    hint = manifest.backend
    if hint.preferred in ("onnxruntime", "openvino"):
        why = f"rule 3: measured fastest at export ({hint.reason})" if hint.reason else "rule 3: the bundle's preference"
        return BackendChoice(hint.preferred, "cpu", why, cpu if hint.preferred == "onnxruntime" else ())
    if precision in OPENVINO_PRECISIONS:
        return BackendChoice("openvino", "cpu", f"rule 4: a {precision.value} bundle runs fastest on OpenVINO")
    return BackendChoice("onnxruntime", "cpu", "rule 4: an fp32 bundle; ONNX Runtime is as fast as OpenVINO in fp32 "
                         "with a smaller peak memory", cpu)


def engine_factory(choice: BackendChoice, manifest: Manifest, *, threads: int | None = None,
                   low_memory: bool = False, cache_dir: Any = True) -> EngineFactory:
    """A function (bundle, component name, component info) -> engine for the chosen backend."""
    if choice.backend == "openvino":
        from .openvino import OvEngine

        hint = manifest.backend.openvino_inference_precision

        def make_ov(bundle: Bundle, name: str, info: ComponentInfo):
            return OvEngine(bundle, name, info, threads=threads, precision_hint=hint, cache_dir=cache_dir,
                            low_memory=low_memory)

        return make_ov
    from .onnxruntime import OrtEngine

    providers = list(choice.providers)

    def make_ort(bundle: Bundle, name: str, info: ComponentInfo):
        return OrtEngine(bundle, name, info, providers, threads, low_memory=low_memory, cache_dir=cache_dir)

    return make_ort
