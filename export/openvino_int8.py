"""Static int8 of the UNet as OpenVINO's own model: NNCF applied to the OpenVINO model read from the fp32 bundle's
ONNX (`sdedge export --precision int8 --int8-method openvino`).

    fp32 bundle ─► calibration: UNet inputs of the bundle's own generations (calibration.collect, ONNX Runtime fp32)
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

import contextlib
import gc
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from sdedge.runtime.bundle import Bundle
from sdedge.runtime.errors import MissingDependency
from sdedge.runtime.files import scratch_dir
from sdedge.runtime.manifest import BackendHint, Manifest, Precision, PrecisionParity
from sdedge.runtime.memory import peak_rss_bytes

from .bundle_writer import hash_files, write_manifest
from .gates import GateFailed, Reference, check_gates, image_psnr, size_report, speed_gate, unet_parity

log = logging.getLogger("sdedge.export")

IR_FILES = ("unet/openvino_int8.xml", "unet/openvino_int8.bin")


def quantize_unet_ir(onnx_path: Path, calibration, xml_path: Path, *, samples: int) -> int:
    """NNCF's static int8 (TRANSFORMER preset) of the OpenVINO model read from `onnx_path`, calibrated on
    `samples` UNet calls of `calibration`, saved as `xml_path` (+ .bin beside it); returns the calls used."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        raise MissingDependency("--int8-method openvino needs OpenVINO and NNCF: pip install 'sdedge[openvino]' nncf"
                                ) from None
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


def _engine(bundle: Bundle, backend: str, hint: str | None = None):
    info = bundle.manifest.components["unet"]
    if backend == "openvino":
        from sdedge.runtime.backends.openvino import OvEngine

        return OvEngine(bundle, "unet", info, cache_dir=None, precision_hint=hint)
    from sdedge.runtime.backends.onnxruntime import OrtEngine

    return OrtEngine(bundle, "unet", info, ["CPUExecutionProvider"], cache_dir=None)


def fp32_view(bundle: Bundle) -> Bundle:
    """The same bundle as OpenVINO sees it without the IR: the fp32 ONNX UNet (the speed gate's baseline)."""
    m = bundle.manifest
    unet = replace(m.components["unet"], openvino_ir=(), precision=Precision.FP32)
    return Bundle(root=bundle.root, manifest=replace(m, components={**m.components, "unet": unet}))


def apply_int8_ir(stage_dir: Path, manifest: Manifest, reference: Reference, *, precision: Precision = Precision.INT8,
                  calibration_prompts: tuple[str, ...] = (), calibration_source: str = "", calibration_steps: int = 10,
                  calibration_size: int | None = None, int8_samples: int = 16, min_cosine: float | None = None,
                  min_psnr: float | None = None, speed_calls: int = 3, stages=None, **_ignored) -> Manifest:
    """The int8 bundle of this module (docstring) from the fp32 bundle in `stage_dir`; returns its manifest.
    Takes apply_precision's keywords (int8_method, sensitivity, backends, pruned do not apply here)."""
    from .calibration import collect

    stages = stages or (lambda label: contextlib.nullcontext())
    fp32_manifest = manifest
    work = scratch_dir(stage_dir.parent, "int8-ir")
    try:
        with stages(f"calibration: UNet inputs from {len(calibration_prompts)} prompts"):
            calibration = collect(stage_dir, calibration_prompts, work / "calibration", steps=calibration_steps,
                                  timesteps_per_prompt=calibration_steps, size=calibration_size,
                                  source=calibration_source)
        unet = manifest.components["unet"]
        with stages(f"int8 UNet: NNCF on the OpenVINO model ({min(int8_samples, len(calibration))} calls)"):
            used = quantize_unet_ir(stage_dir / unet.file, calibration, stage_dir / IR_FILES[0], samples=int8_samples)
        shutil.rmtree(work / "calibration", ignore_errors=True)
        components = {**manifest.components, "unet": replace(unet, openvino_ir=IR_FILES)}
        manifest = replace(manifest, precision=Precision.INT8, components=components)
        manifest = manifest.with_files(hash_files(stage_dir))
        write_manifest(stage_dir, manifest)
        return _gates(stage_dir, fp32_manifest, manifest, reference, used=used, min_cosine=min_cosine,
                      min_psnr=min_psnr, speed_calls=speed_calls, stages=stages, source=calibration_source)
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
        ov = speed_gate(lambda: _engine(fp32_view(bundle), "openvino", fp32_hint), lambda: _engine(bundle, "openvino"),
                        feeds, backend="openvino", calls=speed_calls)
    with stages("speed gate on onnxruntime (the fp32 ONNX UNet)"):
        ort = speed_gate(None, lambda: _engine(bundle, "onnxruntime"), feeds, backend="onnxruntime", calls=speed_calls)
    log.info("speed gate: OpenVINO int8 IR %.3f s, fp32 ONNX on OpenVINO (%s) %.3f s, ONNX Runtime fp32 %.3f s "
             "per UNet call", ov.seconds, fp32_hint, ov.fp32_seconds, ort.seconds)
    with stages("parity gates on openvino"):
        engine = _engine(bundle, "openvino")
        engine.load()
        raw, gui, n = unet_parity(engine, reference, manifest.defaults.guidance)
        engine.unload()
        del engine
        gc.collect()
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


__all__ = ["GateFailed", "IR_FILES", "apply_int8_ir", "fp32_view", "quantize_unet_ir"]
