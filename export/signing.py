"""Sign a bundle with the OpenSSF model-signing library: an EC private key, a certificate chain, or Sigstore keyless.

`model.sig` is model_signing's own output (a Sigstore bundle holding a DSSE envelope over an in-toto statement
that lists every bundle file with its SHA-256), so `model_signing verify ...` accepts it as well as `sdedge verify`.

Signing refuses a bundle that does not match its sdedge.json (a file changed, missing, or not listed), since
a signature over junk is worthless, and it writes model.sig atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdedge.runtime.bundle import Bundle
from sdedge.runtime.errors import BundleError, MissingDependency, SdedgeError
from sdedge.runtime.files import atomic_output
from sdedge.runtime.manifest import MANIFEST_NAME, SIGNATURE_NAME
from sdedge.runtime.signing import (
    GIT_PATHS,
    INSTALL_HINT,
    key_fingerprint,
    key_hint,
    read_signature,
    scan_bundle,
)

PRIVATE_KEY_NAME = "private.pem"
PUBLIC_KEY_NAME = "public.pem"
# Environment variables sign() reads for keyless signing: an explicit OIDC token (e.g. from a CI secret step).
TOKEN_ENV = "SIGSTORE_ID_TOKEN"
DEFAULT_SIGSTORE_TIMEOUT = 120.0


class SigningError(SdedgeError):
    """Signing could not be done: bad key material, an unsignable bundle, or Sigstore unreachable."""


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path
    fingerprint: str  # SHA-256 of the public key's DER
    key_hint: str  # model_signing's hint: SHA-256 of the public key's PEM


@dataclass(frozen=True)
class SignResult:
    signature: Path
    method: str
    files: int  # files covered, sdedge.json included
    signer: dict[str, Any]  # who signed (as signer_info: fingerprint / subject / identity)


def _require_model_signing():
    try:
        from model_signing import hashing, signing
    except ImportError as exc:
        raise MissingDependency(f"signing needs the model-signing package ({exc.name or exc} is missing): "
                                f"{INSTALL_HINT}") from None
    return hashing, signing


# -- keys -----------------------------------------------------------------------------------------------------------
def keygen(out_dir: str | os.PathLike, *, password: bytes | str | None = None) -> KeyPair:
    """Write an EC P-256 key pair: `private.pem` (PKCS#8, mode 0600, encrypted when a password is given) and
    `public.pem`. Refuses to overwrite either file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out_dir)
    priv, pub = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    for p in (priv, pub):
        if p.exists() or p.is_symlink():
            raise SigningError(f"{p}: already exists; refusing to overwrite a key "
                               "(move it away or choose another --out)")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    if password:
        enc: Any = serialization.BestAvailableEncryption(password.encode() if isinstance(password, str) else password)
    else:
        enc = serialization.NoEncryption()
    priv_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(priv, priv_pem, 0o600)
    try:
        _write_new(pub, pub_pem, 0o644)
    except BaseException:
        priv.unlink(missing_ok=True)
        raise
    return KeyPair(private=priv, public=pub, fingerprint=key_fingerprint(pub_pem), key_hint=key_hint(pub_pem))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise SigningError(f"{path}: already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have narrowed (or not) what os.open asked for


def _load_private_key(path: Path, password: bytes | None):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"{path}: cannot read the private key ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError as exc:  # encrypted without a password, or a password for an unencrypted key
        raise SigningError(f"{path}: {exc} (pass the key's password with --key-password-env)") from None
    except ValueError as exc:
        raise SigningError(f"{path}: not a usable PEM private key, or a wrong password ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise SigningError(f"{path}: model-signing needs an EC private key on P-256, P-384 or P-521 "
                           "(`sdedge keygen` writes one)")
    return key


# -- what may be signed ---------------------------------------------------------------------------------------------
def check_signable(bundle_dir: str | os.PathLike) -> Bundle:
    """The bundle matches its sdedge.json exactly: every listed file present with its size and SHA-256, and no
    other file (model.sig and git's own files aside). Raises BundleError naming every offending file."""
    bundle = Bundle.open(bundle_dir)  # parses sdedge.json (paths inside the bundle), checks presence and sizes
    root = bundle.root
    files, links = scan_bundle(root, (SIGNATURE_NAME, *GIT_PATHS))
    problems = [f"{root / rel}: a symbolic link (a bundle holds only regular files)" for rel in links]
    extra = [rel for rel in files if rel != MANIFEST_NAME and rel not in bundle.manifest.files]
    problems += [f"{root / rel}: not listed in {MANIFEST_NAME}" for rel in extra]
    for rel in bundle.manifest.files:
        try:
            bundle.verify_hash(rel)
        except BundleError as exc:
            problems.append(str(exc))
    if problems:
        raise BundleError(f"{root}: refusing to sign a bundle that does not match its {MANIFEST_NAME}: "
                          + "; ".join(problems) + " (remove extra files; re-export a changed bundle)")
    return bundle


# -- signing --------------------------------------------------------------------------------------------------------
def sign(bundle_dir: str | os.PathLike, *, key: str | os.PathLike | None = None, password: bytes | str | None = None,
         certificate: str | os.PathLike | None = None,
         certificate_chain: Iterable[str | os.PathLike] = (), sigstore: bool = False,
         identity_token: str | None = None, oidc_issuer: str | None = None, use_staging: bool = False,
         trust_config: str | os.PathLike | None = None, client_id: str | None = None, client_secret: str | None = None,
         interactive: bool | None = None, force_oob: bool = False, timeout: float | None = None) -> SignResult:
    """Write `bundle_dir/model.sig` over every file of the bundle (model.sig itself excluded).

    One method:
    - `key`: an EC private key (PEM; `password` if encrypted);
    - `certificate` + `key` (+ `certificate_chain`): a signing certificate for that key and the intermediate /
      root certificates a verifier needs to build the chain;
    - `sigstore=True`: keyless. The OIDC identity comes from `identity_token`, else $SIGSTORE_ID_TOKEN, else the
      CI's ambient credentials (GitHub Actions with `id-token: write`, GitLab, Buildkite, CircleCI, GCP), else an
      interactive browser flow when `interactive` (default: stdin is a terminal and $CI is unset). `timeout`
      bounds the whole exchange with Sigstore (default 120 s; the browser flow gets at least 300 s).
    """
    root = Path(bundle_dir)
    _check_one_method(sigstore, key, certificate, certificate_chain)
    hashing, signing = _require_model_signing()
    bundle = check_signable(root)  # before any key is used or any Sigstore server is contacted

    config = signing.Config().set_hashing_config(
        hashing.Config().use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
        .set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=True)
    )
    pw = password.encode() if isinstance(password, str) else password
    run: Callable[[], None]
    if sigstore:
        method = "sigstore"
        token, interactive = _identity_token(identity_token, client_id, interactive)
        if timeout is None:
            timeout = DEFAULT_SIGSTORE_TIMEOUT if token else max(DEFAULT_SIGSTORE_TIMEOUT, 300.0)
    else:
        key_path = Path(key)
        private_key = _load_private_key(key_path, pw)
        if certificate:
            method = "certificate"
            _check_certificate(Path(certificate), [Path(c) for c in certificate_chain], private_key, pw is not None)
            config.use_certificate_signer(private_key=key_path, signing_certificate=Path(certificate),
                                          certificate_chain=[Path(c) for c in certificate_chain])
        else:
            method = "key"
            # model_signing hands `password` to cryptography, which wants bytes
            config.use_elliptic_key_signer(private_key=key_path, password=pw)  # type: ignore[arg-type]

    # The temporary name is not created until model_signing writes the signature, after it has hashed the
    # folder, so it is never part of what is signed.
    with atomic_output(root / SIGNATURE_NAME, create=False) as tmp:
        if sigstore:
            def run() -> None:
                config.use_sigstore_signer(
                    oidc_issuer=oidc_issuer, use_ambient_credentials=False, use_staging=use_staging,
                    force_oob=force_oob, identity_token=token, client_id=client_id, client_secret=client_secret,
                    trust_config=Path(trust_config) if trust_config else None)
                config.sign(root, tmp)

            _with_deadline(run, timeout, root)
        else:
            try:
                config.sign(root, tmp)
            except (ValueError, TypeError, OSError) as exc:
                raise SigningError(f"{root}: model-signing could not sign: {type(exc).__name__}: {exc}") from None
        signed = _check_signed_matches(bundle, tmp)
    from sdedge.runtime.signing import signer_info

    info = signer_info(root) or {}
    if method == "key":
        info["fingerprint"] = _public_fingerprint(private_key)
    return SignResult(signature=root / SIGNATURE_NAME, method=method, files=signed, signer=info)


def _check_one_method(sigstore: bool, key, certificate, certificate_chain) -> None:
    """sign()'s arguments name exactly one method: a key, a certificate with its key, or Sigstore."""
    if sigstore and (key or certificate):
        raise SigningError("choose one signing method: --sigstore (keyless) or --key/--certificate, not both")
    if certificate and not key:
        raise SigningError("--certificate needs --key: the private key the certificate was issued for")
    if not sigstore and not key:
        raise SigningError("say how to sign: --key PRIVATE.pem, --certificate LEAF.pem --key KEY.pem, or --sigstore")
    if certificate_chain and not certificate:
        raise SigningError("--certificate-chain goes with --certificate")


def _public_fingerprint(private_key) -> str:
    """The fingerprint of a private key's public half (runtime/signing.py `key_fingerprint` over its PEM)."""
    from cryptography.hazmat.primitives import serialization

    pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return key_fingerprint(pem)


def _check_signed_matches(bundle: Bundle, sig_path: Path) -> int:
    """The digests model_signing just signed are sdedge.json's (a file changed while signing otherwise)."""
    sig = read_signature(bundle.root, sig_path.read_bytes())
    signed = sig.digests()
    expected = {rel: e.sha256 for rel, e in bundle.manifest.files.items()}
    manifest_sha = hashlib.sha256((bundle.root / MANIFEST_NAME).read_bytes()).hexdigest()
    expected[MANIFEST_NAME] = manifest_sha
    bad = sorted(rel for rel in set(signed) | set(expected) if signed.get(rel) != expected.get(rel))
    if bad:
        raise BundleError(f"{bundle.root}: files changed while the bundle was being signed: "
                          + ", ".join(str(bundle.root / r) for r in bad) + "; nothing was written, sign again")
    return len(signed)


def _check_certificate(cert_path: Path, chain: list[Path], private_key, encrypted: bool) -> None:
    from cryptography import x509

    if encrypted:
        raise SigningError("model-signing's certificate signer cannot use an encrypted private key: "
                           "decrypt it into a file only you can read, or sign with --key")
    for p in (cert_path, *chain):
        if not p.is_file():
            raise SigningError(f"{p}: certificate file not found")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise SigningError(f"{cert_path}: not a PEM certificate ({exc})") from None
    if cert.public_key() != private_key.public_key():
        raise SigningError(f"{cert_path}: the certificate is not for this private key (its public key differs)")
    for p in chain:
        try:
            x509.load_pem_x509_certificates(p.read_bytes())
        except ValueError as exc:
            raise SigningError(f"{p}: not PEM certificates ({exc})") from None


# -- Sigstore keyless -------------------------------------------------------------------------------------------------
def _identity_token(explicit: str | None, client_id: str | None, interactive: bool | None) -> tuple[str | None, bool]:
    """An OIDC token, or None when the interactive browser flow will be used. Raises when there is neither."""
    from sigstore import oidc

    token = explicit or os.environ.get(TOKEN_ENV) or None
    if token is None:
        try:
            token = oidc.detect_credential(client_id or "sigstore")
        except oidc.IdentityError as exc:
            raise SigningError(f"Sigstore keyless signing: ambient OIDC credentials were found but cannot be used: "
                               f"{exc} (on GitHub Actions the job needs `permissions: id-token: write`)") from None
    if interactive is None:
        interactive = sys.stdin is not None and sys.stdin.isatty() and not os.environ.get("CI")
    if token is None and not interactive:
        raise SigningError(
            "Sigstore keyless signing needs an OIDC identity token and none was found: no --identity-token, no "
            f"${TOKEN_ENV}, no ambient CI credentials (e.g. GitHub Actions with `permissions: id-token: write`), "
            "and no terminal for the browser flow; or sign with --key instead")
    if token is not None:
        try:
            oidc.IdentityToken(token, client_id or "sigstore")
        except oidc.IdentityError as exc:
            raise SigningError(f"Sigstore keyless signing: the OIDC identity token is unusable: {exc}") from None
    return token, interactive


def _with_deadline(fn: Callable[[], None], timeout: float, root: Path) -> None:
    """Run the network part of keyless signing with a bound on its duration, and name what failed."""
    outcome: dict[str, BaseException] = {}

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    t0 = time.monotonic()
    worker = threading.Thread(target=target, name="sdedge-sigstore-sign", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise SigningError(f"{root}: no answer from Sigstore within {timeout:g} s (network: Sigstore's TUF "
                           "repository, Fulcio and Rekor must be reachable for keyless signing); nothing was written")
    exc = outcome.get("error")
    if exc is None:
        return
    raise SigningError(f"{root}: Sigstore keyless signing failed after {time.monotonic() - t0:.1f} s: "
                       f"{_explain_sigstore(exc)}; nothing was written") from None


def _explain_sigstore(exc: BaseException) -> str:
    name = type(exc).__name__
    diag = ""
    if hasattr(exc, "diagnostics"):
        try:
            diag = " ".join(str(exc.diagnostics()).split())
        except Exception:
            diag = ""
    text = diag or str(exc) or name
    if name == "TUFError":
        return (f"cannot reach Sigstore's TUF repository for its trust root (network unreachable?): {text}. "
                "Keyless signing needs the network; offline, sign with --key or --certificate")
    if name in ("NetworkError", "ConnectionError", "Timeout", "MaxRetryError", "ConnectTimeout"):
        return f"network error talking to Sigstore (Fulcio / Rekor): {text}"
    if name in ("IdentityError", "ExpiredIdentity"):
        return f"OIDC identity problem: {text}"
    return f"{name}: {text}"

