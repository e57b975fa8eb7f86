"""The environment of one `sdedge train` run: the output folder, accelerate, the optimizer, the resume checks,
DeepSpeed's settings and the frozen teacher of a distillation run. Nothing here trains; trainer/lora_trainer.py does.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from sdedge.runtime.documents import DocumentType
from sdedge.runtime.environment import package_versions
from sdedge.runtime.errors import BadInput, MissingDependency, SdedgeError
from sdedge.runtime.files import check_sdedge_folder
from sdedge.runtime.strict import ConfigError, to_dict

from .adapter import ADAPTER_JSON
from .checkpoint import Checkpoint, CheckpointState, latest_checkpoint, newest_checkpoint, read_checkpoint
from .config import RESUME_MAY_CHANGE, TrainConfig

__all__ = ["OUTPUTS", "RUN_MARKER", "non_finite_error", "toolchain", "prepare_out", "make_accelerator",
           "make_optimizer", "check_resume", "load_teacher", "configure_deepspeed", "resume_checkpoint"]

log = logging.getLogger("sdedge.trainer")

OUTPUTS = ("adapter.safetensors", "adapter.json", "config.yaml", "metrics.jsonl", "logs", "validation", "checkpoints")
RUN_MARKER = "sdedge_run.json"  # written first: this folder is a run of sdedge's


@dataclass(frozen=True)
class RunMarker:
    """sdedge_run.json: this folder is an `sdedge train` run's (nothing more: the format and version say it)."""


RUN = DocumentType(RunMarker, "sdedge-train-run", 1, RUN_MARKER)
RUN_MARKERS = {RUN_MARKER: RUN, "adapter.json": ADAPTER_JSON}
TOOLCHAIN = ("sdedge", "torch", "diffusers", "transformers", "peft", "accelerate")


def non_finite_error(step: int, loss: float, checkpoints: Path) -> SdedgeError:
    """The error that ends a run whose loss went NaN/Inf: nothing more is written; the checkpoints stay."""
    last = latest_checkpoint(checkpoints)
    kept = (f"the last good checkpoint {last} is kept (resume from it with --resume {last} and a lower "
            "learning rate)") if last else "no checkpoint was written before it (set checkpoint_steps)"
    return SdedgeError(f"training stopped at step {step}: the loss is {loss} (not finite), so the weights have "
                       f"diverged; no adapter was written and {kept}. Lower learning_rate, or clip the gradients "
                       "with max_grad_norm")


def toolchain() -> dict[str, str]:
    """The versions of the packages a run depends on (adapter.json's `toolchain`)."""
    return package_versions(TOOLCHAIN)


def prepare_out(cfg: TrainConfig, is_main: bool) -> None:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SdedgeError(f"--out {out} exists and is not a folder")
    if cfg.resume or not is_main:
        return
    present = [n for n in OUTPUTS if (out / n).exists()]
    if present and not cfg.overwrite:
        raise SdedgeError(f"--out {out} holds an earlier run ({', '.join(present)}): pass --resume to continue it "
                          "or --overwrite to start again")
    if present:  # deleted only in a run folder sdedge made, which holds none of the inputs
        check_sdedge_folder(out, RUN_MARKERS, (cfg.base, cfg.data, cfg.distill_from, cfg.prior_data))
    for n in present:
        p = out / n
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    RUN.write(out / RUN_MARKER, RunMarker())


def make_accelerator(cfg: TrainConfig):
    import os

    import torch
    from accelerate import Accelerator

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise BadInput("mixed_precision fp16 needs a CUDA GPU; on a CPU use bf16 or no")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    # accelerate only sets up CPU DDP (gloo) when told the run is on CPUs: without this, N launched processes
    # on a machine without a GPU would each train alone and write the same files.
    cpu = world > 1 and not torch.cuda.is_available()
    # A second run in the same process (a notebook, the tests) gets its own precision and accumulation settings:
    # accelerate keeps them in process-wide singletons, reset here (the process group itself is kept).
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    except (ImportError, AttributeError):  # pragma: no cover - another accelerate version
        pass
    try:
        acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                          cpu=cpu)
    except (ValueError, RuntimeError) as e:
        raise SdedgeError(f"accelerate cannot start: {e}") from e
    if acc.num_processes != world:
        raise SdedgeError(f"{world} processes were launched (WORLD_SIZE) but accelerate set up "
                          f"{acc.num_processes}: check the accelerate config")
    return acc


def make_optimizer(cfg: TrainConfig, groups: list[dict]):
    import torch

    kind = cfg.optimizer
    if kind == "auto":
        kind = "adamw"
        if torch.cuda.is_available():
            try:
                import bitsandbytes  # noqa: F401

                kind = "adamw8bit"
            except ImportError:
                pass
    kw = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    if kind == "adamw8bit":
        if not torch.cuda.is_available():
            raise BadInput("optimizer adamw8bit needs a CUDA GPU (bitsandbytes); use adamw")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise MissingDependency("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)") from e
        return bnb.optim.AdamW8bit(groups, **kw), kind
    return torch.optim.AdamW(groups, **kw), kind


def check_resume(cfg: TrainConfig, state: CheckpointState, checkpoint: Path, base_sha: str, data_sha: str) -> None:
    """A checkpoint resumes only the run it was written by: the same settings (but RESUME_MAY_CHANGE; a key the
    checkpoint's sdedge did not know is passed over), base and dataset."""
    saved = state.config
    now = to_dict(cfg)
    for key, value in now.items():
        if key in RESUME_MAY_CHANGE or key not in saved:
            continue
        if saved[key] != value:
            raise ConfigError(f"--resume {checkpoint}: {key} was {saved[key]!r} in the interrupted run and is "
                              f"{value!r} now; resume with the same setting (or start a new run)")
    if state.base_sha256 != base_sha:
        raise SdedgeError(f"--resume {checkpoint}: the base changed since the checkpoint (SHA-256 differs)")
    if state.dataset_sha256 != data_sha:
        raise SdedgeError(f"--resume {checkpoint}: the dataset changed since the checkpoint (SHA-256 differs)")


def load_teacher(cfg: TrainConfig, base, unet_loader):
    """The frozen teacher of a distillation run; it must read the same latents and text embeddings as the base."""
    import torch

    from .base import load_training_base

    teacher = load_training_base(cfg.distill_from, unet_loader)
    checks = {
        "latent channels": (teacher.unet.config.in_channels, base.unet.config.in_channels),
        "prediction type": (teacher.noise_scheduler.config.prediction_type,
                            base.noise_scheduler.config.prediction_type),
        "training timesteps": (teacher.noise_scheduler.config.num_train_timesteps,
                               base.noise_scheduler.config.num_train_timesteps),
        "cross-attention width": (teacher.unet.config.cross_attention_dim, base.unet.config.cross_attention_dim),
    }
    for what, (theirs, ours) in checks.items():
        if theirs != ours:
            raise SdedgeError(f"--distill-from {cfg.distill_from}: its {what} is {theirs}, the base's is {ours}")
    mine, theirs = base.text_encoder.state_dict(), teacher.text_encoder.state_dict()
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
        raise SdedgeError(f"--distill-from {cfg.distill_from}: its text encoder differs from the one of --base "
                          f"{cfg.base}; both UNets are fed the base's text embeddings, so distil from the base's "
                          "parent (the folder `sdedge prune` was given)")
    teacher.vae = teacher.text_encoder = None  # the base's own encode the latents and captions
    teacher.unet.eval()
    return teacher


def configure_deepspeed(accelerator, cfg: TrainConfig) -> None:
    """Refuse what DeepSpeed cannot do here and fill its `auto` batch size and clipping from the config."""
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is None:
        return
    if cfg.train_text_encoder:
        raise BadInput("train_text_encoder is not supported with DeepSpeed (one model per engine); use DDP")
    if cfg.checkpoint_steps:
        raise BadInput("checkpoint_steps is not supported with DeepSpeed ZeRO (its optimizer state is "
                       "partitioned); use DDP for resumable runs")
    ds = ds_plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.max_grad_norm


def resume_checkpoint(cfg: TrainConfig, out: Path) -> Checkpoint | None:
    """The checkpoint `--resume` names (`latest`: the newest valid one in OUT/checkpoints), read once, or None for a
    new run."""
    if not cfg.resume:
        return None
    checkpoint = newest_checkpoint(out / "checkpoints") if cfg.resume == "latest" else read_checkpoint(cfg.resume)
    if checkpoint is None:
        raise SdedgeError(f"--resume: no checkpoint in {out / 'checkpoints'} (was checkpoint_steps set?)")
    return checkpoint
