"""Training checkpoints: safetensors and JSON only (no pickles), each written whole or not at all.

    OUT/checkpoints/step-000100/
        trainable.safetensors   the LoRA parameters, by their names in the training models
        optimizer.safetensors   the optimizer's per-parameter tensors (AdamW moments and steps, ...)
        ema.safetensors         only in a run that keeps one: the EMA of the trainable weights (--lcm-ema-decay's
                                target network, trainer/lcm.py), by the same names
        state.json              step, config, the optimizer's hyper-parameters and scalars, the grad scaler, ...

A checkpoint is assembled in a hidden temporary folder (every file fsynced, then the folder) and renamed into
place (runtime/files.py: staged_dir, which fsyncs the parent), so a run killed at any moment, or a power cut,
leaves only whole checkpoints. state.json, written last, records every file's SHA-256: a checkpoint is *valid*
when they match and its tensors are finite. `latest_checkpoint` returns the newest valid one (a damaged newer one
is logged and passed over) and `prune_checkpoints` counts only valid ones, so the older checkpoint is never
deleted before the newer one is known good. Nothing else is needed to resume: the data order, noise and
timesteps are pure functions of (seed, step) (see dataset.py), and the learning rate is a function of the step.
state.json is the `CheckpointState` document (runtime/documents.py: format "sdedge-checkpoint", version 2; the
state.json of earlier sdedge versions, a bare "version": 1, reads as version 1).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdedge.runtime.documents import DocumentType, Legacy
from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.files import atomic_write_bytes, staged_dir
from sdedge.runtime.strict import NonNegative

from .adapter import PriorRef
from .hashing import sha256_bytes

__all__ = ["CHECKPOINT_VERSION", "Checkpoint", "CheckpointState", "OptimizerRest", "save_checkpoint", "read_checkpoint",
           "newest_checkpoint", "latest_checkpoint", "prune_checkpoints", "optimizer_to_flat", "optimizer_from_flat"]

CHECKPOINT_VERSION = 2
_NAME = re.compile(r"^step-(\d+)$")
TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors")
EMA_FILE = "ema.safetensors"  # optional: the EMA of the trainable weights, when the run keeps one
log = logging.getLogger("sdedge.trainer")


@dataclass(frozen=True)
class OptimizerRest:
    """The optimizer's state beside its tensors: hyper-parameters per group and per-parameter scalars."""

    param_groups: tuple[dict[str, Any], ...]
    scalars: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointState:
    """state.json: where the run was, what it trained on (checked on resume) and the SHA-256 of the tensor files."""

    step: NonNegative
    optimizer: OptimizerRest
    config: dict[str, Any] = field(default_factory=dict)  # the run's TrainConfig (to_dict)
    world_size: int = 1
    base_sha256: str | None = None
    dataset_sha256: str | None = None
    teacher_sha256: str | None = None  # --distill-from's; None without one (and before distillation existed)
    prior: PriorRef | None = None  # --prior-data's SHA-256, size, path and weight (trainer/prior.py); None without
    loss: float | None = None
    optimizer_kind: str = "adamw"
    scaler: dict[str, Any] | None = None  # the grad scaler's state (fp16 mixed precision)
    files: dict[str, str] = field(default_factory=dict)  # tensor file -> SHA-256; empty in early checkpoints


STATE = DocumentType(CheckpointState, "sdedge-checkpoint", CHECKPOINT_VERSION, "state.json",
                     legacy=Legacy("version"))


def optimizer_to_flat(state_dict: dict) -> tuple[dict[str, Any], OptimizerRest]:
    """An optimizer state dict as (tensors, the JSON-ready rest that state.json records)."""
    import torch

    tensors: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    for pid, st in state_dict["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    groups = tuple({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"])
    return tensors, OptimizerRest(groups, scalars)


def optimizer_from_flat(tensors: dict[str, Any], rest: OptimizerRest) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = t
    for key, v in rest.scalars.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest.param_groups]
    return {"state": state, "param_groups": groups}


def check_finite(tensors: dict[str, Any], where: str) -> None:
    """SdedgeError naming the first tensor holding a NaN or an infinity."""
    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SdedgeError(f"{where}: tensor {name!r} holds NaN or infinite values")


def save_checkpoint(root: Path, state: CheckpointState, trainable: dict[str, Any],
                    optimizer_tensors: dict[str, Any], ema: dict[str, Any] | None = None) -> Path:
    """Write ROOT/step-NNNNNN of `state` (its `optimizer` the rest of `optimizer_to_flat`, whose tensors are
    `optimizer_tensors`; `ema`, when given, the EMA of the trainable weights, as ema.safetensors); `files` is
    filled here with the SHA-256 of the tensor files written. A TypeError for anything but a `CheckpointState`:
    the trainer builds the document, never a dict of its fields."""
    from safetensors.torch import save

    if not isinstance(state, CheckpointState):
        raise TypeError(f"save_checkpoint: state is a {type(state).__name__}, not a CheckpointState")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    trainable = {k: v.detach().cpu().contiguous() for k, v in trainable.items()}
    check_finite(trainable, f"checkpoint of step {state.step}")  # a diverged run keeps its last good checkpoint
    parts = list(zip(TENSOR_FILES, (trainable, optimizer_tensors)))
    if ema is not None:
        ema = {k: v.detach().cpu().contiguous() for k, v in ema.items()}
        check_finite(ema, f"checkpoint of step {state.step} ({EMA_FILE})")
        parts.append((EMA_FILE, ema))
    with staged_dir(final) as tmp:  # every file fsynced, then the folder; the parent after the rename
        files = {}
        for name, tensors in parts:
            data = save(tensors)
            atomic_write_bytes(tmp / name, data)  # fsynced
            files[name] = sha256_bytes(data)
        STATE.write(tmp / "state.json", dataclasses.replace(state, files=files))  # last: says the rest is there
    read_checkpoint(final)  # read back: known good before prune_checkpoints may drop an older one
    return final


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder read whole, once: every file's SHA-256 checked against state.json, every tensor finite."""

    folder: Path
    state: CheckpointState
    trainable: dict[str, Any]
    optimizer: dict  # the optimizer's state dict (optimizer_from_flat)
    ema: dict[str, Any] | None  # the EMA of the trainable weights; None when the run kept none


def read_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint in `folder`, each tensor file read once (hashed and parsed from the same bytes); SdedgeError
    naming the file when it is damaged (missing, changed, unreadable, a tensor NaN/Inf)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder = Path(folder)
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise SdedgeError(f"--resume {folder}: not a checkpoint folder (no state.json)")
    state = STATE.read(state_file)
    stray = sorted(set(state.files) - set(TENSOR_FILES + (EMA_FILE,)))
    if stray:
        raise SdedgeError(f"{folder / stray[0]}: damaged (state.json lists a file a checkpoint does not hold)")
    tensors = {}
    for name in TENSOR_FILES + ((EMA_FILE,) if EMA_FILE in state.files else ()):
        path = folder / name
        digest = state.files.get(name)  # absent in checkpoints of earlier sdedge versions
        if not path.is_file():
            raise SdedgeError(f"{path}: damaged (missing from the checkpoint)")
        data = path.read_bytes()
        if digest is not None and sha256_bytes(data) != digest:
            raise SdedgeError(f"{path}: damaged (its SHA-256 differs from the one in state.json)")
        try:
            tensors[name] = load(data)
        except SafetensorError as e:
            raise SdedgeError(f"{path}: cannot read the checkpoint tensors: {e}") from e
        check_finite(tensors[name], str(path))
    try:
        optimizer = optimizer_from_flat(tensors[TENSOR_FILES[1]], state.optimizer)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SdedgeError(f"{state_file}: corrupt optimizer state: {e!r}") from e
    return Checkpoint(folder, state, tensors[TENSOR_FILES[0]], optimizer, tensors.get(EMA_FILE))


def _steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _read_valid(folder: Path) -> Checkpoint | None:
    try:
        return read_checkpoint(folder)
    except SdedgeError as e:
        log.warning("checkpoint %s is damaged and passed over: %s", folder, e)
        return None


def newest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest valid checkpoint under `root`, read (newer damaged ones are logged and passed over), or None."""
    for _, folder in reversed(_steps(Path(root))):
        found = _read_valid(folder)
        if found is not None:
            return found
    return None


def latest_checkpoint(root: Path) -> Path | None:
    """The folder of newest_checkpoint(root), or None."""
    found = newest_checkpoint(root)
    return None if found is None else found.folder


def prune_checkpoints(root: Path, keep: int | None) -> None:
    """Keep the newest `keep` valid checkpoints: only older ones are removed, never one that a damaged newer one
    would have to stand in for."""
    root = Path(root)
    for p in root.glob(".step-*.tmp"):  # leftovers of a run killed while writing
        shutil.rmtree(p, ignore_errors=True)
    if keep is None:
        return
    valid = [p for _, p in reversed(_steps(root)) if _read_valid(p) is not None]
    if len(valid) <= keep:
        return
    oldest_kept = valid[keep - 1]
    for _, p in _steps(root):
        if p.name < oldest_kept.name:
            shutil.rmtree(p, ignore_errors=True)
