"""What this machine and Python environment are: package versions and the CPU model, for provenance
(manifests, adapters) and benchmark reports."""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Iterable
from pathlib import Path


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """{package: version} of those installed; missing ones are left out."""
    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# the instruction-set flags that decide which CPU engine and precision are fast (runtime/backends/select.py)
ENGINE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")  # native bf16 compute
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products without 16-bit saturation


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (Linux: the `flags` line of /proc/cpuinfo; empty where unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def engine_flags(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """Those of ENGINE_FLAGS this CPU (or `flags`) has, in ENGINE_FLAGS' order."""
    have = cpu_flags() if flags is None else flags
    return tuple(f for f in ENGINE_FLAGS if f in have)


def sdedge_version() -> str:
    """sdedge's installed version (from the package metadata: the runtime never imports the CLI package)."""
    try:
        return importlib.metadata.version("sdedge")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
