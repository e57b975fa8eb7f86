"""Write a bundle atomically: everything goes into a temporary folder beside the target, which is renamed
into place only when complete, so an interrupted export never leaves a half-bundle under the final name."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from sdedge.runtime.bundle import sha256_file
from sdedge.runtime.files import check_replaceable, staged_dir
from sdedge.runtime.manifest import MANIFEST, MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest


@contextlib.contextmanager
def staging_dir(out: Path, overwrite: bool = False, inputs=()) -> Iterator[Path]:
    """Yield a fresh folder beside `out`; on success it replaces `out`, on failure it is removed. A non-empty
    `out` is replaced only with `overwrite`, only when it is a bundle (has an sdedge.json) and holds none of
    `inputs` (what the export reads)."""
    check_replaceable(Path(out), {MANIFEST_NAME: None}, inputs, overwrite=overwrite)
    with staged_dir(out, finish=normalise_permissions) as tmp:
        yield tmp


def normalise_permissions(root: Path) -> None:
    """Folders 0777 and files 0666, less the umask: temp files are created private (0600/0700), and a bundle
    must be readable by the service user that runs it."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def hash_files(root: Path) -> dict[str, FileEntry]:
    """SHA-256 and size of every file under root, except the manifest and the signature."""
    entries = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in (MANIFEST_NAME, SIGNATURE_NAME):
            entries[rel] = FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
    return entries


def write_manifest(root: Path, manifest: Manifest) -> Path:
    path = Path(root) / MANIFEST_NAME
    MANIFEST.write(path, manifest)  # checked to read back, written atomically
    return path


