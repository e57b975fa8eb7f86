"""Peers in `sdedge bench`: optimum's ONNX Runtime and OpenVINO pipelines beside sdedge, in their own venvs.

The suite checks run everywhere. The run itself needs the peers' virtual environments, which CI does not build
(two more torch installs and their exports): set SDEDGE_PEERS to a folder holding `optimum-onnx/` and
`optimum-intel/` made by benchmarks/peer-envs/make-venv.sh, and the test exports the tiny base with each peer's own
optimum-cli and benches them against diffusers on the same latents.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdedge.benchmarks import report as report_mod
from sdedge.benchmarks.suite import SuiteError, check_inputs, load_suite, resolve_suite, select_engines
from sdedge.cli import main as sdedge_main


def write_suite(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_peer_entries_are_checked(tmp_path):
    def suite(peers: str, settings: str = "{runs: 1}") -> Path:
        return write_suite(tmp_path / "s.yaml", f"""
            name: s
            settings: {settings}
            reference: {{name: diffusers, base: base}}
            engines: [{{name: fp32, bundle: b}}]
            peers: {peers}
        """)

    with pytest.raises(SuiteError, match=r"peers\[0\] 'p': kind 'optimum-tensorflow'"):
        load_suite(suite("[{name: p, kind: optimum-tensorflow, model: m, python: py}]"))
    with pytest.raises(SuiteError, match=r"peers\[0\]: unknown key 'modle'"):
        load_suite(suite("[{name: p, kind: optimum-openvino, modle: m, python: py}]"))
    with pytest.raises(SuiteError, match="used twice"):
        load_suite(suite("[{name: fp32, kind: optimum-openvino, model: m, python: py}]"))
    with pytest.raises(SuiteError, match="isolation: process"):
        load_suite(suite("[{name: p, kind: optimum-openvino, model: m, python: py}]", "{isolation: inline}"))


def test_missing_peer_venv_or_model_is_named(tiny_bundle, tiny_base, tmp_path, capsys):
    path = write_suite(tmp_path / "s.yaml", f"""
        name: s
        reference: {{name: diffusers, base: {tiny_base}}}
        engines: [{{name: fp32, bundle: {tiny_bundle}}}]
        peers:
          - name: ov
            kind: optimum-openvino
            model: "{{work}}/ov"
            python: venvs/intel/bin/python
            build_hint: "bash benchmarks/peer-envs/make-venv.sh optimum-openvino venvs/intel"
    """)
    suite = resolve_suite(load_suite(path), work=tmp_path / "w")
    assert suite.peers[0].python == str(tmp_path / "venvs/intel/bin/python")  # relative to the suite file
    assert suite.peers[0].model == str(tmp_path / "w" / "ov")
    with pytest.raises(SuiteError) as exc:
        check_inputs(suite)
    msg = str(exc.value)
    assert "peers[0] 'ov'" in msg and "no such program" in msg and "make-venv.sh optimum-openvino" in msg
    # a real interpreter, but no exported model
    suite = dataclasses.replace(suite, peers=(dataclasses.replace(suite.peers[0], python=sys.executable),))
    with pytest.raises(SuiteError, match=r"peers\[0\] 'ov': model .*/w/ov: no such folder"):
        check_inputs(suite)
    # --only without the peer runs the rest; --only with the peer alone is refused (no bundle to set shapes)
    assert select_engines(suite, ["fp32"]).peers == ()
    with pytest.raises(SuiteError, match="at least one sdedge engine"):
        select_engines(suite, ["ov"])
    assert sdedge_main(["bench", "--suite", str(path), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 2
    assert "peers[0] 'ov'" in capsys.readouterr().err


PEERS = os.environ.get("SDEDGE_PEERS")


@pytest.mark.skipif(not PEERS, reason="set SDEDGE_PEERS to a folder with the optimum-onnx/ and optimum-intel/ venvs "
                                      "of benchmarks/peer-envs/make-venv.sh (CI does not build them)")
def test_peers_run_beside_diffusers(tiny_bundle, tiny_base, tmp_path):
    venvs = Path(PEERS)
    models = {}
    for kind, venv, cmd in (("optimum-onnxruntime", "optimum-onnx", ["onnx"]),
                            ("optimum-openvino", "optimum-intel", ["openvino", "--weight-format", "fp32"])):
        out = tmp_path / kind
        subprocess.run([str(venvs / venv / "bin/optimum-cli"), "export", *cmd, "--model", str(tiny_base),
                        "--task", "text-to-image", str(out)], check=True, capture_output=True, timeout=600)
        models[kind] = (out, venvs / venv / "bin/python")
    path = write_suite(tmp_path / "s.yaml", f"""
        name: peers
        settings: {{runs: 1, warmup: 0, steps: 4, size: 64, threads: 2, prompts: ["a red circle on a blue background"]}}
        reference: {{name: diffusers, base: {tiny_base}}}
        engines: [{{name: sdedge-fp32, bundle: {tiny_bundle}}}]
        peers:
          - {{name: ort, kind: optimum-onnxruntime, model: {models['optimum-onnxruntime'][0]},
              python: {models['optimum-onnxruntime'][1]}}}
          - {{name: ov, kind: optimum-openvino, model: {models['optimum-openvino'][0]},
              python: {models['optimum-openvino'][1]}}}
    """)
    out = tmp_path / "out"
    assert sdedge_main(["bench", "--suite", str(path), "--out", str(out), "--no-progress"]) == 0
    report = report_mod.load_report(out / "report.json")
    rows = {e["name"]: e for e in report["engines"]}
    assert rows["ort"]["kind"] == "optimum-onnxruntime" and rows["ov"]["kind"] == "optimum-openvino"
    assert "optimum-onnx" in rows["ort"]["backend"] and "openvino" in rows["ov"]["backend"]
    for name in ("ort", "ov"):
        assert rows[name]["role"] == "peer"
        assert rows[name]["parity"]["psnr_db"]["min"] > 60, rows[name]["parity"]  # same picture as diffusers
        assert rows[name]["stages_median_seconds"]["unet"] > 0  # the stage timers reached the peer's UNet
        assert len(rows[name]["runs"][0]["step_seconds"]) == 4
    assert "ort" in (out / "report.md").read_text()


@pytest.mark.slow  # a bench with a peer process: 5-7 s
def test_peer_without_its_packages_is_a_clear_error(tiny_bundle, tiny_base, tmp_path, monkeypatch, capsys):
    """A peer pointed at an interpreter without optimum (here: this one) fails at load with the reason, and the
    bench's scratch folder goes with it."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    path = write_suite(tmp_path / "s.yaml", f"""
        name: s
        settings: {{runs: 1, warmup: 0, steps: 2, size: 64, prompts: [a red circle]}}
        engines: [{{name: fp32, bundle: {tiny_bundle}}}]
        peers: [{{name: ov, kind: optimum-openvino, model: {tiny_base}, python: {sys.executable}}}]
    """)
    assert sdedge_main(["bench", "--suite", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "engine 'ov'" in err and "optimum" in err and "peer's own venv" in err
    assert list(scratch.iterdir()) == []
