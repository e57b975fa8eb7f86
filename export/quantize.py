"""Reduced precisions of an exported fp32 bundle: the graph transforms per component.

What each precision does to each component (a standard-ONNX graph that both backends run):

| precision     | UNet                                        | text encoder, VAE                    | compute            |
|---------------|---------------------------------------------|--------------------------------------|--------------------|
| fp16 (GPUs)   | fp16, sensitive ops kept fp32, fp32 I/O     | the same                             | fp16 on a GPU      |
| bf16          | weights stored fp16 (+Cast), fp32 graph     | the same                             | OpenVINO bf16 hint |
| int8-weights  | int8 weights + DequantizeLinear             | the same                             | fp32 (bf16 hint)   |
| int8          | static int8 QDQ: weights and activations,   | int8 weights (decode and text are    | int8               |
|               | calibrated on recorded UNet inputs (NNCF    | not measured faster in static int8:  |                    |
|               | or ONNX Runtime's quantiser)                | activations stay fp32)               |                    |

bf16 is a compute precision of the backend (OpenVINO's INFERENCE_PRECISION_HINT on CPUs with AVX-512 BF16
or AMX), not a file format: ONNX Runtime has no bf16 CPU kernels, so the bundle stores fp16 weights (half the
bytes, exactly representable in the fp32 graph) and the manifest asks OpenVINO for bf16. On a CPU without
native bf16 the runtime falls back to fp32 and says so.

These are the transforms only: they rewrite ONNX files. The export's precision stages (export/pipeline_precision.py)
run them on the staging bundle, then measure and gate the result (export/gates.py).
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from sdedge.runtime.manifest import ComponentInfo, Manifest, Precision

from . import graph_passes
from .onnx_export import EXTERNAL_DATA_NAME, ExportError

log = logging.getLogger("sdedge.export")

PROTOBUF_SAFE = 1_800_000_000  # bytes of tensors over which a model is saved with external data

# Ops kept in fp32 in an fp16 model: reductions, normalisations and exponentials overflow or lose too much.
FP16_KEEP_FP32 = ("GroupNormalization", "InstanceNormalization", "LayerNormalization", "ReduceMean", "Pow", "Sqrt",
                  "Softmax", "Exp", "Erf", "Range", "Sin", "Cos", "Div", "ReduceSum", "CumSum")

INT8_METHODS = ("nncf", "ort")

# Prefixes of UNet node groups, coarse enough to sweep on the SD1.5 UNet in minutes (sensitivity sweep).
UNET_GROUPS = ("/unet/conv_in", "/unet/time_embedding", "/unet/down_blocks.0", "/unet/down_blocks.1",
               "/unet/down_blocks.2", "/unet/down_blocks.3", "/unet/mid_block", "/unet/up_blocks.0",
               "/unet/up_blocks.1", "/unet/up_blocks.2", "/unet/up_blocks.3", "/unet/conv_norm_out", "/unet/conv_out")


def component_plan(precision: Precision, pipeline: str = "sd15") -> dict[str, Precision]:
    """The precision each component gets in a bundle of `precision` (SDXL's VAE stays fp32 in an fp16 bundle: it
    overflows in fp16)."""
    names = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
    if precision is Precision.INT8:
        return {n: Precision.INT8 if n == "unet" else Precision.INT8_WEIGHTS for n in names}
    plan = {n: precision for n in names}
    if pipeline == "sdxl" and precision is Precision.FP16:
        plan.update(vae_decoder=Precision.FP32, vae_encoder=Precision.FP32)
    return plan


# -- model files ---------------------------------------------------------------------------------------------
def load_model(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) if init.HasField("raw_data") else int(np.prod(init.dims)) * 4
    return total


def save_model(model: onnx.ModelProto, comp_dir: Path) -> list[Path]:
    """Write comp_dir/model.onnx (and one model.onnx.data when large), removing what was there."""
    comp_dir.mkdir(parents=True, exist_ok=True)
    for p in comp_dir.iterdir():
        if p.name.startswith("model.onnx"):
            p.unlink()
    path = comp_dir / "model.onnx"
    if tensor_bytes(model) > PROTOBUF_SAFE:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_NAME, size_threshold=1024)
        return [path, comp_dir / EXTERNAL_DATA_NAME]
    onnx.save_model(model, str(path))
    return [path]


# -- transforms ----------------------------------------------------------------------------------------------
def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 for GPUs: weights and most ops in fp16, FP16_KEEP_FP32 ops in fp32, inputs and outputs fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP16_KEEP_FP32),
                                    disable_shape_infer=tensor_bytes(model) > PROTOBUF_SAFE)


def quiet_nncf() -> None:
    """NNCF logs at INFO to stdout from its import on; keep it to warnings unless sdedge logs at DEBUG."""
    import nncf

    debug = logging.getLogger("sdedge").isEnabledFor(logging.DEBUG)
    nncf.set_log_level(logging.DEBUG if debug else logging.WARNING)


def to_int8_static(model_path: Path, calibration, out_dir: Path, *, method: str = "nncf", samples: int = 16,
                   ignored: tuple[str, ...] = ()) -> onnx.ModelProto:
    """Static int8 (QDQ: weights per channel, activations per tensor) calibrated on `calibration`."""
    if method not in INT8_METHODS:
        raise ExportError(f"int8 method {method!r}: choose one of {', '.join(INT8_METHODS)}")
    calib = calibration.subset(samples)
    if method == "nncf":
        try:
            import nncf
        except ImportError:
            raise ExportError("static int8 with NNCF needs nncf: pip install nncf (or use --int8-method ort)") from None
        quiet_nncf()
        from nncf.onnx.quantization.backend_parameters import BackendParameters
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        big = any(model_path.parent.glob("*.data")) or model_path.stat().st_size > PROTOBUF_SAFE
        # a model over protobuf's 2 GB: NNCF reads its weights from the external-data folder itself
        model = onnx.load(str(model_path), load_external_data=not big)
        backend = {BackendParameters.EXTERNAL_DATA_DIR: str(model_path.parent.resolve())} if big else {}
        # MatMuls of two activations (attention scores and weights × V) stay fp32: on CPUs without VNNI
        # OpenVINO's u8×s8 kernels saturate there, and the overflow fix only narrows weights (measured on the
        # SD1.5 UNet, AVX2: OpenVINO cosine after guidance 0.29 with them quantised, ONNX Runtime 0.97).
        act_mm = activation_matmuls(model)
        names = [*ignored, *act_mm]
        scope = nncf.IgnoredScope(names=names, validate=False) if names else None
        # 7-bit weight range in every layer (overflow fix): u8×s8 products then cannot saturate the int16
        # intermediates of CPUs without VNNI (AVX2, AVX-512F), where OpenVINO's int8 kernels otherwise lose
        # accuracy (measured on the tiny UNet: cosine 0.973 -> 0.997 on an AVX2 CPU); exact everywhere else.
        q = nncf.quantize(model, nncf.Dataset(calib), subset_size=len(calib), model_type=nncf.ModelType.TRANSFORMER,
                          fast_bias_correction=True, ignored_scope=scope,
                          advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE,
                                                                                 backend_params=backend))
        del model
        gc.collect()
        return q
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    out = out_dir / "int8-ort.onnx"
    nodes = None
    if ignored:
        nodes = [n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node
                 if n.name.startswith(ignored)]
    quantize_static(str(model_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True,  # 7-bit weights: no u8×s8 saturation on CPUs without VNNI
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=nodes,
                    use_external_data_format=True, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                    extra_options={"CalibMovingAverage": True})
    return load_model(out)


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMul nodes neither of whose inputs is a constant (an initializer or a Constant's output)."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    producers = {o: n for n in model.graph.node for o in n.output}

    def constant(name: str, depth: int = 0) -> bool:  # through Transpose/Reshape/Cast/DequantizeLinear of a constant
        if name in consts:
            return True
        node = producers.get(name)
        if node is None or depth > 3 or node.op_type not in ("Transpose", "Reshape", "Cast", "DequantizeLinear"):
            return False
        return constant(node.input[0], depth + 1)

    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(constant(i) for i in n.input)]


def transform(name: str, precision: Precision, src: Path, work: Path, *, calibration=None, int8_method: str = "nncf",
              int8_samples: int = 16, ignored: tuple[str, ...] = ()) -> onnx.ModelProto:
    if precision is Precision.INT8:
        if calibration is None:
            raise ExportError(f"{name}: static int8 needs calibration data")
        return to_int8_static(src, calibration, work, method=int8_method, samples=int8_samples, ignored=ignored)
    model = load_model(src)
    if precision is Precision.FP16:
        return to_fp16(model)
    if precision is Precision.BF16:
        return graph_passes.store_weights_fp16(model)
    if precision is Precision.INT8_WEIGHTS:
        return graph_passes.quantize_weights_int8(model)
    return model


def set_fp32_unet_aside(stage_dir: Path, manifest: Manifest, work: Path) -> Path:
    """Move the fp32 UNet's files from the staging bundle to `work`/fp32/ (the speed gate's baseline, and the
    source its transform reads); returns that folder, a bundle root for `manifest`'s UNet."""
    root = work / "fp32"
    (root / "unet").mkdir(parents=True)
    info = manifest.components["unet"]
    for rel in (info.file, *info.external_data):
        os.replace(stage_dir / rel, root / rel)
    return root


def transform_component(name: str, info: ComponentInfo, p: Precision, bundle_precision: Precision, src: Path,
                        stage_dir: Path, work: Path, **kw) -> ComponentInfo:
    """Component `name` at precision `p` (from the ONNX file `src`) written into `stage_dir`/name; its manifest entry.
    `kw`: transform's calibration, int8_method, int8_samples."""
    model = transform(name, p, src, work, **kw)
    written = save_model(model, stage_dir / name)
    del model
    gc.collect()
    opset = max(info.opset, 13) if p in (Precision.INT8, Precision.INT8_WEIGHTS) else info.opset
    return replace(info, precision=p if p is not bundle_precision else None, opset=opset,
                   external_data=tuple(f"{name}/{w.name}" for w in written[1:]))


def without_activation_qdq(src: Path, groups: list[str], comp_dir: Path, info: ComponentInfo) -> ComponentInfo:
    """The int8 UNet at `src` with the activation QDQ of the node `groups` removed (those run in fp32), written to
    `comp_dir`; its manifest entry."""
    model = graph_passes.remove_qdq_pairs(load_model(src), groups)
    written = save_model(model, comp_dir)
    del model
    return replace(info, external_data=tuple(f"unet/{w.name}" for w in written[1:]))


def unet_groups(src: Path) -> list[str]:
    """The UNET_GROUPS present in the UNet at `src` (the sensitivity sweep's candidates)."""
    names = {n.name for n in onnx.load(str(src), load_external_data=False).graph.node}
    return [g for g in UNET_GROUPS if any(n.startswith(g) for n in names)]


def describe(precision: Precision, int8_method: str) -> str | None:
    return {
        Precision.FP32: None,
        Precision.FP16: "fp16 weights and compute, normalisations/softmax/exp in fp32 (onnxruntime float16 converter)",
        Precision.BF16: "bf16 compute (OpenVINO inference precision), weights stored fp16",
        Precision.INT8_WEIGHTS: "weight-only int8, symmetric per output channel (sdedge graph pass)",
        Precision.INT8: ("static int8 QDQ of the UNet ("
                         + ("NNCF post-training quantisation, 7-bit weights" if int8_method == "nncf"
                            else "ONNX Runtime quantize_static, U8S8, reduce_range")
                         + "); weight-only int8 for the text encoder and VAE"),
    }[precision]
