"""The `sdedge` command line. Each command imports what it needs when it runs, so that `sdedge generate`
and `sdedge info` work on a runtime-only install (no torch)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from sdedge import __version__
from sdedge.cli_options import add_engine_options, add_trust_options
from sdedge.runtime.errors import SdedgeError

console = Console(stderr=True, soft_wrap=True)  # no hard wraps: messages stay greppable


def _range(text: str) -> tuple[int, int]:
    """'1-8' -> (1, 8); '4' -> (4, 4)."""
    try:
        lo, _, hi = text.partition("-")
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or MIN-MAX, e.g. 1-8") from None
    return a, b


# -- commands ---------------------------------------------------------------------------------------------------
def cmd_base(args) -> int:
    from sdedge.export.bases import write_builtin_base
    from sdedge.runtime.stages import Stages

    stages = Stages(console)
    with stages(f"write the {args.name} base"):
        path = write_builtin_base(args.name, Path(args.out), seed=args.seed, overwrite=args.overwrite)
    console.print(f"base [bold]{args.name}[/bold] written to {path}")
    return 0


def cmd_prune(args) -> int:
    from sdedge.export.pruned_base import write_pruned_base
    from sdedge.runtime.stages import Stages

    stages = Stages(console)
    doc = write_pruned_base(args.base, Path(args.out), args.ratio, args.criterion, overwrite=args.overwrite,
                            allow_pickle=args.allow_pickle, config=args.config, stages=stages)
    pr = doc.prune
    console.print(f"pruned base written to [bold]{args.out}[/bold]: UNet parameters {pr.params_before / 1e6:.1f} M -> "
                  f"{pr.params_after / 1e6:.1f} M, MACs {pr.macs_before / 1e9:.2f} G -> {pr.macs_after / 1e9:.2f} G "
                  f"at {pr.macs_shape}")
    console.print(f"recover it: sdedge train --base {args.out} --distill-from {args.base} --data DATA --out DIR; "
                  f"then sdedge export --base {args.out} --lora DIR/adapter.safetensors ...")
    return 0


def cmd_build_engines(args) -> int:
    from sdedge.runtime.backends.profiles import engine_profiles, parse_batch, parse_sizes, profile_table
    from sdedge.runtime.backends.tensorrt_probe import require_tensorrt
    from sdedge.runtime.errors import MissingDependency
    from sdedge.runtime.manifest import read_manifest

    # the request is checked against the bundle first, so that a wrong size is reported on any machine
    profiles = engine_profiles(read_manifest(Path(args.bundle)), parse_sizes(args.shapes), parse_batch(args.batch))
    require_tensorrt("build-engines")
    rows = "\n".join(f"  {c:<13} {n:<22} min {lo:<14} opt {opt:<14} max {hi}"
                     for c, n, lo, opt, hi in profile_table(profiles))
    raise MissingDependency("build-engines: TensorRT is usable here, but this sdedge version does not build "
                            "TensorRT engines yet; run the bundle with --backend onnxruntime --device cuda. The "
                            f"profiles it would build:\n{rows}")


def export_options(args):
    from sdedge.export.build import ExportOptions
    from sdedge.runtime.manifest import Precision

    try:
        precision = Precision(args.precision)
    except ValueError:
        raise SdedgeError(f"--precision {args.precision!r}: choose one of {', '.join(p.value for p in Precision)}") from None
    from sdedge.export.lora import parse_lora_arg

    kw = dict(target=args.target, precision=precision, loras=tuple(parse_lora_arg(x) for x in args.lora),
              batch_min=args.batch[0], batch_max=args.batch[1],
              vae_encoder=not args.no_vae_encoder, allow_pickle=args.allow_pickle, base_config=args.config,
              overwrite=args.overwrite, min_psnr=args.min_psnr, parity_steps=args.parity_steps,
              default_scheduler=args.scheduler, min_cosine=args.min_cosine, calibration=args.calibration,
              int8_method=args.int8_method, prune=args.prune, prune_criterion=args.prune_criterion,
              reference_base=args.reference_base, decoder=args.decoder, default_guidance=args.guidance,
              default_steps=args.steps)
    if args.size_range:
        kw["size_min"], kw["size_max"] = args.size_range
    return ExportOptions(**kw)


def _prompt_match_for(base: str):
    """The prompt-match scorer when `base` is the trained tiny base or pruned from it (its shape classifier only
    knows that world); None otherwise."""
    from sdedge.export.markers import read_base_marker, read_pruned_marker

    folder = Path(base)
    if not folder.is_dir() or (folder / "sdedge.json").is_file():
        return None
    pruned = read_pruned_marker(folder)
    if pruned is not None:
        tiny = pruned.parent.id.startswith("builtin:tiny@")
    else:
        marker = read_base_marker(folder)
        tiny = marker is not None and marker.builtin == "tiny"
    if not tiny:
        return None
    from sdedge.tinyworld.classifier import bundle_prompt_match

    return bundle_prompt_match


def cmd_export(args) -> int:
    from sdedge.export.build import export_bundle
    from sdedge.runtime.stages import Stages

    stages = Stages(console)
    manifest = export_bundle(args.base, Path(args.out), export_options(args), stages,
                             prompt_match=_prompt_match_for(args.base))
    console.print(f"bundle written to [bold]{args.out}[/bold]")
    print_parity(manifest)
    if args.sign_key:
        from sdedge.export.signing import sign

        with stages("sign"):
            sign(Path(args.out), key=args.sign_key)
        console.print(f"signed: {Path(args.out) / 'model.sig'}")
    return 0


def print_parity(manifest) -> None:
    for name, p in manifest.parity.components.items():
        console.print(f"  parity {name:<13} max abs err {p.max_abs_err:.2e} (tolerance {p.tolerance:g})")
    if manifest.parity.image is not None:
        im = manifest.parity.image
        console.print(f"  parity image         {im.psnr_db:.1f} dB PSNR vs diffusers ({im.scheduler}, {im.steps} steps, "
                      f"{im.width}x{im.height})")
    dp = manifest.parity.decoder
    if dp is not None:
        console.print(f"  decoder              {dp.kind} {dp.source}: {dp.psnr_vs_full_db:.1f} dB PSNR vs the base's full "
                      f"VAE decoder ({dp.images} generations, {dp.width}x{dp.height})")
    pm = manifest.parity.prompt_match
    if pm is not None:
        fp32 = f" (fp32 bundle {pm.rate_fp32:.0%})" if pm.rate_fp32 is not None else ""
        console.print(f"  prompt match         {pm.rate:.0%} of {pm.prompts} shapes-world prompts{fp32}")
    pp = manifest.parity.precision
    if pp is not None:
        console.print(f"  {manifest.precision.value} vs fp32 ({pp.backend}): UNet cosine {pp.unet_cosine:.5f}, after "
                      f"guidance {pp.guidance:g} {pp.guided_cosine:.4f}, image {pp.image_psnr_db:.1f} dB PSNR")
    from sdedge.runtime.manifest import Precision

    for r in manifest.speed:
        if manifest.precision is Precision.FP32:  # a pruned fp32 bundle: timed against itself, to pick a backend
            console.print(f"  speed {r.backend:<12} UNet {r.seconds:.3f} s per call at {r.shape} (the pruned UNet's "
                          "gain over the unpruned base is measured by `sdedge bench`)")
            continue
        note = "" if r.ratio >= 1.0 else "  [bold yellow]NOT faster than fp32 on this machine[/bold yellow]"
        console.print(f"  speed {r.backend:<12} UNet {r.seconds:.3f} s vs fp32 {r.fp32_seconds:.3f} s per call at "
                      f"{r.shape}: {r.ratio:.2f}x{note}")
    if manifest.sizes is not None:
        from sdedge.runtime.memory import format_bytes

        b, a = manifest.sizes.before, manifest.sizes.after
        console.print("  size " + ", ".join(f"{k} {format_bytes(b[k])} -> {format_bytes(a[k])}" for k in a))
    pr = manifest.provenance.prune
    if pr is not None:
        console.print(f"  pruned {pr.ratio:.0%} ({pr.criterion}): UNet parameters {pr.params_before / 1e6:.1f} M -> "
                      f"{pr.params_after / 1e6:.1f} M, MACs {pr.macs_before / 1e9:.2f} G -> {pr.macs_after / 1e9:.2f} G "
                      f"at {pr.macs_shape}")
    if manifest.provenance.export_peak_rss_bytes:
        from sdedge.runtime.memory import format_bytes

        console.print(f"  export peak RSS {format_bytes(manifest.provenance.export_peak_rss_bytes)}")


def cmd_info(args) -> int:
    from rich.table import Table

    from sdedge.runtime.bundle import Bundle
    from sdedge.runtime.manifest import MANIFEST
    from sdedge.runtime.memory import format_bytes
    from sdedge.runtime.signing import describe_signer, signer_info

    bundle = Bundle.open(args.bundle)
    m = bundle.manifest
    if args.json:
        print(json.dumps(MANIFEST.to_dict(m), indent=2))
        return 0
    out = Console()
    out.print(f"[bold]{args.bundle}[/bold]: sdedge bundle v{m.format_version}, pipeline {m.pipeline}, "
              f"precision {m.precision.value}, {'signed' if bundle.is_signed else 'unsigned'}")
    s = m.shapes
    out.print(f"sizes {s.width_min}–{s.width_max} px (multiple of {s.pixel_multiple}), default "
              f"{s.default_width}x{s.default_height}; batch {s.batch_min}–{s.batch_max}")
    out.print(f"defaults: {m.defaults.steps} steps, guidance {m.defaults.guidance}, scheduler {m.defaults.scheduler}")
    out.print(f"base {m.provenance.base.id} (sha256 {m.provenance.base.sha256[:16]}…), created {m.provenance.created}")
    table = Table("component", "file", "size", "parity (max abs err)")
    for name, c in m.components.items():
        size = sum(m.files[f].bytes for f in (c.file, *c.external_data))
        p = m.parity.components.get(name)
        table.add_row(name, c.file, format_bytes(size), f"{p.max_abs_err:.2e}" if p else "—")
    out.print(table)
    if m.parity.image:
        im = m.parity.image
        out.print(f"image parity vs diffusers: {im.psnr_db:.1f} dB PSNR ({im.scheduler}, {im.steps} steps, seed {im.seed})")
    out.print("toolchain: " + ", ".join(f"{k} {v}" for k, v in m.provenance.toolchain.items()))
    if args.public_key:
        from sdedge.runtime.signing import verify_bundle

        out.print("signature: verified, " + verify_bundle(args.bundle, public_key=args.public_key).describe())
    else:
        out.print("signature: " + describe_signer(signer_info(args.bundle)))
    return 0


def cmd_generate(args) -> int:
    from sdedge.cli_provenance import stamper_for
    from sdedge.runtime.files import atomic_write_bytes
    from sdedge.runtime.memory import format_bytes
    from sdedge.runtime.pipeline import Pipeline
    from sdedge.runtime.provenance import encode_outputs, format_for

    fmt = format_for(args.out)
    pipe = Pipeline.load(args.bundle, device=args.device, memory=args.memory, threads=args.threads,
                         backend=args.backend, verify=args.verify, public_key=args.public_key, identity=args.identity,
                         issuer=args.issuer, precision_hint=args.precision_hint,
                         prepare=False if args.image else {"width": args.width, "height": args.height,
                                                          "num_images": args.n, "guidance": args.guidance})
    stamper = stamper_for(args, pipe)  # the C2PA certificate is checked before any image is made
    limit = (pipe.manifest.shapes.width_max, pipe.manifest.shapes.height_max)
    image = _read_image(args.image, "--image", "RGB", limit) if args.image else None
    mask = _read_image(args.mask, "--mask", "L", limit) if args.mask else None
    result = pipe.generate(args.prompt, args.negative, steps=args.steps, guidance=args.guidance, seed=args.seed,
                           width=args.width, height=args.height, scheduler=args.scheduler, num_images=args.n,
                           image=image, mask=mask, strength=args.strength, watermark=not args.no_watermark,
                           micro_conditioning=_micro_conditioning(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if args.n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(args.n)]
    for data, path in zip(encode_outputs(result, fmt, stamper, args.prompt, args.negative), paths):
        atomic_write_bytes(path, data)
    s = result.settings
    console.print(f"{', '.join(map(str, paths))}: {s['width']}x{s['height']}, {s['steps']} steps {s['scheduler']}, "
                  f"guidance {s['guidance']}, seed {s['seed']}"
                  + (f", strength {s['strength']:g}" if "strength" in s else ""))
    console.print(f"  backend {pipe.backend} ({pipe.backend_reason})")
    console.print(f"  watermark {result.watermark or 'none'}" + (f"; C2PA manifest signed by {stamper.subject}"
                                                                   if stamper else ""))
    if args.verbose:
        for why in pipe.backend_skipped:
            console.print(f"  not used: {why}")
        for stage, secs in {**{f"load {k}": v for k, v in pipe.load_seconds.items()}, **result.timings}.items():
            console.print(f"  {stage:<20} {secs:7.3f} s")
        if result.step_times:
            console.print(f"  {'per UNet step':<20} {sum(result.step_times) / len(result.step_times):7.3f} s")
        console.print(f"  memory mode {args.memory}, peak RSS {format_bytes(result.peak_rss_bytes)}")
    return 0


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what --image/--mask read; Pillow's other decoders are not opened


def _read_image(path: str, label: str, mode: str, limit: tuple[int, int]):
    """A PNG/JPEG/WebP file as a PIL image in `mode`; its size is checked against the bundle's largest (width, height)
    from the header, before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    from sdedge.runtime.errors import BadInput

    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            if im.width > limit[0] or im.height > limit[1]:
                raise BadInput(f"{label} {path}: {im.width}×{im.height} pixels, over this bundle's largest size "
                               f"{limit[0]}×{limit[1]}")
            im.load()
            return im.convert(mode)
    except FileNotFoundError:
        raise BadInput(f"{label} {path}: no such file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise BadInput(f"{label} {path}: not a readable PNG, JPEG or WebP image ({e})") from None
    except OSError as e:
        raise BadInput(f"{label} {path}: cannot be read ({e})") from None


def _pair(text: str) -> tuple[int, int]:
    """'1024,768' -> (1024, 768)."""
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two integers A,B, e.g. 1024,1024") from None
    return a, b


def _micro_conditioning(args):
    """SDXL's size and crop conditioning from --original-size / --crops-top-left / --target-size; None if none."""
    given = {k: getattr(args, k) for k in ("original_size", "crops_coords_top_left", "target_size")
             if getattr(args, k, None) is not None}
    if not given:
        return None
    from sdedge.runtime.sdxl import MicroConditioning

    return MicroConditioning(**given)


def cmd_quickstart(args) -> int:
    from sdedge.quickstart import run_quickstart

    run_quickstart(Path(args.out), console, overwrite=args.overwrite)
    return 0


# -- parser -----------------------------------------------------------------------------------------------------
def _add_base(sub) -> None:
    """`sdedge base`: write a built-in base."""
    b = sub.add_parser("base", help="write a built-in base model (diffusers layout)")
    b.add_argument("name", choices=["tiny", "tiny-random", "sd15-arch", "tiny-inpaint", "sdxl-tiny", "sdxl-arch"],
                   help="tiny: the trained tiny base (64×64 coloured shapes); tiny-random: its architecture with "
                        "seeded random weights; sd15-arch: SD1.5's architecture with seeded random weights; "
                        "tiny-inpaint: tiny-random with an inpainting (9-channel) UNet; sdxl-tiny: the SDXL topology "
                        "at test size (128×128); sdxl-arch: SDXL's architecture (2.6 B-parameter UNet) with seeded random "
                        "weights, written in fp16 (~7 GB)")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0, help="weights seed (tiny-random, sd15-arch, tiny-inpaint)")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=cmd_base)


def _add_prune(sub) -> None:
    """`sdedge prune`: prune a base into a new base folder."""
    pr = sub.add_parser("prune", help="prune a base's UNet channels into a new base folder (for a recovery "
                        "fine-tune with `sdedge train --distill-from`, then `sdedge export`)")
    pr.add_argument("base", help="a diffusers folder or a single-file .safetensors (with --config)")
    pr.add_argument("--out", required=True)
    pr.add_argument("--ratio", type=float, required=True,
                    help="share of every UNet block's inner widths to remove (resnet hidden channels, head dims, "
                    "feed-forward hidden; residual streams kept), 0-0.9")
    pr.add_argument("--criterion", default="magnitude", choices=["magnitude", "taylor"], help="channel importance")
    pr.add_argument("--config", help="local diffusers folder with the configs of a single-file base")
    pr.add_argument("--allow-pickle", action="store_true", help="load a pickle .ckpt (it can run code: trust it first)")
    pr.add_argument("--overwrite", action="store_true")
    pr.set_defaults(func=cmd_prune)


def _add_build_engines(sub) -> None:
    """`sdedge build-engines`: TensorRT engines from a bundle (GPU only)."""
    be = sub.add_parser("build-engines", help="build TensorRT engines for this GPU from a bundle's ONNX (GPU only)")
    be.add_argument("bundle")
    be.add_argument("--shapes", default="512x512", help="sizes to build profiles for, e.g. 512x512,768x768")
    be.add_argument("--batch", default="1", help="batch size or range, e.g. 1-4")
    be.set_defaults(func=cmd_build_engines)


def _add_export(sub) -> None:
    """`sdedge export`: a base to a bundle."""
    e = sub.add_parser("export", help="export a base to a bundle (ONNX + manifest)")
    e.add_argument("--base", required=True, help="a diffusers folder, a single-file .safetensors, or a .ckpt")
    e.add_argument("--out", required=True)
    e.add_argument("--target", default="onnx", help="onnx (default) or trt")
    e.add_argument("--precision", default="fp32")
    e.add_argument("--config", help="local diffusers folder with the configs of a single-file base")
    e.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="fuse a LoRA (diffusers/peft or kohya keys) with a scale; repeat for several")
    e.add_argument("--allow-pickle", action="store_true", help="load a pickle .ckpt (it can run code: trust it first)")
    e.add_argument("--batch", type=_range, default=(1, 8), help="batch range, e.g. 1-8")
    e.add_argument("--size-range", type=_range, help="pixel size range, e.g. 256-1024 (default: half to twice native)")
    e.add_argument("--scheduler", default=None, help="the bundle's default scheduler (default: euler for an SDXL base, "
                   "as diffusers; dpm++2m else; lcm: with an LCM-LoRA "
                   "fused by --lora, few steps)")
    e.add_argument("--steps", type=int, help="the bundle's default steps (default 20; 4 with --scheduler lcm)")
    e.add_argument("--guidance", type=float, help="the bundle's default guidance; <= 1 runs no guidance pass "
                   "(default: the base's hint, else 7.5; 1 with --scheduler lcm)")
    e.add_argument("--decoder", metavar="DIR", help="a diffusers AutoencoderTiny folder (TAESD architecture, e.g. "
                   "madebyollin/taesd, or one from `sdedge distill-decoder`) exported as the bundle's vae_decoder")
    e.add_argument("--no-vae-encoder", action="store_true")
    e.add_argument("--parity-steps", type=int, default=10)
    e.add_argument("--min-psnr", type=float, default=None,
                   help="final-image PSNR gate against the fp32 reference, in dB (default: 40 for fp32; "
                        "recorded but not gated for other precisions)")
    e.add_argument("--min-cosine", type=float, default=None,
                   help="gate on the UNet's cosine after guidance against fp32 (e.g. 0.97 for int8, 0.995 for bf16)")
    e.add_argument("--calibration", help="prompts file (one per line) for static int8 (default: a built-in set)")
    e.add_argument("--int8-method", default="nncf", choices=["nncf", "ort", "openvino"],
                   help="static int8 quantiser: nncf / ort write a QDQ ONNX UNet; openvino quantises the OpenVINO "
                   "model itself (NNCF) and stores its IR beside the fp32 ONNX UNet (fast and exact on VNNI CPUs)")
    e.add_argument("--prune", type=float, default=0.0,
                   help="prune this share of every UNet block's inner widths (torch-pruning; no recovery: see "
                   "`sdedge prune` for the recovery fine-tune)")
    e.add_argument("--prune-criterion", default="magnitude", choices=["magnitude", "taylor"],
                   help="channel importance for --prune")
    e.add_argument("--reference-base", help="a pruned base's unpruned parent, when it has moved from where "
                   "sdedge_pruned.json says (the parity gates measure against it)")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--sign-key", help="sign the bundle with this private key (PEM) as the last step")
    e.set_defaults(func=cmd_export)


def _add_info(sub) -> None:
    """`sdedge info`: describe a bundle."""
    i = sub.add_parser("info", help="describe a bundle")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true")
    i.add_argument("--public-key", help="verify the signature with this public key and show its fingerprint")
    i.set_defaults(func=cmd_info)


def _add_generate(sub) -> None:
    """`sdedge generate`: images from a bundle."""
    g = sub.add_parser("generate", help="generate images with a bundle")
    g.add_argument("bundle")
    g.add_argument("prompt")
    g.add_argument("--negative", default="")
    g.add_argument("--seed", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--scheduler")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--original-size", type=_pair, metavar="H,W", help="SDXL micro-conditioning (default: the image size)")
    g.add_argument("--crops-top-left", dest="crops_coords_top_left", type=_pair, metavar="TOP,LEFT",
                   help="SDXL micro-conditioning (default: 0,0)")
    g.add_argument("--target-size", type=_pair, metavar="H,W", help="SDXL micro-conditioning (default: the image size)")
    g.add_argument("--n", type=int, default=1, help="images per call")
    g.add_argument("--image", help="image-to-image: the init image (PNG, JPEG or WebP; the output takes its size)")
    g.add_argument("--strength", type=float, help="with --image: how much of the schedule runs, in (0, 1] "
                   "(default 0.8; 1.0 with --mask)")
    g.add_argument("--mask", help="with --image: inpaint where the mask (PNG, JPEG or WebP, the image's size) is white")
    g.add_argument("--out", default="out.png")
    add_engine_options(g)
    from sdedge.runtime.backends.select import PRECISION_HINTS

    g.add_argument("--precision-hint", default="auto", choices=PRECISION_HINTS,
                   help="compute precision: auto (bf16 on OpenVINO where the CPU has AVX-512 BF16 or AMX; "
                        "docs/cpu-engines.md), fp32 (exact fp32 compute, also on OpenVINO), bf16 (OpenVINO)")
    g.add_argument("--verbose", "-v", action="store_true", help="per-stage times and peak RSS")
    add_trust_options(g)
    from sdedge.cli_provenance import add_output_options

    add_output_options(g)
    g.set_defaults(func=cmd_generate)


def _add_quickstart(sub) -> None:
    """`sdedge quickstart`: the main job on the tiny model."""
    q = sub.add_parser("quickstart", help="the main job end to end on the built-in tiny model")
    q.add_argument("--out", default="qs")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_quickstart)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdedge", description="Stable Diffusion to a signed, optimised edge engine.")
    p.add_argument("--version", action="version", version=f"sdedge {__version__}")
    p.add_argument("--log-level", default="warning", type=str.lower, choices=("debug", "info", "warning", "error"),
                   help="how much sdedge logs; third-party libraries log only at debug (default warning)")
    sub = p.add_subparsers(dest="command", required=True)
    _add_base(sub)
    _add_prune(sub)
    _add_build_engines(sub)
    _add_export(sub)
    _add_info(sub)
    _add_generate(sub)
    _add_quickstart(sub)

    from sdedge import cli_bench, cli_provenance, cli_serve, cli_sign, cli_train

    cli_train.register(sub)
    cli_sign.register(sub)
    cli_bench.register(sub)
    cli_serve.register(sub)
    cli_provenance.register(sub)
    return p


@contextlib.contextmanager
def _signals_exit():
    """SIGTERM and SIGHUP (a `kill`, a closed terminal, a stopped container) become SystemExit(128 + n), so
    every `finally` and context manager runs: an export or training stopped that way removes its scratch
    folders and leaves the previous output as it was. (SIGKILL cannot be caught: the next write into the same
    folder sweeps what it left, sdedge.runtime.files.sweep_stale.) Only in the main thread; restored after.
    Not for `serve`, whose server finishes the running requests on SIGTERM and re-raises the signal after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on(signum, frame):
        raise SystemExit(128 + signum)

    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {n: signal.signal(getattr(signal, n), exit_on) for n in names}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(getattr(signal, n), handler)


# Libraries whose INFO lines are noise to a user (NNCF's are quieted where it is imported: export/quantize.py).
THIRD_PARTY_LOGGERS = ("diffusers", "transformers", "huggingface_hub", "accelerate", "peft", "torch", "onnxruntime",
                       "openvino", "urllib3", "httpx", "PIL", "ray", "filelock", "matplotlib")


def configure_logging(level: str) -> None:
    """sdedge's own loggers at `level`; third-party ones at WARNING or above unless `--log-level debug`."""
    value = getattr(logging, level.upper())
    logging.basicConfig(level=value, format="%(levelname)s %(name)s: %(message)s")
    if value > logging.DEBUG:
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(max(value, logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers prints advice about optional image-processor backends at import; sdedge never uses them.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    configure_logging(args.log_level)
    try:
        with contextlib.nullcontext() if getattr(args, "own_signals", False) else _signals_exit():
            return args.func(args)
    except SdedgeError as exc:
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
