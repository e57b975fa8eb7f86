"""The trained tiny base's LCM-LoRA, shipped as package data: `tinyworld/data/tiny-lcm-lora.safetensors` (fp16,
kohya keys as latent-consistency/lcm-lora-sdv1-5) and `tiny-lcm-lora.json` (its SHA-256, how it was distilled with
`sdedge train --lcm`, and the prompt-match curve measured on the shipped file).

`scripts/train_tiny_base.py --stage lcm` makes both; `packaged_lcm_lora()` hands out the file, its SHA-256 checked,
for `sdedge export --base TINY --lora FILE:1.0 --scheduler lcm --steps 4 --guidance 1` (the quickstart's fast bundle).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from sdedge.runtime.bundle import sha256_file
from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.files import atomic_write_json
from sdedge.runtime.tensor_files import write_safetensors

__all__ = ["PACKAGED", "packaged_lcm_lora", "lcm_lora_note", "pack_lcm_lora"]

PACKAGED = "tiny-lcm-lora"


def _data_dir() -> Path:
    return Path(str(resources.files("sdedge.tinyworld").joinpath("data")))


def lcm_lora_note(data_dir: str | Path | None = None) -> dict[str, Any]:
    path = Path(data_dir or _data_dir()) / f"{PACKAGED}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdedgeError(f"the packaged file {path} is missing (reinstall sdedge, or run "
                          "scripts/train_tiny_base.py --stage lcm)") from None
    except (OSError, ValueError) as e:
        raise SdedgeError(f"cannot read {path}: {e}") from e


def packaged_lcm_lora(data_dir: str | Path | None = None) -> Path:
    """The shipped LCM-LoRA of the trained tiny base, its SHA-256 checked against tiny-lcm-lora.json."""
    note = lcm_lora_note(data_dir)
    path = Path(data_dir or _data_dir()) / f"{PACKAGED}.safetensors"
    if not path.is_file():
        raise SdedgeError(f"the packaged file {path} is missing (reinstall sdedge)")
    if sha256_file(path) != note.get("sha256"):
        raise SdedgeError(f"{path}: SHA-256 differs from the one in {PACKAGED}.json; the file is damaged")
    return path


def pack_lcm_lora(run_dir: str | Path, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Store the adapter of an `sdedge train --lcm` run (RUN/adapter.safetensors + adapter.json) as package data:
    the weights in fp16 (their safetensors header kept), a note with the SHA-256 and the run's record."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    run, data = Path(run_dir), Path(data_dir or _data_dir())
    with safe_open(str(run / "adapter.safetensors"), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k).half().contiguous() for k in f.keys()}
    weights = data / f"{PACKAGED}.safetensors"
    write_safetensors(weights, tensors, header, save_file)
    adapter = json.loads((run / "adapter.json").read_text(encoding="utf-8"))
    keep = ("steps", "final_loss", "final_loss_mean10", "seconds", "lora", "key_format", "toolchain", "config")
    note = {"format": 1, "sha256": sha256_file(weights), "dtype": "float16", "keys": len(tensors),
            "distill": {k: adapter.get(k) for k in keep}}
    atomic_write_json(data / f"{PACKAGED}.json", note)
    return note


def record_curve(curve: dict[str, Any], data_dir: str | Path | None = None) -> dict[str, Any]:
    """Add the prompt-match curve measured on the shipped file to tiny-lcm-lora.json."""
    data = Path(data_dir or _data_dir())
    note = {**lcm_lora_note(data), "prompt_match": curve}
    atomic_write_json(data / f"{PACKAGED}.json", note)
    return note
