"""Embed the sdedge runtime in an application: progress callback, cancel token, one Pipeline shared by threads.

    python examples/embed.py BUNDLE "a red circle" [--public-key keys/public.pem] [--steps 20] [--cancel-after 2.5]

Ctrl-C (or --cancel-after) sets the cancel token; the generation stops between two denoising steps.
Needs only the base install (NumPy + ONNX Runtime): no torch, no fastapi.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.pipeline import Cancelled, Pipeline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("prompt")
    p.add_argument("--public-key", help="verify the bundle with this key (required=signed); omit: verify if signed")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cancel-after", type=float, help="cancel after this many seconds (demonstrates the token)")
    p.add_argument("--out", default="embed.png")
    args = p.parse_args(argv)

    # Load once (verifies the signature before any model file is parsed), then reuse for every request.
    pipe = Pipeline.load(args.bundle, verify="required" if args.public_key else "if-signed",
                         public_key=args.public_key)

    cancel = threading.Event()  # the cancel token: one per generation, never shared between jobs
    signal.signal(signal.SIGINT, lambda *_: cancel.set())
    if args.cancel_after is not None:
        threading.Timer(args.cancel_after, cancel.set).start()

    def on_step(i: int, total: int) -> None:  # runs in the generating thread, between denoising steps
        bar = "#" * (30 * i // total)
        print(f"\r[{bar:<30}] step {i}/{total}", end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        result = pipe.generate(args.prompt, steps=args.steps, seed=args.seed, on_step=on_step, cancel=cancel)
    except Cancelled as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 130
    except SdedgeError as exc:  # BadInput (a size or step count the bundle refuses), BundleError, ...
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    result.to_pil()[0].save(args.out)
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
    print(f"{args.out} in {time.perf_counter() - t0:.2f} s ({stages}); seed {result.settings['seed']}")

    # Thread safety: several threads may share one Pipeline; its lock runs their generations one at a time.
    outs: dict[int, float] = {}

    def worker(k: int) -> None:
        outs[k] = float(pipe.generate(f"{args.prompt}, variation {k}", steps=2, seed=k).images.mean())

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"3 threads shared one Pipeline: {len(outs)} results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
