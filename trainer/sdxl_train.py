"""`sdedge train` on an SDXL base: a LoRA on the UNet and, with `train_text_encoder`, on both text encoders.

The SDXL UNet is conditioned as diffusers' train_text_to_image_lora_sdxl.py conditions it:

    captions ─► text_encoder (CLIP ViT-L)   ─► penultimate hidden states (b, 77, D1) ─┐
             ─► text_encoder_2 (bigG, proj) ─► penultimate hidden states (b, 77, D2) ─┴► concat (b, 77, D1 + D2)
                                            ─► pooled, projected output (b, P) ───────► added_cond_kwargs["text_embeds"]
    image size ─► time ids (original_size ⊕ crops_coords_top_left ⊕ target_size) (b, 6) ─► added_cond_kwargs["time_ids"]

The prepared images are already resized and cropped to the training size (`sdedge prepare`), so each row's time
ids are (h, w, 0, 0, h, w) of its image: what that script computes for an image at the training resolution.

Everything else is the SD 1.x trainer's (trainer/lora_trainer.py): the seeded batches, resume from a checkpoint,
validation images (with `StableDiffusionXLPipeline`), the loss. The adapter is written in peft/diffusers keys or
in kohya's SDXL keys (trainer/sdxl_adapter.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .adapter import inject_lora, lora_layers, lora_parameters, write_adapter, write_adapter_json
from .batches import Batch, Batches, latent_cache, tokenize
from .lora_trainer import Trainer
from .sdxl_adapter import sdxl_adapter_tensors

__all__ = ["SdxlTrainer", "is_sdxl_base", "encode_sdxl", "time_ids"]


def is_sdxl_base(path) -> bool:
    """Whether the diffusers folder at `path` is an SDXL pipeline (its model_index.json names text_encoder_2)."""
    index = Path(path) / "model_index.json" if path else None
    try:
        return index is not None and "text_encoder_2" in json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False  # the SD 1.x loader names what is wrong with the folder


def encode_sdxl(text_encoder, text_encoder_2, tokenizer, tokenizer_2, captions, device):
    """(hidden (b, 77, D1 + D2), pooled (b, P)): both encoders' penultimate hidden states, concatenated, and the
    second encoder's pooled, projected output."""
    import torch

    first = text_encoder(tokenize(tokenizer, captions).to(device), output_hidden_states=True)
    second = text_encoder_2(tokenize(tokenizer_2, captions).to(device), output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # (b, 77, D1 + D2)
    return hidden, second.text_embeds  # (b, P)


def time_ids(latents, vae_scale: int):
    """(b, 6) micro-conditioning of images already at their training size: (h, w, 0, 0, h, w) in pixels."""
    import torch

    h, w = latents.shape[-2] * vae_scale, latents.shape[-1] * vae_scale  # latents (b, 4, h/8, w/8)
    row = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=latents.device)
    return row.repeat(latents.shape[0], 1)


def sdxl_text_cache(text_encoder, text_encoder_2, base, data, device) -> dict:
    """caption -> (hidden (77, D1 + D2), pooled (P,)) for every distinct caption, on the CPU in fp32."""
    import torch

    cache = {}
    with torch.no_grad():
        for text in sorted({it.text for it in data.items}):
            hidden, pooled = encode_sdxl(text_encoder, text_encoder_2, base.tokenizer, base.tokenizer_2, [text], device)
            cache[text] = (hidden[0].float().cpu(), pooled[0].float().cpu())
    return cache


class SdxlTrainer(Trainer):
    """The SD 1.x trainer with SDXL's second text encoder and added conditioning (see the module docstring)."""

    def __init__(self, cfg, *, unet_key_to_ldm: Callable[[str, Any], str] | None = None, **kw):
        super().__init__(cfg, **kw)
        self.unet_key_to_ldm = unet_key_to_ldm
        if self.cfg.format == "kohya" and unet_key_to_ldm is None:
            sdxl_adapter_tensors({"unet": {}}, "kohya", 1, 1.0, (), (), None)  # the error: before any training

    # -- models ----------------------------------------------------------------------------------------------------
    def inject_lora(self) -> None:
        super().inject_lora()
        cfg = self.cfg
        self.text_encoder_2 = self.base.text_encoder_2
        if cfg.train_text_encoder:
            inject_lora(self.text_encoder_2, cfg.text_encoder_target_modules, cfg.rank, cfg.alpha, cfg.seed,
                        "text_encoder_2")

    def setup_models(self) -> None:
        super().setup_models()
        cfg, te2 = self.cfg, self.text_encoder_2
        if cfg.gradient_checkpointing and cfg.train_text_encoder:
            te2.gradient_checkpointing_enable()
        te2.to(self.device)
        te2.train(cfg.train_text_encoder)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def lora_params(self, unwrap: bool = False) -> dict:
        params = super().lora_params(unwrap)
        if self.cfg.train_text_encoder:
            te2 = self.accelerator.unwrap_model(self.text2_p) if unwrap else self.text_encoder_2
            params.update({f"text_encoder_2.{n}": p for n, p in lora_parameters(te2)})
        return params

    # -- caches and optimizer --------------------------------------------------------------------------------------
    def build_caches(self) -> None:
        cfg = self.cfg
        self.latent_cache = latent_cache(self.vae, self.data, self.device) if cfg.cache_latents else None
        self.text_cache = (sdxl_text_cache(self.text_encoder, self.text_encoder_2, self.base, self.data, self.device)
                           if cfg.cache_text_embeddings else None)
        self.batches = Batches(cfg, self.base, self.data, self.plan, self.accelerator, self.latent_cache)

    def trained_text_encoders(self) -> list:
        return [self.text_encoder, self.text_encoder_2] if self.cfg.train_text_encoder else []

    def prepare_optimizer(self, opt_state: dict | None, state) -> None:
        super().prepare_optimizer(opt_state, state)
        self.text2_p = self.text_ps[1] if self.text_ps else self.text_encoder_2

    # -- the conditioning ------------------------------------------------------------------------------------------
    def encode_text(self, captions: list[str]):
        """(hidden (b, 77, D1 + D2), pooled (b, P)) of the captions (from the cache when there is one)."""
        import torch

        if self.text_cache is not None:
            rows = [self.text_cache[c] for c in captions]
            return (torch.stack([h for h, _ in rows]).to(self.device), torch.stack([p for _, p in rows]).to(self.device))
        return encode_sdxl(self.text_p, self.text2_p, self.base.tokenizer, self.base.tokenizer_2, captions, self.device)

    def unet_conditioning(self, batch: Batch) -> dict:
        hidden, pooled = self.encode_text(batch.captions)
        added = {"text_embeds": pooled, "time_ids": time_ids(batch.latents, self.vae_scale)}
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": added}

    # -- the adapter -----------------------------------------------------------------------------------------------
    def ldm_name(self, path: str) -> str:
        return self.unet_key_to_ldm(path + ".weight", self.base.unet.config).removesuffix(".weight")

    def write_adapter(self, adapter_path: Path) -> None:
        cfg, acc = self.cfg, self.accelerator
        layers = {"unet": lora_layers(acc.unwrap_model(self.unet_p), "unet")}
        if cfg.train_text_encoder:  # "text_encoder": both CLIP towers' paths get transformers' text_model. prefix
            layers["text_encoder"] = lora_layers(acc.unwrap_model(self.text_p), "text_encoder")
            layers["text_encoder_2"] = lora_layers(acc.unwrap_model(self.text2_p), "text_encoder")
        tensors, header = sdxl_adapter_tensors(layers, cfg.format, cfg.rank, cfg.alpha, cfg.target_modules,
                                               cfg.text_encoder_target_modules,
                                               self.ldm_name if self.unet_key_to_ldm else None)
        write_adapter(adapter_path, tensors, header)
        text_layers = len(layers.get("text_encoder", {})) + len(layers.get("text_encoder_2", {}))
        write_adapter_json(self.out / "adapter.json", self.adapter_document(adapter_path, len(layers["unet"]),
                                                                           text_layers))
