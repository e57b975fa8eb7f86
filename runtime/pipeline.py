"""Text-to-image with a bundle, in NumPy and ONNX Runtime: no PyTorch.

    prompt ─► tokenizer ─► text_encoder ─► (negative ⊕ positive) embeddings      (2B, 77, D)
    seed ─► initial latents × init_noise_sigma                                    (B, 4, H/8, W/8)
    for t in scheduler.timesteps:
        unet(scale(latents ⊕ latents), t, embeddings) ─► (u, c)                   (2B, 4, H/8, W/8)
        ε = u + guidance · (c − u)                                                (classifier-free guidance)
        latents = scheduler.step(ε, t, latents)
    vae_decoder(latents / decoder scaling) ─► image in [−1, 1]                    (B, 3, H, W)
    (the VAE's scaling_factor; a TAESD-architecture decoder's own, 1.0)

It follows diffusers' StableDiffusionPipeline step for step, so that with the same weights and the same
initial latents the images agree (PSNR ≥ 40 dB, checked at export and in the tests).

Thread safety: one `Pipeline` runs one generation at a time (a lock serialises calls); ONNX Runtime
sessions are shared, so several threads may hold the same `Pipeline` and queue on it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends.onnxruntime import OrtEngine, choose_providers  # noqa: F401 (re-exported)
from .backends.select import EngineFactory, choose_backend
from .backends.select import engine_factory as make_engine_factory
from .bundle import Bundle
from .errors import BadInput, SdedgeError
from .memory import peak_rss_bytes
from .schedulers import SchedulerConfig, make_scheduler
from .signing import SignerInfo, open_bundle
from .tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, ClipTokenizer

log = logging.getLogger("sdedge.runtime")

MAX_STEPS = 1000
MEMORY_MODES = ("normal", "low")


class Cancelled(SdedgeError):
    """A generation stopped between denoising steps because its cancel token was set."""


@dataclass
class GenerationResult:
    images: np.ndarray  # (N, H, W, 3) float32 in [0, 1]
    timings: dict[str, float]  # seconds per stage
    step_times: list[float]
    peak_rss_bytes: int
    settings: dict = field(default_factory=dict)

    def to_pil(self) -> list:
        from PIL import Image

        return [Image.fromarray(a) for a in to_uint8(self.images)]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] to uint8, rounding as diffusers' numpy_to_pil does."""
    return (images * 255).round().astype(np.uint8)


class Pipeline:
    """A loaded bundle. `Pipeline.load(path)`, then call it with a prompt."""

    def __init__(self, bundle: Bundle, *, device: str = "auto", memory: str = "normal", threads: int | None = None,
                 backend: str = "auto", engine_factory: EngineFactory | None = None):
        """backend: "auto" (the documented rule of runtime/backends/select.py), "onnxruntime" or "openvino".
        engine_factory: (bundle, component name, component info) -> engine; replaces the backend's own."""
        if memory not in MEMORY_MODES:
            raise BadInput(f"memory={memory!r}: choose one of {', '.join(MEMORY_MODES)}")
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.memory = memory
        choice = choose_backend(self.manifest, backend, device)
        log.info("backend %s (%s)", choice.label, choice.reason)
        for why in choice.skipped:
            log.info("not used: %s", why)
        self.backend = choice.label
        self.backend_reason = choice.reason
        self.backend_skipped = choice.skipped  # what `auto` passed over, and why
        factory = engine_factory or make_engine_factory(choice, self.manifest, threads=threads,
                                                        low_memory=memory == "low")
        self.engines = {name: factory(bundle, name, info) for name, info in self.manifest.components.items()}
        self.tokenizer = self._tokenizer()
        self.signer: SignerInfo | None = None
        self.scheduler_config = SchedulerConfig.from_dict(self.manifest.scheduler)
        self.load_seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        if memory == "normal":
            for name in ("text_encoder", "unet", "vae_decoder"):
                self._load(name)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", memory: str = "normal", threads: int | None = None,
             backend: str = "auto", engine_factory: EngineFactory | None = None,
             verify: str = "if-signed", public_key: str | Path | None = None, identity: str | None = None,
             issuer: str | None = None, certificate_chain=None) -> Pipeline:
        """Open a bundle, verifying its signature first (before any model file is parsed).

        verify: "required" refuses an unsigned bundle or one whose signature fails; "if-signed" (default)
        verifies when bundle/model.sig exists and warns when it does not; "off" skips the signature (the
        manifest's SHA-256 of every file is still checked as each file is read).
        memory: "low" holds one component in memory at a time (slower, smaller peak).
        """
        bundle, signer = open_bundle(path, verify, public_key=public_key, identity=identity, issuer=issuer,
                                     certificate_chain=certificate_chain)
        pipe = cls(bundle, device=device, memory=memory, threads=threads, backend=backend,
                   engine_factory=engine_factory)
        pipe.signer = signer
        return pipe

    def _tokenizer(self) -> ClipTokenizer:
        """The tokenizer from hash-checked bytes (files listed in the manifest)."""
        folder = self.manifest.tokenizer.dir
        tok, cfg = f"{folder}/{TOKENIZER_FILE}", f"{folder}/{TOKENIZER_CONFIG_FILE}"
        config = self.bundle.read(cfg) if cfg in self.manifest.files else None
        return ClipTokenizer.from_bytes(self.bundle.read(tok), config, source=str(self.bundle.path(tok)))

    # -- engine lifecycle -------------------------------------------------------------------------------------
    def _load(self, name: str) -> OrtEngine:
        engine = self.engines[name]
        if not engine.loaded:
            t0 = time.perf_counter()
            engine.load()
            self.load_seconds[name] = self.load_seconds.get(name, 0.0) + time.perf_counter() - t0
        return engine

    def _release(self, name: str) -> None:
        if self.memory == "low":
            self.engines[name].unload()

    def close(self) -> None:
        for engine in self.engines.values():
            engine.unload()

    # -- validation -------------------------------------------------------------------------------------------
    def _settings(self, steps, guidance, width, height, scheduler, num_images) -> dict:
        m = self.manifest
        steps = m.defaults.steps if steps is None else steps
        guidance = m.defaults.guidance if guidance is None else guidance
        width = m.shapes.default_width if width is None else width
        height = m.shapes.default_height if height is None else height
        scheduler = m.defaults.scheduler if scheduler is None else scheduler
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise BadInput(f"steps={steps!r}: must be an integer from 1 to {MAX_STEPS}")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise BadInput(f"guidance={guidance!r}: must be a finite number")
        s = m.shapes
        for label, value, lo, hi in (("width", width, s.width_min, s.width_max), ("height", height, s.height_min, s.height_max)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadInput(f"{label}={value!r}: must be an integer")
            if value % s.pixel_multiple:
                raise BadInput(f"{label}={value}: must be a multiple of {s.pixel_multiple} for this model")
            if not lo <= value <= hi:
                raise BadInput(f"{label}={value}: outside the range this bundle was exported for ({lo}–{hi})")
        cfg = guidance > 1.0
        max_images = s.batch_max // 2 if cfg else s.batch_max
        if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= max_images:
            raise BadInput(f"num_images={num_images!r}: must be from 1 to {max_images} for this bundle")
        return dict(steps=steps, guidance=float(guidance), width=width, height=height, scheduler=scheduler,
                    num_images=num_images)

    # -- generation -------------------------------------------------------------------------------------------
    def __call__(self, prompt, negative_prompt="", **kwargs) -> list:
        """Generate and return PIL images. Keyword arguments as `generate`."""
        return self.generate(prompt, negative_prompt, **kwargs).to_pil()

    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        *,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        scheduler: str | None = None,
        num_images: int = 1,
        latents: np.ndarray | None = None,
        on_step: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Run the pipeline. `latents` (B, 4, H/8, W/8) replaces the seeded initial noise (for parity runs)."""
        cfg_ = self._settings(steps, guidance, width, height, scheduler, num_images)
        prompts = _as_list(prompt, "prompt")
        negatives = _as_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise BadInput(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        prompts = [p for p in prompts for _ in range(cfg_["num_images"])]
        negatives = [n for n in negatives for _ in range(cfg_["num_images"])]
        batch = len(prompts)
        do_cfg = cfg_["guidance"] > 1.0
        if batch * (2 if do_cfg else 1) > self.manifest.shapes.batch_max:
            raise BadInput(f"{batch} images per call exceed this bundle's batch limit ({self.manifest.shapes.batch_max}"
                           f"{' including the negative prompts' if do_cfg else ''})")
        sched = make_scheduler(cfg_["scheduler"], self.scheduler_config)
        seed = int(np.random.SeedSequence().entropy % (2**31)) if seed is None else int(seed)
        cfg_["seed"] = seed
        rng = np.random.default_rng(seed)
        lat = self.manifest.latent
        shape = (batch, lat.channels, cfg_["height"] // lat.vae_scale_factor, cfg_["width"] // lat.vae_scale_factor)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)  # (B, 4, H/8, W/8)
        elif latents.shape != shape:
            raise BadInput(f"latents have shape {latents.shape}, expected {shape}")

        with self._lock:
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            ids = self.tokenizer((negatives + prompts) if do_cfg else prompts)  # (2B or B, 77)
            timings["tokenize"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            te = self._load("text_encoder")
            embeddings = te.infer({"input_ids": ids})[0]  # (2B, 77, D)
            self._release("text_encoder")
            timings["text_encoder"] = time.perf_counter() - t0

            unet = self._load("unet")
            # ancestral / LCM schedulers draw their per-step noise from a stream apart from the latents'
            sched.set_timesteps(cfg_["steps"], rng=np.random.default_rng([seed, 1]))
            latents = latents.astype(np.float32) * np.float32(sched.init_noise_sigma)
            step_times = []
            total = len(sched.timesteps)
            for i, t in enumerate(sched.timesteps):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"cancelled after {i} of {total} steps")
                s0 = time.perf_counter()
                model_in = np.concatenate([latents, latents]) if do_cfg else latents  # (2B, 4, h, w)
                model_in = sched.scale_model_input(model_in, t)
                tt = np.full((model_in.shape[0],), t, dtype=np.float32)
                eps = unet.infer({"sample": model_in, "timestep": tt, "encoder_hidden_states": embeddings})[0]
                if do_cfg:
                    uncond, cond = eps[:batch], eps[batch:]
                    eps = uncond + np.float32(cfg_["guidance"]) * (cond - uncond)
                latents = sched.step(eps, t, latents)
                step_times.append(time.perf_counter() - s0)
                if on_step is not None:
                    on_step(i + 1, total)
            self._release("unet")
            timings["unet"] = float(sum(step_times))

            t0 = time.perf_counter()
            vae = self._load("vae_decoder")
            decoded = vae.infer({"latent_sample": latents / np.float32(lat.decoder_scaling)})[0]  # (B, 3, H, W)
            self._release("vae_decoder")
            timings["vae_decoder"] = time.perf_counter() - t0

        images = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)  # (B, H, W, 3)
        return GenerationResult(images=images, timings=timings, step_times=step_times,
                                peak_rss_bytes=peak_rss_bytes(), settings=cfg_)


def _as_list(value, label: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(v, str) for v in items):
        raise BadInput(f"{label} must be a string or a non-empty list of strings")
    return items
