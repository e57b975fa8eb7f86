"""The peak resident memory of each stage of an export, sampled while it runs (issue 21: sdxl-arch must fit 24 GB).

    python -m benchmarks.export_peaks BASE OUT --json RESULT.json [--size-range 512-512] [--parity-steps 2] ...

runs `export_bundle` as `sdedge export` does, with a thread that reads this process's RSS every 0.2 s: each stage
gets its own peak (not only the process's high-water mark after it, which `sdedge export` prints), its seconds, and
the high-water mark. The JSON carries the machine (CPU flags), the options and the manifest's parity figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from pathlib import Path

from sdedge.runtime.files import atomic_write_json
from sdedge.runtime.memory import peak_rss_bytes
from sdedge.runtime.stages import Stages


def current_rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * 4096


class SampledStages(Stages):
    """Stages whose every label also gets the highest RSS sampled while it ran (nested labels: each of them)."""

    def __init__(self, *args, interval: float = 0.2, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampled: dict[str, int] = {}
        self._open: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            rss = current_rss_bytes()
            for label in list(self._open):
                self.sampled[label] = max(self.sampled.get(label, 0), rss)

    @contextlib.contextmanager
    def __call__(self, label: str):
        self._open.append(label)
        self.sampled[label] = max(self.sampled.get(label, 0), current_rss_bytes())
        try:
            with super().__call__(label):
                yield
        finally:
            self._open.remove(label)
            self.sampled[label] = max(self.sampled[label], current_rss_bytes())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def record(self) -> list[dict]:
        return [{"stage": label, "seconds": round(s, 1), "peak_rss_gb": round(self.sampled.get(label, 0) / 1e9, 2),
                 "process_peak_after_gb": round(self.peak_bytes[label] / 1e9, 2) if label in self.peak_bytes else None}
                for label, s in self.seconds.items()]


def main(argv: list[str] | None = None) -> int:
    from sdedge.export.build import ExportOptions, export_bundle

    from .machine import describe_machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--json", required=True, help="where the record goes")
    ap.add_argument("--size-range", default=None, metavar="MIN-MAX")
    ap.add_argument("--batch-max", type=int, default=2)
    ap.add_argument("--parity-steps", type=int, default=4)
    ap.add_argument("--no-vae-encoder", action="store_true")
    args = ap.parse_args(argv)
    lo, hi = (int(v) for v in args.size_range.split("-")) if args.size_range else (None, None)
    opts = ExportOptions(overwrite=True, size_min=lo, size_max=hi, batch_max=args.batch_max,
                         parity_steps=args.parity_steps, vae_encoder=not args.no_vae_encoder)
    stages = SampledStages()
    t0 = time.perf_counter()
    error = None
    try:
        manifest = export_bundle(args.base, Path(args.out), opts, stages)
    except Exception as exc:  # the record of a failed export is a finding too
        manifest, error = None, f"{type(exc).__name__}: {exc}"
    stages.close()
    record = {
        "what": "sdedge export, peak RSS per stage (sampled every 0.2 s) and the process's high-water mark",
        "command": f"python -m benchmarks.export_peaks {' '.join(argv or sys.argv[1:])}",
        "base": str(args.base), "options": {k: v for k, v in vars(args).items() if k not in ("base", "json")},
        "wall_seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(peak_rss_bytes() / 1e9, 2),
        "error": error, "stages": stages.record(), "machine": describe_machine(),
        "parity": None if manifest is None else {
            "components_max_abs_err": {k: p.max_abs_err for k, p in manifest.parity.components.items()},
            "image_psnr_db": manifest.parity.image.psnr_db if manifest.parity.image else None,
            "image": None if manifest.parity.image is None else {
                "steps": manifest.parity.image.steps, "size": manifest.parity.image.width,
                "guidance": manifest.parity.image.guidance, "scheduler": manifest.parity.image.scheduler}},
    }
    atomic_write_json(args.json, record)
    print(json.dumps({k: record[k] for k in ("wall_seconds", "peak_rss_gb", "error")}))
    return 0 if error is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
