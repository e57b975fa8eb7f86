"""ONNX Runtime engine with an explicit lifecycle: load → infer → unload.

One `OrtEngine` per component. `load()` reads the model's bytes through the bundle (hash-checked) and builds
an `InferenceSession` from them; a model with external data (over 2 GB) has its data files hash-checked and
is then opened by path, since ONNX Runtime resolves external data relative to the model file. On the CPU the
optimised graph is cached per machine (ort_cache.py): the first load saves it, later loads open it with
optimisation off (the bundle's files are still hash-checked).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, MissingDependency
from ..manifest import ComponentInfo
from . import ort_cache

log = logging.getLogger("sdedge.runtime")

ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16"}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")  # in order of preference


def choose_providers(device: str, have: list[str] | None = None) -> tuple[list[str], str]:
    """ONNX Runtime execution providers for `device` ("auto" | "cpu" | "cuda"), and why. On a GPU: TensorRT's
    provider first when the build has it, then CUDA, then the CPU for nodes neither takes.
    `have`: the providers this onnxruntime build offers (default: ask it)."""
    have = available_providers() if have is None else have
    if device == "cpu":
        return ["CPUExecutionProvider"], "asked for the CPU"
    if "CUDAExecutionProvider" not in have:
        if device == "cuda":
            raise MissingDependency(
                "device 'cuda' needs onnxruntime-gpu with a CUDA GPU; have providers "
                f"{', '.join(have)}. Install with: pip install 'sdedge[gpu]'"
            )
        return ["CPUExecutionProvider"], "no CUDA provider in this onnxruntime build"
    gpu = [p for p in GPU_PROVIDERS if p in have]
    why = "asked for CUDA" if device == "cuda" else "onnxruntime-gpu found a CUDA provider"
    if "TensorrtExecutionProvider" in gpu:
        why += "; its TensorRT provider goes first (it builds engines on the first run and caches them)"
    return [*gpu, "CPUExecutionProvider"], why


def provider_entries(providers: list[str], key: str) -> list[Any]:
    """Providers as InferenceSession takes them: TensorRT's with its engine and timing caches under
    `$SDEDGE_CACHE_DIR/onnxruntime-trt/<key>` (key: component and model hash; no cache when SDEDGE_CACHE_DIR
    is set empty), so that a second load does not rebuild engines for minutes; the others by name."""
    root = ort_cache.cache_root("onnxruntime-trt")
    entries: list[Any] = []
    for p in providers:
        if p == "TensorrtExecutionProvider" and root is not None:
            entries.append((p, {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(root / key),
                                "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(root)}))
        else:
            entries.append(p)
    return entries


@dataclass
class OrtEngine:
    bundle: Bundle
    name: str
    info: ComponentInfo
    providers: list[str]
    threads: int | None = None
    low_memory: bool = False  # no weight pre-packing and no memory arena: smaller peak, somewhat slower
    cache_dir: Path | None | bool = True  # optimised-graph cache (ort_cache.py); True: the default folder
    session: Any = field(default=None, repr=False)
    cache_hit: bool = False  # the last load opened the cached optimised graph

    @property
    def loaded(self) -> bool:
        return self.session is not None

    def load(self) -> None:
        if self.session is not None:
            return
        import onnxruntime as ort

        self.cache_hit = False
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        threads = self.threads or int(os.environ.get("SDEDGE_THREADS", "0")) or None
        if threads:
            opts.intra_op_num_threads = threads
        if self.low_memory:
            opts.enable_cpu_mem_arena = False
            opts.add_session_config_entry("session.disable_prepacking", "1")
        entry = self._cache_entry()
        model_sha = self.bundle.manifest.files[self.info.file].sha256
        providers = provider_entries(self.providers, f"{self.name}-{model_sha[:16]}")
        work = None
        try:
            if entry is not None and ort_cache.lookup(entry):
                self._verify_files()  # the bundle is checked as on any load
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                self.session = ort.InferenceSession(str(entry.model), sess_options=opts, providers=providers)
                self.cache_hit = True
            else:
                if entry is not None:
                    work = ort_cache.saving_into(opts, entry)
                if self.info.external_data:
                    self._verify_files()
                    model: Any = str(self.bundle.path(self.info.file))
                else:
                    model = self.bundle.read(self.info.file)
                self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
                if work is not None:
                    try:
                        ort_cache.commit(work, entry)
                    except OSError as exc:  # a cache that cannot be written is only a slower next load
                        log.warning("onnxruntime %s: could not save the optimised graph (%s)", self.name, exc)
        except BundleError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types for a corrupt model
            raise BundleError(
                f"{self.bundle.path(self.info.file)}: ONNX Runtime cannot load the {self.name} model: {exc}"
            ) from None
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        self._check_io()
        log.debug("loaded %s with %s", self.name, self.session.get_providers())

    def _verify_files(self) -> None:
        """Hash-check the model and its external data files against the manifest (what `bundle.read` does for
        a model read as bytes)."""
        for rel in (self.info.file, *self.info.external_data):
            self.bundle.verify_hash(rel)

    def _cache_entry(self) -> ort_cache.GraphEntry | None:
        """Where this component's optimised graph is cached; None when the cache is off or not for this provider."""
        if self.cache_dir is False or self.cache_dir is None or self.providers != ["CPUExecutionProvider"]:
            return None
        root = ort_cache.cache_root("onnxruntime") if self.cache_dir is True else Path(self.cache_dir)
        if root is None:
            return None
        files = self.bundle.manifest.files
        shas = [files[rel].sha256 for rel in (self.info.file, *self.info.external_data)]
        return ort_cache.GraphEntry.for_key(root, self.name, ort_cache.cache_key(shas, list(self.providers)))

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
