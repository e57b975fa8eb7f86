"""`sdedge provenance IMAGE`: read and verify an image's C2PA manifest and sdedge watermark; and the output
options `generate` and `serve` share (--no-watermark, --c2pa-cert, --c2pa-key, ...).

Exit codes: 0 valid (a C2PA manifest that validates, and/or the sdedge watermark), 1 tampered (the manifest
fails validation, or it and the watermark name different bundles), 2 bad input, 3 absent (neither found),
4 untrusted (valid signature, but not chaining to --trust-anchors). See docs/provenance.md.
"""

from __future__ import annotations

import json

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, soft_wrap=True)


def add_output_options(p) -> None:
    """The provenance options of `generate` and `serve`."""
    p.add_argument("--no-watermark", action="store_true",
                   help="do not put sdedge's invisible watermark (which bundle made the image) on the images")
    p.add_argument("--c2pa-cert", metavar="PEM",
                   help="embed a signed C2PA manifest: the signing certificate chain (leaf first, then intermediates)")
    p.add_argument("--c2pa-key", metavar="PEM", help="the private key of --c2pa-cert's leaf")
    p.add_argument("--c2pa-key-password-env", metavar="VAR", help="environment variable holding --c2pa-key's password")
    p.add_argument("--c2pa-include-prompt", action="store_true",
                   help="write the prompt text into the C2PA manifest (default: only its SHA-256)")


def c2pa_config(args):
    """A C2paConfig from the options, or None when no certificate was given."""
    from sdedge.runtime.errors import SdedgeError
    from sdedge.runtime.provenance import C2paConfig

    if bool(args.c2pa_cert) != bool(args.c2pa_key):
        raise SdedgeError("--c2pa-cert and --c2pa-key go together (the certificate chain and its private key)")
    if not args.c2pa_cert:
        if args.c2pa_include_prompt:
            raise SdedgeError("--c2pa-include-prompt needs --c2pa-cert and --c2pa-key (no manifest is written without)")
        return None
    return C2paConfig(cert=args.c2pa_cert, key=args.c2pa_key, include_prompt=args.c2pa_include_prompt,
                      key_password_env=args.c2pa_key_password_env)


def stamper_for(args, pipe):
    """The C2PA stamper for `generate`, loaded (and its certificate checked) before any image is made."""
    config = c2pa_config(args)
    if config is None:
        return None
    from sdedge.runtime.provenance import Stamper, bundle_identity

    return Stamper.load(config, bundle_identity(pipe))


def cmd_provenance(args) -> int:
    from sdedge.runtime.provenance import inspect

    report = inspect(args.image, trust_anchors=args.trust_anchors, bundles=args.bundle)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
        return report.exit_code
    colour = {"valid": "green", "tampered": "bold red", "absent": "yellow", "untrusted": "yellow"}[report.verdict]
    console.print(f"{escape(report.path)}: [{colour}]{report.verdict}[/{colour}] ({report.format})")
    for line in report.reasons:
        console.print(f"  {escape(line)}")
    b = report.bundle
    claims = b.get("claims") or {}
    if claims:
        made = claims.get("bundle", {})
        s = claims.get("settings", {})
        console.print(f"  made by bundle sha256 {made.get('manifest_sha256')} ({made.get('pipeline')}, "
                      f"{made.get('precision')}, base {made.get('base')})")
        signer = made.get("signer")
        console.print("  bundle signer: " + (", ".join(f"{k} {v}" for k, v in signer.items()) if signer else "unsigned"))
        console.print(f"  settings: {s.get('width')}x{s.get('height')}, {s.get('steps')} steps {s.get('scheduler')}, "
                      f"guidance {s.get('guidance')}, seed {s.get('seed')}")
        prompt = claims.get("prompt", {})
        console.print("  prompt: " + (repr(prompt["text"]) if "text" in prompt else f"sha256 {prompt.get('sha256')}"))
    sig = (report.c2pa or {}).get("signature") or {}
    if sig:
        console.print(f"  C2PA signed by {sig.get('common_name')} ({sig.get('issuer')}, {sig.get('alg')})")
    for match in b.get("matches", []):
        console.print(f"  matches bundle {escape(match)}")
    if args.bundle and not b.get("matches"):
        console.print("  matches none of the --bundle folders given")
    return report.exit_code


def register(subparsers) -> None:
    p = subparsers.add_parser("provenance", help="verify an image's C2PA manifest and sdedge watermark",
                              description="Read and verify an image's C2PA manifest (signature, claims) and sdedge's "
                                          "invisible watermark; say which bundle made it. Exit 0 valid, 1 tampered, "
                                          "3 absent, 4 untrusted signer, 2 bad input. See docs/provenance.md.")
    p.add_argument("image", help="a PNG or JPEG file")
    p.add_argument("--json", action="store_true", help="the report as JSON on stdout (same exit codes)")
    p.add_argument("--trust-anchors", metavar="PEM",
                   help="root CA certificates the C2PA signer must chain to (without: the signature and hashes are "
                        "checked, the signer is reported but not trusted)")
    p.add_argument("--bundle", action="append", default=[], metavar="DIR",
                   help="a bundle folder to name as the maker when its sdedge.json matches; repeat for several")
    p.set_defaults(func=cmd_provenance)
