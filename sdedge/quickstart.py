"""`sdedge quickstart`: the main job end to end on the built-in tiny model.

    base tiny ─► export (ONNX bundle, parity vs diffusers) ─► generate (PyTorch-free runtime) ─► info
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sdedge.runtime.stages import Stages

PROMPTS = ("a red circle on a blue background", "a green square on a yellow background")


def run_quickstart(out: Path, console: Console, overwrite: bool = False) -> dict:
    from sdedge.export.bases import write_builtin_base
    from sdedge.export.build import ExportOptions, export_bundle
    from sdedge.export.bundle_writer import atomic_write_text
    from sdedge.export.signing import keygen, sign
    from sdedge.runtime.signing import verify_bundle
    from sdedge.runtime.errors import SdedgeError
    from sdedge.runtime.pipeline import Pipeline

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SdedgeError(f"{out}: already exists and is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    stages = Stages(console)
    base_dir, bundle_dir, images_dir, keys_dir = out / "tiny-base", out / "bundle", out / "images", out / "keys"

    with stages("1/6 write the built-in tiny base"):
        write_builtin_base("tiny", base_dir, seed=0, overwrite=True)
    with stages("2/6 export to an ONNX bundle (parity checked against diffusers)"):
        manifest = export_bundle(base_dir, bundle_dir, ExportOptions(overwrite=True))
    with stages("3/6 sign with a fresh key and verify"):
        if keys_dir.exists():
            import shutil

            shutil.rmtree(keys_dir)
        keys = keygen(keys_dir)
        sign(bundle_dir, key=keys.private)
        signer = verify_bundle(bundle_dir, public_key=keys.public)
    images_dir.mkdir(exist_ok=True)
    with stages("4/6 generate with the PyTorch-free runtime (signature required)"):
        pipe = Pipeline.load(bundle_dir, device="cpu", verify="required", public_key=keys.public)
        results = []
        for i, prompt in enumerate(PROMPTS):
            r = pipe.generate(prompt, steps=20, seed=7 + i, scheduler="dpm++2m")
            path = images_dir / f"{i}.png"
            r.to_pil()[0].save(path)
            results.append((prompt, path, r))
        pipe.close()
    with stages("5/6 bench the bundle against diffusers on the same weights and latents"):
        import warnings

        from sdedge.benchmarks.bench import quick_bench

        with warnings.catch_warnings():  # "signed but no key given": step 3 verified it with the key
            warnings.simplefilter("ignore")
            report = quick_bench(bundle_dir, base_dir, out / "bench", runs=2, steps=4)
    with stages("6/6 summary"):
        summary = {
            "base": str(base_dir),
            "bundle": str(bundle_dir),
            "signature": str(bundle_dir / "model.sig"),
            "signer": signer.describe(),
            "public_key": str(keys.public),
            "images": [str(p) for _, p, _ in results],
            "parity_image_psnr_db": manifest.parity.image.psnr_db if manifest.parity.image else None,
            "parity_max_abs_err": {k: v.max_abs_err for k, v in manifest.parity.components.items()},
            "seconds_per_image": [round(r.timings["unet"] + r.timings["text_encoder"] + r.timings["vae_decoder"], 4)
                                  for _, _, r in results],
            "bench": str(out / "bench" / "report.md"),
            "bench_speedup_vs_diffusers": engine_of(report)["speedup_vs_reference"]["median"],
            "bench_psnr_db": engine_of(report)["parity"]["psnr_db"]["median"],
            "stage_seconds": {k: round(v, 2) for k, v in stages.seconds.items()},
        }
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")

    table = Table("what", "where")
    table.add_row("base model (diffusers layout)", str(base_dir))
    table.add_row("bundle (ONNX + sdedge.json)", str(bundle_dir))
    table.add_row(f"signature ({signer.describe()})", str(bundle_dir / "model.sig"))
    table.add_row("signing keys", str(keys_dir))
    for prompt, path, r in results:
        table.add_row(f"image: {prompt!r}", str(path))
    table.add_row("bench report (vs diffusers)", str(out / "bench" / "report.md"))
    table.add_row("summary", str(out / "summary.json"))
    console.print(table)
    if manifest.parity.image:
        console.print(f"runtime vs diffusers on the same weights and latents: {manifest.parity.image.psnr_db:.1f} dB PSNR")
    e = engine_of(report)
    console.print(f"bench on this machine: the runtime is {e['speedup_vs_reference']['median']:.2f}× diffusers' speed "
                  f"per image, {e['parity']['psnr_db']['median']:.1f} dB PSNR against it (tiny model, 4 steps)")
    console.print(f"quickstart done in {time.perf_counter() - t_start:.1f} s. Next: "
                  f"sdedge verify {bundle_dir} --public-key {keys.public} · "
                  f"sdedge generate {bundle_dir} \"a red circle\" --out out.png")
    console.print("[dim]The built-in tiny model has random weights: its images are noise-like until the trained "
                  "tiny base lands.[/dim]")
    return summary


def engine_of(report: dict) -> dict:
    """The sdedge engine's entry of a bench report (the other one is the diffusers reference)."""
    return next(e for e in report["engines"] if e["role"] == "engine")
