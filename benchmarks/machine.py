"""The machine a bench ran on: CPU model and flags, GPUs, memory, load, versions, git commit."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from sdedge.runtime.environment import cpu_model, engine_flags, package_versions

VERSION_PACKAGES = ("sdedge", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "torch", "diffusers",
                    "transformers", "numpy")


# == the machine ============================================================================================
def _cpu_flags() -> list[str]:
    return list(engine_flags())


def _gpus() -> list[dict[str, Any]]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=False, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            try:
                gpus.append({"name": parts[0], "driver": parts[1], "memory_bytes": int(float(parts[2]) * 2**20)})
            except ValueError:
                continue
    return gpus


def _git(repo: Path) -> dict[str, Any] | None:
    if not (repo / ".git").exists() or not shutil.which("git"):
        return None
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=False, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)} if commit else None


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (other work on the machine skews every timing)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def describe_machine() -> dict[str, Any]:
    """CPU model, cores, memory, GPUs, OS, Python, package versions and the sdedge git commit."""
    try:
        import psutil

        physical, memory = psutil.cpu_count(logical=False), int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - informational
        physical, memory = None, None
    versions = package_versions(VERSION_PACKAGES)
    return {
        "cpu": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "memory_bytes": memory,
        "gpus": _gpus(),
        "load_average": load_average(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git": _git(Path(__file__).resolve().parents[1]),
    }


def machine_slug(machine: dict[str, Any], device: str) -> str:
    """A short folder-safe name of the machine: the GPU's on a GPU run, else the CPU's and its core count."""
    name = machine["gpus"][0]["name"] if device != "cpu" and machine.get("gpus") else machine.get("cpu") or "machine"
    name = re.sub(r"\((R|TM)\)|CPU|Processor|@.*$|\bIntel\b|\bAMD\b|\bNVIDIA\b", "", name, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "machine"
    return slug if device != "cpu" else f"{slug}-{machine.get('logical_cores')}c"


