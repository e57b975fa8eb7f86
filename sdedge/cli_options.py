"""The options that several commands share, built once from the library's own constants, so `generate`, `serve`
and `bench` offer the same choices with the same words: which engine runs a bundle, and what it must be signed
with (docs/signing.md: a key, certificate or identity given means the signature must verify)."""

from __future__ import annotations

import os


def add_engine_options(group, *, defaults: bool = True, scope: str = "") -> None:
    """--device, --backend, --memory, --threads. defaults=False leaves them None (a suite's own settings stay)."""
    from sdedge.runtime.backends.select import BACKENDS, DEVICES
    from sdedge.runtime.pipeline import MEMORY_MODES

    def default(value):
        return value if defaults else None

    group.add_argument("--device", default=default("auto"), choices=DEVICES,
                       help=f"where the bundle runs (auto: a CUDA GPU when onnxruntime has one){scope}")
    group.add_argument("--backend", default=default("auto"), choices=BACKENDS,
                       help=f"inference engine (auto: the documented rule, logged with its reason; docs/cpu-engines.md){scope}")
    group.add_argument("--memory", default=default("normal"), choices=MEMORY_MODES,
                       help=f"low: one component in memory at a time (slower, smaller peak){scope}")
    group.add_argument("--threads", type=int, help="CPU threads (default: all cores)")


def add_trust_options(group, *, verify: str | None = "if-signed", policy: bool = True, key_env: str | None = None,
                      scope: str = "") -> None:
    """--verify (policy=True; `verify` is its default), --public-key, --identity, --issuer."""
    from sdedge.runtime.signing import POLICIES

    if policy:
        group.add_argument("--verify", default=verify, choices=POLICIES,
                           help="signature policy (if-signed: verify when signed, warn when not; a key or identity "
                                f"given makes it required){scope}")
    key_default = (os.environ.get(key_env) or None) if key_env else None
    group.add_argument("--public-key", default=key_default, metavar="PEM",
                       help="public key the bundle must be signed with" + (f" (default ${key_env})" if key_env else "")
                       + scope)
    group.add_argument("--identity", help=f"Sigstore identity (e.g. an e-mail) the bundle must be signed by{scope}")
    group.add_argument("--issuer", help="OIDC issuer of that identity")
