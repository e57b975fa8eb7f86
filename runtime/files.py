"""Files and folders being written: the one atomic file writer (temporary name beside the target, fsync of the
file and of its folder, then rename), scratch folders that a killed process does not leave behind for good, and
the one shared way sdedge puts a finished bundle, base or dataset in place."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "check_replaceable",
           "check_sdedge_folder", "fsync_dir",
           "replace_dir", "scratch_dir", "staged_dir", "sweep_stale"]

log = logging.getLogger("sdedge")
# .<name>.sdedge-<host>-<pid>-<random><suffix>: the owner is in the name, so a later writer can tell a
# leftover of a killed process (SIGKILL, out of memory, power loss) from the folder of one still running.
_OWNED = re.compile(r"^\.(?P<name>.*)\.sdedge-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)-[^/]*?(?P<suffix>\.[a-z]+)?$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: int = 0o644, *, create: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (safetensors, onnx, a signer): when the
    block ends without an error the file is fsynced, given permissions `mode` and renamed to `path`, and the
    folder fsynced; on an error it is removed. Readers (and a power cut) see the old file or the new one.
    create=False hands out a unique name that does not exist yet (a signer that hashes the folder first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.sdedge-{_host()}-{os.getpid()}-"
    if create:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=path.parent)
        os.close(fd)
    else:
        name = os.path.join(path.parent, f"{prefix}{os.urandom(6).hex()}.part")
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically (`atomic_output`): the one file writer of sdedge, through which every
    document, weight file and cache entry goes. The temporary name `.<name>.sdedge-<host>-<pid>-<random>.part`
    names its owner, so the next writer in the folder removes what a killed process left (`sweep_stale`)."""
    with atomic_output(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike, data, mode: int = 0o644) -> None:
    """JSON with sorted-as-given keys, two-space indent, a final newline; NaN/Inf refused (not valid JSON)."""
    import json

    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n", mode)


def sweep_stale(parent: str | os.PathLike) -> list[Path]:
    """Clean up after the processes on this host that died while writing in `parent`; return what was handled.

    A dead owner's `.old` folder whose target is missing is the user's previous folder, caught between the two
    renames of `replace_dir`: it is renamed back to its name (and logged). Every other leftover is removed."""
    handled = []
    parent = Path(parent)
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return handled
    host = _host()
    for p in entries:
        m = _OWNED.match(p.name)
        if not (m and m["host"] == host and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"]))):
            continue
        target = parent / m["name"]
        if m["suffix"] == ".old" and p.is_dir() and not p.is_symlink() and m["name"] and \
                not os.path.lexists(target):
            os.replace(p, target)
            fsync_dir(parent)
            log.warning("restored %s from %s: process %s was killed while replacing it", target, p.name, m["pid"])
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            log.warning("removed %s, left by process %s that ended without cleaning up", p, m["pid"])
        else:
            p.unlink(missing_ok=True)
            log.warning("removed %s, left by process %s that ended without cleaning up", p, m["pid"])
        handled.append(p)
    return handled


def scratch_dir(parent: str | os.PathLike, name: str, suffix: str = ".tmp") -> Path:
    """A new empty folder `.<name>.sdedge-<host>-<pid>-<random><suffix>` in `parent` (created if needed),
    after sweeping the leftovers of dead owners there. The caller removes it (or renames it into place);
    `sdedge.cli` turns SIGTERM/SIGHUP into an exit that runs those clean-ups."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(parent)
    return Path(tempfile.mkdtemp(prefix=f".{name}.sdedge-{_host()}-{os.getpid()}-", suffix=suffix, dir=parent))


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, finish=None) -> Iterator[Path]:
    """A scratch folder beside `out` (the one folder-staging helper): when the block ends without an error,
    `finish(folder)` runs (if given) and the folder replaces `out` (`replace_dir`); on an error it is removed.
    The caller checks first that `out` may be replaced (`check_replaceable`)."""
    out = Path(out)
    tmp = scratch_dir(out.parent, out.name)
    try:
        yield tmp
        if finish is not None:
            finish(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: str | os.PathLike, out: str | os.PathLike) -> None:
    """Put the folder `new` at `out` (same file system), replacing what was there.

    The old folder is renamed aside (`.<name>.sdedge-<host>-<pid>-<random>.old`), the new one renamed in, then
    the old one deleted; if the second rename fails, the old folder is put back. Readers never see a half-written
    `out`, and a process killed between the two renames leaves the old folder whole: the next `sweep_stale` of
    the folder (every `scratch_dir` and `check_replaceable` there) renames it back.
    Callers that replace a folder the user named check it first with `check_replaceable`.
    """
    new, out = Path(new), Path(out)
    old = None
    fsync_dir(new)
    if out.exists():
        old = scratch_dir(out.parent, out.name, ".old")
        os.rmdir(old)  # a unique name that os.replace may take
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _has_marker(folder: Path, markers: dict) -> bool:
    """True when `folder` holds one of `markers`: file name -> the DocumentType (runtime/documents.py) it must
    declare itself to be, or None for any file of that name."""
    for name, doc in markers.items():
        p = folder / name
        if not p.is_file() or p.is_symlink():
            continue
        if doc is None or doc.declared_by(p):
            return True
    return False


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_replaceable(out: str | os.PathLike, markers: dict, inputs=(), *,
                      overwrite: bool = False, what: str = "--out") -> None:
    """May a write put a new folder at `out`? Raise `SdedgeError` (exit code 2) naming the paths when not.

    A missing `out` or an empty folder may always be replaced. A non-empty one only with `overwrite`, and only
    when it carries one of sdedge's `markers` (file name -> the DocumentType it must declare, or None for any)
    and neither is, holds nor lies inside one of `inputs` (what the command reads). A folder left
    half-replaced by a killed process is restored first (see `sweep_stale`), so it is checked like any other."""
    from .errors import SdedgeError

    out = Path(out)
    sweep_stale(out.absolute().parent)
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise SdedgeError(f"{what} {out} exists and is not a folder; nothing was replaced: remove it yourself "
                          "or choose another folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise SdedgeError(f"{what} {out}: already exists and is not empty; choose another folder or pass --overwrite")
    check_sdedge_folder(out, markers, inputs, what)


def check_sdedge_folder(out: str | os.PathLike, markers: dict, inputs=(),
                        what: str = "--out") -> None:
    """Raise `BadInput` unless the folder `out` carries one of sdedge's `markers` and is, holds and lies inside
    none of `inputs`: the test before `--overwrite` deletes anything in it."""
    from .errors import BadInput

    out = Path(out)
    real = out.resolve()
    for src in inputs:
        if src is not None and _overlap(real, Path(src).resolve()):
            raise BadInput(f"{what} {out} would replace a folder that holds, is or lies inside the input {src}; "
                           "nothing was deleted: choose another folder for the output")
    if not _has_marker(out, markers):
        names = " or ".join(markers)
        raise BadInput(f"{what} {out} holds files that sdedge did not write (no {names} in it), so --overwrite "
                       "will not replace it; nothing was deleted: remove it yourself or choose another folder")
