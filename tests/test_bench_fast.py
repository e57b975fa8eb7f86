"""The fast-path benchmark's machinery (issue 19 must 5, benchmarks/cpu-sd15-512-fast.yaml), on the tiny base: the
suite's random inputs (an LCM-LoRA in lcm-lora-sdv1-5's layout, a TAESD-architecture decoder), per-engine steps /
scheduler / guidance, a diffusers peer with the LoRA fused and the decoder in place, and an engine's parity measured
against that peer. Everything runs for real (export, runtime, diffusers) in the bench's own worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from sdedge.benchmarks.fast_inputs import LCM_RANK, LCM_TARGETS
from sdedge.benchmarks.suite import SuiteError, load_suite, resolve_suite, run_prepare, select_engines

REPO = Path(__file__).resolve().parents[1]
# Parity floors (tests/test_bench_fast.py, tiny base, fp32): sdedge against diffusers with the same LoRA, decoder,
# latents and LCM noise (the export's own parity gate reads ~46 dB on such a bundle); the same diffusers pipeline twice.
FAST_DB, AGAIN_DB = 40.0, 60.0


def _suite(tmp_path: Path, tiny_base: Path, **changes) -> Path:
    doc = {
        "name": "tiny-fast",
        "prepare": [
            {"random": "lcm-lora", "base": str(tiny_base), "out": "{work}/lcm.safetensors"},
            {"random": "tiny-decoder", "base": str(tiny_base), "out": "{work}/taesd"},  # its scale factor: 4
            {"export": str(tiny_base), "out": "{work}/fast",
             "options": {"vae_encoder": False, "parity_steps": 2, "loras": [["{work}/lcm.safetensors", 1.0]],
                         "decoder": "{work}/taesd", "decoder_images": 1, "default_scheduler": "lcm",
                         "default_steps": 2, "default_guidance": 1.0}},
        ],
        "settings": {"runs": 1, "warmup": 0, "steps": 3, "size": 64, "threads": 2, "interleave": False},
        "reference": {"base": str(tiny_base)},
        "engines": [{"name": "fast", "bundle": "{work}/fast", "backend": "onnxruntime", "steps": 2,
                     "scheduler": "lcm", "guidance": 1.0, "warmup": 1, "parity_against": "diffusers-lcm"}],
        "peers": [{"name": "diffusers-lcm", "kind": "diffusers", "model": str(tiny_base),
                   "loras": [["{work}/lcm.safetensors", 1.0]], "decoder": "{work}/taesd", "steps": 2,
                   "scheduler": "lcm", "guidance": 1.0},
                  # the same pipeline again, its parity against diffusers-lcm's images (not the reference's)
                  {"name": "diffusers-lcm-again", "kind": "diffusers", "model": str(tiny_base),
                   "loras": [["{work}/lcm.safetensors", 1.0]], "decoder": "{work}/taesd", "steps": 2,
                   "scheduler": "lcm", "guidance": 1.0, "parity_against": "diffusers-lcm"}],
    }
    for key, value in changes.items():
        doc[key] = value
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow  # a fast bundle's export and three engine processes: ~40 s
def test_fast_suite_runs_each_engine_with_its_own_settings(tiny_base, tmp_path):
    from sdedge.benchmarks.bench import run_bench

    suite = resolve_suite(load_suite(_suite(tmp_path, tiny_base)), work=tmp_path / "w")
    done = run_prepare(suite)
    assert [d.split(":")[0] for d in done] == ["prepare[0]", "prepare[1]", "prepare[2]"]
    with safe_open(str(tmp_path / "w" / "lcm.safetensors"), "pt") as f:  # lcm-lora-sdv1-5's kohya layout
        keys = list(f.keys())
        ups = [k for k in keys if k.endswith(".lora_up.weight")]
        assert all(k.startswith("lora_unet_") for k in keys) and f.get_tensor(ups[0]).shape[1] == LCM_RANK
    kinds = {t for t in LCM_TARGETS if any(k.endswith("_" + t.replace(".", "_") + ".lora_up.weight") for k in keys)}
    assert {"to_q", "ff.net.2", "conv1", "time_emb_proj"} <= kinds
    assert json.loads((tmp_path / "w" / "taesd" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    assert run_prepare(suite)[0].endswith("exists, kept")

    report = run_bench(suite, tmp_path / "out", progress=False)
    rows = {e["name"]: e for e in report["engines"]}
    assert rows["fast"]["run"] == {"steps": 2, "scheduler": "lcm", "guidance": 1.0, "warmup": 1}
    assert len(rows["fast"]["warmup_seconds"]) == 1 and rows["diffusers"]["warmup_seconds"] == []
    assert len(rows["fast"]["runs"][0]["step_seconds"]) == 2 and len(rows["diffusers"]["runs"][0]["step_seconds"]) == 3
    peer = rows["diffusers-lcm"]
    assert peer["kind"] == "diffusers" and len(peer["runs"][0]["step_seconds"]) == 2
    assert "LoRAs fused: lcm.safetensors:1" in peer["backend_reason"] and "AutoencoderTiny" in peer["backend_reason"]
    # the same LoRA, decoder, schedule and latents: sdedge's image is diffusers' image
    assert rows["fast"]["parity"]["against"] == "diffusers-lcm" and rows["fast"]["parity"]["psnr_db"]["min"] >= FAST_DB
    assert rows["diffusers-lcm"]["parity"]["against"] == "diffusers"  # a peer stays compared with the reference
    # unless it names another peer: the same pipeline twice, LCM's between-step noise drawn for the run's seed as the
    # runtime draws it, gives the same image, far closer than to the 3-step reference's
    again, vs_ref = rows["diffusers-lcm-again"]["parity"], rows["diffusers-lcm"]["parity"]
    assert again["against"] == "diffusers-lcm" and again["psnr_db"]["min"] >= AGAIN_DB
    assert again["psnr_db"]["min"] > vs_ref["psnr_db"]["max"] + 10
    assert rows["fast"]["speedup_vs_reference"]["median"] > 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| fast | diffusers-lcm |" in md  # the table names each engine's truth
    assert "- CPU flags: " in md and not any("adapter(s) fused in" in n for n in report["notes"])


def test_suite_refuses_what_cannot_run(tiny_base, tmp_path):
    bad_peer = [{"name": "ov", "kind": "optimum-openvino", "model": "m", "python": "p", "loras": [["x", 1.0]]}]
    plain = [{"name": "e", "bundle": "b"}]
    for changes, words in (
            ({"engines": [{"name": "e", "bundle": "b", "parity_against": "nobody"}]}, "parity_against 'nobody'"),
            ({"peers": [{"name": "d", "kind": "diffusers", "model": "m", "parity_against": "d"}], "engines": plain},
             "peers\\[0\\] 'd': parity_against 'd' is not another peer"),
            ({"peers": [{"name": "d", "kind": "diffusers", "model": "m", "parity_against": "e"}], "engines": plain},
             "parity_against 'e' is not another peer"),
            ({"peers": bad_peer, "engines": plain}, "loras and decoder apply to a diffusers peer"),
            ({"peers": [{"name": "ov", "kind": "optimum-openvino", "model": "m"}], "engines": plain},
             "python: the interpreter"),
            ({"prepare": [{"random": "vae", "out": "x"}]}, "random 'vae': choose one of lcm-lora, tiny-decoder"),
            ({"prepare": [{"random": "lcm-lora", "out": "x"}]}, "random lcm-lora needs 'base'"),
            ({"engines": [{"name": "e", "bundle": "b", "steps": 0}]}, "steps must be from 1 to 1000")):
        with pytest.raises(SuiteError, match=words):
            load_suite(_suite(tmp_path, tiny_base, **changes))


def test_shipped_fast_suite_parses():
    from sdedge.export.build import ExportOptions
    from sdedge.runtime.strict import from_dict

    suite = resolve_suite(load_suite(REPO / "benchmarks" / "cpu-sd15-512-fast.yaml"), work="/tmp/w")
    assert suite.settings.size == 512 and (suite.settings.steps, suite.settings.guidance) == (20, 7.5)
    fast = suite.engines[0]
    assert (fast.steps, fast.scheduler, fast.guidance, fast.parity_against) == (4, "lcm", 1.0, "diffusers-lcm")
    export = next(p for p in suite.prepare if p.export)
    opts = from_dict(ExportOptions, export.options, "prepare")
    assert opts.loras == (("/tmp/w/lcm-lora-sd15-random.safetensors", 1.0),) and opts.decoder == "/tmp/w/taesd-random"
    assert {p.kind for p in suite.peers} == {"diffusers", "optimum-openvino"}
    peers = {p.name: p for p in suite.peers}
    # optimum's export takes the full VAE only: its truth is diffusers with the same LoRA and that decoder
    assert peers["optimum-ov-lcm"].parity_against == "diffusers-lcm-vae"
    truth = peers["diffusers-lcm-vae"]
    assert truth.decoder is None and truth.loras == peers["diffusers-lcm"].loras
    assert (truth.steps, truth.scheduler, truth.guidance) == (4, "lcm", 1.0)


def test_only_keeps_the_prepare_steps_and_truths_it_needs():
    suite = resolve_suite(load_suite(REPO / "benchmarks" / "cpu-sd15-512-fast.yaml"), work="/tmp/w")
    outs = [p.out for p in suite.prepare]
    assert outs[-1] == "/tmp/w/bundle-sd15-fast-int8"
    assert [p.out for p in select_engines(suite, None).prepare] == outs
    # without the int8 row its bundle is not built; everything the fast bundle and the peers use still is
    kept = select_engines(suite, ["sdedge-fast", "diffusers-lcm"])
    assert [p.out for p in kept.prepare] == outs[:-1]
    assert [p.out for p in select_engines(suite, ["sdedge-fast-int8", "diffusers-lcm"]).prepare] == outs
    # a row whose parity truth is left out is refused (its PSNR would silently be against the reference)
    with pytest.raises(SuiteError, match="keeps 'sdedge-fast' but leaves out 'diffusers-lcm'"):
        select_engines(suite, ["sdedge-fast"])
    with pytest.raises(SuiteError, match="keeps 'optimum-ov-lcm' but leaves out 'diffusers-lcm-vae'"):
        select_engines(suite, ["sdedge-fast", "diffusers-lcm", "optimum-ov-lcm"])
