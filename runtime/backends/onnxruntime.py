"""ONNX Runtime engine with an explicit lifecycle: load → infer → unload.

One `OrtEngine` per component. `load()` reads the model's bytes through the bundle (hash-checked, no symbolic
links), checks every external-data location the model names against the files the manifest lists for this
component (onnx_refs.py), reads those files the same way, and builds the `InferenceSession` from those bytes,
handing the external data over from memory (`add_external_initializers_from_files_in_memory`): ONNX Runtime never
opens a bundle file itself, so nothing swapped on disk between the check and the load can run. External data over
LARGE_EXTERNAL_BYTES (SDXL's 10.3 GB UNet) is copied, hashed and checked, into a private folder that ONNX Runtime
reads by path instead: from memory it copies the bytes and both are held at once (2.1x the weights at load). On the CPU the
optimised graph is cached per machine (ort_cache.py): the first load saves it, later loads run it, from bytes
checked against a sealed record bound to the verified model, with optimisation off.
"""

from __future__ import annotations

import hashlib
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
from . import onnx_refs, ort_cache

log = logging.getLogger("sdedge.runtime")

LARGE_EXTERNAL_BYTES = 2 * 1024**3  # external data read by ONNX Runtime from a checked private copy (see load)
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
    is set empty or the root is not private), so that a second load does not rebuild engines for minutes; the
    others by name. The folder's files are checked against their sealed record first and the folder emptied on
    any mismatch; `OrtEngine` seals it again after a load and at unload (ort_cache.prepare_folder/seal_folder)."""
    root = ort_cache.private_root(ort_cache.cache_root("onnxruntime-trt")) if "TensorrtExecutionProvider" in \
        providers else None
    entries: list[Any] = []
    for p in providers:
        if p == "TensorrtExecutionProvider" and root is not None:
            folder = ort_cache.prepare_folder(root, key)  # emptied unless its files match their sealed record
            entries.append((p, {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(folder),
                                "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(folder)}))
        else:
            entries.append(p)
    return entries


def _session(ort, model: bytes, data: dict, opts, providers):
    """An InferenceSession on `model`'s bytes, its external data handed over from memory ({location: bytes})."""
    if data:
        names = list(data)
        opts.add_external_initializers_from_files_in_memory(names, [data[n] for n in names],
                                                            [len(data[n]) for n in names])
    return ort.InferenceSession(model, sess_options=opts, providers=providers)


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
    _trt_state: list | None = field(default=None, repr=False)  # the TensorRT folder as last sealed

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
        large = self._external_bytes() > LARGE_EXTERNAL_BYTES
        entry = None if large else self._cache_entry()
        providers = provider_entries(self.providers, self._trt_key())
        work = None
        try:
            cached = ort_cache.lookup(entry) if entry is not None else None
            if cached is not None:
                self._verify_files()  # the bundle is checked as on any load
                graph = cached.pop(entry.model.name)
                if set(onnx_refs.external_locations(graph)) <= set(cached):
                    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                    self.session = _session(ort, graph, cached, opts, providers)
                    self.cache_hit = True
            if self.session is None and large:
                self.session = self._session_from_private_copy(ort, opts, providers)
            if self.session is None:
                model, data = self._checked_model()
                if entry is not None:
                    work = ort_cache.saving_into(opts, entry)
                self.session = _session(ort, model, data, opts, providers)
                del model, data
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
        self._seal_trt()
        log.debug("loaded %s with %s", self.name, self.session.get_providers())

    def _checked_model(self) -> tuple[bytes, dict[str, bytes | bytearray]]:
        """The model's bytes and its external data files' bytes ({location: bytes}), each read once and checked
        against the manifest, after checking every external location against the files listed for this
        component: ONNX Runtime gets these very bytes and never opens a bundle file itself."""
        model = self.bundle.read(self.info.file)
        files = onnx_refs.checked_external_files(self.bundle, self.info, model, "ONNX Runtime", self.name)
        return model, {loc: self.bundle.read(rel) for loc, rel in files.items()}

    def _external_bytes(self) -> int:
        files = self.bundle.manifest.files
        return sum(files[rel].bytes for rel in self.info.external_data if rel in files)

    def _session_from_private_copy(self, ort, opts, providers):
        """A model whose external data is over LARGE_EXTERNAL_BYTES (SDXL's UNet: 10.3 GB): handed over from memory,
        ONNX Runtime copies it and both copies are held while the session is made (measured: 2.1x the weights at
        load). So its files are copied in chunks, hashed and checked against the manifest, into a folder only this
        user can open (as the OpenVINO engine does), and ONNX Runtime reads that copy by path (1.1x); the folder is
        removed once the session holds the weights. Not cached (ort_cache): the cache hands its files over from
        memory too."""
        model = self.bundle.read(self.info.file)
        files = onnx_refs.checked_external_files(self.bundle, self.info, model, "ONNX Runtime", self.name)
        with onnx_refs.private_copy(self.bundle, self.info.file, model, files, f"sdedge-ort-{self.name}-") as path:
            return ort.InferenceSession(str(path), sess_options=opts, providers=providers)

    def _verify_files(self) -> None:
        """Hash-check the model and its external data files against the manifest (on a cache hit, where the
        engine runs the cached graph and not these files)."""
        for rel in (self.info.file, *self.info.external_data):
            self.bundle.verify_hash(rel)

    def _cache_entry(self) -> ort_cache.GraphEntry | None:
        """Where this component's optimised graph is cached; None when the cache is off or not for this provider."""
        if self.cache_dir is False or self.cache_dir is None or self.providers != ["CPUExecutionProvider"]:
            return None
        root = ort_cache.cache_root("onnxruntime") if self.cache_dir is True else Path(self.cache_dir)
        root = ort_cache.private_root(root)
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
        out = self.session.run(None, typed)
        self._seal_trt()  # TensorRT builds an engine on the first run at a new shape: seal it now
        return out

    def _trt_key(self) -> str:
        """The TensorRT engine folder's name, bound to the verified digests of the model and its data."""
        files = self.bundle.manifest.files
        shas = "".join(files[rel].sha256 for rel in (self.info.file, *self.info.external_data))
        return f"{self.name}-{hashlib.sha256(shas.encode()).hexdigest()[:32]}"

    def _seal_trt(self) -> None:
        """Seal the TensorRT engine folder when its files changed since the last seal (names, sizes, mtimes: one
        listing per call, a hash only after TensorRT wrote something), so a process killed later keeps them."""
        if "TensorrtExecutionProvider" not in self.providers:
            return
        root = ort_cache.private_root(ort_cache.cache_root("onnxruntime-trt"))
        folder = root / self._trt_key() if root is not None else None
        if folder is None or not folder.is_dir():
            return
        state = sorted((p.name, p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.iterdir())
        if state == self._trt_state:
            return
        try:
            ort_cache.seal_folder(root, self._trt_key())
            self._trt_state = state
        except OSError as exc:
            log.warning("onnxruntime %s: could not seal the TensorRT engine cache (%s)", self.name, exc)

    def unload(self) -> None:
        if self.session is not None:
            self._seal_trt()
        self.session = None
