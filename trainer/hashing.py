"""SHA-256 of files, of a base model folder and of a prepared dataset (for adapter.json's provenance).

`base_sha256(folder)` is the same digest as `sdedge.export.bases.describe_base(folder)["sha256"]` (the trainer
and the exporter meet only through files, so each computes it; a test keeps the two equal): the SHA-256 of the
lines "<relative path>  <sha256 of the file>\\n" over the folder's weight files sorted by relative path.
`dataset_sha256(entries)` is the same construction over a prepared dataset's image and caption files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from sdedge.runtime.bundle import sha256_file  # noqa: F401 (one implementation, re-exported)

__all__ = ["sha256_file", "sha256_bytes", "combined_sha256", "base_sha256", "WEIGHT_SUFFIXES"]

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def combined_sha256(files: Iterable[tuple[str, str]]) -> str:
    """SHA-256 of "<relative path>  <sha256>\\n" lines sorted by path."""
    lines = "".join(f"{rel}  {sha}\n" for rel, sha in sorted(files))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def base_sha256(folder: Path) -> str:
    folder = Path(folder)
    weights = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES]
    return combined_sha256((p.relative_to(folder).as_posix(), sha256_file(p)) for p in weights)
