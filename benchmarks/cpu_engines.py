"""CPU engines benchmark: each UNet engine (ONNX Runtime / OpenVINO, fp32 / bf16 / int8-weights / int8 /
pruned) against PyTorch eager fp32, one guided step at a time, and end to end through `sdedge bench`.

    # one guided UNet step (batch 2), each engine in its own process, PyTorch eager before and after:
    flock /tmp/sdedge-heavy.lock python -m sdedge.benchmarks.cpu_engines unet --base /work/sd15 \
        --engine ort-fp32=/work/bundle-sd15:onnxruntime --engine ov-int8=/work/bundle-sd15-int8:openvino \
        --size 256 --calls 3 --out benchmarks/results/cpu-engines/unet-step.json

    # a reduced-precision bundle from the fp32 one, without the PyTorch model (bounded time and memory, peak RSS printed):
    flock /tmp/sdedge-heavy.lock python -m sdedge.benchmarks.cpu_engines derive --src /work/bundle-sd15 \
        --precision int8 --out /work/bundle-sd15-int8

Figures per engine: median seconds per guided UNet call, speed-up against the mean of the two PyTorch runs
(one first, one last: drift of a shared machine shows as their difference, reported), the cosine of the raw
output and after guidance 7.5 against PyTorch fp32 on the same inputs, load/compile seconds and the process's
peak RSS. Inputs: seeded latents, timestep 500, text embeddings from the fp32 bundle's text encoder for a
negative ("") and a positive prompt, so the guided difference is a real one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sdedge.runtime.files import atomic_write_json

REPLY = "@@cpu-engines "


def _inputs(bundle_dir: str, size: int, prompt: str, seed: int = 0) -> dict[str, np.ndarray]:
    from sdedge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle_dir, backend="onnxruntime", memory="low", verify="off")
    ids = pipe.tokenizer(["", prompt])
    emb = pipe._load("text_encoder").infer({"input_ids": ids})[0]
    pipe.close()
    lat = size // pipe.manifest.latent.vae_scale_factor
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, pipe.manifest.latent.channels, lat, lat), dtype=np.float32)
    return {"sample": np.concatenate([x, x]), "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": emb.astype(np.float32)}


def _worker(args) -> None:
    """Child process: load one engine, warm it, time `calls` calls; write the output; reply one JSON line."""
    from sdedge.runtime.memory import peak_rss_bytes

    with np.load(args.inputs) as d:
        feeds = {k: d[k] for k in d.files}
    threads = args.threads
    t0 = time.perf_counter()
    if args.kind == "torch":
        import torch
        from diffusers import UNet2DConditionModel

        torch.set_num_threads(threads)
        unet = UNet2DConditionModel.from_pretrained(str(Path(args.target) / "unet")).eval()
        if args.dtype == "bf16":
            unet = unet.to(torch.bfloat16)
        dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        tf = {k: torch.from_numpy(v) for k, v in feeds.items()}

        def call():
            with torch.inference_mode():
                return unet(tf["sample"].to(dt), tf["timestep"], tf["encoder_hidden_states"].to(dt)).sample.float().numpy()
    else:
        from sdedge.runtime.backends.select import choose_backend, engine_factory
        from sdedge.runtime.bundle import Bundle

        os.environ["SDEDGE_THREADS"] = str(threads)
        bundle = Bundle.open(args.target)
        choice = choose_backend(bundle.manifest, args.kind, "cpu")
        engine = engine_factory(choice, bundle.manifest, threads=threads, cache_dir=args.cache_dir or True)(
            bundle, "unet", bundle.manifest.components["unet"])
        engine.load()

        def call():
            return engine.infer(feeds)[0]
    out = call()  # warm-up (and OpenVINO's compile for these shapes)
    load_s = time.perf_counter() - t0
    times = []
    for _ in range(args.calls):
        s = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - s)
    np.save(args.output, out.astype(np.float32))
    print(REPLY + json.dumps({"times": times, "load_and_first_call_s": load_s, "peak_rss_bytes": peak_rss_bytes()}),
          flush=True)


def _run_child(kind: str, target: str, dtype: str, inputs: Path, output: Path, calls: int, threads: int,
               cache_dir: str | None, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "sdedge.benchmarks.cpu_engines", "_worker", "--kind", kind, "--target", target,
           "--dtype", dtype, "--inputs", str(inputs), "--output", str(output), "--calls", str(calls),
           "--threads", str(threads)]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in r.stdout.splitlines():
        if line.startswith(REPLY):
            return json.loads(line[len(REPLY):])
    raise RuntimeError(f"{kind} {target}: worker failed ({r.returncode}):\n{r.stderr[-3000:]}")


def cmd_unet(args) -> int:
    from sdedge.export.gates import cosine, guided, machine_name

    engines = []
    for spec in args.engine:
        name, _, rest = spec.partition("=")
        path, _, backend = rest.rpartition(":")
        engines.append((name, path, backend))
    fp32_bundle = args.inputs_from or engines[0][1]
    work = Path(tempfile.mkdtemp(prefix="cpu-engines-"))
    inputs = work / "inputs.npz"
    np.savez(inputs, **_inputs(fp32_bundle, args.size, args.prompt))
    order = [("torch-eager-fp32", args.base, "torch", "fp32")]
    if args.torch_bf16:
        order.append(("torch-eager-bf16", args.base, "torch", "bf16"))
    order += [(n, p, b, "") for n, p, b in engines]
    order.append(("torch-eager-fp32 (again)", args.base, "torch", "fp32"))
    results = {}
    for name, target, kind, dtype in order:
        out = work / f"{len(results)}.npy"
        print(f"… {name}", file=sys.stderr, flush=True)
        try:
            r = _run_child(kind, target, dtype, inputs, out, args.calls, args.threads, args.cache_dir, args.timeout)
        except Exception as exc:  # one engine failing is a figure too
            results[name] = {"error": str(exc)[-800:]}
            print(f"  failed: {str(exc)[-300:]}", file=sys.stderr)
            continue
        r["median_s"] = statistics.median(r["times"])
        r["output"] = str(out)
        r["target"], r["backend"] = target, kind
        results[name] = r
        print(f"  {r['median_s']:.3f} s per guided call, peak RSS {r['peak_rss_bytes'] / 1e9:.1f} GB", file=sys.stderr)
    ref_runs = [results[k] for k in ("torch-eager-fp32", "torch-eager-fp32 (again)") if "median_s" in results.get(k, {})]
    ref_s = statistics.mean(r["median_s"] for r in ref_runs)
    ref_out = np.load(results["torch-eager-fp32"]["output"])
    for r in results.values():
        if "median_s" not in r:
            continue
        out = np.load(r.pop("output"))
        r["speedup_vs_torch_fp32"] = round(ref_s / r["median_s"], 3)
        r["cosine_raw"] = round(cosine(out, ref_out), 6)
        r["cosine_guided_7.5"] = round(cosine(guided(out, 7.5), guided(ref_out, 7.5)), 6)
    report = {
        "what": f"one guided SD UNet call (batch 2, {args.size}x{args.size}), {args.threads} threads, each engine "
                "in its own process, PyTorch eager fp32 first and last",
        "machine": machine_name(),
        "torch_fp32_seconds": [round(r["median_s"], 4) for r in ref_runs],
        "calls_per_engine": args.calls,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "engines": results,
    }
    atomic_write_json(args.out, report)
    print(f"{'engine':<28}{'s/call':>8}{'speed-up':>10}{'cos raw':>10}{'cos g7.5':>10}{'RSS GB':>8}")
    for name, r in results.items():
        if "median_s" in r:
            print(f"{name:<28}{r['median_s']:8.3f}{r['speedup_vs_torch_fp32']:9.2f}x{r['cosine_raw']:10.5f}"
                  f"{r['cosine_guided_7.5']:10.4f}{r['peak_rss_bytes'] / 1e9:8.1f}")
        else:
            print(f"{name:<28} failed")
    return 0


def cmd_derive(args) -> int:
    from sdedge.export.build import ExportOptions, export_bundle
    from sdedge.runtime.manifest import Precision
    from sdedge.runtime.memory import peak_rss_bytes
    from sdedge.runtime.stages import Stages

    opts = ExportOptions(precision=Precision(args.precision), overwrite=True, calibration=args.calibration,
                         calibration_steps=args.calibration_steps, int8_samples=args.int8_samples,
                         int8_method=args.int8_method, parity_steps=args.parity_steps, speed_calls=args.speed_calls,
                         min_cosine=args.min_cosine,
                         speed_backends=tuple(args.speed_backends.split(",")) if args.speed_backends else None)
    t0 = time.perf_counter()
    m = export_bundle(args.src, args.out, opts, Stages())
    from sdedge.runtime.strict import to_dict

    summary = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_bytes": peak_rss_bytes(),
               "precision": to_dict(m.parity.precision), "speed": to_dict(m.speed), "sizes": to_dict(m.sizes),
               "backend": to_dict(m.backend), "quantisation": m.provenance.quantisation}
    print(json.dumps(summary, indent=2))
    if args.report:
        atomic_write_json(args.report, summary)
    return 0


def cmd_prune(args) -> int:
    """Prune the UNet of a diffusers base (PyTorch): parameters, MACs, and one guided eager call before/after."""
    import torch

    from sdedge.export.bases import load_base
    from sdedge.export.prune import prune_unet
    from sdedge.runtime.memory import peak_rss_bytes
    from sdedge.runtime.strict import to_dict

    torch.set_num_threads(args.threads)
    pipe = load_base(args.base)
    lat = args.size // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, lat, lat, generator=g)
    t = torch.full((2,), 500.0)
    ehs = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)

    def timed():
        with torch.inference_mode():
            pipe.unet(x, t, ehs)  # warm
            s = time.perf_counter()
            out = pipe.unet(x, t, ehs).sample
            return time.perf_counter() - s, out

    before_s, ref = timed()
    t0 = time.perf_counter()
    report = prune_unet(pipe, args.ratio, args.criterion, latent_size=lat)
    prune_s = time.perf_counter() - t0
    after_s, out = timed()
    from sdedge.export.gates import cosine, machine_name

    result = {"machine": machine_name(), "size": args.size, "prune": to_dict(report), "prune_seconds": round(prune_s, 1),
              "eager_guided_call_seconds_before": round(before_s, 3), "eager_guided_call_seconds_after": round(after_s, 3),
              "cosine_vs_unpruned_no_finetune": round(cosine(out.numpy(), ref.numpy()), 4),
              "peak_rss_bytes": peak_rss_bytes()}
    print(json.dumps(result, indent=2))
    if args.out:
        atomic_write_json(args.out, result)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdedge.benchmarks.cpu_engines")
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("unet")
    u.add_argument("--base", required=True, help="diffusers folder (PyTorch reference)")
    u.add_argument("--engine", action="append", required=True, help="NAME=BUNDLE:onnxruntime|openvino")
    u.add_argument("--inputs-from", help="fp32 bundle whose text encoder makes the embeddings (default: the first)")
    u.add_argument("--size", type=int, default=256)
    u.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    u.add_argument("--calls", type=int, default=3)
    u.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    u.add_argument("--torch-bf16", action="store_true")
    u.add_argument("--cache-dir", help="OpenVINO compiled-model cache (default: ~/.cache/sdedge/openvino)")
    u.add_argument("--timeout", type=float, default=600)
    u.add_argument("--out", required=True)
    u.set_defaults(func=cmd_unet)
    d = sub.add_parser("derive")
    d.add_argument("--src", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--precision", required=True)
    d.add_argument("--calibration")
    d.add_argument("--calibration-steps", type=int, default=10)
    d.add_argument("--int8-samples", type=int, default=16)
    d.add_argument("--int8-method", default="nncf")
    d.add_argument("--parity-steps", type=int, default=10)
    d.add_argument("--speed-calls", type=int, default=2)
    d.add_argument("--min-cosine", type=float)
    d.add_argument("--speed-backends", help="comma-separated backends the speed gate times (default: all)")
    d.add_argument("--report")
    d.set_defaults(func=cmd_derive)
    pr = sub.add_parser("prune")
    pr.add_argument("--base", required=True)
    pr.add_argument("--ratio", type=float, default=0.3)
    pr.add_argument("--criterion", default="magnitude")
    pr.add_argument("--size", type=int, default=256)
    pr.add_argument("--threads", type=int, default=2)
    pr.add_argument("--out")
    pr.set_defaults(func=cmd_prune)
    w = sub.add_parser("_worker")
    w.add_argument("--kind", required=True)
    w.add_argument("--target", required=True)
    w.add_argument("--dtype", default="")
    w.add_argument("--inputs", required=True)
    w.add_argument("--output", required=True)
    w.add_argument("--calls", type=int, default=3)
    w.add_argument("--threads", type=int, default=2)
    w.add_argument("--cache-dir")
    w.set_defaults(func=_worker)
    args = p.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
