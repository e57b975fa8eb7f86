"""`sdedge train`'s entry: one function that picks the trainer for the config and the base.

    --lcm              ─► trainer/lcm.py          LcmTrainer (latent consistency distillation of an LCM-LoRA)
    an SDXL base       ─► trainer/sdxl_train.py   SdxlTrainer
    otherwise          ─► trainer/lora_trainer.py Trainer (a LoRA on a Stable Diffusion 1.x base)

The trainers subclass lora_trainer.Trainer; this module sits above them so none imports it back.
"""

from __future__ import annotations

from sdedge.runtime.errors import BadInput

from .config import TrainConfig
from .lora_trainer import OUTPUTS, Trainer, TrainResult, lr_factor

__all__ = ["TrainResult", "Trainer", "train", "lr_factor", "OUTPUTS"]


def train(cfg: TrainConfig, *, console=None, stop_after: int | None = None, unet_loader=None,
          unet_key_to_ldm=None, lora_fuser=None) -> TrainResult:
    """Train a LoRA as `cfg` says; returns what was written. `stop_after` (tests) ends the run after that step's
    checkpoint as if it were killed. `unet_loader` reads a pruned base's UNet (trainer/base.py). An SDXL base
    trains with trainer/sdxl_train.py; `unet_key_to_ldm` (the exporter's key mapping) names its kohya keys.
    `lcm` distils an LCM-LoRA (trainer/lcm.py); `lora_fuser` (the exporter's fuse) fuses its `lcm_fuse` LoRAs."""
    from .sdxl_train import SdxlTrainer, is_sdxl_base

    kw = dict(console=console, stop_after=stop_after, unet_loader=unet_loader)
    if cfg.lcm:
        from .lcm import LcmTrainer

        return LcmTrainer(cfg, lora_fuser=lora_fuser, **kw).run()
    if is_sdxl_base(cfg.base):
        if cfg.prior_data:
            raise BadInput(f"--prior-data: prior preservation trains SD 1.x bases; {cfg.base} is an SDXL base")
        if cfg.train_tokens:
            raise BadInput(f"--train-tokens: token rows train on SD 1.x bases; {cfg.base} is an SDXL base")
        return SdxlTrainer(cfg, unet_key_to_ldm=unet_key_to_ldm, **kw).run()
    return Trainer(cfg, **kw).run()
