"""The shapes world, the small tokenizer, the shipped classifier and KID, and the trained tiny base's quality."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sdedge.tinyworld.shapes import (
    ALL_COLOURS,
    BASE_COLOURS,
    COLOURS,
    NEW_COLOUR,
    Scene,
    parse_caption,
    render,
    sample_scenes,
    vocabulary,
    write_dataset,
)

torch = pytest.importorskip("torch")


# --- the procedural world -----------------------------------------------------------------------------------


def test_render_draws_the_scene():
    img = np.asarray(render(Scene("circle", "red", "blue"), np.random.default_rng(0))).astype(int)
    assert img.shape == (64, 64, 3)
    centre, corner = img[28:36, 28:36].mean((0, 1)), img[:3, :3].mean((0, 1))
    assert np.abs(centre - COLOURS["red"]).max() < 30 and np.abs(corner - COLOURS["blue"]).max() < 30
    again = np.asarray(render(Scene("circle", "red", "blue"), np.random.default_rng(0))).astype(int)
    assert np.array_equal(img, again)
    # a triangle covers less of its box than a square of the same jittered size
    sq = np.asarray(render(Scene("square", "white", "black"), np.random.default_rng(1))).mean()
    tri = np.asarray(render(Scene("triangle", "white", "black"), np.random.default_rng(1))).mean()
    assert tri < sq


def test_captions_round_trip_and_scenes_differ_from_background():
    for s in sample_scenes(np.random.default_rng(0), 200, ALL_COLOURS):
        assert parse_caption(s.caption) == s and s.colour != s.background and s.background in BASE_COLOURS
    assert parse_caption("A Red circle on a BLUE background") == Scene("circle", "red", "blue")
    assert parse_caption("a red hexagon on a blue background") is None
    assert parse_caption("a photograph of an astronaut riding a horse") is None
    assert NEW_COLOUR not in BASE_COLOURS


def test_write_dataset(tmp_path):
    out = write_dataset(tmp_path / "d", 5, colours=(NEW_COLOUR,), seed=3)
    caps = sorted(out.glob("*.txt"))
    assert len(caps) == 5 and len(list(out.glob("*.png"))) == 5
    assert all(parse_caption(c.read_text()).colour == NEW_COLOUR for c in caps)


# --- the small CLIP tokenizer -------------------------------------------------------------------------------


def test_small_tokenizer_matches_clip_on_its_words(tmp_path):
    from tokenizers import Tokenizer

    from sdedge.export.tokenizer_files import merges_for_words, write_clip_tokenizer

    small = Tokenizer.from_file(str(write_clip_tokenizer(tmp_path / "small", words=vocabulary()) / "tokenizer.json"))
    full = Tokenizer.from_file(str(write_clip_tokenizer(tmp_path / "full") / "tokenizer.json"))
    assert small.get_vocab_size() == 512 + len(merges_for_words(vocabulary())) + 2 < 1000
    for text in ["a red circle on a blue background", "a purple triangle on a white background"]:
        assert small.encode(text).tokens == full.encode(text).tokens
    # a word outside the vocabulary falls back to smaller pieces that still spell it
    pieces = small.encode("hexagon").tokens[1:-1]
    assert len(pieces) > 1 and "".join(pieces).replace("</w>", "") == "hexagon"


# --- KID and the shipped classifier -------------------------------------------------------------------------


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    from sdedge.tinyworld.classifier import kid

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    same, shifted = kid(a, b), kid(a, b + 0.5)
    assert abs(same) < 0.02 and shifted > 10 * max(abs(same), 1e-3)
    with pytest.raises(ValueError, match="KID"):
        kid(a[:1], b)


def test_shipped_classifier_reads_rendered_scenes():
    from sdedge.tinyworld.classifier import load_classifier, match_rate
    from sdedge.tinyworld.shapes import render_batch

    rng = np.random.default_rng(42)
    scenes = sample_scenes(rng, 60, ALL_COLOURS)
    rate = match_rate(load_classifier(), render_batch(scenes, rng), [s.caption for s in scenes])
    assert rate >= 0.95
    with pytest.raises(ValueError, match="shapes world"):
        match_rate(load_classifier(), render_batch(scenes[:1], rng), ["a cat"])


def test_packaged_weights_are_hash_checked(tmp_path, monkeypatch):
    from sdedge.runtime.errors import SdedgeError
    from sdedge.tinyworld import base as tiny_base

    data = tmp_path / "data"
    src = tiny_base.packaged_file(tiny_base.META_FILE).parent
    shutil.copytree(src, data)
    with open(data / tiny_base.WEIGHTS_FILE, "r+b") as f:  # flip one byte of the weights
        f.seek(4000)
        byte = f.read(1)
        f.seek(4000)
        f.write(bytes([byte[0] ^ 1]))

    class _Root:
        def joinpath(self, *parts):
            return tmp_path.joinpath(*parts)

    monkeypatch.setattr(tiny_base.resources, "files", lambda _pkg: _Root())
    with pytest.raises(SdedgeError, match="SHA-256 differs.*damaged"):
        tiny_base.packaged_file(tiny_base.WEIGHTS_FILE)
    assert tiny_base.packaged_file("shape-classifier.safetensors").is_file()


def test_shipped_files_are_small_and_recorded():
    from sdedge.tinyworld.base import META_FILE, packaged_file, tiny_meta

    meta = tiny_meta()
    total = sum(packaged_file(name).stat().st_size for name in meta["files"])
    assert total <= 20e6, total
    assert json.loads(packaged_file(META_FILE).read_text())["words"] == list(vocabulary())
    assert meta["training"]["evaluate"]["match_rate"] >= 0.8
    widen = meta["training"]["vae"]["widen"]  # the VAE encodes the held-out colour too
    assert widen["classifier_on_new_colour"]["all"] >= 0.95 and widen["new_colour_psnr_db"] >= 28


# --- the trained base generates what it is asked for ---------------------------------------------------------


@pytest.mark.slow
def test_trained_tiny_base_follows_prompts_and_random_weights_do_not(tmp_path):
    from sdedge.export.bases import load_base, write_builtin_base
    from sdedge.tinyworld.classifier import load_classifier, match_rate

    prompts = ["a red circle on a blue background", "a yellow square on a black background",
               "a white triangle on a green background", "a blue circle on a yellow background",
               "a green square on a red background", "a black triangle on a white background"]
    classifier = load_classifier()
    rates = {}
    for name in ("tiny", "tiny-random"):
        pipe = load_base(write_builtin_base(name, tmp_path / name))
        pipe.set_progress_bar_config(disable=True)
        imgs = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
        rates[name] = match_rate(classifier, (imgs * 255).round().astype(np.uint8), prompts)
    print("\nprompt-match rate:", rates)
    assert rates["tiny"] >= 0.5 and rates["tiny-random"] <= 0.2
