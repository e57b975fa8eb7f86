"""Spine benchmark: the runtime's fp32 bundle against diffusers' eager fp32 pipeline, side by side.

    python -m sdedge.benchmarks.spine --base sd15/ --bundle bundle-sd15/ --size 256 --steps 20 --rounds 2 \
        --out benchmarks/results/spine-sd15-arch-256

Each measurement runs in its own process (so peak RSS is that engine's alone), in alternation
diffusers → runtime → runtime(memory=low) per round, on the same prompt, seed and initial latents.
Each process does one short warm-up generation, then one timed 20-step image. Reported: median seconds per
image, the ratio diffusers / runtime per round, peak RSS, and the image PSNR of runtime vs diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sdedge.runtime.environment import cpu_model, package_versions
from sdedge.runtime.files import atomic_write_json, atomic_write_text

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry"


def latents_for(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, size // 8, size // 8), dtype=np.float32)


def worker(engine: str, args) -> dict:
    """Runs inside a child process: load, warm up, time one image, report."""
    from sdedge.runtime.memory import peak_rss_bytes

    latents = latents_for(args.size, args.seed)
    t0 = time.perf_counter()
    if engine == "diffusers":
        import torch

        from sdedge.export.bases import load_base
        from sdedge.export.reference import reference_images

        torch.set_num_threads(args.threads)
        pipe = load_base(args.base)
        load_s = time.perf_counter() - t0
        run = lambda steps: reference_images(pipe, PROMPT, NEGATIVE, latents=latents, scheduler=args.scheduler,  # noqa: E731
                                             scheduler_config=dict(pipe.scheduler.config), steps=steps,
                                             guidance=args.guidance)
    else:
        from sdedge.runtime.pipeline import Pipeline

        pipe = Pipeline.load(args.bundle, device="cpu", memory="low" if engine == "runtime-low" else "normal",
                             threads=args.threads)
        load_s = time.perf_counter() - t0
        run = lambda steps: pipe.generate(PROMPT, NEGATIVE, latents=latents, scheduler=args.scheduler,  # noqa: E731
                                          width=args.size, height=args.size, steps=steps,
                                          guidance=args.guidance, watermark=False).images  # PSNR vs diffusers
    run(2)  # warm-up
    t0 = time.perf_counter()
    image = run(args.steps)
    seconds = time.perf_counter() - t0
    return {"engine": engine, "seconds": seconds, "load_seconds": load_s, "peak_rss_bytes": peak_rss_bytes(),
            "image": image.tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="dpm++2m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="benchmarks/results/spine-sd15-arch-256")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)))
        return 0

    from sdedge.export.reference import psnr

    engines = ("diffusers", "runtime", "runtime-low")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for r in range(args.rounds):
        for engine in engines:
            proc = subprocess.run([sys.executable, "-m", "sdedge.benchmarks.spine", *passthrough, "--worker", engine],
                                  capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"{engine} worker failed (exit {proc.returncode})")
            res = json.loads(line[len("RESULT "):])
            runs[engine].append(res)
            print(f"round {r + 1} {engine:<12} {res['seconds']:7.2f} s/image  load {res['load_seconds']:5.1f} s  "
                  f"peak RSS {res['peak_rss_bytes'] / 1e9:5.2f} GB", flush=True)

    ref_img = np.asarray(runs["diffusers"][0]["image"], dtype=np.float32)
    summary = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
                           "python": platform.python_version()},
               "settings": {k: getattr(args, k) for k in ("size", "steps", "guidance", "scheduler", "seed", "rounds")},
               "date": time.strftime("%Y-%m-%d"), "engines": {}}
    for engine in engines:
        secs = [r["seconds"] for r in runs[engine]]
        img = np.asarray(runs[engine][0]["image"], dtype=np.float32)
        summary["engines"][engine] = {
            "median_seconds": statistics.median(secs), "seconds": secs,
            "median_load_seconds": statistics.median(r["load_seconds"] for r in runs[engine]),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs[engine]),
            "psnr_vs_diffusers_db": None if engine == "diffusers" else min(psnr(img, ref_img), 999.0),
            "speedup_per_round": [d["seconds"] / r["seconds"] for d, r in zip(runs["diffusers"], runs[engine])],
        }
    summary["versions"] = package_versions(("sdedge", "torch", "diffusers", "onnxruntime"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "result.json", summary)
    atomic_write_text(out / "README.md", markdown(summary))
    print(markdown(summary))
    return 0


def markdown(s: dict) -> str:
    d = s["engines"]["diffusers"]
    lines = [
        f"# Spine benchmark: sd15-arch {s['settings']['size']}×{s['settings']['size']}, {s['settings']['steps']} steps, "
        f"guidance {s['settings']['guidance']}, {s['settings']['scheduler']}",
        "",
        f"{s['date']} · {s['machine']['cpu']} · {s['machine']['cores']} cores, {s['machine']['threads']} threads · "
        + ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items()),
        "",
        "Each engine in its own process, alternating per round, same prompt, seed and initial latents; one warm-up "
        "image, then one timed image per process.",
        "",
        "| engine | median s/image | speed-up vs diffusers (per round) | load s | peak RSS | RSS vs diffusers "
        "| PSNR vs diffusers |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in s["engines"].items():
        ratio = ", ".join(f"{x:.2f}×" for x in e["speedup_per_round"])
        ps = "—" if e["psnr_vs_diffusers_db"] is None else f"{e['psnr_vs_diffusers_db']:.1f} dB"
        lines.append(f"| {name} | {e['median_seconds']:.2f} | {ratio} | {e['median_load_seconds']:.1f} | "
                     f"{e['peak_rss_bytes'] / 1e9:.2f} GB | {e['peak_rss_bytes'] / d['peak_rss_bytes']:.0%} | {ps} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
