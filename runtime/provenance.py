"""Provenance of the images sdedge makes: which bundle made them (the watermark, runtime/watermark.py) and a
signed C2PA manifest embedded in the PNG or JPEG (the `c2pa-python` package, the `provenance` extra), and the
reader behind `sdedge provenance IMAGE`.

    pixels ─► watermark (Pipeline.generate) ─► PNG/JPEG bytes, no metadata ─► C2PA store (when a key is set)

The C2PA manifest records: claim generator sdedge and its version; the action c2pa.created with the IPTC
digital source type trainedAlgorithmicMedia; an `sdedge.generation` assertion with the bundle (SHA-256 of
its sdedge.json, pipeline, precision, base, who signed the bundle), the settings (steps, guidance, scheduler,
size, seed) and the prompt's SHA-256 (the prompt text only when asked for). Signing is offline: no timestamp
authority, no OCSP, no remote manifest. See docs/provenance.md for what a certificate must have.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import watermark as wm
from .environment import sdedge_version
from .errors import BadInput, MissingDependency, SdedgeError
from .manifest import MANIFEST_NAME

INSTALL_HINT = "pip install 'sdedge[provenance]'"
ASSERTION = "sdedge.generation"
SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
FORMATS = {"png": "image/png", "jpeg": "image/jpeg"}
SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
JPEG_QUALITY = 95
# EKUs c2pa-rs accepts for a claim signer when no EKU list is configured (its valid_eku_oids.cfg)
C2PA_EKUS = {"1.3.6.1.5.5.7.3.4": "emailProtection", "1.3.6.1.5.5.7.3.36": "documentSigning",
             "1.3.6.1.4.1.62558.2.1": "c2pa claimSigning", "1.3.6.1.4.1.311.76.59.1.9": "MS C2PA signing"}
# exit codes of `sdedge provenance` (2 stays "bad input", as for every sdedge command)
VALID, TAMPERED, ABSENT, UNTRUSTED = 0, 1, 3, 4
_VERIFY = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
_BENIGN = {"signingCredential.untrusted", "signingCredential.ocsp.skipped", "timeStamp.untrusted"}


def _c2pa():
    try:
        import c2pa
    except ImportError:
        raise MissingDependency(f"C2PA manifests need the c2pa-python package: {INSTALL_HINT}") from None
    return c2pa


# -- which bundle ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BundleIdentity:
    manifest_sha256: str
    pipeline: str
    precision: str
    base: str
    signer: dict | None  # who signed the bundle (runtime.signing.SignerInfo, without the file digests)

    def to_dict(self) -> dict:
        return {"manifest_sha256": self.manifest_sha256, "pipeline": self.pipeline, "precision": self.precision,
                "base": self.base, "signer": self.signer}


def manifest_sha256(bundle_dir: str | os.PathLike) -> str:
    path = Path(bundle_dir) / MANIFEST_NAME
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise BadInput(f"{path}: cannot be read ({exc.strerror}); is {bundle_dir} an sdedge bundle?") from None


def bundle_identity(pipe) -> BundleIdentity:
    """The loaded bundle's identity: a signed bundle's manifest digest is the one its signature covers."""
    cached = getattr(pipe, "_provenance_identity", None)
    if cached is not None:
        return cached
    signer = pipe.signer
    digest = signer.manifest_sha256 if signer is not None and signer.manifest_sha256 else manifest_sha256(pipe.bundle.root)
    who = None
    if signer is not None:
        who = {k: v for k, v in signer.to_dict().items() if k not in ("files", "manifest_sha256")}
    m = pipe.manifest
    ident = BundleIdentity(digest, m.pipeline, m.precision.value, m.provenance.base.id, who)
    pipe._provenance_identity = ident
    return ident


def watermark_images(pipe, images: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Mark (N, H, W, 3) float images with the bundle's payload; (images, payload hex or None when too small)."""
    if not wm.can_mark(*images.shape[1:3]):
        import logging

        logging.getLogger("sdedge.runtime").warning(
            "images of %dx%d are not watermarked (the smallest side must be >= %d)",
            images.shape[2], images.shape[1], wm.MIN_SIDE)
        return images, None
    data = wm.payload(bundle_identity(pipe).manifest_sha256)
    return wm.embed_batch(images, data), data.hex()


# -- encoding -------------------------------------------------------------------------------------------------
def format_for(path: str | os.PathLike) -> str:
    fmt = SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise BadInput(f"{path}: sdedge writes .png, .jpg or .jpeg (these carry the C2PA manifest)")
    return fmt


def encode_image(image, fmt: str) -> bytes:
    """A PIL image (or uint8 (H, W, 3) array) as PNG or JPEG bytes with no metadata (no EXIF, XMP or text)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# -- signing --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class C2paConfig:
    """Where the C2PA signing material is: a PEM certificate chain (leaf first, then intermediates, no root)
    and the leaf's PEM private key (EC P-256/384/521, Ed25519 or RSA)."""

    cert: str
    key: str
    include_prompt: bool = False
    key_password_env: str | None = None


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BadInput(f"{what} {path}: cannot be read ({exc.strerror})") from None


def _algorithm(key, path: str) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}.get(key.curve.name)
        if alg:
            return alg
        raise BadInput(f"C2PA key {path}: curve {key.curve.name} is not one C2PA signs with (P-256, P-384, P-521)")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    raise BadInput(f"C2PA key {path}: {type(key).__name__} keys cannot sign C2PA manifests")


def check_certificate(leaf, path: str) -> None:
    """What c2pa-rs requires of the signing (leaf) certificate, checked here so the error names the file."""
    import datetime

    from cryptography import x509

    def ext(kind):
        try:
            return leaf.extensions.get_extension_for_class(kind).value
        except x509.ExtensionNotFound:
            return None

    bc = ext(x509.BasicConstraints)
    if leaf.issuer == leaf.subject:
        raise BadInput(f"C2PA certificate {path}: the first certificate is self-signed; C2PA needs a leaf "
                       "issued by a CA (put the leaf first, then its intermediates)")
    if bc is not None and bc.ca:
        raise BadInput(f"C2PA certificate {path}: the first certificate is a CA; it must be the signing (leaf) one")
    ku = ext(x509.KeyUsage)
    if ku is None or not ku.digital_signature:
        raise BadInput(f"C2PA certificate {path}: the leaf needs the key usage digitalSignature")
    eku = ext(x509.ExtendedKeyUsage)
    oids = {o.dotted_string for o in eku} if eku is not None else set()
    if "2.5.29.37.0" in oids or not oids & set(C2PA_EKUS):
        raise BadInput(f"C2PA certificate {path}: the leaf's extended key usage must include one of "
                       f"{', '.join(C2PA_EKUS.values())} (and not anyExtendedKeyUsage)")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise BadInput(f"C2PA certificate {path}: not valid now (valid {leaf.not_valid_before_utc:%Y-%m-%d} to "
                       f"{leaf.not_valid_after_utc:%Y-%m-%d})")


@dataclass(frozen=True)
class Stamper:
    """Embeds a signed C2PA manifest in encoded images. `Stamper.load(config, identity)` reads and checks the
    key and certificates once (a server fails at start, not at the first request)."""

    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    alg: str
    identity: BundleIdentity
    include_prompt: bool = False
    subject: str = ""

    @classmethod
    def load(cls, config: C2paConfig, identity: BundleIdentity) -> Stamper:
        _c2pa()
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        chain_pem = _read(config.cert, "C2PA certificate")
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError:
            raise BadInput(f"C2PA certificate {config.cert}: not a PEM certificate chain") from None
        check_certificate(chain[0], config.cert)
        password = None
        if config.key_password_env:
            value = os.environ.get(config.key_password_env)
            if value is None:
                raise BadInput(f"--c2pa-key-password-env {config.key_password_env}: the variable is not set")
            password = value.encode()
        try:
            key = serialization.load_pem_private_key(_read(config.key, "C2PA key"), password=password)
        except (ValueError, TypeError) as exc:
            raise BadInput(f"C2PA key {config.key}: cannot be loaded ({exc})") from None
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
            raise BadInput(f"C2PA key {config.key} is not the key of the certificate {config.cert}")
        pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        return cls(chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain), key_pem=pkcs8,
                   alg=_algorithm(key, config.key), identity=identity, include_prompt=config.include_prompt,
                   subject=chain[0].subject.rfc4514_string())

    def manifest(self, settings: dict, prompt: str, negative: str, watermark: str | None, index: int) -> dict:
        keep = ("steps", "guidance", "scheduler", "width", "height", "seed", "num_images")
        if self.include_prompt:
            said = {"text": prompt, "negative_text": negative}
        else:
            said = {"sha256": _sha(prompt), "negative_sha256": _sha(negative)}
        data = {"bundle": self.identity.to_dict(), "settings": {k: settings[k] for k in keep if k in settings},
                "image_index": index, "prompt": said,
                "watermark": None if watermark is None else {"method": wm.METHOD, "payload": watermark}}
        return {"claim_generator_info": [{"name": "sdedge", "version": sdedge_version()}],
                "assertions": [
                    {"label": "c2pa.actions", "data": {"actions": [
                        {"action": "c2pa.created", "digitalSourceType": SOURCE_TYPE}]}},
                    {"label": ASSERTION, "data": data}]}

    def sign(self, data: bytes, fmt: str, manifest: dict) -> bytes:
        """`data` (PNG or JPEG bytes) with the signed manifest embedded. Offline: no timestamp authority."""
        c2pa = _c2pa()
        settings = c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}, **_VERIFY})
        try:
            signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(self.alg, self.chain_pem, self.key_pem, None))
            with c2pa.Builder(json.dumps(manifest), context=c2pa.Context(settings=settings)) as builder:
                out = io.BytesIO()
                builder.sign(signer, FORMATS[fmt], io.BytesIO(data), out)
        except c2pa.C2paError as exc:
            raise SdedgeError(f"C2PA signing with {self.subject} failed: {exc}") from None
        return out.getvalue()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_outputs(result, fmt: str, stamper: Stamper | None, prompt: str, negative: str = "") -> list[bytes]:
    """The bytes of every image of a GenerationResult: encoded without metadata, then signed when a stamper
    is set. The one encoder behind `sdedge generate` and the HTTP API."""
    out = []
    for i, image in enumerate(result.to_pil()):
        data = encode_image(image, fmt)
        if stamper is not None:
            data = stamper.sign(data, fmt, stamper.manifest(result.settings, prompt, negative,
                                                            getattr(result, "watermark", None), i))
        out.append(data)
    return out


# -- reading --------------------------------------------------------------------------------------------------
def metadata_blocks(data: bytes) -> list[str]:
    """The metadata containers of a PNG (ancillary chunk types) or JPEG (APPn/COM markers), in file order:
    what the tests check stays EXIF-free apart from the C2PA store (PNG caBX, JPEG APP11)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        out, i = [], 8
        while i + 8 <= len(data):
            (n,), kind = struct.unpack(">I", data[i:i + 4]), data[i + 4:i + 8].decode("latin-1")
            if kind not in ("IHDR", "PLTE", "IDAT", "IEND"):
                out.append(kind)
            i += 12 + n
        return out
    if data[:2] == b"\xff\xd8":
        out, i = [], 2
        while i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] != 0xDA:
            marker = data[i + 1]
            (n,) = struct.unpack(">H", data[i + 2:i + 4])
            if 0xE0 <= marker <= 0xEF or marker == 0xFE:
                out.append("COM" if marker == 0xFE else f"APP{marker - 0xE0}")
            i += 2 + n
        return out
    raise BadInput("not a PNG or JPEG file")


def has_c2pa_store(data: bytes) -> bool:
    blocks = metadata_blocks(data)
    return "caBX" in blocks or "APP11" in blocks


@dataclass(frozen=True)
class Report:
    """What `sdedge provenance` found. `exit_code`: VALID 0, TAMPERED 1, ABSENT 3, UNTRUSTED 4."""

    path: str
    format: str
    c2pa: dict | None
    watermark: dict
    bundle: dict
    verdict: str
    reasons: tuple[str, ...]
    exit_code: int

    def to_dict(self) -> dict:
        return {"file": self.path, "format": self.format, "verdict": self.verdict, "exit_code": self.exit_code,
                "reasons": list(self.reasons), "c2pa": self.c2pa, "watermark": self.watermark, "bundle": self.bundle}


def read_c2pa(data: bytes, fmt: str, trust_anchors: bytes | None = None) -> dict | None:
    """The active manifest and its validation, or None when the file has no C2PA store."""
    if not has_c2pa_store(data):
        return None
    c2pa = _c2pa()
    settings: dict[str, Any] = {"verify": {**_VERIFY["verify"], "verify_trust": True}}
    if trust_anchors:
        settings["trust"] = {"trust_anchors": trust_anchors.decode("ascii", "replace")}
    try:
        reader = c2pa.Reader(FORMATS[fmt], io.BytesIO(data), context=c2pa.Context(c2pa.Settings.from_dict(settings)))
    except c2pa.C2paError as exc:  # a store that cannot even be parsed is a broken one
        return {"state": "Invalid", "failures": [f"unreadable: {exc}"], "manifest": None}
    with reader:
        results = reader.get_validation_results() or {}
        active = reader.get_active_manifest()
        state = reader.get_validation_state()
    failures = [f.get("code", "?") for f in (results.get("activeManifest") or {}).get("failure", [])]
    return {"state": state, "failures": failures, "manifest": active}


def _sdedge_assertion(manifest: dict | None) -> dict | None:
    for a in (manifest or {}).get("assertions", []):
        if a.get("label") == ASSERTION:
            return a.get("data")
    return None


def _pixels(data: bytes, path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadInput(f"{path}: the image data cannot be decoded ({exc})") from None


def inspect(path: str | os.PathLike, *, trust_anchors: str | None = None, bundles=()) -> Report:
    """Read and verify an image's C2PA manifest and watermark; `bundles`: folders to name the maker among."""
    data = _read(str(path), "image")
    try:
        kind = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpeg" if data[:2] == b"\xff\xd8" else None
        if kind is None:
            raise BadInput("not a PNG or JPEG file")
        manifest = read_c2pa(data, kind, _read(trust_anchors, "trust anchors") if trust_anchors else None)
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from None
    try:
        mark = wm.detect(_pixels(data, str(path)))
    except BadInput:
        if manifest is None:
            raise
        mark = wm.Detection(False, None, np.zeros(wm.PAYLOAD_BITS, np.uint8), 0.0)  # pixels broken: C2PA says so
    return _judge(str(path), kind, manifest, mark, trust_anchors is not None, bundles)


def _judge(path, kind, c2, mark, anchored: bool, bundles) -> Report:
    reasons: list[str] = []
    claims = _sdedge_assertion(c2["manifest"]) if c2 else None
    digest = (claims or {}).get("bundle", {}).get("manifest_sha256")
    code = VALID
    if c2 is not None:
        bad = [f for f in c2["failures"] if f not in _BENIGN]
        if bad or c2["state"] == "Invalid":
            code = TAMPERED
            reasons.append("C2PA manifest does not validate: " + ", ".join(bad or [c2["state"]]))
        elif anchored and c2["state"] != "Trusted":
            code = UNTRUSTED
            reasons.append("C2PA signature valid, but its certificate does not chain to --trust-anchors")
        else:
            who = "trusted signer" if c2["state"] == "Trusted" else "signer not checked against a trust list"
            reasons.append(f"C2PA manifest valid ({who})")
    if mark.present:
        reasons.append(f"sdedge watermark found: bundle manifest sha256 {mark.digest_prefix}…")
        if digest and not digest.startswith(mark.digest_prefix):
            code = TAMPERED
            reasons.append(f"the watermark names bundle {mark.digest_prefix}… but the C2PA manifest {digest[:12]}…")
    elif claims and claims.get("watermark") and code == VALID:
        reasons.append("the C2PA manifest records a watermark that was not found in the pixels")
    if c2 is None and not mark.present:
        code = ABSENT
        reasons.append("no C2PA manifest and no sdedge watermark")
    bundle = {"manifest_sha256": digest, "manifest_sha256_prefix": digest[:12] if digest else mark.digest_prefix,
              "claims": claims}
    prefix = bundle["manifest_sha256_prefix"]
    bundle["matches"] = [str(b) for b in bundles if prefix and manifest_sha256(b).startswith(prefix)]
    verdict = {VALID: "valid", TAMPERED: "tampered", ABSENT: "absent", UNTRUSTED: "untrusted"}[code]
    c2_out = None if c2 is None else {"state": c2["state"], "failures": c2["failures"],
                                      "claim_generator": (c2["manifest"] or {}).get("claim_generator_info"),
                                      "signature": (c2["manifest"] or {}).get("signature_info"),
                                      "assertions": [a.get("label") for a in (c2["manifest"] or {}).get("assertions", [])]}
    return Report(path, kind, c2_out, mark.to_dict(), bundle, verdict, tuple(reasons), code)
