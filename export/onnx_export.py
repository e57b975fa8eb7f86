"""The one generic export loop: a ComponentSpec and a pipeline in, an ONNX file and its parity figure out.

For each component: wrap the module, trace it with sample inputs (TorchScript exporter, named dynamic axes),
move the weights into one external-data file when the model is over 2 GB, then run ONNX Runtime beside
PyTorch on sample inputs at two shapes and record the max abs error against the spec's tolerance.
"""

from __future__ import annotations

import gc
import logging
import warnings
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


class ExportError(SdedgeError):
    """Export could not produce a component, or its parity missed the tolerance."""


def export_component(spec: ComponentSpec, pipe, out_dir: Path, trace_dims: dict[str, int],
                     check_dims: list[dict[str, int]], opset: int = 17) -> tuple[ComponentInfo, ComponentParity, list[Path]]:
    """Export `spec` of `pipe` into out_dir/<name>/model.onnx; returns manifest info, parity and files written."""
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
    files = consolidate_external_data(onnx_path)
    parity = check_parity(spec, module, onnx_path, fixed, check_dims, vocab)
    info = ComponentInfo(
        file=f"{spec.name}/model.onnx",
        inputs=tuple(TensorInfo(t.name, t.dtype, manifest_shape(t.shape, fixed)) for t in spec.inputs),
        outputs=tuple(TensorInfo(t.name, t.dtype, manifest_shape(t.shape, fixed)) for t in spec.outputs),
        opset=opset,
        external_data=tuple(f"{spec.name}/{p.name}" for p in files if p != onnx_path),
    )
    del module
    gc.collect()
    return info, parity, files


def consolidate_external_data(onnx_path: Path) -> list[Path]:
    """Keep a model under the protobuf limit in one file; move a larger one's tensors into ONE data file.

    The TorchScript exporter writes one file per tensor for a large model (hundreds for the SD1.5 UNet).
    """
    folder = onnx_path.parent
    extra = [p for p in folder.iterdir() if p != onnx_path]
    if not extra:
        return [onnx_path]
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=True)
    for p in extra:
        p.unlink()
    with atomic_output(onnx_path) as tmp:  # the data file is written beside it under its final name
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_NAME, size_threshold=1024)
    del model
    return [onnx_path, folder / EXTERNAL_DATA_NAME]


def _max_abs_err(component: str, output: str, out: np.ndarray, ref: np.ndarray, shape) -> float:
    """Max abs difference; ExportError when either side holds NaN/Inf (`max(worst, nan)` would keep `worst`)."""
    err = float(np.max(np.abs(out.astype(np.float32) - ref)))
    if not np.isfinite(err):
        bad_out, bad_ref = (int(np.size(a) - np.isfinite(a).sum()) for a in (out, ref))
        raise ExportError(f"{component}: output {output} at {'x'.join(map(str, shape))} holds NaN or infinite values "
                          f"({bad_out} from ONNX Runtime, {bad_ref} from PyTorch): the weights or the graph are broken")
    return err


def check_parity(spec: ComponentSpec, module: torch.nn.Module, onnx_path: Path, fixed: dict[str, int],
                 check_dims: list[dict[str, int]], vocab: int) -> ComponentParity:
    """Max abs error of ONNX Runtime against PyTorch on the same sample inputs, at each of `check_dims`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    worst, shapes = 0.0, []
    for i, dims in enumerate(check_dims):
        gen = torch.Generator().manual_seed(100 + i)
        args = sample_inputs(spec, {**fixed, **dims}, gen, vocab)
        with torch.inference_mode():
            refs = module(*args)
        refs = refs if isinstance(refs, tuple) else (refs,)  # one tensor per output of the spec
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
