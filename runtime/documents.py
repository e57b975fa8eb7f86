"""The one reader/writer of sdedge's on-disk JSON documents (shared core: no torch, no other layer).

Every document sdedge writes is a JSON object whose first two keys say what it is and which version of it:

    {"format": "sdedge-bundle", "version": 2, ...the fields of the document's frozen dataclass...}

    sdedge.json          sdedge-bundle       runtime/manifest.py      Manifest
    sdedge_base.json     sdedge-base         export/markers.py        BaseMarker
    sdedge_pruned.json   sdedge-pruned-base  export/markers.py        PrunedMarker
    metadata.json        sdedge-data         trainer/prepare.py       DatasetMetadata
    state.json           sdedge-checkpoint   trainer/checkpoint.py    CheckpointState
    adapter.json         sdedge-adapter      trainer/adapter.py       AdapterDocument
    report.json          sdedge-bench        benchmarks/report.py     BenchReport
    sdedge_run.json      sdedge-train-run    trainer/run_setup.py     RunMarker (a training run's folder)

Each owner declares its document once as a `DocumentType` (dataclass, format, version, file name, error class);
`read`/`parse` check the format and version, bring an older version up to date (`upgrades`) and build the
dataclass with runtime/strict.py, so an unknown key, a wrong type or an unknown version is an error naming the
file and the key; `write` checks that what it writes reads back, then writes it atomically (runtime/files.py).
Documents written before this convention (the manifest's `format_version`, the bench report's `schema_version`
and `kind`, the checkpoint's bare `version`, the base marker's nothing) are read as their version 1 (`Legacy`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import SdedgeError
from .files import atomic_write_text
from .strict import ConfigError, from_dict, parse_json, read_capped, to_dict

__all__ = ["DocumentType", "Legacy"]

T = TypeVar("T")
MAX_MARKER_BYTES = 256 << 20  # a dataset's metadata.json lists every image; a marker is never bigger


@dataclass(frozen=True)
class Legacy:
    """How a document written before the format/version convention is recognised (it has no `format` key): the
    key that held its version (None: it had none) and keys whose fixed values went with it. It reads as version 1."""

    version_key: str | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DocumentType(Generic[T]):
    """One kind of on-disk document: its dataclass and how it is named, versioned, checked, read and written."""

    cls: type[T]
    format: str  # the value of the "format" key: "sdedge-<what>"
    version: int  # the version this sdedge writes; it reads 1..version
    name: str  # the file name, for messages
    error: type[SdedgeError] = ConfigError
    upgrades: Mapping[int, Callable[[dict], dict]] = field(default_factory=dict)  # version v's dict -> v + 1's
    legacy: Legacy | None = None
    check: Callable[[T, str], None] | None = None  # what the types cannot say (paths inside a folder, ...)

    # -- reading -------------------------------------------------------------------------------------------------
    def read(self, path: str | os.PathLike) -> T:
        """The document at `path`: size-capped strict JSON, then `parse`. Every failure is `self.error` naming
        the file (and the key)."""
        return self.parse(self._decode(path), str(path))

    def read_dict(self, path: str | os.PathLike) -> dict[str, Any]:
        """The document at `path` as written (a dict, for code that reads it as one), after `parse` checked it."""
        data = self._decode(path)
        self.parse(data, str(path))
        return data

    def declared_by(self, path: str | os.PathLike, max_bytes: int = MAX_MARKER_BYTES) -> bool:
        """Does the file at `path` say it is this kind of document (a JSON object whose "format" is this one's)?
        Only that key is looked at: the test of a folder marker before `--overwrite` (runtime/files.py
        `check_sdedge_folder`), which a damaged or older document of sdedge's still passes. False for a link."""
        try:
            data = parse_json(read_capped(path, max_bytes), str(path), max_bytes)
        except (OSError, ConfigError):
            return False
        return isinstance(data, dict) and data.get("format") == self.format

    def parse_bytes(self, raw: bytes, where: str | None = None) -> T:
        where = where or self.name
        try:
            data = parse_json(raw, where)
        except ConfigError as exc:
            raise self.error(str(exc)) from None
        return self.parse(data, where)

    def _decode(self, path: str | os.PathLike) -> Any:
        try:
            return parse_json(read_capped(path), str(path))
        except ConfigError as exc:
            raise self.error(str(exc)) from None
        except OSError as exc:
            raise self.error(f"{path}: cannot be read ({exc.strerror})") from None

    def parse(self, data: Any, where: str | None = None) -> T:
        """A decoded document (a dict) to the dataclass: format and version checked, older versions upgraded."""
        where = where or self.name
        if not isinstance(data, dict):
            raise self.error(f"{where}: not a JSON object; not an {self.format} document")
        _check_finite(data, where, self.error)
        version, body = self._versioned(data, where)
        for v in range(version, self.version):
            body = self.upgrades.get(v, dict)(body)
        try:
            obj = from_dict(self.cls, body, where)
        except ConfigError as exc:
            raise self.error(str(exc)) from None
        if self.check is not None:
            self.check(obj, where)
        return obj

    def _versioned(self, data: dict, where: str) -> tuple[int, dict]:
        """(version, the fields without the format and version keys)."""
        if "format" not in data and self.legacy is not None:
            key = self.legacy.version_key
            version = data.get(key) if key else 1
            for k, want in self.legacy.fixed.items():
                if data.get(k) != want:
                    raise self.error(f"{where}: {k} {data.get(k)!r}, not {want!r}; not an {self.format} document")
            body = {k: v for k, v in data.items() if k != key and k not in self.legacy.fixed}
            if version != 1:  # the old convention's versions end at 1; a higher one is a newer sdedge's
                raise self.error(f"{where}: {key} {version!r} is unknown; this sdedge reads {self._versions()}"
                                 f"{self._newer(version, 1)}")
            return 1, body
        if data.get("format") != self.format:
            raise self.error(f"{where}: format {data.get('format')!r}, not {self.format!r}; not an {self.format} "
                             "document")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= self.version:
            raise self.error(f"{where}: version {version!r} is unknown; this sdedge reads {self._versions()}"
                             f"{self._newer(version)}")
        return version, {k: v for k, v in data.items() if k not in ("format", "version")}

    def _versions(self) -> str:
        return f"{self.format} version 1" if self.version == 1 else f"{self.format} versions 1 to {self.version}"

    def _newer(self, version: Any, last: int | None = None) -> str:
        last = self.version if last is None else last
        newer = isinstance(version, int) and not isinstance(version, bool) and version > last
        return " (a newer sdedge wrote it; upgrade sdedge)" if newer else ""

    # -- writing -------------------------------------------------------------------------------------------------
    def to_dict(self, obj: T) -> dict[str, Any]:
        return {"format": self.format, "version": self.version, **to_dict(obj)}

    def to_json(self, obj: T | dict[str, Any], where: str | None = None) -> str:
        """The document's text: two-space indent, a final newline; checked to read back (`parse`) first. `obj` is
        the dataclass, or a document assembled as a dict (its format and version keys included), kept as given."""
        doc = obj if isinstance(obj, dict) else self.to_dict(obj)
        self.parse(doc, f"{where or self.name} (being written)")
        return json.dumps(doc, indent=2, allow_nan=False) + "\n"

    def write(self, path: str | os.PathLike, obj: T | dict[str, Any], mode: int = 0o644) -> None:
        """Write `obj` (see `to_json`) to `path` atomically (runtime/files.py), after checking that it reads back."""
        atomic_write_text(path, self.to_json(obj, str(path)), mode)


def _check_finite(value: Any, where: str, error: type[SdedgeError]) -> None:
    """JSON has no NaN or infinity: refuse one in a document being built, naming its key."""
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise error(f"{at}: {v!r} is not a finite number (JSON has no NaN or infinity)")
        if isinstance(v, dict):
            stack.extend((x, f"{at}.{k}") for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(v))
