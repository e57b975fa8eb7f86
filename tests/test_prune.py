"""Structural pruning of the tiny UNet with torch-pruning: genuinely fewer parameters and MACs, a UNet that
still runs and exports, and the counts recorded in the bundle."""

from __future__ import annotations

import onnx
import pytest

from sdedge.runtime.bundle import Bundle

pytest.importorskip("torch_pruning")


@pytest.mark.slow  # 7-11 s
def test_prune_unet_removes_channels(tiny_base):
    import torch

    from sdedge.export.bases import load_base
    from sdedge.export.prune import prune_unet

    pipe = load_base(tiny_base)
    before = {n: p.shape for n, p in pipe.unet.named_parameters()}
    report = prune_unet(pipe, 0.5, "magnitude", latent_size=8, round_to=8)
    after = {n: p.shape for n, p in pipe.unet.named_parameters()}
    assert report.params_after < 0.85 * report.params_before
    assert report.macs_after < 0.85 * report.macs_before
    assert sum(p.numel() for p in pipe.unet.parameters()) == report.params_after
    narrower = [n for n in before if after[n].numel() < before[n].numel()]
    assert any("down_blocks.1.resnets" in n for n in narrower)
    assert after["conv_in.weight"][1] == 4 and after["conv_out.weight"][0] == 4  # latent channels untouched
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        out = pipe.unet(x, torch.tensor([10.0, 900.0]), torch.randn(2, 77, 64)).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_prune_taylor_criterion_runs(tiny_base):
    from sdedge.export.bases import load_base
    from sdedge.export.prune import prune_unet

    pipe = load_base(tiny_base)
    report = prune_unet(pipe, 0.5, "taylor", latent_size=8, round_to=8)
    assert report.criterion == "taylor" and report.params_after < report.params_before
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_prune_refuses_bad_arguments(tiny_base):
    from sdedge.export.bases import load_base
    from sdedge.export.prune import prune_unet
    from sdedge.runtime.errors import BadInput

    pipe = load_base(tiny_base)
    with pytest.raises(BadInput, match="criterion"):
        prune_unet(pipe, 0.3, "random")
    with pytest.raises(BadInput, match="ratio"):
        prune_unet(pipe, 1.5)


def test_one_ratio_rule_everywhere():
    from sdedge.export.build import ExportOptions, check_options
    from sdedge.export.prune import MAX_RATIO, check_ratio
    from sdedge.runtime.errors import BadInput

    check_ratio(MAX_RATIO, "--ratio")
    check_options(ExportOptions(prune=0.0))  # 0: export without pruning
    check_options(ExportOptions(prune=MAX_RATIO))
    for bad in (-0.1, MAX_RATIO + 0.01, 1.0):
        with pytest.raises(BadInput, match=f"--prune {bad:g}: a ratio above 0 and at most {MAX_RATIO:g}"):
            check_options(ExportOptions(prune=bad))
        with pytest.raises(BadInput, match=f"--ratio {bad:g}"):
            check_ratio(bad, "--ratio")


@pytest.mark.slow
def test_pruned_export_records_counts_and_parity(tiny_base, tmp_path):
    from sdedge.export.build import ExportOptions, export_bundle

    out = tmp_path / "pruned"
    m = export_bundle(tiny_base, out, ExportOptions(prune=0.5, vae_encoder=False, parity_steps=3, speed_calls=1,
                                                    overwrite=True))
    pr = m.provenance.prune
    assert m.provenance.prune_ratio == 0.5 and pr is not None and pr.params_after < pr.params_before
    # the exported graph is the pruned one: fewer weights than the unpruned export's UNet
    unet = onnx.load(str(out / "unet/model.onnx"))
    n = sum(int(__import__("numpy").prod(i.dims)) for i in unet.graph.initializer)
    assert n < 0.9 * pr.params_before
    # fp32 export parity holds against the pruned PyTorch model; quality is measured against the unpruned one
    assert m.parity.image.psnr_db >= 40
    p = m.parity.precision
    assert p is not None and p.unet_cosine < 0.9999 and p.image_psnr_db is not None
    assert Bundle.open(out).manifest.provenance.prune == pr
    # a pruned fp32 UNet is its own speed baseline: timed once per backend, not twice
    assert m.speed and all(r.ratio == 1.0 and r.fp32_seconds == r.seconds > 0 for r in m.speed)
