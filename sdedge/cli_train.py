"""`sdedge prepare` and `sdedge train`.

`register(subparsers)` adds both commands to the main CLI (sdedge/cli.py). Torch, diffusers and peft are imported
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
                          overwrite=args.overwrite)
    with console.status("preparing images …"):
        report = prepare_dataset(Path(args.src), Path(args.out), opts)
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


def cmd_train(args) -> int:
    from sdedge.trainer.config import config_from_args
    from sdedge.trainer.train import train

    cfg = config_from_args(args, args.config)
    result = train(cfg, console=console, unet_loader=_pruned_unet_loader())
    if _is_main_process():
        console.print(f"adapter written to [bold]{result.adapter}[/bold]: {result.steps} steps, final loss "
                      f"{result.final_loss:.4f}, {result.seconds:.1f} s"
                      + (f", resumed from step {result.resumed_from}" if result.resumed_from else "")
                      + (f", {result.world_size} processes" if result.world_size > 1 else ""))
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
    p.add_argument("--augment", help="add augmented copies: a comma list of flip, rotate, brightness")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentations")
    p.add_argument("--max-pixels", type=int, help="lower the decompression-bomb limit (pixels per image)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prepare)

    from sdedge.trainer.config import add_config_flags

    t = subparsers.add_parser("train", help="train a LoRA on a prepared image set",
                              description="Train a LoRA with diffusers + peft on accelerate. Every setting is a "
                              "config key and a flag (max_steps = --max-steps); flags override --config.")
    t.add_argument("--config", help="YAML file of settings (keys as the flags, with underscores)")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)
    p.add_argument("--background", default="white",
                   help="colour transparent pixels are composited on (a name such as white, or #rrggbb)")
