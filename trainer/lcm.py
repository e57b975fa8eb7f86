"""Latent consistency distillation of an LCM-LoRA (`sdedge train --lcm`): few-step sampling for the user's own base.

The method of diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py (Luo et al. 2023,
"Latent Consistency Models"; LCM-LoRA), on `sdedge train`'s machinery (trainer/lora_trainer.py's `Trainer`: data order,
caches, accumulation, resume, checkpoints, validation, the adapter files). One micro-batch:

    z0 (VAE latents) ─► pick a solver step n per row, t = t_{n+k} (start), s = t_n = t − k (end; k = T / N)
    z_t = add_noise(z0, ε, t)
    student (LoRA on):   f(z_t, t) = c_skip(t)·z_t + c_out(t)·x̂0(z_t, t)                       (with gradients)
    teacher (LoRA off):  ε_c, ε_u at z_t  ─► guidance w sampled in [w_min, w_max] (w = 1 where t < lcm_unguided_below)
                         x̂0 = x̂0_c + (w−1)(x̂0_c − x̂0_u),  ε̂ = ε_c + (w−1)(ε_c − ε_u)
                         z_s = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂                                       (one DDIM step)
    target (LoRA on, no gradient): f(z_s, s) = c_skip(s)·z_s + c_out(s)·x̂0(z_s, s)     (the EMA weights with
                                                                                      lcm_ema_decay > 0)
    loss = mean(√((f_student − f_target)² + c²) − c)                                             (pseudo-Huber)

The teacher is the frozen base: the student with its LoRA layers switched off, which equals it exactly and spares a
second UNet in memory. The target network is by default the online student without gradients, as in the LoRA
script; with `lcm_ema_decay` d > 0 it is the student with an EMA of its LoRA weights, θ⁻ ← d·θ⁻ + (1 − d)·θ after
every optimizer step (θ⁻ = θ at the start), as diffusers' full-model script train_lcm_distill_sd_wds.py keeps its
target UNet (d = 0.95 there); the EMA is saved in every checkpoint (ema.safetensors) and restored on resume.
With `lcm_unguided_below` t_g > 0 the teacher guides only where the step starts at t ≥ t_g and runs unguided below
(a guidance interval, as Kynkäänniemi et al. 2024 "Applying guidance in a limited interval" sample): the LoRA then
bakes guidance into the noisy steps, where prompt, colour and layout are decided, and leaves the low-noise steps
the base's, where guidance only over-saturates (docs/fast-path.md: on the tiny base it lifted 4 steps and 8 steps).
The guidance scale is in diffusers' convention (uncond + w·(cond − uncond)); the LCM paper's ω is w − 1. The user's
LoRAs (`lcm_fuse`) are fused into the base first: the teacher is then their model, and the LCM-LoRA is exported
after them (`sdedge export --lora mine.safetensors:0.8 --lora OUT/adapter.safetensors:1.0 --scheduler lcm`).

Every draw of micro-step m for batch slot s (solver step, guidance) comes from a generator seeded by
(seed, "lcm", m, s), so a resumed run follows the loss curve of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

from sdedge.runtime.errors import BadInput, MissingDependency, SdedgeError

from .adapter import AdapterDocument, TeacherRef
from .batches import Batch, tokenize
from .checkpoint import CheckpointState, OptimizerRest
from .dataset import seed_for
from .hashing import sha256_bytes
from .lora_trainer import Trainer, TrainResult

__all__ = ["LcmTrainer", "train_lcm", "boundary_scalings", "DdimSolver", "check_lcm_base", "update_ema",
           "VALIDATION_STEPS"]

VALIDATION_STEPS, VALIDATION_GUIDANCE = 4, 1.0  # what an LCM-LoRA is for: the validation images use it
SIGMA_DATA = 0.5


def boundary_scalings(t, timestep_scaling: float = 10.0, sigma_data: float = SIGMA_DATA):
    """c_skip(t), c_out(t) of the consistency function f = c_skip·x + c_out·x̂0 (LCMScheduler's discrete boundary
    condition): c_skip = σ²/((st)² + σ²), c_out = st/√((st)² + σ²), s the timestep scaling, σ = sigma_data.
    At t = 0 they are 1 and 0 (f is the identity there)."""
    scaled = timestep_scaling * t.double()
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip.float(), c_out.float()


class DdimSolver:
    """The teacher's ODE solver over N of the T training timesteps: t_n = (n + 1)·(T // N) − 1, n = 0..N−1."""

    def __init__(self, alphas_cumprod, num_train_timesteps: int, steps: int):
        import torch

        k = num_train_timesteps // steps
        self.skip = k
        self.timesteps = torch.arange(1, steps + 1, dtype=torch.int64) * k - 1  # (N,) 19, 39, ..., 999
        prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])
        self.alphas_cumprod_prev = prev.float()  # (N,) ᾱ of the step below t_n (ᾱ_0 below the first)

    def step(self, x0, eps, index):
        """One DDIM step from t_{index} down to t_{index−1}: √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂."""
        a = _rows(self.alphas_cumprod_prev.to(x0.device)[index], x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * eps


def _rows(values, like):
    """(b,) -> (b, 1, 1, 1) to broadcast over latents like `like`."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def predicted_x0_eps(output, t, sample, prediction: str, alphas_cumprod):
    """(x̂0, ε̂) from a UNet output at timestep t (epsilon or v_prediction)."""
    a = _rows(alphas_cumprod.to(sample.device)[t], sample)
    alpha, sigma = a.sqrt(), (1.0 - a).sqrt()
    if prediction == "epsilon":
        return (sample - sigma * output) / alpha, output
    return alpha * sample - sigma * output, alpha * output + sigma * sample  # v_prediction


def _config(base: Path, name: str) -> dict:
    path = base / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"--base {base}: no {name}; --lcm needs a diffusers Stable Diffusion folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path} is corrupt: {e}") from e


def check_lcm_base(cfg) -> None:
    """Refuse, before anything is written, a base whose UNet cannot take latent consistency distillation's
    schedule, naming the file, the key and the numbers."""
    base = Path(cfg.base)
    unet, vae = _config(base, "unet/config.json"), _config(base, "vae/config.json")
    T = int(_config(base, "scheduler/scheduler_config.json").get("num_train_timesteps", 1000))
    if cfg.lcm_unguided_below > T:
        raise BadInput(f"--base {base}: its schedule has {T} training timesteps (scheduler/scheduler_config.json "
                       f"num_train_timesteps), fewer than lcm_unguided_below {cfg.lcm_unguided_below}")
    if cfg.lcm_ddim_timesteps > T:
        raise BadInput(f"--base {base}: its schedule has {T} training timesteps (scheduler/scheduler_config.json "
                       f"num_train_timesteps), fewer than lcm_ddim_timesteps {cfg.lcm_ddim_timesteps}")
    latent, channels = int(vae.get("latent_channels", 4)), int(unet.get("in_channels", 4))
    if channels != latent:
        raise BadInput(f"--base {base}: its UNet takes {channels} input channels (unet/config.json in_channels) and "
                       f"the VAE gives {latent} (vae/config.json latent_channels): an inpainting or image-conditioned "
                       "UNet, which latent consistency distillation cannot feed the noisy latents alone")
    for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type"):
        if unet.get(key) is not None:
            raise BadInput(f"--base {base}: its UNet needs extra conditioning (unet/config.json {key} = "
                           f"{unet[key]!r}) beyond the timestep and the text; --lcm distils SD 1.x UNets")


@contextlib.contextmanager
def lora_off(model):
    """The model without its LoRA (the frozen base it was injected into), inside the block."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def update_ema(ema: dict, params: dict, decay: float) -> None:
    """ema[n] ← decay·ema[n] + (1 − decay)·params[n], in place (diffusers' training_utils update of a target net)."""
    import torch

    with torch.no_grad():
        for name, p in params.items():
            ema[name].mul_(decay).add_(p.detach().to(ema[name].dtype), alpha=1.0 - decay)


@contextlib.contextmanager
def weights_swapped(params: dict, values: dict):
    """The parameters hold `values` inside the block and their own values again after it, bit for bit. Nothing
    that autograd saved may use them across the block: the target pass runs before the student's."""
    import torch

    with torch.no_grad():
        own = {name: p.detach().clone() for name, p in params.items()}
        for name, p in params.items():
            p.copy_(values[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(own[name])


class LcmTrainer(Trainer):
    """`Trainer` with the latent consistency distillation loss; the rest of the run is `sdedge train`'s."""

    def __init__(self, cfg, *, lora_fuser=None, **kw):
        if cfg.base:
            check_lcm_base(cfg)
        super().__init__(cfg, **kw)
        self.lora_fuser = lora_fuser
        self.fused: list[dict] = []
        self.ema: dict | None = None  # the target network's LoRA weights with lcm_ema_decay > 0 (by lora_params name)

    # -- models ----------------------------------------------------------------------------------------------------
    def inject_lora(self) -> None:
        if self.cfg.lcm_fuse:
            self.fuse_user_loras()
        super().inject_lora()
        sched = self.base.noise_scheduler
        self.alphas_cumprod = sched.alphas_cumprod.float()  # (T,)
        self.solver = DdimSolver(self.alphas_cumprod, int(sched.config.num_train_timesteps),
                                 self.cfg.lcm_ddim_timesteps)

    def fuse_user_loras(self) -> None:
        if self.lora_fuser is None:
            raise MissingDependency("lcm_fuse needs sdedge's LoRA reader (the export extra: pip install "
                                    "'sdedge[export]'), which `sdedge train` hands the trainer")
        report = self.lora_fuser(self.base, list(self.cfg.lcm_fuse))
        for lora in report.loras:
            self.fused.append({"path": lora.path, "sha256": lora.sha256, "scale": lora.scale})

    @property
    def teacher_sha256(self) -> str:
        """The teacher is the base with the fused LoRAs: its identity for resume checks."""
        parts = [self.base.sha256] + [f"{f['sha256']}:{f['scale']!r}" for f in self.fused]
        return sha256_bytes("\n".join(parts).encode()) if self.fused else self.base.sha256

    def build_caches(self) -> None:
        import torch

        super().build_caches()
        with torch.no_grad():
            ids = tokenize(self.base.tokenizer, [""]).to(self.device)
            self.uncond = self.text_encoder(ids)[0].float()  # (1, 77, d): the teacher's unconditional branch

    # -- the loss --------------------------------------------------------------------------------------------------
    def draws(self, batch: Batch):
        """Per row: the solver step index n (b,) int64 and the teacher's guidance scale w (b,), seeded per slot;
        w = 1 (no guidance) where the step starts below lcm_unguided_below."""
        import torch

        cfg, index, w = self.cfg, [], []
        for slot in batch.slots:
            g = torch.Generator().manual_seed(seed_for(cfg.seed, "lcm", batch.micro, slot))
            index.append(torch.randint(0, cfg.lcm_ddim_timesteps, (1,), generator=g))
            w.append(cfg.lcm_guidance_min + (cfg.lcm_guidance_max - cfg.lcm_guidance_min) * torch.rand(1, generator=g))
        index, w = torch.cat(index).to(self.device), torch.cat(w).to(self.device)
        start = self.solver.timesteps.to(self.device)[index]
        return index, torch.where(start < cfg.lcm_unguided_below, torch.ones_like(w), w)  # the guidance interval

    def consistency(self, output, t, sample):
        """f(sample, t) = c_skip(t)·sample + c_out(t)·x̂0 from a UNet output."""
        c_skip, c_out = boundary_scalings(t, self.cfg.lcm_timestep_scaling)
        x0, _ = predicted_x0_eps(output.float(), t, sample, self.prediction, self.alphas_cumprod)
        return _rows(c_skip, sample) * sample + _rows(c_out, sample) * x0

    def teacher_step(self, unet, noisy, t, hidden, index, w):
        """z_{t−k}: one DDIM step of the guided teacher (the base: the student's LoRA off) from z_t."""
        import torch

        b = noisy.shape[0]
        with lora_off(unet):
            out = unet(torch.cat([noisy, noisy]), torch.cat([t, t]),
                       torch.cat([hidden, self.uncond.expand(b, -1, -1)])).sample.float()  # (2b, 4, h, w)
        x0, eps = predicted_x0_eps(out, torch.cat([t, t]), torch.cat([noisy, noisy]), self.prediction,
                                   self.alphas_cumprod)
        omega = _rows(w - 1.0, noisy)  # the LCM paper's ω = w − 1
        x0 = x0[:b] + omega * (x0[:b] - x0[b:])
        eps = eps[:b] + omega * (eps[:b] - eps[b:])
        return self.solver.step(x0, eps, index)

    def loss(self, batch: Batch):
        import torch

        cfg, acc = self.cfg, self.accelerator
        index, w = self.draws(batch)
        start = self.solver.timesteps.to(self.device)[index]  # (b,) t_{n+k}
        end = torch.clamp(start - self.solver.skip, min=0)  # (b,) t_n
        noisy = self.noise_scheduler.add_noise(batch.latents, batch.noise, start)  # (b, 4, h, w)
        hidden = self.encode_text(batch.captions)
        unet = acc.unwrap_model(self.unet_p)
        with torch.no_grad(), acc.autocast():  # before the student's pass: the EMA swap must not meet its graph
            prev = self.teacher_step(unet, noisy, start, hidden, index, w)
            with self.target_weights():
                target = self.consistency(unet(prev, end, hidden).sample, end, prev)
        with acc.autocast():
            pred = self.consistency(self.unet_p(noisy, start, hidden).sample, start, noisy)
        diff = pred.float() - target.float()
        if cfg.lcm_loss == "l2":
            return diff.pow(2).mean()
        return (torch.sqrt(diff.pow(2) + cfg.lcm_huber_c ** 2) - cfg.lcm_huber_c).mean()

    # -- the EMA target ---------------------------------------------------------------------------------------------
    def target_weights(self):
        """The target network inside the block: the online student, or its LoRA with the EMA weights."""
        if self.ema is None:
            return contextlib.nullcontext()
        return weights_swapped(self.lora_params(unwrap=True), self.ema)

    def start_ema(self) -> None:
        """The EMA at the run's start: the checkpoint's when resuming, else a copy of the LoRA weights."""
        if not self.cfg.lcm_ema_decay:
            return
        params = self.lora_params()
        saved = self.checkpoint.ema if self.checkpoint is not None else None
        if self.checkpoint is not None and saved is None:
            raise SdedgeError(f"--resume {self.checkpoint.folder}: the checkpoint holds no EMA target (ema.safetensors), so "
                              f"its run had lcm_ema_decay 0; resume with that setting (or start a new run)")
        if saved is not None and set(saved) != set(params):
            extra = sorted(set(saved) ^ set(params))[0]
            raise SdedgeError(f"--resume {self.checkpoint.folder}: its EMA tensors do not match this run's LoRA (first: "
                              f"{extra!r})")
        self.ema = {name: (saved[name] if saved is not None else p.detach()).to(self.device, dtype=p.dtype).clone()
                    for name, p in params.items()}

    def optimizer_step(self, step: int) -> float:
        loss = super().optimizer_step(step)
        if self.ema is not None:
            update_ema(self.ema, self.lora_params(unwrap=True), self.cfg.lcm_ema_decay)
        return loss

    def ema_tensors(self) -> dict | None:
        return self.ema

    # -- what it records -------------------------------------------------------------------------------------------
    def validation_sampling(self) -> tuple:
        config = dict(self.base.scheduler_config, original_inference_steps=self.cfg.lcm_ddim_timesteps)
        base = dataclasses.replace(self.base, scheduler_class="LCMScheduler", scheduler_config=config)
        return base, VALIDATION_STEPS, VALIDATION_GUIDANCE

    def checkpoint_state(self, step: int, loss: float, optimizer: OptimizerRest) -> CheckpointState:
        return dataclasses.replace(super().checkpoint_state(step, loss, optimizer), teacher_sha256=self.teacher_sha256)

    def resume(self):
        if self.checkpoint is not None and self.checkpoint.state.teacher_sha256 != self.teacher_sha256:
            raise SdedgeError(f"--resume {self.checkpoint.folder}: the base or the LoRAs fused into it (lcm_fuse) "
                              "changed since the checkpoint (SHA-256 differs)")
        resumed = super().resume()
        self.start_ema()
        return resumed

    def adapter_document(self, adapter_path, unet_layers: int, text_layers: int) -> AdapterDocument:
        teacher = TeacherRef(id=self.base.id, sha256=self.teacher_sha256, path=str(self.base.path.resolve()), weight=1.0)
        return dataclasses.replace(super().adapter_document(adapter_path, unet_layers, text_layers),
                                   distilled_from=teacher)


def train_lcm(cfg, *, console=None, stop_after: int | None = None, unet_loader=None, lora_fuser=None) -> TrainResult:
    """Distil an LCM-LoRA as `cfg` says (cfg.lcm; what `train` does with it); `lora_fuser(base, ["file:scale", ...])`
    fuses `lcm_fuse` (the CLI hands in sdedge.export.lora.fuse_loras)."""
    if not cfg.lcm:
        raise SdedgeError("train_lcm: the config does not set lcm")
    return LcmTrainer(cfg, console=console, stop_after=stop_after, unet_loader=unet_loader,
                      lora_fuser=lora_fuser).run()
