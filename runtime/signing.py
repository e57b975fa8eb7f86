"""Verify a bundle's signature (`model.sig`, an OpenSSF model-signing / Sigstore bundle) before anything is loaded.

No PyTorch here: this module belongs to the runtime. `model_signing` (the `sdedge[sign]` extra) is imported only
when there is a signature to check.

The chain of trust, from the key to the bytes a backend parses:

    public key / certificate chain / Sigstore identity
      └─► model.sig: a DSSE envelope whose signed payload lists every bundle file with its SHA-256
            (model_signing checks the envelope's signature and re-hashes every file on disk against it)
            └─► sdedge.json: its own SHA-256 is in that list, and its `files` table must equal the rest of
                the list exactly (same names, same digests: nothing more, nothing less)
                  └─► `Bundle.read(rel)` reads a file once into memory and checks those very bytes against
                      `files[rel]` before a backend sees them

`open_bundle` builds the `Bundle` from the sdedge.json bytes that were hashed and compared with the signed digest
(sdedge.json is read once, not re-read after the check), so a file swapped on disk between verification and
loading is caught by `Bundle.read` against the signed digest, and a swapped sdedge.json is never parsed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .bundle import Bundle, sha256_file
from .errors import BundleError, MissingDependency, SdedgeError
from .manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, parse_manifest_bytes
from .strict import ConfigError, parse_json, read_capped

POLICIES = ("required", "if-signed", "off")
METHODS = ("key", "certificate", "sigstore")
INSTALL_HINT = "pip install 'sdedge[sign]'  (or: pip install 'model-signing>=1.1' pyopenssl)"

# Paths model_signing leaves out of a folder's signature by default (recorded in the signed payload).
GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")
# Sigstore's Fulcio certificate extensions for the OIDC issuer: v2 (DER UTF8String) and v1 (raw bytes).
_FULCIO_ISSUER_V2 = "1.3.6.1.4.1.57264.1.8"
_FULCIO_ISSUER_V1 = "1.3.6.1.4.1.57264.1.1"
_PREDICATE_TYPE = "https://model_signing/signature/v1.0"


class UnsignedBundleWarning(UserWarning):
    """A bundle was loaded without a checked signature (policy "if-signed")."""


@dataclass(frozen=True)
class SignerInfo:
    """Who signed a bundle, and what they signed: the result of a successful verification.

    `fingerprint` is the SHA-256 of the signing public key's DER (SubjectPublicKeyInfo), in hex, for both the
    "key" and the "certificate" methods. `key_hint` is what model_signing records in a key signature: the SHA-256
    of the public key's PEM text. `digests` maps every signed file (sdedge.json included) to its SHA-256.
    `manifest` is sdedge.json parsed from the very bytes whose digest was checked.
    """

    method: str  # "key" | "certificate" | "sigstore"
    fingerprint: str | None = None
    key_hint: str | None = None
    subject: str | None = None  # certificate subject (RFC 4514)
    identity: str | None = None  # Sigstore: the certificate's SAN (e-mail or workflow URI)
    issuer: str | None = None  # Sigstore: the OIDC issuer; certificate: the leaf's issuer DN
    digests: Mapping[str, str] = field(default_factory=dict, compare=False)
    manifest_sha256: str = ""
    manifest: Manifest | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        if self.method == "key":
            return f"key sha256:{self.fingerprint}"
        if self.method == "certificate":
            return f"certificate {self.subject} (issued by {self.issuer}; key sha256:{self.fingerprint})"
        return f"Sigstore identity {self.identity} (issuer {self.issuer})"

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("method", "fingerprint", "key_hint", "subject", "identity", "issuer")}
        d = {k: v for k, v in d.items() if v is not None}
        d["manifest_sha256"] = self.manifest_sha256
        d["files"] = dict(self.digests)
        return d


# -- key material -------------------------------------------------------------------------------------------------
def _pem_body(pem: bytes, label: str) -> bytes:
    text = pem.decode("ascii", errors="replace")
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    if begin not in text or end not in text:
        raise ValueError(f"no {label} PEM block")
    body = text.split(begin, 1)[1].split(end, 1)[0]
    return base64.b64decode("".join(body.split()), validate=True)


def key_fingerprint(public_key: str | os.PathLike | bytes) -> str:
    """SHA-256 (hex) of a PEM public key's DER SubjectPublicKeyInfo: the fingerprint sdedge shows everywhere."""
    pem = public_key if isinstance(public_key, bytes) else _read_key_file(Path(public_key))
    try:
        return hashlib.sha256(_pem_body(pem, "PUBLIC KEY")).hexdigest()
    except (ValueError, binascii.Error):
        where = "the key" if isinstance(public_key, bytes) else str(public_key)
        raise BundleError(f"{where}: not a PEM public key (-----BEGIN PUBLIC KEY-----)") from None


def key_hint(public_key: str | os.PathLike | bytes) -> str:
    """model_signing's key hint: SHA-256 (hex) of the public key's canonical PEM text."""
    pem = public_key if isinstance(public_key, bytes) else _read_key_file(Path(public_key))
    der = _pem_body(pem, "PUBLIC KEY")
    b64 = base64.b64encode(der).decode()
    canonical = "-----BEGIN PUBLIC KEY-----\n" + "".join(b64[i : i + 64] + "\n" for i in range(0, len(b64), 64))
    canonical += "-----END PUBLIC KEY-----\n"
    return hashlib.sha256(canonical.encode()).hexdigest()


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SdedgeError(f"{path}: cannot read ({exc.strerror})") from None


# -- the signature file --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SignatureFile:
    """model.sig parsed without verifying anything: the method, the verification material and the payload."""

    raw: bytes
    method: str
    material: dict
    statement: dict

    @property
    def serialization(self) -> dict:
        return self.statement.get("predicate", {}).get("serialization", {}) or {}

    def digests(self) -> dict[str, str]:
        """The per-file SHA-256 the payload lists (unverified unless the signature was checked)."""
        out: dict[str, str] = {}
        for res in self.statement.get("predicate", {}).get("resources", []) or []:
            out[str(res.get("name"))] = str(res.get("digest"))
        return out

    def ignore_paths(self) -> tuple[str, ...]:
        return tuple(str(p).rstrip("/") for p in self.serialization.get("ignore_paths", ()) or ())


MAX_SIGNATURE_BYTES = 4 << 20  # a Sigstore bundle over a dozen files is a few KiB; certificates add a few more


def read_signature(bundle_dir: str | os.PathLike, raw: bytes | None = None) -> SignatureFile:
    """Parse `model.sig` (a Sigstore bundle holding a DSSE envelope) without verifying it: size capped (4 MiB),
    nesting capped, and every field sdedge reads checked for its type, so a hostile file is a BundleError that
    names it, never a traceback."""
    path = Path(bundle_dir) / SIGNATURE_NAME
    if raw is None:
        try:
            raw = read_capped(path, MAX_SIGNATURE_BYTES)
        except FileNotFoundError:
            raise BundleError(f"{path}: missing; the bundle is not signed (sign it with `sdedge sign`)") from None
        except ConfigError as exc:
            raise BundleError(f"{exc}; re-sign the bundle with `sdedge sign`") from None
        except OSError as exc:
            raise BundleError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        doc = parse_json(raw, str(path), MAX_SIGNATURE_BYTES)
        material, envelope = _field(doc, "verificationMaterial", dict), _field(doc, "dsseEnvelope", dict)
        payload = base64.b64decode(_field(envelope, "payload", str), validate=True)
        statement = parse_json(payload, f"{path} (signed payload)", MAX_SIGNATURE_BYTES)
        if not isinstance(statement, dict) or not _field(envelope, "signatures", list):
            raise ValueError("no signed in-toto statement")
        _check_statement(statement)
    except (ConfigError, KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise BundleError(
            f"{path}: truncated or corrupt signature ({len(raw)} bytes; not a readable Sigstore bundle: "
            f"{type(exc).__name__}: {exc}); re-sign the bundle with `sdedge sign`"
        ) from None
    if isinstance(material.get("publicKey"), dict):
        method = "key"
    elif isinstance(material.get("x509CertificateChain"), dict):
        method = "certificate"
    elif isinstance(material.get("certificate"), dict):
        method = "sigstore"
    else:
        raise BundleError(f"{path}: the signature holds no public key hint, certificate chain or Sigstore certificate")
    return SignatureFile(raw=raw, method=method, material=material, statement=statement)


def _field(doc: Any, key: str, kind: type) -> Any:
    if not isinstance(doc, dict) or key not in doc:
        raise KeyError(key)
    if not isinstance(doc[key], kind):
        raise TypeError(f"{key!r} is a {type(doc[key]).__name__}, not a {kind.__name__}")
    return doc[key]


def _check_statement(statement: dict) -> None:
    """The parts of the in-toto statement sdedge reads: a predicate mapping, a list of {name, digest} strings."""
    predicate = statement.get("predicate", {})
    if not isinstance(predicate, dict):
        raise TypeError("'predicate' is not a mapping")
    if not isinstance(predicate.get("serialization", {}) or {}, dict):
        raise TypeError("'predicate.serialization' is not a mapping")
    ignore = (predicate.get("serialization") or {}).get("ignore_paths", ()) or ()
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise TypeError("'serialization.ignore_paths' is not a list of strings")
    resources = predicate.get("resources", []) or []
    if not isinstance(resources, list):
        raise TypeError("'predicate.resources' is not a list")
    for res in resources:
        if not (isinstance(res, dict) and isinstance(res.get("name"), str) and isinstance(res.get("digest"), str)):
            raise TypeError("a resource is not a {name, digest} pair of strings")


def _load_der_cert(b64: str):
    try:
        from cryptography import x509
    except ImportError:  # pragma: no cover - cryptography comes with model_signing
        return None
    return x509.load_der_x509_certificate(base64.b64decode(b64))


def _spki_fingerprint(cert) -> str:
    from cryptography.hazmat.primitives import serialization

    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _der_utf8(value: bytes) -> str:
    """Decode a DER UTF8String (short or long length form); fall back to the raw bytes."""
    if len(value) >= 2 and value[0] == 0x0C:
        n, off = value[1], 2
        if n & 0x80:
            k = n & 0x7F
            n, off = int.from_bytes(value[2 : 2 + k], "big"), 2 + k
        return value[off : off + n].decode("utf-8", errors="replace")
    return value.decode("utf-8", errors="replace")


def _sigstore_identity(cert) -> tuple[str | None, str | None]:
    from cryptography import x509

    identity = issuer = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.RFC822Name) or san.get_values_for_type(x509.UniformResourceIdentifier)
        names = names or [str(v) for v in san.get_values_for_type(x509.OtherName)]
        identity = names[0] if names else None
    except x509.ExtensionNotFound:
        pass
    for oid, decode in ((_FULCIO_ISSUER_V2, _der_utf8), (_FULCIO_ISSUER_V1, lambda b: b.decode(errors="replace"))):
        try:
            ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
            issuer = decode(ext.value.value)
            break
        except x509.ExtensionNotFound:
            continue
    return identity, issuer


def _signer_fields(sig: SignatureFile) -> dict[str, Any]:
    """Who the signature says signed it (unverified)."""
    if sig.method == "key":
        return {"method": "key", "key_hint": sig.material["publicKey"].get("hint") or None}
    if sig.method == "certificate":
        certs = sig.material["x509CertificateChain"].get("certificates") or []
        leaf = _load_der_cert(certs[0]["rawBytes"]) if certs else None
        if leaf is None:
            return {"method": "certificate"}
        return {"method": "certificate", "subject": leaf.subject.rfc4514_string(),
                "issuer": leaf.issuer.rfc4514_string(), "fingerprint": _spki_fingerprint(leaf)}
    cert = _load_der_cert(sig.material["certificate"]["rawBytes"])
    if cert is None:
        return {"method": "sigstore"}
    identity, issuer = _sigstore_identity(cert)
    return {"method": "sigstore", "identity": identity, "issuer": issuer,
            "transparency_log": bool(sig.material.get("tlogEntries"))}


def signer_info(bundle_dir: str | os.PathLike) -> dict | None:
    """Who signed the bundle, read from model.sig WITHOUT verifying it (for `sdedge info`); None when unsigned.

    Key signatures carry only model_signing's key hint (SHA-256 of the PEM public key), certificate signatures
    the leaf's subject and key fingerprint, Sigstore signatures the OIDC identity and issuer.
    An unreadable signature gives {"method": "invalid", "error": ...}.
    """
    path = Path(bundle_dir) / SIGNATURE_NAME
    if not path.is_file():
        return None
    try:
        sig = read_signature(bundle_dir)
        info = _signer_fields(sig)
    except BundleError as exc:
        return {"method": "invalid", "error": str(exc), "verified": False}
    except Exception as exc:  # a corrupt certificate inside a readable bundle
        return {"method": "invalid", "error": f"{path}: {type(exc).__name__}: {exc}", "verified": False}
    info["signed_files"] = len(sig.digests())
    info["verified"] = False
    return info


def describe_signer(info: Mapping[str, Any] | None) -> str:
    """One line for `sdedge info` from `signer_info`'s dict."""
    if info is None:
        return "unsigned"
    m = info.get("method")
    if m == "key":
        return f"signed with a key (model_signing key hint {info.get('key_hint')}; not verified here)"
    if m == "certificate":
        return (f"signed with certificate {info.get('subject')} issued by {info.get('issuer')} "
                f"(key sha256:{info.get('fingerprint')}; not verified here)")
    if m == "sigstore":
        return (f"signed keyless with Sigstore by {info.get('identity')} "
                f"(issuer {info.get('issuer')}; not verified here)")
    return f"signature unreadable: {info.get('error')}"


# -- comparing the signed list with the folder ----------------------------------------------------------------------
def _ignored(rel: str, ignore: Iterable[str]) -> bool:
    return any(rel == p or rel.startswith(p + "/") for p in ignore)


def scan_bundle(bundle_dir: str | os.PathLike,
                ignore: Iterable[str] = (SIGNATURE_NAME, *GIT_PATHS)) -> tuple[list[str], list[str]]:
    """(regular files, symbolic links) under the bundle as sorted POSIX relative paths, minus the ignored ones."""
    root = Path(bundle_dir)
    ignore = tuple(ignore)
    files, links = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in list(dirnames):
            rel = (base / name).relative_to(root).as_posix()
            if (base / name).is_symlink():
                dirnames.remove(name)
                if not _ignored(rel, ignore):
                    links.append(rel)
            elif _ignored(rel, ignore):
                dirnames.remove(name)
        for name in filenames:
            rel = (base / name).relative_to(root).as_posix()
            if _ignored(rel, ignore):
                continue
            (links if (base / name).is_symlink() else files).append(rel)
    return sorted(files), sorted(links)


def diff_against_signature(bundle_dir: str | os.PathLike, signed: Mapping[str, str],
                           ignore: Iterable[str] = (SIGNATURE_NAME, *GIT_PATHS)) -> list[str]:
    """One message per file that differs between the folder and the signed digests, each naming the file:
    changed, added, removed, renamed (same content under a new name) or a symbolic link."""
    root = Path(bundle_dir)
    files, links = scan_bundle(root, ignore)
    on_disk = {rel: sha256_file(root / rel) for rel in files}
    msgs: list[str] = []
    added = sorted(set(on_disk) - set(signed))
    removed = sorted(set(signed) - set(on_disk) - set(links))
    for old in list(removed):
        for new in added:
            if on_disk[new] == signed[old]:
                msgs.append(f"{root / old}: renamed to {new} after signing")
                removed.remove(old)
                added.remove(new)
                break
    for rel in sorted(set(on_disk) & set(signed)):
        if on_disk[rel] != signed[rel]:
            msgs.append(f"{root / rel}: changed since it was signed (signed SHA-256 {signed[rel][:16]}…, "
                        f"on disk {on_disk[rel][:16]}…)")
    msgs += [f"{root / rel}: added after signing (the signature does not cover it)" for rel in added]
    msgs += [f"{root / rel}: missing (it was signed, and has been removed or renamed)" for rel in removed]
    msgs += [f"{root / rel}: a symbolic link (a bundle holds only regular files)" for rel in links]
    return msgs


def _mismatch_error(root: Path, msgs: list[str]) -> BundleError:
    head = f"{root}: the bundle does not match its signature ({len(msgs)} difference{'s' if len(msgs) != 1 else ''}): "
    return BundleError(head + "; ".join(msgs))


# -- verification ---------------------------------------------------------------------------------------------------
def _require_model_signing():
    try:
        from model_signing import verifying  # noqa: F401
    except ImportError as exc:
        raise MissingDependency(
            f"checking a bundle signature needs the model-signing package ({exc.name or exc} is missing): "
            f"{INSTALL_HINT}"
        ) from None
    return verifying


def _choose_method(sig: SignatureFile, path: Path, public_key, certificate_chain, identity, issuer) -> str:
    given = [m for m, v in (("key", public_key), ("certificate", certificate_chain),
                            ("sigstore", identity or issuer)) if v]
    flags = {"key": "public_key (--public-key)", "certificate": "certificate_chain (--certificate-chain)",
             "sigstore": "identity and issuer (--identity, --issuer)"}
    if not given:
        raise BundleError(f"{path}: the bundle is signed with a {sig.method}; to verify it pass {flags[sig.method]}")
    if len(given) > 1:
        raise SdedgeError(f"give one way to verify, not {' and '.join(flags[m] for m in given)}")
    method = given[0]
    if method == "sigstore" and not (identity and issuer):
        raise SdedgeError("Sigstore verification needs both identity (--identity) and issuer (--issuer)")
    if method != sig.method:
        raise BundleError(f"{path}: the bundle is signed with a {sig.method}, not a {method}; "
                          f"verify it with {flags[sig.method]}")
    return method


def _paths(value) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


_REJECTED_PREFIXES = ("Key mismatch", "Signing certificate cannot be used", "Expected DSSE payload",
                      "Expected in-toto", "Predicate type mismatch", "Manifest is inconsistent",
                      "Expected only one subject", "Unsupported key", "Unexpected key")


def _signature_rejected(exc: Exception) -> bool:
    """True when model_signing refused the signature itself (key, certificate chain, identity, envelope), as opposed
    to the folder's files not matching a signature that verified."""
    try:
        from cryptography.exceptions import InvalidSignature
    except ImportError:  # pragma: no cover
        InvalidSignature = ()  # type: ignore[assignment]  # noqa: N806
    if InvalidSignature and isinstance(exc, InvalidSignature):
        return True
    if type(exc).__name__ in ("X509StoreContextError", "VerificationError", "CertValidationError"):
        return True
    if type(exc).__module__.split(".")[0] in ("sigstore", "OpenSSL"):
        return True
    return str(exc).startswith(_REJECTED_PREFIXES) or isinstance(exc, (KeyError, IndexError, TypeError))


def _signature_failure(sig: SignatureFile, path: Path, method: str, exc: Exception,
                       public_key, identity, issuer) -> str:
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if method == "key":
        fp = key_fingerprint(public_key)
        hint = sig.material["publicKey"].get("hint")
        other = ""
        if hint and hint != key_hint(public_key):
            other = f"; it was signed by another key (model_signing key hint {hint})"
        why = "" if not str(exc) or str(exc).startswith("Key mismatch") else f" ({reason})"
        return f"{path}: the signature does not verify with the public key {public_key} (sha256:{fp}){other}{why}"
    if method == "certificate":
        info = _signer_fields(sig)
        return (f"{path}: the signature does not verify against the given certificate chain "
                f"(signing certificate {info.get('subject')}, issued by {info.get('issuer')}): {reason}")
    return f"{path}: the Sigstore signature does not verify for identity {identity!r} and issuer {issuer!r}: {reason}"


def verify_bundle(bundle_dir: str | os.PathLike, *, public_key: str | os.PathLike | None = None,
                  certificate_chain: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
                  identity: str | None = None, issuer: str | None = None,
                  trust_config: str | os.PathLike | None = None, use_staging: bool = False) -> SignerInfo:
    """Verify `model.sig` over the whole bundle with model_signing, then tie the signed digests to sdedge.json.

    Exactly one way to verify: `public_key` (PEM), `certificate_chain` (PEM files: the CA certificates that anchor
    the signing certificate) or `identity` + `issuer` (Sigstore keyless; `trust_config` is a Sigstore
    ClientTrustConfig JSON for a private or offline Sigstore instance).

    Raises BundleError naming the file that was added, removed, renamed or changed, or saying that the signature
    does not verify with the key/chain/identity given.
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle folder")
    path = root / SIGNATURE_NAME
    sig = read_signature(root)  # reads model.sig once: these bytes are verified and parsed below
    method = _choose_method(sig, path, public_key, certificate_chain, identity, issuer)
    verifying = _require_model_signing()
    try:
        manifest_bytes = read_capped(root / MANIFEST_NAME)  # read once: hashed here, parsed below
    except FileNotFoundError:
        manifest_bytes = None
    except ConfigError as exc:
        raise BundleError(str(exc)) from None
    except OSError as exc:
        raise BundleError(f"{root / MANIFEST_NAME}: cannot be read ({exc.strerror})") from None

    config = verifying.Config()
    try:
        if method == "key":
            key_fingerprint(public_key)  # a clear error for a file that is not a PEM public key
            config.use_elliptic_key_verifier(public_key=Path(public_key))
        elif method == "certificate":
            chain = _paths(certificate_chain)
            for p in chain:
                if not p.is_file():
                    raise SdedgeError(f"{p}: certificate chain file not found")
            config.use_certificate_verifier(certificate_chain=chain)
        else:
            config.use_sigstore_verifier(identity=identity, oidc_issuer=issuer, use_staging=use_staging,
                                         trust_config=Path(trust_config) if trust_config else None)
    except SdedgeError:
        raise
    except Exception as exc:
        if type(exc).__module__.startswith("sigstore") and "TUF" in type(exc).__name__:
            raise SdedgeError(
                f"cannot fetch Sigstore's trust root (TUF) to verify {path}: {exc}; this needs the network, "
                "or pass trust_config (--trust-config) with a Sigstore trust config JSON") from None
        raise SdedgeError(f"cannot set up {method} verification: {type(exc).__name__}: {exc}") from None

    # model_signing reads the signature from a private copy of the bytes parsed above, so what it verifies is
    # exactly the payload whose digests are used below.
    fd, tmp = tempfile.mkstemp(prefix="sdedge-model-sig-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(sig.raw)
        try:
            config.verify(root, tmp)
        except Exception as exc:
            msgs = diff_against_signature(root, sig.digests(), sig.ignore_paths() or (SIGNATURE_NAME, *GIT_PATHS))
            if not _signature_rejected(exc):
                # The signature itself verified; hashing the folder did not give the signed manifest.
                if not msgs:  # only if the folder changed again while we looked
                    msgs = [f"{root}: {type(exc).__name__}: {exc}"]
                raise _mismatch_error(root, msgs) from None
            text = _signature_failure(sig, path, method, exc, public_key, identity, issuer)
            if msgs:
                text += "; also, compared with the (unverified) signed file list: " + "; ".join(msgs)
            raise BundleError(text) from None
    finally:
        os.unlink(tmp)

    return _tie_to_manifest(root, sig, manifest_bytes, public_key)


def _tie_to_manifest(root: Path, sig: SignatureFile, manifest_bytes: bytes | None, public_key) -> SignerInfo:
    """The signature verified: check that its digests are sdedge.json's `files` plus sdedge.json itself."""
    ser = sig.serialization
    if ser.get("method") != "files" or ser.get("hash_type") != "sha256" or \
            sig.statement.get("predicateType") != _PREDICATE_TYPE:
        raise BundleError(f"{root / SIGNATURE_NAME}: signed with serialization {ser.get('method')!r}/"
                          f"{ser.get('hash_type')!r}; sdedge needs per-file SHA-256 (re-sign with `sdedge sign`)")
    signed = sig.digests()
    if manifest_bytes is None or MANIFEST_NAME not in signed:
        raise BundleError(f"{root / MANIFEST_NAME}: not covered by the signature (or missing); this is not a "
                          "signed sdedge bundle")
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    if manifest_sha != signed[MANIFEST_NAME]:
        raise _mismatch_error(root, [f"{root / MANIFEST_NAME}: changed since it was signed (signed SHA-256 "
                                     f"{signed[MANIFEST_NAME][:16]}…, read {manifest_sha[:16]}…)"])
    manifest = parse_manifest_bytes(manifest_bytes, str(root / MANIFEST_NAME))
    msgs = []
    for rel in sorted(set(signed) | set(manifest.files)):
        if rel == MANIFEST_NAME:
            continue
        if rel not in manifest.files:
            msgs.append(f"{root / rel}: signed, but not listed in {MANIFEST_NAME}")
        elif rel not in signed:
            msgs.append(f"{root / rel}: listed in {MANIFEST_NAME} but not covered by the signature")
        elif signed[rel] != manifest.files[rel].sha256:
            msgs.append(f"{root / rel}: its signed SHA-256 differs from the one in {MANIFEST_NAME}")
    if msgs:
        raise BundleError(f"{root}: the signature and {MANIFEST_NAME} disagree: " + "; ".join(msgs)
                          + " (sign bundles with `sdedge sign`, which checks this)")
    fields = _signer_fields(sig)
    fields.pop("transparency_log", None)
    if sig.method == "key":
        fields["fingerprint"] = key_fingerprint(public_key)
        fields["key_hint"] = key_hint(public_key)
    return SignerInfo(**fields, digests=MappingProxyType(dict(signed)), manifest_sha256=manifest_sha,
                      manifest=manifest)


def check_signature(bundle_dir: str | os.PathLike, policy: str = "if-signed", *,
                    public_key: str | os.PathLike | None = None,
                    certificate_chain: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
                    identity: str | None = None, issuer: str | None = None,
                    trust_config: str | os.PathLike | None = None) -> SignerInfo | None:
    """The runtime's signature policy; call it before any model file is parsed.

    - "required": the bundle must be signed and verify with the key/chain/identity given (BundleError otherwise,
      including when no key/chain/identity is given);
    - "if-signed": verify when model.sig exists; warn (UnsignedBundleWarning) when it does not, or when it exists
      but no key/chain/identity was given to check it with;
    - "off": no check (None).
    A key, certificate chain or identity given means "verify": the policy is then "required" whatever was asked
    ("if-signed" applies only when no trust material is given), and "off" with trust material is refused as a
    contradiction.
    Returns the SignerInfo of a verified signature, else None.
    """
    if policy not in POLICIES:
        raise SdedgeError(f"verify={policy!r}: choose one of {', '.join(POLICIES)}")
    root = Path(bundle_dir)
    trust_given = bool(public_key or certificate_chain or identity or issuer)
    if trust_given and policy == "off":
        raise SdedgeError(f"{root}: verify='off' but a public key, certificate chain or identity was given to verify "
                          "with; drop one of the two (a key given means the signature must verify)")
    if policy == "off":
        return None
    if trust_given:
        policy = "required"
    signed = (root / SIGNATURE_NAME).is_file()
    if not signed:
        if policy == "required":
            why = "a key, certificate chain or identity was given" if trust_given else "verify='required'"
            raise BundleError(f"{root / SIGNATURE_NAME}: missing (unsigned bundle) and {why}, so it must verify: "
                              "refusing to load it; sign it with `sdedge sign`")
        warnings.warn(f"{root}: unsigned bundle (no {SIGNATURE_NAME}): only its files' SHA-256 against "
                      f"{MANIFEST_NAME} are checked; sign it with `sdedge sign`", UnsignedBundleWarning, stacklevel=2)
        return None
    if not trust_given:
        if policy == "required":
            raise BundleError(f"{root}: verify='required' needs something to verify {SIGNATURE_NAME} with: "
                              "public_key, certificate_chain, or identity and issuer")
        warnings.warn(f"{root}: the bundle is signed, but no public key, certificate chain or identity was given, "
                      "so the signature was not checked", UnsignedBundleWarning, stacklevel=2)
        return None
    return verify_bundle(root, public_key=public_key, certificate_chain=certificate_chain, identity=identity,
                         issuer=issuer, trust_config=trust_config)


def open_bundle(bundle_dir: str | os.PathLike, verify: str = "if-signed",
                **trust: Any) -> tuple[Bundle, SignerInfo | None]:
    """`check_signature`, then the `Bundle` to load from.

    When the signature was verified, the Bundle's manifest is the one parsed from the sdedge.json bytes whose
    digest the signature covers (not a second read of the file), so every `Bundle.read(rel)` checks the bytes it
    returns against a digest the signer signed.
    """
    signer = check_signature(bundle_dir, verify, **trust)
    if signer is None or signer.manifest is None:
        return Bundle.open(bundle_dir), signer
    bundle = Bundle(root=Path(bundle_dir), manifest=signer.manifest)
    bundle.check_present()
    return bundle, signer
