"""Files and folders being written: the one atomic file writer (temporary name beside the target, fsync of the
file and of its folder, then rename), scratch folders that a killed process does not leave behind for good, and
the one shared way sdedge puts a finished bundle, base or dataset in place."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir", "replace_dir", "scratch_dir",
           "sweep_stale"]

log = logging.getLogger("sdedge")
# .<name>.sdedge-<host>-<pid>-<random><suffix>: the owner is in the name, so a later writer can tell a
# leftover of a killed process (SIGKILL, out of memory, power loss) from the folder of one still running.
_OWNED = re.compile(r"^\..*\.sdedge-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)-[^/]*$")


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that readers (and a power cut) see the old file or the new one, never a part:
    a temporary `.<name>.sdedge-<host>-<pid>-<random>.part` beside it, fsync, permissions `mode`, rename, fsync
    of the folder. The one file writer of sdedge: every document, weight file and cache entry goes through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.sdedge-{_host()}-{os.getpid()}-", suffix=".part",
                               dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike, data, mode: int = 0o644) -> None:
    """JSON with sorted-as-given keys, two-space indent, a final newline; NaN/Inf refused (not valid JSON)."""
    import json

    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n", mode)


def sweep_stale(parent: str | os.PathLike) -> list[Path]:
    """Remove the scratch folders in `parent` whose owner (a process on this host) has died; return them."""
    removed = []
    parent = Path(parent)
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    host = _host()
    for p in entries:
        m = _OWNED.match(p.name)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            log.warning("removed %s, left by process %s that ended without cleaning up", p, m["pid"])
            removed.append(p)
    return removed


def scratch_dir(parent: str | os.PathLike, name: str, suffix: str = ".tmp") -> Path:
    """A new empty folder `.<name>.sdedge-<host>-<pid>-<random><suffix>` in `parent` (created if needed),
    after sweeping the leftovers of dead owners there. The caller removes it (or renames it into place);
    `sdedge.cli` turns SIGTERM/SIGHUP into an exit that runs those clean-ups."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(parent)
    return Path(tempfile.mkdtemp(prefix=f".{name}.sdedge-{_host()}-{os.getpid()}-", suffix=suffix, dir=parent))


def replace_dir(new: str | os.PathLike, out: str | os.PathLike) -> None:
    """Put the folder `new` at `out` (same file system), replacing what was there.

    The old folder is renamed aside, the new one renamed in, then the old one deleted; if the second rename
    fails, the old folder is put back. Readers never see a half-written `out`.
    """
    new, out = Path(new), Path(out)
    old = None
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
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
