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


def sdedge_version() -> str:
    """sdedge's installed version (from the package metadata: the runtime never imports the CLI package)."""
    try:
        return importlib.metadata.version("sdedge")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
