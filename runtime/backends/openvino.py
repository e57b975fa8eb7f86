"""OpenVINO engine with the same lifecycle as `OrtEngine`: load → infer → unload (extra `sdedge[openvino]`).

One `OvEngine` per component. The model is read from the bundle's hash-checked bytes: OpenVINO's own IR
(`openvino_ir` in the manifest, written by export when it helps) when there is one, else the ONNX file. An ONNX
model with external data (over 2 GB) has its external locations checked against the manifest's list for the
component, and its files are copied in chunks into a private temporary folder (mode 0700) that OpenVINO reads (it
reads external data only by path), hashed as they are copied and checked against the manifest before OpenVINO opens
them, so what OpenVINO reads is the checked copy, never a file swapped in the bundle after the check.

Shapes: the model is compiled for exact input shapes (a static reshape: OpenVINO's CPU plugin runs static shapes
faster than dynamic ones). `prepare(shapes)` compiles (or imports the cached blob) at load: `Pipeline` calls it for
the shapes of the request it expects (the bundle's default size, guidance and one image, or the size its caller
names), so the first image runs at the steady speed. A call with other shapes compiles again; prepared shapes that
never ran are dropped first (so a caller who asked for another size does not hold two compiled UNets), and the
last `max_shapes` compiled models are kept.

Memory: one copy of the weights. After compiling, nothing sdedge read is kept: the checked bytes, the `ov.Model`
and the private copy go (the copy is deleted as soon as OpenVINO has mapped it). OpenVINO's CPU plugin itself keeps
the model's constants beside its packed (re-laid-out) weights, in a compiled model and in an imported blob alike
(measured, docs/cpu-engines.md), so with bf16 compute (`INFERENCE_PRECISION_HINT` "bf16") the weights of an fp32
or bf16 bundle's ONNX are held as fp16 (OpenVINO's own compress-to-fp16 pass, as `ov.save_model` applies; small
constants stay fp32, `_hold_weights_fp16`): the plugin packs them as bf16 either way (tiny base: the same image),
and what it keeps and the blob halve (sd15-arch UNet: 1.7 GB instead of 3.4 GB). So are the fp32 components of
an int8 bundle whose UNet is an OpenVINO IR (its text encoder and decoder: `_float_onnx`). Exact fp32 compute keeps
fp32 constants. After each compile or import the heap's freed pages are handed back (`release_freed_memory`):
OpenVINO's buffers while it reads and compiles are mostly under glibc's mmap threshold, and without the trim the
resident set kept them. The compiled blob is written from OpenVINO's own buffer (no second copy) and imported from the one
copy read and checked, dropped once imported.

Compiled-model cache: each compiled model is exported (`CompiledModel.export_model`) into
`$SDEDGE_CACHE_DIR/openvino` (default `~/.cache/sdedge/openvino`) under a key made of the SHA-256 of the
model files (from the manifest, checked on read), the OpenVINO version, the device, the compile properties,
the weight storage and the input shapes; the blob's own SHA-256 is kept beside it in a record sealed with the
per-user cache key and bound to that cache key (ort_cache.seal), the blob is read once, checked, and those bytes
are imported; a cache root that others can write to is not used (ort_cache.private_root). A second load of
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
import io
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, MissingDependency
from ..files import atomic_write_bytes
from ..manifest import ComponentInfo, Precision
from ..memory import release_freed_memory
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


Shapes = tuple[tuple[int, ...], ...]  # one shape per input, in the manifest's order


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
    low_memory: bool = False  # the engine protocol's; nothing is kept after compiling in either mode
    compiled: OrderedDict = field(default_factory=OrderedDict, repr=False)  # shapes -> (compiled, request)
    cache_hits: int = 0
    compiles: int = 0
    config: dict = field(default_factory=dict)
    precision_reason: str = ""
    fp16_weights: bool = False  # bf16 compute: constants held as fp16 (module docstring, memory)
    unrun: set = field(default_factory=set, repr=False)  # shapes prepared at load that no call has used yet

    @property
    def loaded(self) -> bool:
        return bool(self.config)

    # -- load ------------------------------------------------------------------------------------------------
    def _source_files(self) -> tuple[str, ...]:
        if self.info.openvino_ir:
            return self.info.openvino_ir
        return (self.info.file, *self.info.external_data)

    def load(self) -> None:
        """The compile properties; nothing is compiled until `prepare` (at load, by the pipeline) or a call."""
        if self.loaded:
            return
        core()
        precision = self.info.precision or self.bundle.manifest.precision
        hint, self.precision_reason = inference_precision(precision, self.precision_hint)
        threads = self.threads or int(os.environ.get("SDEDGE_THREADS", "0")) or None
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if self.cache_dir is True:
            self.cache_dir = default_cache_dir()
        elif self.cache_dir is False:
            self.cache_dir = None
        self.fp16_weights = (hint == "bf16" and not self.info.openvino_ir and _fp16_pass() is not None
                             and _float_onnx(self.info, self.bundle.manifest))
        self._expected = [t.name for t in self.info.inputs]  # checked against the model's on the first compile
        self.config = config
        log.debug("openvino %s: precision %s (%s)%s", self.name, hint, self.precision_reason,
                  ", constants held as fp16" if self.fp16_weights else "")

    def prepare(self, shapes: Shapes) -> None:
        """Compile (or import the cached blob) for these input shapes now, so that the first call with them runs at
        the steady speed."""
        self.load()
        shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        if shapes not in self.compiled:
            self._add(shapes)
            self.unrun.add(shapes)

    def _add(self, shapes: Shapes) -> None:
        compiled = self._compile(shapes)
        release_freed_memory()  # what reading and compiling freed on the heap goes back (module docstring, memory)
        self.compiled[shapes] = (compiled, compiled.create_infer_request())
        while len(self.compiled) > self.max_shapes:
            self.unrun.discard(self.compiled.popitem(last=False)[0])

    def _read_model(self):
        """A fresh `ov.Model` from the checked bytes (the caller drops it once compiled)."""
        ov_core = core()
        files = self._source_files()
        try:
            if self.info.openvino_ir:
                xml, weights = files
                model = ov_core.read_model(self.bundle.read(xml), _ov_tensor(self.bundle.read(weights)))
            else:
                data = self.bundle.read(self.info.file)
                external = onnx_refs.checked_external_files(self.bundle, self.info, data, "OpenVINO", self.name)
                model = self._read_private_copy(data, external) if external else ov_core.read_model(data)
                del data
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"{self.bundle.path(files[0])}: OpenVINO cannot read the {self.name} model: {exc}") from None
        if self.fp16_weights:
            _hold_weights_fp16(model)
        return model

    def _read_private_copy(self, model: bytes, external: dict[str, str]):
        """An ONNX model with external data, which OpenVINO reads only by path: the model and its files are copied
        into a folder only this process's user can open (mode 0700), each external file in chunks, hashed as it is
        copied and checked against the manifest before OpenVINO opens it (so no file's bytes are held in memory and
        a file swapped in the bundle after the check is never what OpenVINO reads). OpenVINO maps the copies; the
        folder is removed once the model is read (the mapping lives until the model is dropped)."""
        with onnx_refs.private_copy(self.bundle, self.info.file, model, external, f"sdedge-ov-{self.name}-") as path:
            return core().read_model(str(path))

    def _cache_key(self, shapes: tuple) -> str:
        import openvino as ov

        files = self._source_files()
        key = {
            "files": [self.bundle.manifest.files[f].sha256 for f in files],
            "openvino": ov.__version__,
            "device": self.device,
            "config": {k: str(v) for k, v in sorted(self.config.items())},
            "weights": "f16" if self.fp16_weights else "as stored",
            "shapes": [list(s) for s in shapes],
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    def _compile(self, shapes: Shapes):
        """The compiled model for these shapes: the cached blob imported, else compiled (and the blob written)."""
        root = private_root(Path(self.cache_dir)) if self.cache_dir is not None else None
        blob = sidecar = None
        if root is not None:
            key = f"{self.name}-{self._cache_key(shapes)}"
            blob = root / f"{key}.blob"
            sidecar = blob.with_suffix(".sha256")  # the sealed record: the blob's SHA-256, bound to `key`
            if sidecar.is_file():
                compiled = self._import(blob, sidecar, key)
                if compiled is not None:
                    return compiled
        model = self._read_model()
        names = [p.get_any_name() for p in model.inputs]
        if names != self._expected:
            raise BundleError(f"{self.bundle.path(self.info.file)}: the {self.name} model's inputs are {names}, "
                              f"the manifest says {self._expected}")
        model.reshape({name: list(shape) for name, shape in zip(names, shapes)})
        try:
            compiled = core().compile_model(model, self.device, self.config)
        except Exception as exc:
            raise BundleError(f"OpenVINO cannot compile the {self.name} model for shapes {shapes}: {exc}") from None
        finally:
            del model  # the compiled model holds what it needs; the source goes now (module docstring, memory)
        self.compiles += 1
        if blob is not None:
            _write_blob(blob, sidecar, compiled)
        return compiled

    def _import(self, blob: Path, sidecar: Path, key: str):
        """The cached blob imported from the one copy read and checked against its sealed record, or None (logged):
        then the caller compiles and overwrites it."""
        # the bundle's own files are still hash-checked, so a changed bundle never meets a stale blob
        for rel in self._source_files():
            self.bundle.verify_hash(rel)
        files = open_sealed(sidecar, key)  # the blob read once, checked, and those bytes imported
        data = files.pop(blob.name, None) if files is not None else None
        if data is None:
            log.warning("openvino %s: cached blob %s does not match its SHA-256; recompiling", self.name, blob)
            return None
        try:
            compiled = core().import_model(_blob_input(data), self.device, self.config)
        except Exception as exc:  # a blob from another build: recompile and overwrite
            log.warning("openvino %s: cached blob %s unusable (%s); recompiling", self.name, blob, exc)
            return None
        finally:
            del data
        self.cache_hits += 1
        log.debug("openvino %s: compiled model imported from the cache %s", self.name, blob)
        return compiled

    # -- infer -----------------------------------------------------------------------------------------------
    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.loaded:
            raise RuntimeError(f"engine {self.name!r} used before load()")
        typed = [np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in self.info.inputs]
        shapes = tuple(tuple(a.shape) for a in typed)
        entry = self.compiled.get(shapes)
        if entry is None:
            for unused in self.unrun:  # prepared for a request that never came: freed before compiling another
                self.compiled.pop(unused, None)
            self.unrun.clear()
            self._add(shapes)
            entry = self.compiled[shapes]
        else:
            self.compiled.move_to_end(shapes)
            self.unrun.discard(shapes)
        request = entry[1]
        request.infer(typed)
        return [np.array(request.get_output_tensor(i).data, copy=True) for i in range(len(self.info.outputs))]

    def unload(self) -> None:
        self.compiled.clear()
        self.unrun.clear()
        self.config = {}


def _float_onnx(info: ComponentInfo, manifest) -> bool:
    """Whether the component's ONNX holds float (fp32 or bf16) weights. A component records its precision where it
    differs from the bundle's; an int8 bundle whose UNet is an OpenVINO IR (`--int8-method openvino`) quantizes
    only that IR (export/openvino_int8.py): its other components are the fp32 export's ONNX, unmarked."""
    precision = info.precision or manifest.precision
    if precision in (Precision.FP32, Precision.BF16):
        return True
    return (precision is Precision.INT8 and info.precision is None
            and any(c.openvino_ir for c in manifest.components.values()))


def _fp16_pass():
    """OpenVINO's compress-to-fp16 pass (what `ov.save_model(compress_to_fp16=True)` runs), or None."""
    try:
        from openvino._offline_transformations import compress_model_transformation
    except ImportError:
        return None
    return compress_model_transformation


FP32_UNDER = 1 << 14  # constants of fewer elements stay fp32: biases, norms, the time embedding's frequencies


def _hold_weights_fp16(model) -> None:
    """The weights (constants of FP32_UNDER elements or more) held as fp16 by OpenVINO's compress-to-fp16 pass,
    which marks its Converts as weight decompression (the CPU plugin folds them into its packed bf16 weights). The
    smaller constants are put back as fp32 copies: fp16 would round the time embedding's frequencies (a phase error
    of up to t·2⁻¹¹ rad at timestep t) where bf16 compute keeps that path in fp32. No constant is left on the
    memory the model was read from, so that mapping (of the private copy) is released."""
    import math

    import openvino as ov

    def constants(kind):
        return [op for op in model.get_ops() if op.get_type_name() == "Constant" and op.get_element_type() == kind]

    def fp32_copy(op, data) -> None:
        new = ov.opset13.constant(np.array(data, dtype=np.float32))
        new.set_friendly_name(op.get_friendly_name())
        op.output(0).replace(new.output(0))

    small = {op.get_friendly_name(): op.get_data().copy() for op in constants(ov.Type.f32)
             if math.prod(op.get_output_shape(0)) < FP32_UNDER}
    _fp16_pass()(model)
    for op in constants(ov.Type.f16):
        data = small.get(op.get_friendly_name().removesuffix("_compressed"))
        if data is not None:
            for target in list(op.output(0).get_target_inputs()):
                if target.get_node().get_type_name() == "Convert":
                    fp32_copy(target.get_node(), data)
    for op in constants(ov.Type.f32):  # what the pass kept fp32, on the read memory: copied off it
        fp32_copy(op, op.get_data())


def _ov_tensor(data: bytes | bytearray):
    """The IR's weights as an ov.Tensor: on the checked bytearray itself, or a copy of immutable bytes."""
    import openvino as ov

    array = np.frombuffer(data, dtype=np.uint8)
    return ov.Tensor(array if isinstance(data, bytearray) else array.copy(), shared_memory=isinstance(data, bytearray))


def _blob_input(data: bytes | bytearray):
    """What `import_model` reads without another copy: bytes as they are, a bytearray through a shared ov.Tensor."""
    return _ov_tensor(data) if isinstance(data, bytearray) else data


def _write_blob(blob: Path, sidecar: Path, compiled) -> None:
    """Write the compiled model atomically from OpenVINO's own buffer (no second copy), then its sealed record; a
    cache that cannot be written is only a slower next load."""
    try:
        stream = io.BytesIO()
        compiled.export_model(stream)
        view = stream.getbuffer()
        try:
            atomic_write_bytes(blob, view, mode=0o600)
            seal(sidecar, blob.stem, describe({blob.name: view}))
        finally:
            view.release()
    except Exception as exc:
        log.warning("openvino: could not write the compiled-model cache %s (%s)", blob, exc)
