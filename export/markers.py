"""The notes sdedge writes into the base folders it makes, read without torch: `sdedge_base.json` in a built-in
base (which base, which seed, the guidance it was tuned at) and `sdedge_pruned.json` in a pruned base (its parent
and the pruning report). bases.py, pruned_base.py and build.py all read them from here."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.manifest import PruneReport

logger = logging.getLogger("sdedge.export")

MARKER_FILE = "sdedge_base.json"  # written into built-in bases: which one, which seed
PRUNED_MARKER = "sdedge_pruned.json"
FORMAT = "sdedge-pruned-base"  # the format key of sdedge_pruned.json


def read_pruned_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The pruned base's note, or None for an ordinary base; a damaged note is an error naming the file."""
    path = Path(folder) / PRUNED_MARKER
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT or doc.get("version") != 1:
            raise ValueError(f"not an {FORMAT} version 1 note")
        doc["prune"] = PruneReport(**doc["prune"])
        for key in ("id", "sha256", "path"):
            if not isinstance(doc["parent"][key], str):
                raise ValueError(f"parent.{key} missing")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SdedgeError(f"{path} is damaged ({e}); prune the parent base again with `sdedge prune`") from e
    return doc


def read_base_marker(folder: str | Path) -> dict[str, Any] | None:
    """A built-in base's `sdedge_base.json` (which base, seed, default guidance), or None when the folder has
    none or it is unreadable (logged): the folder is then a plain diffusers folder."""
    marker = Path(folder) / MARKER_FILE
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        logger.warning("%s is unreadable; treating %s as a plain diffusers folder", marker, folder)
        return None
    return info


def guidance_hint(base: str | Path) -> float:
    """The default guidance a base asks for: the trained tiny base records the one it was tuned at, and a base
    pruned from it carries that on; 7.5 else."""
    for info in (read_base_marker(base), read_pruned_marker(base)):
        value = (info or {}).get("default_guidance")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return 7.5
