"""`sdedge train`: a LoRA on a Stable Diffusion 1.x base, with accelerate (one CPU, one GPU, or several).

    config ─► prepared data (SHA-256 checked) ─► base ─► LoRA (UNet [+ text encoder]) ─► caches
           ─► loop: accumulate micro-batches ─► clip ─► AdamW ─► metrics / progress / validation / checkpoint
           ─► adapter.safetensors + adapter.json + config.yaml

Determinism: every random draw of micro-step m for global batch slot s (which image, the latent sample,
the noise, the timestep, the noise offset) comes from a generator seeded by (seed, m, s), and the learning
rate is a function of the step. A run resumed from a checkpoint therefore follows the loss curve of an
uninterrupted run, and N processes x batch b see the samples of 1 process x batch N·b.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdedge.runtime.environment import package_versions
from sdedge.runtime.errors import BadInput, MissingDependency, SdedgeError
from sdedge.runtime.files import atomic_write_json, check_sdedge_folder
from sdedge.runtime.strict import ConfigError, to_dict

from .adapter import (
    adapter_tensors,
    inject_lora,
    lora_layers,
    lora_parameters,
    write_adapter,
)
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .config import RESUME_MAY_CHANGE, TrainConfig, resolve, save_config
from .dataset import BatchPlan, image_tensor, load_prepared, seed_for
from .hashing import sha256_file
from .metrics import MetricsLog, Progress, read_metrics

__all__ = ["TrainResult", "train", "lr_factor", "OUTPUTS"]

log = logging.getLogger("sdedge.trainer")

OUTPUTS = ("adapter.safetensors", "adapter.json", "config.yaml", "metrics.jsonl", "logs", "validation", "checkpoints")
RUN_MARKER, RUN_FORMAT = "sdedge_run.json", "sdedge-train-run"  # written first: this folder is a run of sdedge's
RUN_MARKERS = {RUN_MARKER: RUN_FORMAT, "adapter.json": "sdedge-adapter"}
TOOLCHAIN = ("sdedge", "torch", "diffusers", "transformers", "peft", "accelerate")


@dataclass
class TrainResult:
    out: Path
    adapter: Path | None
    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)  # per optimizer step, from step 1
    seconds: float = 0.0
    resumed_from: int = 0
    world_size: int = 1


class _Stopped(Exception):
    """The injected stop of a test (`stop_after`): the run ends as if killed, without an adapter."""


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule."""
    warm = cfg.lr_warmup_steps
    if step < warm:
        return (step + 1) / (warm + 1)
    if cfg.lr_scheduler == "constant":
        return 1.0
    total = max(1, cfg.max_steps - warm)
    progress = min(1.0, (step - warm) / total)
    if cfg.lr_scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def _non_finite(step: int, loss: float, checkpoints: Path) -> SdedgeError:
    """The error that ends a run whose loss went NaN/Inf: nothing more is written; the checkpoints stay."""
    last = latest_checkpoint(checkpoints)
    kept = (f"the last good checkpoint {last} is kept (resume from it with --resume {last} and a lower "
            "learning rate)") if last else "no checkpoint was written before it (set checkpoint_steps)"
    return SdedgeError(f"training stopped at step {step}: the loss is {loss} (not finite), so the weights have "
                       f"diverged; no adapter was written and {kept}. Lower learning_rate, or clip the gradients "
                       "with max_grad_norm")


def _toolchain() -> dict[str, str]:
    return package_versions(TOOLCHAIN)


def _prepare_out(cfg: TrainConfig, is_main: bool) -> None:
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
        check_sdedge_folder(out, RUN_MARKERS, (cfg.base, cfg.data, cfg.distill_from))
    for n in present:
        p = out / n
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_MARKER, {"format": RUN_FORMAT, "version": 1})


def _accelerator(cfg: TrainConfig):
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


def _optimizer(cfg: TrainConfig, groups: list[dict]):
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


def _check_resume(cfg: TrainConfig, state: dict, checkpoint: Path, base_sha: str, data_sha: str) -> None:
    saved = state.get("config", {})
    now = to_dict(cfg)
    for key, value in now.items():
        if key in RESUME_MAY_CHANGE or key not in saved:
            continue
        if saved[key] != value:
            raise ConfigError(f"--resume {checkpoint}: {key} was {saved[key]!r} in the interrupted run and is "
                              f"{value!r} now; resume with the same setting (or start a new run)")
    if state.get("base_sha256") != base_sha:
        raise SdedgeError(f"--resume {checkpoint}: the base changed since the checkpoint (SHA-256 differs)")
    if state.get("dataset_sha256") != data_sha:
        raise SdedgeError(f"--resume {checkpoint}: the dataset changed since the checkpoint (SHA-256 differs)")


def _load_teacher(cfg: TrainConfig, base, unet_loader):
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


class _Batches:
    """The tensors of one micro-step on this process, from the plan and the per-slot generators."""

    def __init__(self, cfg, base, data, plan, accelerator, latent_cache):
        self.cfg, self.base, self.data, self.plan = cfg, base, data, plan
        self.acc = accelerator
        self.latent_cache = latent_cache
        self.scaling = float(base.vae.config.scaling_factor)
        self.T = int(base.noise_scheduler.config.num_train_timesteps)

    def __call__(self, micro: int):
        import torch

        indices = self.plan.global_indices(micro)
        slots = list(self.plan.local_slots(self.acc.process_index))
        mine = [indices[s] for s in slots]
        device = self.acc.device
        if self.latent_cache is not None:
            stats = [self.latent_cache[i] for i in mine]
        else:
            pixels = torch.stack([image_tensor(self.data.items[i].image) for i in mine]).to(device)
            with torch.no_grad():
                dist = self.base.vae.encode(pixels).latent_dist
            stats = [(dist.mean[k].float().cpu(), dist.std[k].float().cpu()) for k in range(len(mine))]
        latents, noises, timesteps = [], [], []
        for (mean, std), slot in zip(stats, slots):
            g = torch.Generator().manual_seed(seed_for(self.cfg.seed, "sample", micro, slot))
            z = (mean + std * torch.randn(mean.shape, generator=g)) * self.scaling
            noise = torch.randn(z.shape, generator=g)
            if self.cfg.noise_offset:
                noise = noise + self.cfg.noise_offset * torch.randn((z.shape[0], 1, 1), generator=g)
            t = torch.randint(0, self.T, (1,), generator=g)
            latents.append(z)
            noises.append(noise)
            timesteps.append(t)
        captions = [self.data.items[i].text for i in mine]
        return (torch.stack(latents).to(device), torch.stack(noises).to(device), torch.cat(timesteps).to(device),
                captions)


def train(cfg: TrainConfig, *, console=None, stop_after: int | None = None, unet_loader=None) -> TrainResult:
    """Train a LoRA as `cfg` says; returns what was written. `stop_after` (tests) ends the run after that step's
    checkpoint as if it were killed. `unet_loader` reads a pruned base's UNet (trainer/base.py)."""
    import torch
    from diffusers.training_utils import compute_snr

    t_start = time.perf_counter()
    for key in ("base", "data", "out"):
        if not getattr(cfg, key):
            raise ConfigError(f"{key}: required (give --{key} or `{key}:` in the config)")
    accelerator = _accelerator(cfg)
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    data = load_prepared(cfg.data)
    plan = BatchPlan([(it.width, it.height) for it in data.items], cfg.batch_size, world, cfg.seed)
    cfg = resolve(cfg, steps_per_epoch=math.ceil(plan.batches_per_epoch / cfg.gradient_accumulation_steps))
    out = Path(cfg.out)
    _prepare_out(cfg, is_main)
    accelerator.wait_for_everyone()

    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:
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

    # -- resume point ------------------------------------------------------------------------------------------
    checkpoint = None
    if cfg.resume:
        checkpoint = latest_checkpoint(out / "checkpoints") if cfg.resume == "latest" else Path(cfg.resume)
        if checkpoint is None:
            raise SdedgeError(f"--resume: no checkpoint in {out / 'checkpoints'} (was checkpoint_steps set?)")

    # -- models --------------------------------------------------------------------------------------------------
    from .base import load_training_base

    base = load_training_base(cfg.base, unet_loader)
    teacher = _load_teacher(cfg, base, unet_loader) if cfg.distill_from else None
    unet, vae, text_encoder = base.unet, base.vae, base.text_encoder
    inject_lora(unet, cfg.target_modules, cfg.rank, cfg.alpha, cfg.seed, "unet")
    if cfg.train_text_encoder:
        inject_lora(text_encoder, cfg.text_encoder_target_modules, cfg.rank, cfg.alpha, cfg.seed, "text_encoder")
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            enable = getattr(text_encoder, "activation_checkpointing_enable", None) or \
                text_encoder.gradient_checkpointing_enable
            enable()
    device = accelerator.device
    for m in (unet, vae, text_encoder) + ((teacher.unet,) if teacher is not None else ()):
        m.to(device)
    vae.eval()
    text_encoder.train(cfg.train_text_encoder)
    unet.train()

    resumed_from, state = 0, {}
    if checkpoint is not None:
        trainable, opt_state, state = load_checkpoint(checkpoint)
        _check_resume(cfg, state, checkpoint, base.sha256, data.sha256)
        if teacher is not None and state.get("teacher_sha256") != teacher.sha256:
            raise SdedgeError(f"--resume {checkpoint}: the teacher changed since the checkpoint (SHA-256 differs)")
        resumed_from = int(state["step"])
        if resumed_from > cfg.max_steps:
            raise SdedgeError(f"--resume {checkpoint}: at step {resumed_from}, past max_steps {cfg.max_steps}")
        if state.get("world_size", world) != world:
            log.warning("resuming a run of %s processes on %s: the data order from here differs from the original",
                        state.get("world_size"), world)
        params = {f"unet.{n}": p for n, p in lora_parameters(unet)}
        params.update({f"text_encoder.{n}": p for n, p in lora_parameters(text_encoder)} if cfg.train_text_encoder else {})
        if set(params) != set(trainable):
            extra = sorted(set(trainable) ^ set(params))[0]
            raise SdedgeError(f"--resume {checkpoint}: its parameters do not match this run's LoRA (first: {extra!r})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(trainable[name].to(p.dtype))

    # -- caches ----------------------------------------------------------------------------------------------------
    def tokenize(texts):
        return base.tokenizer(texts, padding="max_length", max_length=base.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    latent_cache = None
    if cfg.cache_latents:
        latent_cache = []
        with torch.no_grad():
            for it in data.items:
                dist = vae.encode(image_tensor(it.image)[None].to(device)).latent_dist
                latent_cache.append((dist.mean[0].float().cpu(), dist.std[0].float().cpu()))
    text_cache = None
    if cfg.cache_text_embeddings:
        text_cache = {}
        with torch.no_grad():
            for text in sorted({it.text for it in data.items}):
                text_cache[text] = text_encoder(tokenize([text]).to(device))[0][0].float().cpu()

    # -- optimizer and accelerate ------------------------------------------------------------------------------------
    unet_params = [p for _, p in lora_parameters(unet)]
    groups = [{"params": unet_params, "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:
        groups.append({"params": [p for _, p in lora_parameters(text_encoder)],
                       "lr": cfg.text_encoder_lr or cfg.learning_rate})
    peak_lrs = [g["lr"] for g in groups]
    optimizer, optimizer_kind = _optimizer(cfg, groups)
    if cfg.train_text_encoder:
        unet_p, text_p, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
        models = (unet_p, text_p)
    else:
        unet_p, optimizer = accelerator.prepare(unet, optimizer)
        text_p = text_encoder
        models = (unet_p,)
    if checkpoint is not None:
        optimizer.load_state_dict(opt_state)
        if state.get("scaler") and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
    trainable_params = [p for g in groups for p in g["params"]]

    batches = _Batches(cfg, base, data, plan, accelerator, latent_cache)
    noise_scheduler = base.noise_scheduler
    prediction = noise_scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise SdedgeError(f"--base {cfg.base}: prediction_type {prediction!r} is not supported (epsilon, v_prediction)")

    def micro_loss(micro: int):
        latents, noise, t, captions = batches(micro)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        if text_cache is not None:
            hidden = torch.stack([text_cache[c] for c in captions]).to(device)
        else:
            hidden = text_p(tokenize(captions).to(device))[0]
        target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
        with accelerator.autocast():
            pred = unet_p(noisy, t, hidden).sample
            if teacher is not None:  # w·‖p − teacher‖² + (1 − w)·‖p − target‖² = ‖p − (w·teacher + (1 − w)·target)‖² + c
                with torch.no_grad():
                    taught = teacher.unet(noisy, t, hidden).sample.float()
                target = cfg.distill_weight * taught + (1.0 - cfg.distill_weight) * target.float()
        loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            snr = compute_snr(noise_scheduler, t)
            clipped = torch.clamp(snr, max=cfg.min_snr_gamma)
            loss = loss * (clipped / snr if prediction == "epsilon" else clipped / (snr + 1))
        return loss.mean()

    # -- loop ------------------------------------------------------------------------------------------------------
    metrics = MetricsLog(out, resumed_from, cfg.tensorboard, enabled=is_main)
    history = [float(r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r] if is_main else []
    progress = Progress(cfg.max_steps, resumed_from, enabled=is_main and cfg.progress, console=console)
    width = height = data.resolution or data.items[0].width
    if is_main:
        save_config(cfg, out / "config.yaml")

    def validate(step: int):
        if not cfg.validation_prompts:
            return
        if is_main:
            from .validation import render_validation

            paths = render_validation(base, accelerator.unwrap_model(unet_p), accelerator.unwrap_model(text_p),
                                      cfg.validation_prompts, negative=cfg.validation_negative_prompt,
                                      steps=cfg.validation_inference_steps, guidance=cfg.validation_guidance,
                                      seed=cfg.validation_seed, width=width, height=height,
                                      out_dir=out / "validation", step=step, autocast=accelerator.autocast)
            from PIL import Image

            for i, p in enumerate(paths):
                with Image.open(p) as im:
                    metrics.image(f"validation/{i:02d}", im.convert("RGB"), step)
        accelerator.wait_for_everyone()

    def checkpoint_now(step: int, loss: float):
        if is_main:
            trainable = {f"unet.{n}": p for n, p in lora_parameters(accelerator.unwrap_model(unet_p))}
            if cfg.train_text_encoder:
                trainable.update({f"text_encoder.{n}": p
                                  for n, p in lora_parameters(accelerator.unwrap_model(text_p))})
            doc = {"config": to_dict(cfg), "world_size": world, "base_sha256": base.sha256,
                   "teacher_sha256": teacher.sha256 if teacher is not None else None,
                   "dataset_sha256": data.sha256, "loss": loss, "optimizer_kind": optimizer_kind,
                   "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
            save_checkpoint(out / "checkpoints", step, trainable, optimizer.state_dict(), doc)
            prune_checkpoints(out / "checkpoints", cfg.checkpoints_total_limit)
        accelerator.wait_for_everyone()

    accum = cfg.gradient_accumulation_steps
    loss_value = history[-1] if history else float("nan")
    t_loop = time.perf_counter()
    try:
        for step in range(resumed_from, cfg.max_steps):
            factor = lr_factor(cfg, step)
            for g, peak in zip(optimizer.param_groups, peak_lrs):
                g["lr"] = peak * factor
            total = torch.zeros((), device=device)
            for k in range(accum):
                with accelerator.accumulate(*models):
                    loss = micro_loss(step * accum + k)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable_params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                total += loss.detach().float()
            if not accelerator.sync_gradients:  # pragma: no cover - accelerate's counter out of step
                raise SdedgeError("internal error: gradient accumulation out of step")
            loss_value = float(accelerator.reduce(total / accum, reduction="mean"))
            done = step + 1
            if not math.isfinite(loss_value):  # every process sees the reduced value: all stop here
                progress.close()
                metrics.close()
                raise _non_finite(done, loss_value, out / "checkpoints")
            history.append(loss_value)
            if is_main and (done % cfg.log_steps == 0 or done == cfg.max_steps):
                metrics.log(done, {"loss": loss_value, "lr": peak_lrs[0] * factor,
                                   "epoch": plan.epoch_of(step * accum),
                                   "seconds": round(time.perf_counter() - t_loop, 3)})
            progress.update(done, loss_value)
            if cfg.validation_steps and done % cfg.validation_steps == 0 and done != cfg.max_steps:
                validate(done)
            if cfg.checkpoint_steps and done % cfg.checkpoint_steps == 0 and done != cfg.max_steps:
                checkpoint_now(done, loss_value)
            if stop_after is not None and done >= stop_after:
                raise _Stopped()
    except _Stopped:
        progress.close()
        metrics.close()
        return TrainResult(out=out, adapter=None, steps=cfg.max_steps, final_loss=loss_value, losses=history,
                           seconds=time.perf_counter() - t_start, resumed_from=resumed_from, world_size=world)
    progress.close()
    validate(cfg.max_steps)

    # -- the adapter -----------------------------------------------------------------------------------------------
    adapter_path = out / "adapter.safetensors"
    if is_main:
        unet_layers = lora_layers(accelerator.unwrap_model(unet_p), "unet")
        text_layers = lora_layers(accelerator.unwrap_model(text_p), "text_encoder") if cfg.train_text_encoder else {}
        tensors, header = adapter_tensors(unet_layers, text_layers, cfg.format, cfg.rank, cfg.alpha,
                                          cfg.target_modules, cfg.text_encoder_target_modules)
        write_adapter(adapter_path, tensors, header)
        tail = history[-10:]
        atomic_write_json(out / "adapter.json", {
            "format": "sdedge-adapter",
            "version": 1,
            "file": adapter_path.name,
            "sha256": sha256_file(adapter_path),
            "key_format": cfg.format,
            "base": {"id": base.id, "sha256": base.sha256, "path": str(Path(cfg.base).resolve())},
            "distilled_from": ({"id": teacher.id, "sha256": teacher.sha256, "path": str(teacher.path.resolve()),
                                "weight": cfg.distill_weight} if teacher is not None else None),
            "dataset": {"sha256": data.sha256, "images": len(data.items), "path": str(Path(cfg.data).resolve())},
            "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "unet_targets": list(cfg.target_modules),
                     "unet_layers": len(unet_layers),
                     "text_encoder_targets": list(cfg.text_encoder_target_modules) if cfg.train_text_encoder else None,
                     "text_encoder_layers": len(text_layers)},
            "steps": cfg.max_steps,
            "final_loss": loss_value if math.isfinite(loss_value) else None,  # JSON has no NaN
            "final_loss_mean10": sum(tail) / len(tail) if tail and all(map(math.isfinite, tail)) else None,
            "world_size": world,
            "optimizer": optimizer_kind,
            "resumed_from": resumed_from or None,
            "seconds": round(time.perf_counter() - t_start, 2),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "toolchain": _toolchain(),
            "config": {k: v for k, v in to_dict(cfg).items() if k not in ("resume", "overwrite")},
        })
    metrics.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out=out, adapter=adapter_path, steps=cfg.max_steps, final_loss=loss_value, losses=history,
                       seconds=time.perf_counter() - t_start, resumed_from=resumed_from, world_size=world)

