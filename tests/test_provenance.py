"""Provenance: the invisible watermark (runtime/watermark.py), signed C2PA manifests (runtime/provenance.py),
`sdedge provenance` and the HTTP API's PNGs. The certificate chains are made here, offline (no TSA, no OCSP)."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import struct

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from sdedge.benchmarks.watermark import ATTACKS, procedural
from sdedge.runtime import watermark as wm
from sdedge.runtime.errors import BadInput
from sdedge.runtime.provenance import (
    ABSENT,
    TAMPERED,
    UNTRUSTED,
    VALID,
    C2paConfig,
    Stamper,
    encode_image,
    inspect,
    manifest_sha256,
    metadata_blocks,
)

DIGEST = "3f" * 32
PROMPT = "a red circle, private words 7c1d"


# -- images and certificates ---------------------------------------------------------------------------------------
def picture(size: int, seed: int = 0) -> np.ndarray:
    """A photo-like (1/f spectrum) RGB image with a saturated disc and a black bar: (size, size, 3) uint8 (the
    benchmark's procedural images)."""
    return procedural(size, seed)


def jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    return ATTACKS[f"jpeg{quality}"](a)


half = ATTACKS["resize0.5_bicubic"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))


def make_chain(folder, *, leaf_eku=True, self_signed_leaf=False, name="sdedge test"):
    """root CA → intermediate CA → leaf (key usage digitalSignature, EKU emailProtection): PEM files in `folder`.
    Returns (chain.pem, leaf.key, root.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(cn, issuer_cn, key, issuer_key, ca, path_len=None):
        ku = dict(digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                  key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False)
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len), critical=True)
             .add_extension(x509.KeyUsage(**ku), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False))
        if not ca and leaf_eku:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    root = cert(f"{name} root", f"{name} root", keys[0], keys[0], True, 1)
    inter = cert(f"{name} intermediate", f"{name} root", keys[1], keys[0], True, 0)
    if self_signed_leaf:
        leaf = cert("leaf", "leaf", keys[2], keys[2], False)
    else:
        leaf = cert(f"{name} signer", f"{name} intermediate", keys[2], keys[1], False)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    paths = folder / "chain.pem", folder / "leaf.key", folder / "root.pem"
    paths[0].write_bytes(pem(leaf) + (b"" if self_signed_leaf else pem(inter)))
    paths[1].write_bytes(keys[2].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths[2].write_bytes(pem(root))
    return tuple(str(p) for p in paths)


def identity(digest=DIGEST):
    from sdedge.runtime.provenance import BundleIdentity

    return BundleIdentity(digest, "sd15", "fp32", "builtin:test", None)


def png_with_store_of(signed: bytes, pixels: np.ndarray) -> bytes:
    """A new PNG of `pixels` carrying the C2PA store (caBX chunk) of `signed`: an edit that kept the credentials."""
    fresh = encode_image(pixels, "png")
    i = signed.index(b"caBX") - 4
    (n,) = struct.unpack(">I", signed[i:i + 4])
    chunk = signed[i:i + 12 + n]
    ihdr_end = 8 + 12 + struct.unpack(">I", fresh[8:12])[0]
    return fresh[:ihdr_end] + chunk + fresh[ihdr_end:]


# -- the watermark -------------------------------------------------------------------------------------------------
def test_watermark_survives_png_jpeg_and_half_size_at_512_within_psnr_40():
    data = wm.payload(DIGEST)
    for seed in (0, 1):
        img = picture(512, seed)
        marked = wm.embed(img, data)
        assert psnr(marked, img) >= 40.0
        for attack in (lambda a: a, lambda a: jpeg(a, 90), lambda a: jpeg(a, 75), half, lambda a: jpeg(half(a), 75)):
            found = wm.detect(attack(marked))
            assert found.present and found.digest_prefix == DIGEST[:12]


def test_watermark_on_64px_images_and_float_input():
    data = wm.payload(DIGEST)
    img = picture(64, 3)
    assert wm.detect(jpeg(wm.embed(img, data), 90)).digest_prefix == DIGEST[:12]
    as_float = wm.embed(img.astype(np.float32) / 255, data)
    assert as_float.dtype == np.float32 and 0.0 <= as_float.min() and as_float.max() <= 1.0
    assert wm.detect((as_float * 255).round().astype(np.uint8)).digest_prefix == DIGEST[:12]
    tiny = picture(16)
    assert wm.embed(tiny, data) is tiny and not wm.detect(tiny).present  # below MIN_SIDE: left alone


def test_crc_aided_correction_recovers_a_few_wrong_bits():
    data = wm.payload(DIGEST)
    shifted = wm.embed(picture(512, 1), data)[1:, 1:]  # a 1-pixel shift: one bit comes out wrong here
    found = wm.detect(shifted)
    assert found.present and found.digest_prefix == DIGEST[:12] and found.corrected >= 1
    assert np.array_equal(found.bits, np.unpackbits(np.frombuffer(data, np.uint8)))


def test_unmarked_images_and_damaged_payloads_are_not_detected():
    for seed in range(40):
        found = wm.detect(picture(64 if seed % 2 else 256, 10 + seed))
        assert not found.present and found.digest_prefix is None and found.strength < 0.5
    good = wm.payload(DIGEST)
    assert wm.parse_payload(good) == DIGEST[:12]
    for i in range(len(good)):
        assert wm.parse_payload(good[:i] + bytes([good[i] ^ 0x10]) + good[i + 1:]) is None


# -- C2PA signing and verification (in-process) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    pytest.importorskip("c2pa")
    return make_chain(tmp_path_factory.mktemp("c2pa"))


def _sign(chain, pixels, fmt="png", include_prompt=False, digest=DIGEST, mark_digest=DIGEST):
    cert, key, _ = chain
    stamper = Stamper.load(C2paConfig(cert, key, include_prompt=include_prompt), identity(digest))
    data = wm.payload(mark_digest)
    marked = wm.embed(pixels, data)
    settings = dict(steps=4, guidance=7.5, scheduler="ddim", width=pixels.shape[1], height=pixels.shape[0], seed=7)
    return stamper.sign(encode_image(marked, fmt), fmt, stamper.manifest(settings, PROMPT, "", data.hex(), 0))


def test_signed_png_and_jpeg_verify_and_leak_nothing(chain, tmp_path):
    _, _, root = chain
    for fmt, blocks in (("png", ["caBX"]), ("jpeg", ["APP0", "APP11"])):
        signed = _sign(chain, picture(128), fmt)
        assert metadata_blocks(signed) == blocks  # JFIF header + the C2PA store; no EXIF, XMP or text chunks
        assert PROMPT.encode() not in signed and b"private words" not in signed
        path = tmp_path / f"x.{fmt}"
        path.write_bytes(signed)
        report = inspect(path, trust_anchors=root)
        assert report.exit_code == VALID and report.c2pa["state"] == "Trusted", report.reasons
        claims = report.bundle["claims"]
        assert claims["bundle"]["manifest_sha256"] == DIGEST
        assert claims["settings"] == dict(steps=4, guidance=7.5, scheduler="ddim", width=128, height=128, seed=7)
        assert claims["prompt"]["sha256"] == hashlib.sha256(PROMPT.encode()).hexdigest()
        assert report.watermark["bundle_manifest_sha256_prefix"] == DIGEST[:12]
        assert "c2pa.actions.v2" in report.c2pa["assertions"]
        assert inspect(path).exit_code == VALID  # no trust list: signature and hashes checked, signer reported


def test_prompt_text_only_when_asked(chain, tmp_path):
    signed = _sign(chain, picture(64), include_prompt=True)
    assert PROMPT.encode() in signed
    (tmp_path / "p.png").write_bytes(signed)
    assert inspect(tmp_path / "p.png").bundle["claims"]["prompt"]["text"] == PROMPT


def test_tampered_untrusted_mismatched_and_absent(chain, tmp_path):
    _, _, root = chain
    img = picture(128)
    signed = _sign(chain, img)
    edited = np.asarray(Image.open(io.BytesIO(signed))).copy()
    edited[10:20, 10:20] = 0  # an edit that kept the credentials
    (tmp_path / "edited.png").write_bytes(png_with_store_of(signed, edited))
    report = inspect(tmp_path / "edited.png")
    assert report.exit_code == TAMPERED and "assertion.dataHash.mismatch" in report.c2pa["failures"]

    other_root = make_chain(tmp_path, name="someone else")[2]
    (tmp_path / "ok.png").write_bytes(signed)
    assert inspect(tmp_path / "ok.png", trust_anchors=other_root).exit_code == UNTRUSTED

    (tmp_path / "mismatch.png").write_bytes(_sign(chain, img, mark_digest="9a" * 32))
    report = inspect(tmp_path / "mismatch.png", trust_anchors=root)
    assert report.exit_code == TAMPERED and any("names bundle" in r for r in report.reasons)

    (tmp_path / "plain.png").write_bytes(encode_image(img, "png"))
    assert inspect(tmp_path / "plain.png").exit_code == ABSENT
    (tmp_path / "mark-only.jpg").write_bytes(encode_image(jpeg(wm.embed(img, wm.payload(DIGEST)), 75), "jpeg"))
    only = inspect(tmp_path / "mark-only.jpg")  # the C2PA store is gone (re-encoded), the watermark is not
    assert only.exit_code == VALID and only.c2pa is None and only.bundle["manifest_sha256_prefix"] == DIGEST[:12]


def test_certificates_c2pa_refuses_are_named(tmp_path):
    pytest.importorskip("c2pa")
    for kind, kw, words in (("self", dict(self_signed_leaf=True), "self-signed"),
                            ("noeku", dict(leaf_eku=False), "extended key usage")):
        folder = tmp_path / kind
        folder.mkdir()
        cert, key, _ = make_chain(folder, **kw)
        with pytest.raises(BadInput, match=words) as err:
            Stamper.load(C2paConfig(cert, key), identity())
        assert cert in str(err.value)
    cert, _, _ = make_chain(tmp_path / "self")
    other_key = make_chain(tmp_path / "noeku")[1]
    with pytest.raises(BadInput, match="is not the key of the certificate"):
        Stamper.load(C2paConfig(cert, other_key), identity())


# -- the bundle: embedding API, CLI, HTTP --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    from sdedge.runtime.pipeline import Pipeline

    p = Pipeline.load(tiny_bundle, verify="off", threads=1)
    yield p
    p.close()


def test_pipeline_marks_its_images_with_the_bundle_digest(pipe, tiny_bundle):
    from sdedge.runtime.pipeline import to_uint8

    digest = manifest_sha256(tiny_bundle)
    marked = pipe.generate("a red circle", steps=2, seed=3)
    assert marked.watermark == wm.payload(digest).hex()
    assert wm.detect(to_uint8(marked.images)[0]).digest_prefix == digest[:12]
    plain = pipe.generate("a red circle", steps=2, seed=3, watermark=False)
    assert plain.watermark is None and not wm.detect(to_uint8(plain.images)[0]).present
    assert psnr(to_uint8(marked.images), to_uint8(plain.images)) >= 38.0


@pytest.mark.slow
def test_cli_generate_signs_and_provenance_reports(tiny_bundle, chain, tmp_path):
    cert, key, root = chain
    out = tmp_path / "img.jpg"
    r = run_cli("generate", str(tiny_bundle), PROMPT, "--steps", "2", "--seed", "5", "--out", str(out),
                "--verify", "off", "--c2pa-cert", cert, "--c2pa-key", key)
    assert r.returncode == 0, r.stderr[-2000:]
    data = out.read_bytes()
    assert metadata_blocks(data) == ["APP0", "APP11"] and PROMPT.encode() not in data
    r = run_cli("provenance", str(out), "--json", "--trust-anchors", root, "--bundle", str(tiny_bundle))
    assert r.returncode == VALID, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "valid" and doc["bundle"]["matches"] == [str(tiny_bundle)]
    assert doc["bundle"]["claims"]["settings"]["seed"] == 5 and doc["c2pa"]["state"] == "Trusted"
    assert doc["bundle"]["manifest_sha256"] == manifest_sha256(tiny_bundle)
    r = run_cli("provenance", str(out))
    assert r.returncode == VALID and "made by bundle sha256" in r.stderr

    plain = tmp_path / "plain.png"
    r = run_cli("generate", str(tiny_bundle), "x", "--steps", "1", "--out", str(plain), "--verify", "off",
                "--no-watermark")
    assert r.returncode == 0 and metadata_blocks(plain.read_bytes()) == []
    assert run_cli("provenance", str(plain)).returncode == ABSENT
    r = run_cli("generate", str(tiny_bundle), "x", "--out", str(tmp_path / "x.png"), "--c2pa-cert", cert)
    assert r.returncode == 2 and "--c2pa-key" in r.stderr
    r = run_cli("generate", str(tiny_bundle), "x", "--out", str(tmp_path / "x.gif"))
    assert r.returncode == 2 and ".png" in r.stderr


def test_http_api_returns_signed_marked_pngs(pipe, tiny_bundle, chain, tmp_path):
    pytest.importorskip("fastapi")
    from test_server import ThreadServer

    from sdedge.runtime.server import ServeSettings, create_app

    cert, key, root = chain
    settings = ServeSettings(allow_unsigned=True, c2pa=C2paConfig(cert, key))
    with ThreadServer(create_app(pipe, settings)) as srv, srv.client() as client:
        r = client.post("/v1/generate", json={"prompt": PROMPT, "steps": 2, "seed": 11})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert metadata_blocks(r.content) == ["caBX"] and PROMPT.encode() not in r.content
    (tmp_path / "api.png").write_bytes(r.content)
    report = inspect(tmp_path / "api.png", trust_anchors=root)
    assert report.exit_code == VALID and report.bundle["claims"]["settings"]["seed"] == 11
    assert report.watermark["present"]
    assert report.bundle["claims"]["watermark"]["payload"] == wm.payload(manifest_sha256(tiny_bundle)).hex()


def test_a_signed_bundle_names_its_signer_in_the_manifest(tiny_bundle, chain, tmp_path):
    import shutil

    from sdedge.export.signing import keygen, sign
    from sdedge.runtime.pipeline import Pipeline
    from sdedge.runtime.provenance import bundle_identity

    signed = tmp_path / "signed"
    shutil.copytree(tiny_bundle, signed)
    keys = keygen(tmp_path / "k")
    sign(signed, key=keys.private)
    pipe = Pipeline.load(signed, verify="required", public_key=keys.public, threads=1)
    try:
        who = bundle_identity(pipe)
        assert who.manifest_sha256 == manifest_sha256(signed) and who.signer["fingerprint"] == keys.fingerprint
        result = pipe.generate("a red circle", steps=1, seed=1)
        cert, key, root = chain
        stamper = Stamper.load(C2paConfig(cert, key), who)
        from sdedge.runtime.provenance import encode_outputs

        (tmp_path / "s.png").write_bytes(encode_outputs(result, "png", stamper, "a red circle")[0])
    finally:
        pipe.close()
    claims = inspect(tmp_path / "s.png", trust_anchors=root).bundle["claims"]
    assert claims["bundle"]["signer"]["method"] == "key"
    assert claims["bundle"]["signer"]["fingerprint"] == keys.fingerprint


def test_serve_options_reach_the_server_settings():
    from sdedge.cli import build_parser
    from sdedge.cli_serve import settings_from_args

    args = build_parser().parse_args(["serve", "b/", "--allow-unsigned", "--no-watermark", "--c2pa-cert", "c.pem",
                                      "--c2pa-key", "k.pem", "--c2pa-include-prompt"])
    s = settings_from_args(args)
    assert s.watermark is False and s.c2pa == C2paConfig("c.pem", "k.pem", include_prompt=True)
    assert settings_from_args(build_parser().parse_args(["serve", "b/", "--allow-unsigned"])).c2pa is None
