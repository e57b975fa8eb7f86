"""Open a bundle folder: parse its manifest and hand out file bytes checked against their SHA-256.

`Bundle.read(rel)` reads a file once into memory, hashes those bytes and returns them: the bytes a backend
parses are the bytes that were checked, so a file swapped on disk after the check cannot slip in.
"""

from __future__ import annotations

import hashlib
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
        """The file's bytes, after checking their SHA-256 against the manifest."""
        entry = self.manifest.files.get(rel)
        if entry is None:
            raise BundleError(f"{self.root / rel}: not listed in {MANIFEST_NAME}")
        try:
            data = (self.root / rel).read_bytes()
        except OSError as exc:
            raise BundleError(f"{self.root / rel}: cannot be read ({exc.strerror})") from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise BundleError(
                f"{self.root / rel}: SHA-256 differs from {MANIFEST_NAME}; the file is corrupt or was changed"
            )
        return data

    def verify_hash(self, rel: str) -> None:
        """Hash a (large) file in chunks without holding it in memory."""
        entry = self.manifest.files[rel]
        if sha256_file(self.root / rel) != entry.sha256:
            raise BundleError(
                f"{self.root / rel}: SHA-256 differs from {MANIFEST_NAME}; the file is corrupt or was changed"
            )
