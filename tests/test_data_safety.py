"""Data safety (issue 18, musts 5-8): nothing of the user's is deleted, images as people have them, non-finite
numbers stop at the door, checkpoints survive a crash."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.files import replace_dir, scratch_dir
from sdedge.trainer.prepare import PrepareOptions, prepare_dataset

REPO = Path(__file__).resolve().parents[1]


def _textured(seed: int, size=(80, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (10, 10, 3)).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture()
def photos(tmp_path) -> Path:
    src = tmp_path / "project" / "photos"
    src.mkdir(parents=True)
    for i in range(3):
        _textured(i).save(src / f"p{i}.png")
        (src / f"p{i}.txt").write_text(f"photo number {i}", encoding="utf-8")
    return src


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 5. nothing of the user's is deleted ------------------------------------------------------------------------------
def test_prepare_overwrite_of_a_folder_holding_the_input_is_refused(photos):
    """`sdedge prepare photos/ --out . --overwrite` deleted the photos; now exit 2 naming both, nothing touched."""
    project = photos.parent
    (project / "notes.txt").write_text("mine")
    before = _files(project)
    run = subprocess.run([sys.executable, "-m", "sdedge", "prepare", "photos", "--out", ".", "--overwrite",
                          "--resolution", "64"], cwd=project, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "300"})
    assert run.returncode == 2, run.stderr
    assert "--out ." in run.stderr and "photos" in run.stderr and "nothing was deleted" in run.stderr
    assert _files(project) == before
    with pytest.raises(SdedgeError, match=r"holds, is or lies inside the input"):
        prepare_dataset(photos, project, PrepareOptions(resolution=64, overwrite=True, dedup=None))
    assert _files(project) == before


def test_overwrite_replaces_only_folders_sdedge_wrote(photos, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(SdedgeError, match=r"mine holds files that sdedge did not write \(no metadata.json"):
        prepare_dataset(photos, out, PrepareOptions(resolution=64, overwrite=True, dedup=None))
    # a metadata.json that is not sdedge's is no marker either
    (out / "metadata.json").write_text(json.dumps({"format": "somebody-else"}))
    with pytest.raises(SdedgeError, match="did not write"):
        prepare_dataset(photos, out, PrepareOptions(resolution=64, overwrite=True, dedup=None))
    assert (out / "thesis.tex").read_text() == "years of work"
    # a dataset sdedge prepared is replaced
    data = tmp_path / "data"
    prepare_dataset(photos, data, PrepareOptions(resolution=64, dedup=None))
    report = prepare_dataset(photos, data, PrepareOptions(resolution=64, overwrite=True, dedup=None))
    assert report.kept == 3
    # an --out inside the input is not replaced either (the input may hold it)
    inner = photos / "prepared"
    prepare_dataset(photos, inner, PrepareOptions(resolution=64, dedup=None))
    with pytest.raises(SdedgeError, match="inside the input"):
        prepare_dataset(photos, inner, PrepareOptions(resolution=64, overwrite=True, dedup=None))


def test_base_and_export_overwrite_refuse_user_folders(tmp_path):
    from sdedge.export.bases import write_builtin_base
    from sdedge.export.build import ExportOptions, export_bundle

    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.bin").write_bytes(b"1")
    with pytest.raises(SdedgeError, match=r"no sdedge_base.json or sdedge_pruned.json"):
        write_builtin_base("tiny-random", out, overwrite=True)
    with pytest.raises(SdedgeError, match=r"no sdedge.json"):
        export_bundle(tmp_path / "nobase", out, ExportOptions(overwrite=True))
    # a base folder that holds the export's --out's input: `export --base out/base --out out`
    (out / "sdedge.json").write_text("{}")
    (out / "base").mkdir()
    with pytest.raises(SdedgeError, match=r"holds, is or lies inside the input .*base"):
        export_bundle(out / "base", out, ExportOptions(overwrite=True))
    assert sorted(_files(out)) == ["keep.bin", "sdedge.json"]


def test_cli_prune_and_base_overwrite_exit_2(tmp_path):
    out = tmp_path / "user"
    out.mkdir()
    (out / "a.txt").write_text("a")
    for args in (["base", "tiny-random"], ["prune", str(tmp_path / "no-base"), "--ratio", "0.25"]):
        run = subprocess.run([sys.executable, "-m", "sdedge", *args, "--out", str(out), "--overwrite"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and "did not write" in run.stderr and str(out) in run.stderr, run.stderr
    assert _files(out) == {"a.txt": b"a"}


_KILL_CHILD = r"""
import os, sys, time
from pathlib import Path
from sdedge.runtime import files

out, ready = Path(sys.argv[1]), Path(sys.argv[2])
new = files.scratch_dir(out.parent, out.name)
(new / "new.txt").write_text("new")
real, calls = os.replace, []

def replace(a, b):  # the second rename of the swap never comes: the process is killed before it
    calls.append((a, b))
    if len(calls) == 2:
        ready.write_text("between the renames")
        time.sleep(600)
    return real(a, b)

files.os.replace = replace
files.replace_dir(new, out)
"""


def test_a_kill_between_the_two_renames_leaves_the_old_folder_and_the_next_run_restores_it(tmp_path, caplog,
                                                                                         photos):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the user's folder")
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(out), str(ready)])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), "the child never reached the point between the renames"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(30)
    assert not out.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".out.sdedge-") and p.name.endswith(".old")]
    assert len(aside) == 1 and (aside[0] / "old.txt").read_text() == "the user's folder"
    # the next run that writes there puts it back before it looks at --out (which is then not empty)
    with caplog.at_level(logging.WARNING, logger="sdedge"):
        with pytest.raises(SdedgeError, match="not empty"):
            prepare_dataset(photos, out, PrepareOptions(resolution=64, dedup=None))
    assert _files(out) == {"old.txt": b"the user's folder"}
    assert "restored" in caplog.text and str(child.pid) in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "project", "ready"]  # the child's new folder: gone


def test_a_dead_owners_old_folder_is_removed_when_the_swap_finished(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "new.txt").write_text("new")
    mine = scratch_dir(tmp_path, "out", ".old")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / mine.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    os.rename(mine, old)
    (old / "old.txt").write_text("old")
    scratch_dir(tmp_path, "other").rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    new = scratch_dir(tmp_path, "out")
    replace_dir(new, out)
    assert list(out.iterdir()) == []


def test_train_overwrite_deletes_only_in_a_run_folder_sdedge_made(photos, tmp_path):
    from sdedge.trainer.config import TrainConfig
    from sdedge.trainer.train import train

    data = tmp_path / "data"
    prepare_dataset(photos, data, PrepareOptions(resolution=64, dedup=None))
    out = tmp_path / "work"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "2019.log").write_text("the user's logs")
    (out / "config.yaml").write_text("mine: 1\n")
    before = _files(out)
    quiet = dict(progress=False, tensorboard=False, max_steps=1)
    with pytest.raises(SdedgeError, match=r"work holds files that sdedge did not write \(no sdedge_run.json"):
        train(TrainConfig(base=str(tmp_path / "base"), data=str(data), out=str(out), overwrite=True, **quiet))
    # the data inside --out: `train --data out/data --out out --overwrite`
    (out / "sdedge_run.json").write_text(json.dumps({"format": "sdedge-train-run", "version": 1}))
    inner = out / "data"
    prepare_dataset(photos, inner, PrepareOptions(resolution=64, dedup=None))
    with pytest.raises(SdedgeError, match=r"holds, is or lies inside the input .*data"):
        train(TrainConfig(base=str(tmp_path / "base"), data=str(inner), out=str(out), overwrite=True, **quiet))
    assert {k: v for k, v in _files(out).items() if k in before} == before


# -- 6. images as people have them -----------------------------------------------------------------------------------
def _ramp_row(path: Path) -> np.ndarray:
    from sdedge.trainer.images import open_image

    image, _ = open_image(path)
    return np.asarray(image)[0, :, 0].astype(int)


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16", ".tif"), ("I;16B", ".tif"), ("I", ".tif"),
                                          ("F", ".tif")])
def test_deep_images_keep_their_content(tmp_path, mode, suffix):
    """A 16-bit (or float) grey ramp stays a ramp over the whole 8-bit range (it came out nearly flat)."""
    ramp = np.linspace(0, 1, 256)
    values = {"I;16": (ramp * 65535).round().astype(np.uint16), "I;16B": (ramp * 65535).round().astype(">u2"),
              "I": (ramp * 65535).round().astype(np.int32), "F": ramp.astype(np.float32)}[mode]
    im = Image.fromarray(np.repeat(values[None], 8, axis=0))
    assert im.mode == mode
    im.save(tmp_path / f"ramp{suffix}")
    row = _ramp_row(tmp_path / f"ramp{suffix}")
    assert row[0] <= 1 and row[-1] >= 254 and np.all(np.diff(row) >= 0), row[::32]
    assert np.abs(row - np.arange(256)).max() <= 1


def _transparent_cases(tmp_path: Path) -> dict[str, Path]:
    """Left half opaque red (or grey 100), right half fully transparent, each as a different kind of file."""
    rgba = np.zeros((8, 16, 4), np.uint8)
    rgba[:, :8] = (200, 0, 0, 255)
    cases = {}
    cases["palette"] = tmp_path / "p.png"
    Image.fromarray(rgba, "RGBA").quantize(colors=4, method=Image.Quantize.FASTOCTREE).save(cases["palette"])
    la = Image.fromarray(np.stack([np.full((8, 16), 100, np.uint8), rgba[..., 3]], -1), "LA")
    cases["LA"] = tmp_path / "la.png"
    la.save(cases["LA"])
    key = rgba[..., :3].copy()
    key[:, 8:] = (1, 2, 3)
    cases["tRNS-rgb"] = tmp_path / "key.png"
    Image.fromarray(key, "RGB").save(cases["tRNS-rgb"], transparency=(1, 2, 3))
    grey = np.where(rgba[..., 3] > 0, 100, 7).astype(np.uint8)
    cases["tRNS-grey"] = tmp_path / "keyl.png"
    Image.fromarray(grey, "L").save(cases["tRNS-grey"], transparency=7)
    # a TIFF with associated (premultiplied) alpha: ExtraSamples 1 instead of Pillow's 2
    Image.fromarray(rgba, "RGBA").save(tmp_path / "plain.tif", compression=None)
    entry = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"
    cases["associated-alpha"] = tmp_path / "associated.tif"
    cases["associated-alpha"].write_bytes((tmp_path / "plain.tif").read_bytes().replace(entry, entry[:-2] + b"\x01\x00"))
    return cases


@pytest.mark.parametrize("background, rgb", [("white", (255, 255, 255)), ("#204060", (32, 64, 96))])
def test_transparency_is_composited_on_the_background(tmp_path, background, rgb):
    from sdedge.trainer.images import open_image

    for kind, path in _transparent_cases(tmp_path).items():
        image, _ = open_image(path, background=rgb)
        a = np.asarray(image)
        assert tuple(a[4, 12]) == rgb, (kind, a[4, 12])
        assert tuple(a[4, 2]) in ((200, 0, 0), (100, 100, 100)), (kind, a[4, 2])
    # PA and RGBa (premultiplied) are modes no file decodes to: the conversion itself
    from sdedge.trainer.images import _to_rgb

    pa = Image.new("PA", (4, 4))
    pa.putpalette([200, 0, 0] * 256)
    assert tuple(np.asarray(_to_rgb(pa, None, rgb))[0, 0]) == rgb
    premultiplied = Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBa")
    assert tuple(np.asarray(_to_rgb(premultiplied, None, rgb))[0, 0]) == rgb


def test_prepare_background_flag(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :32] = (200, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(src / "half.png")
    (src / "half.txt").write_text("half a square")
    run = subprocess.run([sys.executable, "-m", "sdedge", "prepare", str(src), "--out", str(tmp_path / "data"),
                          "--resolution", "64", "--background", "#000080"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    with Image.open(tmp_path / "data" / "images" / "half.png") as im:
        assert im.getpixel((48, 32)) == (0, 0, 128) and im.getpixel((8, 32)) == (200, 0, 0)
    with pytest.raises(SdedgeError, match="--background 'nope'"):
        prepare_dataset(src, tmp_path / "d2", PrepareOptions(resolution=64, background="nope"))


def _icc_rgb_profile(primaries) -> bytes:
    """A minimal ICC v2 display profile: matrix (the three primaries, XYZ D50) and gamma 1.0 curves."""
    import struct

    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(v):
        return b"XYZ " + b"\0" * 4 + b"".join(s15(c) for c in v)

    desc = b"desc" + b"\0" * 4 + struct.pack(">I", 5) + b"test\0" + b"\0" * 8 + b"\0" * 3 + b"\0" * 67
    curve = b"curv" + b"\0" * 4 + struct.pack(">I", 1) + struct.pack(">H", 256) + b"\0\0"
    tags = [(b"desc", desc), (b"wtpt", xyz((0.9642, 1.0, 0.8249))), (b"rXYZ", xyz(primaries[0])),
            (b"gXYZ", xyz(primaries[1])), (b"bXYZ", xyz(primaries[2])), (b"rTRC", curve), (b"gTRC", curve),
            (b"bTRC", curve), (b"cprt", b"text" + b"\0" * 4 + b"none\0\0\0\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + b"\0" * 12
              + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48)
    assert len(header) == 128
    return header + table + data


def test_icc_profiles_and_cmyk_become_srgb(tmp_path):
    from sdedge.trainer.images import open_image

    srgb_d50 = [(0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)]
    swapped = _icc_rgb_profile([srgb_d50[1], srgb_d50[0], srgb_d50[2]])  # its "red" is sRGB's green
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    red.save(tmp_path / "tagged.png", icc_profile=swapped)
    r, g, b = np.asarray(open_image(tmp_path / "tagged.png")[0])[0, 0].astype(int)
    assert g > 200 and r < 60 and b < 60, (r, g, b)
    red.save(tmp_path / "tagged.jpg", icc_profile=swapped, quality=95)
    assert np.asarray(open_image(tmp_path / "tagged.jpg")[0])[0, 0, 1] > 200
    # CMYK (a print JPEG) comes out as the colour it was made from
    Image.new("RGB", (8, 8), (200, 60, 30)).convert("CMYK").save(tmp_path / "print.jpg", quality=98)
    image, fmt = open_image(tmp_path / "print.jpg")
    assert image.mode == "RGB" and fmt == "JPEG"
    assert np.abs(np.asarray(image)[4, 4].astype(int) - (200, 60, 30)).max() <= 6
    # a broken profile is a reason, not a crash
    red.save(tmp_path / "broken.png", icc_profile=b"not a profile at all" * 8)
    from sdedge.trainer.images import ImageSkip

    with pytest.raises(ImageSkip, match="ICC colour profile cannot be applied"):
        open_image(tmp_path / "broken.png")


def test_only_the_accepted_formats_are_decoded(tmp_path, monkeypatch):
    """A GIF is refused before Pillow's GIF parser ever sees it (Image.open(formats=...))."""
    from PIL import GifImagePlugin

    from sdedge.trainer.images import ImageSkip, open_image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.gif")
    calls = []
    real = GifImagePlugin.GifImageFile._open
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_open", lambda self: (calls.append(1), real(self))[1])
    with pytest.raises(ImageSkip, match="unsupported image format GIF"):
        open_image(tmp_path / "x.gif")
    assert calls == []
    (tmp_path / "x.png").write_bytes((tmp_path / "x.gif").read_bytes())  # the name does not matter
    with pytest.raises(ImageSkip, match="unsupported image format GIF"):
        open_image(tmp_path / "x.png")
    assert calls == []


def test_symlinks_out_of_the_input_and_bad_caption_files_are_skipped_with_a_reason(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _textured(10).save(outside / "secret.png")
    (outside / "secret.txt").write_text("a secret", encoding="utf-8")
    (outside / "dir").mkdir()
    _textured(11).save(outside / "dir" / "x.png")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        _textured(i).save(src / f"ok{i}.png")
        (src / f"ok{i}.txt").write_text(f"fine caption {i}", encoding="utf-8")
    (src / "link.png").symlink_to(outside / "secret.png")
    (src / "link.txt").symlink_to(outside / "secret.txt")
    _textured(3).save(src / "captionlink.png")
    (src / "captionlink.txt").symlink_to(outside / "secret.txt")
    (src / "dirlink").symlink_to(outside / "dir", target_is_directory=True)
    (src / "inside.png").symlink_to(src / "ok0.png")  # a link within the folder is fine
    (src / "inside.txt").write_text("linked inside", encoding="utf-8")
    _textured(4).save(src / "huge.png")
    (src / "huge.txt").write_text("word " * 30000, encoding="utf-8")
    _textured(5).save(src / "latin1.png")
    (src / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    sub = src / "sub"
    sub.mkdir()
    _textured(6).save(sub / "m.png")
    (sub / "metadata.jsonl").write_bytes(json.dumps({"file_name": "m.png", "text": "caf\xe9"}).encode("utf-16"))
    report = prepare_dataset(src, tmp_path / "data", PrepareOptions(resolution=64, dedup=None))
    r = dict(report.skipped)
    assert r["link.png"].startswith("a symbolic link to outside the input folder")
    assert r["link.txt"].startswith("a symbolic link to outside the input folder")
    assert r["dirlink"].startswith("a symbolic link to outside the input folder")
    assert "captionlink.txt is a symbolic link to outside" in r["captionlink.png"]
    assert "over the 65536-byte limit" in r["huge.png"]
    assert "latin1.txt is not UTF-8" in r["latin1.png"]
    assert "metadata.jsonl is not UTF-8" in r["sub/metadata.jsonl"]
    meta = json.loads((tmp_path / "data" / "metadata.json").read_text())
    assert sorted(e["source"] for e in meta["items"]) == ["inside.png", "ok0.png", "ok1.png"]
    assert "secret" not in (tmp_path / "data" / "metadata.json").read_text()


# -- 8. checkpoints survive power loss ---------------------------------------------------------------------------------
def _tiny_state(step: int):
    """save_checkpoint's (state, trainable, optimizer tensors) of a one-parameter AdamW after one step."""
    import torch

    from sdedge.trainer.checkpoint import CheckpointState, optimizer_to_flat

    p = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    opt_tensors, opt_rest = optimizer_to_flat(opt.state_dict())
    trainable = {"unet.layer.lora_A.weight": p.detach().clone() + step}
    return CheckpointState(step=step, optimizer=opt_rest, loss=0.5), trainable, opt_tensors


def test_checkpoint_files_and_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    from sdedge.trainer import checkpoint as ck

    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b, **kw):
        events.append(("rename", str(a), str(b)))
        return real_replace(a, b, **kw)

    def rename(a, b, **kw):
        events.append(("rename", str(a), str(b)))
        return real_rename(a, b, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    final = ck.save_checkpoint(tmp_path, *_tiny_state(7))
    into_place = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final))
    staged = Path(events[into_place][1])
    before = [e[1] for e in events[:into_place] if e[0] == "fsync"]
    for name in ("trainable.safetensors", "optimizer.safetensors", "state.json"):
        assert any(Path(p).parent == staged and Path(p).name.startswith(f".{name}.") for p in before), name
    assert str(staged) in before, "the checkpoint folder itself was not fsynced before the rename"
    assert str(tmp_path) in [e[1] for e in events[into_place:] if e[0] == "fsync"], "the parent was not fsynced"
    state = ck.read_checkpoint(final).state
    assert state.step == 7 and set(state.files) == {"trainable.safetensors", "optimizer.safetensors"}


def test_a_damaged_newest_checkpoint_falls_back_and_older_ones_are_kept(tmp_path, caplog):
    from sdedge.trainer import checkpoint as ck

    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, *_tiny_state(step))
    newest = tmp_path / "step-000003" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:-8])  # a write the power cut left short
    with caplog.at_level(logging.WARNING, logger="sdedge.trainer"):
        assert ck.latest_checkpoint(tmp_path) == tmp_path / "step-000002"
    assert "step-000003 is damaged" in caplog.text
    ck.prune_checkpoints(tmp_path, keep=1)  # the damaged step 3 does not count: step 2 stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003"]
    # a flipped bit in a tensor that still parses is caught by the SHA-256 in state.json
    second = tmp_path / "step-000002" / "optimizer.safetensors"
    data = bytearray(second.read_bytes())
    data[-1] ^= 1
    second.write_bytes(bytes(data))
    with pytest.raises(SdedgeError, match="optimizer.safetensors: damaged"):
        ck.read_checkpoint(tmp_path / "step-000002")
    assert ck.latest_checkpoint(tmp_path) is None


# -- 7 and 8 on a real (tiny) training run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    from sdedge.export.bases import write_builtin_base

    root = tmp_path_factory.mktemp("train")
    src = root / "src"
    src.mkdir()
    for i in range(4):
        _textured(20 + i, (64, 64)).save(src / f"i{i}.png")
        (src / f"i{i}.txt").write_text(f"picture {i}")
    prepare_dataset(src, root / "data", PrepareOptions(resolution=64, dedup=None))
    return write_builtin_base("tiny-random", root / "base", seed=0), root / "data"


def _cfg(run_inputs, out, **kw):
    from sdedge.trainer.config import TrainConfig

    base, data = run_inputs
    return TrainConfig(**{**dict(base=str(base), data=str(data), out=str(out), rank=4, batch_size=2,
                                 progress=False, tensorboard=False, checkpoint_steps=1), **kw})


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(run_inputs, tmp_path):
    from sdedge.trainer.checkpoint import latest_checkpoint, read_checkpoint
    from sdedge.trainer.train import train

    out = tmp_path / "run"
    with pytest.raises(SdedgeError, match=r"training stopped at step \d+: the loss is (nan|inf)") as err:
        train(_cfg(run_inputs, out, learning_rate=1e30, max_steps=8))  # diverges within a step or two
    assert "the last good checkpoint" in str(err.value) or "no checkpoint" in str(err.value)
    assert not (out / "adapter.safetensors").exists() and not (out / "adapter.json").exists()
    last = latest_checkpoint(out / "checkpoints")
    if last is not None:  # every checkpoint left is whole and finite
        state = read_checkpoint(last).state
        assert np.isfinite(state.loss)
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else ():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds a bare {c}"))


@pytest.mark.slow
def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_damaged(run_inputs, tmp_path, caplog):
    from sdedge.trainer.train import train

    out = tmp_path / "run"
    train(_cfg(run_inputs, out, max_steps=4, learning_rate=1e-3, checkpoints_total_limit=3), stop_after=3)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002", "step-000003"]
    (out / "checkpoints" / "step-000003" / "trainable.safetensors").write_bytes(b"")  # lost to a power cut
    with caplog.at_level(logging.WARNING, logger="sdedge.trainer"):
        result = train(_cfg(run_inputs, out, max_steps=4, learning_rate=1e-3, resume="latest"))
    assert result.resumed_from == 2 and "step-000003 is damaged" in caplog.text
    doc = json.loads((out / "adapter.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert doc["resumed_from"] == 2 and np.isfinite(doc["final_loss"])


# -- 7. non-finite numbers stop at the door ------------------------------------------------------------------------------
_MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _write_lora(path: Path, down, up, meta: dict | None = None, module: str = _MODULE) -> Path:
    from safetensors.torch import save_file

    header = {"lora_adapter_metadata": json.dumps(meta)} if meta is not None else None
    save_file({f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up}, str(path), metadata=header)
    return path


def test_lora_with_nan_inf_rank_0_or_a_bad_alpha_is_refused(tmp_path):
    import torch

    from sdedge.export.lora import LoraError, read_lora

    good = read_lora(_write_lora(tmp_path / "good.safetensors", torch.ones(4, 8), torch.ones(8, 4),
                                 {"lora_alpha": 8, "alpha_pattern": {"attn1.to_q": 2}}))
    assert [lay.alpha for lay in good.layers.values()] == [2.0]  # a dotted suffix of the module name
    bad_down = torch.ones(4, 8)
    bad_down[1, 2] = float("nan")
    with pytest.raises(LoraError, match=rf"tensor 'unet.{_MODULE}.lora_A.weight' holds NaN"):
        read_lora(_write_lora(tmp_path / "nan.safetensors", bad_down, torch.ones(8, 4)))
    with pytest.raises(LoraError, match="holds NaN or infinite"):
        read_lora(_write_lora(tmp_path / "inf.safetensors", torch.ones(4, 8), torch.full((8, 4), float("inf"))))
    with pytest.raises(LoraError, match="rank 0"):
        read_lora(_write_lora(tmp_path / "rank0.safetensors", torch.ones(0, 8), torch.ones(8, 0)))
    with pytest.raises(LoraError, match=r"alpha.safetensors: lora_adapter_metadata header: .*Infinity is not a JSON number"):
        read_lora(_write_lora(tmp_path / "alpha.safetensors", torch.ones(4, 8), torch.ones(8, 4),
                              {"lora_alpha": 1e400}))
    from safetensors.torch import save_file

    deep = tmp_path / "deep.safetensors"  # json.loads raised RecursionError, a traceback, on this header
    save_file({f"unet.{_MODULE}.lora_A.weight": torch.ones(4, 8), f"unet.{_MODULE}.lora_B.weight": torch.ones(8, 4)},
              str(deep), metadata={"lora_adapter_metadata": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(LoraError, match="deep.safetensors: lora_adapter_metadata header: nested"):
        read_lora(deep)
    with pytest.raises(LoraError, match=r"alpha_pattern key '\(\['"):
        read_lora(_write_lora(tmp_path / "re.safetensors", torch.ones(4, 8), torch.ones(8, 4),
                              {"alpha_pattern": {"([": 1}}))


_HOSTILE_PATTERN = r"""
import json, sys, torch
from safetensors.torch import save_file
from sdedge.export.lora import LoraError, read_lora
module = "a" * 40 + "b"
meta = {"alpha_pattern": {"(a+)+c": 1.0, "(.*a){30}": 2.0}}
save_file({f"unet.{module}.lora_A.weight": torch.ones(2, 4), f"unet.{module}.lora_B.weight": torch.ones(4, 2)},
          sys.argv[1], metadata={"lora_adapter_metadata": json.dumps(meta)})
try:
    read_lora(sys.argv[1])
except LoraError as e:
    print("refused:", e)
"""


def test_a_hostile_alpha_pattern_cannot_hang_the_load(tmp_path):
    """(a+)+c against "aaa...ab" backtracks for hours with Python's re; sdedge never runs the key as a regex."""
    run = subprocess.run([sys.executable, "-c", _HOSTILE_PATTERN, str(tmp_path / "evil.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "refused:" in run.stdout and "not as regular expressions" in run.stdout


def test_a_base_with_a_nan_weight_is_refused_naming_the_tensor(run_inputs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from sdedge.export.bases import load_base

    base = tmp_path / "base"
    shutil.copytree(run_inputs[0], base)
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(SdedgeError, match=r"unet tensor 'conv_in.weight' holds NaN or infinite values"):
        load_base(base)


def test_a_non_finite_calibration_activation_is_an_error_naming_it(tmp_path):
    from sdedge.export.calibration import CalibrationSet

    good = tmp_path / "unet-p000-000.npz"
    np.savez(good, sample=np.ones((2, 4, 8, 8), np.float32), timestep=np.zeros(2, np.float32))
    bad = tmp_path / "unet-p000-001.npz"
    sample = np.ones((2, 4, 8, 8), np.float32)
    sample[1, 2, 3, 4] = np.inf
    np.savez(bad, sample=sample, timestep=np.zeros(2, np.float32))
    it = iter(CalibrationSet([good, bad]))
    assert set(next(it)) == {"sample", "timestep"}
    with pytest.raises(SdedgeError, match=r"unet-p000-001.npz: calibration activation 'sample' holds NaN or "
                                          r"infinite values \(1 of 512\)"):
        next(it)


def test_the_component_parity_gate_fails_on_nan(tmp_path):
    """A graph whose output is NaN where PyTorch's is too: the max abs error was max(0.0, nan) = 0.0, a pass."""
    import torch

    from sdedge.export.onnx_export import ExportError, check_parity, torch_references
    from sdedge.export.specs import ComponentSpec, TensorSpec

    class Log(torch.nn.Module):
        def forward(self, x):  # (B, 4) -> (B, 4): NaN where x < 0
            return torch.log(x)

    spec = ComponentSpec(name="toy", inputs=(TensorSpec("x", "float32", ("B", 4)),),
                         outputs=(TensorSpec("y", "float32", ("B", 4)),), module=lambda pipe: Log())
    path = tmp_path / "toy.onnx"
    torch.onnx.export(Log(), (torch.ones(2, 4),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    with pytest.raises(ExportError, match=r"toy: output y at 2x4 holds NaN or infinite values"):
        check_parity(spec, path, {}, [{"B": 2}], torch_references(spec, Log(), {}, [{"B": 2}], vocab=10))
