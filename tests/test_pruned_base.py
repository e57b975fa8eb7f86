"""Pruned bases (`sdedge prune`) and their recovery fine-tune through the trainer (`sdedge train --distill-from`):
the folder loads back bit for bit, the trainer and the exporter both read it, the parity gates measure against the
unpruned parent, and distillation genuinely wins parity back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image, ImageDraw

from sdedge.runtime.errors import BadInput, SdedgeError

pytest.importorskip("torch_pruning")

def ok(*args: str):
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def pruned(tiny_base, tmp_path_factory) -> Path:
    from sdedge.export.pruned_base import write_pruned_base

    out = tmp_path_factory.mktemp("pruned") / "tiny-p30"
    write_pruned_base(tiny_base, out, 0.3)
    return out


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    """16 captioned 64x64 discs on plain backgrounds, prepared: the latents the distillation runs on."""
    from sdedge.trainer.prepare import PrepareOptions, prepare_dataset

    root = tmp_path_factory.mktemp("distill-data")
    (root / "src").mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        name = list(COLORS)[i % 4]
        im = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 255, 3)))
        x = int(rng.integers(4, 24))
        ImageDraw.Draw(im).ellipse((x, x, x + 30, x + 30), fill=COLORS[name])
        im.save(root / "src" / f"img{i}.png")
        (root / "src" / f"img{i}.txt").write_text(f"a {name} circle")
    prepare_dataset(root / "src", root / "data", PrepareOptions(resolution=64))
    return root / "data"


def test_pruned_base_loads_back_bit_for_bit(tiny_base, pruned):
    import torch

    from sdedge.export.bases import describe_base, load_base
    from sdedge.export.markers import read_pruned_marker
    from sdedge.export.prune import prune_unet
    from sdedge.export.pruned_unet import load_pruned_unet
    from sdedge.trainer.base import load_training_base

    doc = read_pruned_marker(pruned)
    assert doc.parent.sha256 == describe_base(tiny_base)["sha256"]
    assert doc.prune.ratio == 0.3 and doc.prune.params_after < doc.prune.params_before
    in_memory = load_base(tiny_base)
    prune_unet(in_memory, 0.3, latent_size=8)
    loaded = load_base(pruned)  # the exporter's loader
    assert sum(p.numel() for p in loaded.unet.parameters()) == doc.prune.params_after
    x, t, h = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), torch.randn(2, 77, 64)
    with torch.no_grad():
        want = in_memory.unet(x, t, h).sample
        assert torch.equal(loaded.unet(x, t, h).sample, want)
        trainer_base = load_training_base(pruned, load_pruned_unet)  # the trainer's, with the reader handed in
        assert torch.equal(trainer_base.unet(x, t, h).sample, want)
    with pytest.raises(SdedgeError, match="pruned base: load it with unet_loader"):
        load_training_base(pruned)  # without the reader: the reason, not diffusers' shape-mismatch trace


def test_pruned_base_refusals(tiny_base, pruned, tmp_path):
    from sdedge.export.build import ExportOptions, export_bundle
    from sdedge.export.markers import PRUNED_MARKER, read_pruned_marker
    from sdedge.export.pruned_base import write_pruned_base

    with pytest.raises(BadInput, match="--ratio 1.5"):
        write_pruned_base(tiny_base, tmp_path / "x", 1.5)
    with pytest.raises(BadInput, match="--criterion"):
        write_pruned_base(tiny_base, tmp_path / "x", 0.3, "random")
    with pytest.raises(BadInput, match="pruned already"):
        write_pruned_base(pruned, tmp_path / "x", 0.3)
    assert not (tmp_path / "x").exists()
    with pytest.raises(BadInput, match="pruned base already"):
        export_bundle(pruned, tmp_path / "b", ExportOptions(prune=0.3))
    with pytest.raises(BadInput, match="--reference-base is for a pruned base"):
        export_bundle(tiny_base, tmp_path / "b", ExportOptions(reference_base=str(tiny_base)))
    # the parent moved: the error says where it was looked for and which flag gives it
    moved = tmp_path / "moved"
    shutil.copytree(pruned, moved)
    note = json.loads((moved / PRUNED_MARKER).read_text())
    note["parent"]["path"] = str(tmp_path / "gone")
    (moved / PRUNED_MARKER).write_text(json.dumps(note))
    with pytest.raises(BadInput, match=r"gone, which is not there: pass the unpruned base with --reference-base"):
        export_bundle(moved, tmp_path / "b", ExportOptions())
    with pytest.raises(BadInput, match="are not the base"):  # a reference with other weights
        export_bundle(moved, tmp_path / "b", ExportOptions(reference_base=str(moved)))
    (moved / PRUNED_MARKER).write_text("{not json")
    with pytest.raises(SdedgeError, match=f"{PRUNED_MARKER} is damaged"):
        read_pruned_marker(moved)
    assert not (tmp_path / "b").exists()


def test_distillation_refuses_a_teacher_with_another_text_encoder(pruned, shapes_data, tmp_path):
    from sdedge.export.bases import write_builtin_base
    from sdedge.export.pruned_unet import load_pruned_unet
    from sdedge.trainer.config import TrainConfig
    from sdedge.trainer.train import train

    other = write_builtin_base("tiny-random", tmp_path / "other", seed=3)
    cfg = TrainConfig(base=str(pruned), data=str(shapes_data), out=str(tmp_path / "run"), max_steps=2,
                      distill_from=str(other), progress=False, tensorboard=False)
    with pytest.raises(SdedgeError, match="its text encoder differs"):
        train(cfg, unet_loader=load_pruned_unet)


@pytest.mark.slow  # three training runs: 18-30 s
def test_distillation_target_is_the_teachers_prediction(tiny_base, shapes_data, tmp_path):
    """A base distilled from itself starts at zero loss (the LoRA starts as the identity); weight 0.5 halves the
    residual to the denoising target, so the first step's loss is a quarter of plain training's on the same batch."""
    from sdedge.trainer.config import TrainConfig
    from sdedge.trainer.train import train

    def first_loss(**kw) -> float:
        cfg = TrainConfig(base=str(tiny_base), data=str(shapes_data), out=str(tmp_path / str(len(kw)) / str(kw)),
                          max_steps=1, batch_size=4, progress=False, tensorboard=False, **kw)
        return train(cfg).losses[0]

    plain = first_loss()
    assert plain > 1e-3
    assert first_loss(distill_from=str(tiny_base)) < 1e-10
    assert first_loss(distill_from=str(tiny_base), distill_weight=0.5) == pytest.approx(0.25 * plain, rel=1e-4)


@pytest.mark.slow
def test_recovery_fine_tune_wins_back_parity(tiny_base, pruned, shapes_data, tmp_path):
    """prune -> export (the cost of pruning) -> distil a LoRA from the unpruned parent -> export with it: the UNet's
    cosine against the unpruned model, before and after guidance, rises; all three steps through the CLI."""
    p = tmp_path / "p30"
    r = ok("prune", str(tiny_base), "--ratio", "0.3", "--out", str(p))
    assert "UNet parameters" in r.stderr and "--distill-from" in r.stderr  # the counts, and what to run next
    common = ["--no-vae-encoder", "--parity-steps", "6", "--batch", "1-2"]
    ok("export", "--base", str(p), "--out", str(tmp_path / "before"), *common)
    ok("train", "--base", str(p), "--distill-from", str(tiny_base), "--data", str(shapes_data),
            "--out", str(tmp_path / "rec"), "--max-steps", "150", "--batch-size", "4", "--learning-rate", "1e-3",
            "--no-progress", "--no-tensorboard")
    adapter = json.loads((tmp_path / "rec" / "adapter.json").read_text())
    assert adapter["distilled_from"]["sha256"] == json.loads((p / "sdedge_pruned.json").read_text())["parent"]["sha256"]
    assert "conv1" in adapter["lora"]["unet_targets"]  # the recovery targets reach what pruning narrowed
    ok("export", "--base", str(p), "--out", str(tmp_path / "after"), *common,
            "--lora", str(tmp_path / "rec" / "adapter.safetensors"))
    from sdedge.runtime.bundle import Bundle

    before, after = (Bundle.open(tmp_path / n).manifest for n in ("before", "after"))
    for m in (before, after):
        assert m.provenance.pruned_from.sha256 == adapter["distilled_from"]["sha256"]
        assert m.provenance.prune.ratio == 0.3 and m.parity.image.psnr_db >= 40  # export itself is exact
        assert m.parity.prompt_match.rate_fp32 is not None  # pruned from the trained tiny base: scored
    b, a = before.parity.precision, after.parity.precision
    assert b.unet_cosine < 0.97, b  # pruning cost something to win back
    # 150 steps at least halve the distance to the unpruned model, before and after guidance (measured here:
    # cosine 0.948 -> 0.994, after guidance 0.906 -> 0.976)
    assert 1 - a.unet_cosine < 0.5 * (1 - b.unet_cosine), (b, a)
    assert 1 - a.guided_cosine < 0.5 * (1 - b.guided_cosine), (b, a)
