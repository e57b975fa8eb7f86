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
