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
3. OpenVINO not installed: ONNX Runtime on the CPU, with a hint to install `sdedge[openvino]` (naming the
   CPU's bf16 flag and the measured gain where it has one).
4. The bundle records a backend measured fastest at export (`backend.preferred`, from the speed and parity
   gates on the exporting machine) and every speed report's machine (`speed[].machine`, "model, N cores,
   avx2+avx512f+...") has the same engine flags as this CPU (native bf16, VNNI, AVX-512F, AVX2): that one.
   Measured on a CPU with other flags (or an unrecorded one), rule 5 decides and its reason says so.
5. By the CPU's flags (runtime/environment.py: BF16_FLAGS, VNNI_FLAGS) and the bundle's precision:
   - fp32 and bf16 bundles on a CPU with native bf16 (avx512_bf16, amx_bf16, amx_tile) → OpenVINO with
     INFERENCE_PRECISION_HINT "bf16": measured 5.2x ONNX Runtime fp32 on sd15-arch (one guided 256x256 UNet
     call on 2 AVX-512 BF16 cores, 0.91 s against 4.7 s, image 47.9 dB against fp32: issue 19,
     docs/cpu-engines.md); tiny base 46.8 dB against the fp32 image (tests/test_backend_choice.py);
   - fp32 elsewhere → ONNX Runtime, for its smaller peak RSS (FP32_MEASURED: OpenVINO fp32 was the faster in one
     512² run on an AVX2 CPU, ONNX Runtime in a 256² one; `--backend openvino` for OpenVINO); bf16 elsewhere →
     OpenVINO in f32 (at fp32 speed);
   - static int8 → OpenVINO only on a CPU with VNNI (avx512_vnni, avx_vnni, amx_int8), a UNet carrying an
     OpenVINO IR (NNCF on the OpenVINO model: export/openvino_int8.py) and the export's gates having measured
     that IR faster than the fp32 ONNX on OpenVINO and than ONNX Runtime fp32 at a cosine after guidance of at
     least its --min-cosine (else INT8_IR_FLOOR); otherwise ONNX Runtime, which runs such a bundle's fp32 ONNX
     UNet exactly, and the reason gives the figures. A QDQ ONNX UNet ran wrong on OpenVINO even with VNNI
     (cosine after guidance 0.63, issue 19) and without VNNI OpenVINO's u8xs8 kernels saturate: ONNX Runtime
     then too, and the reason says int8 is not the fast path there;
   - weight-only int8 → OpenVINO (ONNX Runtime decompresses the weights per call), bf16 compute where the
     CPU has it; fp16 → OpenVINO (ONNX Runtime's CPU provider has few fp16 kernels).
With device "cpu" rules 1 and 2 are passed over. An explicit `onnxruntime` or `openvino` is obeyed, or refused
with the reason (never a silent fallback); `trt` is refused with exit code 2 naming what is missing.
`precision_hint` (`sdedge generate --precision-hint`): "fp32" keeps exact fp32 compute (rule 5 as on a CPU
without bf16; `--backend openvino` compiles f32), "bf16" asks OpenVINO for bf16 compute.
Tests inject the CPU's flags with `cpu_flags=` or SDEDGE_CPU_FLAGS (rule_flags; for tests only: nothing
computes differently, OpenVINO still asks the real CPU, and provenance records the real flags).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..bundle import Bundle
from ..environment import BF16_FLAGS, VNNI_FLAGS, cpu_flags, engine_flags
from ..errors import BadInput, MissingDependency
from ..manifest import ComponentInfo, Manifest, Precision

log = logging.getLogger("sdedge.runtime")

BACKENDS = ("auto", "onnxruntime", "openvino", "trt")
DEVICES = ("auto", "cpu", "cuda")
PRECISION_HINTS = ("auto", "fp32", "bf16")
OV_HINTS = {"fp32": "f32", "bf16": "bf16"}  # --precision-hint -> OpenVINO INFERENCE_PRECISION_HINT
CPU = ("CPUExecutionProvider",)


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
    precision_hint: str | None = None  # OpenVINO's INFERENCE_PRECISION_HINT, "bf16" | "f32"; None: the bundle's

    @property
    def label(self) -> str:
        return f"onnxruntime:{self.providers[0]}" if self.backend == "onnxruntime" else f"openvino:{self.device.upper()}"


def choose_backend(manifest: Manifest, backend: str = "auto", device: str = "auto", *,
                   precision_hint: str = "auto", cpu_flags: frozenset[str] | None = None) -> BackendChoice:
    """Apply the documented rule (module docstring) for this bundle and device.

    precision_hint: "auto" (the rule's), "fp32" (exact fp32 compute, also on OpenVINO) or "bf16" (OpenVINO bf16
    compute where the CPU has it). cpu_flags: the CPU's flags for the rule (default: rule_flags())."""
    from .onnxruntime import available_providers, choose_providers
    from .openvino import openvino_available

    if backend not in BACKENDS:
        raise BadInput(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise BadInput(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    if precision_hint not in PRECISION_HINTS:
        raise BadInput(f"precision hint {precision_hint!r}: choose one of {', '.join(PRECISION_HINTS)}")
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
        hint = OV_HINTS.get(precision_hint)
        return BackendChoice("openvino", "cpu", "asked for openvino" + (f", {precision_hint} compute" if hint else ""),
                             precision_hint=hint)
    if backend == "onnxruntime":
        if precision_hint == "bf16":
            raise BadInput("--precision-hint bf16 needs OpenVINO (ONNX Runtime has no bf16 CPU kernels): "
                           "use --backend openvino or auto")
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
    choice = _cpu_choice(manifest, rule_flags(cpu_flags), precision_hint)
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


def rule_flags(flags: frozenset[str] | None = None) -> frozenset[str]:
    """The CPU flags the rule reads: `flags` when given, else SDEDGE_CPU_FLAGS (tests only: "avx2 avx512_bf16",
    space- or comma-separated, stands in for the CPU's flags), else /proc/cpuinfo's. Only the choice reads the
    injected flags: OpenVINO still asks the real CPU, and provenance and benchmarks record the real flags."""
    if flags is not None:
        return frozenset(flags)
    injected = os.environ.get("SDEDGE_CPU_FLAGS")
    return frozenset(injected.replace(",", " ").split()) if injected is not None else cpu_flags()


def _isa(flags: frozenset[str]) -> tuple[bool, bool, bool, bool]:
    """What decides the engine: native bf16, VNNI, AVX-512F, AVX2."""
    return (any(f in flags for f in BF16_FLAGS), any(f in flags for f in VNNI_FLAGS), "avx512f" in flags,
            "avx2" in flags)


def _flags_text(flags: frozenset[str]) -> str:
    return "+".join(engine_flags(flags)) or "no AVX2"


def _measured_at_export(manifest: Manifest, flags: frozenset[str], hint: str | None) -> tuple[BackendChoice | None, str]:
    """Rule 4: the backend export measured fastest (within parity), when it measured on a CPU with the same flags;
    else (None, why the measurement does not apply here). The speed reports record the machine as
    "model, N cores, avx2+avx512f+..." (export/gates.py machine_name)."""
    pref = manifest.backend
    if pref.preferred not in ("onnxruntime", "openvino"):
        return None, ""
    machines = sorted({r.machine for r in manifest.speed})
    recorded = [frozenset(m.rsplit(", ", 1)[-1].split("+")) for m in machines]
    if recorded and all(_isa(r) == _isa(flags) for r in recorded):
        why = f"rule 4: measured fastest at export on a CPU with the same flags ({_flags_text(flags)})"
        return BackendChoice(pref.preferred, "cpu", f"{why}: {pref.reason}" if pref.reason else why,
                             CPU if pref.preferred == "onnxruntime" else (),
                             precision_hint=hint if pref.preferred == "openvino" else None), ""
    where = "; ".join(machines) or "a CPU the bundle does not record"
    return None, (f"the export measured {pref.preferred} fastest on another CPU ({where}), this one has "
                  f"{_flags_text(flags)}; ")


def _cpu_choice(manifest: Manifest, flags: frozenset[str], precision_hint: str = "auto") -> BackendChoice:
    """Rules 3 to 5: the CPU backend for this bundle on a CPU with these flags."""
    from .openvino import openvino_available

    precision = manifest.precision
    bf16 = next((f for f in BF16_FLAGS if f in flags), None) if precision_hint != "fp32" else None
    vnni = next((f for f in VNNI_FLAGS if f in flags), None)
    if not openvino_available():
        hint = ""
        if bf16 and precision in (Precision.FP32, Precision.BF16):
            hint = f"; this CPU has {bf16}: OpenVINO bf16 runs {BF16_MEASURED}: pip install 'sdedge[openvino]'"
        elif precision is not Precision.FP32:
            hint = f"; a {precision.value} bundle runs faster on OpenVINO: pip install 'sdedge[openvino]'"
        return BackendChoice("onnxruntime", "cpu", f"rule 3: OpenVINO is not installed{hint}", CPU)
    ov_hint = OV_HINTS.get(precision_hint)
    measured, elsewhere = _measured_at_export(manifest, flags, ov_hint)
    if measured is not None:
        return measured
    choice = _by_flags(manifest, bf16, vnni, precision_hint, flags)
    return dataclasses.replace(choice, reason=f"rule 5: {elsewhere}{choice.reason}")


BF16_MEASURED = ("5.2x ONNX Runtime fp32 on sd15-arch (one guided 256x256 UNet call on 2 AVX-512 BF16 cores: 0.91 s "
                 "against 4.7 s, image 47.9 dB against fp32; measured for issue 19, docs/cpu-engines.md)")
FP32_MEASURED = ("sd15-arch fast bundle at 512x512 on 2 AVX2-only cores: 6.98 GB against 10.61 GB for OpenVINO fp32, which "
                 "ran 1.15x faster there, 20.3 s against 23.3 s per image, one image each; at 256x256 with 20 guided steps "
                 "ONNX Runtime was 1.18x the faster: benchmarks/results/cpu-sd15-512-fast/2026-12-02-avx2, "
                 "cpu-sd15-256/2026-11-25_epyc-2c_a645ba7")
NO_VNNI = ("without VNNI OpenVINO's u8xs8 int8 kernels saturate 16-bit sums (sd15 QDQ UNet: cosine after guidance "
           "0.29 on an AVX2 CPU) and ONNX Runtime runs static int8 slower than fp32 (docs/cpu-engines.md)")


def _by_flags(manifest: Manifest, bf16: str | None, vnni: str | None, precision_hint: str,
              flags: frozenset[str]) -> BackendChoice:
    """Rule 5: by the bundle's precision and the CPU's flags (bf16: the first of BF16_FLAGS it has, None when
    it has none or --precision-hint fp32 was given; vnni likewise)."""
    precision = manifest.precision
    exact = ("--precision-hint fp32: exact fp32 compute; " if precision_hint == "fp32" and _isa(flags)[0] else "")
    if precision is Precision.FP32:
        if bf16 or precision_hint == "bf16":
            return BackendChoice("openvino", "cpu", f"{bf16 or 'asked for bf16'}: OpenVINO runs bf16 compute, "
                                 f"measured {BF16_MEASURED}; --precision-hint fp32 keeps exact fp32",
                                 precision_hint="bf16")
        return BackendChoice("onnxruntime", "cpu", f"{exact or 'no native bf16 (avx512_bf16, amx): '}an fp32 "
                             f"bundle runs on ONNX Runtime, for its smaller peak memory ({FP32_MEASURED}); "
                             "--backend openvino runs OpenVINO fp32", CPU)
    if precision is Precision.BF16:
        if bf16:
            return BackendChoice("openvino", "cpu", f"{bf16}: OpenVINO runs the bf16 bundle in bf16 compute, "
                                 f"measured {BF16_MEASURED}", precision_hint="bf16")
        return BackendChoice("openvino", "cpu", f"{exact or 'no native bf16 (avx512_bf16, amx): '}OpenVINO runs "
                             "the bf16 bundle in fp32 compute, at fp32 speed", precision_hint="f32")
    if precision is Precision.INT8:
        unet = manifest.components.get("unet")
        if unet is not None and unet.openvino_ir:
            return _int8_ir_choice(manifest, vnni)
        if vnni:
            why = (f"{vnni}, but the UNet is a QDQ ONNX without an OpenVINO IR, which OpenVINO ran at cosine after "
                   "guidance 0.63 on a VNNI CPU (issue 19); ONNX Runtime runs it at its export parity, slower than "
                   "fp32 there: a bf16 or fp32 bundle is the fast path")
        else:
            why = f"no VNNI (avx512_vnni, avx_vnni, amx_int8): int8 is not the fast path on this CPU: {NO_VNNI}; " \
                  "ONNX Runtime runs it at its export parity, and an fp32 bundle is faster here"
        return BackendChoice("onnxruntime", "cpu", why, CPU)
    if precision is Precision.INT8_WEIGHTS:
        return BackendChoice("openvino", "cpu", "weight-only int8 runs fastest on OpenVINO (ONNX Runtime decompresses "
                             f"the weights per call), in {'bf16 compute (' + bf16 + ')' if bf16 else exact + 'fp32 compute'}",
                             precision_hint="bf16" if bf16 else "f32")
    return BackendChoice("openvino", "cpu", f"a {precision.value} bundle runs fastest on OpenVINO "
                         "(ONNX Runtime's CPU provider has few fp16 kernels)")


# cosine after guidance under which an int8 IR is not run by default: the static-int8 goal docs/cpu-engines.md gives
# (--min-cosine 0.97); measured on sd15-arch: 0.976 (benchmarks/results/cpu-sd15-256-int8ir/), 0.984 in issue 19
INT8_IR_FLOOR = 0.97


def int8_ir_gate(manifest: Manifest) -> tuple[bool, str]:
    """Whether the export's gates measured the bundle's int8 IR UNet faster than the fp32 ONNX on OpenVINO and than
    ONNX Runtime fp32, within parity (export/openvino_int8.py records them); and the figures, or what is missing."""
    speed = {r.backend: r for r in manifest.speed}
    par = manifest.parity.precision
    ov, ort = speed.get("openvino"), speed.get("onnxruntime")
    if ov is None or ort is None or par is None or par.backend != "openvino":
        return False, "the bundle records no speed and parity gates of its OpenVINO IR on both backends"
    floor = INT8_IR_FLOOR if par.min_cosine is None else par.min_cosine
    figures = (f"int8 IR {ov.seconds:.3f} s per UNet call at {ov.shape} against {ov.fp32_seconds:.3f} s for the fp32 "
               f"ONNX on OpenVINO and {ort.seconds:.3f} s on ONNX Runtime, cosine after guidance "
               f"{par.guided_cosine:.4f} (floor {floor:g}), measured on {ov.machine}")
    problems = [p for ok, p in ((ov.ratio > 1.0, "not faster than the fp32 ONNX on OpenVINO"),
                                (ov.seconds < ort.seconds, "not faster than ONNX Runtime fp32"),
                                (par.guided_cosine >= floor, "under the parity floor")) if not ok]
    return not problems, figures + (f": {'; '.join(problems)}" if problems else "")


def _int8_ir_choice(manifest: Manifest, vnni: str | None) -> BackendChoice:
    """An int8 bundle whose UNet carries an OpenVINO IR beside its fp32 ONNX (rule 5, module docstring)."""
    ok, figures = int8_ir_gate(manifest)
    if vnni and ok:
        return BackendChoice("openvino", "cpu", f"{vnni}: OpenVINO's int8 kernels run the bundle's int8 IR UNet "
                             f"(NNCF on the OpenVINO model), the export's gates measured it faster within parity: "
                             f"{figures}")
    why = (f"{vnni}, but the export's gates do not favour the int8 IR ({figures})" if vnni else
           f"no VNNI (avx512_vnni, avx_vnni, amx_int8): int8 is not the fast path on this CPU: {NO_VNNI}")
    return BackendChoice("onnxruntime", "cpu", f"{why}; ONNX Runtime runs the bundle's fp32 ONNX UNet exactly", CPU)


def engine_factory(choice: BackendChoice, manifest: Manifest, *, threads: int | None = None,
                   low_memory: bool = False, cache_dir: Any = True) -> EngineFactory:
    """A function (bundle, component name, component info) -> engine for the chosen backend."""
    if choice.backend == "openvino":
        from .openvino import OvEngine

        hint = choice.precision_hint or manifest.backend.openvino_inference_precision

        def make_ov(bundle: Bundle, name: str, info: ComponentInfo):
            return OvEngine(bundle, name, info, threads=threads, precision_hint=hint, cache_dir=cache_dir,
                            low_memory=low_memory)

        return make_ov
    from .onnxruntime import OrtEngine

    providers = list(choice.providers)

    def make_ort(bundle: Bundle, name: str, info: ComponentInfo):
        return OrtEngine(bundle, name, info, providers, threads, low_memory=low_memory, cache_dir=cache_dir)

    return make_ort
