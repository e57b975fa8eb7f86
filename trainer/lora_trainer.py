"""The LoRA trainer of a Stable Diffusion 1.x base, with accelerate (one CPU, one GPU, or several). `sdedge train`
enters at trainer/train.py, which picks this Trainer or a subclass (SDXL: trainer/sdxl_train.py; LCM: trainer/lcm.py).

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
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.strict import ConfigError, to_dict

from .adapter import (
    AdapterDocument,
    BaseRef,
    DatasetRef,
    LoraShape,
    TeacherRef,
    adapter_tensors,
    inject_lora,
    lora_layers,
    lora_parameters,
    write_adapter,
    write_adapter_json,
)
from .batches import Batch, Batches, latent_cache, text_cache, tokenize
from .checkpoint import (
    CheckpointState,
    OptimizerRest,
    optimizer_to_flat,
    prune_checkpoints,
    save_checkpoint,
)
from .config import TrainConfig, resolve, save_config
from .dataset import BatchPlan, load_prepared
from .hashing import sha256_file
from .metrics import MetricsLog, Progress, read_metrics
from .prior import check_prior_resume, prior_batches, prior_record
from .run_setup import (
    OUTPUTS,
    check_resume,
    configure_deepspeed,
    load_teacher,
    make_accelerator,
    make_optimizer,
    non_finite_error,
    prepare_out,
    resume_checkpoint,
    toolchain,
)

__all__ = ["TrainResult", "Trainer", "lr_factor", "OUTPUTS"]

log = logging.getLogger("sdedge.trainer")


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


class Trainer:
    """One run, one method per seam, called in this order by `run()`:

        setup_models ─► resume ─► build_caches ─► prepare_optimizer ─► loop (micro_loss ─► loss(batch)) ─► write_adapter

    A variant of training overrides a seam: `setup_models` (other models, a frozen teacher), `loss(batch)` (the
    objective of one micro-batch), `checkpoint_state` / `adapter_document` (what it records). trainer/lcm.py's
    latent consistency distillation is one.
    """

    prior: Batches | None = None  # the prior-preservation stream (build_caches sets it with --prior-data)
    token_ids: dict[str, tuple[int, ...]] = {}  # --train-tokens: word -> its token rows (inject_lora sets it)

    def __init__(self, cfg: TrainConfig, *, console=None, stop_after: int | None = None, unet_loader=None):
        self.t_start = time.perf_counter()
        for key in ("base", "data", "out"):
            if not getattr(cfg, key):
                raise ConfigError(f"{key}: required (give --{key} or `{key}:` in the config)")
        self.console, self.stop_after, self.unet_loader = console, stop_after, unet_loader
        self.accelerator = make_accelerator(cfg)
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.data = load_prepared(cfg.data)
        self.plan = BatchPlan([(it.width, it.height) for it in self.data.items], cfg.batch_size, self.world, cfg.seed)
        steps_per_epoch = math.ceil(self.plan.batches_per_epoch / cfg.gradient_accumulation_steps)
        self.cfg = cfg = resolve(cfg, steps_per_epoch=steps_per_epoch)
        self.out = Path(cfg.out)
        prepare_out(cfg, self.is_main)
        self.accelerator.wait_for_everyone()
        configure_deepspeed(self.accelerator, cfg)
        self.checkpoint = resume_checkpoint(cfg, self.out)
        self.device = self.accelerator.device
        self.teacher = None
        self.resumed_from = 0

    # -- models ----------------------------------------------------------------------------------------------------
    def setup_models(self) -> None:
        """The base (frozen) with the LoRA injected, the optional teacher, all on the device in their modes."""
        from .base import load_training_base

        cfg = self.cfg
        self.base = base = load_training_base(cfg.base, self.unet_loader)
        self.teacher = load_teacher(cfg, base, self.unet_loader) if cfg.distill_from else None
        self.unet, self.vae, self.text_encoder = base.unet, base.vae, base.text_encoder
        self.inject_lora()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                enable = getattr(self.text_encoder, "activation_checkpointing_enable", None) or \
                    self.text_encoder.gradient_checkpointing_enable
                enable()
        for m in (self.unet, self.vae, self.text_encoder) + ((self.teacher.unet,) if self.teacher is not None else ()):
            m.to(self.device)
        self.vae.eval()
        self.text_encoder.train(cfg.train_text_encoder)
        self.unet.train()
        self.noise_scheduler = base.noise_scheduler
        self.prediction = prediction = base.noise_scheduler.config.prediction_type
        if prediction not in ("epsilon", "v_prediction"):
            raise SdedgeError(f"--base {cfg.base}: prediction_type {prediction!r} is not supported "
                              "(epsilon, v_prediction)")

    def inject_lora(self) -> None:
        cfg = self.cfg
        inject_lora(self.unet, cfg.target_modules, cfg.rank, cfg.alpha, cfg.seed, "unet")
        if cfg.train_text_encoder and cfg.text_encoder_target_modules:  # none: only --train-tokens' rows train there
            inject_lora(self.text_encoder, cfg.text_encoder_target_modules, cfg.rank, cfg.alpha, cfg.seed,
                        "text_encoder")
        if cfg.train_tokens:  # textual inversion of these words' rows, beside the LoRA (trainer/tokens.py)
            from .tokens import inject_tokens, token_ids

            self.token_ids = token_ids(self.base.tokenizer, cfg.train_tokens)
            inject_tokens(self.text_encoder, [i for ids in self.token_ids.values() for i in ids])

    def lora_params(self, unwrap: bool = False) -> dict:
        """{"unet.<name>": parameter, "text_encoder.<name>": ...} of the trainable LoRA weights."""
        unet, text = self.unet, self.text_encoder
        if unwrap:
            unet, text = self.accelerator.unwrap_model(self.unet_p), self.accelerator.unwrap_model(self.text_p)
        params = {f"unet.{n}": p for n, p in lora_parameters(unet)}
        if self.cfg.train_text_encoder:
            from .tokens import token_parameters

            params.update({f"text_encoder.{n}": p for n, p in lora_parameters(text) + token_parameters(text)})
        return params

    # -- resume ----------------------------------------------------------------------------------------------------
    def resume(self) -> tuple[dict | None, CheckpointState | None]:
        """Load the checkpoint's LoRA weights after checking it belongs to this run; (optimizer state, its
        state.json), or (None, None) for a new run."""
        import torch

        if self.checkpoint is None:
            return None, None
        cfg, checkpoint, state = self.cfg, self.checkpoint.folder, self.checkpoint.state
        trainable, opt_state = self.checkpoint.trainable, self.checkpoint.optimizer
        check_resume(cfg, state, checkpoint, self.base.sha256, self.data.sha256)
        check_prior_resume(cfg, state, checkpoint)
        if self.teacher is not None and state.teacher_sha256 != self.teacher.sha256:
            raise SdedgeError(f"--resume {checkpoint}: the teacher changed since the checkpoint (SHA-256 differs)")
        self.resumed_from = state.step
        if self.resumed_from > cfg.max_steps:
            raise SdedgeError(f"--resume {checkpoint}: at step {self.resumed_from}, past max_steps {cfg.max_steps}")
        if state.world_size != self.world:
            log.warning("resuming a run of %s processes on %s: the data order from here differs from the original",
                        state.world_size, self.world)
        params = self.lora_params()
        if set(params) != set(trainable):
            extra = sorted(set(trainable) ^ set(params))[0]
            raise SdedgeError(f"--resume {checkpoint}: its parameters do not match this run's LoRA (first: {extra!r})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(trainable[name].to(p.dtype))
        return opt_state, state

    # -- caches and optimizer --------------------------------------------------------------------------------------
    def build_caches(self) -> None:
        cfg = self.cfg
        self.latent_cache = latent_cache(self.vae, self.data, self.device) if cfg.cache_latents else None
        self.text_cache = (text_cache(self.text_encoder, self.base.tokenizer, self.data, self.device)
                           if cfg.cache_text_embeddings else None)
        self.batches = Batches(cfg, self.base, self.data, self.plan, self.accelerator, self.latent_cache)
        self.prior = prior_batches(self)  # --prior-data (trainer/prior.py), else None

    def trained_text_encoders(self) -> list:
        """The text encoders that get a LoRA, in order (trainer/sdxl_train.py: both of SDXL's)."""
        return [self.text_encoder] if self.cfg.train_text_encoder else []

    def prepare_optimizer(self, opt_state: dict | None, state: CheckpointState | None) -> None:
        cfg, acc = self.cfg, self.accelerator
        texts = self.trained_text_encoders()
        groups = [{"params": [p for _, p in lora_parameters(self.unet)], "lr": cfg.learning_rate}]
        if texts and any(lora_parameters(m) for m in texts):  # one group for the text encoders: their learning rate
            groups.append({"params": [p for m in texts for _, p in lora_parameters(m)],
                           "lr": cfg.text_encoder_lr or cfg.learning_rate})
        if cfg.train_tokens:  # the trained token rows (--train-tokens): their own learning rate
            from .tokens import token_parameters

            groups.append({"params": [p for _, p in token_parameters(self.text_encoder)],
                           "lr": cfg.token_lr or cfg.text_encoder_lr or cfg.learning_rate})
        self.peak_lrs = [g["lr"] for g in groups]
        optimizer, self.optimizer_kind = make_optimizer(cfg, groups)
        self.unet_p, *self.text_ps, self.optimizer = acc.prepare(self.unet, *texts, optimizer)
        self.text_p = self.text_ps[0] if self.text_ps else self.text_encoder
        self.models = (self.unet_p, *self.text_ps)
        if opt_state is not None:
            self.optimizer.load_state_dict(opt_state)
            if state.scaler and acc.scaler is not None:
                acc.scaler.load_state_dict(state.scaler)
        self.trainable_params = [p for g in groups for p in g["params"]]

    # -- the loss --------------------------------------------------------------------------------------------------
    def encode_text(self, captions: list[str]):
        """The text encoder's last hidden state (b, 77, d) of the captions (from the cache when there is one)."""
        import torch

        if self.text_cache is not None:
            return torch.stack([self.text_cache[c] for c in captions]).to(self.device)
        return self.text_p(tokenize(self.base.tokenizer, captions).to(self.device))[0]

    def unet_conditioning(self, batch: Batch) -> dict:
        """The UNet's conditioning keywords for a micro-batch (trainer/sdxl_train.py adds SDXL's pooled text and
        time ids as added_cond_kwargs)."""
        return {"encoder_hidden_states": self.encode_text(batch.captions)}

    def micro_loss(self, micro: int):
        loss = self.loss(self.batches(micro))
        if self.prior is not None:  # prior preservation: + w · the loss on the base's own class images
            loss = loss + self.cfg.prior_weight * self.loss(self.prior(micro))
        return loss

    def loss(self, batch: Batch):
        """The denoising loss of one micro-batch (a scalar), with the teacher's target mixed in when distilling."""
        import torch
        from diffusers.training_utils import compute_snr

        cfg, sched, acc = self.cfg, self.noise_scheduler, self.accelerator
        latents, noise, t = batch.latents, batch.noise, batch.timesteps
        noisy = sched.add_noise(latents, noise, t)
        cond = self.unet_conditioning(batch)
        target = noise if self.prediction == "epsilon" else sched.get_velocity(latents, noise, t)
        with acc.autocast():
            pred = self.unet_p(noisy, t, **cond).sample
            if self.teacher is not None:  # w·‖p − teacher‖² + (1 − w)·‖p − target‖² = ‖p − (w·teacher + (1 − w)·target)‖² + c
                with torch.no_grad():
                    taught = self.teacher.unet(noisy, t, **cond).sample.float()
                target = cfg.distill_weight * taught + (1.0 - cfg.distill_weight) * target.float()
        loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            snr = compute_snr(sched, t)
            clipped = torch.clamp(snr, max=cfg.min_snr_gamma)
            loss = loss * (clipped / snr if self.prediction == "epsilon" else clipped / (snr + 1))
        return loss.mean()

    # -- validation and checkpoints --------------------------------------------------------------------------------
    def validation_sampling(self) -> tuple:
        """(base whose scheduler renders, steps, guidance) of the validation images."""
        return self.base, self.cfg.validation_inference_steps, self.cfg.validation_guidance

    def validate(self, step: int) -> None:
        cfg, acc = self.cfg, self.accelerator
        if not cfg.validation_prompts:
            return
        if self.is_main:
            from PIL import Image

            from .validation import render_validation

            base, steps, guidance = self.validation_sampling()
            paths = render_validation(base, acc.unwrap_model(self.unet_p), acc.unwrap_model(self.text_p),
                                      cfg.validation_prompts, negative=cfg.validation_negative_prompt,
                                      steps=steps, guidance=guidance,
                                      seed=cfg.validation_seed, width=self.width, height=self.height,
                                      out_dir=self.out / "validation", step=step, autocast=acc.autocast)
            for i, p in enumerate(paths):
                with Image.open(p) as im:
                    self.metrics.image(f"validation/{i:02d}", im.convert("RGB"), step)
        acc.wait_for_everyone()

    def checkpoint_state(self, step: int, loss: float, optimizer: OptimizerRest) -> CheckpointState:
        """The checkpoint's state.json after optimizer step `step` (save_checkpoint adds the tensor files' SHA-256)."""
        acc = self.accelerator
        return CheckpointState(step=step, optimizer=optimizer, config=to_dict(self.cfg), world_size=self.world,
                               base_sha256=self.base.sha256, dataset_sha256=self.data.sha256,
                               teacher_sha256=self.teacher.sha256 if self.teacher is not None else None,
                               prior=prior_record(self), loss=loss, optimizer_kind=self.optimizer_kind,
                               scaler=acc.scaler.state_dict() if acc.scaler is not None else None)

    def ema_tensors(self) -> dict | None:
        """The EMA of the trainable weights a variant keeps (trainer/lcm.py's target network), saved in each
        checkpoint beside them; None: none kept."""
        return None

    def checkpoint_now(self, step: int, loss: float) -> None:
        if self.is_main:
            opt_tensors, opt_rest = optimizer_to_flat(self.optimizer.state_dict())
            save_checkpoint(self.out / "checkpoints", self.checkpoint_state(step, loss, opt_rest),
                            self.lora_params(unwrap=True), opt_tensors, ema=self.ema_tensors())
            prune_checkpoints(self.out / "checkpoints", self.cfg.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()

    # -- the loop --------------------------------------------------------------------------------------------------
    def optimizer_step(self, step: int) -> float:
        """One optimizer step of gradient_accumulation_steps micro-steps; the loss averaged over them and processes."""
        import torch

        acc, accum = self.accelerator, self.cfg.gradient_accumulation_steps
        factor = lr_factor(self.cfg, step)
        for g, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            g["lr"] = peak * factor
        total = torch.zeros((), device=self.device)
        for k in range(accum):
            with acc.accumulate(*self.models):
                loss = self.micro_loss(step * accum + k)
                acc.backward(loss)
                if acc.sync_gradients and self.cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.trainable_params, self.cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach().float()
        if not acc.sync_gradients:  # pragma: no cover - accelerate's counter out of step
            raise SdedgeError("internal error: gradient accumulation out of step")
        return float(acc.reduce(total / accum, reduction="mean"))

    def loop(self) -> None:
        """Optimizer steps from the resume point to max_steps, with logging, validation and checkpoints."""
        cfg, accum = self.cfg, self.cfg.gradient_accumulation_steps
        t_loop = time.perf_counter()
        for step in range(self.resumed_from, cfg.max_steps):
            self.loss_value = loss_value = self.optimizer_step(step)
            done = step + 1
            if not math.isfinite(loss_value):  # every process sees the reduced value: all stop here
                self.progress.close()
                self.metrics.close()
                raise non_finite_error(done, loss_value, self.out / "checkpoints")
            self.history.append(loss_value)
            if self.is_main and (done % cfg.log_steps == 0 or done == cfg.max_steps):
                self.metrics.log(done, {"loss": loss_value, "lr": self.peak_lrs[0] * lr_factor(cfg, step),
                                        "epoch": self.plan.epoch_of(step * accum),
                                        "seconds": round(time.perf_counter() - t_loop, 3)})
            self.progress.update(done, loss_value)
            if cfg.validation_steps and done % cfg.validation_steps == 0 and done != cfg.max_steps:
                self.validate(done)
            if cfg.checkpoint_steps and done % cfg.checkpoint_steps == 0 and done != cfg.max_steps:
                self.checkpoint_now(done, loss_value)
            if self.stop_after is not None and done >= self.stop_after:
                raise _Stopped()

    def _result(self, adapter: Path | None) -> TrainResult:
        return TrainResult(out=self.out, adapter=adapter, steps=self.cfg.max_steps, final_loss=self.loss_value,
                           losses=self.history, seconds=time.perf_counter() - self.t_start,
                           resumed_from=self.resumed_from, world_size=self.world)

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.setup_models()
        opt_state, state = self.resume()
        self.checkpoint = None  # read once for resume: its tensors are in the LoRA (and EMA) and opt_state now
        self.build_caches()
        self.prepare_optimizer(opt_state, state)
        self.metrics = MetricsLog(self.out, self.resumed_from, cfg.tensorboard, enabled=self.is_main)
        self.history = ([float(r["loss"]) for r in read_metrics(self.out / "metrics.jsonl") if "loss" in r]
                        if self.is_main else [])
        self.progress = Progress(cfg.max_steps, self.resumed_from, enabled=self.is_main and cfg.progress,
                                 console=self.console)
        self.width = self.height = self.data.resolution or self.data.items[0].width
        if self.is_main:
            save_config(cfg, self.out / "config.yaml")
        self.loss_value = self.history[-1] if self.history else float("nan")
        try:
            self.loop()
        except _Stopped:
            self.progress.close()
            self.metrics.close()
            return self._result(None)
        self.progress.close()
        self.validate(cfg.max_steps)
        adapter_path = self.out / "adapter.safetensors"
        if self.is_main:
            self.write_adapter(adapter_path)
        self.metrics.close()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return self._result(adapter_path)

    # -- the adapter -----------------------------------------------------------------------------------------------
    def write_adapter(self, adapter_path: Path) -> None:
        """adapter.safetensors in the configured key format, then adapter.json describing it."""
        cfg, acc = self.cfg, self.accelerator
        unet_layers = lora_layers(acc.unwrap_model(self.unet_p), "unet")
        text_layers = lora_layers(acc.unwrap_model(self.text_p), "text_encoder") if cfg.train_text_encoder else {}
        tensors, header = adapter_tensors(unet_layers, text_layers, cfg.format, cfg.rank, cfg.alpha,
                                          cfg.target_modules, cfg.text_encoder_target_modules)
        if cfg.train_tokens:
            from .tokens import token_tensors

            tensors.update(token_tensors(acc.unwrap_model(self.text_p)))
        write_adapter(adapter_path, tensors, header)
        write_adapter_json(self.out / "adapter.json", self.adapter_document(adapter_path, len(unet_layers),
                                                                           len(text_layers)))

    def adapter_document(self, adapter_path: Path, unet_layers: int, text_layers: int) -> AdapterDocument:
        """adapter.json: what was trained (the file, its LoRA's shape), on what and from which base, and how."""
        cfg, base, teacher, data = self.cfg, self.base, self.teacher, self.data
        tail, loss_value = self.history[-10:], self.loss_value
        lora = LoraShape(rank=cfg.rank, alpha=float(cfg.alpha), unet_targets=tuple(cfg.target_modules),
                         unet_layers=unet_layers,
                         text_encoder_targets=tuple(cfg.text_encoder_target_modules) if cfg.train_text_encoder else None,
                         text_encoder_layers=text_layers)
        return AdapterDocument(
            file=adapter_path.name,
            sha256=sha256_file(adapter_path),
            key_format=cfg.format,
            base=BaseRef(id=base.id, sha256=base.sha256, path=str(Path(cfg.base).resolve())),
            distilled_from=(TeacherRef(id=teacher.id, sha256=teacher.sha256, path=str(teacher.path.resolve()),
                                       weight=float(cfg.distill_weight)) if teacher is not None else None),
            dataset=DatasetRef(sha256=data.sha256, images=len(data.items), path=str(Path(cfg.data).resolve())),
            prior=prior_record(self),
            tokens=dict(self.token_ids) or None,
            lora=lora,
            steps=cfg.max_steps,
            final_loss=loss_value if math.isfinite(loss_value) else None,  # JSON has no NaN
            final_loss_mean10=sum(tail) / len(tail) if tail and all(map(math.isfinite, tail)) else None,
            world_size=self.world,
            optimizer=self.optimizer_kind,
            resumed_from=self.resumed_from or None,
            seconds=round(time.perf_counter() - self.t_start, 2),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            toolchain=toolchain(),
            config={k: v for k, v in to_dict(cfg).items() if k not in ("resume", "overwrite")},
        )
