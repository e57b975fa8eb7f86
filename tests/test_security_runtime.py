"""Issue 18, the runtime's trust holes: a key given means verify (1), caches bound to the verified model (2),
external data kept inside the signed bundle with no check-then-open window (3), hostile documents fail closed (9).

Real keys, real model-signing signatures, real ONNX Runtime and OpenVINO sessions on the tiny bundle, and real
tampered graphs that would give different outputs if they ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_cli
from onnx import TensorProto, helper

from sdedge.runtime.backends import ort_cache
from sdedge.runtime.backends.onnxruntime import OrtEngine
from sdedge.runtime.bundle import Bundle
from sdedge.runtime.errors import BundleError, SdedgeError
from sdedge.runtime.manifest import MANIFEST_NAME, SIGNATURE_NAME, read_manifest

CPU = ["CPUExecutionProvider"]
VAE = "vae_decoder"
LATENT = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)  # (B, 4, H/8, W/8)


# -- helpers -------------------------------------------------------------------------------------------------------
def _copy(tiny_bundle, tmp_path, name="bundle") -> Path:
    out = tmp_path / name
    shutil.copytree(tiny_bundle, out)
    (out / SIGNATURE_NAME).unlink(missing_ok=True)
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _relist(bundle_dir: Path, external: dict[str, tuple[str, ...]] | None = None) -> None:
    """Rewrite sdedge.json's `files` table from the folder (and components' external_data), as a bundle author
    (or an attacker of an unsigned bundle) would."""
    path = bundle_dir / MANIFEST_NAME
    doc = json.loads(path.read_text())
    files = {}
    for p in sorted(bundle_dir.rglob("*")):
        rel = p.relative_to(bundle_dir).as_posix()
        if p.is_file() and not p.is_symlink() and rel not in (MANIFEST_NAME, SIGNATURE_NAME):
            files[rel] = {"sha256": _sha(p.read_bytes()), "bytes": p.stat().st_size}
    for name, ext in (external or {}).items():
        doc["components"][name]["external_data"] = list(ext)
        for rel in ext:
            p = bundle_dir / rel
            if rel not in files:  # a symbolic link: listed by what it points to
                files[rel] = {"sha256": _sha(p.read_bytes()), "bytes": p.stat().st_size}
    doc["files"] = files
    path.write_text(json.dumps(doc, indent=2))


def _engine(bundle_dir, cache=None, name=VAE, **kw) -> OrtEngine:
    bundle = Bundle.open(bundle_dir)
    return OrtEngine(bundle, name, bundle.manifest.components[name], CPU, threads=1, cache_dir=cache, **kw)


def _run(engine) -> np.ndarray:
    engine.load()
    try:
        return engine.infer({"latent_sample": LATENT})[0]
    finally:
        engine.unload()


def _constant_graph(value: float = 42.0) -> bytes:
    """A real ONNX graph with the VAE decoder's input name whose output is `value` everywhere: what an attacker
    would put in a cache to replace the verified model."""
    x = helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["b", 4, "h", "w"])
    y = helper.make_tensor_value_info("sample", TensorProto.FLOAT, None)
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    const = helper.make_tensor("const", TensorProto.FLOAT, [], [value])
    nodes = [helper.make_node("Mul", ["latent_sample", "zero"], ["z"]), helper.make_node("Add", ["z", "const"], ["sample"])]
    graph = helper.make_graph(nodes, "forged", [x], [y], [zero, const])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def reference(tiny_bundle) -> np.ndarray:
    return _run(_engine(tiny_bundle))


# -- 1. a key given means verify --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    pytest.importorskip("model_signing", reason="the sign extra is not installed")
    from sdedge.export.signing import keygen

    return keygen(tmp_path_factory.mktemp("keys") / "k")


@pytest.fixture()
def stripped(tiny_bundle, keys, tmp_path) -> Path:
    """A bundle that was signed, then had model.sig deleted and its UNet swapped (sdedge.json rewritten to match)."""
    from sdedge.export.signing import sign

    out = _copy(tiny_bundle, tmp_path)
    sign(out, key=keys.private)
    (out / SIGNATURE_NAME).unlink()
    shutil.copy(out / "vae_decoder" / "model.onnx", out / "unet" / "model.onnx")
    _relist(out)
    return out


def test_key_given_refuses_an_unsigned_bundle_in_pipeline_load(stripped, keys):
    from sdedge.runtime.pipeline import Pipeline
    from sdedge.runtime.signing import open_bundle

    for call in (lambda: Pipeline.load(stripped, public_key=keys.public),
                 lambda: open_bundle(stripped, public_key=keys.public),
                 lambda: open_bundle(stripped, "if-signed", identity="me@example.com", issuer="https://x")):
        with pytest.raises(BundleError, match=r"model\.sig: missing .*must verify"):
            call()
    with pytest.raises(SdedgeError, match="verify='off' but a public key"):
        open_bundle(stripped, "off", public_key=keys.public)


def test_key_given_refuses_an_unsigned_bundle_in_serve(stripped, keys):
    pytest.importorskip("fastapi")
    from sdedge.runtime.server import ServeSettings, load_pipeline

    with pytest.raises(BundleError, match=r"model\.sig: missing"):
        load_pipeline(stripped, ServeSettings(allow_unsigned=True, public_key=str(keys.public)))


def test_key_given_refuses_an_unsigned_bundle_in_the_cli(stripped, keys, tmp_path):
    r = run_cli("generate", str(stripped), "a red circle", "--public-key", str(keys.public), "--steps", "1",
                "--out", str(tmp_path / "x.png"), timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{stripped / SIGNATURE_NAME}: missing" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_key_given_refuses_an_unsigned_bundle_in_bench(stripped, keys, tmp_path):
    r = run_cli("bench", str(stripped), "--public-key", str(keys.public), "--inline", "--runs", "1", "--warmup", "0",
                "--steps", "1", "--size", "64", "--no-progress", "--out", str(tmp_path / "report"), timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{stripped / SIGNATURE_NAME}: missing" in r.stdout + r.stderr and "Traceback" not in r.stderr


# -- 2. caches cannot replace what was verified ----------------------------------------------------------------------
def _entry_files(cache: Path, name=VAE) -> tuple[Path, Path]:
    model = next(cache.glob(f"{name}-*.onnx"))
    return model, model.with_suffix(".json")


def _forge(model: Path, sidecar: Path, graph: bytes) -> None:
    """Replace the cached graph and rewrite its record with the new file's SHA-256, in the old sidecar format and
    the new one's fields (the MAC cannot be computed without the user's cache key)."""
    model.write_bytes(graph)
    model.with_name(model.name + ".data").unlink(missing_ok=True)
    old = json.loads(sidecar.read_text())
    sha = _sha(graph)
    files = {model.name: {"sha256": sha, "bytes": len(graph)}}
    sidecar.write_text(json.dumps({"model": sha, "data": None, "for": old.get("for"), "files": files,
                                   "mac": "0" * 64}))


def test_forged_cache_entry_is_rebuilt_not_run(tiny_bundle, tmp_path, reference):
    cache = tmp_path / "cache"
    first = _engine(tiny_bundle, cache)
    np.testing.assert_array_equal(_run(first), reference)
    model, sidecar = _entry_files(cache)
    forged = _constant_graph()
    bad = ort.InferenceSession(forged, providers=CPU).run(None, {"latent_sample": LATENT})[0]
    assert np.all(bad == 42.0) and bad.shape != reference.shape  # it would change the output if it ran
    _forge(model, sidecar, forged)
    second = _engine(tiny_bundle, cache)
    out = _run(second)
    assert not second.cache_hit
    np.testing.assert_array_equal(out, reference)
    third = _engine(tiny_bundle, cache)  # the rebuild sealed a good entry again
    np.testing.assert_array_equal(_run(third), reference)
    assert third.cache_hit


def test_cache_swapped_between_check_and_load_is_not_run(tiny_bundle, tmp_path, reference, monkeypatch):
    cache = tmp_path / "cache"
    _run(_engine(tiny_bundle, cache))
    model, _ = _entry_files(cache)
    real = ort.InferenceSession

    def swapping(*args, **kw):  # the attacker wins the race: the file changes after it was checked
        model.write_bytes(_constant_graph())
        return real(*args, **kw)

    monkeypatch.setattr(ort, "InferenceSession", swapping)
    engine = _engine(tiny_bundle, cache)
    np.testing.assert_array_equal(_run(engine), reference)
    assert engine.cache_hit  # it ran the checked bytes it had read, not the swapped file


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_cache_root_writable_by_others_is_not_used(tiny_bundle, tmp_path, reference, caplog, mode):
    cache = tmp_path / "shared"
    cache.mkdir()
    os.chmod(cache, mode)
    engine = _engine(tiny_bundle, cache)
    with caplog.at_level(logging.WARNING, logger="sdedge.runtime"):
        np.testing.assert_array_equal(_run(engine), reference)
    assert not engine.cache_hit and not list(cache.iterdir())
    assert f"cache {cache} not used" in caplog.text and "writable by" in caplog.text


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
def test_cache_root_owned_by_another_user_is_not_used(tiny_bundle, tmp_path, reference, caplog):
    cache = tmp_path / "theirs"
    cache.mkdir(mode=0o755)
    os.chown(cache, 12345, 12345)
    engine = _engine(tiny_bundle, cache)
    with caplog.at_level(logging.WARNING, logger="sdedge.runtime"):
        np.testing.assert_array_equal(_run(engine), reference)
    assert not list(cache.iterdir()) and "owned by another user" in caplog.text


def test_cache_key_that_is_not_private_means_no_cache_not_a_failure(tiny_bundle, tmp_path, reference, caplog):
    cache = tmp_path / "cache"
    _run(_engine(tiny_bundle, cache))
    os.chmod(tmp_path / ort_cache.KEY_NAME, 0o644)  # readable by others: a record could be forged with it
    engine = _engine(tiny_bundle, cache)
    with caplog.at_level(logging.WARNING, logger="sdedge.runtime"):
        np.testing.assert_array_equal(_run(engine), reference)
    assert not engine.cache_hit and "not a private cache key" in caplog.text


def test_tensorrt_engine_folder_is_emptied_when_it_does_not_match_its_record(tmp_path):
    root = ort_cache.private_root(tmp_path / "trt")
    folder = ort_cache.prepare_folder(root, "unet-abc")
    (folder / "engine.plan").write_bytes(b"engine built by us")
    ort_cache.seal_folder(root, "unet-abc")
    assert (ort_cache.prepare_folder(root, "unet-abc") / "engine.plan").is_file()  # sealed: kept
    (folder / "engine.plan").write_bytes(b"engine built by someone else")
    assert not list(ort_cache.prepare_folder(root, "unet-abc").iterdir())  # changed: emptied, rebuilt
    (folder / "planted.plan").write_bytes(b"x")  # a file the record never listed
    assert not list(ort_cache.prepare_folder(root, "unet-abc").iterdir())


@pytest.mark.filterwarnings("ignore:Specified provider 'TensorrtExecutionProvider'")
def test_tensorrt_engines_built_while_running_are_sealed_and_kept(tiny_bundle, tmp_path, monkeypatch):
    """The engine's own bookkeeping around ONNX Runtime's TensorRT provider (here absent: ONNX Runtime runs the CPU
    provider and warns): an engine file that appears while running is sealed, kept by the next load, and
    thrown away once changed behind its back."""
    monkeypatch.setenv("SDEDGE_CACHE_DIR", str(tmp_path / "c"))
    providers = ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    bundle = Bundle.open(tiny_bundle)
    engine = OrtEngine(bundle, VAE, bundle.manifest.components[VAE], providers, threads=1)
    engine.load()
    folder = tmp_path / "c" / "onnxruntime-trt" / engine._trt_key()
    (folder / "TensorrtExecutionProvider_cache.engine").write_bytes(b"built while running")  # as TensorRT would
    engine.infer({"latent_sample": LATENT})  # no unload after it: as if the process were killed here
    again = OrtEngine(bundle, VAE, bundle.manifest.components[VAE], providers, threads=1)
    again.load()
    assert (folder / "TensorrtExecutionProvider_cache.engine").read_bytes() == b"built while running"
    again.unload()
    (folder / "TensorrtExecutionProvider_cache.engine").write_bytes(b"planted")
    OrtEngine(bundle, VAE, bundle.manifest.components[VAE], providers, threads=1).load()
    assert not (folder / "TensorrtExecutionProvider_cache.engine").exists()


def _ov_engine(bundle_dir, cache, name=VAE):
    from sdedge.runtime.backends.openvino import OvEngine

    bundle = Bundle.open(bundle_dir)
    return OvEngine(bundle, name, bundle.manifest.components[name], cache_dir=cache)


def _ov_run(engine):
    engine.load()
    try:
        return engine.infer({"latent_sample": LATENT})[0]
    finally:
        engine.unload()


def test_forged_openvino_blob_is_recompiled_not_imported(tiny_bundle, tmp_path):
    ov = pytest.importorskip("openvino")
    from sdedge.runtime.backends.openvino import core

    cache = tmp_path / "ov"
    first = _ov_engine(tiny_bundle, cache)
    good = _ov_run(first)
    blob = next(cache.glob(f"{VAE}-*.blob"))
    # a real compiled model with the same input, whose output is 42 everywhere
    x = ov.opset13.parameter(list(LATENT.shape), np.float32, name="latent_sample")
    y = ov.opset13.add(ov.opset13.multiply(x, np.float32(0)), np.float32(42))
    first.load()
    forged = core().compile_model(ov.Model([y], [x]), "CPU", first.config).export_model()
    forged = forged.getvalue() if hasattr(forged, "getvalue") else bytes(forged)
    assert np.all(core().import_model(forged, "CPU", first.config)({"latent_sample": LATENT})[0] == 42)
    blob.write_bytes(forged)
    blob.with_suffix(".sha256").write_text(_sha(forged) + "\n")  # the old sidecar, forged
    second = _ov_engine(tiny_bundle, cache)
    out = _ov_run(second)
    assert second.cache_hits == 0 and second.compiles == 1
    np.testing.assert_allclose(out, good, atol=1e-5)


# -- 3. external data stays inside the signed bundle ------------------------------------------------------------------
DATA = "vae_decoder/model.onnx.data"


def _externalise(bundle_dir: Path, location: str = "model.onnx.data", write_to: Path | None = None,
                 listed: tuple[str, ...] = (DATA,)) -> None:
    """Re-save the VAE decoder with its weights in an external file named `location` (written at `write_to`,
    default beside the model), then relist the manifest with `listed` as the component's external data."""
    src = bundle_dir / "vae_decoder" / "model.onnx"
    model = onnx.load(str(src))
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    if location != "model.onnx.data" or write_to is not None:
        model = onnx.load(str(src), load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        src.write_bytes(model.SerializeToString())
        if write_to is not None:
            write_to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(bundle_dir / DATA, write_to)
    _relist(bundle_dir, {VAE: listed})


def test_external_data_loads_from_the_checked_bytes(tiny_bundle, tmp_path, reference):
    out = _copy(tiny_bundle, tmp_path)
    _externalise(out)
    np.testing.assert_allclose(_run(_engine(out)), reference, atol=1e-6)


def test_external_data_swapped_between_check_and_load_is_not_run(tiny_bundle, tmp_path, reference, monkeypatch):
    out = _copy(tiny_bundle, tmp_path)
    _externalise(out)
    data = out / DATA
    zeros = bytes(data.stat().st_size)
    real = ort.InferenceSession
    swaps = []

    def swapping(*args, **kw):  # after the check, before the engine reads: the weights become zeros
        data.write_bytes(zeros)
        swaps.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(ort, "InferenceSession", swapping)
    engine = _engine(out, low_memory=True)
    np.testing.assert_allclose(_run(engine), reference, atol=1e-6)
    assert swaps
    # memory="low" loads again for the next request: the swapped file is now refused, never run
    with pytest.raises(BundleError, match=r"model\.onnx\.data: SHA-256 differs"):
        engine.load()


@pytest.mark.parametrize("location,why", [
    ("/etc/passwd", "not a plain relative path"),
    ("../unet/model.onnx", "not a plain relative path"),
    ("./model.onnx.data", "not a plain relative path"),
    ("other.data", "not one of the files the manifest lists"),
])
def test_external_location_outside_the_component_is_refused_before_any_session(
        tiny_bundle, tmp_path, monkeypatch, location, why):
    out = _copy(tiny_bundle, tmp_path)
    write_to = out / "vae_decoder" / "other.data" if location == "other.data" else None
    _externalise(out, location, write_to=write_to)

    def no_session(*args, **kw):
        raise AssertionError("a session was created for a model with a bad external location")

    monkeypatch.setattr(ort, "InferenceSession", no_session)
    with pytest.raises(BundleError, match=why) as err:
        _engine(out).load()
    assert "vae_decoder/model.onnx" in str(err.value) and repr(location) in str(err.value)


def test_external_data_listed_for_another_component_is_refused(tiny_bundle, tmp_path, monkeypatch):
    out = _copy(tiny_bundle, tmp_path)
    _externalise(out, listed=())
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: pytest.fail("session created"))
    with pytest.raises(BundleError, match="external_data: none"):
        _engine(out).load()


def test_external_data_through_a_symbolic_link_is_refused(tiny_bundle, tmp_path, monkeypatch):
    out = _copy(tiny_bundle, tmp_path)
    _externalise(out)
    outside = tmp_path / "elsewhere.data"
    shutil.move(out / DATA, outside)
    (out / DATA).symlink_to(outside)
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: pytest.fail("session created"))
    with pytest.raises(BundleError, match="symbolic link"):
        _engine(out).load()


def test_openvino_reads_external_data_from_the_checked_bytes(tiny_bundle, tmp_path, reference):
    pytest.importorskip("openvino")
    out = _copy(tiny_bundle, tmp_path)
    _externalise(out)
    np.testing.assert_allclose(_ov_run(_ov_engine(out, None)), reference, atol=1e-4)
    bad = _copy(tiny_bundle, tmp_path, "bad")
    _externalise(bad, "../unet/model.onnx")
    with pytest.raises(BundleError, match="not a plain relative path"):
        _ov_run(_ov_engine(bad, None))


# -- 9. hostile documents fail closed ---------------------------------------------------------------------------------
def _manifest_doc(tiny_bundle) -> dict:
    return json.loads((tiny_bundle / MANIFEST_NAME).read_text())


@pytest.mark.parametrize("case,why", [("deep", "nested too deeply"), ("long-int", "not valid JSON"),
                                      ("infinity", "overflows to infinity"), ("nan", "NaN is not a JSON number"),
                                      ("huge", "over 16777216 bytes"), ("wrong-type", "expected str"),
                                      ("not-utf8", "not valid JSON")])
def test_hostile_manifest_is_a_clear_error(tiny_bundle, tmp_path, case, why):
    out = tmp_path / "b"
    out.mkdir()
    doc = _manifest_doc(tiny_bundle)
    if case == "deep":
        raw = b'{"format_version": 1, "scheduler": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    elif case in ("long-int", "infinity", "nan"):
        section, key, text = {"long-int": ("shapes", "batch_max", "1" + "0" * 5000),
                              "infinity": ("defaults", "guidance", "1e999"),
                              "nan": ("latent", "scaling_factor", "NaN")}[case]
        doc[section][key] = "@VALUE@"
        raw = json.dumps(doc).replace('"@VALUE@"', text).encode()
    elif case == "huge":
        raw = json.dumps(doc).encode() + b" " * (17 << 20)
    elif case == "wrong-type":
        doc["files"] = {"unet/model.onnx": {"sha256": ["x"], "bytes": "12"}}
        raw = json.dumps(doc).encode()
    else:
        raw = b'{"format_version": 1, "pipeline": "\xff\xfe"}'
    (out / MANIFEST_NAME).write_bytes(raw)
    with pytest.raises(BundleError, match=str(out / MANIFEST_NAME).replace(".", r"\.")) as err:
        read_manifest(out)
    assert why in str(err.value)
    if case in ("deep", "long-int"):
        r = run_cli("info", str(out), timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr and MANIFEST_NAME in r.stderr, r.stderr


def _sig(tmp_path, doc_or_raw) -> Path:
    out = tmp_path / "b"
    out.mkdir(exist_ok=True)
    raw = doc_or_raw if isinstance(doc_or_raw, bytes) else json.dumps(doc_or_raw).encode()
    (out / SIGNATURE_NAME).write_bytes(raw)
    return out


def _envelope(statement) -> dict:
    import base64

    payload = base64.b64encode(json.dumps(statement).encode()).decode()
    return {"verificationMaterial": {"publicKey": {"hint": "x"}},
            "dsseEnvelope": {"payload": payload, "signatures": [{"sig": "AA=="}]}}


@pytest.mark.parametrize("case", ["huge", "deep", "predicate-string", "resources-strings", "material-list"])
def test_hostile_signature_is_a_clear_error(tmp_path, case):
    from sdedge.runtime.signing import read_signature, signer_info

    if case == "huge":
        raw = json.dumps(_envelope({"predicate": {}})).encode() + b" " * (5 << 20)
    elif case == "deep":
        raw = b'{"verificationMaterial": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    elif case == "predicate-string":
        raw = _envelope({"predicate": "all of it"})
    elif case == "resources-strings":
        raw = _envelope({"predicate": {"resources": ["unet/model.onnx"]}})
    else:
        raw = {**_envelope({"predicate": {}}), "verificationMaterial": ["publicKey"]}
    out = _sig(tmp_path, raw)
    with pytest.raises(BundleError, match=str(out / SIGNATURE_NAME).replace(".", r"\.")) as err:
        read_signature(out)
    if case == "huge":
        assert "over 4194304 bytes" in str(err.value)
    assert signer_info(out)["method"] == "invalid"


def _safetensors(path: Path, header: bytes, data: bytes = b"\0" * 8, n: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)
    return path


@pytest.mark.parametrize("case", ["string-offsets", "bool-offsets", "huge-length", "deep", "negative-shape",
                                  "dtype-list"])
def test_hostile_safetensors_header_is_a_clear_error(tmp_path, case):
    pytest.importorskip("torch")
    from sdedge.export.bases import read_safetensors_header

    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "string-offsets":
        entry["data_offsets"] = ["0", "8"]
    elif case == "bool-offsets":
        entry["data_offsets"] = [False, True]
    elif case == "negative-shape":
        entry["shape"] = [-2]
    elif case == "dtype-list":
        entry["dtype"] = ["F32"]
    header = json.dumps({"w": entry}).encode()
    if case == "deep":
        header = b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = _safetensors(tmp_path / "x.safetensors", header, n=(1 << 62) if case == "huge-length" else None)
    with pytest.raises(SdedgeError, match=str(path).replace(".", r"\.")):
        read_safetensors_header(path)


def test_hostile_tokenizer_config_is_a_clear_error(tiny_bundle):
    from sdedge.runtime.tokenizer import ClipTokenizer

    tok = (tiny_bundle / "tokenizer" / "tokenizer.json").read_bytes()
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"model_max_length": NaN}'):
        with pytest.raises(BundleError, match="tokenizer config is corrupt or unreadable: .*tokenizer_config.json"):
            ClipTokenizer.from_bytes(tok, raw, source=str(tiny_bundle / "tokenizer" / "tokenizer.json"))
