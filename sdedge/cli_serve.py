"""`sdedge serve BUNDLE`: keep a verified bundle loaded behind an HTTP API (runtime/server.py).

`register(subparsers)` adds the command to sdedge's parser; `python -m sdedge.cli_serve serve BUNDLE ...` runs it
alone. The bundle must be signed and verify with --public-key (or --identity/--issuer) unless --allow-unsigned.
fastapi and uvicorn (the `serve` extra) are imported when the command runs.
"""

from __future__ import annotations

import argparse
import os

from rich.console import Console

from sdedge.cli_options import add_engine_options, add_trust_options
from sdedge.runtime.errors import SdedgeError

console = Console(stderr=True, soft_wrap=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return value


def _queue_size(text: str) -> int:
    value = _positive_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1 (with 0 every request would be refused "
                                         "with 429 while one runs)")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


def settings_from_args(args):
    from sdedge.cli_provenance import c2pa_config
    from sdedge.runtime.server import ServeSettings

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env) or None
        if token is not None and len(token) < 16:
            raise SdedgeError(f"--token-env {args.token_env}: the token is shorter than 16 characters")
    if not args.allow_unsigned and not (args.public_key or args.identity):
        raise SdedgeError("serve needs --public-key (or --identity and --issuer) to verify the bundle's signature; "
                          "--allow-unsigned serves an unsigned bundle (not for production)")
    return ServeSettings(max_queue=args.max_queue, timeout=args.timeout, max_steps=args.max_steps,
                         max_prompt_chars=args.max_prompt_chars, max_images=args.max_images, token=token,
                         allow_unsigned=args.allow_unsigned, public_key=args.public_key, identity=args.identity,
                         issuer=args.issuer, device=args.device, backend=args.backend, memory=args.memory,
                         threads=args.threads, log_prompts=args.log_prompts, header_timeout=args.header_timeout,
                         body_timeout=args.body_timeout, keep_alive=args.keep_alive,
                         max_connections=args.max_connections, limit_concurrency=args.limit_concurrency,
                         insecure_no_auth=args.insecure_no_auth, max_upload_bytes=args.max_upload_bytes,
                         max_upload_pixels=args.max_upload_pixels, watermark=not args.no_watermark,
                         c2pa=c2pa_config(args))


def cmd_serve(args) -> int:
    from sdedge.runtime.server import check_bind, create_app, is_loopback, serve

    settings = settings_from_args(args)
    settings.check()
    check_bind(args.host, settings)  # before the model loads: a refused address fails at once
    if args.ray:
        return cmd_serve_ray(args, settings)
    app = create_app(args.bundle, settings)  # loads and verifies: a refused bundle fails here, before listening
    pipe = app.state.pipeline
    signed = "signature verified" if pipe.signer is not None else "UNSIGNED (--allow-unsigned)"
    auth = f"bearer token from ${args.token_env}" if settings.token else "no auth"
    console.print(f"serving {args.bundle} ({signed}, {pipe.backend}) on http://{args.host}:{args.port} "
                  f"— queue {settings.max_queue}, timeout {settings.timeout:g} s, {auth}")
    if settings.token is None and not is_loopback(args.host):
        console.print(f"[yellow]warning:[/yellow] listening on {args.host} without a token (--insecure-no-auth); "
                      "anyone who can reach it can generate")
    serve(app, args.host, args.port, log_level=args.log_level_server)
    return 0


def cmd_serve_ray(args, settings) -> int:
    """`sdedge serve --ray`: the same API on Ray Serve replicas (runtime/ray_serve.py)."""
    from sdedge.runtime.ray_serve import RayOptions, ray_installed, serve_on_ray

    ray_installed()  # without ray: how to install it, exit 2 (not imported yet: start_ray sets its environment)
    options = RayOptions(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                         target_ongoing_requests=args.target_ongoing, num_cpus=args.replica_cpus,
                         num_gpus=args.replica_gpus)
    options.check()
    where = args.ray_address or "a local Ray cluster on 127.0.0.1"
    scaling = (f"{options.replicas} replicas" if options.max_replicas is None
               else f"{options.min_replicas or 1}-{options.max_replicas} replicas (autoscaling)")

    def ready() -> None:
        console.print(f"serving {args.bundle} on Ray Serve ({where}, {scaling}) at http://{args.host}:{args.port} "
                      f"— queue {settings.max_queue}, timeout {settings.timeout:g} s, "
                      f"{'bearer token' if settings.token else 'no auth'}")

    serve_on_ray(args.bundle, settings, options, host=args.host, port=args.port, address=args.ray_address,
                 num_cpus=args.ray_cpus, ready=ready)
    return 0


def _add_ray_arguments(s) -> None:
    g = s.add_argument_group("Ray Serve (--ray; needs pip install 'sdedge[ray]'; see docs/serving.md)")
    g.add_argument("--ray", action="store_true", help="serve on Ray Serve replicas instead of this process")
    g.add_argument("--ray-address", help="a running Ray cluster (default: start a local one on 127.0.0.1)")
    g.add_argument("--ray-cpus", type=float, help="CPUs of the local cluster (default: all)")
    g.add_argument("--replicas", type=int, default=1, help="model replicas (each holds the bundle once)")
    g.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas (default 1)")
    g.add_argument("--max-replicas", type=int, help="autoscaling: most replicas (turns autoscaling on)")
    g.add_argument("--target-ongoing", type=float, default=1.0,
                   help="autoscaling: ongoing requests per replica to aim for (default 1)")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    g.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (default 0)")


def register(subparsers) -> None:
    from sdedge.cli_provenance import add_output_options

    s = subparsers.add_parser("serve", help="serve a bundle over HTTP (keeps the model loaded)",
                              description="Serve a bundle over HTTP: a page at /, POST /v1/generate, /v1/img2img, "
                                          "/v1/inpaint, /healthz, /readyz, /metrics, /openapi.json. See "
                                          "docs/serving.md.")
    s.add_argument("bundle")
    s.add_argument("--host", default=os.environ.get("SDEDGE_HOST", "127.0.0.1"),
                   help="address to listen on (default $SDEDGE_HOST or 127.0.0.1; the image sets 0.0.0.0)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--max-queue", type=_queue_size, default=8, help="requests that may wait behind the running one")
    s.add_argument("--timeout", type=_positive_float, default=60.0,
                   help="seconds a request may take, queue included; then 503 and its job is cancelled")
    s.add_argument("--max-steps", type=int, default=150, help="largest steps a request may ask for")
    s.add_argument("--max-prompt-chars", type=int, default=2000)
    s.add_argument("--max-images", type=int, help="largest n (default: what the bundle's batch range allows)")
    add_trust_options(s, policy=False, key_env="SDEDGE_PUBLIC_KEY")
    s.add_argument("--allow-unsigned", action="store_true",
                   help="serve a bundle without a verified signature (only its files' SHA-256 are checked)")
    s.add_argument("--token-env", default="SDEDGE_TOKEN", metavar="VAR",
                   help="require 'Authorization: Bearer <token>' when this environment variable is set "
                        "(default SDEDGE_TOKEN)")
    add_engine_options(s)
    s.add_argument("--log-prompts", action="store_true", help="log prompts (off by default: they may be private)")
    add_output_options(s)  # --no-watermark, --c2pa-cert/--c2pa-key (docs/provenance.md)
    s.add_argument("--insecure-no-auth", action="store_true",
                   help="listen on a non-loopback --host without a token (refused otherwise)")
    s.add_argument("--limit-concurrency", type=_queue_size,
                   help="requests in flight before the server answers 503; idle connections do not count "
                        "(default: max-queue + 64)")
    s.add_argument("--max-connections", type=_queue_size, default=1000,
                   help="open connections; past it the one idle longest is closed (default 1000)")
    s.add_argument("--header-timeout", type=_positive_float, default=10.0,
                   help="seconds a client has to send a request's headers (then 408 and closed; default 10)")
    s.add_argument("--body-timeout", type=_positive_float, default=60.0,
                   help="seconds a client has to send a request's body after its headers (then 408; default 60)")
    s.add_argument("--keep-alive", type=_positive_float, default=5.0,
                   help="seconds an idle keep-alive connection stays open (default 5)")
    s.add_argument("--max-upload-bytes", type=_queue_size, default=4_000_000,
                   help="largest image file /v1/img2img and /v1/inpaint take, per image (default 4000000)")
    s.add_argument("--max-upload-pixels", type=_queue_size, default=16_777_216,
                   help="largest width × height of an upload, read from its header before decoding (default 4096²)")
    s.add_argument("--server-log-level", dest="log_level_server", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    _add_ray_arguments(s)
    s.set_defaults(func=cmd_serve, own_signals=True)  # uvicorn's graceful shutdown handles SIGTERM
