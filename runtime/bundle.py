"""Open a bundle folder: parse its manifest and hand out file bytes checked against their SHA-256.

`Bundle.read(rel)` reads a file once into memory, hashes those bytes and returns them: the bytes a backend
parses are the bytes that were checked, so a file swapped on disk after the check cannot slip in.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError
from .manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, read_manifest

HASH_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def open_nofollow(root: Path, rel: str) -> int:
    """A read-only descriptor of the regular file `root/rel`, opening each component of `rel` relative to the
    folder before it with O_NOFOLLOW: a symbolic link (file or folder) inside the bundle is a BundleError."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    parts = rel.split("/")
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | nofollow | (0 if last else getattr(os, "O_DIRECTORY", 0))
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) or os.path.islink(root / "/".join(parts[: i + 1])):
                    raise BundleError(f"{root / rel}: {'/'.join(parts[: i + 1])} is a symbolic link (or not a "
                                      "folder); a bundle holds only regular files and folders") from None
                raise BundleError(f"{root / rel}: cannot be read ({exc.strerror})") from None
            os.close(fd)
            fd = nxt
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"{root / rel}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_nofollow(root: Path, rel: str, size: int) -> bytes | bytearray:
    """Up to `size + 1` bytes of `root/rel` (opened with `open_nofollow`): nothing is read past one byte more than
    expected, so a swapped-in huge file cannot exhaust memory."""
    fd = open_nofollow(root, rel)
    try:
        return _read_fd(fd, size + 1)
    finally:
        os.close(fd)


_MAX_READ = 0x7FFFF000  # the most one read(2) returns on Linux


def _read_fd(fd: int, limit: int) -> bytes | bytearray:
    """Up to `limit` bytes from `fd`, without a second copy: `bytes` from one read when it fits (the usual case
    for a regular file under 2 GB), else a `bytearray` filled in place (weights of several GB)."""
    if limit <= _MAX_READ:
        first = os.read(fd, limit)
        if len(first) == limit or not first:
            return first
        rest = _read_fd(fd, limit - len(first))
        return first + rest if rest else first
    buf = bytearray(limit)
    view, n = memoryview(buf), 0
    while n < limit:
        k = os.readv(fd, [view[n:n + _MAX_READ]])
        if k == 0:
            break
        n += k
    view.release()
    del buf[n:]
    return buf


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        root = Path(path)
        manifest = read_manifest(root)
        bundle = cls(root=root, manifest=manifest)
        bundle.check_present()
        return bundle

    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def is_signed(self) -> bool:
        return (self.root / SIGNATURE_NAME).is_file()

    def check_present(self) -> None:
        """Every file of the manifest is there with its recorded size (cheap; hashes are checked on read)."""
        for rel, entry in self.manifest.files.items():
            p = self.root / rel
            if not p.is_file():
                raise BundleError(f"{p}: missing from the bundle (listed in {MANIFEST_NAME})")
            size = p.stat().st_size
            if size != entry.bytes:
                raise BundleError(
                    f"{p}: {size} bytes on disk but {entry.bytes} in {MANIFEST_NAME}; the file is truncated or was changed"
                )

    def read(self, rel: str) -> bytes:
        """The file's bytes, after checking their SHA-256 against the manifest.

        The file is opened one path component at a time without following symbolic links (a link anywhere
        on the way is refused), read once into memory up to its recorded size, and those bytes are hashed and
        returned: what a backend parses is what was checked, whatever happens on disk afterwards."""
        entry = self.manifest.files.get(rel)
        if entry is None:
            raise BundleError(f"{self.root / rel}: not listed in {MANIFEST_NAME}")
        data = read_nofollow(self.root, rel, entry.bytes)
        self._check_size(rel, len(data))
        self._check_sha256(rel, hashlib.sha256(data).hexdigest())
        return data

    def verify_hash(self, rel: str) -> None:
        """Hash a (large) file in chunks without holding it in memory (no symbolic links, as `read`)."""
        digest = hashlib.sha256()
        for chunk in self._chunks(rel):
            digest.update(chunk)
        self._check_sha256(rel, digest.hexdigest())

    def copy_checked(self, rel: str, dest: Path) -> None:
        """Copy the file to `dest` (a new file) in chunks, as `verify_hash` reads it, hashing what is written; a size
        or SHA-256 that differs from the manifest is a BundleError (the caller removes the copy). For an engine
        that reads a file only by path: it reads this checked copy, never a file swapped in the bundle later.
        Written in place, not published (no fsync and rename of several GB, as files.atomic_output does): the
        copy is a scratch file in a private folder the caller removes."""
        digest, n = hashlib.sha256(), 0
        with open(dest, "xb") as out:
            for chunk in self._chunks(rel):
                digest.update(chunk)
                out.write(chunk)
                n += len(chunk)
        self._check_size(rel, n)
        self._check_sha256(rel, digest.hexdigest())

    def _chunks(self, rel: str):
        """The listed file's bytes in chunks (no symbolic links), never more than one byte past its recorded size."""
        limit = self.manifest.files[rel].bytes + 1
        n = 0
        with os.fdopen(open_nofollow(self.root, rel), "rb") as f:
            while n < limit and (chunk := f.read(min(HASH_CHUNK, limit - n))):
                n += len(chunk)
                yield chunk

    def _check_size(self, rel: str, size: int) -> None:
        expected = self.manifest.files[rel].bytes
        if size != expected:
            got = f"more than {expected}" if size > expected else str(size)
            raise BundleError(f"{self.root / rel}: {got} bytes on disk but {expected} in {MANIFEST_NAME}; "
                              "the file is truncated or was changed")

    def _check_sha256(self, rel: str, sha256: str) -> None:
        if sha256 != self.manifest.files[rel].sha256:
            raise BundleError(
                f"{self.root / rel}: SHA-256 differs from {MANIFEST_NAME}; the file is corrupt or was changed"
            )
