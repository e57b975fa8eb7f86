"""Static int8 of the UNet as OpenVINO's own model: NNCF applied to the OpenVINO model read from the fp32 bundle's
ONNX (`sdedge export --precision int8 --int8-method openvino`).

    fp32 bundle ─► calibration: UNet inputs of the bundle's own generations (pipeline_precision.calibrate, ONNX Runtime)
                ─► core.read_model(unet/model.onnx) ─► nncf.quantize(ov_model, ..., model_type=TRANSFORMER)
                ─► unet/openvino_int8.xml + .bin in the bundle (ComponentInfo.openvino_ir), hashed like every file
                ─► speed gate: the int8 IR against the fp32 ONNX on OpenVINO (at the compute `auto` gives an fp32
                   bundle here: bf16 on a CPU with native bf16, else f32), and ONNX Runtime fp32
                ─► parity gates on OpenVINO: UNet cosine raw and after guidance, final-image PSNR (gates.py)

Why not the QDQ ONNX of quantize.py (`--int8-method nncf|ort`): on a 2-core AVX-512 VNNI + BF16 CPU OpenVINO ran
NNCF's QDQ ONNX of the sd15 UNet at cosine after guidance 0.63 (wrong), ONNX Runtime at 0.976 but slower than its
own fp32; quantised by NNCF's OpenVINO backend the same UNet ran 1.60x OpenVINO bf16 at 0.984 (issue 19).

What the bundle holds: the UNet's ONNX stays fp32, so ONNX Runtime (a CPU without VNNI, or where the gate did not
prefer the IR) runs it exactly; OpenVINO reads the IR instead (runtime/backends/openvino.py). The text encoder and
the VAE stay fp32 files; OpenVINO runs them in bf16 where the CPU has it (the bundle's precision is int8).
The manifest's backend hint prefers OpenVINO only when the IR measured faster than both other engines and its
cosine after guidance meets the floor (`--min-cosine`, else select.INT8_IR_FLOOR): `auto`'s own rule for such a
bundle (runtime/backends/select.py int8_ir_gate), so export and runtime cannot disagree.
"""

from __future__ import annotations

import gc
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from sdedge.runtime.bundle import Bundle
from sdedge.runtime.errors import MissingDependency
from sdedge.runtime.manifest import BackendHint, Manifest, Precision, PrecisionParity
from sdedge.runtime.memory import peak_rss_bytes

from .bundle_writer import hash_files, write_manifest
from .gates import (
    GateFailed,
    Reference,
    check_gates,
    engine_for,
    engine_parity,
    image_psnr,
    size_report,
    speed_gate,
)

log = logging.getLogger("sdedge.export")

IR_FILES = ("unet/openvino_int8.xml", "unet/openvino_int8.bin")


def require() -> None:
    """Refuse --int8-method openvino up front (before any export work) where OpenVINO or NNCF is missing."""
    import importlib.util

    missing = [m for m in ("openvino", "nncf") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(f"--int8-method openvino needs {' and '.join(missing)}: pip install "
                                "'sdedge[openvino]' nncf")


def quantize_unet_ir(onnx_path: Path, calibration, xml_path: Path, *, samples: int) -> int:
    """NNCF's static int8 (TRANSFORMER preset) of the OpenVINO model read from `onnx_path`, calibrated on
    `samples` UNet calls of `calibration`, saved as `xml_path` (+ .bin beside it); returns the calls used."""
    require()
    import nncf
    import openvino as ov

    from sdedge.runtime.backends.openvino import core

    from .quantize import quiet_nncf

    quiet_nncf()
    calib = calibration.subset(samples)
    model = core().read_model(str(onnx_path))  # reads external data beside it by path
    q = nncf.quantize(model, nncf.Dataset(calib), subset_size=len(calib), model_type=nncf.ModelType.TRANSFORMER)
    del model
    gc.collect()
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(q, str(xml_path))  # weights left in fp32 are stored fp16 (OpenVINO's default)
    del q
    gc.collect()
    return len(calib)


def fp32_view(bundle: Bundle, hint: str) -> Bundle:
    """The same bundle as OpenVINO sees it without the IR: the fp32 ONNX UNet, compiled with `hint` (the speed
    gate's baseline)."""
    m = bundle.manifest
    unet = replace(m.components["unet"], openvino_ir=(), precision=Precision.FP32)
    return Bundle(root=bundle.root, manifest=replace(m, components={**m.components, "unet": unet},
                                                     backend=BackendHint(openvino_inference_precision=hint)))


def int8_ir(run) -> None:
    """Stage (export/build.py PRECISION, after calibrate): `--precision int8 --int8-method openvino` on the fp32
    bundle in the staging folder: the IR from the calibration data, the manifest, the gates; then
    `run.precision_done`, so the QDQ transforms and their gates pass (pipeline_precision.generic)."""
    opts = run.opts
    if not (run.optimise and opts.precision is Precision.INT8 and opts.int8_method == "openvino"):
        return
    unet = run.manifest.components["unet"]
    with run.stages(f"int8 UNet: NNCF on the OpenVINO model ({min(opts.int8_samples, len(run.calibration))} calls)"):
        used = quantize_unet_ir(run.tmp / unet.file, run.calibration, run.tmp / IR_FILES[0], samples=opts.int8_samples)
    shutil.rmtree(run.work / "calibration", ignore_errors=True)  # GBs at SD1.5 sizes: gone before the gates load
    components = {**run.manifest.components, "unet": replace(unet, openvino_ir=IR_FILES)}
    manifest = replace(run.manifest, precision=Precision.INT8, components=components).with_files(hash_files(run.tmp))
    write_manifest(run.tmp, manifest)
    run.manifest = _gates(run.tmp, run.fp32_manifest, manifest, run.reference, used=used, min_cosine=opts.min_cosine,
                          min_psnr=opts.min_psnr, speed_calls=opts.speed_calls, stages=run.stages,
                          source=run.prompts_source)
    run.precision_done = True


def _gates(stage_dir: Path, fp32_manifest: Manifest, manifest: Manifest, reference: Reference, *, used: int,
           min_cosine, min_psnr, speed_calls: int, stages, source: str) -> Manifest:
    """Speed on both backends, parity of the IR on OpenVINO, the backend hint; raises GateFailed on a missed gate."""
    from sdedge.runtime.backends.openvino import cpu_has_bf16
    from sdedge.runtime.backends.select import int8_ir_gate

    feeds = next(iter(reference.samples()))
    feeds.pop("out_sample")
    bundle = Bundle(root=stage_dir, manifest=manifest)
    fp32_hint = "bf16" if cpu_has_bf16() else "f32"  # what auto gives an fp32 bundle on OpenVINO here
    with stages("speed gate on openvino (int8 IR vs the fp32 ONNX)"):
        ov = speed_gate(lambda: engine_for("openvino", fp32_view(bundle, fp32_hint)),
                        lambda: engine_for("openvino", bundle), feeds, backend="openvino", calls=speed_calls)
    with stages("speed gate on onnxruntime (the fp32 ONNX UNet)"):
        ort = speed_gate(None, lambda: engine_for("onnxruntime", bundle), feeds, backend="onnxruntime",
                         calls=speed_calls)
    log.info("speed gate: OpenVINO int8 IR %.3f s, fp32 ONNX on OpenVINO (%s) %.3f s, ONNX Runtime fp32 %.3f s "
             "per UNet call", ov.seconds, fp32_hint, ov.fp32_seconds, ort.seconds)
    with stages("parity gates on openvino"):
        raw, gui, n = engine_parity("openvino", bundle, reference, manifest.defaults.guidance)
    log.info("parity openvino int8 IR: UNet cosine %.5f, after guidance %.4f", raw, gui)
    parity = PrecisionParity(unet_cosine=round(raw, 6), guided_cosine=round(gui, 6), guidance=manifest.defaults.guidance,
                             samples=n, backend="openvino", min_cosine=min_cosine, min_psnr=min_psnr)
    manifest = replace(manifest, speed=(ov, ort), parity=replace(manifest.parity, precision=parity))
    ok, figures = int8_ir_gate(manifest)  # the rule `auto` applies to this bundle (runtime/backends/select.py)
    hint = BackendHint(preferred="openvino" if ok else "onnxruntime",
                       reason=figures if ok else f"{figures}, so ONNX Runtime runs the exact fp32 UNet")
    manifest = replace(manifest, backend=hint)
    write_manifest(stage_dir, manifest)
    with stages("image parity on openvino"):
        psnr_db = image_psnr(stage_dir, "openvino", reference)
    parity = replace(parity, image_psnr_db=round(psnr_db, 2))
    described = (f"static int8 of the UNet as an OpenVINO IR (NNCF on the OpenVINO model, TRANSFORMER preset, "
                 f"{used} calibration calls); the UNet's ONNX, text encoder and VAE kept fp32 (bf16 compute on "
                 f"OpenVINO where the CPU has it)")
    prov = replace(manifest.provenance, quantisation=described, calibration=source or None,
                   export_peak_rss_bytes=peak_rss_bytes())
    manifest = replace(manifest, parity=replace(manifest.parity, precision=parity), provenance=prov,
                       sizes=size_report(fp32_manifest, manifest))
    write_manifest(stage_dir, manifest)
    check_gates(guided_cosine=gui, image_psnr_db=psnr_db, min_cosine=min_cosine, min_psnr=min_psnr,
          what="the int8 (OpenVINO IR) bundle")
    return manifest


__all__ = ["GateFailed", "IR_FILES", "fp32_view", "int8_ir", "quantize_unet_ir", "require"]
