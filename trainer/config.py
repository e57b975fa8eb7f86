"""The training config: one frozen dataclass whose keys are also the `sdedge train` flags.

    defaults  <-  YAML file (--config)  <-  flags given on the command line

`--max-steps 200` and `max_steps: 200` are the same setting. An unknown YAML key or a wrong type is a
`ConfigError` naming the key; `resolve()` fills the derived values (alpha, caching, steps) and checks
ranges, so the effective config saved beside the adapter reproduces the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdedge.runtime.strict import ConfigError, from_dict, to_dict

__all__ = [
    "TrainConfig",
    "UNET_TARGETS",
    "RECOVERY_TARGETS",
    "LCM_TARGETS",
    "TEXT_ENCODER_TARGETS",
    "HELP",
    "load_config",
    "add_config_flags",
    "config_from_args",
    "resolve",
    "save_config",
    "RESUME_MAY_CHANGE",
]

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# A recovery fine-tune after pruning (--distill-from) reaches every layer pruning narrowed: resnet convolutions,
# attention, its projections and feed-forwards. On the tiny base pruned by 30 % (the first, MetaPruner pruning),
# 200 steps: UNet cosine vs the unpruned model 0.885 -> 0.970 with UNET_TARGETS, -> 0.986 with these.
RECOVERY_TARGETS = UNET_TARGETS + ("conv1", "conv2", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
# An LCM-LoRA (--lcm) covers what latent-consistency/lcm-lora-sdv1-5 does: attention, feed-forward, proj_in/out,
# the resnet convolutions and shortcuts, time_emb_proj and the down/up-samplers.
LCM_TARGETS = RECOVERY_TARGETS + ("conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")


@dataclass(frozen=True)
class TrainConfig:
    # what to train on and where to write
    base: str = ""
    data: str = ""
    out: str = ""
    # the adapter
    rank: int = 16
    alpha: float | None = None
    target_modules: tuple[str, ...] | None = None  # None: UNET_TARGETS, or RECOVERY_TARGETS with distill_from
    train_text_encoder: bool = False
    text_encoder_target_modules: tuple[str, ...] = TEXT_ENCODER_TARGETS
    train_tokens: tuple[str, ...] = ()  # textual inversion of these words' token rows (trainer/tokens.py)
    format: str = "peft"
    # optimisation
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None
    token_lr: float | None = None
    optimizer: str = "auto"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None
    epochs: int | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    cache_text_embeddings: bool | None = None
    distill_from: str | None = None
    distill_weight: float = 1.0
    prior_data: str | None = None
    prior_weight: float = 1.0
    # latent consistency distillation (--lcm, trainer/lcm.py)
    lcm: bool = False
    lcm_fuse: tuple[str, ...] = ()
    lcm_ddim_timesteps: int = 50
    lcm_guidance_min: float = 6.0
    lcm_guidance_max: float = 16.0
    lcm_unguided_below: int = 0  # the teacher guides only from this timestep up (a guidance interval); 0: everywhere
    lcm_loss: str = "huber"
    lcm_huber_c: float = 0.001
    lcm_timestep_scaling: float = 10.0
    lcm_ema_decay: float = 0.0  # 0: the online student is the target (the LoRA script); 0.95: the full-model script's
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    timestep_bias_strategy: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    seed: int = 0
    # validation, logging, checkpoints
    validation_prompts: tuple[str, ...] = ()
    validation_negative_prompt: str = ""
    validation_steps: int | None = None
    validation_inference_steps: int = 20
    validation_guidance: float = 7.5
    validation_seed: int = 0
    log_steps: int = 1
    tensorboard: bool = True
    progress: bool = True
    checkpoint_steps: int | None = None
    checkpoints_total_limit: int | None = 2
    resume: str | None = None
    overwrite: bool = False


HELP: dict[str, str] = {
    "base": "the base model: a local diffusers folder (e.g. one written by `sdedge base tiny`)",
    "data": "a folder written by `sdedge prepare`",
    "out": "output folder: adapter.safetensors, adapter.json, config.yaml, metrics.jsonl, logs/, validation/, checkpoints/",
    "rank": "LoRA rank",
    "alpha": "LoRA alpha (default: the rank, i.e. scale 1)",
    "target_modules": "UNet modules that get a LoRA (default: the attention projections; with --distill-from, "
                      "also the convolutions, attention projections in/out and feed-forwards, which pruning narrowed)",
    "train_text_encoder": "also train a LoRA on the text encoder's attention projections",
    "text_encoder_target_modules": "text-encoder modules that get a LoRA (with --train-text-encoder; none with "
                                   "--train-tokens: only the token rows train in the text encoder)",
    "train_tokens": "words whose token-embedding rows train beside the LoRA (textual inversion of a word the base "
                    "spells but never learned, e.g. purple on the tiny base; needs --train-text-encoder and the peft "
                    "format; `sdedge export --lora` fuses them, diffusers' load_lora_weights does not know the keys)",
    "format": "adapter key format: peft (diffusers' load_lora_weights) or kohya (A1111/kohya keys)",
    "learning_rate": "peak learning rate",
    "text_encoder_lr": "learning rate of the text-encoder LoRA (default: --learning-rate)",
    "token_lr": "learning rate of the --train-tokens rows (default: the text encoder's)",
    "optimizer": "auto (8-bit AdamW when bitsandbytes and a GPU are there, else AdamW), adamw, adamw8bit",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_epsilon": "AdamW epsilon",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm (0: no clipping)",
    "batch_size": "images per process per micro-step",
    "gradient_accumulation_steps": "micro-steps per optimizer step",
    "max_steps": "optimizer steps to train (default: from --epochs, else 500)",
    "epochs": "passes over the data (used when --max-steps is not given)",
    "lr_scheduler": "constant, linear or cosine (after the warm-up)",
    "lr_warmup_steps": "optimizer steps of linear warm-up from 0",
    "mixed_precision": "no, fp16 (GPU) or bf16",
    "gradient_checkpointing": "trade compute for memory in the UNet (and text encoder)",
    "cache_latents": "encode every image with the VAE once, before training",
    "cache_text_embeddings": "encode every caption once (default: on unless the text encoder trains)",
    "distill_from": "a teacher base (diffusers folder): the UNet learns to reproduce the teacher UNet's prediction on "
                    "the same noisy latents and captions (knowledge distillation; the recovery fine-tune after "
                    "`sdedge prune`, with the unpruned parent as teacher)",
    "distill_weight": "with --distill-from: weight of the teacher's prediction in the target (1: distillation only; "
                      "0.5: half the denoising loss)",
    "prior_data": "prior preservation (DreamBooth): a folder written by `sdedge prepare` from class images (real "
                  "pictures of other prompts of the class, or the base's own); a batch of them joins every step, so "
                  "the LoRA keeps what the base knew (trainer/prior.py)",
    "prior_weight": "with --prior-data: weight of the class images' loss (1 as DreamBooth)",
    "lcm": "latent consistency distillation: train an LCM-LoRA so the base samples in 2-8 steps without a guidance "
           "pass (sdedge export --lora OUT/adapter.safetensors:1.0 --scheduler lcm --steps 4 --guidance 1)",
    "lcm_fuse": "with --lcm: LoRAs (FILE:SCALE) fused into the base first, so the LCM-LoRA is distilled from your "
                "own model (export it with the same --lora FILE:SCALE before the LCM-LoRA)",
    "lcm_ddim_timesteps": "with --lcm: the teacher's DDIM solver steps over the training schedule (50 of 1000: "
                          "each step skips 20 timesteps); LCMScheduler's original_inference_steps",
    "lcm_guidance_min": "with --lcm: smallest guidance scale sampled for the teacher (diffusers' guidance_scale; "
                        "the LoRA bakes guidance in, so it samples at guidance 1)",
    "lcm_guidance_max": "with --lcm: largest guidance scale sampled for the teacher",
    "lcm_unguided_below": "with --lcm: the teacher runs unguided (w = 1) where the solver step starts below this "
                          "timestep, guided above it (a guidance interval; 0, the default: guided everywhere, as "
                          "diffusers' LCM scripts); the LoRA then stops baking guidance into the low-noise steps",
    "lcm_loss": "with --lcm: huber (pseudo-Huber, as latent consistency distillation) or l2",
    "lcm_huber_c": "with --lcm: the pseudo-Huber loss's c",
    "lcm_timestep_scaling": "with --lcm: timestep scaling of the c_skip/c_out boundary conditions (LCMScheduler's "
                            "timestep_scaling)",
    "lcm_ema_decay": "with --lcm: the target network is the student with an EMA of its LoRA weights, updated after "
                     "every optimizer step with this decay (0.95 in diffusers' full-model LCM script; saved in the "
                     "checkpoints); 0: the online student without gradients, as the LCM-LoRA script",
    "min_snr_gamma": "min-SNR loss weighting gamma (5 is usual; default off)",
    "noise_offset": "noise offset (e.g. 0.05; default 0)",
    "timestep_bias_strategy": "draw training timesteps biased to the noisiest (later) or the least noisy (earlier) "
                              "--timestep-bias-portion of the schedule, as diffusers' train_text_to_image_sdxl.py "
                              "(none: uniform)",
    "timestep_bias_multiplier": "with --timestep-bias-strategy: how much likelier a timestep of the biased portion is "
                                "drawn (2: twice as likely)",
    "timestep_bias_portion": "with --timestep-bias-strategy: the share of the schedule that is biased (0.25: the last "
                             "250 of 1000 timesteps for later)",
    "seed": "seed of the LoRA init, data order, noise and timesteps",
    "validation_prompts": "prompts rendered to PNGs every --validation-steps and at the end",
    "validation_negative_prompt": "negative prompt of the validation images",
    "validation_steps": "render validation images every N optimizer steps",
    "validation_inference_steps": "denoising steps of a validation image",
    "validation_guidance": "guidance scale of the validation images",
    "validation_seed": "seed of the validation images",
    "log_steps": "write metrics every N optimizer steps",
    "tensorboard": "write TensorBoard logs to OUT/logs (when tensorboard is installed)",
    "progress": "show a progress bar",
    "checkpoint_steps": "write a checkpoint every N optimizer steps (atomically)",
    "checkpoints_total_limit": "keep at most this many checkpoints (default 2)",
    "resume": "continue from a checkpoint folder, or 'latest' in OUT/checkpoints",
    "overwrite": "replace the outputs of an earlier run in OUT",
}

CHOICES: dict[str, tuple[str, ...]] = {
    "format": ("peft", "kohya"),
    "optimizer": ("auto", "adamw", "adamw8bit"),
    "lr_scheduler": ("constant", "linear", "cosine"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "lcm_loss": ("huber", "l2"),
    "timestep_bias_strategy": ("none", "later", "earlier"),
}

# Settings a resumed run may change without changing the loss curve up to the checkpoint.
RESUME_MAY_CHANGE = frozenset({
    "max_steps", "epochs", "validation_prompts", "validation_negative_prompt", "validation_steps",
    "validation_inference_steps", "validation_guidance", "validation_seed", "log_steps", "tensorboard", "progress",
    "checkpoint_steps", "checkpoints_total_limit", "resume", "overwrite", "format", "out", "base", "data",
    "cache_latents", "cache_text_embeddings", "gradient_checkpointing",
})  # fmt: skip


def _fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.init]


def load_config(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (keys checked later by `from_dict`)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the config {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_optional(tp):
    def parse(text: str):
        if text.lower() in ("none", "null", ""):
            return None
        return tp(text)

    parse.__name__ = tp.__name__
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config key (`--max-steps` for `max_steps`); flags not given stay out of the namespace, so a
    YAML value is only overridden by a flag the user typed."""
    hints = typing.get_type_hints(TrainConfig)
    for f in _fields():
        tp = hints[f.name]
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=HELP.get(f.name), dest=f.name)
        args = typing.get_args(tp)
        optional = type(None) in args
        inner = next((a for a in args if a is not type(None)), tp) if optional else tp
        if f.name == "resume":
            kw.update(nargs="?", const="latest", metavar="CHECKPOINT")
        elif inner is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is tuple:
            kw.update(nargs="*", metavar=f.name.upper().removesuffix("S"))
        elif inner in (int, float, str):
            kw["type"] = _parse_optional(inner) if optional else inner
            if f.name in CHOICES:
                kw["choices"] = CHOICES[f.name]
        else:  # pragma: no cover - a field type this CLI cannot express
            raise TypeError(f"no flag for {f.name}: {tp}")
        parser.add_argument(_flag(f.name), **kw)


def config_from_args(args: argparse.Namespace, yaml_path: str | None = None) -> TrainConfig:
    """defaults <- YAML <- flags, checked (unknown keys, types) but not yet resolved."""
    data: dict[str, Any] = load_config(yaml_path) if yaml_path else {}
    names = {f.name for f in _fields()}
    for name in names:
        if hasattr(args, name):
            value = getattr(args, name)
            data[name] = list(value) if isinstance(value, list) else value
    where = str(yaml_path) if yaml_path else "train config"
    return from_dict(TrainConfig, data, where)


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _check_lcm(cfg: TrainConfig) -> None:
    for key in ("distill_from", "train_text_encoder", "min_snr_gamma", "prior_data"):
        _check(not getattr(cfg, key), key, "cannot be used with lcm (latent consistency distillation has its own "
               "teacher, the base, and its own loss)")
    _check(cfg.timestep_bias_strategy == "none", "timestep_bias_strategy", "cannot be used with lcm (it draws its "
           "own timesteps on the solver's grid)")
    _check(cfg.lcm_ddim_timesteps >= 2, "lcm_ddim_timesteps", "must be at least 2")
    _check(1.0 <= cfg.lcm_guidance_min <= cfg.lcm_guidance_max, "lcm_guidance_min",
           f"must lie in [1, lcm_guidance_max] ({cfg.lcm_guidance_min} and {cfg.lcm_guidance_max} given)")
    _check(cfg.lcm_unguided_below >= 0, "lcm_unguided_below", f"must be >= 0 ({cfg.lcm_unguided_below} given)")
    _check(cfg.lcm_huber_c > 0, "lcm_huber_c", "must be positive")
    _check(cfg.lcm_timestep_scaling > 0, "lcm_timestep_scaling", "must be positive")
    _check(0.0 <= cfg.lcm_ema_decay < 1.0, "lcm_ema_decay", f"must lie in [0, 1) ({cfg.lcm_ema_decay} given; 0: no EMA, "
           "the online student is the target)")


def _check_tokens(cfg: TrainConfig) -> None:
    _check(cfg.token_lr is None or cfg.token_lr > 0, "token_lr", "must be positive")
    if not cfg.train_tokens:
        return
    _check(cfg.train_text_encoder, "train_tokens", "needs train_text_encoder (the rows train inside the text encoder)")
    _check(cfg.format == "peft", "train_tokens", "needs format peft (kohya/A1111 keys have no place for a trained "
           "token row)")
    _check(len(set(cfg.train_tokens)) == len(cfg.train_tokens), "train_tokens", "names a word twice")


def resolve(cfg: TrainConfig, *, steps_per_epoch: int | None = None) -> TrainConfig:
    """Check ranges and fill derived values: alpha (= rank), cache_text_embeddings, max_steps (from epochs)."""
    for key in ("base", "data", "out"):
        _check(bool(getattr(cfg, key)), key, f"required (give {_flag(key)} or `{key}:` in the config)")
    for key, choices in CHOICES.items():
        _check(getattr(cfg, key) in choices, key, f"{getattr(cfg, key)!r} is not one of {', '.join(choices)}")
    for f in _fields():  # inf/nan pass every range check below (inf > 0), then train to NaN
        value = getattr(cfg, f.name)
        if isinstance(value, float):
            _check(math.isfinite(value), f.name, f"must be a finite number, not {value}")
    _check(cfg.rank >= 1, "rank", "must be at least 1")
    _check(cfg.alpha is None or cfg.alpha > 0, "alpha", "must be positive")
    _check(cfg.target_modules is None or len(cfg.target_modules) > 0, "target_modules", "name at least one module")
    _check(cfg.learning_rate > 0, "learning_rate", "must be positive")
    _check(cfg.text_encoder_lr is None or cfg.text_encoder_lr > 0, "text_encoder_lr", "must be positive")
    _check(0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1, "adam_beta1", "betas must lie in [0, 1)")
    _check(cfg.adam_epsilon > 0, "adam_epsilon", "must be positive")
    _check(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    _check(cfg.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
    _check(cfg.batch_size >= 1, "batch_size", "must be at least 1")
    _check(cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be at least 1")
    _check(cfg.max_steps is None or cfg.max_steps >= 1, "max_steps", "must be at least 1")
    _check(cfg.epochs is None or cfg.epochs >= 1, "epochs", "must be at least 1")
    _check(cfg.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0")
    _check(0.0 <= cfg.distill_weight <= 1.0, "distill_weight", "must lie in [0, 1]")
    if cfg.distill_from is not None:
        _check(bool(cfg.distill_from), "distill_from", "name a teacher base folder")
        _check(not cfg.train_text_encoder, "distill_from",
               "cannot be used with train_text_encoder (both UNets read the same, frozen, text embeddings)")
    if cfg.lcm:
        _check_lcm(cfg)
    _check(cfg.prior_data is None or bool(cfg.prior_data), "prior_data", "name a folder written by `sdedge prepare`")
    _check(cfg.prior_weight > 0, "prior_weight", "must be positive")
    _check(cfg.min_snr_gamma is None or cfg.min_snr_gamma > 0, "min_snr_gamma", "must be positive")
    _check(cfg.noise_offset >= 0, "noise_offset", "must be >= 0")
    _check(cfg.timestep_bias_multiplier > 0, "timestep_bias_multiplier", "must be positive")
    _check(0 < cfg.timestep_bias_portion < 1, "timestep_bias_portion", "must lie in (0, 1)")
    _check(cfg.seed >= 0, "seed", "must be >= 0")
    _check(cfg.validation_steps is None or cfg.validation_steps >= 1, "validation_steps", "must be at least 1")
    _check(cfg.validation_inference_steps >= 1, "validation_inference_steps", "must be at least 1")
    _check(cfg.log_steps >= 1, "log_steps", "must be at least 1")
    _check(cfg.checkpoint_steps is None or cfg.checkpoint_steps >= 1, "checkpoint_steps", "must be at least 1")
    _check(cfg.checkpoints_total_limit is None or cfg.checkpoints_total_limit >= 1, "checkpoints_total_limit",
           "must be at least 1")
    if cfg.train_text_encoder:
        _check(len(cfg.text_encoder_target_modules) > 0 or bool(cfg.train_tokens), "text_encoder_target_modules",
               "name at least one module (or train only token rows with train_tokens)")
        _check(cfg.cache_text_embeddings is not True, "cache_text_embeddings",
               "cannot be on with train_text_encoder (the embeddings change as the text encoder trains)")
    _check_tokens(cfg)
    changes: dict[str, Any] = {}
    if cfg.target_modules is None:
        changes["target_modules"] = LCM_TARGETS if cfg.lcm else RECOVERY_TARGETS if cfg.distill_from else UNET_TARGETS
    if cfg.alpha is None:
        changes["alpha"] = float(cfg.rank)
    if cfg.cache_text_embeddings is None:
        changes["cache_text_embeddings"] = not cfg.train_text_encoder
    if cfg.max_steps is None:
        if cfg.epochs is not None:
            _check(steps_per_epoch is not None, "epochs", "needs the dataset size to turn into steps")
            changes["max_steps"] = max(1, cfg.epochs * int(steps_per_epoch))
        else:
            changes["max_steps"] = 500
    return dataclasses.replace(cfg, **changes) if changes else cfg


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return to_dict(cfg)


def save_config(cfg: TrainConfig, path: Path) -> None:
    """The effective config as YAML (written to a temporary file and renamed into place)."""
    import yaml

    from sdedge.runtime.files import atomic_write_text

    data = {k: v for k, v in to_dict(cfg).items() if k not in ("resume", "overwrite")}
    atomic_write_text(path, "# sdedge train: the effective config of this run\n" + yaml.safe_dump(data, sort_keys=False))


# exported for the CLI help epilogue
def flag_names() -> list[str]:
    return [_flag(f.name) for f in _fields()]

