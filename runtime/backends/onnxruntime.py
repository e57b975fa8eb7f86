"""ONNX Runtime engine with an explicit lifecycle: load → infer → unload.

One `OrtEngine` per component. `load()` reads the model's bytes through the bundle (hash-checked) and builds
an `InferenceSession` from them; a model with external data (over 2 GB) has its data files hash-checked and
is then opened by path, since ONNX Runtime resolves external data relative to the model file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, MissingDependency
from ..manifest import ComponentInfo

log = logging.getLogger("sdedge.runtime")

ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16"}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(device: str) -> tuple[list[str], str]:
    """ONNX Runtime execution providers for `device` ("auto" | "cpu" | "cuda"), and why."""
    have = available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"], "asked for the CPU"
    if device == "cuda":
        if "CUDAExecutionProvider" not in have:
            raise MissingDependency(
                "device 'cuda' needs onnxruntime-gpu with a CUDA GPU; have providers "
                f"{', '.join(have)}. Install with: pip install 'sdedge[gpu]'"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "asked for CUDA"
    if "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "onnxruntime-gpu found a CUDA provider"
    return ["CPUExecutionProvider"], "no CUDA provider in this onnxruntime build"


@dataclass
class OrtEngine:
    bundle: Bundle
    name: str
    info: ComponentInfo
    providers: list[str]
    threads: int | None = None
    low_memory: bool = False  # no weight pre-packing and no memory arena: smaller peak, somewhat slower
    session: Any = field(default=None, repr=False)

    @property
    def loaded(self) -> bool:
        return self.session is not None

    def load(self) -> None:
        if self.session is not None:
            return
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        threads = self.threads or int(os.environ.get("SDEDGE_THREADS", "0")) or None
        if threads:
            opts.intra_op_num_threads = threads
        if self.low_memory:
            opts.enable_cpu_mem_arena = False
            opts.add_session_config_entry("session.disable_prepacking", "1")
        try:
            if self.info.external_data:
                for rel in self.info.external_data:
                    self.bundle.verify_hash(rel)
                self.bundle.verify_hash(self.info.file)
                model: Any = str(self.bundle.path(self.info.file))
            else:
                model = self.bundle.read(self.info.file)
            self.session = ort.InferenceSession(model, sess_options=opts, providers=self.providers)
        except BundleError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types for a corrupt model
            raise BundleError(
                f"{self.bundle.path(self.info.file)}: ONNX Runtime cannot load the {self.name} model: {exc}"
            ) from None
        self._check_io()
        log.debug("loaded %s with %s", self.name, self.session.get_providers())

    def _check_io(self) -> None:
        names = [i.name for i in self.session.get_inputs()]
        expected = [t.name for t in self.info.inputs]
        if names != expected:
            raise BundleError(
                f"{self.bundle.path(self.info.file)}: the {self.name} model's inputs are {names}, "
                f"the manifest says {expected}"
            )

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.session is None:
            raise RuntimeError(f"engine {self.name!r} used before load()")
        typed = {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in self.info.inputs}
        return self.session.run(None, typed)

    def unload(self) -> None:
        self.session = None
