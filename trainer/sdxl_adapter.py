"""The adapter files of an SDXL LoRA run, in the two layouts SDXL tools read:

- `peft` (diffusers' `StableDiffusionXLPipeline.load_lora_weights`): `unet.<module>.lora_A.weight` / `lora_B.weight`,
  `text_encoder.text_model.<module>...`, `text_encoder_2.text_model.<module>...`, with rank, alpha and targets of
  each model in the `lora_adapter_metadata` header entry;
- `kohya` (kohya's sd-scripts, A1111, ComfyUI): `lora_unet_<module>` with the UNet's original (LDM) module names
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), `lora_te1_text_model_...` for CLIP ViT-L,
  `lora_te2_text_model_...` for OpenCLIP bigG, each with `.lora_down.weight`, `.lora_up.weight` and `.alpha`.

The LDM names come from the exporter's single-file key mapping (`sdedge.export.single_file.unet_key_to_ldm`), the
same one `export --lora` reads kohya SDXL files with; the trainer does not import the exporter, so the caller
hands the mapping in (`ldm_name`, the `sdedge train` command does).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from sdedge.runtime.errors import SdedgeError

from .adapter import adapter_tensors

__all__ = ["sdxl_adapter_tensors", "KOHYA_PREFIXES"]

KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def _kohya(layers: dict[str, dict], alpha: float, ldm_name: Callable[[str], str]) -> dict:
    import torch

    tensors: dict[str, Any] = {}
    for comp, comp_layers in layers.items():
        for path, (a, b) in comp_layers.items():
            name = ldm_name(path) if comp == "unet" else path
            key = f"{KOHYA_PREFIXES[comp]}_{name.replace('.', '_')}"
            tensors[f"{key}.lora_down.weight"] = a.clone()
            tensors[f"{key}.lora_up.weight"] = b.clone()
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    return tensors


def sdxl_adapter_tensors(layers: dict[str, dict], fmt: str, rank: int, alpha: float, unet_targets, text_targets,
                         ldm_name: Callable[[str], str] | None) -> tuple[dict, dict[str, str]]:
    """(tensors, safetensors metadata) of `layers` ({"unet": {module: (A, B)}, "text_encoder": ...,
    "text_encoder_2": ...}) in `fmt`. `ldm_name(module path)` gives a UNet module's LDM name (kohya only)."""
    text1, text2 = layers.get("text_encoder", {}), layers.get("text_encoder_2", {})
    if fmt == "peft":
        tensors, header = adapter_tensors(layers["unet"], text1, "peft", rank, alpha, unet_targets, text_targets)
        meta = json.loads(header["lora_adapter_metadata"])
        for path, (a, b) in text2.items():
            tensors[f"text_encoder_2.{path}.lora_A.weight"] = a.clone()
            tensors[f"text_encoder_2.{path}.lora_B.weight"] = b.clone()
        if text2:
            meta.update({"text_encoder_2.r": rank, "text_encoder_2.lora_alpha": alpha,
                         "text_encoder_2.target_modules": list(text_targets)})
        return tensors, {**header, "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}
    if fmt == "kohya":
        if ldm_name is None:
            raise SdedgeError("kohya SDXL keys use the UNet's original (LDM) module names: train with the `sdedge "
                              "train` command, or pass ldm_name=sdedge.export.single_file.unet_key_to_ldm's module "
                              "mapping (needs sdedge[export])")
        return _kohya(layers, alpha, ldm_name), {
            "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sdxl_base_v1-0", "ss_training_comment": "trained with sdedge"}
    raise SdedgeError(f"unknown adapter format {fmt!r} (peft or kohya)")
