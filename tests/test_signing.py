"""Signed bundles: keygen, sign (key, certificate chain, Sigstore up to the network), verify, tamper refusals.

Real keys and real model-signing signatures throughout; the tiny bundle is exported once per session
(conftest.tiny_bundle) and copied before anything is changed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import inspect
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("model_signing", reason="the sign extra is not installed: pip install 'sdedge[sign]'")

from conftest import REPO  # noqa: E402
from cryptography import x509  # noqa: E402  (model_signing depends on cryptography)
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from sdedge.export.signing import SigningError, check_signable, keygen, sign  # noqa: E402
from sdedge.runtime.bundle import Bundle  # noqa: E402
from sdedge.runtime.errors import BundleError, MissingDependency, SdedgeError  # noqa: E402
from sdedge.runtime.manifest import MANIFEST_NAME, SIGNATURE_NAME  # noqa: E402
from sdedge.runtime.signing import (  # noqa: E402
    SignerInfo,
    UnsignedBundleWarning,
    check_signature,
    describe_signer,
    key_fingerprint,
    open_bundle,
    signer_info,
    verify_bundle,
)

# Every file of the exported tiny bundle (test_every_bundle_file_is_tampered checks this list is complete).
BUNDLE_FILES = [
    MANIFEST_NAME,
    "text_encoder/model.onnx",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "unet/model.onnx",
    "vae_decoder/model.onnx",
    "vae_encoder/model.onnx",
]


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("keys") / "a")


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("keys") / "b")


@pytest.fixture(scope="session")
def signed_bundle(tiny_bundle, keys, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signed") / "bundle"
    shutil.copytree(tiny_bundle, out)
    (out / SIGNATURE_NAME).unlink(missing_ok=True)
    sign(out, key=keys.private)
    return out


@pytest.fixture
def signed_copy(signed_bundle, tmp_path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(signed_bundle, out)
    return out


@pytest.fixture
def unsigned_copy(tiny_bundle, tmp_path) -> Path:
    out = tmp_path / "unsigned"
    shutil.copytree(tiny_bundle, out)
    (out / SIGNATURE_NAME).unlink(missing_ok=True)
    return out


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run `sdedge ...` in this process."""
    from sdedge import cli as main_cli

    rc = main_cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


def one_line(text: str) -> str:
    return " ".join(text.split())


def assert_refused(bundle: Path, keys, capsys, *needles: str) -> str:
    """verify_bundle and `sdedge verify` both refuse, naming what is in needles; returns the message."""
    with pytest.raises(BundleError) as exc:
        verify_bundle(bundle, public_key=keys.public)
    msg = str(exc.value)
    for n in needles:
        assert n in msg, msg
    rc, out = cli(capsys, "verify", str(bundle), "--public-key", str(keys.public))
    assert rc == 2, out
    assert "Traceback" not in out
    for n in needles:
        assert n in one_line(out), out
    return msg


# -- keys -----------------------------------------------------------------------------------------------------------
def test_keygen_writes_p256_pair_private_0600_and_refuses_overwrite(tmp_path, capsys):
    pair = keygen(tmp_path / "k")
    assert stat.S_IMODE(pair.private.stat().st_mode) == 0o600
    priv = serialization.load_pem_private_key(pair.private.read_bytes(), None)
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp256r1"
    der = priv.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pair.fingerprint == hashlib.sha256(der).hexdigest() == key_fingerprint(pair.public)
    before = pair.private.read_bytes()
    with pytest.raises(SigningError, match="already exists"):
        keygen(tmp_path / "k")
    assert pair.private.read_bytes() == before
    rc, out = cli(capsys, "keygen", "--out", str(tmp_path / "k"))
    assert rc == 2 and "already exists" in out and "Traceback" not in out
    rc, out = cli(capsys, "keygen", "--out", str(tmp_path / "k2"))
    assert rc == 0 and key_fingerprint(tmp_path / "k2" / "public.pem") in one_line(out)


def test_encrypted_key_signs_with_its_password(unsigned_copy, tmp_path):
    pair = keygen(tmp_path / "enc", password="correct horse")
    with pytest.raises(SigningError, match="password"):
        sign(unsigned_copy, key=pair.private)
    sign(unsigned_copy, key=pair.private, password="correct horse")
    assert verify_bundle(unsigned_copy, public_key=pair.public).fingerprint == pair.fingerprint


# -- a good signature -----------------------------------------------------------------------------------------------
def test_signed_bundle_verifies_and_ties_signature_to_manifest(signed_bundle, keys, capsys):
    info = verify_bundle(signed_bundle, public_key=keys.public)
    assert isinstance(info, SignerInfo) and info.method == "key"
    assert info.fingerprint == keys.fingerprint
    assert info.key_hint == keys.key_hint
    manifest = Bundle.open(signed_bundle).manifest
    raw = (signed_bundle / MANIFEST_NAME).read_bytes()
    assert info.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    assert dict(info.digests) == {MANIFEST_NAME: info.manifest_sha256,
                                  **{rel: e.sha256 for rel, e in manifest.files.items()}}
    assert info.manifest == manifest
    rc, out = cli(capsys, "verify", str(signed_bundle), "--public-key", str(keys.public))
    assert rc == 0 and "signature OK" in out and keys.fingerprint in one_line(out)
    rc, out = cli(capsys, "verify", str(signed_bundle), "--public-key", str(keys.public), "--json")
    assert rc == 0 and json.loads(out)["fingerprint"] == keys.fingerprint


def test_signer_info_without_verifying(signed_bundle, unsigned_copy, keys):
    info = signer_info(signed_bundle)
    assert info["method"] == "key" and info["key_hint"] == keys.key_hint and info["verified"] is False
    assert info["signed_files"] == len(BUNDLE_FILES)
    assert keys.key_hint in describe_signer(info)
    assert signer_info(unsigned_copy) is None and describe_signer(None) == "unsigned"


def test_model_signing_cli_accepts_our_signature(signed_bundle, keys):
    exe = Path(sys.executable).parent / "model_signing"
    if not exe.exists():
        pytest.skip("the model_signing console script is not installed next to this Python")
    r = subprocess.run([str(exe), "verify", "key", "--signature", str(signed_bundle / SIGNATURE_NAME),
                        "--public_key", str(keys.public), str(signed_bundle)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Verification succeeded" in r.stdout + r.stderr


# -- tampering -------------------------------------------------------------------------------------------------------
def test_every_bundle_file_is_tampered(signed_bundle):
    on_disk = sorted(p.relative_to(signed_bundle).as_posix() for p in signed_bundle.rglob("*")
                     if p.is_file() and p.name != SIGNATURE_NAME)
    assert on_disk == sorted(BUNDLE_FILES), "update BUNDLE_FILES so that every file is tampered with"


@pytest.mark.parametrize("rel", BUNDLE_FILES)
def test_one_byte_flipped_is_refused_naming_the_file(signed_copy, keys, capsys, rel):
    flip_byte(signed_copy / rel)
    assert_refused(signed_copy, keys, capsys, rel, "changed since it was signed", "(1 difference)")
    with pytest.raises(BundleError, match=rel.replace(".", r"\.")):
        check_signature(signed_copy, "if-signed", public_key=keys.public)


def test_file_added_is_refused(signed_copy, keys, capsys):
    (signed_copy / "unet" / "extra.bin").write_bytes(b"junk")
    assert_refused(signed_copy, keys, capsys, "unet/extra.bin", "added after signing")


def test_file_removed_is_refused(signed_copy, keys, capsys):
    (signed_copy / "vae_encoder" / "model.onnx").unlink()
    assert_refused(signed_copy, keys, capsys, "vae_encoder/model.onnx", "missing")


def test_file_renamed_is_refused(signed_copy, keys, capsys):
    (signed_copy / "unet" / "model.onnx").rename(signed_copy / "unet" / "model2.onnx")
    assert_refused(signed_copy, keys, capsys, "unet/model.onnx", "renamed to unet/model2.onnx")


def test_symlink_is_refused(signed_copy, keys, capsys):
    (signed_copy / "vae_decoder" / "model.onnx").rename(signed_copy / "elsewhere.onnx")
    (signed_copy / "vae_decoder" / "model.onnx").symlink_to(signed_copy / "elsewhere.onnx")
    assert_refused(signed_copy, keys, capsys, "vae_decoder/model.onnx", "symbolic link")


def test_truncated_signature_is_refused(signed_copy, keys, capsys):
    sig = signed_copy / SIGNATURE_NAME
    sig.write_bytes(sig.read_bytes()[: sig.stat().st_size // 2])
    assert_refused(signed_copy, keys, capsys, SIGNATURE_NAME, "truncated or corrupt")


def test_signed_with_another_key_is_refused(signed_copy, keys, other_keys, capsys):
    sign(signed_copy, key=other_keys.private)
    msg = assert_refused(signed_copy, keys, capsys, SIGNATURE_NAME, "does not verify with the public key")
    assert "another key" in msg and other_keys.key_hint in msg
    assert verify_bundle(signed_copy, public_key=other_keys.public).fingerprint == other_keys.fingerprint


def test_forged_signature_bytes_are_refused(signed_copy, keys, capsys):
    sig_path = signed_copy / SIGNATURE_NAME
    doc = json.loads(sig_path.read_text())
    raw = bytearray(base64.b64decode(doc["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[-1] ^= 0x01
    doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    sig_path.write_text(json.dumps(doc))
    assert_refused(signed_copy, keys, capsys, SIGNATURE_NAME, "does not verify with the public key")


def test_manifest_edited_is_refused(signed_copy, keys, capsys):
    path = signed_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["defaults"]["steps"] = data["defaults"]["steps"] + 1  # still a valid manifest
    path.write_text(json.dumps(data, indent=2))
    Bundle.open(signed_copy)  # the runtime's own checks pass: only the signature catches this edit
    assert_refused(signed_copy, keys, capsys, MANIFEST_NAME, "changed since it was signed")


def test_manifest_and_file_swapped_consistently_is_refused(signed_copy, keys, capsys):
    """An attacker who replaces a model AND updates sdedge.json's digest for it still fails on sdedge.json."""
    from sdedge.runtime.bundle import sha256_file

    rel = "vae_decoder/model.onnx"
    flip_byte(signed_copy / rel)
    path = signed_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["files"][rel]["sha256"] = sha256_file(signed_copy / rel)
    path.write_text(json.dumps(data, indent=2))
    Bundle(signed_copy, Bundle.open(signed_copy).manifest).read(rel)  # consistent with the edited manifest
    assert_refused(signed_copy, keys, capsys, MANIFEST_NAME, rel)


def test_cli_verify_subprocess_exit_2_without_traceback(signed_copy, keys):
    flip_byte(signed_copy / "unet" / "model.onnx")
    r = subprocess.run([sys.executable, "-m", "sdedge", "verify", str(signed_copy), "--public-key",
                        str(keys.public)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "unet/model.onnx" in one_line(r.stderr)


# -- signing refuses junk ------------------------------------------------------------------------------------------
def test_sign_refuses_extra_file_and_names_it(unsigned_copy, keys, capsys):
    (unsigned_copy / "notes.txt").write_text("hello")
    with pytest.raises(BundleError, match="notes.txt: not listed in sdedge.json"):
        sign(unsigned_copy, key=keys.private)
    assert not (unsigned_copy / SIGNATURE_NAME).exists()
    rc, out = cli(capsys, "sign", str(unsigned_copy), "--key", str(keys.private))
    assert rc == 2 and "notes.txt" in out and "Traceback" not in out


def test_sign_refuses_a_bundle_that_does_not_match_its_manifest(unsigned_copy, keys):
    flip_byte(unsigned_copy / "unet" / "model.onnx")
    with pytest.raises(BundleError, match=r"unet/model\.onnx: SHA-256 differs"):
        sign(unsigned_copy, key=keys.private)
    assert not (unsigned_copy / SIGNATURE_NAME).exists()
    assert check_signable.__doc__


def test_sign_replaces_signature_atomically_and_leaves_no_temp(signed_copy, other_keys):
    sign(signed_copy, key=other_keys.private)
    leftovers = [p.name for p in signed_copy.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    assert signer_info(signed_copy)["key_hint"] == other_keys.key_hint


def test_sign_needs_a_method(unsigned_copy, keys):
    with pytest.raises(SigningError, match="say how to sign"):
        sign(unsigned_copy)
    with pytest.raises(SigningError, match="--certificate needs --key"):
        sign(unsigned_copy, certificate=keys.public)


# -- certificates ----------------------------------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sdedge tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject_cn, subject_key, issuer_cn, issuer_key, *, ca: bool, path_len=None):
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject_cn)).issuer_name(_name(issuer_cn))
         .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """root CA → intermediate CA → leaf (code signing), plus an unrelated root."""
    d = tmp_path_factory.mktemp("pki")
    root_key, inter_key, leaf_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    root = _cert("sdedge test root", root_key, "sdedge test root", root_key, ca=True, path_len=1)
    inter = _cert("sdedge test intermediate", inter_key, "sdedge test root", root_key, ca=True, path_len=0)
    leaf = _cert("release-signer", leaf_key, "sdedge test intermediate", inter_key, ca=False)
    rogue = _cert("rogue root", rogue_key, "rogue root", rogue_key, ca=True, path_len=1)
    pem = serialization.Encoding.PEM
    for name, c in (("root", root), ("inter", inter), ("leaf", leaf), ("rogue", rogue)):
        (d / f"{name}.pem").write_bytes(c.public_bytes(pem))
    (d / "leaf-key.pem").write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    der = leaf_key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    return d, hashlib.sha256(der).hexdigest()


def test_certificate_chain_signature_verifies(unsigned_copy, pki, keys, capsys):
    d, leaf_fp = pki
    rc, out = cli(capsys, "sign", str(unsigned_copy), "--certificate", str(d / "leaf.pem"), "--certificate-chain",
                  str(d / "inter.pem"), "--key", str(d / "leaf-key.pem"))
    assert rc == 0, out
    info = verify_bundle(unsigned_copy, certificate_chain=[d / "root.pem"])
    assert info.method == "certificate" and "CN=release-signer" in info.subject
    assert info.fingerprint == leaf_fp and "intermediate" in info.issuer
    assert signer_info(unsigned_copy)["subject"] == info.subject
    rc, out = cli(capsys, "verify", str(unsigned_copy), "--certificate-chain", str(d / "root.pem"))
    assert rc == 0 and "release-signer" in out
    # an unrelated CA does not vouch for it
    with pytest.raises(BundleError, match="does not verify against the given certificate chain"):
        verify_bundle(unsigned_copy, certificate_chain=[d / "rogue.pem"])
    # a key verifier is pointed at the right method
    with pytest.raises(BundleError, match="signed with a certificate"):
        verify_bundle(unsigned_copy, public_key=keys.public)
    # tampering is named as with keys
    flip_byte(unsigned_copy / "tokenizer" / "tokenizer.json")
    with pytest.raises(BundleError, match=r"tokenizer/tokenizer\.json: changed"):
        verify_bundle(unsigned_copy, certificate_chain=[d / "root.pem"])


def test_certificate_must_match_the_key(unsigned_copy, pki, keys):
    d, _ = pki
    with pytest.raises(SigningError, match="not for this private key"):
        sign(unsigned_copy, key=keys.private, certificate=d / "leaf.pem", certificate_chain=[d / "inter.pem"])


# -- Sigstore keyless, up to the network boundary ------------------------------------------------------------------
AMBIENT = ("ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN", "GITHUB_ACTIONS",
           "GOOGLE_SERVICE_ACCOUNT_NAME", "BUILDKITE", "GITLAB_CI", "CIRCLECI", "SIGSTORE_ID_TOKEN")


def _fake_oidc_token() -> str:
    import jwt  # pyjwt, a sigstore dependency

    now = int(time.time())
    claims = {"iss": "https://oauth2.sigstore.dev/auth", "aud": "sigstore", "sub": "tester", "email": "me@example.com",
              "email_verified": True, "iat": now, "nbf": now, "exp": now + 600}
    return jwt.encode(claims, "not-a-real-secret-0123456789abcdef", algorithm="HS256")


def test_sigstore_without_oidc_identity_is_a_clear_error(unsigned_copy, monkeypatch, capsys):
    for name in AMBIENT:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SigningError, match="OIDC identity token"):
        sign(unsigned_copy, sigstore=True, interactive=False)
    rc, out = cli(capsys, "sign", str(unsigned_copy), "--sigstore")  # stdin is not a terminal under pytest
    assert rc == 2 and "OIDC" in out and "Traceback" not in out
    assert not (unsigned_copy / SIGNATURE_NAME).exists()


def test_sigstore_with_token_but_no_network_fails_fast_and_names_it(unsigned_copy, monkeypatch, capsys):
    for name in AMBIENT:
        monkeypatch.delenv(name, raising=False)
    t0 = time.monotonic()
    with pytest.raises(SigningError) as exc:
        sign(unsigned_copy, sigstore=True, identity_token=_fake_oidc_token(), timeout=20)
    assert time.monotonic() - t0 < 40
    msg = str(exc.value)
    assert "Sigstore" in msg and any(w in msg for w in ("network", "TUF", "no answer", "OIDC")), msg
    assert not (unsigned_copy / SIGNATURE_NAME).exists()
    assert not [p for p in unsigned_copy.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setenv("SIGSTORE_ID_TOKEN", _fake_oidc_token())
    rc, out = cli(capsys, "sign", str(unsigned_copy), "--sigstore", "--timeout", "20")
    assert rc == 2 and "Sigstore" in out and "Traceback" not in out


def test_sigstore_rejects_a_malformed_token(unsigned_copy):
    with pytest.raises(SigningError, match="OIDC identity token is unusable"):
        sign(unsigned_copy, sigstore=True, identity_token="not.a.jwt")


def test_signer_info_reads_a_sigstore_certificate(signed_copy, keys):
    """The identity/issuer parsing `sdedge info` uses for keyless signatures (a Fulcio-shaped certificate)."""
    k = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    issuer_url = "https://token.actions.githubusercontent.com"
    identity = "https://github.com/acme/models/.github/workflows/release.yml@refs/tags/v1.0"
    der_issuer = b"\x0c" + bytes([len(issuer_url)]) + issuer_url.encode()
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(_name("sigstore-intermediate"))
            .public_key(k.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(minutes=10))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8"), der_issuer),
                           critical=False)
            .sign(k, hashes.SHA256()))
    sig_path = signed_copy / SIGNATURE_NAME
    doc = json.loads(sig_path.read_text())
    doc["verificationMaterial"] = {"certificate": {"rawBytes": base64.b64encode(
        cert.public_bytes(serialization.Encoding.DER)).decode()}, "tlogEntries": []}
    sig_path.write_text(json.dumps(doc))
    info = signer_info(signed_copy)
    assert info["method"] == "sigstore" and info["identity"] == identity and info["issuer"] == issuer_url
    assert identity in describe_signer(info)
    with pytest.raises(BundleError, match="signed with a sigstore"):
        verify_bundle(signed_copy, public_key=keys.public)


# -- the runtime policy --------------------------------------------------------------------------------------------
def test_check_signature_policies(signed_bundle, unsigned_copy, keys, other_keys):
    with pytest.raises(BundleError, match="unsigned bundle"):
        check_signature(unsigned_copy, "required", public_key=keys.public)
    with pytest.warns(UnsignedBundleWarning, match="unsigned bundle"):
        assert check_signature(unsigned_copy, "if-signed") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_signature(unsigned_copy, "off") is None
        assert check_signature(signed_bundle, "if-signed", public_key=keys.public).fingerprint == keys.fingerprint
        assert check_signature(signed_bundle, "required", public_key=keys.public).method == "key"
    with pytest.raises(BundleError, match="needs something to verify"):
        check_signature(signed_bundle, "required")
    with pytest.warns(UnsignedBundleWarning, match="not checked"):
        assert check_signature(signed_bundle, "if-signed") is None
    with pytest.raises(BundleError, match="does not verify"):
        check_signature(signed_bundle, "if-signed", public_key=other_keys.public)
    with pytest.raises(SdedgeError, match="choose one of"):
        check_signature(signed_bundle, "sometimes")


def test_missing_model_signing_is_a_missing_dependency(signed_bundle, unsigned_copy, keys, monkeypatch):
    monkeypatch.setitem(sys.modules, "model_signing", None)
    with pytest.raises(MissingDependency, match="pip install"):
        check_signature(signed_bundle, "required", public_key=keys.public)
    with pytest.warns(UnsignedBundleWarning):  # nothing to check: no need for the package
        check_signature(unsigned_copy, "if-signed")


def test_open_bundle_loads_the_verified_bytes(signed_copy, keys):
    """The Bundle's manifest comes from the verified sdedge.json bytes, and every read is checked against a
    signed digest: a file swapped after verification is refused when it is loaded."""
    bundle, signer = open_bundle(signed_copy, "required", public_key=keys.public)
    assert bundle.manifest is signer.manifest
    (signed_copy / MANIFEST_NAME).write_text("{}")  # swapped after verification: never re-read
    assert bundle.manifest.files["unet/model.onnx"].sha256 == signer.digests["unet/model.onnx"]
    bundle.read("unet/model.onnx")
    flip_byte(signed_copy / "unet" / "model.onnx")  # swapped between verification and load
    with pytest.raises(BundleError, match=r"unet/model\.onnx: SHA-256 differs"):
        bundle.read("unet/model.onnx")


def test_pipeline_load_refuses_tampered_bundle(signed_copy, keys):
    from sdedge.runtime.pipeline import Pipeline

    if "verify" not in inspect.signature(Pipeline.load).parameters:
        pytest.skip("Pipeline.load has no verify= parameter yet")
    flip_byte(signed_copy / "text_encoder" / "model.onnx")
    with pytest.raises(BundleError, match=r"text_encoder/model\.onnx"):
        Pipeline.load(signed_copy, verify="required", public_key=str(keys.public))


def test_runtime_signing_verifies_without_torch(signed_bundle, keys):
    code = (
        "import sys\n"
        "from sdedge.runtime.signing import verify_bundle, signer_info\n"
        f"info = verify_bundle({str(signed_bundle)!r}, public_key={str(keys.public)!r})\n"
        "assert info.method == 'key'\n"
        f"assert signer_info({str(signed_bundle)!r})['method'] == 'key'\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'onnx'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
