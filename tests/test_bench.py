"""`sdedge bench` on the tiny model: reports, schema, parity, target verdict, suites and their errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdedge.benchmarks import report as report_mod
from sdedge.benchmarks.bench import BenchError, psnr, quick_bench, ssim, summarize
from sdedge.benchmarks.suite import (
    SuiteError,
    check_inputs,
    load_suite,
    resolve_suite,
    run_prepare,
)
from sdedge.cli import main as sdedge_main
from sdedge.export.build import ExportOptions
from sdedge.runtime.strict import from_dict


def bench_main(argv: list[str]) -> int:
    """`sdedge bench ...` in this process."""
    return sdedge_main(["bench", *argv])

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m sdedge bench ...` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "sdedge", "bench", *args], capture_output=True, text=True,
                          check=False, timeout=timeout, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def check_pictures(out: Path, report: dict) -> None:
    n = len(report["engines"])
    with Image.open(out / "report.png") as im:
        assert im.size == report_mod.chart_size(n)
    with Image.open(out / "samples.png") as im:
        cell = report_mod.grid_cell(report["settings"]["width"])
        assert im.size == report_mod.grid_size(report["settings"]["runs"], n, cell)
        assert im.size[0] > n * cell
    for e in report["engines"]:
        assert len(e["samples"]) == report["settings"]["runs"] * report["settings"]["batch"]
        with Image.open(out / e["samples"][0]) as im:
            assert im.size == (report["settings"]["width"], report["settings"]["height"])


# -- metrics ---------------------------------------------------------------------------------------------------
def test_ssim_and_psnr():
    rng = np.random.default_rng(0)
    a = rng.random((64, 64, 3))
    assert ssim(a, a) == 1.0
    assert psnr(a, a) == 999.0
    noisy = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    s = ssim(a, noisy)
    assert 0 < s < 1
    assert ssim(a, np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)) < s  # more noise, less similar
    assert ssim(a[..., 0], a[..., 0]) == 1.0  # greyscale
    assert ssim(a[:6, :6], a[:6, :6]) == 1.0  # smaller than the window
    assert 20 < psnr(a, noisy) < 30
    with pytest.raises(Exception, match="different shapes"):
        ssim(a, a[:32])


def test_summarize():
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s["min"], s["median"], s["max"], s["n"]) == (1.0, 3.0, 100.0, 5)
    assert 4.0 < s["p95"] < 100.0
    assert summarize([]) is None


def test_validator_catches_departures():
    """The report's dataclasses (report_mod.BenchReport) name the key at fault: missing, of the wrong type, unknown."""
    import copy

    good = json.loads((Path(__file__).parents[1] / "benchmarks/results/tiny-base/quickstart/report.json").read_text())
    report_mod.validate(good)  # a committed report (version 1: schema_version and kind)
    with pytest.raises(report_mod.ReportError, match="missing key 'engines'"):
        report_mod.validate({k: v for k, v in good.items() if k != "engines"})
    bad = copy.deepcopy(good)
    bad["engines"][0]["seconds_per_image"]["median"] = "x"
    with pytest.raises(report_mod.ReportError, match=r"report.engines\[0\].seconds_per_image.median: expected a number"):
        report_mod.validate(bad)
    with pytest.raises(report_mod.ReportError, match="unknown key 'zzz'"):
        report_mod.validate({**good, "zzz": 2})


# -- benches on the tiny model -------------------------------------------------------------------------------
@pytest.mark.slow  # diffusers and the bundle, 3 images each: 10-18 s
def test_quick_bench_against_reference(tiny_bundle, tiny_base, tmp_path):
    """The quickstart's bench: inline, a few seconds, every file written and valid."""
    out = tmp_path / "quick"
    # the parity asserted below is fp32 ONNX Runtime's; on a BF16 CPU `auto` runs OpenVINO bf16 (about 40 dB)
    rep = quick_bench(tiny_bundle, tiny_base, out, runs=2, steps=4, warmup=1, backend="onnxruntime")
    for name in ("report.json", "report.md", "report.png", "samples.png"):
        assert (out / name).is_file(), name
    data = report_mod.load_report(out / "report.json")  # validates against SCHEMA
    assert (data["format"], data["version"]) == ("sdedge-bench", report_mod.SCHEMA_VERSION)
    assert data == json.loads(json.dumps(rep))
    ref, eng = data["engines"]
    assert ref["role"] == "reference" and ref["kind"] == "diffusers" and eng["kind"] == "sdedge"
    assert eng["precision"] == "fp32" and eng["backend"].startswith(("onnxruntime", "openvino"))
    assert eng["parity"]["psnr_db"]["min"] >= 40
    assert eng["parity"]["ssim"]["min"] > 0.99
    pairs = eng["speedup_vs_reference"]["pairs"]
    assert [p["run"] for p in pairs] == [0, 1]
    assert all(p["ratio"] == pytest.approx(p["reference_seconds"] / p["engine_seconds"]) for p in pairs)
    for e in data["engines"]:
        assert len(e["runs"]) == 2 and len(e["warmup_seconds"]) == 1
        assert all(len(r["step_seconds"]) == 4 for r in e["runs"])
        assert all(r["stages"]["unet"] > 0 and r["stages"]["vae_decoder"] > 0 for r in e["runs"])
        assert e["memory"]["rss_scope"].startswith("shared")
        assert e["load"]["load_seconds"] > 0 and e["images_per_minute"] > 0
    assert data["target"] is None
    md = (out / "report.md").read_text()
    assert "No target given" in md and "| sdedge |" in md and "PSNR" in md
    check_pictures(out, data)


@pytest.mark.slow  # two bench runs: 2-4 s
def test_target_verdict_flips(tiny_bundle, tmp_path):
    fast = quick_bench(tiny_bundle, None, tmp_path / "a", runs=1, steps=2, warmup=0, target_seconds=1000)
    assert fast["target"]["verdict"] == "pass" and fast["target"]["statement"].startswith("PASS")
    slow = quick_bench(tiny_bundle, None, tmp_path / "b", runs=1, steps=2, warmup=0, target_seconds=1e-6)
    assert slow["target"]["verdict"] == "fail" and slow["target"]["statement"].startswith("FAIL")
    assert "**FAIL**" in (tmp_path / "b" / "report.md").read_text()
    assert fast["engines"][0]["parity"] is None and fast["reference"] is None


@pytest.mark.slow
def test_cli_bench_processes_against_reference(tiny_bundle, tiny_base, tmp_path):
    """The real path: each engine in its own process, alternating with diffusers; then the exit code with
    --fail-on-miss."""
    out = tmp_path / "rep"
    r = cli(str(tiny_bundle), "--reference", str(tiny_base), "--runs", "2", "--warmup", "1", "--steps", "4",
            "--target-seconds", "1000", "--out", str(out), "--no-progress", "--backend", "onnxruntime")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PASS" in r.stderr and "report.md" in r.stderr
    data = report_mod.load_report(out / "report.json")
    ref, eng = data["engines"]
    assert ref["memory"]["rss_scope"] == "own process" == eng["memory"]["rss_scope"]
    # each process's own peak: the runtime child never imports torch, so it is far smaller than diffusers'
    assert eng["memory"]["peak_rss_bytes"] < ref["memory"]["peak_rss_bytes"]
    assert eng["parity"]["psnr_db"]["min"] >= 40
    assert len(eng["speedup_vs_reference"]["pairs"]) == 2
    assert eng["load"]["cold_start_seconds"] >= eng["load"]["load_seconds"] > 0
    assert data["target"]["verdict"] == "pass"
    check_pictures(out, data)

    miss = cli(str(tiny_bundle), "--runs", "1", "--warmup", "0", "--steps", "2", "--target-seconds", "0.000001",
               "--fail-on-miss", "--out", str(tmp_path / "miss"), "--no-progress")
    assert miss.returncode == 1, miss.stderr[-3000:]
    assert "FAIL" in miss.stderr


# -- bad input -----------------------------------------------------------------------------------------------
def test_missing_bundle_is_a_clear_error(tmp_path, capsys):
    assert bench_main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "bundle not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert bench_main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no sdedge.json" in capsys.readouterr().err
    assert bench_main(["--out", str(tmp_path / "o")]) == 2
    assert "name a bundle" in capsys.readouterr().err


def test_reference_of_another_architecture(tiny_bundle, tiny_base, tmp_path, capsys):
    other = tmp_path / "other-base"
    shutil.copytree(tiny_base, other)
    cfg_path = other / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 96
    cfg_path.write_text(json.dumps(cfg))
    code = bench_main([str(tiny_bundle), "--reference", str(other), "--runs", "1", "--out", str(tmp_path / "o"),
                       "--inline", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "not the architecture" in err and "cross-attention dim 96" in err and "64 in the bundle" in err
    assert not (tmp_path / "o" / "report.json").exists()


def test_reference_with_other_weights_is_noted(tiny_bundle, tiny_base, tmp_path):
    from sdedge.benchmarks.bench import check_reference
    from sdedge.runtime.manifest import read_manifest

    other = tmp_path / "other-weights"
    shutil.copytree(tiny_base, other)
    weights = other / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # one weight changed: same architecture, other weights
    weights.write_bytes(bytes(data))
    manifest = read_manifest(tiny_bundle)
    assert check_reference(manifest, tiny_bundle, tiny_base) == []
    notes = check_reference(manifest, tiny_bundle, other)
    assert len(notes) == 1 and "other weights" in notes[0]
    with pytest.raises(BenchError, match="single-file"):
        check_reference(manifest, tiny_bundle, weights)


def write_suite(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_suite_unknown_key(tmp_path, capsys):
    bad = write_suite(tmp_path / "bad.yaml", """
        name: bad
        settings: {runz: 3}
        engines: [{name: a, bundle: b}]
    """)
    with pytest.raises(SuiteError, match="unknown key 'runz'"):
        load_suite(bad)
    assert bench_main(["--suite", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "runz" in err and "bad.yaml" in err
    top = write_suite(tmp_path / "top.yaml", "name: t\nengnes: []\n")
    with pytest.raises(SuiteError, match="unknown key 'engnes'"):
        load_suite(top)
    nested = write_suite(tmp_path / "nested.yaml", "name: t\nengines: [{name: a, bundel: b}]\n")
    with pytest.raises(SuiteError, match=r"engines\[0\]: unknown key 'bundel'"):
        load_suite(nested)
    wrong = write_suite(tmp_path / "wrong.yaml", "name: t\nsettings: {device: tpu}\nengines: [{name: a, bundle: b}]\n")
    with pytest.raises(SuiteError, match="device 'tpu'"):
        load_suite(wrong)
    dup = write_suite(tmp_path / "dup.yaml", "name: t\nreference: {base: x}\nengines: [{name: diffusers, bundle: b}]\n")
    with pytest.raises(SuiteError, match="used twice"):
        load_suite(dup)


def test_suite_missing_bundle(tiny_bundle, tmp_path, capsys):
    suite_file = write_suite(tmp_path / "s.yaml", f"""
        name: s
        prepare:
          - export: "{{work}}/base"
            out: "{{work}}/made"
        engines:
          - name: present
            bundle: {tiny_bundle}
          - name: int8
            bundle: bundles/int8
            build_hint: "sdedge export --precision int8 --out {{work}}/int8"
          - name: made
            bundle: "{{work}}/made"
    """)
    suite = resolve_suite(load_suite(suite_file), work=tmp_path / "work")
    with pytest.raises(SuiteError) as exc:
        check_inputs(suite)
    msg = str(exc.value)
    assert "engines[1] 'int8'" in msg and str(tmp_path / "bundles" / "int8") in msg  # resolved against the suite
    assert f"sdedge export --precision int8 --out {tmp_path / 'work'}/int8" in msg
    assert bench_main(["--suite", str(suite_file), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "o")]) == 2
    assert "engines[1] 'int8'" in capsys.readouterr().err
    # leaving it out reaches the next missing one, which a prepare step makes
    assert bench_main(["--suite", str(suite_file), "--work", str(tmp_path / "work"), "--only", "present,made",
                       "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "engines[2] 'made'" in err and "--build (prepare[0])" in err
    assert bench_main(["--suite", str(suite_file), "--only", "nope"]) == 2
    assert "no such engine" in capsys.readouterr().err


def test_suite_runs_with_relative_paths_and_overrides(tiny_bundle, tiny_base, tmp_path):
    """A suite's relative paths resolve against its folder; --path replaces one; prepare keeps what exists."""
    folder = tmp_path / "suites"
    folder.mkdir()
    shutil.copytree(tiny_base, tmp_path / "base-copy")
    os.symlink(tiny_bundle, folder / "bundle-link")
    suite_file = write_suite(folder / "inline.yaml", """
        name: inline-smoke
        prepare:
          - builtin: tiny
            out: ../base-copy
        settings: {runs: 1, warmup: 0, steps: 2, isolation: inline, target_seconds: 1000, prompts: [a red circle]}
        engines:
          - {name: fp32, bundle: bundle-link}
          - {name: other, bundle: does-not-exist}
    """)
    suite = resolve_suite(load_suite(suite_file), work=tmp_path / "w", overrides={"other": str(tiny_bundle)})
    assert suite.engines[0].bundle == str(folder / "bundle-link")
    assert suite.prepare[0].out == str(tmp_path / "base-copy")
    assert run_prepare(suite) == [f"prepare[0]: {tmp_path / 'base-copy'} exists, kept"]
    out = tmp_path / "out"
    assert bench_main(["--suite", str(suite_file), "--work", str(tmp_path / "w"), "--path", f"other={tiny_bundle}",
                       "--build", "--out", str(out), "--no-progress"]) == 0
    data = report_mod.load_report(out / "report.json")
    assert [e["name"] for e in data["engines"]] == ["fp32", "other"]
    assert data["suite"]["name"] == "inline-smoke" and data["target"]["verdict"] == "pass"
    with pytest.raises(SuiteError, match="no engine or reference called 'zzz'"):
        resolve_suite(load_suite(suite_file), overrides={"zzz": "x"})


def test_shipped_suites_parse():
    for name in ("cpu-tiny", "cpu-sd15-256", "gpu-sd15-512"):
        suite = resolve_suite(load_suite(REPO / "benchmarks" / f"{name}.yaml"), work="/tmp/sdedge-w")
        assert suite.name == name and suite.reference is not None and suite.engines
        assert all(e.bundle.startswith("/tmp/sdedge-w/") for e in suite.engines)
        assert all(p.model.startswith("/tmp/sdedge-w/") and p.python.startswith("/tmp/sdedge-w/") for p in suite.peers)
        for step in suite.prepare:  # export options are ExportOptions fields
            if step.export:
                from_dict(ExportOptions, step.options, f"{name}: prepare")
    peers = resolve_suite(load_suite(REPO / "benchmarks" / "cpu-sd15-256.yaml"), work="/w").peers
    assert {p.kind for p in peers} == {"optimum-onnxruntime", "optimum-openvino"}


def test_clip_score(tiny_bundle, tiny_base, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    clip_dir = tmp_path / "clip"
    transformers.CLIPModel(cfg).save_pretrained(clip_dir)
    tok = transformers.CLIPTokenizerFast.from_pretrained(tiny_base / "tokenizer")
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(clip_dir)

    from sdedge.benchmarks.bench import run_bench
    from sdedge.benchmarks.suite import EngineSpec, Settings, Suite

    suite = Suite(name="clip", settings=Settings(runs=1, warmup=0, steps=2, isolation="inline"),
                  engines=(EngineSpec(name="e", bundle=str(tiny_bundle)),))
    rep = run_bench(suite, tmp_path / "o", progress=False, clip_model=str(clip_dir))
    score = rep["engines"][0]["clip_score"]
    assert len(score["per_image"]) == 1 and 0 <= score["mean"] <= 100
    assert rep["clip"] == {"model": str(clip_dir), "skipped": None}
    report_mod.load_report(tmp_path / "o" / "report.json")
    # a CLIP model that is not there: skipped with a note, the bench still reports
    rep = run_bench(suite, tmp_path / "o2", progress=False, clip_model=str(tmp_path / "no-clip"))
    assert rep["engines"][0]["clip_score"] is None and "skipped" in rep["clip"]["skipped"]
    assert any("CLIP score skipped" in n for n in rep["notes"])
