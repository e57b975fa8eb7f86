"""replace_dir: the one way a finished folder (bundle, base, dataset) is put in place."""

import pytest

from sdedge.runtime.files import replace_dir


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
