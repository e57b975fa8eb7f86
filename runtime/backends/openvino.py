"""OpenVINO engine with the same lifecycle as `OrtEngine`: load → infer → unload (extra `sdedge[openvino]`).

One `OvEngine` per component. The model is read from the bundle's hash-checked bytes: OpenVINO's own IR
(`openvino_ir` in the manifest, written by export when it helps) when there is one, else the ONNX file. An ONNX
model with external data (over 2 GB) has its external locations checked against the manifest's list for the
component, and its checked bytes are copied into a private temporary folder that OpenVINO reads (it reads
external data only by path), so a file swapped in the bundle after the check is never read.

Shapes: the model is compiled for the exact input shapes of the first call (a static reshape: OpenVINO's CPU
plugin runs static shapes faster than dynamic ones), and again, lazily, for each new shape; the last
`max_shapes` compiled models are kept.

Compiled-model cache: each compiled model is exported (`CompiledModel.export_model`) into
`$SDEDGE_CACHE_DIR/openvino` (default `~/.cache/sdedge/openvino`) under a key made of the SHA-256 of the
model files (from the manifest, checked on read), the OpenVINO version, the device, the compile properties
and the input shapes; the blob's own SHA-256 is kept beside it in a record sealed with the per-user cache key
and bound to that cache key (ort_cache.seal), the blob is read once, checked, and those bytes are imported; a
cache root that others can write to is not used (ort_cache.private_root). A second load of
the same bundle at the same size imports the blob instead of compiling: seconds instead of a minute for the
SD1.5 UNet.

Precision: the compile property INFERENCE_PRECISION_HINT is set explicitly: `precision_hint` when given (the
`auto` rule of select.py gives "bf16" for an fp32 bundle on a CPU with native bf16; --precision-hint fp32 gives
"f32"), else "f32" for an fp32 bundle, since OpenVINO would otherwise pick bf16 on its own on CPUs with AMX. A bf16 bundle asks
for "bf16" only where the CPU reports BF16 in OPTIMIZATION_CAPABILITIES (AVX-512 BF16 or AMX); elsewhere it
falls back to "f32" and says so in the log: the result is then the fp32 engine's, at fp32 speed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, MissingDependency
from ..files import atomic_write_bytes
from ..manifest import ComponentInfo, Precision
from . import onnx_refs
from .ort_cache import describe, open_sealed, private_root, seal

log = logging.getLogger("sdedge.runtime")

_CORE = None
_CORE_LOCK = threading.Lock()
_WARNED: set[str] = set()  # warnings given once per process


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def core():
    """One shared `openvino.Core` per process."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            try:
                import openvino as ov
            except ImportError:
                raise MissingDependency(
                    "backend 'openvino' needs the OpenVINO runtime: pip install 'sdedge[openvino]'"
                ) from None
            _CORE = ov.Core()
        return _CORE


def cpu_capabilities() -> list[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU, e.g. ['FP32', 'INT8', 'BIN', 'BF16', 'EXPORT_IMPORT']."""
    return [str(c) for c in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX-512 BF16 or AMX), as OpenVINO sees it."""
    return "BF16" in cpu_capabilities()


def inference_precision(precision: Precision, hint: str | None = None) -> tuple[str, str]:
    """The INFERENCE_PRECISION_HINT for a bundle precision on this CPU, and why."""
    want = hint or ("bf16" if precision in (Precision.BF16, Precision.INT8_WEIGHTS, Precision.INT8) else "f32")
    if want == "bf16":
        if cpu_has_bf16():
            return "bf16", f"{precision.value} bundle and the CPU computes bf16 natively"
        why = (f"{precision.value} bundle, but this CPU has no native bf16 (AVX-512 BF16 or AMX): running in f32, "
               "at fp32 speed and exactness")
        if precision is Precision.BF16 and not _WARNED:
            _WARNED.add("bf16")
            log.warning("openvino: %s", why)
        return "f32", why
    return "f32", f"{precision.value} bundle: fp32 compute keeps parity with the reference"


def default_cache_dir() -> Path | None:
    from .ort_cache import cache_root

    return cache_root("openvino")  # SDEDGE_CACHE_DIR= (empty) turns the cache off


@dataclass
class OvEngine:
    bundle: Bundle
    name: str
    info: ComponentInfo
    device: str = "CPU"
    threads: int | None = None
    precision_hint: str | None = None  # "bf16" | "f32"; None: by the bundle's precision
    cache_dir: Path | None | bool = True  # True: default_cache_dir(); None/False: no cache
    max_shapes: int = 2
    low_memory: bool = False
    model: Any = field(default=None, repr=False)
    compiled: OrderedDict = field(default_factory=OrderedDict, repr=False)  # shapes -> (compiled, request)
    cache_hits: int = 0
    compiles: int = 0
    config: dict = field(default_factory=dict)
    precision_reason: str = ""

    @property
    def loaded(self) -> bool:
        return self.model is not None or bool(self.compiled)

    # -- load ------------------------------------------------------------------------------------------------
    def _source_files(self) -> tuple[str, ...]:
        if self.info.openvino_ir:
            return self.info.openvino_ir
        return (self.info.file, *self.info.external_data)

    def load(self) -> None:
        if self.loaded:
            return
        ov_core = core()
        precision = self.info.precision or self.bundle.manifest.precision
        hint, self.precision_reason = inference_precision(precision, self.precision_hint)
        threads = self.threads or int(os.environ.get("SDEDGE_THREADS", "0")) or None
        self.config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        if self.cache_dir is True:
            self.cache_dir = default_cache_dir()
        elif self.cache_dir is False:
            self.cache_dir = None
        self._check_io_names()
        log.debug("openvino %s: precision %s (%s)", self.name, hint, self.precision_reason)
        _ = ov_core  # the model itself is read lazily: a cached compiled blob needs no model

    def _read_model(self):
        if self.model is not None:
            return self.model
        ov_core = core()
        files = self._source_files()
        try:
            if self.info.openvino_ir:
                xml, weights = files
                self.model = ov_core.read_model(self.bundle.read(xml), _ov_tensor(self.bundle.read(weights)))
            else:
                model = self.bundle.read(self.info.file)
                external = onnx_refs.checked_external_files(self.bundle, self.info, model, "OpenVINO", self.name)
                if external:
                    self.model = self._read_private_copy(model, external)
                else:
                    self.model = ov_core.read_model(model)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"{self.bundle.path(files[0])}: OpenVINO cannot read the {self.name} model: {exc}") from None
        return self.model

    def _read_private_copy(self, model: bytes, external: dict[str, str]):
        """An ONNX model with external data, which OpenVINO reads only by path: the checked bytes are written into
        a folder only this process's user can open (mode 0700) and read from there, so a file swapped in the
        bundle after the check is never what OpenVINO reads. The copy is removed once the model is read."""
        folder = Path(tempfile.mkdtemp(prefix=f"sdedge-ov-{self.name}-"))
        try:
            name = Path(self.info.file).name
            atomic_write_bytes(folder / name, model, mode=0o600)
            for loc, rel in external.items():
                data = self.bundle.read(rel)
                atomic_write_bytes(folder / loc, data, mode=0o600)
                del data
            return core().read_model(str(folder / name))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _check_io_names(self) -> None:
        """Input names from the manifest must match the model's (checked on the first compile)."""
        self._expected = [t.name for t in self.info.inputs]

    def _cache_key(self, shapes: tuple) -> str:
        import openvino as ov

        files = self._source_files()
        key = {
            "files": [self.bundle.manifest.files[f].sha256 for f in files],
            "openvino": ov.__version__,
            "device": self.device,
            "config": {k: str(v) for k, v in sorted(self.config.items())},
            "shapes": [list(s) for s in shapes],
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    def _compile(self, shapes: tuple):
        ov_core = core()
        blob = sidecar = None
        root = private_root(Path(self.cache_dir)) if self.cache_dir is not None else None
        if root is not None:
            key = f"{self.name}-{self._cache_key(shapes)}"
            blob = root / f"{key}.blob"
            sidecar = blob.with_suffix(".sha256")  # the sealed record: the blob's SHA-256, bound to `key`
            if sidecar.is_file():
                # the bundle's own files are still hash-checked, so a changed bundle never meets a stale blob
                for rel in self._source_files():
                    self.bundle.verify_hash(rel)
                files = open_sealed(sidecar, key)  # the blob read once, checked, and those bytes imported
                if files is not None and blob.name in files:
                    try:
                        compiled = ov_core.import_model(bytes(files[blob.name]), self.device, self.config)
                        self.cache_hits += 1
                        log.debug("openvino %s: compiled model imported from the cache %s", self.name, blob)
                        return compiled
                    except Exception as exc:  # a blob from another build: recompile and overwrite
                        log.warning("openvino %s: cached blob %s unusable (%s); recompiling", self.name, blob, exc)
                else:
                    log.warning("openvino %s: cached blob %s does not match its SHA-256; recompiling", self.name, blob)
        model = self._read_model()
        names = [p.get_any_name() for p in model.inputs]
        if names != self._expected:
            raise BundleError(f"{self.bundle.path(self.info.file)}: the {self.name} model's inputs are {names}, "
                              f"the manifest says {self._expected}")
        model.reshape({name: list(shape) for name, shape in zip(names, shapes)})
        try:
            compiled = ov_core.compile_model(model, self.device, self.config)
        except Exception as exc:
            raise BundleError(f"OpenVINO cannot compile the {self.name} model for shapes {shapes}: {exc}") from None
        self.compiles += 1
        if blob is not None:
            _write_blob(blob, sidecar, compiled)
        if self.low_memory:
            self.model = None  # read again for another shape; the compiled model holds its own weights
        return compiled

    # -- infer -----------------------------------------------------------------------------------------------
    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.loaded and not self.config:
            raise RuntimeError(f"engine {self.name!r} used before load()")
        typed = [np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in self.info.inputs]
        shapes = tuple(tuple(a.shape) for a in typed)
        entry = self.compiled.get(shapes)
        if entry is None:
            compiled = self._compile(shapes)
            entry = (compiled, compiled.create_infer_request())
            self.compiled[shapes] = entry
            while len(self.compiled) > self.max_shapes:
                self.compiled.popitem(last=False)
        else:
            self.compiled.move_to_end(shapes)
        request = entry[1]
        request.infer(typed)
        return [np.array(request.get_output_tensor(i).data, copy=True) for i in range(len(self.info.outputs))]

    def unload(self) -> None:
        self.model = None
        self.compiled.clear()
        self.config = {}


def _ov_tensor(data: bytes):
    import openvino as ov

    return ov.Tensor(np.frombuffer(data, dtype=np.uint8).copy())


def _write_blob(blob: Path, sidecar: Path, compiled) -> None:
    """Write the compiled model atomically, then its sealed record; a cache that cannot be written is only a
    slower next load."""
    try:
        data = compiled.export_model()
        data = data.getvalue() if hasattr(data, "getvalue") else bytes(data)  # a BytesIO in OpenVINO 2026
        atomic_write_bytes(blob, data, mode=0o600)
        seal(sidecar, blob.stem, describe({blob.name: data}))
    except Exception as exc:
        log.warning("openvino: could not write the compiled-model cache %s (%s)", blob, exc)
