"""What `sdedge export` may be asked (`ExportOptions`), and the checks that refuse a bad request before anything
loads: the target, int8 method, pruning ratio, gates, batch range, default scheduler/steps/guidance, --decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sdedge.runtime.errors import BadInput, MissingDependency
from sdedge.runtime.manifest import Precision

DETERMINISTIC_SCHEDULERS = ("ddim", "pndm", "euler", "dpm++2m", "dpm++2m-karras")


@dataclass(frozen=True)
class ExportOptions:
    target: str = "onnx"
    precision: Precision = Precision.FP32
    opset: int = 17
    batch_min: int = 1
    batch_max: int = 8
    size_min: int | None = None  # pixels; default: half the base's native size
    size_max: int | None = None  # pixels; default: twice the base's native size
    vae_encoder: bool = True
    default_scheduler: str | None = None  # None: the base's (euler for SDXL, as diffusers; dpm++2m else)
    default_steps: int | None = None  # None: 4 with lcm (LCM-LoRAs run 2 to 8), else 20; lcm: at most the
    # schedule's original_inference_steps
    default_guidance: float | None = None  # None: the base's hint (sdedge_base.json), else 7.5
    parity_prompt: str = "a red circle on a blue background"
    parity_seed: int = 0
    parity_steps: int = 10
    parity_scheduler: str = "ddim"
    parity_size: int | None = None  # pixels; default: the native size, at most 256
    min_psnr: float | None = None  # dB; None: 40 for an fp32 bundle (vs diffusers), recorded but not gated otherwise
    min_cosine: float | None = None  # gate on the UNet's cosine after guidance vs fp32 (reduced precisions, pruning)
    calibration: str | None = None  # prompts file (one per line) for static int8; None: the built-in set
    calibration_steps: int = 10  # steps per calibration prompt (each recorded)
    int8_method: str = "nncf"  # static int8 quantiser: nncf | ort (QDQ ONNX) | openvino (an IR: export/openvino_int8.py)
    int8_samples: int = 16  # UNet calls the quantiser calibrates on, spread over prompts and timesteps
    prune: float = 0.0  # structural pruning ratio of the UNet's channels (torch-pruning)
    prune_criterion: str = "magnitude"
    reference_base: str | None = None  # a pruned base's unpruned parent, where it is not at the path its note records
    speed_calls: int = 3  # UNet calls per engine in the speed gate
    speed_backends: tuple[str, ...] | None = None  # backends the speed gate times (None: every installed one)
    loras: tuple[tuple[str, float], ...] = ()  # (adapter .safetensors, scale), fused into the weights in order
    allow_pickle: bool = False
    base_config: str | None = None  # local diffusers folder with the configs, for a single-file base
    decoder: str | None = None  # a diffusers AutoencoderTiny (TAESD) or AutoencoderKL folder: the bundle's vae_decoder
    decoder_images: int = 4  # generations whose decodes are compared with the full VAE decoder's
    overwrite: bool = False

    def __post_init__(self):  # the steps default follows the scheduler, as the CLI's --steps does
        if self.default_steps is None:
            object.__setattr__(self, "default_steps", 4 if self.default_scheduler == "lcm" else 20)


def check_options(opts: ExportOptions) -> None:
    if opts.target != "onnx":
        if opts.target == "trt":
            from sdedge.runtime.backends.tensorrt_probe import require_tensorrt

            require_tensorrt("--target trt")
            raise MissingDependency(
                "--target trt: TensorRT is usable here, but this sdedge version does not build TensorRT engines yet; "
                "export with --target onnx and run it with --backend onnxruntime --device cuda"
            )
        raise BadInput(f"--target {opts.target!r}: choose onnx or trt")
    if opts.int8_method not in ("nncf", "ort", "openvino"):
        raise BadInput(f"--int8-method {opts.int8_method!r}: choose nncf, ort or openvino")
    if opts.int8_method == "openvino" and opts.precision is Precision.INT8:
        from .openvino_int8 import require

        require()  # OpenVINO and NNCF, before any work
    if opts.prune != 0.0:  # 0: no pruning
        from .prune import check_ratio

        check_ratio(opts.prune, "--prune")
    if opts.min_cosine is not None and not -1.0 <= opts.min_cosine <= 1.0:
        raise BadInput(f"--min-cosine {opts.min_cosine:g}: a cosine is between -1 and 1")
    if not 1 <= opts.batch_min <= opts.batch_max:
        raise BadInput(f"batch range {opts.batch_min}-{opts.batch_max} is empty")
    check_defaults(opts)
    if opts.decoder is not None:
        from .decoder import read_decoder_config

        read_decoder_config(opts.decoder)
    if opts.parity_scheduler not in DETERMINISTIC_SCHEDULERS:
        raise BadInput(f"parity scheduler must be deterministic: one of {', '.join(DETERMINISTIC_SCHEDULERS)}")


def check_defaults(opts: ExportOptions) -> None:
    """The bundle's default scheduler, steps and guidance (the LCM step limit needs the base: check_lcm_steps)."""
    from sdedge.runtime.pipeline import MAX_STEPS
    from sdedge.runtime.schedulers import scheduler_names

    if opts.default_scheduler is not None and opts.default_scheduler not in scheduler_names():
        raise BadInput(f"--scheduler {opts.default_scheduler!r}: choose one of {', '.join(scheduler_names())}")
    steps = opts.default_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise BadInput(f"--steps {steps!r}: must be an integer from 1 to {MAX_STEPS}")
    g = opts.default_guidance
    if g is not None and not (isinstance(g, (int, float)) and math.isfinite(g) and g >= 0):
        raise BadInput(f"--guidance {g!r}: must be a finite number >= 0 (<= 1: no guidance pass)")


def check_lcm_steps(opts: ExportOptions, sched_config: dict) -> None:
    """An LCM bundle's default steps against the schedule's original_inference_steps, before anything is written."""
    if opts.default_scheduler != "lcm":
        return
    from sdedge.runtime.schedulers import SchedulerConfig

    n = SchedulerConfig.from_dict(sched_config).original_inference_steps
    if opts.default_steps > n:
        raise BadInput(f"--steps {opts.default_steps} with --scheduler lcm: the LCM schedule has "
                       f"original_inference_steps = {n}, so at most {n} steps (LCM-LoRAs run 2 to 8)")
