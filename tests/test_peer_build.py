"""benchmarks/peer_build.py: the optimum-ov-lcm peer's input, a base copy with the LCM-LoRA fused by diffusers' own
loader (peft), must hold the same UNet weights as sdedge's fuser gives the diffusers-lcm peer and the fast bundle,
and leave every other component the base's own files."""

from __future__ import annotations

import json
import os

import pytest

from sdedge.benchmarks.fast_inputs import lcm_lora_state
from sdedge.benchmarks.peer_build import MARKER, fuse_lora_copy, main


@pytest.fixture(scope="module")
def kohya_lcm(tiny_pipe, tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("peer-lora") / "lcm.safetensors"
    save_file(lcm_lora_state(tiny_pipe.unet, rank=4, seed=3, std=0.05), str(path))
    return path


def test_fused_copy_equals_sdedge_fuser_and_links_the_rest(tiny_base, kohya_lcm, tmp_path):
    import torch
    from safetensors.torch import load_file

    from sdedge.export.bases import load_base
    from sdedge.export.lora import fuse_loras

    out = fuse_lora_copy(tiny_base, [(str(kohya_lcm), 0.7)], tmp_path / "fused")
    ours = load_base(tiny_base)
    fuse_loras(ours, [(str(kohya_lcm), 0.7)])
    want = ours.unet.state_dict()
    got = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(got) == set(want)
    base = load_base(tiny_base).unet.state_dict()
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert len(changed) >= 20  # the LoRA reached many layers, so the comparison below means something
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst < 1e-5, worst
    for part in ("vae", "text_encoder"):  # untouched: the base's own files, linked
        for f in (tiny_base / part).iterdir():
            assert os.path.samefile(f, out / part / f.name) or f.read_bytes() == (out / part / f.name).read_bytes()
    assert not (out / "sdedge_base.json").exists()
    assert json.loads((out / MARKER).read_text())["loras"] == [[str(kohya_lcm), 0.7]]


def test_missing_lora_exit_2_nothing_written(tiny_base, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fuse-lora", "--base", str(tiny_base), "--lora", str(tmp_path / "nope.safetensors:1.0"),
              "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "nope.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
