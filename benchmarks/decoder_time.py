"""Decoder time on ONNX Runtime: a base's full VAE decoder against a light AutoencoderTiny (TAESD-architecture)
decoder, each exported by sdedge's own decoder specs and run the way the runtime runs it (CPU provider, its threads).

    python -m sdedge.benchmarks.decoder_time --tiny-base DIR --tiny-decoder DIR [--tiny-decoder DIR2] [--sd15] --out FILE.json

Two pairs:
- tiny: the trained tiny base's AutoencoderKL decoder against its distilled AutoencoderTiny (`sdedge
  distill-decoder`), at the base's size (16x16 latents, 64x64 images); with --tiny-decoder given more than once,
  every one of them against the same full decoder in the same alternating rounds (one row each, the folder named);
- sd15 (--sd15): SD1.5's VAE decoder architecture (sdedge base sd15-arch's config, seeded random weights) against
  TAESD's architecture (diffusers' AutoencoderTiny defaults, random weights) at 64x64 latents (512x512 images).
  Speed does not depend on the weights' values.
The figures (median seconds per decode, batch 1; the two decoders timed in alternating rounds) are written with
the machine's CPU flags and load average, one row per pair and thread count (`--threads 2,1`: ONNX Runtime's default
on 2 cores, then one thread).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from sdedge.runtime.files import atomic_write_json

from .machine import describe_machine


def ort_session(spec, vae, latent: int, threads: int, folder: Path):
    """(ONNX Runtime session, feed) of one decode (1, C, latent, latent) of `vae` exported through `spec`."""
    import onnxruntime as ort

    channels = int(vae.config.latent_channels)
    path = folder / f"{spec.name}-{type(vae).__name__}.onnx"
    module = spec.module(SimpleNamespace(vae=vae)).eval()
    x = torch.randn(1, channels, latent, latent, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.onnx.export(module, (x,), str(path), input_names=["latent_sample"], output_names=["sample"],
                          opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = threads, 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session, {"latent_sample": x.numpy()}


def interleaved_seconds(runs: list, calls: int, rounds: int = 10) -> list[float]:
    """Median seconds a call of each (session, feed) in `runs`, timed in alternating rounds of calls/rounds calls
    each, so that a change in the machine's load falls on every decoder alike."""
    times, rounds = [[] for _ in runs], min(rounds, calls)
    for session, feed in runs:
        session.run(None, feed)  # warm-up
    for _ in range(rounds):
        for (session, feed), out in zip(runs, times):
            for _ in range(max(1, calls // rounds)):
                t0 = time.perf_counter()
                session.run(None, feed)
                out.append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def time_pair(label: str, full, tiny, latent: int, threads: int, calls: int, rounds: int = 10) -> dict:
    return time_pairs(label, full, {None: tiny}, latent, threads, calls, rounds)[0]


def time_pairs(label: str, full, tinies: dict, latent: int, threads: int, calls: int, rounds: int = 10) -> list[dict]:
    """One row per light decoder of `tinies` ({name or None: AutoencoderTiny}) against `full`, all of them timed
    in the same alternating rounds (so each ratio's full-decoder time is the one measured beside it)."""
    from sdedge.export.specs import SPECS, TINY_VAE_DECODER

    with tempfile.TemporaryDirectory(prefix="sdedge-decoder-time-") as tmp:
        runs = [ort_session(SPECS["vae_decoder"], full, latent, threads, Path(tmp))]
        for i, tiny in enumerate(tinies.values()):
            sub = Path(tmp) / str(i)
            sub.mkdir()
            runs.append(ort_session(TINY_VAE_DECODER, tiny, latent, threads, sub))
        full_s, *tiny_s = interleaved_seconds(runs, calls, rounds)
    count = lambda m: sum(p.numel() for p in m.decoder.parameters())  # noqa: E731
    image = latent * int(2 ** (len(full.config.block_out_channels) - 1))
    return [{"pair": label, **({"tiny_decoder": name} if name else {}), "latent": [latent, latent], "image": image,
             "full_seconds": round(full_s, 5), "tiny_seconds": round(t, 5), "speedup": round(full_s / t, 2),
             "full_decoder_parameters": count(full), "tiny_decoder_parameters": count(tiny),
             **({"tiny_decoder_blocks": list(tiny.config.num_decoder_blocks)} if name else {}),
             "calls": calls, "rounds": min(rounds, calls), "threads": threads}
            for (name, tiny), t in zip(tinies.items(), tiny_s)]


def main(argv=None) -> int:
    from diffusers import AutoencoderKL, AutoencoderTiny

    p = argparse.ArgumentParser(prog="python -m sdedge.benchmarks.decoder_time")
    p.add_argument("--tiny-base")
    p.add_argument("--tiny-decoder", action="append", help="an AutoencoderTiny folder; more than once: each one "
                   "against the same full decoder in one set of rounds")
    p.add_argument("--sd15", action="store_true")
    p.add_argument("--threads", default="2", help="ONNX Runtime intra-op threads, a comma list for one row each")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds the calls are split into")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    threads = [int(t) for t in str(args.threads).split(",")]
    rows = []
    if args.tiny_base and args.tiny_decoder:
        full = AutoencoderKL.from_pretrained(args.tiny_base, subfolder="vae", local_files_only=True).eval()
        tinies = {Path(d).name: AutoencoderTiny.from_pretrained(d, local_files_only=True).eval()
                  for d in args.tiny_decoder}
        if len(tinies) != len(args.tiny_decoder):
            p.error(f"--tiny-decoder: folders need distinct names, got {', '.join(args.tiny_decoder)}")
        rows += [r for n in threads for r in time_pairs("tiny base: AutoencoderKL vs distilled AutoencoderTiny",
                                                         full, tinies, 16, n, args.calls, args.rounds)]
    if args.sd15:
        from sdedge.export.bases import builtin_configs

        torch.manual_seed(0)
        full = AutoencoderKL(**builtin_configs("sd15-arch")["vae"]).eval()
        tiny = AutoencoderTiny().eval()  # TAESD's architecture (madebyollin/taesd's config)
        rows += [time_pair("sd15-arch 512x512: SD VAE decoder vs TAESD architecture", full, tiny, 64, n,
                           max(3, args.calls // 3), args.rounds) for n in threads]
    doc = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": describe_machine(), "rows": rows}
    atomic_write_json(args.out, doc)
    for r in rows:
        name = f" {r['tiny_decoder']}" if "tiny_decoder" in r else ""
        print(f"{r['pair']}{name}, {r['threads']} threads: full {r['full_seconds']:.4f} s, tiny {r['tiny_seconds']:.4f} s, "
              f"{r['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
