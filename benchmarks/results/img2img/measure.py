"""PSNR of the runtime's img2img / inpainting vs diffusers, same torch noise, tiny bases, 64², 6 steps, guidance 7.5."""
import json, sys, tempfile
from pathlib import Path
from sdedge.export.bases import write_builtin_base, load_base
from sdedge.export.build import ExportOptions, export_bundle, parity_picture
from sdedge.export.reference import TorchNoise, psnr, reference_init_images
from sdedge.runtime.pipeline import Pipeline
W = Path("/tmp/img2img")
SCHEDULERS = ["ddim", "pndm", "euler", "euler_a", "dpm++2m", "dpm++2m-karras", "lcm"]
img, mask = parity_picture(64)
out = {}
for name, cases in (("tiny", [("img2img", None, 0.6), ("inpaint-4ch-blend", mask, 1.0), ("inpaint-4ch-blend", mask, 0.7)]),
                    ("tiny-inpaint", [("inpaint-9ch", mask, 1.0), ("inpaint-9ch", mask, 0.7)])):
    base = W / name
    if not base.exists():
        write_builtin_base(name, base, seed=0)
    bundle = W / f"{name}-bundle2"
    export_bundle(base, bundle, ExportOptions(overwrite=True))
    pipe, rt = load_base(base), Pipeline.load(bundle, device="cpu", verify="off")
    for label, m, strength in cases:
        for s in SCHEDULERS:
            kw = dict(image=img, mask=m, strength=strength, steps=6, guidance=7.5, scheduler=s)
            ours = rt.generate("a red circle", "blurry", rng=TorchNoise(3), watermark=False, **kw).images
            ref = reference_init_images(pipe, "a red circle", "blurry", scheduler_config=rt.manifest.scheduler, seed=3, **kw)
            out[f"{name} {label} strength {strength} {s}"] = round(psnr(ours, ref), 1)
            print(f"{name} {label} strength {strength} {s}", out[f"{name} {label} strength {strength} {s}"], flush=True)
json.dump(out, open(W / "figures.json", "w"), indent=1)
