"""Replace a folder in one step: the one shared way sdedge puts a finished bundle, base or dataset in place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["replace_dir"]


def replace_dir(new: str | os.PathLike, out: str | os.PathLike) -> None:
    """Put the folder `new` at `out` (same file system), replacing what was there.

    The old folder is renamed aside, the new one renamed in, then the old one deleted; if the second rename
    fails, the old folder is put back. Readers never see a half-written `out`.
    """
    new, out = Path(new), Path(out)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
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
