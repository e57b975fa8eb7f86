"""Can this machine build and run TensorRT engines? Say exactly what is missing, and how to get it.

`--target trt` (export), `--backend trt` (generate) and `sdedge build-engines` call `require_tensorrt(what)`
before touching anything, so without a GPU or without the packages they exit with code 2, a message naming
each missing piece, and nothing written. Three things are needed:

1. the TensorRT Python bindings (`import tensorrt`): `pip install 'sdedge[trt]'` (tensorrt-cu12);
2. CUDA's Python bindings (`import cuda.bindings` or the older `cuda`): part of `sdedge[trt]` (cuda-python),
   used for device buffers so that the runtime stays free of PyTorch;
3. a CUDA GPU with the NVIDIA driver: found through `nvidia-smi -L` (no CUDA context is created).

Nothing here imports torch; the probe costs a few milliseconds when the packages are absent.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

from ..errors import MissingDependency

__all__ = ["missing_for_tensorrt", "require_tensorrt", "cuda_gpus"]

INSTALL = "pip install 'sdedge[trt]'   (tensorrt-cu12 and cuda-python; needs a CUDA 12 driver)"


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cuda_gpus() -> list[str]:
    """The CUDA GPUs `nvidia-smi -L` lists ([] without the driver or without a GPU)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().startswith("GPU ")]


def missing_for_tensorrt() -> list[str]:
    """One line per missing piece; [] when TensorRT engines can be built and run here."""
    missing = []
    if not _has_module("tensorrt"):
        missing.append("the TensorRT Python package (import tensorrt failed)")
    if not (_has_module("cuda.bindings") or _has_module("cuda")):
        missing.append("CUDA's Python bindings (import cuda.bindings failed)")
    if not cuda_gpus():
        why = "nvidia-smi not found" if shutil.which("nvidia-smi") is None else "nvidia-smi lists no GPU"
        missing.append(f"a CUDA GPU with the NVIDIA driver ({why})")
    return missing


def require_tensorrt(what: str) -> None:
    """Raise MissingDependency (exit code 2) naming every missing piece, for `what` (e.g. "--target trt")."""
    missing = missing_for_tensorrt()
    if not missing:
        return
    lines = "\n".join(f"  - {m}" for m in missing)
    hint = f"install: {INSTALL}" if any("Python" in m for m in missing) else ""
    gpu = any("GPU" in m for m in missing)
    advice = ("TensorRT engines are built for, and run on, a CUDA GPU: run this on the GPU machine; on a CPU use "
              "--target onnx / --backend onnxruntime or openvino") if gpu else ""
    raise MissingDependency(f"{what} needs TensorRT, which is not usable here; missing:\n{lines}"
                            + "".join(f"\n{x}" for x in (hint, advice) if x))
