"""replace_dir: the one way a finished folder (bundle, base, dataset) is put in place; scratch folders and
what a killed export leaves behind."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdedge.runtime.files import replace_dir, scratch_dir, sweep_stale


def test_replace_dir_replaces_and_leaves_nothing_behind(tmp_path):
    out, new = tmp_path / "out", tmp_path / ".out.tmp"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_dir_puts_the_old_folder_back_when_the_rename_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / "missing", out)
    assert (out / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_dir_into_a_new_place(tmp_path):
    new = tmp_path / "n"
    new.mkdir()
    replace_dir(new, tmp_path / "fresh")
    assert (tmp_path / "fresh").is_dir() and not new.exists()


# -- scratch folders: what a killed process leaves, and what the next writer sweeps -------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_dead_owners_leftovers(tmp_path):
    mine = scratch_dir(tmp_path, "bundle")
    assert mine.name.startswith(".bundle.sdedge-") and f"-{os.getpid()}-" in mine.name
    host = mine.name.split(".sdedge-")[1].rsplit(f"-{os.getpid()}-", 1)[0]
    dead = tmp_path / f".bundle.sdedge-{host}-{_dead_pid()}-abc.tmp"
    alive = tmp_path / f".bundle.sdedge-{host}-{os.getppid()}-abc.tmp"  # our parent: running
    other_host = tmp_path / f".bundle.sdedge-elsewhere-{_dead_pid()}-abc.tmp"  # cannot tell: kept
    user = tmp_path / ".bundle.tmp-mine"  # not ours
    for p in (dead, alive, other_host, user):
        p.mkdir()
    (dead / "unet.onnx").write_bytes(b"x" * 10)
    assert sweep_stale(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (mine, alive, other_host, user))


def _scratch(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".sdedge-" in p.name]


def _export_until_scratch(base: Path, out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start `sdedge export` over an existing bundle, send `sig` once its scratch folder exists."""
    proc = subprocess.Popen([sys.executable, "-m", "sdedge", "export", "--base", str(base), "--out", str(out),
                             "--overwrite", "--parity-steps", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while not _scratch(out.parent) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the export ended before it wrote anything: nothing to interrupt"
    time.sleep(0.5)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")


@pytest.mark.slow
def test_terminated_export_cleans_up_and_keeps_the_old_bundle(tiny_base, tiny_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    done = _export_until_scratch(tiny_base, out, signal.SIGTERM)
    assert done.returncode == 128 + signal.SIGTERM, done.stdout[-2000:]
    assert _scratch(tmp_path) == [], "SIGTERM left scratch folders"
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # SIGKILL cannot be caught: its leftovers stay until the next write into the same folder sweeps them
    done = _export_until_scratch(tiny_base, out, signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    left = _scratch(tmp_path)
    assert left
    fresh = scratch_dir(tmp_path, "next")
    assert _scratch(tmp_path) == [fresh]
