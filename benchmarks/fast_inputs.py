"""Inputs of the fast-path benchmark (benchmarks/cpu-sd15-512-fast.yaml) that no hub download may provide here:
a random-weight LCM-LoRA in lcm-lora-sdv1-5's layout for a base, and a TAESD-architecture decoder with random weights.
Speed does not depend on the weights' values: the LoRA is fused at export (sdedge) or at load (the diffusers peer),
the decoder has TAESD's exact architecture (diffusers' AutoencoderTiny defaults, as benchmarks/decoder_time.py).

    python -m sdedge.benchmarks.fast_inputs lcm-lora --base DIR --out FILE.safetensors
    python -m sdedge.benchmarks.fast_inputs tiny-decoder --out DIR

The suite's prepare steps (`random: lcm-lora` / `random: tiny-decoder`) call the same functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# lcm-lora-sdv1-5's target modules: attention, feed-forward, proj_in/out, resnet convs, time_emb_proj, samplers
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
               "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
LCM_RANK = 64  # lcm-lora-sdv1-5's rank
RANDOM_KINDS = ("lcm-lora", "tiny-decoder")


def lora_layers(unet, targets, rank: int, seed: int, std: float = 0.05) -> dict:
    """{module path: (down, up)} of a seeded LoRA on the UNet's modules ending in `targets` (convolutions
    LoCon-style: down has the module's kernel, up is 1x1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in unet.named_modules():
        if not (isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(tuple("." + t for t in targets))):
            continue
        if isinstance(mod, torch.nn.Conv2d):
            down = torch.randn(rank, mod.in_channels, *mod.kernel_size, generator=g) * std
            up = torch.randn(mod.out_channels, rank, 1, 1, generator=g) * std
        else:
            down = torch.randn(rank, mod.in_features, generator=g) * std
            up = torch.randn(mod.out_features, rank, generator=g) * std
        out[name] = (down, up)
    return out


def lcm_lora_state(unet, rank: int = LCM_RANK, seed: int = 0, std: float = 0.01) -> dict:
    """kohya keys (`lora_unet_<diffusers module path>.lora_down/lora_up/alpha`, fp16), the layout lcm-lora-sdv1-5
    ships, on every module of `unet` that it adapts (LCM_TARGETS)."""
    import torch

    sd = {}
    for name, (down, up) in lora_layers(unet, LCM_TARGETS, rank, seed, std).items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down.half(), up.half()
        sd[f"{key}.alpha"] = torch.tensor(float(rank)).half()
    return sd


def write_random_lcm_lora(base: str | Path, out: str | Path, *, seed: int = 0) -> Path:
    """A random LCM-LoRA for `base`'s UNet (a diffusers folder), written atomically as safetensors (fp16)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from sdedge.runtime.tensor_files import write_safetensors

    unet = UNet2DConditionModel.from_pretrained(str(Path(base) / "unet"), local_files_only=True)
    sd = lcm_lora_state(unet, seed=seed)
    del unet
    return write_safetensors(out, sd, {"format": "pt"}, save_file)


def tiny_decoder_config(base: str | Path | None = None) -> dict:
    """TAESD's architecture (diffusers' AutoencoderTiny defaults, madebyollin/taesd) for a base of SD1.5's latent
    space (or no base); for a base of another scale factor (the tiny base: 4), TAESD's blocks cut to that many
    upsamplings, with the base's latent channels."""
    if base is None:
        return {}
    vae = json.loads((Path(base) / "vae" / "config.json").read_text(encoding="utf-8"))
    blocks = len(vae.get("block_out_channels", (1, 1, 1, 1)))  # the scale factor is 2 ** (blocks - 1), as TAESD's
    cfg = {"latent_channels": int(vae.get("latent_channels", 4))}
    if blocks != 4:
        cfg.update(encoder_block_out_channels=(64,) * blocks, decoder_block_out_channels=(64,) * blocks,
                   num_encoder_blocks=(1, 3, 3, 3)[:blocks], num_decoder_blocks=(3, 3, 3, 1)[-blocks:])
    return cfg


def write_random_tiny_decoder(out: str | Path, *, base: str | Path | None = None, seed: int = 0) -> Path:
    """An AutoencoderTiny of TAESD's architecture (tiny_decoder_config) with seeded random weights."""
    import torch
    from diffusers import AutoencoderTiny

    from sdedge.runtime.files import staged_dir

    torch.manual_seed(seed)
    model = AutoencoderTiny(**tiny_decoder_config(base))
    with staged_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
    return Path(out)


def write_random(kind: str, out: str | Path, *, base: str | None = None, seed: int = 0) -> Path:
    if kind == "lcm-lora":
        return write_random_lcm_lora(base, out, seed=seed)
    return write_random_tiny_decoder(out, base=base, seed=seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdedge.benchmarks.fast_inputs")
    p.add_argument("kind", choices=RANDOM_KINDS)
    p.add_argument("--base", help="the diffusers base whose UNet the LoRA adapts / whose latent space the decoder decodes")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.kind == "lcm-lora" and not args.base:
        p.error("lcm-lora needs --base")
    print(write_random(args.kind, args.out, base=args.base, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
