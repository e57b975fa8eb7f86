"""`sdedge quickstart`: the whole flow on the built-in trained tiny base, in a few minutes on a laptop CPU.

    base tiny ─► export (fp32, parity vs diffusers)                       ─► "before" images of a new concept
    concept images ("a purple …", a colour the base never saw) + base-colour scenes ─► prepare ─► train a LoRA
       with prior preservation
       (the recipe: sdedge/quickstart_lora.py; what was tried: docs/tiny-base.md)
    ─► export with the LoRA fused (fp32) ─► sign with a fresh key ─► generate (signature required)
    ─► the optimised bundle: int8, else bf16, kept only when the export's speed gate measures it faster here and its
       prompt match stays within 0.05 of fp32's (else fp32, with why) ─► prompt-match rates (new colour, base
       colours) of base, LoRA fp32 and optimised ─► bench
    ─► fast mode: the base with its shipped LCM-LoRA and tiny decoder, 4 LCM steps at guidance 1, against the
       20-step bundle (seconds per image and prompt match on the base captions) ─► summary.json
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from sdedge.runtime.stages import Stages

from .quickstart_lora import (
    CONCEPT_IMAGES,
    LORA_SCALE,
    LORA_STEPS,
    PRIOR_IMAGES,
    SEEDS,
    Optimised,
    Rates,
    base_colour_prompts,
    choose_optimised,
    concept_prompts,
    generate,
    lora_config,
    rates,
    write_concept_data,
    write_prior_data,
)


def base_prompts() -> list[str]:
    return ["a red circle on a blue background", "a yellow triangle on a black background",
            "a green square on a white background", "a blue circle on a yellow background"]


def _grid_png(rows: list[tuple[str, np.ndarray]], prompts: list[str], path: Path, scale: int = 2) -> None:
    """One row per (label, images), one column per prompt, labelled (sdedge.runtime.grid), upscaled `scale`×."""
    from sdedge.runtime.grid import GridLayout, labelled_grid, write_grid

    cell = rows[0][1].shape[1] * scale  # images (N, H, W, 3), square
    write_grid(labelled_grid([list(imgs) for _, imgs in rows], [label for label, _ in rows], prompts,
                             GridLayout(cell=cell, label_w=110)), path)


def _time_and_match(bundle: Path, prompts: list[str], classifier) -> dict:
    """Seconds per image (after one warm-up image) and prompt match of a bundle at its defaults, one image a prompt."""
    from sdedge.runtime.pipeline import Pipeline, to_uint8
    from sdedge.tinyworld.classifier import match_rate

    pipe = Pipeline.load(bundle, verify="off")
    try:
        pipe.generate(prompts[0], seed=0)
        t0 = time.perf_counter()
        images = [to_uint8(pipe.generate(p, seed=i).images)[0] for i, p in enumerate(prompts)]
        seconds = (time.perf_counter() - t0) / len(prompts)
        d = pipe.manifest.defaults
    finally:
        pipe.close()
    return {"scheduler": d.scheduler, "steps": d.steps, "guidance": d.guidance, "seconds_per_image": round(seconds, 4),
            "prompt_match": round(match_rate(classifier, images, prompts), 3), "images": len(prompts)}


def fast_mode(base_dir: Path, bundle_base: Path, out: Path, classifier) -> dict:
    """Export the fast bundle of the tiny base (its shipped LCM-LoRA fused, LCM 4 steps, guidance 1, the shipped tiny
    decoder) and measure it against the 20-step bundle on every third base caption."""
    from sdedge.export.build import ExportOptions, export_bundle
    from sdedge.tinyworld.classifier import base_captions
    from sdedge.tinyworld.lcm_lora import packaged_lcm_lora
    from sdedge.trainer.decoder_distill import write_packaged_decoder

    decoder = write_packaged_decoder(out / "tiny-decoder", overwrite=True)
    manifest = export_bundle(base_dir, out / "bundle-fast", ExportOptions(
        loras=((str(packaged_lcm_lora()), 1.0),), default_scheduler="lcm", default_steps=4, default_guidance=1.0,
        decoder=str(decoder), overwrite=True))
    prompts = base_captions()[::3]
    base, fast = _time_and_match(bundle_base, prompts, classifier), _time_and_match(out / "bundle-fast", prompts,
                                                                                    classifier)
    p = manifest.parity
    return {"bundle": str(out / "bundle-fast"), "base_20_steps": base, "fast": fast,
            "speedup": round(base["seconds_per_image"] / fast["seconds_per_image"], 2),
            "parity_image_psnr_db": p.image.psnr_db if p.image else None,
            "decoder_psnr_vs_full_db": p.decoder.psnr_vs_full_db if p.decoder else None}


@dataclass
class _Quickstart:
    """One quickstart in progress: its folders, then what each stage function leaves for the later ones, in order."""

    out: Path
    stages: Stages
    classifier: Any
    base_dir: Path
    bundle_base: Path
    bundle: Path
    images_dir: Path
    keys_dir: Path
    # -- _base_and_before (stages 1-3) ---------------------------------------------------------------------------
    manifest_base: Any = None
    before: Rates | None = None
    base_imgs: np.ndarray | None = None
    # -- _lora_signed (stages 4-7) -------------------------------------------------------------------------------
    trained: Any = None
    manifest: Any = None
    keys: Any = None
    signer: Any = None
    lora: Rates | None = None
    # -- _optimised (stage 8) ------------------------------------------------------------------------------------
    opt: Optimised | None = None
    opt_rates: Rates | None = None
    opt_psnr: float | None = None
    # -- _bench_and_fast (stages 9-10) ---------------------------------------------------------------------------
    report: dict | None = None
    fast: dict | None = None


def run_quickstart(out: Path, console: Console, overwrite: bool = False) -> dict:
    from sdedge.runtime.errors import SdedgeError
    from sdedge.runtime.files import atomic_write_text
    from sdedge.tinyworld.classifier import load_classifier

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SdedgeError(f"{out}: already exists and is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    q = _Quickstart(out=out, stages=Stages(console), classifier=None, base_dir=out / "tiny-base",
                    bundle_base=out / "bundle-base", bundle=out / "bundle", images_dir=out / "images",
                    keys_dir=out / "keys")
    q.images_dir.mkdir(exist_ok=True)
    q.classifier = load_classifier()

    _base_and_before(q)
    _lora_signed(q, console)
    _optimised(q)
    _bench_and_fast(q)

    summary = _summary(q, t_start)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _print_summary(q, summary, console)
    return summary


def _base_and_before(q: _Quickstart) -> None:
    """Stages 1-3: the tiny base, its bundle, and how the base draws the new colour and the base colours."""
    from sdedge.export.bases import write_builtin_base
    from sdedge.export.build import ExportOptions, export_bundle
    from sdedge.runtime.pipeline import Pipeline
    from sdedge.tinyworld.shapes import NEW_COLOUR

    with q.stages("1/10 write the built-in trained tiny base (64×64 coloured shapes)"):
        write_builtin_base("tiny", q.base_dir, overwrite=True)
    with q.stages("2/10 export the base to an ONNX bundle (parity checked against diffusers)"):
        q.manifest_base = export_bundle(q.base_dir, q.bundle_base, ExportOptions(overwrite=True))
    with q.stages(f"3/10 before: the base draws '{NEW_COLOUR}' (a colour it never saw) and the base colours"):
        pipe = Pipeline.load(q.bundle_base, verify="off")
        q.before = rates(pipe, q.classifier)
        q.base_imgs = generate(pipe, base_prompts(), seeds=SEEDS[:1])
        pipe.close()


def _lora_signed(q: _Quickstart, console: Console) -> None:
    """Stages 4-7: the concept images, a LoRA trained on them, its fused bundle signed, and how that bundle draws."""
    from sdedge.export.build import ExportOptions, export_bundle
    from sdedge.export.signing import keygen, sign
    from sdedge.runtime.signing import verify_bundle
    from sdedge.tinyworld.shapes import NEW_COLOUR
    from sdedge.trainer.train import train

    out = q.out
    with q.stages(f"4/10 make {CONCEPT_IMAGES} images of '{NEW_COLOUR}' shapes and {PRIOR_IMAGES} base-colour scenes "
                  "(prior preservation), and prepare them"):
        concept, prior = write_concept_data(out), write_prior_data(out)
    with q.stages(f"5/10 train a LoRA on the new colour, the base colours as its prior ({LORA_STEPS} steps)"):
        q.trained = train(lora_config(q.base_dir, concept, out / "lora", prior), console=console)
    with q.stages(f"6/10 export with the LoRA fused at {LORA_SCALE:g} (fp32, parity gated) and sign it with a fresh key"):
        q.manifest = export_bundle(q.base_dir, q.bundle, ExportOptions(loras=((str(q.trained.adapter), LORA_SCALE),),
                                                                       overwrite=True))
        shutil.rmtree(q.keys_dir, ignore_errors=True)
        q.keys = keygen(q.keys_dir)
        sign(q.bundle, key=q.keys.private)
        q.signer = verify_bundle(q.bundle, public_key=q.keys.public)
    with q.stages("7/10 after: the LoRA bundle draws both colour sets (signature required)"):
        q.lora = _signed_rates(q.bundle, q.keys, q.classifier)


def _optimised(q: _Quickstart) -> None:
    """Stage 8: the optimised bundle (sdedge/quickstart_lora.py `choose_optimised`) and the three grids."""
    from sdedge.benchmarks.bench import psnr
    from sdedge.export.signing import sign

    keys, lora, before, prompts = q.keys, q.lora, q.before, concept_prompts()
    with q.stages("8/10 the optimised bundle: int8, else bf16, kept when the export's speed gate measures it faster "
                  "here and its prompt match stays within 0.05 of fp32's (signed, signature required)"):
        opt = choose_optimised(q.bundle, q.out, lora,
                               lambda b: (sign(b, key=keys.private), _signed_rates(b, keys, q.classifier))[1])
        opt_rates = opt.rates or lora
        opt_psnr = (float(np.mean([psnr(a / 255.0, b / 255.0) for a, b in zip(opt_rates.new_images, lora.new_images)]))
                    if opt.rates else None)
        first = slice(0, None, len(SEEDS))  # one image per prompt in the grids
        rows = _shown(before, lora, opt)
        _grid_png([(label, r.new_images[first]) for label, r in rows], prompts, q.images_dir / "before-after.png")
        _grid_png([(label, r.base_images[first]) for label, r in rows], base_colour_prompts(),
                  q.images_dir / "base-colours.png")
        _grid_png([("base", q.base_imgs)], base_prompts(), q.images_dir / "base.png", scale=3)
    q.opt, q.opt_rates, q.opt_psnr = opt, opt_rates, opt_psnr


def _shown(before: Rates, lora: Rates, opt: Optimised) -> list[tuple[str, Rates]]:
    """(label, rates) of the bundles the grids and the summary table show: base, LoRA fp32, and the optimised bundle
    unless fp32 was kept (then it is the LoRA fp32 row already)."""
    rows = [("base", before), ("LoRA fp32", lora)]
    return rows + [(f"LoRA {opt.precision} (optimised)", opt.rates)] if opt.rates else rows


def _bench_and_fast(q: _Quickstart) -> None:
    """Stages 9-10: the bench against diffusers, and the fast bundle against the 20-step one."""
    with q.stages("9/10 bench the base bundle against diffusers on the same weights and latents"):
        from sdedge.benchmarks.bench import quick_bench

        with warnings.catch_warnings():  # "not signed": bundle-base is the unsigned "before" bundle
            warnings.simplefilter("ignore")
            q.report = quick_bench(q.bundle_base, q.base_dir, q.out / "bench", runs=4, steps=20,
                                   prompts=tuple(base_prompts()))
    with q.stages("10/10 fast mode: the shipped LCM-LoRA and tiny decoder, 4 LCM steps at guidance 1, vs 20 steps"):
        q.fast = fast_mode(q.base_dir, q.bundle_base, q.out, q.classifier)


def _summary(q: _Quickstart, t_start: float) -> dict:
    """summary.json's figures (the order of its keys is the file's)."""
    from sdedge.tinyworld.shapes import NEW_COLOUR

    e, opt, before, lora, opt_rates = engine_of(q.report), q.opt, q.before, q.lora, q.opt_rates
    manifest_base, manifest, images_dir, out = q.manifest_base, q.manifest, q.images_dir, q.out
    return {
        "base": str(q.base_dir),
        "bundle": str(q.bundle),
        "bundle_optimised": str(opt.bundle),
        "bundle_base": str(q.bundle_base),
        "signature": str(q.bundle / "model.sig"),
        "signer": q.signer.describe(),
        "public_key": str(q.keys.public),
        "new_concept": NEW_COLOUR,
        "concept_prompts": len(concept_prompts()),
        "images_per_rate": len(concept_prompts()) * len(SEEDS),
        "images_per_base_colour_rate": len(base_colour_prompts()) * len(SEEDS),
        "match_rate_base": round(before.new, 3),
        "match_rate_lora": round(lora.new, 3),
        "match_rate_optimised": round(opt_rates.new, 3),
        "match_rate_base_known_colours": round(before.base, 3),
        "match_rates": {"base": before.figures(), "lora_fp32": lora.figures(), "optimised": opt_rates.figures()},
        "optimised": {"precision": opt.precision, "reason": opt.reason, "speed_ratio": opt.speed_ratio,
                      "backend": opt.backend, "tried": list(opt.tried),
                      "psnr_vs_fp32_db": round(q.opt_psnr, 2) if q.opt_psnr is not None else None,
                      "size_ratio": _size_ratio(opt.manifest) if opt.manifest is not None else None},
        "parity_image_psnr_db": manifest_base.parity.image.psnr_db if manifest_base.parity.image else None,
        "parity_lora_image_psnr_db": manifest.parity.image.psnr_db if manifest.parity.image else None,
        "parity_max_abs_err": {k: v.max_abs_err for k, v in manifest_base.parity.components.items()},
        "lora_steps": q.trained.steps,
        "lora_scale": LORA_SCALE,
        "lora_final_loss": round(q.trained.final_loss, 4),
        "images": {"before_after": str(images_dir / "before-after.png"), "base": str(images_dir / "base.png"),
                   "base_colours": str(images_dir / "base-colours.png")},
        "bench": str(out / "bench" / "report.md"),
        "bench_speedup_vs_diffusers": e["speedup_vs_reference"]["median"],
        "bench_psnr_db": e["parity"]["psnr_db"]["median"],
        "bench_prompt_match": (e.get("prompt_match") or {}).get("rate"),
        "fast_mode": q.fast,
        "stage_seconds": {k: round(v, 2) for k, v in q.stages.seconds.items()},
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }


def _print_summary(q: _Quickstart, summary: dict, console: Console) -> None:
    """The closing table and the lines under it."""
    from sdedge.tinyworld.shapes import NEW_COLOUR

    opt, fast, images_dir, e = q.opt, q.fast, q.images_dir, engine_of(q.report)
    table = Table("what", "where / figure")
    table.add_row("base model (diffusers layout)", str(q.base_dir))
    table.add_row(f"LoRA bundle fp32 / optimised: {opt.precision} (ONNX + sdedge.json)", f"{q.bundle} / {opt.bundle}")
    table.add_row("why that optimised bundle (the export's speed gate)", opt.reason)
    table.add_row(f"signatures ({q.signer.describe()})", str(q.bundle / "model.sig"))
    rows = _shown(q.before, q.lora, opt)
    table.add_row(f"grids: '{NEW_COLOUR}' / base colours (rows {', '.join(label for label, _ in rows)})",
                  f"{images_dir / 'before-after.png'} / {images_dir / 'base-colours.png'}")
    n_new, n_base = summary["images_per_rate"], summary["images_per_base_colour_rate"]
    for label, r in rows:
        table.add_row(f"prompt match, {label}: '{NEW_COLOUR}' ({n_new} images) / base colours ({n_base})",
                      f"{r.new:.0%} / {r.base:.0%}")
    if q.opt_psnr is not None:
        table.add_row(f"{opt.precision} vs fp32 (same latents)", f"{q.opt_psnr:.1f} dB PSNR")
    table.add_row("bench report (vs diffusers)", str(q.out / "bench" / "report.md"))
    b20, f4 = fast["base_20_steps"], fast["fast"]
    table.add_row(f"base bundle, {b20['steps']} {b20['scheduler']} steps, guidance {b20['guidance']:g}",
                  f"{b20['seconds_per_image']:.3f} s / image, prompt match {b20['prompt_match']:.0%} "
                  f"({b20['images']} base captions)")
    table.add_row(f"fast bundle (LCM-LoRA + tiny decoder), {f4['steps']} {f4['scheduler']} steps, guidance "
                  f"{f4['guidance']:g}", f"{f4['seconds_per_image']:.3f} s / image ({fast['speedup']:.1f}× faster), "
                  f"prompt match {f4['prompt_match']:.0%}; {fast['bundle']}")
    table.add_row("summary", str(q.out / "summary.json"))
    console.print(table)
    if q.manifest_base.parity.image:
        console.print(f"runtime vs diffusers on the same weights and latents: "
                      f"{q.manifest_base.parity.image.psnr_db:.1f} dB PSNR")
    console.print(f"bench on this machine: the runtime is {e['speedup_vs_reference']['median']:.2f}× diffusers' speed "
                  f"per image, {e['parity']['psnr_db']['median']:.1f} dB PSNR against it (tiny model, 20 steps)")
    console.print(f"quickstart done in {summary['seconds_total']:.0f} s. Next: "
                  f"sdedge generate {q.bundle} \"a {NEW_COLOUR} circle on a white background\" --out out.png "
                  f"--public-key {q.keys.public}")


def _signed_rates(bundle: Path, keys, classifier):
    """The prompt-match rates of a bundle loaded with its signature required (sdedge/quickstart_lora.py `rates`)."""
    from sdedge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, verify="required", public_key=keys.public)
    try:
        return rates(pipe, classifier)
    finally:
        pipe.close()


def _size_ratio(derived) -> float | None:
    """Bytes of a derived bundle's components over those of the fp32 bundle it came from (its manifest's record)."""
    if derived.sizes is None:
        return None
    return round(sum(derived.sizes.after.values()) / sum(derived.sizes.before.values()), 3)


def engine_of(report: dict) -> dict:
    """The sdedge engine's entry of a bench report (the other one is the diffusers reference)."""
    return next(e for e in report["engines"] if e["role"] == "engine")
