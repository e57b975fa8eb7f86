"""`sdedge quickstart`: the whole flow on the built-in trained tiny base, in a few minutes on a laptop CPU.

    base tiny ─► export (fp32, parity vs diffusers)                       ─► "before" images of a new concept
    concept images ("a purple …", a colour the base never saw) ─► prepare ─► train a LoRA
    ─► export with the LoRA fused (fp32, then int8) ─► sign with a fresh key ─► verify
    ─► generate (signature required) ─► prompt-match rates before/after, int8 vs fp32 PSNR ─► bench ─► summary.json
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from sdedge.runtime.stages import Stages

SEEDS = (11, 12)
CONCEPT_IMAGES = 96
LORA_STEPS = 300


def concept_prompts() -> list[str]:
    """Every shape on every base background, in the colour the base never saw."""
    from sdedge.tinyworld.shapes import BASE_COLOURS, NEW_COLOUR, SHAPES, caption

    return [caption(s, NEW_COLOUR, b) for s in SHAPES for b in BASE_COLOURS]


def base_prompts() -> list[str]:
    return ["a red circle on a blue background", "a yellow triangle on a black background",
            "a green square on a white background", "a blue circle on a yellow background"]


def _generate(pipe, prompts: list[str], seeds=SEEDS) -> np.ndarray:
    """uint8 (len(prompts) · len(seeds), H, W, 3), prompt-major; 4 prompts a call (the bundle's batch limit of 8
    counts the unconditional half)."""
    from sdedge.runtime.pipeline import to_uint8

    out = []
    for prompt in prompts:
        for seed in seeds:
            out.append(to_uint8(pipe.generate(prompt, seed=seed).images)[0])
    return np.stack(out)


def _grid_png(rows: list[tuple[str, np.ndarray]], prompts: list[str], path: Path, scale: int = 2) -> None:
    """One row per (label, images), one column per prompt, labelled (sdedge.runtime.grid), upscaled `scale`×."""
    from sdedge.runtime.grid import GridLayout, labelled_grid, write_grid

    cell = rows[0][1].shape[1] * scale  # images (N, H, W, 3), square
    write_grid(labelled_grid([list(imgs) for _, imgs in rows], [label for label, _ in rows], prompts,
                             GridLayout(cell=cell, label_w=110)), path)


def run_quickstart(out: Path, console: Console, overwrite: bool = False) -> dict:
    from sdedge.benchmarks.bench import psnr
    from sdedge.export.bases import write_builtin_base
    from sdedge.export.build import ExportOptions, export_bundle
    from sdedge.export.signing import keygen, sign
    from sdedge.runtime.errors import SdedgeError
    from sdedge.runtime.files import atomic_write_text
    from sdedge.runtime.manifest import Precision
    from sdedge.runtime.pipeline import Pipeline
    from sdedge.runtime.signing import verify_bundle
    from sdedge.tinyworld.classifier import load_classifier, match_rate
    from sdedge.tinyworld.shapes import NEW_COLOUR, write_dataset
    from sdedge.trainer.config import TrainConfig
    from sdedge.trainer.prepare import PrepareOptions, prepare_dataset
    from sdedge.trainer.train import train

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SdedgeError(f"{out}: already exists and is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    stages = Stages(console)
    base_dir, keys_dir = out / "tiny-base", out / "keys"
    bundle_base, bundle, bundle_int8 = out / "bundle-base", out / "bundle", out / "bundle-int8"
    images_dir = out / "images"
    images_dir.mkdir(exist_ok=True)
    classifier = load_classifier()
    prompts = concept_prompts()
    tag = lambda p: [p_ for p_ in p for _ in SEEDS]  # noqa: E731 - one prompt per generated image

    with stages("1/9 write the built-in trained tiny base (64×64 coloured shapes)"):
        write_builtin_base("tiny", base_dir, overwrite=True)
    with stages("2/9 export the base to an ONNX bundle (parity checked against diffusers)"):
        manifest_base = export_bundle(base_dir, bundle_base, ExportOptions(overwrite=True))
    with stages(f"3/9 before: the base draws '{NEW_COLOUR}', a colour it never saw"):
        pipe = Pipeline.load(bundle_base, verify="off")
        before = _generate(pipe, prompts)
        base_imgs = _generate(pipe, base_prompts(), seeds=SEEDS[:1])
        pipe.close()
        match_base = match_rate(classifier, before, tag(prompts))
        match_base_known = match_rate(classifier, base_imgs, base_prompts())
    with stages(f"4/9 make {CONCEPT_IMAGES} images of '{NEW_COLOUR}' shapes and prepare them"):
        raw = write_dataset(out / "concept-images", CONCEPT_IMAGES, colours=(NEW_COLOUR,), seed=5)
        prepare_dataset(raw, out / "concept-data", PrepareOptions(resolution=64, dedup=None, overwrite=True))
    with stages(f"5/9 train a LoRA on the new colour ({LORA_STEPS} steps)"):
        cfg = TrainConfig(base=str(base_dir), data=str(out / "concept-data"), out=str(out / "lora"),
                          rank=8, learning_rate=1e-3, batch_size=8, max_steps=LORA_STEPS,
                          train_text_encoder=True, lr_warmup_steps=10, seed=0, tensorboard=False,
                          progress=False, log_steps=25, overwrite=True)
        trained = train(cfg, console=console)
    with stages("6/9 export with the LoRA fused: fp32, then int8 (parity and speed gates)"):
        manifest = export_bundle(base_dir, bundle, ExportOptions(loras=((str(trained.adapter), 1.0),),
                                                                 overwrite=True))
        manifest_int8 = export_bundle(bundle, bundle_int8, ExportOptions(precision=Precision.INT8, overwrite=True))
    with stages("7/9 sign both bundles with a fresh key and verify"):
        shutil.rmtree(keys_dir, ignore_errors=True)
        keys = keygen(keys_dir)
        for b in (bundle, bundle_int8):
            sign(b, key=keys.private)
        signer = verify_bundle(bundle, public_key=keys.public)
        verify_bundle(bundle_int8, public_key=keys.public)
    with stages("8/9 after: generate with the LoRA bundles (signature required)"):
        imgs = {}
        for name, b in (("fp32", bundle), ("int8", bundle_int8)):
            pipe = Pipeline.load(b, verify="required", public_key=keys.public)
            imgs[name] = _generate(pipe, prompts)
            pipe.close()
        match_lora = match_rate(classifier, imgs["fp32"], tag(prompts))
        match_int8 = match_rate(classifier, imgs["int8"], tag(prompts))
        int8_psnr = float(np.mean([psnr(a / 255.0, b / 255.0) for a, b in zip(imgs["int8"], imgs["fp32"])]))
        first = slice(0, None, len(SEEDS))  # one image per prompt in the grid
        _grid_png([("base", before[first]), ("LoRA fp32", imgs["fp32"][first]), ("LoRA int8", imgs["int8"][first])],
                  prompts, images_dir / "before-after.png")
        _grid_png([("base", base_imgs)], base_prompts(), images_dir / "base.png", scale=3)
    with stages("9/9 bench the base bundle against diffusers on the same weights and latents"):
        from sdedge.benchmarks.bench import quick_bench

        with warnings.catch_warnings():  # "not signed": bundle-base is the unsigned "before" bundle
            warnings.simplefilter("ignore")
            report = quick_bench(bundle_base, base_dir, out / "bench", runs=4, steps=20,
                                 prompts=tuple(base_prompts()))

    e = engine_of(report)
    summary = {
        "base": str(base_dir),
        "bundle": str(bundle),
        "bundle_int8": str(bundle_int8),
        "bundle_base": str(bundle_base),
        "signature": str(bundle / "model.sig"),
        "signer": signer.describe(),
        "public_key": str(keys.public),
        "new_concept": NEW_COLOUR,
        "concept_prompts": len(prompts),
        "images_per_rate": len(prompts) * len(SEEDS),
        "match_rate_base": round(match_base, 3),
        "match_rate_lora": round(match_lora, 3),
        "match_rate_lora_int8": round(match_int8, 3),
        "match_rate_base_known_colours": round(match_base_known, 3),
        "int8_psnr": round(int8_psnr, 2),
        "int8_size_ratio": _size_ratio(manifest_int8),
        "parity_image_psnr_db": manifest_base.parity.image.psnr_db if manifest_base.parity.image else None,
        "parity_lora_image_psnr_db": manifest.parity.image.psnr_db if manifest.parity.image else None,
        "parity_max_abs_err": {k: v.max_abs_err for k, v in manifest_base.parity.components.items()},
        "lora_steps": trained.steps,
        "lora_final_loss": round(trained.final_loss, 4),
        "images": {"before_after": str(images_dir / "before-after.png"), "base": str(images_dir / "base.png")},
        "bench": str(out / "bench" / "report.md"),
        "bench_speedup_vs_diffusers": e["speedup_vs_reference"]["median"],
        "bench_psnr_db": e["parity"]["psnr_db"]["median"],
        "bench_prompt_match": (e.get("prompt_match") or {}).get("rate"),
        "stage_seconds": {k: round(v, 2) for k, v in stages.seconds.items()},
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")

    table = Table("what", "where / figure")
    table.add_row("base model (diffusers layout)", str(base_dir))
    table.add_row("LoRA bundle, fp32 / int8 (ONNX + sdedge.json)", f"{bundle} / {bundle_int8}")
    table.add_row(f"signatures ({signer.describe()})", str(bundle / "model.sig"))
    table.add_row("before / after grid (base, LoRA fp32, LoRA int8)", str(images_dir / "before-after.png"))
    table.add_row(f"prompt match on '{NEW_COLOUR}' prompts: base → LoRA",
                  f"{match_base:.0%} → {match_lora:.0%} (int8 {match_int8:.0%}; {summary['images_per_rate']} images)")
    table.add_row("prompt match of the base on colours it knows", f"{match_base_known:.0%}")
    table.add_row("int8 vs fp32 (same latents)", f"{int8_psnr:.1f} dB PSNR")
    table.add_row("bench report (vs diffusers)", str(out / "bench" / "report.md"))
    table.add_row("summary", str(out / "summary.json"))
    console.print(table)
    if manifest_base.parity.image:
        console.print(f"runtime vs diffusers on the same weights and latents: "
                      f"{manifest_base.parity.image.psnr_db:.1f} dB PSNR")
    console.print(f"bench on this machine: the runtime is {e['speedup_vs_reference']['median']:.2f}× diffusers' speed "
                  f"per image, {e['parity']['psnr_db']['median']:.1f} dB PSNR against it (tiny model, 20 steps)")
    console.print(f"quickstart done in {summary['seconds_total']:.0f} s. Next: "
                  f"sdedge generate {bundle} \"a {NEW_COLOUR} circle on a white background\" --out out.png "
                  f"--public-key {keys.public}")
    return summary


def _size_ratio(derived) -> float | None:
    """Bytes of a derived bundle's components over those of the fp32 bundle it came from (its manifest's record)."""
    if derived.sizes is None:
        return None
    return round(sum(derived.sizes.after.values()) / sum(derived.sizes.before.values()), 3)


def engine_of(report: dict) -> dict:
    """The sdedge engine's entry of a bench report (the other one is the diffusers reference)."""
    return next(e for e in report["engines"] if e["role"] == "engine")
