"""Which backend runs a bundle: `--backend auto | onnxruntime | openvino | trt`, and the engines for it.

Every backend gives one engine per component with the same lifecycle (`load()`, `infer(feeds) -> [arrays]`,
`unload()`, `loaded`), so the pipeline does not know which it holds.

The `auto` rule tries the GPU first, then the CPU; the first rule that applies decides, and the choice keeps
the reason for it and for every candidate passed over (`BackendChoice.skipped`; the pipeline logs both and
`sdedge generate` prints them):
1. TensorRT, when it is usable here (tensorrt_probe.py) and the bundle has engines for this GPU. This version
   builds none (issue #5: the engine builder waits for a GPU session), so today this rule only says why not.
2. A CUDA provider in onnxruntime (onnxruntime-gpu on a CUDA machine), or device "cuda": ONNX Runtime on the
   GPU, through its TensorRT provider first when the build has it (it builds and caches engines itself), then
   CUDA, then the CPU for any node neither takes.
3. OpenVINO not installed: ONNX Runtime on the CPU, with a hint to install `sdedge[openvino]` for
   reduced-precision bundles.
4. The bundle records a backend measured fastest at export (`backend.preferred`, from the speed gate on the
   exporting machine): that one.
5. By precision: fp32 → ONNX Runtime (as fast as OpenVINO in fp32 and a smaller peak RSS); bf16, weight-only
   int8 and static int8 → OpenVINO (ONNX Runtime has no bf16 CPU kernels, decompresses int8 weights per
   call rather than in its kernels, and runs static int8 slower than OpenVINO); fp16 → OpenVINO (ONNX
   Runtime's CPU provider has few fp16 kernels and casts around the rest).
With device "cpu" rules 1 and 2 are passed over. An explicit `onnxruntime` or `openvino` is obeyed, or refused
with the reason (never a silent fallback); `trt` is refused with exit code 2 naming what is missing.
"""

from __future__ import annotations

import dataclasses
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
DEVICES = ("auto", "cpu", "cuda")
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
    skipped: tuple[str, ...] = ()  # the candidates `auto` passed over, each with why

    @property
    def label(self) -> str:
        return f"onnxruntime:{self.providers[0]}" if self.backend == "onnxruntime" else f"openvino:{self.device.upper()}"


def choose_backend(manifest: Manifest, backend: str = "auto", device: str = "auto") -> BackendChoice:
    """Apply the documented rule (module docstring) for this bundle and device."""
    from .onnxruntime import available_providers, choose_providers
    from .openvino import openvino_available

    if backend not in BACKENDS:
        raise BadInput(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise BadInput(f"device {device!r}: choose one of {', '.join(DEVICES)}")
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
        on_gpu = providers[0] != "CPUExecutionProvider"
        return BackendChoice("onnxruntime", "cuda" if on_gpu else "cpu", f"asked for onnxruntime; {why}",
                             tuple(providers))
    # auto
    skipped = _gpu_passed_over(device)
    have = available_providers()
    if device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in have):
        providers, why = choose_providers(device, have)
        return BackendChoice("onnxruntime", "cuda", f"rule 2: a CUDA device ({why})", tuple(providers),
                             tuple(skipped))
    if device == "auto":
        skipped.append(f"ONNX Runtime on CUDA: this onnxruntime build has no CUDA provider "
                       f"({', '.join(have)}); on a CUDA machine: pip install 'sdedge[gpu]'")
    choice = _cpu_choice(manifest)
    return dataclasses.replace(choice, skipped=tuple(skipped))


def _gpu_passed_over(device: str) -> list[str]:
    """Rule 1: why TensorRT does not run this bundle here (one line), or why the GPU was not tried at all."""
    from .tensorrt_probe import missing_for_tensorrt

    if device == "cpu":
        return ["TensorRT and ONNX Runtime on CUDA: asked for the CPU"]
    missing = missing_for_tensorrt()
    if missing:
        return [f"TensorRT: missing {'; '.join(missing)}"]
    return ["TensorRT: usable here, but this sdedge version builds no TensorRT engines, so the bundle has none"]


def _cpu_choice(manifest: Manifest) -> BackendChoice:
    """Rules 3 to 5: the CPU backend for this bundle."""
    from .openvino import openvino_available

    precision = manifest.precision
    cpu = ("CPUExecutionProvider",)
    if not openvino_available():
        hint = "" if precision is Precision.FP32 else (
            f"; a {precision.value} bundle runs faster on OpenVINO: pip install 'sdedge[openvino]'")
        return BackendChoice("onnxruntime", "cpu", f"rule 3: OpenVINO is not installed{hint}", cpu)
    hint = manifest.backend
    if hint.preferred in ("onnxruntime", "openvino"):
        why = f"rule 4: measured fastest at export ({hint.reason})" if hint.reason else "rule 4: the bundle's preference"
        return BackendChoice(hint.preferred, "cpu", why, cpu if hint.preferred == "onnxruntime" else ())
    if precision in OPENVINO_PRECISIONS:
        return BackendChoice("openvino", "cpu", f"rule 5: a {precision.value} bundle runs fastest on OpenVINO")
    return BackendChoice("onnxruntime", "cpu", "rule 5: an fp32 bundle; ONNX Runtime is as fast as OpenVINO in fp32 "
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
