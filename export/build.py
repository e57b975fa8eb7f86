"""`sdedge export`: a base and LoRA adapters in, a bundle folder out, as one ordered list of stages.

`FROM_BASE` below is the whole export from a PyTorch base, top to bottom; `FROM_BUNDLE` derives a reduced precision
from an fp32 bundle without PyTorch. A stage is `stage(run: ExportRun) -> None` (export/pipeline_run.py): it reads
what the stages above it left on `run` and leaves its own result there; one that does not apply to this export
returns at once. Adding a stage is one line in a list. The stages live in pipeline_base.py (the PyTorch base up to
the fp32 manifest), pipeline_parity.py (end-to-end checks of the written bundle) and pipeline_precision.py (the
reduced precision and its gates); what they call (onnx_export, quantize, gates, calibration, reference,
bundle_writer, ...) never imports a stage or this module (tests/test_layers.py holds that).
"""

from __future__ import annotations

from pathlib import Path

from sdedge.runtime.errors import BadInput
from sdedge.runtime.files import check_replaceable
from sdedge.runtime.manifest import Manifest
from sdedge.runtime.stages import Stages

from . import openvino_int8
from . import pipeline_base as base
from . import pipeline_parity as parity
from . import pipeline_precision as precision
from .options import ExportOptions, check_options
from .pipeline_parity import parity_picture  # noqa: F401 (re-exported: the image-to-image parity picture)
from .pipeline_run import ExportRun, Stage, run_stages

# The reduced precision and its gates, on the fp32 bundle in the staging folder (nothing for a plain fp32 export).
PRECISION: tuple[Stage, ...] = (
    precision.open_work,  # a work folder; the fp32 manifest kept
    precision.calibrate,  # int8: the UNet's inputs from the fp32 bundle
    openvino_int8.int8_ir,  # int8, --int8-method openvino: the UNet's OpenVINO IR, gated (the QDQ stages then pass)
    precision.transform_components,  # each component to its precision (export/quantize.py)
    precision.speed_gates,  # optimised vs fp32 UNet per backend
    precision.parity_gates,  # cosines vs the fp32 truth per backend; the preferred backend
    precision.sensitivity_sweep,  # int8 under --min-cosine: node groups back to fp32
    precision.image_parity_gate,  # the image vs the truth's
    precision.record_precision,  # parity, quantisation, calibration, sizes into the manifest
    precision.user_gates,  # --min-cosine, --min-psnr
    precision.drop_work,
)

FROM_BASE: tuple[Stage, ...] = (
    base.read_pruned_note,  # a pruned base's note and parent; optimised or not
    base.default_guidance,  # LCM defaults: no guidance pass; else the base's hint
    base.record_parent_truth,  # a pruned base: the unpruned parent's fp32 run
    base.load,  # the base; its default scheduler
    base.lcm_step_limit,  # LCM: default steps within original_inference_steps
    base.geometry,  # shape range, parity size
    base.swap_decoder,  # --decoder in place of the base VAE
    base.fuse,  # LoRAs
    base.record_fp32_truth,  # the fp32 truth of an optimised bundle
    base.prune,  # --prune
    base.open_staging,  # the folder renamed to --out at the end
    base.export_components,  # ONNX per component, parity vs PyTorch each
    base.save_tokenizers,
    base.describe_bundle,  # the fp32 manifest
    base.sdxl_fields,  # SDXL: tokenizer_2, conditioning settings
    base.write_fp32_manifest,  # SHA-256 of every file
    parity.end_to_end_parity,  # image vs diffusers; --decoder vs the full VAE decoder
    parity.fp32_gate,  # 40 dB (or --min-psnr)
    parity.prompt_match_fp32,
    precision.release_pytorch,
    precision.read_calibration_prompts,
    *PRECISION,
    parity.prompt_match_final,
)

FROM_BUNDLE: tuple[Stage, ...] = (
    precision.check_fp32_source,  # an fp32 bundle, a reduced precision, no pruning
    precision.read_calibration_prompts,
    base.open_staging,
    precision.copy_fp32_bundle,
    precision.record_bundle_truth,  # the fp32 bundle's own run on ONNX Runtime
    *PRECISION,
)


def export_bundle(base: str | Path, out: str | Path, opts: ExportOptions | None = None,
                  stages: Stages | None = None, prompt_match=None) -> Manifest:
    """Export `base` to a bundle at `out`; returns the manifest written.

    `prompt_match(bundle_dir) -> (rate, prompts, seed)` scores how well a bundle's images match their prompts
    (for the trained tiny base the CLI hands in `sdedge.tinyworld.classifier.bundle_prompt_match`): recorded
    for the fp32 bundle and, when optimised, for the final one, in `parity.prompt_match`.

    `base` may also be an fp32 sdedge bundle: then a reduced precision is derived from it without the PyTorch model
    (`FROM_BUNDLE`). `opts`: ExportOptions() when None."""
    opts = opts or ExportOptions()
    check_options(opts)
    # before the (long) load: a non-empty --out is replaced only when it is a bundle and holds no input
    inputs = (base, opts.base_config, opts.reference_base, opts.calibration, *(p for p, _ in opts.loras))
    check_replaceable(out, {"sdedge.json": None}, inputs, overwrite=opts.overwrite)
    from_bundle = (Path(base) / "sdedge.json").is_file()
    if from_bundle and opts.decoder is not None:
        raise BadInput(f"--decoder: {base} is a bundle; a decoder is exported from the base (--base a diffusers "
                       "folder), not derived from a bundle")
    run = ExportRun(base=base, out=Path(out), opts=opts, stages=stages or Stages(quiet=True),
                    prompt_match=prompt_match, inputs=inputs)
    return run_stages(run, FROM_BUNDLE if from_bundle else FROM_BASE)
