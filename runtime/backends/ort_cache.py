"""ONNX Runtime's optimised graph, saved once per machine so that a later load does not optimise again.

ONNX Runtime optimises a model every time a session is made (ORT_ENABLE_ALL: fusions, then the CPU layout
transforms). For the SD1.5 UNet that is 12–20 s of a 22 s load on a 2-core CPU
(benchmarks/results/cpu-engines/README.md). The first load saves the optimised graph
(`SessionOptions.optimized_model_filepath`, weights over 1 KiB in a data file beside it) into
`$SDEDGE_CACHE_DIR/onnxruntime` (default `~/.cache/sdedge/onnxruntime`; `SDEDGE_CACHE_DIR=` turns it off);
later loads open that file with optimisation off.

The ORT_ENABLE_ALL graph holds CPU-specific layout nodes, so the key covers the model files' SHA-256 (from the
manifest, and the bundle's files are still hash-checked on every load), the ONNX Runtime version, the
execution providers, the CPU model and its instruction-set flags. The saved files' own SHA-256 are kept in a
sidecar and checked before use: a damaged or edited cache entry is rebuilt, never run. Only the CPU provider is
cached (a GPU provider's graph depends on the device and its own caches).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..bundle import sha256_file
from ..files import scratch_dir

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


@dataclass(frozen=True)
class GraphEntry:
    """Where one component's optimised graph lives in the cache."""

    model: Path  # <name>-<key>.onnx
    data: Path  # <name>-<key>.onnx.data (the weights)
    sidecar: Path  # <name>-<key>.json: {"model": sha256, "data": sha256}

    @classmethod
    def for_key(cls, root: Path, name: str, key: str) -> GraphEntry:
        model = root / f"{name}-{key}.onnx"
        return cls(model, model.with_name(model.name + DATA_SUFFIX), root / f"{name}-{key}.json")


def cache_key(file_sha256s: list[str], providers: list[str]) -> str:
    import onnxruntime as ort

    key = {"files": file_sha256s, "onnxruntime": ort.__version__, "providers": providers, "cpu": cpu_identity(),
           "level": "ORT_ENABLE_ALL"}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def lookup(entry: GraphEntry) -> bool:
    """True when the entry is complete and its files match their recorded SHA-256."""
    if not (entry.model.is_file() and entry.sidecar.is_file()):
        return False
    try:
        recorded = json.loads(entry.sidecar.read_text())
        ok = sha256_file(entry.model) == recorded["model"] and (
            recorded.get("data") is None or (entry.data.is_file() and sha256_file(entry.data) == recorded["data"]))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        log.warning("onnxruntime: the cached graph %s does not match its SHA-256; optimising again", entry.model)
    return ok


def saving_into(opts, entry: GraphEntry) -> Path:
    """Make `opts` save the optimised graph under the entry's file names in a fresh scratch folder beside it
    (the graph names its data file, so the names are final from the start); return the folder."""
    work = scratch_dir(entry.model.parent, entry.model.stem)  # creates the cache folder too
    opts.optimized_model_filepath = str(work / entry.model.name)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", entry.data.name)
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return work


def commit(work: Path, entry: GraphEntry) -> None:
    """Move what a session saved into `work` to the entry's place, sidecar last (a reader needs all three)."""
    model, data = work / entry.model.name, work / entry.data.name
    if not model.is_file():
        raise OSError(f"ONNX Runtime saved no optimised graph in {work}")
    record = {"model": sha256_file(model), "data": sha256_file(data) if data.is_file() else None}
    if data.is_file():
        os.replace(data, entry.data)
    os.replace(model, entry.model)
    tmp = entry.sidecar.with_name(entry.sidecar.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, entry.sidecar)
