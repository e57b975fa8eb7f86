"""The notes sdedge writes into the base folders it makes, read without torch: `sdedge_base.json` in a built-in
base (which base, which seed, the guidance it was tuned at) and `sdedge_pruned.json` in a pruned base (its parent
and the pruning report). bases.py, sdxl_base.py, pruned_base.py and build.py read and write them through here
(runtime/documents.py: format "sdedge-base" version 2, "sdedge-pruned-base" version 1; a base marker written
before the format/version keys reads as version 1)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sdedge.runtime.documents import DocumentType, Legacy
from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.manifest import BaseInfo, PruneReport

logger = logging.getLogger("sdedge.export")

MARKER_FILE = "sdedge_base.json"  # written into built-in bases: which one, which seed
PRUNED_MARKER = "sdedge_pruned.json"
FORMAT = "sdedge-pruned-base"  # the format key of sdedge_pruned.json


@dataclass(frozen=True)
class BaseMarker:
    """A built-in base's note: which one and its seed (same name and seed: same weights)."""

    builtin: str
    seed: int
    writer: str = ""  # the module that wrote the base
    parameters: dict[str, int] = field(default_factory=dict)  # per model
    trained: bool = False  # the tiny base's packaged trained weights
    default_guidance: float | None = None  # the guidance it was tuned at (the trained tiny base)
    dtype: str | None = None  # the weights' dtype when not float32 (sdxl-arch)


@dataclass(frozen=True)
class ParentInfo(BaseInfo):
    """The unpruned parent: its id and SHA-256 (what a bundle's provenance.pruned_from records) and its folder."""

    path: str


@dataclass(frozen=True)
class PrunedMarker:
    """A pruned base's note: the unpruned parent (the truth its parity gates measure against) and the pruning."""

    parent: ParentInfo
    prune: PruneReport
    default_guidance: float | None = None  # the parent's guidance hint, carried on


BASE_MARKER = DocumentType(BaseMarker, "sdedge-base", 2, MARKER_FILE, legacy=Legacy())
PRUNED = DocumentType(PrunedMarker, FORMAT, 1, PRUNED_MARKER)


def read_pruned_marker(folder: str | os.PathLike) -> PrunedMarker | None:
    """The pruned base's note, or None for an ordinary base; a damaged note is an error naming the file."""
    path = Path(folder) / PRUNED_MARKER
    if not path.is_file():
        return None
    try:
        return PRUNED.read(path)
    except SdedgeError as e:
        raise SdedgeError(f"{path} is damaged ({e}); prune the parent base again with `sdedge prune`") from e


def read_base_marker(folder: str | Path) -> BaseMarker | None:
    """A built-in base's `sdedge_base.json` (which base, seed, default guidance), or None when the folder has
    none or it is unreadable (logged, with the key at fault): the folder is then a plain diffusers folder."""
    marker = Path(folder) / MARKER_FILE
    if not marker.is_file():
        return None
    try:
        return BASE_MARKER.read(marker)
    except SdedgeError as e:
        logger.warning("%s is unreadable (%s); treating %s as a plain diffusers folder", marker, e, folder)
        return None


def guidance_hint(base: str | Path, default: float = 7.5) -> float:
    """The default guidance a base asks for: the trained tiny base records the one it was tuned at, and a base
    pruned from it carries that on; `default` else."""
    for info in (read_base_marker(base), read_pruned_marker(base)):
        value = info.default_guidance if info is not None else None
        if value is not None and value > 0:
            return float(value)
    return default
