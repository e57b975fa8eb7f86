"""`sdedge distill-decoder`: a light TAESD-architecture decoder (diffusers' AutoencoderTiny) for a base that has
none, trained against the base's own VAE decoder.

    z        latents at the UNet's scale (B, C, h, w): the final latents of the base's own generations, or its VAE's
             encodings (posterior mean × scaling_factor) of the images in --images; and each one mirrored
             (the full decoder's own image of the flipped latent is its target: that decoder is not flip-equivariant)
    target   base.vae.decode(z / scaling_factor)                      (B, 3, H, W) in [-1, 1]
    decoder  tiny.decode(z) ≈ target  (loss: mean squared error)      AutoencoderTiny's scaling_factor is 1.0: it
             decodes the UNet's latents directly, as TAESD does
    encoder  tiny.encode(target) ≈ z  (loss: mean squared error), so that the folder is a whole AutoencoderTiny

The result is a diffusers AutoencoderTiny folder (config.json + diffusion_pytorch_model.safetensors) and
distill.json (settings, data, figures on held-out generations: PSNR against the full decoder's images and, on the
tiny base, the shape classifier's agreement). `sdedge export --decoder OUT` makes it the bundle's vae_decoder.
Widths: TAESD's decoder keeps one width through its blocks (64 for SD1.5); a smaller width fits a small base.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sdedge.runtime.errors import BadInput
from sdedge.runtime.files import atomic_write_json, check_replaceable, replace_dir, scratch_dir

log = logging.getLogger("sdedge.trainer")

REPORT = "distill.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
DEFAULT_PROMPTS = ("a photograph of a mountain lake at dawn", "a portrait of an old man, oil painting",
                   "a red sports car on a city street", "a bowl of fruit on a wooden table",
                   "a cat sleeping on a sofa", "a watercolour of a lighthouse in a storm",
                   "a futuristic city skyline at night", "a field of sunflowers under a blue sky")


@dataclass(frozen=True)
class DistillDecoderConfig:
    base: str
    out: str
    width: int | None = None  # the decoder's width; None: 16 for a base of <= 128 px, else TAESD's 64
    blocks: tuple[int, ...] | None = None  # blocks per decoder stage; None: (4, 2, 0) small, TAESD's (3, 3, 3, 1) else
    steps: int = 12000
    batch: int = 16
    lr: float = 5e-3  # AdamW's peak: a 5 % warm-up, then cosine annealing
    crop: int | None = None  # random crops of this many latents a side (a large base's images); None: whole images
    l1: float = 0.0  # weight of an L1 term beside the decoded images' mean squared error
    encoder_every: int = 4  # the encoder's loss on every n-th step (it is not in a bundle: the decoder's steps count)
    latents: int = 600  # training latents (each also mirrored)
    eval_latents: int = 90  # held-out latents for the figures
    gen_steps: int = 15  # DPM++ 2M steps of the base's generations
    guidance: float | None = None  # None: the base's hint (sdedge_base.json), else 7.5
    images: str | None = None  # a folder of images to encode instead of generating
    prompts: str | None = None  # a file, one prompt a line; None: the tiny world's captions or a built-in set
    size: int | None = None  # pixels; None: the base's native size
    seed: int = 0
    overwrite: bool = False


@dataclass(frozen=True)
class DistillReport:
    steps: int
    seconds: float
    final_loss: float
    psnr_vs_full_db: float  # mean PSNR of its decodes against the full decoder's, held-out latents
    eval_latents: int
    classifier_agreement: float | None  # tiny base: shape, colour and background all read alike on both decodes
    prompt_match: float | None  # tiny base: the share of its decodes matching their prompts
    prompt_match_full: float | None  # the same for the full decoder's decodes
    decoder_parameters: int
    full_decoder_parameters: int


# -- the base and its data ------------------------------------------------------------------------------------------
def load_base_pipe(base: str):
    """diffusers' pipeline on the base's frozen fp32 modules (trainer/base.py reads and checks the folder)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from .base import load_training_base

    b = load_training_base(base)
    pipe = StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                   scheduler=PNDMScheduler.from_config(b.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_note(base: str) -> dict:
    path = Path(base) / "sdedge_base.json"
    try:
        note = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        note = {}
    return note if isinstance(note, dict) else {}


def is_tiny_world(base: str) -> bool:
    return base_note(base).get("builtin") == "tiny"


def read_prompts(cfg: DistillDecoderConfig) -> list[str]:
    if cfg.prompts:
        path = Path(cfg.prompts)
        if not path.is_file():
            raise BadInput(f"--prompts {path}: no such file")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise BadInput(f"--prompts {path}: holds no prompt")
        return lines
    if is_tiny_world(cfg.base):
        from sdedge.tinyworld.classifier import base_captions

        return base_captions()
    return list(DEFAULT_PROMPTS)


def generated_latents(pipe, prompts: list[str], n: int, *, size: int, steps: int, guidance: float, seed: int,
                      progress=None) -> tuple[torch.Tensor, list[str]]:
    """Final latents of the base's generations (n, C, size/f, size/f) and their prompts, prompts cycled."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    out, batch = [], 30
    for i in range(0, n, batch):
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        with torch.inference_mode():
            lat = pipe(chosen[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, height=size,
                       width=size, generator=gen, output_type="latent").images
        out.append(lat.float())
        if progress:
            progress(min(i + batch, n), n)
    return torch.cat(out), chosen


def encoded_latents(pipe, folder: str, size: int) -> torch.Tensor:
    """The base VAE's posterior means × scaling_factor of the images in `folder`, centre-cropped to size²."""
    from PIL import Image, ImageOps

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not paths:
        raise BadInput(f"--images {folder}: no PNG, JPEG or WebP images")
    out = []
    for i in range(0, len(paths), 16):
        arr = np.stack([np.asarray(ImageOps.fit(Image.open(p).convert("RGB"), (size, size))) for p in paths[i:i + 16]])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
        with torch.inference_mode():
            out.append(pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor)
    return torch.cat(out)


def full_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """The base VAE decoder's images (B, 3, H, W) in [-1, 1] of UNet-scale latents."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(z), 32):
            out.append(vae.decode(z[i:i + 32] / vae.config.scaling_factor).sample.clamp(-1, 1))
    return torch.cat(out)


# -- the model ------------------------------------------------------------------------------------------------------
def tiny_config(pipe, cfg: DistillDecoderConfig) -> dict:
    """AutoencoderTiny arguments for `pipe`'s latent space: one stage per power of two of its scale factor."""
    factor = int(pipe.vae_scale_factor)
    stages = int(round(math.log2(factor))) + 1
    if 2 ** (stages - 1) != factor:
        raise BadInput(f"--base {cfg.base}: a VAE scale factor of {factor} is not a power of two")
    small = (cfg.size or pipe.unet.config.sample_size * factor) <= 128
    width = cfg.width or (16 if small else 64)
    # small: the work where it is cheap (ONNX Runtime's time is the full-resolution stage's; none there)
    blocks = cfg.blocks or (((4, 2) + (1,) * (stages - 3) + (0,))[-stages:] if small else (3,) * (stages - 1) + (1,))
    if len(blocks) != stages:
        raise BadInput(f"--blocks {','.join(map(str, blocks))}: this base needs {stages} decoder stages "
                       f"(scale factor {factor})")
    return dict(latent_channels=int(pipe.vae.config.latent_channels), encoder_block_out_channels=(width,) * stages,
                decoder_block_out_channels=(width,) * stages, num_encoder_blocks=(1,) * stages,
                num_decoder_blocks=tuple(blocks), scaling_factor=1.0)


def train_tiny(tiny, z: torch.Tensor, target: torch.Tensor, cfg: DistillDecoderConfig, progress=None) -> float:
    """Fit tiny.decode(z) to target (mean squared error, + l1 · L1) and, every encoder_every-th step,
    tiny.encode(target) to z; returns the final decoder loss (the mean squared error)."""
    F = torch.nn.functional
    opt = torch.optim.AdamW(tiny.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, cfg.steps))
    g = torch.Generator().manual_seed(cfg.seed)
    tiny.train()
    recent = []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(z), (min(cfg.batch, len(z)),), generator=g)
        zb, xb = crop(z[idx], target[idx], cfg.crop, g)  # (b, C, c, c), (b, 3, f·c, f·c)
        dec = tiny.decode(zb).sample
        loss = F.mse_loss(dec, xb)
        loss_all = loss + cfg.l1 * F.l1_loss(dec, xb) if cfg.l1 else loss
        if step % cfg.encoder_every == 0:
            loss_all = loss_all + F.mse_loss(tiny.encode(xb).latents, zb)
        opt.zero_grad(set_to_none=True)
        loss_all.backward()
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        if progress and (step + 1) % 50 == 0:
            progress(step + 1, cfg.steps, float(np.mean(recent)))
    tiny.eval()
    return float(np.mean(recent))


def warmup_cosine(step: int, total: int, warmup: float = 0.05, floor: float = 0.01) -> float:
    """The learning rate's factor at `step` of `total`: linear warm-up over the first 5 %, then cosine to 1 %."""
    n = max(1, int(warmup * total))
    if step < n:
        return (step + 1) / n
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - n) / max(1, total - n)))


def crop(z: torch.Tensor, x: torch.Tensor, size: int | None, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random window of latents (B, C, h, w) and their images (B, 3, f·h, f·w), `size` latents a side."""
    h, w = z.shape[-2:]
    if size is None or size >= min(h, w):
        return z, x
    f = x.shape[-1] // w
    i, j = (int(torch.randint(0, n - size + 1, (), generator=g)) for n in (h, w))
    return z[..., i:i + size, j:j + size], x[..., f * i:f * (i + size), f * j:f * (j + size)]


def psnr_each(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """PSNR in dB per image of (B, 3, H, W) images in [-1, 1], measured in [0, 1]."""
    mse = (((a - b) / 2) ** 2).flatten(1).mean(1).double().clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).numpy()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) / 2 + 0.5) * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)


def classifier_figures(tiny_img: torch.Tensor, full_img: torch.Tensor, prompts: list[str]) -> tuple[float, float, float]:
    """(agreement of the shape classifier's readings on both decodes, prompt match of each)."""
    from sdedge.tinyworld.classifier import HEADS, load_classifier, match_rate, predict

    model = load_classifier()
    a, b = predict(model, to_uint8(tiny_img)), predict(model, to_uint8(full_img))
    agree = np.mean([all(a[k][i] == b[k][i] for k in HEADS) for i in range(len(prompts))])
    return float(agree), match_rate(model, to_uint8(tiny_img), prompts), match_rate(model, to_uint8(full_img), prompts)


# -- the command ----------------------------------------------------------------------------------------------------
def check_config(cfg: DistillDecoderConfig) -> None:
    for label, v, lo in (("--steps", cfg.steps, 1), ("--batch", cfg.batch, 1), ("--latents", cfg.latents, 1),
                         ("--eval-latents", cfg.eval_latents, 1), ("--gen-steps", cfg.gen_steps, 1),
                         ("--encoder-every", cfg.encoder_every, 1)):
        if not isinstance(v, int) or v < lo:
            raise BadInput(f"{label} {v!r}: must be an integer >= {lo}")
    if cfg.width is not None and not 4 <= cfg.width <= 256:
        raise BadInput(f"--width {cfg.width}: from 4 to 256")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise BadInput(f"--lr {cfg.lr}: must be a positive number")
    if not (math.isfinite(cfg.l1) and cfg.l1 >= 0):
        raise BadInput(f"--l1 {cfg.l1}: must be a number >= 0")
    check_replaceable(cfg.out, {REPORT: None}, (cfg.base, cfg.images, cfg.prompts), overwrite=cfg.overwrite)


def distill_decoder(cfg: DistillDecoderConfig, stages=None) -> DistillReport:
    """Train and write the AutoencoderTiny folder at cfg.out; returns the figures (also in OUT/distill.json)."""
    from contextlib import nullcontext

    from diffusers import AutoencoderTiny

    check_config(cfg)
    stage = stages or (lambda label: nullcontext())
    torch.manual_seed(cfg.seed)
    with stage(f"load the base {cfg.base}"):
        pipe = load_base_pipe(cfg.base)
    size = cfg.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    guidance = cfg.guidance if cfg.guidance is not None else float(base_note(cfg.base).get("default_guidance", 7.5))
    prompts = read_prompts(cfg)
    kw = dict(size=size, steps=cfg.gen_steps, guidance=guidance)
    t0 = time.perf_counter()
    if cfg.images:
        with stage(f"encode the images of {cfg.images}"):
            z = encoded_latents(pipe, cfg.images, size)
    else:
        with stage(f"{cfg.latents} generations of the base ({cfg.gen_steps} DPM++ steps, guidance {guidance:g})"):
            z, _ = generated_latents(pipe, prompts, cfg.latents, seed=cfg.seed, **kw)
    with stage(f"{cfg.eval_latents} held-out generations"):
        z_eval, eval_prompts = generated_latents(pipe, prompts, cfg.eval_latents, seed=cfg.seed + 1, **kw)
    # flipped latents with the full decoder's own images of them: it is not flip-equivariant (on the tiny base
    # flip(decode(flip(z))) is 30.7 dB from decode(z)), so flipping a pair would teach a target it does not draw
    z = torch.cat([z, z.flip(-1)])  # (2n, C, h, w)
    with stage("the full decoder's images"):
        target, target_eval = full_decode(pipe.vae, z), full_decode(pipe.vae, z_eval)
    tiny = AutoencoderTiny(**tiny_config(pipe, cfg))
    with stage(f"train the decoder ({cfg.steps} steps, batch {cfg.batch})"):
        final = train_tiny(tiny, z, target, cfg, progress=lambda i, n, loss: log.info("step %d/%d loss %.5f", i, n, loss))
    with torch.inference_mode():
        ours = torch.cat([tiny.decode(z_eval[i:i + 32]).sample.clamp(-1, 1) for i in range(0, len(z_eval), 32)])
    agree = match = match_full = None
    if is_tiny_world(cfg.base) and not cfg.prompts:
        agree, match, match_full = classifier_figures(ours, target_eval, eval_prompts)
    report = DistillReport(
        steps=cfg.steps, seconds=round(time.perf_counter() - t0, 1), final_loss=final,
        psnr_vs_full_db=round(float(psnr_each(ours, target_eval).mean()), 3), eval_latents=len(z_eval),
        classifier_agreement=agree, prompt_match=match, prompt_match_full=match_full,
        decoder_parameters=sum(p.numel() for p in tiny.decoder.parameters()),
        full_decoder_parameters=sum(p.numel() for p in pipe.vae.decoder.parameters())
        + sum(p.numel() for p in pipe.vae.post_quant_conv.parameters()))
    write_folder(tiny, cfg, report)
    return report


def write_folder(tiny, cfg: DistillDecoderConfig, report: DistillReport) -> None:
    """The AutoencoderTiny folder and distill.json, written beside OUT and renamed into place."""
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}

    def fill(tmp: Path) -> None:
        tiny.save_pretrained(str(tmp), safe_serialization=True)
        atomic_write_json(tmp / REPORT, {"config": settings, "report": asdict(report)})

    publish(Path(cfg.out), fill)


def publish(out: Path, fill) -> None:
    """fill(folder) writes a new folder beside `out`, which then replaces `out` whole (nothing half-written)."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch_dir(out.parent, out.name)
    try:
        fill(tmp)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- the tiny base's decoder, shipped as package data ---------------------------------------------------------------
PACKAGED = "tiny-decoder"  # sdedge.tinyworld's data/tiny-decoder.safetensors (fp16) + tiny-decoder.json


def _data_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("sdedge.tinyworld").joinpath("data")))


def pack_decoder(folder: str | Path, data_dir: str | Path | None = None) -> dict:
    """Store a trained AutoencoderTiny folder as package data: its weights in fp16 and a note with its config,
    the weights' SHA-256 and its distill report (how scripts ship the tiny base's decoder)."""
    from safetensors.torch import load_file, save_file

    from sdedge.runtime.bundle import sha256_file
    from sdedge.runtime.tensor_files import write_safetensors

    folder, data = Path(folder), Path(data_dir or _data_dir())
    tensors = {k: v.half().contiguous() for k, v in load_file(str(folder / WEIGHTS)).items()}
    weights = write_safetensors(data / f"{PACKAGED}.safetensors", tensors, None, save_file)
    note = {"format": 1, "autoencoder": json.loads((folder / "config.json").read_text(encoding="utf-8")),
            "sha256": sha256_file(weights), "distill": json.loads((folder / REPORT).read_text(encoding="utf-8"))}
    atomic_write_json(data / f"{PACKAGED}.json", note)
    return note


def write_packaged_decoder(out: str | Path, *, overwrite: bool = False) -> Path:
    """The shipped decoder of the trained tiny base as a diffusers AutoencoderTiny folder at `out` (fp32), its
    SHA-256 checked: `sdedge export --base TINY --decoder OUT`."""
    from safetensors.torch import load_file, save_file

    from sdedge.runtime.bundle import sha256_file
    from sdedge.runtime.errors import SdedgeError
    from sdedge.runtime.tensor_files import write_safetensors

    data, out = _data_dir(), Path(out)
    note = json.loads((data / f"{PACKAGED}.json").read_text(encoding="utf-8"))
    weights = data / f"{PACKAGED}.safetensors"
    if sha256_file(weights) != note["sha256"]:
        raise SdedgeError(f"{weights}: SHA-256 differs from the one in {PACKAGED}.json; the file is damaged")
    check_replaceable(out, {REPORT: None}, overwrite=overwrite)

    def fill(tmp: Path) -> None:
        write_safetensors(tmp / WEIGHTS, {k: v.float() for k, v in load_file(str(weights)).items()}, None, save_file)
        atomic_write_json(tmp / "config.json", note["autoencoder"])
        atomic_write_json(tmp / REPORT, {**note["distill"], "packaged": True})

    publish(out, fill)
    return out
