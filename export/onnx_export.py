"""The one generic export loop: a ComponentSpec and a pipeline in, an ONNX file and its parity figure out.

For each component: wrap the module, trace it with sample inputs (TorchScript exporter, named dynamic axes),
move the weights into one external-data file when the model is over 2 GB, then run ONNX Runtime beside
PyTorch on sample inputs at two shapes and record the max abs error against the spec's tolerance.
"""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.files import atomic_output
from sdedge.runtime.manifest import ComponentInfo, ComponentParity, TensorInfo

from .specs import ComponentSpec, concrete_shape, dynamic_axes, fixed_dims, manifest_shape, sample_inputs

log = logging.getLogger("sdedge.export")

PROTOBUF_LIMIT = 2 * 1024**3
EXTERNAL_DATA_NAME = "model.onnx.data"
DATA_ALIGNMENT = 4096  # bytes: each tensor of the data file starts on a page (ONNX Runtime can map it)


class ExportError(SdedgeError):
    """Export could not produce a component, or its parity missed the tolerance."""


def export_component(spec: ComponentSpec, pipe, out_dir: Path, trace_dims: dict[str, int],
                     check_dims: list[dict[str, int]], opset: int = 17, after_torch: Callable[[], object] | None = None,
                     ) -> tuple[ComponentInfo, ComponentParity, list[Path]]:
    """Export `spec` of `pipe` into out_dir/<name>/model.onnx; returns manifest info, parity and files written.

    `after_torch()` is called once PyTorch's part is done (the trace and its outputs at `check_dims`), before ONNX
    Runtime loads the graph: a caller short of memory puts the module's weights away there (export/park.py)."""
    comp_dir = out_dir / spec.name
    comp_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = comp_dir / "model.onnx"
    module = spec.module(pipe).eval()
    fixed = fixed_dims(pipe)
    vocab = pipe.text_encoder.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    args = sample_inputs(spec, {**fixed, **trace_dims}, gen, vocab)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes that cannot vary here
        try:
            torch.onnx.export(
                module, args, str(onnx_path),
                input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                dynamic_axes=dynamic_axes(spec), opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        except Exception as exc:
            raise ExportError(f"exporting {spec.name} to ONNX failed: {exc}") from exc
    del args
    files = consolidate_external_data(onnx_path)
    references = torch_references(spec, module, fixed, check_dims, vocab)
    del module
    gc.collect()
    if after_torch is not None:
        after_torch()
    parity = check_parity(spec, onnx_path, fixed, check_dims, references)
    info = ComponentInfo(
        file=f"{spec.name}/model.onnx",
        inputs=tuple(TensorInfo(t.name, t.dtype, manifest_shape(t.shape, fixed)) for t in spec.inputs),
        outputs=tuple(TensorInfo(t.name, t.dtype, manifest_shape(t.shape, fixed)) for t in spec.outputs),
        opset=opset,
        external_data=tuple(f"{spec.name}/{p.name}" for p in files if p != onnx_path),
    )
    return info, parity, files


def consolidate_external_data(onnx_path: Path) -> list[Path]:
    """Keep a model under the protobuf limit in one file; move a larger one's tensors into ONE data file.

    The TorchScript exporter writes one file per tensor for a large model (hundreds for the SD1.5 UNet). The tensors
    are copied file to file, one at a time (each at a page-aligned offset): only the graph, without its weights, is
    held in memory, so a 10 GB UNet is consolidated in a few MB (loading it whole would hold a second copy of it).
    """
    folder = onnx_path.parent
    extra = [p for p in folder.iterdir() if p != onnx_path]
    if not extra:
        return [onnx_path]
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = onnx.load(str(onnx_path), load_external_data=False)
    data_path = folder / EXTERNAL_DATA_NAME
    with atomic_output(data_path) as tmp, open(tmp, "wb") as out:
        for tensor in (t for t in _get_all_tensors(model) if uses_external_data(t)):
            info = ExternalDataInfo(tensor)
            offset = -(-out.tell() // DATA_ALIGNMENT) * DATA_ALIGNMENT
            out.seek(offset)
            length = _copy_bytes(folder / info.location, info.offset or 0, info.length, out)
            del tensor.external_data[:]
            for key, value in (("location", EXTERNAL_DATA_NAME), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    with atomic_output(onnx_path) as tmp:
        onnx.save_model(model, str(tmp))  # the graph alone: every tensor refers to the data file now
    del model
    for p in extra:
        if p != data_path:
            p.unlink(missing_ok=True)
    return [onnx_path, data_path]


def _copy_bytes(src: Path, offset: int, length: int | None, out, chunk: int = 64 << 20) -> int:
    """Copy `length` bytes (to the end when None) of `src` from `offset` to `out`; returns the bytes copied."""
    copied = 0
    with open(src, "rb") as f:
        f.seek(offset)
        while length is None or copied < length:
            block = f.read(chunk if length is None else min(chunk, length - copied))
            if not block:
                break
            out.write(block)
            copied += len(block)
    if length is not None and copied != length:
        raise ExportError(f"{src}: external tensor data ends after {copied} of {length} bytes")
    return copied


def _max_abs_err(component: str, output: str, out: np.ndarray, ref: np.ndarray, shape) -> float:
    """Max abs difference; ExportError when either side holds NaN/Inf (`max(worst, nan)` would keep `worst`)."""
    err = float(np.max(np.abs(out.astype(np.float32) - ref)))
    if not np.isfinite(err):
        bad_out, bad_ref = (int(np.size(a) - np.isfinite(a).sum()) for a in (out, ref))
        raise ExportError(f"{component}: output {output} at {'x'.join(map(str, shape))} holds NaN or infinite values "
                          f"({bad_out} from ONNX Runtime, {bad_ref} from PyTorch): the weights or the graph are broken")
    return err


def torch_references(spec: ComponentSpec, module: torch.nn.Module, fixed: dict[str, int],
                     check_dims: list[dict[str, int]], vocab: int) -> list[tuple[tuple, tuple]]:
    """PyTorch's outputs on the seeded sample inputs at each of `check_dims`: [(inputs, outputs), ...]."""
    references = []
    for i, dims in enumerate(check_dims):
        gen = torch.Generator().manual_seed(100 + i)
        args = sample_inputs(spec, {**fixed, **dims}, gen, vocab)
        with torch.inference_mode():
            refs = module(*args)
        references.append((args, refs if isinstance(refs, tuple) else (refs,)))  # one tensor per output of the spec
    return references


def check_parity(spec: ComponentSpec, onnx_path: Path, fixed: dict[str, int], check_dims: list[dict[str, int]],
                 references: list[tuple[tuple, tuple]]) -> ComponentParity:
    """Max abs error of ONNX Runtime against PyTorch on the same sample inputs, at each of `check_dims`
    (`references`: PyTorch's inputs and outputs there, from torch_references)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    worst, shapes = 0.0, []
    for dims, (args, refs) in zip(check_dims, references, strict=True):
        feeds = {t.name: a.numpy() for t, a in zip(spec.inputs, args)}
        outs = session.run(None, feeds)
        for t, out, ref in zip(spec.outputs, outs, refs, strict=True):
            expected = concrete_shape(t.shape, {**fixed, **dims})
            if out.shape != expected:
                raise ExportError(f"{spec.name}: ONNX output {t.name} has shape {out.shape}, expected {expected}")
            worst = max(worst, _max_abs_err(spec.name, t.name, out, ref.float().numpy(), args[0].shape))
        shapes.append("x".join(str(s) for s in args[0].shape))
    del session
    if not worst <= spec.tolerance:
        raise ExportError(
            f"{spec.name}: ONNX Runtime output differs from PyTorch by {worst:.3g} (max abs), over the "
            f"tolerance {spec.tolerance:g}; the exported graph is wrong"
        )
    log.info("%s parity: max abs err %.3g (tolerance %g) at %s", spec.name, worst, spec.tolerance, ", ".join(shapes))
    return ComponentParity(max_abs_err=worst, tolerance=spec.tolerance, shapes=tuple(shapes))
