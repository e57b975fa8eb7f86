"""`sdedge keygen`, `sdedge sign`, `sdedge verify`: signed bundles with the OpenSSF model-signing library.

`register(subparsers)` adds the three commands to sdedge's parser (sdedge/cli.py).
Everything heavy is imported when a command runs: `sdedge verify` works on a runtime-only install plus the
`sign` extra (no torch).
"""

from __future__ import annotations

import json
import os

from rich.console import Console

from sdedge.runtime.errors import SdedgeError

console = Console(stderr=True, soft_wrap=True)


def _password_from_env(name: str | None) -> str | None:
    if not name:
        return None
    value = os.environ.get(name)
    if value is None:
        raise SdedgeError(f"--key-password-env {name}: the environment variable {name} is not set")
    return value


def cmd_keygen(args) -> int:
    from sdedge.export.signing import keygen

    pair = keygen(args.out, password=_password_from_env(args.password_env))
    console.print(f"private key {pair.private} (mode 0600{', encrypted' if args.password_env else ''}: keep it secret)")
    console.print(f"public key  {pair.public}")
    console.print(f"fingerprint sha256:{pair.fingerprint}")
    return 0


def cmd_sign(args) -> int:
    from sdedge.export.signing import sign

    result = sign(args.bundle, key=args.key, password=_password_from_env(args.key_password_env),
                  certificate=args.certificate, certificate_chain=args.certificate_chain or (),
                  sigstore=args.sigstore, identity_token=args.identity_token, oidc_issuer=args.oidc_issuer,
                  use_staging=args.staging, trust_config=args.trust_config, force_oob=args.oob,
                  timeout=args.timeout)
    s = result.signer
    who = {"key": lambda: f"key sha256:{s.get('fingerprint')}",
           "certificate": lambda: f"certificate {s.get('subject')}",
           "sigstore": lambda: f"Sigstore identity {s.get('identity')} (issuer {s.get('issuer')})"}[result.method]()
    console.print(f"signed {result.files} files of {args.bundle} with {who}: {result.signature}")
    return 0


def cmd_verify(args) -> int:
    from sdedge.runtime.signing import verify_bundle

    info = verify_bundle(args.bundle, public_key=args.public_key, certificate_chain=args.certificate_chain,
                         identity=args.identity, issuer=args.issuer, trust_config=args.trust_config,
                         use_staging=args.staging)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        print(f"{args.bundle}: signature OK, {len(info.digests)} files verified; signed by {info.describe()}")
    return 0


def register(subparsers) -> None:
    """Add `keygen`, `sign` and `verify` to an argparse subparsers action."""
    k = subparsers.add_parser("keygen", help="write an EC P-256 key pair for signing bundles")
    k.add_argument("--out", required=True, help="folder for private.pem (mode 0600) and public.pem")
    k.add_argument("--password-env", metavar="VAR", help="encrypt private.pem with the password in $VAR")
    k.set_defaults(func=cmd_keygen)

    s = subparsers.add_parser("sign", help="sign a bundle (writes bundle/model.sig, OpenSSF model signing)")
    s.add_argument("bundle")
    s.add_argument("--key", help="EC private key (PEM); with --certificate, the certificate's key")
    s.add_argument("--key-password-env", metavar="VAR", help="the private key's password is in $VAR")
    s.add_argument("--certificate", help="signing certificate (PEM) for --key")
    s.add_argument("--certificate-chain", action="append", metavar="PEM",
                   help="intermediate/root certificates (PEM) to include; repeatable")
    s.add_argument("--sigstore", action="store_true",
                   help="keyless: OIDC identity from CI (ambient), $SIGSTORE_ID_TOKEN, or the browser")
    s.add_argument("--identity-token", help="explicit OIDC token for --sigstore (prefer $SIGSTORE_ID_TOKEN)")
    s.add_argument("--oidc-issuer", help="OIDC issuer for the browser flow (default: Sigstore's)")
    s.add_argument("--staging", action="store_true", help="use Sigstore's staging instance (testing)")
    s.add_argument("--trust-config", help="Sigstore ClientTrustConfig JSON (private Sigstore instance)")
    s.add_argument("--oob", action="store_true", help="browser flow without opening a browser (prints a URL)")
    s.add_argument("--timeout", type=float, help="seconds to wait for Sigstore (default 120)")
    s.set_defaults(func=cmd_sign)

    v = subparsers.add_parser("verify", help="verify a bundle's signature and every file's digest")
    v.add_argument("bundle")
    v.add_argument("--public-key", help="public key (PEM) for a key signature")
    v.add_argument("--certificate-chain", action="append", metavar="PEM",
                   help="CA certificates (PEM) anchoring a certificate signature; repeatable")
    v.add_argument("--identity", help="Sigstore: expected signer identity (e-mail or workflow URI)")
    v.add_argument("--issuer", help="Sigstore: expected OIDC issuer URL")
    v.add_argument("--staging", action="store_true", help="Sigstore staging instance")
    v.add_argument("--trust-config", help="Sigstore ClientTrustConfig JSON (private or offline Sigstore)")
    v.add_argument("--json", action="store_true", help="print the signer and the signed digests as JSON")
    v.set_defaults(func=cmd_verify)
