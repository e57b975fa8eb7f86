"""`sdedge serve BUNDLE`: keep a verified bundle loaded behind an HTTP API (runtime/server.py).

`register(subparsers)` adds the command to sdedge's parser; `python -m sdedge.cli_serve serve BUNDLE ...` runs it
alone. The bundle must be signed and verify with --public-key (or --identity/--issuer) unless --allow-unsigned.
fastapi and uvicorn (the `serve` extra) are imported when the command runs.
"""

from __future__ import annotations

import argparse
import os

from rich.console import Console

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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


def settings_from_args(args):
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
                         threads=args.threads, log_prompts=args.log_prompts)


def cmd_serve(args) -> int:
    from sdedge.runtime.server import create_app, serve

    settings = settings_from_args(args)
    app = create_app(args.bundle, settings)  # loads and verifies: a refused bundle fails here, before listening
    pipe = app.state.pipeline
    signed = "signature verified" if pipe.signer is not None else "UNSIGNED (--allow-unsigned)"
    auth = f"bearer token from ${args.token_env}" if settings.token else "no auth"
    console.print(f"serving {args.bundle} ({signed}, {pipe.backend}) on http://{args.host}:{args.port} "
                  f"— queue {settings.max_queue}, timeout {settings.timeout:g} s, {auth}")
    if settings.token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/yellow] listening on {args.host} without a token; "
                      f"set ${args.token_env or 'SDEDGE_TOKEN'} to require one")
    serve(app, args.host, args.port, log_level=args.log_level_server,
          limit_concurrency=settings.max_queue + 64 if args.limit_concurrency is None else args.limit_concurrency)
    return 0


def register(subparsers) -> None:
    s = subparsers.add_parser("serve", help="serve a bundle over HTTP (keeps the model loaded)",
                              description="Serve a bundle over HTTP: POST /v1/generate, /healthz, /readyz, /metrics, "
                                          "/openapi.json. See docs/serving.md.")
    s.add_argument("bundle")
    s.add_argument("--host", default=os.environ.get("SDEDGE_HOST", "127.0.0.1"),
                   help="address to listen on (default $SDEDGE_HOST or 127.0.0.1; the image sets 0.0.0.0)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--max-queue", type=_positive_int, default=8, help="requests that may wait behind the running one")
    s.add_argument("--timeout", type=_positive_float, default=60.0,
                   help="seconds a request may take, queue included; then 503 and its job is cancelled")
    s.add_argument("--max-steps", type=int, default=150, help="largest steps a request may ask for")
    s.add_argument("--max-prompt-chars", type=int, default=2000)
    s.add_argument("--max-images", type=int, help="largest n (default: what the bundle's batch range allows)")
    s.add_argument("--public-key", default=os.environ.get("SDEDGE_PUBLIC_KEY") or None,
                   help="public key (PEM) the bundle must be signed with (default $SDEDGE_PUBLIC_KEY)")
    s.add_argument("--identity", help="Sigstore identity the bundle must be signed by")
    s.add_argument("--issuer", help="OIDC issuer of that identity")
    s.add_argument("--allow-unsigned", action="store_true",
                   help="serve a bundle without a verified signature (only its files' SHA-256 are checked)")
    s.add_argument("--token-env", default="SDEDGE_TOKEN", metavar="VAR",
                   help="require 'Authorization: Bearer <token>' when this environment variable is set "
                        "(default SDEDGE_TOKEN)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino"])
    s.add_argument("--memory", default="normal", choices=["normal", "low"])
    s.add_argument("--threads", type=int)
    s.add_argument("--log-prompts", action="store_true", help="log prompts (off by default: they may be private)")
    s.add_argument("--limit-concurrency", type=int,
                   help="open connections before uvicorn answers 503 (default: max-queue + 64)")
    s.add_argument("--server-log-level", dest="log_level_server", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve, own_signals=True)  # uvicorn's graceful shutdown handles SIGTERM
