"""Throughput and p95 latency of `sdedge serve --ray` with 1 and 2 model replicas, in one run, on one bundle.

    flock /tmp/sdedge-heavy.lock python -m sdedge.benchmarks.ray_serve BUNDLE --out benchmarks/results/ray-serve

A local Ray cluster on 127.0.0.1 (all the machine's cores), Ray Serve's HTTP proxy, the signed-or-unsigned
bundle; for each replica count: deploy, warm every replica, then `--clients` closed-loop clients send
`--requests` requests in all (each waits for its answer before sending the next). Every request is counted:
200s give the latency figures, anything else is reported. Writes ray-serve.json and README.md (atomically).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def load(url: str, body: dict, clients: int, requests: int) -> dict:
    """`requests` POSTs from `clients` closed-loop clients; latencies of the 200s, codes of the rest."""
    import httpx

    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]

    def client(n: int) -> list[tuple[int, float, str]]:
        out = []
        with httpx.Client(timeout=300) as c:
            for _ in range(n):
                t0 = time.perf_counter()
                r = c.post(url, json=body)
                out.append((r.status_code, time.perf_counter() - t0, r.headers.get("X-Sdedge-Replica", "")))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(client, per_client) for x in part]
    wall = time.perf_counter() - t0
    ok = [lat for code, lat, _ in results if code == 200]
    by_replica: dict[str, int] = {}
    for code, _, replica in results:
        if code == 200:
            by_replica[replica] = by_replica.get(replica, 0) + 1
    return {"requests": len(results), "ok": len(ok), "other_codes": sorted(c for c, _, _ in results if c != 200),
            "wall_s": round(wall, 3), "throughput_rps": round(len(ok) / wall, 3),
            "latency_p50_s": round(statistics.median(ok), 3), "latency_p95_s": round(percentile(ok, 0.95), 3),
            "latency_mean_s": round(statistics.fmean(ok), 3), "per_replica": sorted(by_replica.values())}


def run(bundle: Path, replica_counts: list[int], clients: int, requests: int, body: dict, port: int) -> dict:
    from sdedge.runtime.ray_serve import RayOptions, deploy, ray_app, start_ray, start_serve
    from sdedge.runtime.server import ServeSettings

    settings = ServeSettings(allow_unsigned=True, max_queue=clients * 2, timeout=300, threads=1)
    start_ray(num_cpus=max(replica_counts))  # before Ray is imported: it sets Ray's environment
    from ray import serve

    runs = []
    try:
        start_serve("127.0.0.1", port)
        url = f"http://127.0.0.1:{port}/v1/generate"
        for n in replica_counts:
            deploy(ray_app(bundle, settings, RayOptions(replicas=n, num_cpus=1, name="bench")), "bench")
            load(url, body, n, n * 3)  # warm each replica (first-call graph optimisation)
            result = load(url, body, clients, requests)
            runs.append({"replicas": n, **result})
            print(json.dumps(runs[-1]), file=sys.stderr)
            serve.delete("bench")
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()
    return {"runs": runs}


def write(out: Path, report: dict) -> None:
    from sdedge.runtime.files import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ray-serve.json", report)
    m = report["machine"]
    lines = [
        "# `sdedge serve --ray`: 1 vs 2 model replicas",
        "",
        f"Bundle: {report['bundle']} · request {json.dumps(report['body'])} · {report['clients']} closed-loop "
        f"clients, {report['requests']} requests per replica count · Ray {report['ray']} · one local cluster on "
        "127.0.0.1, each replica 1 CPU and 1 ONNX Runtime thread.",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, CPU flags {', '.join(m['cpu_flags']) or 'none'}; "
        f"load average at start {m['load_average']} (the machine is shared: other jobs skew every figure).",
        "",
        "| replicas | ok / sent | throughput (req/s) | p50 (s) | p95 (s) | requests per replica |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["runs"]:
        lines.append(f"| {r['replicas']} | {r['ok']} / {r['requests']} | {r['throughput_rps']} | "
                     f"{r['latency_p50_s']} | {r['latency_p95_s']} | {r['per_replica']} |")
    lines += ["", f"Throughput ratio 2 : 1 replicas = **{report['throughput_ratio']}×**, p95 ratio "
              f"{report['p95_ratio']}× (same run). Reproduce: `{report['command']}`.", ""]
    atomic_write_text(out / "README.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ray-serve"))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--port", type=int, default=18765)
    args = p.parse_args(argv)
    from importlib.metadata import version

    from sdedge.benchmarks.machine import describe_machine, load_average

    body = {"prompt": "a red circle", "steps": args.steps, "width": args.size, "height": args.size, "seed": 1}
    machine = describe_machine()
    report = {"bundle": args.bundle.name, "body": body, "clients": args.clients, "requests": args.requests,
              "ray": version("ray"), "machine": machine,
              "command": "flock /tmp/sdedge-heavy.lock python -m sdedge.benchmarks.ray_serve BUNDLE "
                         f"--clients {args.clients} --requests {args.requests} --steps {args.steps} --size {args.size}",
              **run(args.bundle, [1, 2], args.clients, args.requests, body, args.port)}
    one, two = report["runs"][0], report["runs"][-1]
    report["throughput_ratio"] = round(two["throughput_rps"] / one["throughput_rps"], 3)
    report["p95_ratio"] = round(two["latency_p95_s"] / one["latency_p95_s"], 3)
    report["machine"]["load_average_end"] = load_average()
    write(args.out, report)
    print(f"throughput 2:1 = {report['throughput_ratio']}x, p95 2:1 = {report['p95_ratio']}x -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
