"""`sdedge prepare`: captions, safe reading, resizing, metadata stripping, duplicates, the report."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from sdedge.runtime.errors import SdedgeError
from sdedge.trainer.prepare import PrepareOptions, prepare_dataset

REPO = Path(__file__).resolve().parents[1]


def textured(seed: int, size=(96, 80), color=(220, 30, 30)) -> Image.Image:
    """A photo-like test image: smooth random texture with a coloured disc (pHash needs texture)."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (12, 12, 3)).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    ImageDraw.Draw(im).ellipse((20, 15, 60, 55), fill=color)
    return im


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reasons(report) -> dict[str, str]:
    return dict(report.skipped)


@pytest.fixture()
def photos(tmp_path) -> Path:
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x010F] = "SecretCamera"  # Make
    exif[0x8825] = {2: (51.0, 30.0, 0.0)}  # GPS latitude
    textured(1).save(src / "a.jpg", exif=exif.tobytes(), quality=95)
    (src / "a.txt").write_text("  a red disc\n", encoding="utf-8")
    textured(2, size=(80, 120)).save(src / "b.png")
    (src / "b.txt").write_text("a tall picture", encoding="utf-8")
    textured(3).save(src / "sub" / "c.webp")
    textured(4).save(src / "d.png")  # caption from metadata.jsonl
    (src / "metadata.jsonl").write_text(
        json.dumps({"file_name": "sub/c.webp", "text": "a webp disc"}) + "\n"
        + json.dumps({"file_name": "d.png", "text": "from jsonl"}) + "\n"
        + "{broken\n"
        + json.dumps({"file_name": "gone.png", "text": "missing"}) + "\n", encoding="utf-8")
    # problems, each must be a report line
    (src / "corrupt.png").write_bytes((src / "b.png").read_bytes()[:300])
    (src / "corrupt.txt").write_text("x")
    (src / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    textured(5).save(src / "anim.gif")
    (src / "anim.txt").write_text("gif")
    textured(6).save(src / "nocaption.png")
    textured(7, size=(20, 20)).save(src / "tiny.png")
    (src / "tiny.txt").write_text("too small")
    textured(8).save(src / "empty.png")
    (src / "empty.txt").write_text("   \n")
    (src / "orphan.txt").write_text("caption without image")
    # duplicates: a lossless copy of a's pixels, and a brighter re-encode of b
    Image.open(src / "a.jpg").save(src / "a_copy.png")
    (src / "a_copy.txt").write_text("same pixels")
    ImageEnhance.Brightness(Image.open(src / "b.png")).enhance(1.06).save(src / "b_bright.jpg", quality=90)
    (src / "b_bright.txt").write_text("near duplicate")
    return src


def test_prepare_keeps_good_images_and_reports_every_other_file(photos, tmp_path):
    out = tmp_path / "data"
    report = prepare_dataset(photos, out, PrepareOptions(resolution=64))
    r = reasons(report)
    assert report.kept == 4 and report.augmented == 0
    assert r["corrupt.png"].startswith("corrupt image")
    assert r["notes.pdf"].startswith("not an image")
    assert r["anim.gif"].startswith("unsupported image format GIF")
    assert r["nocaption.png"].startswith("no caption")
    assert r["tiny.png"].startswith("too small: 20x20") and "--min-size 32" in r["tiny.png"]
    assert r["empty.png"] == "empty caption"
    assert r["orphan.txt"] == "caption without an image"
    assert r["gone.png"] == "listed in metadata but not found"
    assert r["metadata.jsonl:3"].startswith("bad JSON line")
    assert r["a_copy.png"] == "exact duplicate of a.jpg"
    assert r["b_bright.jpg"].startswith("near duplicate (phash similarity") and r["b_bright.jpg"].endswith("of b.png")

    meta = json.loads((out / "metadata.json").read_text())
    assert meta["format"] == "sdedge-data" and meta["resolution"] == 64
    assert meta["counts"] == {"inputs": 12, "kept": 4, "augmented": 0, "skipped": len(report.skipped)}
    items = {e["source"]: e for e in meta["items"]}
    assert set(items) == {"a.jpg", "b.png", "sub/c.webp", "d.png"}
    assert items["a.jpg"]["text"] == "a red disc" and items["sub/c.webp"]["text"] == "a webp disc"
    assert items["d.png"]["text"] == "from jsonl" and items["b.png"]["source_size"] == [80, 120]
    for e in meta["items"]:
        img, cap = out / e["image"], out / e["caption"]
        assert e["sha256"] == sha(img) and e["caption_sha256"] == sha(cap)
        assert cap.read_text(encoding="utf-8") == e["text"] + "\n"
        with Image.open(img) as im:
            assert im.size == (64, 64) and im.mode == "RGB" and im.format == "PNG"
    assert {p.name for p in (out / "images").iterdir()} == {"a.png", "b.png", "sub_c.png", "d.png"}
    assert len(meta["dataset_sha256"]) == 64 == len(report.dataset_sha256)
    assert [s["source"] for s in meta["skipped"]] == [s for s, _ in report.skipped]


def test_exif_and_all_metadata_are_stripped(photos, tmp_path):
    assert b"SecretCamera" in (photos / "a.jpg").read_bytes()
    out = tmp_path / "data"
    prepare_dataset(photos, out, PrepareOptions(resolution=64))
    data = (out / "images" / "a.png").read_bytes()
    assert b"SecretCamera" not in data and b"Exif" not in data and b"eXIf" not in data
    with Image.open(out / "images" / "a.png") as im:
        assert dict(im.getexif()) == {} and "exif" not in im.info and "icc_profile" not in im.info


def test_resize_centre_crop(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    im = Image.new("RGB", (200, 100), (0, 0, 255))
    ImageDraw.Draw(im).rectangle((50, 0, 149, 99), fill=(255, 0, 0))  # red centre square, blue sides
    im.save(src / "wide.png")
    (src / "wide.txt").write_text("wide")
    prepare_dataset(src, tmp_path / "out", PrepareOptions(resolution=64))
    arr = np.asarray(Image.open(tmp_path / "out" / "images" / "wide.png"))
    assert arr.shape == (64, 64, 3)
    assert arr[:, 2:-2, 0].min() > 200 and arr[:, 2:-2, 2].max() < 60  # only the red centre is left


def test_metadata_csv_captions_and_buckets(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    textured(1, size=(512, 256)).save(src / "wide.png")
    textured(2, size=(256, 256)).save(src / "square.png")
    (src / "metadata.csv").write_text('file_name,text\nwide.png,"a wide, flat picture"\nsquare.png,square\n')
    out = tmp_path / "out"
    report = prepare_dataset(src, out, PrepareOptions(resolution=256, buckets=True, dedup=None))
    assert report.kept == 2
    items = {e["source"]: e for e in json.loads((out / "metadata.json").read_text())["items"]}
    assert items["wide.png"]["text"] == "a wide, flat picture"
    w, h = items["wide.png"]["width"], items["wide.png"]["height"]
    assert (w, h) == (320, 192) and w * h <= 256 * 256  # the bucket nearest 2:1 of about 256² pixels
    assert (items["square.png"]["width"], items["square.png"]["height"]) == (256, 256)
    with Image.open(out / items["wide.png"]["image"]) as im:
        assert im.size == (w, h)


def test_augment_adds_copies(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    textured(1).save(src / "x.png")
    (src / "x.txt").write_text("x")
    out = tmp_path / "out"
    report = prepare_dataset(src, out, PrepareOptions(resolution=64, augment=("flip", "rotate", "brightness")))
    assert report.kept == 1 and report.augmented == 3
    meta = json.loads((out / "metadata.json").read_text())
    orig = np.asarray(Image.open(out / "images" / "x.png"))
    flip = np.asarray(Image.open(out / "images" / "x-flip.png"))
    assert np.array_equal(flip, orig[:, ::-1])
    augs = {e["augment"]: e for e in meta["items"] if e["augment"]}
    assert set(augs) == {"flip", "rotate", "brightness"} and all(e["of"] == "images/x.png" for e in augs.values())
    assert all(e["text"] == "x" for e in meta["items"])


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    textured(1, size=(300, 300)).save(src / "big.png")
    (src / "big.txt").write_text("big")
    textured(2).save(src / "ok.png")
    (src / "ok.txt").write_text("ok")
    report = prepare_dataset(src, tmp_path / "o1", PrepareOptions(resolution=64, max_pixels=50_000))
    assert "decompression-bomb limit of 50000" in reasons(report)["big.png"]
    # Pillow's own limit stays on and is honoured (lowered here so a small file trips it)
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 40_000)
    report = prepare_dataset(src, tmp_path / "o2", PrepareOptions(resolution=64))
    assert "decompression-bomb" in reasons(report)["big.png"] and report.kept == 1
    # max_pixels cannot raise the limit
    report = prepare_dataset(src, tmp_path / "o3", PrepareOptions(resolution=64, max_pixels=10**9))
    assert "decompression-bomb" in reasons(report)["big.png"]


def test_nothing_usable_is_an_error_and_out_is_protected(tmp_path, photos):
    src = tmp_path / "junk"
    src.mkdir()
    (src / "a.png").write_bytes(b"nope")
    (src / "b.jpg").write_bytes(b"")
    with pytest.raises(SdedgeError, match=r"no usable images in .*a\.png: not an image"):
        prepare_dataset(src, tmp_path / "out", PrepareOptions(resolution=64))
    assert not (tmp_path / "out").exists()
    with pytest.raises(SdedgeError, match="input folder not found"):
        prepare_dataset(tmp_path / "nope", tmp_path / "out", PrepareOptions())
    out = tmp_path / "data"
    prepare_dataset(photos, out, PrepareOptions(resolution=64))
    with pytest.raises(SdedgeError, match="not empty"):
        prepare_dataset(photos, out, PrepareOptions(resolution=64))
    prepare_dataset(photos, out, PrepareOptions(resolution=64, overwrite=True, dedup=None))
    assert json.loads((out / "metadata.json").read_text())["counts"]["kept"] == 6
    with pytest.raises(SdedgeError, match="--dedup"):
        prepare_dataset(photos, tmp_path / "x", PrepareOptions(dedup=1.5))
    with pytest.raises(SdedgeError, match="--augment 'zoom'"):
        prepare_dataset(photos, tmp_path / "x", PrepareOptions(augment=("zoom",)))


def test_clip_dedup_with_a_local_clip_model(tmp_path):
    """With --clip-model, near duplicates are also found by CLIP image-embedding cosine (a tiny random CLIP here:
    a re-encoded copy embeds at cosine ~1, so it goes even when the pHash threshold is set out of reach)."""
    pytest.importorskip("transformers")
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model_dir = tmp_path / "clip"
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(model_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(model_dir)
    src = tmp_path / "src"
    src.mkdir()
    textured(1).save(src / "a.png")
    textured(1).save(src / "b.jpg", quality=70)
    for n in ("a", "b"):
        (src / f"{n}.txt").write_text(n)
    report = prepare_dataset(src, tmp_path / "o1", PrepareOptions(resolution=64, dedup=0.999))
    assert report.kept == 2  # pHash alone: not similar enough at 0.999
    report = prepare_dataset(src, tmp_path / "o2", PrepareOptions(resolution=64, dedup=0.999,
                                                                  clip_model=str(model_dir)))
    assert report.kept == 1 and reasons(report)["b.jpg"].startswith("near duplicate (clip similarity")
    with pytest.raises(SdedgeError, match="--clip-model"):
        prepare_dataset(src, tmp_path / "o3", PrepareOptions(resolution=64, clip_model=str(tmp_path / "none")))


def test_cli_prepare(photos, tmp_path):
    import os

    out = tmp_path / "data"
    env = {**os.environ, "COLUMNS": "300"}  # rich wraps at 80 columns without a terminal
    run = subprocess.run([sys.executable, "-m", "sdedge", "prepare", str(photos), "--out", str(out),
                          "--resolution", "64", "--augment", "flip"], capture_output=True, text=True, cwd=REPO,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert "4 image(s) kept (+4 augmented copies)" in run.stderr and "corrupt.png" in run.stderr
    run = subprocess.run([sys.executable, "-m", "sdedge", "prepare", str(photos), "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert run.returncode == 2 and "not empty" in run.stderr
