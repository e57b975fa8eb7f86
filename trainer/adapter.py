"""LoRA layers on the models being trained, and the adapter files written at the end.

- `inject_lora(model, targets, rank, alpha, seed, component)`: peft's `inject_adapter_in_model` (it works for
  diffusers' UNet and for transformers 5's CLIPTextModel with peft 0.21, whose `add_adapter` wants peft >= 0.22);
  the LoRA A matrices are initialised from their own seed, B from zeros, so the start is the base model.
- `lora_layers(model, component)`: {canonical module path: (A, B)} from the trained model. Text-encoder paths are
  written with transformers' classic `text_model.` prefix (what SD1.5 LoRAs in the wild and A1111 use; diffusers
  loads them on transformers 4 and 5 alike).
- `adapter_tensors(layers, fmt, ...)`: the safetensors tensors and metadata of
  - `peft`: `unet.<module>.lora_A.weight` / `lora_B.weight`, `text_encoder.text_model.<module>...`, with rank,
    alpha and targets in the `lora_adapter_metadata` header entry that diffusers reads (so alpha != rank loads
    right); `StableDiffusionPipeline.load_lora_weights` loads the file unchanged;
  - `kohya`: `lora_unet_<module_with_underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`, and
    `lora_te_text_model_...` for the text encoder, the keys A1111 and kohya's sd-scripts read.
- `write_adapter(path, tensors, metadata)`: safetensors through sdedge's one safetensors writer
  (runtime/tensor_files.py `write_safetensors`): atomic, its header's metadata in sorted key order, so the same
  weights are the same bytes.
- `write_adapter_json(path, doc)` / `read_adapter_json(path)`: adapter.json, the `AdapterDocument` beside it
  (runtime/documents.py: format "sdedge-adapter", version 1): what was trained, on what, from which base. The
  trainer builds the dataclass (trainer/lora_trainer.py `adapter_document`); `write_adapter_json` takes nothing else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdedge.runtime.documents import DocumentType
from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.manifest import BaseInfo
from sdedge.runtime.strict import NonNegative
from sdedge.runtime.tensor_files import write_safetensors

from .dataset import seed_for

__all__ = ["ADAPTER_NAME", "ADAPTER_JSON", "AdapterDocument", "BaseRef", "TeacherRef", "DatasetRef", "PriorRef",
           "LoraShape", "inject_lora", "lora_parameters", "lora_layers", "adapter_tensors", "write_adapter",
           "write_adapter_json", "read_adapter_json"]

ADAPTER_NAME = "default"


@dataclass(frozen=True)
class BaseRef(BaseInfo):
    """The base an adapter was trained on: its id and SHA-256 (as a bundle's provenance records them) and where."""

    path: str


@dataclass(frozen=True)
class TeacherRef(BaseRef):
    """The teacher of a distilled adapter (--distill-from, or the LCM teacher) and its loss weight."""

    weight: float


@dataclass(frozen=True)
class DatasetRef:
    sha256: str
    images: NonNegative
    path: str


@dataclass(frozen=True)
class PriorRef(DatasetRef):
    """The class images of a prior-preservation run (--prior-data, trainer/prior.py) and their loss weight."""

    weight: float


@dataclass(frozen=True)
class LoraShape:
    rank: NonNegative
    alpha: float
    unet_targets: tuple[str, ...]
    unet_layers: NonNegative
    text_encoder_targets: tuple[str, ...] | None
    text_encoder_layers: NonNegative


@dataclass(frozen=True)
class AdapterDocument:
    """adapter.json, written beside adapter.safetensors at the end of a run."""

    file: str
    sha256: str
    key_format: str  # "peft" | "kohya"
    base: BaseRef
    dataset: DatasetRef
    lora: LoraShape
    steps: NonNegative
    final_loss: float | None  # None: not finite
    final_loss_mean10: float | None
    world_size: NonNegative
    optimizer: str
    resumed_from: int | None
    seconds: float
    created: str  # ISO 8601, UTC
    toolchain: dict[str, str]
    config: dict[str, Any]  # the run's TrainConfig but resume and overwrite
    distilled_from: TeacherRef | None = None  # --distill-from's teacher (or the LCM teacher); absent before distillation
    prior: PriorRef | None = None  # --prior-data's class images; absent before prior preservation
    tokens: dict[str, tuple[int, ...]] | None = None  # --train-tokens: word -> the token rows trained (trainer/tokens.py)


ADAPTER_JSON = DocumentType(AdapterDocument, "sdedge-adapter", 1, "adapter.json")


def inject_lora(model, targets, rank: int, alpha: float, seed: int, component: str):
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        init_lora_weights=True, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_for(seed, "lora-init", component))
        try:
            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        except ValueError as e:
            raise SdedgeError(f"{component}: cannot put a LoRA on {list(targets)}: {e}") from e
    params = lora_parameters(model)
    if not params:
        raise SdedgeError(f"{component}: none of the target modules {list(targets)} is in the model")
    for _, p in params:
        p.requires_grad_(True)
        p.data = p.data.float()
    return config


def lora_parameters(model) -> list[tuple[str, Any]]:
    """(name, parameter) of the LoRA weights, in a fixed (sorted) order."""
    return sorted(((n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n),
                  key=lambda item: item[0])


def _canonical(path: str, component: str, model) -> str:
    if component == "text_encoder" and not path.startswith("text_model.") and not hasattr(model, "text_model"):
        return "text_model." + path
    return path


def lora_layers(model, component: str) -> dict[str, tuple[Any, Any]]:
    layers: dict[str, list] = {}
    for name, p in lora_parameters(model):
        path, _, rest = name.partition(".lora_")
        which = rest[0]  # "A" or "B"
        slot = layers.setdefault(_canonical(path, component, model), [None, None])
        slot[0 if which == "A" else 1] = p.detach().float().cpu().contiguous()
    return {k: (a, b) for k, (a, b) in layers.items()}


def adapter_tensors(unet_layers: dict, text_layers: dict, fmt: str, rank: int, alpha: float,
                    unet_targets, text_targets) -> tuple[dict, dict[str, str]]:
    import torch

    tensors: dict[str, Any] = {}
    if fmt == "peft":
        for prefix, layers in (("unet", unet_layers), ("text_encoder", text_layers)):
            for path, (a, b) in layers.items():
                tensors[f"{prefix}.{path}.lora_A.weight"] = a.clone()
                tensors[f"{prefix}.{path}.lora_B.weight"] = b.clone()
        lora_meta: dict[str, Any] = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": list(unet_targets)}
        if text_layers:
            lora_meta.update({"text_encoder.r": rank, "text_encoder.lora_alpha": alpha,
                              "text_encoder.target_modules": list(text_targets)})
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(lora_meta, sort_keys=True)}
    elif fmt == "kohya":
        for prefix, layers in (("lora_unet", unet_layers), ("lora_te", text_layers)):
            for path, (a, b) in layers.items():
                key = f"{prefix}_{path.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = a.clone()
                tensors[f"{key}.lora_up.weight"] = b.clone()
                tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                    "ss_base_model_version": "sd_v1", "ss_training_comment": "trained with sdedge"}
    else:
        raise SdedgeError(f"unknown adapter format {fmt!r} (peft or kohya)")
    return tensors, metadata


def write_adapter(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """The adapter as safetensors through the one writer (runtime/tensor_files.py): atomic, and the same bytes
    for the same weights (the header's metadata in sorted key order)."""
    from safetensors.torch import save_file

    write_safetensors(path, tensors, metadata, save_file)


def write_adapter_json(path: str | os.PathLike, doc: AdapterDocument) -> None:
    """adapter.json: the trainer's `AdapterDocument`, checked to read back (every type right), then written
    atomically. A TypeError for anything else (a dict of its fields is not built and checked afterwards)."""
    if not isinstance(doc, AdapterDocument):
        raise TypeError(f"write_adapter_json: doc is a {type(doc).__name__}, not an AdapterDocument")
    ADAPTER_JSON.write(path, doc)


def read_adapter_json(path: str | os.PathLike) -> AdapterDocument:
    return ADAPTER_JSON.read(path)
