"""Training checkpoints: safetensors and JSON only (no pickles), each written whole or not at all.

    OUT/checkpoints/step-000100/
        trainable.safetensors   the LoRA parameters, by their names in the training models
        optimizer.safetensors   the optimizer's per-parameter tensors (AdamW moments and steps, ...)
        state.json              step, config, the optimizer's hyper-parameters and scalars, the grad scaler, ...

A checkpoint is assembled in a hidden temporary folder and renamed into place, so a run killed at any moment
leaves only whole checkpoints. Nothing else is needed to resume: the data order, noise and timesteps are pure
functions of (seed, step) (see dataset.py), and the learning rate is a function of the step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.files import scratch_dir

__all__ = ["CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "prune_checkpoints",
           "optimizer_to_flat", "optimizer_from_flat"]

CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^step-(\d+)$")


def optimizer_to_flat(state_dict: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer state dict as (tensors, JSON-ready rest)."""
    import torch

    tensors: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    for pid, st in state_dict["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, Any], rest: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = t
    for key, v in rest.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(root: Path, step: int, trainable: dict[str, Any], optimizer_state: dict, state: dict) -> Path:
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = scratch_dir(root, final.name)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_rest = optimizer_to_flat(optimizer_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        doc = {"version": CHECKPOINT_VERSION, "step": step, **state, "optimizer": opt_rest}
        (tmp / "state.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """(trainable tensors, optimizer state dict, state.json) of a checkpoint folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise SdedgeError(f"--resume {folder}: not a checkpoint folder (no state.json)")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdedgeError(f"{state_file}: corrupt: {e}") from e
    if state.get("version") != CHECKPOINT_VERSION:
        raise SdedgeError(f"{state_file}: checkpoint version {state.get('version')!r}, this sdedge reads {CHECKPOINT_VERSION}")
    try:
        trainable = load_file(str(folder / "trainable.safetensors"))
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, SafetensorError) as e:
        raise SdedgeError(f"{folder}: cannot read the checkpoint tensors: {e}") from e
    return trainable, optimizer_from_flat(opt_tensors, state["optimizer"]), state


def _steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = _steps(Path(root))
    return found[-1][1] if found else None


def prune_checkpoints(root: Path, keep: int | None) -> None:
    root = Path(root)
    for p in root.glob(".step-*.tmp"):  # leftovers of a run killed while writing
        shutil.rmtree(p, ignore_errors=True)
    if keep is None:
        return
    for _, p in _steps(root)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
