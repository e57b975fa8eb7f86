"""Training-step benchmark: LoRA training step time with and without cached VAE latents.

    python -m sdedge.benchmarks.train_step --base sd15/ --size 256 --steps 6 --warmup 2 --rounds 2 \
        --out benchmarks/results/train-step-sd15-arch-256

`--base` is a diffusers folder (`sdedge base sd15-arch --out sd15/` writes the real SD1.5 architecture with seeded
random weights; step time does not depend on the weight values). A small synthetic image set is prepared at
`--size` in the output folder. Each measurement runs `sdedge.trainer.train` in its own process, alternating
cached → uncached per round, batch 1, rank 16, the text embeddings cached in both (only the VAE encode differs).
A step's time is read from metrics.jsonl (the loop's clock, after caching); the first `--warmup` steps are
dropped. Reported: median seconds per step per mode, the ratio uncached / cached per round, the time spent
caching, peak RSS, and whether cached was faster.
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

from sdedge.runtime.environment import cpu_model

MODES = ("cached", "uncached")


def make_dataset(folder: Path, size: int, n: int) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw
    from sdedge.trainer.prepare import PrepareOptions, prepare_dataset

    data = folder / "data"
    if (data / "metadata.json").is_file():
        return data
    src = folder / "images"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)).resize((size, size),
                                                                                        Image.Resampling.BICUBIC)
        ImageDraw.Draw(im).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4),
                                   fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        im.save(src / f"{i:03d}.png")
        (src / f"{i:03d}.txt").write_text(f"a photograph of object number {i}")
    prepare_dataset(src, data, PrepareOptions(resolution=size, dedup=None))
    return data


def worker(mode: str, args) -> dict:
    import torch
    from sdedge.runtime.memory import peak_rss_bytes
    from sdedge.trainer.config import TrainConfig
    from sdedge.trainer.metrics import read_metrics
    from sdedge.trainer.train import train

    torch.set_num_threads(args.threads)
    out = Path(args.out) / "runs" / mode
    cfg = TrainConfig(base=args.base, data=str(Path(args.out) / "data"), out=str(out), rank=args.rank, batch_size=1,
                      max_steps=args.warmup + args.steps, cache_latents=(mode == "cached"), cache_text_embeddings=True,
                      seed=args.seed, progress=False, tensorboard=False, overwrite=True)
    t0 = time.perf_counter()
    result = train(cfg)
    total = time.perf_counter() - t0
    rows = read_metrics(out / "metrics.jsonl")
    clock = [0.0] + [r["seconds"] for r in rows]
    step_s = [b - a for a, b in zip(clock, clock[1:])][args.warmup:]
    loop_s = clock[-1]
    return {"mode": mode, "step_seconds": step_s, "median_step_seconds": statistics.median(step_s),
            "total_seconds": total, "loop_seconds": loop_s, "setup_seconds": total - loop_s,
            "peak_rss_bytes": peak_rss_bytes(), "final_loss": result.final_loss}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="diffusers folder, e.g. written by `sdedge base sd15-arch`")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--images", type=int, default=8, help="images in the synthetic training set")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps per run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="benchmarks/results/train-step-sd15-arch-256")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    make_dataset(out, args.size, args.images)
    passthrough = list(argv if argv is not None else sys.argv[1:])
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            proc = subprocess.run([sys.executable, "-m", "sdedge.benchmarks.train_step", *passthrough, "--worker", mode],
                                  capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stderr[-5000:])
                raise SystemExit(f"{mode} worker failed (exit {proc.returncode})")
            res = json.loads(line[len("RESULT "):])
            runs[mode].append(res)
            print(f"round {r + 1} {mode:<9} {res['median_step_seconds']:7.2f} s/step  setup {res['setup_seconds']:6.1f} s  "
                  f"peak RSS {res['peak_rss_bytes'] / 1e9:5.2f} GB", flush=True)

    summary = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
                    "python": platform.python_version()},
        "settings": {"base": str(args.base), "size": args.size, "batch": 1, "rank": args.rank, "images": args.images,
                     "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds},
        "date": time.strftime("%Y-%m-%d"),
        "modes": {},
    }
    for mode in MODES:
        rs = runs[mode]
        summary["modes"][mode] = {
            "median_step_seconds": statistics.median(s for r in rs for s in r["step_seconds"]),
            "per_round_median_step_seconds": [r["median_step_seconds"] for r in rs],
            "median_setup_seconds": statistics.median(r["setup_seconds"] for r in rs),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
        }
    ratios = [u["median_step_seconds"] / c["median_step_seconds"] for c, u in zip(runs["cached"], runs["uncached"])]
    summary["uncached_over_cached_per_round"] = ratios
    summary["cached_faster"] = all(x > 1.0 for x in ratios)
    try:
        import importlib.metadata as md

        summary["versions"] = {k: md.version(k) for k in ("sdedge", "torch", "diffusers", "peft", "accelerate")}
    except Exception:  # noqa: BLE001 - versions are informational
        pass
    (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0 if summary["cached_faster"] else 1


def markdown(s: dict) -> str:
    st = s["settings"]
    lines = [
        f"# Training step: {Path(st['base']).name} {st['size']}×{st['size']}, batch {st['batch']}, LoRA rank {st['rank']}",
        "",
        f"{s['date']} · {s['machine']['cpu']} · {s['machine']['cores']} cores, {s['machine']['threads']} threads · "
        + ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items()),
        "",
        f"Each run in its own process, cached and uncached alternating, {st['rounds']} round(s); {st['warmup']} warm-up "
        f"step(s) dropped, {st['steps']} timed. Text embeddings cached in both modes.",
        "",
        "| VAE latents | median s/step | per round | setup s (load + caches) | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for mode, m in s["modes"].items():
        per = ", ".join(f"{x:.2f}" for x in m["per_round_median_step_seconds"])
        lines.append(f"| {mode} | {m['median_step_seconds']:.2f} | {per} | {m['median_setup_seconds']:.1f} | "
                     f"{m['peak_rss_bytes'] / 1e9:.2f} GB |")
    ratio = ", ".join(f"{x:.2f}×" for x in s["uncached_over_cached_per_round"])
    lines += ["", f"Uncached / cached step time per round: {ratio} — cached is "
              f"{'faster' if s['cached_faster'] else 'NOT faster'} in every round."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
