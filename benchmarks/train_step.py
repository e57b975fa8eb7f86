"""Training-step benchmark: LoRA training step time with and without cached VAE latents.

    python -m sdedge.benchmarks.train_step --base sd15/ --size 256 --steps 6 --warmup 2 --rounds 2 \
        --out benchmarks/results/train-step-sd15-arch-256

`--base` is a diffusers folder (`sdedge base sd15-arch --out sd15/` writes the real SD1.5 architecture with seeded
random weights; step time does not depend on the weight values). A small synthetic image set is prepared at
`--size` in the output folder by `sdedge prepare`. Each measurement runs `sdedge train` in its own process
(benchmarks and the trainer meet only through the CLI and files), alternating cached → uncached per round,
batch 1, rank 16, the text embeddings cached in both (only the VAE encode differs).
A step's time is read from metrics.jsonl (the loop's clock, after caching); the first `--warmup` steps are
dropped. Reported: median seconds per step per mode, the ratio uncached / cached per round, the time spent
caching, peak RSS, and whether cached was faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sdedge.runtime.environment import cpu_model
from sdedge.runtime.files import atomic_write_json, atomic_write_text

MODES = ("cached", "uncached")


def _sdedge(*args: str, threads: int | None = None) -> subprocess.CompletedProcess:
    """Run an sdedge command in its own process; a failure stops the benchmark with the command's own message."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.run([sys.executable, "-m", "sdedge", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"sdedge {args[0]} failed (exit {proc.returncode})")
    return proc


def make_dataset(folder: Path, size: int, n: int) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw

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
    _sdedge("prepare", str(src), "--out", str(data), "--resolution", str(size), "--no-dedup")
    return data


def _json_line(line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a kill
        return {}


def run_training(mode: str, args) -> dict:
    """One `sdedge train` process; step times from its metrics.jsonl (the loop's clock, after caching)."""
    out = Path(args.out) / "runs" / mode
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    _sdedge("train", "--base", str(args.base), "--data", str(Path(args.out) / "data"), "--out", str(out),
            "--rank", str(args.rank), "--batch-size", "1", "--max-steps", str(args.warmup + args.steps),
            "--cache-latents" if mode == "cached" else "--no-cache-latents", "--cache-text-embeddings",
            "--seed", str(args.seed), "--no-progress", "--no-tensorboard", "--overwrite", threads=args.threads)
    total = time.perf_counter() - t0
    # ru_maxrss of the children is the largest child so far (KiB on Linux): exact for the first run of a mode
    # only when no earlier child was larger, so the summary reports the largest over all runs.
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
    rows = [r for r in map(_json_line, (out / "metrics.jsonl").read_text().splitlines()) if "seconds" in r]
    clock = [0.0] + [r["seconds"] for r in rows]
    step_s = [b - a for a, b in zip(clock, clock[1:])][args.warmup:]
    loop_s = clock[-1]
    return {"mode": mode, "step_seconds": step_s, "median_step_seconds": statistics.median(step_s),
            "total_seconds": total, "loop_seconds": loop_s, "setup_seconds": total - loop_s,
            "peak_rss_bytes": peak, "final_loss": rows[-1]["loss"]}


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
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    make_dataset(out, args.size, args.images)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            res = run_training(mode, args)
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
    atomic_write_json(out / "result.json", summary)
    atomic_write_text(out / "README.md", markdown(summary))
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
