"""Reduced precisions of an exported fp32 bundle, with their parity, speed and size measured and gated.

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

`apply_precision` rewrites the staging bundle in place: calibration (from the still-fp32 bundle), the
transform per component, then the speed gate on each installed backend, the parity gates on the fastest,
and the size report; the fp32 UNet is kept aside in a work folder for the speed baseline and removed after.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from sdedge.runtime.bundle import Bundle
from sdedge.runtime.files import scratch_dir
from sdedge.runtime.manifest import BackendHint, Manifest, Precision, PrecisionParity
from sdedge.runtime.memory import peak_rss_bytes

from . import graph_passes
from .gates import Reference, check_gates, image_psnr, size_report, speed_gate, unet_parity
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


# -- the stage export runs -----------------------------------------------------------------------------------
def available_backends() -> list[str]:
    from sdedge.runtime.backends.openvino import openvino_available

    return ["onnxruntime"] + (["openvino"] if openvino_available() else [])


def apply_precision(stage_dir: Path, manifest: Manifest, reference: Reference, *, precision: Precision,
                    calibration_prompts: tuple[str, ...] = (), calibration_source: str = "",
                    calibration_steps: int = 10, calibration_size: int | None = None, int8_method: str = "nncf",
                    int8_samples: int = 16, min_cosine: float | None = None, min_psnr: float | None = None,
                    sensitivity: bool = True, speed_calls: int = 3, backends: list[str] | None = None,
                    pruned: bool = False, stages=None) -> Manifest:
    """Turn the fp32 bundle in `stage_dir` into `precision` (see the module docstring); returns its manifest."""
    from .bundle_writer import hash_files, write_manifest
    from .calibration import collect

    stages = stages or _NoStages()
    fp32_manifest = manifest
    plan = component_plan(precision, manifest.pipeline)
    work = scratch_dir(stage_dir.parent, "quant")
    try:
        calibration = None
        if precision is Precision.INT8:
            with stages(f"calibration: UNet inputs from {len(calibration_prompts)} prompts"):
                calibration = collect(stage_dir, calibration_prompts, work / "calibration", steps=calibration_steps,
                                      timesteps_per_prompt=calibration_steps, size=calibration_size,
                                      source=calibration_source)
        components = dict(manifest.components)
        if precision is not Precision.FP32:
            # the fp32 UNet moves aside: the speed gate's baseline
            (work / "fp32" / "unet").mkdir(parents=True)
            unet_info = manifest.components["unet"]
            for rel in (unet_info.file, *unet_info.external_data):
                os.replace(stage_dir / rel, work / "fp32" / rel)
            for name, info in manifest.components.items():
                p = plan[name]
                if p is Precision.FP32:  # kept as exported
                    components[name] = replace(info, precision=p)
                    continue
                src = (work / "fp32" / info.file) if name == "unet" else stage_dir / info.file
                with stages(f"{p.value} {name}"):
                    model = transform(name, p, src, work, calibration=calibration, int8_method=int8_method,
                                      int8_samples=int8_samples)
                    written = save_model(model, stage_dir / name)
                    del model
                    gc.collect()
                components[name] = replace(info, precision=p if p is not precision else None,
                                           opset=max(info.opset, 13) if p in (Precision.INT8, Precision.INT8_WEIGHTS)
                                           else info.opset,
                                           external_data=tuple(f"{name}/{w.name}" for w in written[1:]))
        # else (a pruned fp32 bundle): files unchanged, and the UNet is its own speed baseline
        manifest = replace(manifest, precision=precision, components=components)
        manifest = manifest.with_files(hash_files(stage_dir))
        write_manifest(stage_dir, manifest)

        # speed gate: on every installed backend, optimised vs fp32 UNet, same inputs
        ref_feeds = next(iter(reference.samples()))
        ref_feeds.pop("out_sample")
        reports = []
        fp32_bundle = Bundle(root=work / "fp32", manifest=fp32_manifest)
        test_bundle = Bundle(root=stage_dir, manifest=manifest)
        for backend in backends or available_backends():
            with stages(f"speed gate on {backend}"):
                make_fp32 = None if precision is Precision.FP32 else (lambda b=backend: _engine(b, fp32_bundle))
                reports.append(speed_gate(make_fp32, lambda b=backend: _engine(b, test_bundle), ref_feeds,
                                          backend=backend, calls=speed_calls))
            r = reports[-1]
            log.info("speed gate %s: fp32 %.3f s, %s %.3f s per UNet call: %.2fx", backend, r.fp32_seconds,
                     precision.value, r.seconds, r.ratio)
            if r.ratio < 1.0 and not pruned:
                log.warning("the %s UNet is NOT faster than fp32 on %s on this machine (%.2fx: %.3f s vs %.3f s "
                            "per call)", precision.value, backend, r.ratio, r.seconds, r.fp32_seconds)
        # parity on every timed backend: the same file may run accurately on one and not on another
        parities = {}
        for r in reports:
            with stages(f"parity gates on {r.backend}"):
                engine = _engine(r.backend, test_bundle)
                engine.load()
                parities[r.backend] = unet_parity(engine, reference, manifest.defaults.guidance)
                engine.unload()
                del engine
                gc.collect()
            log.info("parity %s: UNet cosine %.5f, after guidance %.4f", r.backend, *parities[r.backend][:2])
        best = choose_preferred(reports, {b: p[1] for b, p in parities.items()}, min_cosine)
        hint = BackendHint(preferred=best.backend, reason=f"{best.backend} {best.seconds:.3f} s per UNet call at "
                           f"{best.shape}, {best.ratio:.2f}x its fp32, cosine after guidance "
                           f"{parities[best.backend][1]:.4f}" + "".join(
                               f"; {r.backend} {r.seconds:.3f} s, cosine {parities[r.backend][1]:.4f}"
                               for r in reports if r is not best))
        manifest = replace(manifest, speed=tuple(reports), backend=hint)
        raw, gui, n = parities[best.backend]
        kept: list[str] = []
        if precision is Precision.INT8 and sensitivity and min_cosine is not None and gui < min_cosine:
            with stages("sensitivity sweep: layers kept in fp32"):
                manifest, raw, gui, kept = _sensitivity_sweep(stage_dir, manifest, reference, best.backend,
                                                              min_cosine, raw, gui)
        write_manifest(stage_dir, manifest)
        with stages(f"image parity on {best.backend}"):
            psnr_db = image_psnr(stage_dir, best.backend, reference)
        parity = PrecisionParity(unet_cosine=round(raw, 6), guided_cosine=round(gui, 6),
                                 guidance=manifest.defaults.guidance, samples=n, image_psnr_db=round(psnr_db, 2),
                                 backend=best.backend, min_cosine=min_cosine, min_psnr=min_psnr)
        described = _describe(precision, int8_method)
        if kept:
            described += f"; activations kept in fp32 in {', '.join(kept)} (sensitivity sweep)"
        prov = replace(manifest.provenance, quantisation=described,
                       calibration=calibration.source if calibration is not None else None,
                       export_peak_rss_bytes=peak_rss_bytes())
        manifest = replace(manifest, parity=replace(manifest.parity, precision=parity), provenance=prov,
                           sizes=size_report(fp32_manifest, manifest))
        write_manifest(stage_dir, manifest)
        check_gates(guided_cosine=gui, image_psnr_db=psnr_db, min_cosine=min_cosine, min_psnr=min_psnr,
                    what=f"the {precision.value} bundle")
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def choose_preferred(reports, guided: dict[str, float], min_cosine: float | None, slack: float = 0.01):
    """The fastest backend among those whose cosine after guidance meets `min_cosine` (when set) and is
    within `slack` of the best one measured: a faster but less exact engine is not preferred."""
    top = max(guided.values())
    ok = [r for r in reports if guided[r.backend] >= top - slack
          and (min_cosine is None or guided[r.backend] >= min_cosine)]
    return min(ok or [max(reports, key=lambda r: guided[r.backend])], key=lambda r: r.seconds)


def _describe(precision: Precision, int8_method: str) -> str | None:
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


def _engine(backend: str, bundle: Bundle, name: str = "unet"):
    info = bundle.manifest.components[name]
    if backend == "openvino":
        from sdedge.runtime.backends.openvino import OvEngine

        return OvEngine(bundle, name, info, cache_dir=None,
                        precision_hint=bundle.manifest.backend.openvino_inference_precision)
    from sdedge.runtime.backends.onnxruntime import OrtEngine

    return OrtEngine(bundle, name, info, ["CPUExecutionProvider"], cache_dir=None)


def _sensitivity_sweep(stage_dir: Path, manifest: Manifest, reference: Reference, backend: str, min_cosine: float,
                       raw: float, gui: float, max_groups: int = 4) -> tuple[Manifest, float, float, list[str]]:
    """Greedy: put back in fp32 (remove activation QDQ for) the UNet node group whose removal helps the guided
    cosine most, until the gate is met or `max_groups` groups are out. Returns the new manifest and figures."""
    from .bundle_writer import hash_files, write_manifest

    info = manifest.components["unet"]
    src = stage_dir / info.file
    base = load_model(src)
    kept: list[str] = []
    names = {n.name for n in base.graph.node}
    groups = [g for g in UNET_GROUPS if any(n.startswith(g) for n in names)]
    del base
    for _ in range(max_groups):
        best = None
        for g in (g for g in groups if g not in kept):
            m = graph_passes.remove_qdq_pairs(load_model(src), [*kept, g])
            trial = manifest
            with tempfile.TemporaryDirectory(dir=stage_dir.parent) as tmp:
                root = Path(tmp)
                written = save_model(m, root / "unet")
                del m
                files = hash_files(root)
                comp = replace(info, external_data=tuple(f"unet/{w.name}" for w in written[1:]))
                trial = replace(manifest, components={**manifest.components, "unet": comp}, files=files)
                engine = _engine(backend, Bundle(root=root, manifest=trial))
                engine.load()
                r, c, _ = unet_parity(engine, reference, manifest.defaults.guidance)
                engine.unload()
            log.info("sensitivity: fp32 %s -> guided cosine %.4f", g, c)
            if best is None or c > best[1]:
                best = (g, c, r)
        if best is None or best[1] <= gui:
            break
        kept.append(best[0])
        gui, raw = best[1], best[2]
        if gui >= min_cosine:
            break
    if kept:
        m = graph_passes.remove_qdq_pairs(load_model(src), kept)
        written = save_model(m, stage_dir / "unet")
        comp = replace(info, external_data=tuple(f"unet/{w.name}" for w in written[1:]))
        manifest = replace(manifest, components={**manifest.components, "unet": comp})
        manifest = manifest.with_files(hash_files(stage_dir))
        write_manifest(stage_dir, manifest)
        log.info("sensitivity sweep kept %s in fp32: guided cosine %.4f", kept, gui)
    return manifest, raw, gui, kept


class _NoStages:
    def __call__(self, label):
        import contextlib

        return contextlib.nullcontext()


def derive_bundle(src: str | Path, out: str | Path, opts, stages=None) -> Manifest:
    """A reduced-precision bundle from an existing fp32 bundle, without the PyTorch model: the fp32 bundle (checked
    against diffusers when it was exported) is the reference. `opts` is an ExportOptions; pruning needs
    the PyTorch model and is refused here."""
    from sdedge.runtime.errors import BadInput

    from .bundle_writer import staging_dir, write_manifest
    from .calibration import read_prompts
    from .gates import record_reference_bundle

    src = Path(src)
    fp32 = Bundle.open(src).manifest
    if fp32.precision is not Precision.FP32 or fp32.provenance.quantisation:
        raise BadInput(f"{src}: a {fp32.precision.value} bundle; derive from an fp32 bundle")
    if opts.prune:
        raise BadInput("--prune needs the PyTorch base (a diffusers folder), not a bundle")
    if opts.precision is Precision.FP32:
        raise BadInput(f"{src} is already fp32")
    stages = stages or _NoStages()
    prompts, source = read_prompts(opts.calibration)
    size = opts.parity_size or (fp32.parity.image.width if fp32.parity.image else fp32.shapes.default_width)
    lat = fp32.latent
    latents = np.random.default_rng(opts.parity_seed).standard_normal(
        (1, lat.channels, size // lat.vae_scale_factor, size // lat.vae_scale_factor), dtype=np.float32)
    with staging_dir(Path(out), overwrite=opts.overwrite, inputs=(src, opts.calibration)) as tmp:
        with stages("copy the fp32 bundle"):
            for rel in fp32.files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, tmp / rel)
            write_manifest(tmp, fp32)
        ref_dir = scratch_dir(Path(out).parent, "reference")
        try:
            with stages("fp32 reference run (the fp32 bundle)"):
                reference = record_reference_bundle(src, ref_dir, prompt=opts.parity_prompt, latents=latents,
                                                    steps=opts.parity_steps, guidance=fp32.defaults.guidance,
                                                    scheduler=opts.parity_scheduler)
            manifest = apply_precision(
                tmp, fp32, reference, precision=opts.precision, calibration_prompts=prompts,
                calibration_source=source, calibration_steps=opts.calibration_steps, calibration_size=size,
                int8_method=opts.int8_method, int8_samples=opts.int8_samples, min_cosine=opts.min_cosine,
                min_psnr=opts.min_psnr, speed_calls=opts.speed_calls, stages=stages,
                backends=list(opts.speed_backends) if opts.speed_backends else None)
        finally:
            shutil.rmtree(ref_dir, ignore_errors=True)
    return manifest
