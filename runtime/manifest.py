"""The bundle manifest `sdedge.json` (format "sdedge-bundle", version 2), as frozen dataclasses.

A bundle is a folder:

    sdedge.json               this manifest
    text_encoder/model.onnx   input_ids (B, 77) int64            -> last_hidden_state (B, 77, D)
    unet/model.onnx           sample (B, 4, h, w), timestep (B,), encoder_hidden_states (B, 77, D)
                              -> out_sample (B, 4, h, w); an inpainting UNet's sample has 9 channels
                              (latents ⊕ mask ⊕ masked-image latents): Pipeline.is_inpaint
    vae_decoder/model.onnx    latent_sample (B, 4, h, w)         -> sample (B, 3, 8h, 8w) in [-1, 1]
    vae_encoder/model.onnx    sample (B, 3, 8h, 8w)              -> latent_moments (B, 8, h, w)
    tokenizer/tokenizer.json
    model.sig                 (optional) OpenSSF model-signing bundle over every file above

`files` lists every file but sdedge.json and model.sig with its SHA-256 and size. Every path stays inside
the bundle: absolute paths and `..` are rejected at parse time. Version 2 differs from version 1 only in how it
says so (runtime/documents.py's "format" and "version" keys for version 1's "format_version": 1); both read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from .documents import DocumentType, Legacy
from .errors import BundleError
from .strict import ConfigError, parse_json, read_capped

FORMAT_VERSION = 2
MANIFEST_NAME = "sdedge.json"
SIGNATURE_NAME = "model.sig"
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
PIPELINES = ("sd15", "sdxl")  # sdxl: text_encoder_2 and tokenizer_2 too, and the UNet's text_embeds / time_ids
REQUIRED_BY_PIPELINE = {"sd15": REQUIRED_COMPONENTS, "sdxl": (*REQUIRED_COMPONENTS, "text_encoder_2")}


class Precision(str, enum.Enum):
    """Numeric precision of a bundle's weights and compute (one enum, not a flag per format)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"  # static: weights and activations
    INT8_WEIGHTS = "int8-weights"  # weight-only


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[int | str, ...]  # ints are fixed, strings are named dynamic axes


@dataclass(frozen=True)
class ComponentInfo:
    file: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    opset: int
    external_data: tuple[str, ...] = ()
    precision: Precision | None = None  # this component's precision when it differs from the bundle's
    openvino_ir: tuple[str, ...] = ()  # (model.xml, model.bin): OpenVINO's own IR beside the ONNX, preferred by it


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ShapeRange:
    """What sizes the exported graphs accept, in pixels; the runtime refuses anything outside."""

    batch_min: int
    batch_max: int
    height_min: int
    height_max: int
    width_min: int
    width_max: int
    pixel_multiple: int  # 8 × the UNet's down-sampling factor
    default_height: int
    default_width: int


@dataclass(frozen=True)
class LatentInfo:
    channels: int
    vae_scale_factor: int  # pixels per latent
    scaling_factor: float  # the VAE's: the encoder's latents are multiplied by it, the decoder's divided
    # the vae_decoder's own when it is not the base VAE's (a TAESD-architecture AutoencoderTiny: 1.0, it decodes the
    # UNet's latents directly); None: scaling_factor
    decoder_scaling_factor: float | None = None

    @property
    def decoder_scaling(self) -> float:
        """What the runtime divides the final latents by before the vae_decoder."""
        return self.scaling_factor if self.decoder_scaling_factor is None else self.decoder_scaling_factor


@dataclass(frozen=True)
class TokenizerInfo:
    dir: str
    max_length: int


@dataclass(frozen=True)
class SdxlInfo:
    """SDXL's conditioning settings (runtime/sdxl.py): an empty negative prompt becomes zero embeddings when
    force_zeros_for_empty_prompt (as diffusers' StableDiffusionXLPipeline does when no negative prompt is given)."""

    force_zeros_for_empty_prompt: bool = True


@dataclass(frozen=True)
class Defaults:
    steps: int
    guidance: float
    scheduler: str


@dataclass(frozen=True)
class BaseInfo:
    id: str
    sha256: str


@dataclass(frozen=True)
class AdapterInfo:
    file: str
    sha256: str
    scale: float


@dataclass(frozen=True)
class PruneReport:
    """Structural pruning of the UNet: parameters and multiply-accumulates (one image) before and after."""

    ratio: float
    criterion: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    macs_shape: str  # the sample shape the MACs were counted at


@dataclass(frozen=True)
class Provenance:
    base: BaseInfo
    created: str  # ISO 8601, UTC
    toolchain: dict[str, str]  # package -> version
    adapters: tuple[AdapterInfo, ...] = ()
    prune_ratio: float = 0.0
    quantisation: str | None = None
    calibration: str | None = None
    prune: PruneReport | None = None
    export_peak_rss_bytes: int | None = None
    pruned_from: BaseInfo | None = None  # a pruned base's unpruned parent: the truth its parity gates measured against


@dataclass(frozen=True)
class ComponentParity:
    max_abs_err: float
    tolerance: float
    shapes: tuple[str, ...]  # the sample shapes it was measured on


@dataclass(frozen=True)
class ImageParity:
    psnr_db: float
    scheduler: str
    steps: int
    guidance: float
    width: int
    height: int
    seed: int


@dataclass(frozen=True)
class PrecisionParity:
    """A reduced-precision (or pruned) bundle against the fp32 reference on the same inputs and latents."""

    unet_cosine: float  # cosine of the UNet's raw output (both halves of the guided batch)
    guided_cosine: float  # cosine of u + guidance·(c − u), the figure that predicts the image
    guidance: float
    samples: int  # UNet calls compared (prompts × timesteps)
    image_psnr_db: float | None = None  # final image vs the fp32 reference (diffusers) on the same latents
    backend: str = "onnxruntime"  # the engine the figures were measured with
    min_cosine: float | None = None  # the gates export applied
    min_psnr: float | None = None


@dataclass(frozen=True)
class Parity:
    components: dict[str, ComponentParity] = field(default_factory=dict)
    image: ImageParity | None = None
    precision: PrecisionParity | None = None
    prompt_match: PromptMatch | None = None  # the trained tiny base only (sdedge export of it)
    decoder: DecoderParity | None = None  # a vae_decoder other than the base VAE's (sdedge export --decoder)


@dataclass(frozen=True)
class DecoderParity:
    """The bundle's vae_decoder when it replaces the base VAE's decoder (`sdedge export --decoder DIR`): what it is,
    and its images against the full decoder's on the same final latents (the image parity above is against
    diffusers' pipeline using this decoder)."""

    kind: str  # the diffusers class: "AutoencoderTiny" | "AutoencoderKL"
    source: str  # the folder's name
    sha256: str  # of its weights file
    psnr_vs_full_db: float  # mean image PSNR against the base's own VAE decoder
    images: int  # decodes compared
    width: int
    height: int


@dataclass(frozen=True)
class PromptMatch:
    """On the trained tiny base: the share of the bundle's images whose shape, colour and background match their
    prompt (the shape classifier of sdedge.tinyworld.classifier), and the same for the fp32 bundle it came from."""

    rate: float
    rate_fp32: float | None  # None: the bundle is the fp32 one
    prompts: int
    seed: int


@dataclass(frozen=True)
class SpeedReport:
    """The optimised UNet timed against the fp32 one on the exporting machine (same backend, same inputs)."""

    backend: str
    fp32_seconds: float  # median seconds per UNet call
    seconds: float
    ratio: float  # fp32_seconds / seconds: > 1 is faster
    calls: int
    shape: str  # the sample shape timed
    threads: int
    machine: str


@dataclass(frozen=True)
class SizeReport:
    """Bytes per component (all its files) of the fp32 export and of the bundle as written."""

    before: dict[str, int]
    after: dict[str, int]


@dataclass(frozen=True)
class BackendHint:
    """What export measured about backends; the runtime's `auto` rule reads it (runtime/backends/select.py)."""

    preferred: str | None = None  # "onnxruntime" | "openvino", the fastest measured at export
    reason: str = ""
    openvino_inference_precision: str | None = None  # "bf16" | "f32"; None: by the bundle's precision


@dataclass(frozen=True)
class Manifest:
    pipeline: str  # "sd15" | "sdxl" (PIPELINES); a manifest without it is "sd15"
    precision: Precision
    components: dict[str, ComponentInfo]
    files: dict[str, FileEntry]
    shapes: ShapeRange
    latent: LatentInfo
    tokenizer: TokenizerInfo
    scheduler: dict[str, Any]  # diffusers-style scheduler config (sdedge.runtime.schedulers.SchedulerConfig)
    defaults: Defaults
    provenance: Provenance
    parity: Parity = field(default_factory=Parity)
    sizes: SizeReport | None = None
    speed: tuple[SpeedReport, ...] = ()
    backend: BackendHint = field(default_factory=BackendHint)
    tokenizer_2: TokenizerInfo | None = None  # sdxl: text_encoder_2's tokenizer
    sdxl: SdxlInfo | None = None  # sdxl: what its text conditioning needs besides the graphs

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION

    def to_json(self) -> str:
        return MANIFEST.to_json(self)

    def with_files(self, files: dict[str, FileEntry]) -> Manifest:
        return replace(self, files=files)


def parse_manifest(data: Any, where: str = MANIFEST_NAME) -> Manifest:
    """Validate a manifest dict: known format and version, known keys, paths inside the bundle."""
    if isinstance(data, dict) and "pipeline" not in data:  # written before SDXL: every such bundle is SD 1.5
        data = {**data, "pipeline": "sd15"}
    return MANIFEST.parse(data, where)


def _check(manifest: Manifest, where: str) -> None:
    if manifest.pipeline not in PIPELINES:
        raise BundleError(f"{where}: unknown pipeline {manifest.pipeline!r} (known: {', '.join(PIPELINES)})")
    for name in REQUIRED_BY_PIPELINE[manifest.pipeline]:
        if name not in manifest.components:
            raise BundleError(f"{where}: the {manifest.pipeline} bundle has no {name!r} component")
    if manifest.pipeline == "sdxl" and manifest.tokenizer_2 is None:
        raise BundleError(f"{where}: the sdxl bundle has no 'tokenizer_2'")
    for name, comp in manifest.components.items():
        if name not in COMPONENTS:
            raise BundleError(f"{where}: unknown component {name!r} (known: {', '.join(COMPONENTS)})")
        for rel in (comp.file, *comp.external_data, *comp.openvino_ir):
            if rel not in manifest.files:
                raise BundleError(f"{where}: component {name!r} file {rel!r} is not listed in 'files'")
    for rel in (*manifest.files, manifest.tokenizer.dir, *((manifest.tokenizer_2.dir,) if manifest.tokenizer_2 else ())):
        check_inside(rel, where)


MANIFEST = DocumentType(Manifest, "sdedge-bundle", FORMAT_VERSION, MANIFEST_NAME, BundleError,
                        legacy=Legacy("format_version"), check=_check)


def check_inside(rel: str, where: str = MANIFEST_NAME) -> None:
    """Refuse a manifest path that could point outside the bundle folder."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or "\\" in rel or any(p in ("..", "") for p in rel.split("/")) or ":" in rel:
        raise BundleError(f"{where}: path {rel!r} is not a plain relative path inside the bundle")


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_NAME
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"{bundle_dir}: no such bundle folder")
    if not path.is_file():
        raise BundleError(f"{path}: missing; is {bundle_dir} an sdedge bundle (made by `sdedge export`)?")
    try:
        raw = read_capped(path)
    except ConfigError as exc:
        raise BundleError(str(exc)) from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc.strerror}); a bundle holds only regular files") from None
    return parse_manifest_bytes(raw, str(path))


def parse_manifest_bytes(raw: bytes, where: str = MANIFEST_NAME) -> Manifest:
    """sdedge.json's bytes to a Manifest: size and nesting capped, strict JSON, then `parse_manifest`."""
    try:
        data = parse_json(raw, where)
    except ConfigError as exc:
        raise BundleError(str(exc)) from None
    return parse_manifest(data, where)
