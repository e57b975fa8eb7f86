"""`sdedge prepare`, `sdedge train` and `sdedge distill-decoder`.

`register(subparsers)` adds the three commands to the main CLI (sdedge/cli.py). Torch, diffusers and peft are imported
only when a command runs. `accelerate launch -m sdedge train ...` runs training on several processes (DDP): accelerate starts one
`python -m sdedge train` per process and the trainer picks the process group up from the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)

__all__ = ["register", "cmd_prepare", "cmd_train"]


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def cmd_prepare(args) -> int:
    from rich.table import Table

    from sdedge.trainer.prepare import PrepareOptions, prepare_dataset

    augment = tuple(a.strip() for a in (args.augment or "").split(",") if a.strip())
    opts = PrepareOptions(resolution=args.resolution, min_size=args.min_size, buckets=args.buckets,
                          dedup=None if args.no_dedup else args.dedup, clip_model=args.clip_model, augment=augment,
                          seed=args.seed, max_pixels=args.max_pixels, background=args.background,
                          caption_model=args.caption_model, caption_prefix=args.caption_prefix or "",
                          overwrite=args.overwrite)
    with console.status("preparing images …") as status:  # each image read (and captioned) shows here
        report = prepare_dataset(Path(args.src), Path(args.out), opts,
                                 log=lambda msg: status.update(f"preparing images … {msg[:100]}"))
    if report.skipped:
        table = Table("skipped", "reason", title=f"{len(report.skipped)} input(s) skipped", title_justify="left")
        for source, reason in report.skipped:
            table.add_row(source, reason)
        console.print(table)
    aug = f" (+{report.augmented} augmented copies)" if report.augmented else ""
    console.print(f"[bold]{report.kept}[/bold] image(s) kept{aug}, {len(report.skipped)} skipped → {report.out} "
                  f"(dataset sha256 {report.dataset_sha256[:16]}…)")
    return 0


def _pruned_unet_loader():
    """The reader of pruned bases (`sdedge prune`) when the export extra is installed: the CLI is where the trainer
    and the exporter meet."""
    try:
        from sdedge.export.pruned_unet import load_pruned_unet
    except ImportError:  # a train-only install: a pruned base is then refused with the reason
        return None
    return load_pruned_unet


def _lora_fuser():
    """The LoRA fuser of `train --lcm --lcm-fuse` (sdedge.export.lora), when the export extra is installed."""
    try:
        from sdedge.export.lora import fuse_loras
    except ImportError:  # a train-only install: lcm_fuse is then refused with the reason
        return None
    return fuse_loras


def _ldm_key_mapping():
    """The exporter's diffusers -> original (LDM) UNet key mapping, for kohya SDXL adapter keys (`lora_unet_input_
    blocks_...`), when the export extra is installed."""
    try:
        from sdedge.export.single_file import unet_key_to_ldm
    except ImportError:  # a train-only install: kohya keys on an SDXL base are then refused with the reason
        return None
    return unet_key_to_ldm


def cmd_train(args) -> int:
    from sdedge.trainer.config import config_from_args
    from sdedge.trainer.train import train

    cfg = config_from_args(args, args.config)
    result = train(cfg, console=console, unet_loader=_pruned_unet_loader(), unet_key_to_ldm=_ldm_key_mapping(),
                   lora_fuser=_lora_fuser() if cfg.lcm else None)
    if _is_main_process():
        console.print(f"adapter written to [bold]{result.adapter}[/bold]: {result.steps} steps, final loss "
                      f"{result.final_loss:.4f}, {result.seconds:.1f} s"
                      + (f", resumed from step {result.resumed_from}" if result.resumed_from else "")
                      + (f", {result.world_size} processes" if result.world_size > 1 else ""))
    return 0


def cmd_distill_decoder(args) -> int:
    from sdedge.runtime.stages import Stages
    from sdedge.trainer.decoder_distill import DistillDecoderConfig, distill_decoder

    blocks = tuple(int(b) for b in args.blocks.split(",")) if args.blocks else None
    given = {k: v for k in ("width", "steps", "batch", "lr", "l1", "encoder_every", "latents", "eval_latents",
                            "gen_steps", "guidance", "images", "prompts", "seed") if (v := getattr(args, k)) is not None}
    if args.crop is not None:
        given["crop"] = args.crop or None
    cfg = DistillDecoderConfig(base=args.base, out=args.out, blocks=blocks, overwrite=args.overwrite, **given)
    r = distill_decoder(cfg, Stages(console))
    extra = ""
    if r.classifier_agreement is not None:
        extra = (f", shape classifier agrees with the full decoder on {r.classifier_agreement:.1%} of its decodes "
                 f"(prompt match {r.prompt_match:.1%} vs {r.prompt_match_full:.1%})")
    console.print(f"AutoencoderTiny written to [bold]{args.out}[/bold]: {r.decoder_parameters / 1e3:.0f} k decoder "
                  f"parameters (the full decoder {r.full_decoder_parameters / 1e3:.0f} k), {r.psnr_vs_full_db:.1f} dB "
                  f"PSNR against the full decoder on {r.eval_latents} held-out generations{extra}; "
                  f"use it with: sdedge export --decoder {args.out}")
    return 0


def register(subparsers) -> None:
    """Add `prepare` and `train` to the main CLI's subparsers."""
    p = subparsers.add_parser("prepare", help="turn a folder of captioned images into a training set",
                              description="Read JPEG/PNG/WebP images with captions (same-name .txt, metadata.jsonl "
                              "or metadata.csv with file_name,text), resize and centre-crop, strip metadata, remove "
                              "duplicates, and write OUT/images, OUT/captions and OUT/metadata.json.")
    p.add_argument("src", help="folder of images and captions")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resolution", type=int, default=512, help="output size in pixels (default 512)")
    p.add_argument("--min-size", type=int, help="skip images whose shorter side is below this (default: resolution/2)")
    p.add_argument("--buckets", action="store_true", help="aspect-ratio buckets of about resolution² pixels "
                   "instead of square crops")
    p.add_argument("--dedup", type=float, default=0.95, help="near-duplicate similarity threshold (default 0.95)")
    p.add_argument("--no-dedup", action="store_true", help="keep duplicates")
    p.add_argument("--clip-model", help="local CLIP model folder: also drop images whose CLIP cosine >= --dedup")
    p.add_argument("--caption-model", metavar="DIR", help="local BLIP or BLIP-2 model folder (transformers layout, "
                   "safetensors; never downloaded): caption the images that have no caption")
    p.add_argument("--caption-prefix", metavar="TEXT", help="put before each caption the model writes, e.g. a "
                   "trigger word ('sks dog')")
    p.add_argument("--augment", help="add augmented copies: a comma list of flip, rotate, brightness")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentations")
    p.add_argument("--max-pixels", type=int, help="lower the decompression-bomb limit (pixels per image)")
    p.add_argument("--background", default="white",
                   help="colour transparent pixels are composited on (a name such as white, or #rrggbb)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prepare)

    from sdedge.trainer.config import add_config_flags

    t = subparsers.add_parser("train", help="train a LoRA on a prepared image set",
                              description="Train a LoRA with diffusers + peft on accelerate. Every setting is a "
                              "config key and a flag (max_steps = --max-steps); flags override --config.")
    t.add_argument("--config", help="YAML file of settings (keys as the flags, with underscores)")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    d = subparsers.add_parser("distill-decoder", help="train a light AutoencoderTiny (TAESD-architecture) decoder "
                              "against a base's own VAE decoder, for `sdedge export --decoder`")
    d.add_argument("--base", required=True, help="a diffusers folder (e.g. from `sdedge base tiny`)")
    d.add_argument("--out", required=True, help="the AutoencoderTiny folder to write")
    d.add_argument("--images", help="a folder of images whose VAE latents to train on (default: the base's "
                   "generations)")
    d.add_argument("--prompts", help="prompts for the generations, one a line (default: the tiny world's captions "
                   "on the tiny base, else a built-in set)")
    d.add_argument("--width", type=int, help="the decoder's width (default 16 for a base of <= 128 px, else 64)")
    d.add_argument("--blocks", help="blocks per decoder stage, e.g. 3,3,3,1 (default: 4,2,0 small, TAESD's else)")
    # defaults: trainer/decoder_distill.py's DistillDecoderConfig (not imported here: it needs torch)
    d.add_argument("--steps", type=int, help="training steps (default 12000)")
    d.add_argument("--batch", type=int, help="latents a step (default 16)")
    d.add_argument("--lr", type=float, help="AdamW's peak learning rate, then cosine annealing (default 5e-3)")
    d.add_argument("--l1", type=float, help="weight of an L1 term beside the mean squared error (default 0)")
    d.add_argument("--encoder-every", type=int, help="train the encoder on every n-th step (default 4)")
    d.add_argument("--crop", type=int, help="train on random crops of this many latents a side (default 0: whole "
                   "latents)")
    d.add_argument("--latents", type=int, help="training generations, each also mirrored (default 600)")
    d.add_argument("--eval-latents", type=int, help="held-out generations for the figures (default 90)")
    d.add_argument("--gen-steps", type=int, help="DPM++ 2M steps per generation (default 15)")
    d.add_argument("--guidance", type=float, help="guidance of the generations (default: the base's hint, else 7.5)")
    d.add_argument("--seed", type=int, help="seed of the generations and the training (default 0)")
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=cmd_distill_decoder)
