"""ONNX Runtime's optimised graph, saved once per machine so that a later load does not optimise again.

ONNX Runtime optimises a model every time a session is made (ORT_ENABLE_ALL: fusions, then the CPU layout
transforms). For the SD1.5 UNet that is 12–20 s of a 22 s load on a 2-core CPU
(benchmarks/results/cpu-engines/README.md). The first load saves the optimised graph
(`SessionOptions.optimized_model_filepath`, weights over 1 KiB in a data file beside it) into
`$SDEDGE_CACHE_DIR/onnxruntime` (default `~/.cache/sdedge/onnxruntime`; `SDEDGE_CACHE_DIR=` turns it off);
later loads open that file with optimisation off.

The ORT_ENABLE_ALL graph holds CPU-specific layout nodes, so the key covers the model files' SHA-256 (from the
verified manifest), the ONNX Runtime version, the execution providers, the CPU model and its instruction-set flags.
Only the CPU provider is cached (a GPU provider's graph depends on the device and its own caches).

Binding a cached file to the verified model (shared with the OpenVINO blob cache and the TensorRT engine folder):

- the cache root must be a real folder owned by this user and writable by no one else (nor may its parent be):
  otherwise the cache is not used at all, with a warning saying why;
- each entry's record (`seal`) lists its files' SHA-256 and sizes together with the key it was built for (which
  holds the verified model's digests), authenticated with an HMAC under a per-user secret (`cache.key`, mode
  0600, beside the cache roots): someone who can write into the cache but is not this user cannot forge a
  record, and a record moved to another key does not verify;
- `open_sealed` reads each cached file once (no symbolic links), checks those bytes against the record, and
  hands the same bytes to the engine: a file swapped after the check is never what runs. Any mismatch is a
  rebuild, never a run.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from ..bundle import read_nofollow, sha256_file
from ..errors import BundleError
from ..files import atomic_write_bytes, atomic_write_json, scratch_dir
from ..strict import ConfigError, parse_json, read_capped

log = logging.getLogger("sdedge.runtime")

DATA_SUFFIX = ".data"


def cache_root(kind: str) -> Path | None:
    """`$SDEDGE_CACHE_DIR/<kind>`, default `~/.cache/sdedge/<kind>`; None when SDEDGE_CACHE_DIR is set empty."""
    root = os.environ.get("SDEDGE_CACHE_DIR")
    if root == "":
        return None
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdedge"
    return base / kind


@functools.lru_cache(maxsize=1)
def cpu_identity() -> str:
    """The CPU model and its instruction-set flags: what the ORT_ENABLE_ALL layout transforms depend on."""
    from ..environment import cpu_model

    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return f"{cpu_model()}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


# -- a private cache root --------------------------------------------------------------------------------------------
_WARNED: set[str] = set()


def _unsafe(path: Path, parent: bool = False) -> str | None:
    """Why `path` (an existing folder) is not private to this user, or None. A parent may also be root's, or
    a sticky folder like /tmp (where no one else can rename what is ours)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    if hasattr(os, "geteuid") and st.st_uid not in ((os.geteuid(), 0) if parent else (os.geteuid(),)):
        return f"it is owned by another user (uid {st.st_uid})"
    if parent and st.st_mode & stat.S_ISVTX:
        return None
    writers = {0o022: "group and others", 0o020: "group", 0o002: "others"}.get(st.st_mode & 0o022)
    if writers:
        return f"it is writable by {writers} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def private_root(root: Path | None) -> Path | None:
    """`root`, created with mode 0700 if missing, when it and its parent are folders owned by this user that no
    one else can write to; else None, with a warning (once per root) saying why: a cache that others can write
    could hand the engine a graph nobody signed, so it is not used."""
    if root is None:
        return None
    root = Path(root)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = next(((p, w) for p, up in ((root.parent, True), (root, False)) if (w := _unsafe(p, up))), None)
    except OSError as exc:
        why = (root, f"it cannot be created or read ({exc.strerror})")
    if why is None:
        return root
    if str(root) not in _WARNED:
        _WARNED.add(str(root))
        log.warning("cache %s not used: %s %s; loading without a cache (make it private: chmod go-w, or set "
                    "SDEDGE_CACHE_DIR to a folder of your own)", root, why[0], why[1])
    return None


# -- records bound to the verified model -------------------------------------------------------------------------------
KEY_NAME = "cache.key"
MAX_CACHED_BYTES = 1 << 40


def _secret(root: Path) -> bytes:
    """The per-user HMAC secret beside the cache roots (created on first use, mode 0600)."""
    path = root.parent / KEY_NAME
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            atomic_write_bytes(path, secrets.token_bytes(32), mode=0o600)
            continue
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            key = f.read(64)
        if (hasattr(os, "geteuid") and st.st_uid != os.geteuid()) or st.st_mode & 0o077 or len(key) != 32:
            raise OSError(f"{path}: not a private cache key of this user (owner, mode 0600, 32 bytes)")
        return key
    raise OSError(f"{path}: cannot create the cache key")


def _mac(root: Path, bound_to: str, files: dict) -> str:
    body = json.dumps({"for": bound_to, "files": files}, sort_keys=True).encode()
    return hmac.new(_secret(root), body, hashlib.sha256).hexdigest()


def describe(files: dict[str, bytes | bytearray | Path]) -> dict[str, dict]:
    """{name: {sha256, bytes}} for files given as their bytes or as a path to hash."""
    listed = {}
    for name, value in files.items():
        if isinstance(value, Path):
            listed[name] = {"sha256": sha256_file(value), "bytes": value.stat().st_size}
        else:
            listed[name] = {"sha256": hashlib.sha256(value).hexdigest(), "bytes": len(value)}
    return listed


def seal(record: Path, bound_to: str, listed: dict[str, dict]) -> None:
    """Write `record`: the files' SHA-256 and sizes (`describe`) for the cache key `bound_to`, with the HMAC
    that `check_record` and `open_sealed` check."""
    atomic_write_json(record, {"for": bound_to, "files": listed, "mac": _mac(record.parent, bound_to, listed)},
                      mode=0o600)


def check_record(record: Path, bound_to: str) -> dict | None:
    """The files a record lists ({name: {sha256, bytes}}) when it is authentic and made for `bound_to`, else
    None (with the reason logged)."""
    try:
        doc = parse_json(read_capped(record, 1 << 20), str(record))
        files, mac = doc["files"], doc["mac"]
        ok = (doc["for"] == bound_to and isinstance(files, dict) and isinstance(mac, str)
              and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                      and 0 <= v["bytes"] <= MAX_CACHED_BYTES and "/" not in k for k, v in files.items())
              and hmac.compare_digest(mac, _mac(record.parent, bound_to, files)))
    except FileNotFoundError:
        return None
    except (OSError, ConfigError, KeyError, TypeError, BundleError) as exc:
        log.warning("cache record %s unreadable (%s); rebuilding", record, exc)
        return None
    if not ok:
        log.warning("cache record %s is not authentic for this model (its SHA-256 do not match the sealed "
                    "record); rebuilding", record)
        return None
    return files


def open_sealed(record: Path, bound_to: str) -> dict[str, bytes | bytearray] | None:
    """The bytes of every file the record lists (read once each, beside the record, no symbolic links), after
    checking them against the record; None on any mismatch (logged: the caller rebuilds)."""
    files = check_record(record, bound_to)
    if files is None:
        return None
    out = {}
    for name, want in files.items():
        try:
            data = read_nofollow(record.parent, name, want["bytes"])
        except BundleError as exc:
            log.warning("cached file %s unusable (%s); rebuilding", record.parent / name, exc)
            return None
        if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
            log.warning("cached file %s does not match its SHA-256 in %s; rebuilding", record.parent / name, record)
            return None
        out[name] = data
    return out


# -- the optimised graph of one component -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphEntry:
    """Where one component's optimised graph lives in the cache."""

    model: Path  # <name>-<key>.onnx
    data: Path  # <name>-<key>.onnx.data (the weights)
    sidecar: Path  # <name>-<key>.json: the sealed record of both
    key: str = ""  # what the record is bound to: the cache key (verified model digests, runtime, CPU)

    @classmethod
    def for_key(cls, root: Path, name: str, key: str) -> GraphEntry:
        model = root / f"{name}-{key}.onnx"
        return cls(model, model.with_name(model.name + DATA_SUFFIX), root / f"{name}-{key}.json", f"{name}-{key}")


def cache_key(file_sha256s: list[str], providers: list[str]) -> str:
    import onnxruntime as ort

    key = {"files": file_sha256s, "onnxruntime": ort.__version__, "providers": providers, "cpu": cpu_identity(),
           "level": "ORT_ENABLE_ALL"}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def lookup(entry: GraphEntry) -> dict[str, bytes | bytearray] | None:
    """The entry's checked bytes ({file name: bytes}, the graph under `entry.model.name`), or None to rebuild."""
    files = open_sealed(entry.sidecar, entry.key)
    if files is not None and entry.model.name not in files:
        log.warning("onnxruntime: the cache record %s lists no graph; optimising again", entry.sidecar)
        return None
    if files is None and entry.sidecar.exists():
        log.warning("onnxruntime: the cached graph %s does not match its SHA-256; optimising again", entry.model)
    return files


def saving_into(opts, entry: GraphEntry) -> Path:
    """Make `opts` save the optimised graph under the entry's file names in a fresh scratch folder beside it
    (the graph names its data file, so the names are final from the start); return the folder."""
    work = scratch_dir(entry.model.parent, entry.model.stem)
    opts.optimized_model_filepath = str(work / entry.model.name)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", entry.data.name)
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return work


def commit(work: Path, entry: GraphEntry) -> None:
    """Move what a session saved into `work` (a private scratch folder) to the entry's place and seal it."""
    model, data = work / entry.model.name, work / entry.data.name
    if not model.is_file():
        raise OSError(f"ONNX Runtime saved no optimised graph in {work}")
    listed = describe({p.name: p for p in (model, data) if p.is_file()})  # hashed in the private scratch folder
    if data.is_file():
        os.replace(data, entry.data)
    os.replace(model, entry.model)
    seal(entry.sidecar, entry.key, listed)


# -- a folder an engine reads itself (TensorRT's engine and timing caches) ---------------------------------------------
def _folder_files(folder: Path) -> dict[str, Path] | None:
    """The folder's regular files by name; None if it holds anything else (a link, a sub-folder)."""
    out = {}
    for p in folder.iterdir():
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode) or p.name.startswith(".") or st.st_mode & 0o022:
            return None
        out[p.name] = p
    return out


def prepare_folder(root: Path, key: str) -> Path:
    """`root/key` for an engine that opens its cache files itself: kept only when every file in it matches the
    record `root/key.json` sealed for `key`; otherwise emptied (the engine rebuilds). The root is private
    (`private_root`), so only this user could change a file between this check and the engine's open."""
    import shutil

    folder, record = root / key, root / f"{key}.json"
    if folder.is_dir() and not folder.is_symlink():
        listed = check_record(record, key)
        files = _folder_files(folder)
        if listed is None or files is None or describe(files) != listed:
            if files or listed is not None:
                log.warning("engine cache %s does not match its sealed record; rebuilding it", folder)
            shutil.rmtree(folder, ignore_errors=True)
            record.unlink(missing_ok=True)
    elif folder.is_symlink():
        folder.unlink()
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def seal_folder(root: Path, key: str) -> None:
    """Record the files the engine left in `root/key` (after a load, and at unload: engines built on the first
    run are sealed then)."""
    files = _folder_files(root / key)
    if files is not None:
        seal(root / f"{key}.json", key, describe(files))
