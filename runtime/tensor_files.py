"""The one safetensors writer of sdedge: `write_safetensors(path, tensors, metadata, save)`.

Every `.safetensors` file sdedge writes with metadata (adapters, single-file checkpoints, a base's text encoder,
the shipped LCM-LoRA, the fast path's inputs) goes through it, so each is

- atomic: written to a temporary name beside `path` and renamed into place (`files.atomic_output`, the one atomic
  writer); an error on the way (from the tensors, the saver or the disk) leaves the old file and no temporary;
- byte-stable: the same tensors and metadata give the same bytes. safetensors (0.8) writes the header's
  `__metadata__` in the order of a Rust hash map, new for each map: 8 saves of the same tensors gave 7 distinct
  files, and adapter.json another SHA-256. The writer puts it in sorted key order, in place.

The runtime imports neither torch nor safetensors: the caller hands in safetensors' own file saver for its tensors
(`safetensors.torch.save_file`, `safetensors.numpy.save_file`), which streams each tensor from its own memory into
the file, so a multi-GB checkpoint needs no second copy in memory; the sort then rewrites the header alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import SdedgeError
from .files import atomic_output

__all__ = ["write_safetensors"]


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None,
                      save: Callable[..., None], mode: int = 0o644) -> Path:
    """Write `tensors` (name -> tensor) and `metadata` (str -> str, or None) as a safetensors file at `path`,
    atomically and with the header's metadata in sorted key order. `save` is safetensors' file saver for the
    tensors' kind, called once as `save(tensors, temporary_path, metadata=...)`. Returns `path`."""
    path = Path(path)
    with atomic_output(path, mode) as tmp:
        save(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
        _sort_metadata(tmp)
    return path


def _sort_metadata(path: Path) -> None:
    """Put the `__metadata__` of the safetensors file at `path` in sorted key order, in place. The tensors'
    entries, offsets (they count from the header's end) and bytes stay; the header keeps its length: compact JSON
    of the same keys and values in another order is as long (padded with spaces, as safetensors pads it)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:
            raise SdedgeError(f"{path}: the sorted safetensors header is {len(text)} bytes, longer than the "
                              f"{size} the saver wrote; the file was not written")
        f.seek(8)
        f.write(text.ljust(size, b" "))
