"""Text-to-image with a bundle, in NumPy and ONNX Runtime: no PyTorch.

    prompt ─► tokenizer ─► text_encoder ─► (negative ⊕ positive) embeddings      (2B, 77, D)
    seed ─► initial latents × init_noise_sigma                                    (B, 4, H/8, W/8)
    for t in scheduler.timesteps:
        unet(scale(latents ⊕ latents), t, embeddings) ─► (u, c)                   (2B, 4, H/8, W/8)
        ε = u + guidance · (c − u)                                                (classifier-free guidance)
        latents = scheduler.step(ε, t, latents)
    vae_decoder(latents / decoder scaling) ─► image in [−1, 1]                    (B, 3, H, W)
    (the VAE's scaling_factor; a TAESD-architecture decoder's own, 1.0)

Image-to-image (`image=`, `strength=`) starts from the VAE encoder's latents of the image, noised to the strength's
timestep, and runs the rest of the schedule; inpainting (`mask=`) feeds the mask and the masked image's latents to
a 9-channel UNet (runtime/init_image.py has the preparation, as diffusers' img2img and inpainting pipelines).

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
from .conditioning import guide, make_conditioning, runs_guidance
from .errors import BadInput, SdedgeError
from .init_image import (
    binarize,
    check_size,
    check_strength,
    mask_array,
    posterior_sample,
    rgb_array,
    strength_timesteps,
    to_model_range,
)
from .memory import peak_rss_bytes
from .schedulers import SchedulerConfig, make_scheduler
from .signing import SignerInfo, open_bundle
from .tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, ClipTokenizer

log = logging.getLogger("sdedge.runtime")

MAX_STEPS = 1000
MEMORY_MODES = ("normal", "low")
INPAINT_CHANNELS = 9  # an inpainting UNet's input: latents (4) ⊕ mask (1) ⊕ masked-image latents (4)


class Cancelled(SdedgeError):
    """A generation stopped between denoising steps because its cancel token was set."""


@dataclass
class InitImage:
    """An image-to-image / inpainting request, and what `_init_latents` derived from it."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None  # (H, W) uint8, white = repaint
    strength: float
    image_latents: np.ndarray | None = None  # (B, 4, h, w), the image's posterior sample (scaled)
    noise: np.ndarray | None = None  # (B, 4, h, w), the noise added to it
    latent_mask: np.ndarray | None = None  # (B, 1, h, w) of 0 and 1
    unet_mask: np.ndarray | None = None  # (2B or B, 1, h, w): the 9-channel UNet's mask input
    masked_latents: np.ndarray | None = None  # (2B or B, 4, h, w): the masked image's latents, for a 9-channel UNet
    blend: bool = False  # a 4-channel UNet with a mask: the unmasked part is reset to the noised image every step


@dataclass
class GenerationResult:
    images: np.ndarray  # (N, H, W, 3) float32 in [0, 1]
    timings: dict[str, float]  # seconds per stage
    step_times: list[float]
    peak_rss_bytes: int
    settings: dict = field(default_factory=dict)
    watermark: str | None = None  # the payload (hex) of sdedge's invisible mark in `images`; None: unmarked

    def to_pil(self) -> list:
        from PIL import Image

        return [Image.fromarray(a) for a in to_uint8(self.images)]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] to uint8, rounding as diffusers' numpy_to_pil does."""
    return (images * 255).round().astype(np.uint8)


class Pipeline:
    """A loaded bundle. `Pipeline.load(path)`, then call it with a prompt."""

    def __init__(self, bundle: Bundle, *, device: str = "auto", memory: str = "normal", threads: int | None = None,
                 backend: str = "auto", engine_factory: EngineFactory | None = None, precision_hint: str = "auto",
                 prepare: bool | dict = True):
        """backend: "auto" (the documented rule of runtime/backends/select.py), "onnxruntime" or "openvino".
        engine_factory: (bundle, component name, component info) -> engine; replaces the backend's own.
        precision_hint: "auto", "fp32" (exact fp32 compute, also on OpenVINO) or "bf16" (select.py).
        prepare: with memory "normal", compile at load for the request expected (`prepare`): True for the bundle's
        default size, guidance and one image, a dict of `prepare`'s arguments for another, False for none."""
        if memory not in MEMORY_MODES:
            raise BadInput(f"memory={memory!r}: choose one of {', '.join(MEMORY_MODES)}")
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.memory = memory
        choice = choose_backend(self.manifest, backend, device, precision_hint=precision_hint)
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
        self.conditioning = make_conditioning(self)  # by the manifest's pipeline: sd15 | sdxl
        self.signer: SignerInfo | None = None
        self.scheduler_config = SchedulerConfig.from_dict(self.manifest.scheduler)
        self.load_seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        if memory == "normal":
            for name in (*self.conditioning.components, "unet", "vae_decoder"):
                self._load(name)
            if isinstance(prepare, dict):
                self.prepare(**prepare)
            elif prepare:
                try:
                    self.prepare()
                except BadInput as exc:  # the bundle's defaults do not make a request it takes: nothing to prepare
                    log.debug("nothing prepared at load: %s", exc)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", memory: str = "normal", threads: int | None = None,
             backend: str = "auto", engine_factory: EngineFactory | None = None,
             verify: str = "if-signed", public_key: str | Path | None = None, identity: str | None = None,
             issuer: str | None = None, certificate_chain=None, precision_hint: str = "auto",
             prepare: bool | dict = True) -> Pipeline:
        """Open a bundle, verifying its signature first (before any model file is parsed).

        verify: "required" refuses an unsigned bundle or one whose signature fails; "if-signed" (default)
        verifies when bundle/model.sig exists and warns when it does not; "off" skips the signature (the
        manifest's SHA-256 of every file is still checked as each file is read). A public_key, identity or
        certificate_chain given means verify: the policy is then "required" (docs/security.md).
        memory: "low" holds one component in memory at a time (slower, smaller peak).
        prepare: what to compile at load (`prepare`; engines that compile per shape, OpenVINO's): True for the
        bundle's default request, a dict such as {"width": 256, "height": 256} for another, False for none.
        """
        bundle, signer = open_bundle(path, verify, public_key=public_key, identity=identity, issuer=issuer,
                                     certificate_chain=certificate_chain)
        pipe = cls(bundle, device=device, memory=memory, threads=threads, backend=backend,
                   engine_factory=engine_factory, precision_hint=precision_hint, prepare=prepare)
        pipe.signer = signer
        return pipe

    def _tokenizer(self, info=None) -> ClipTokenizer:
        """The tokenizer (or that of `info`, a TokenizerInfo) from hash-checked bytes (files listed in the manifest)."""
        folder = (info or self.manifest.tokenizer).dir
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

    def prepare(self, width: int | None = None, height: int | None = None, num_images: int = 1,
                guidance: float | None = None) -> None:
        """Compile now, for the input shapes of a text-to-image request of this size, guidance and number of images
        (defaults: the bundle's), every loaded engine that compiles per shape (OpenVINO's static shapes, or its
        cached blob imported; ONNX Runtime's sessions have nothing to do): the first such image then runs at the
        steady speed. Seconds are added to `load_seconds`. A component whose inputs name a dimension other than
        batch, height and width (latent or pixel) compiles at its first call instead."""
        s = self._settings(None, guidance, width, height, None, num_images)
        b = s["num_images"]
        guided = 2 * b if runs_guidance(s["guidance"]) else b
        f = self.manifest.latent.vae_scale_factor
        dims = {"height": s["height"], "width": s["width"], "latent_height": s["height"] // f,
                "latent_width": s["width"] // f}
        # SDXL encodes no negative prompt when it is empty and force_zeros_for_empty_prompt (runtime/sdxl.py)
        zeros = self.manifest.pipeline == "sdxl" and getattr(self.conditioning, "force_zeros", False)
        # the UNet first: its compile (or blob import) needs the most transient memory, which then sits on nothing
        # else held (sd15-arch int8 at 512², imported: peak 2.83 GB instead of 3.26;
        # benchmarks/results/cpu-sd15-512-fast/2026-12-02-memory-probe)
        for name, engine in sorted(self.engines.items(), key=lambda item: item[0] != "unet"):
            if not hasattr(engine, "prepare") or not engine.loaded or name == "vae_encoder":
                continue
            batch = b if name == "vae_decoder" or (zeros and name.startswith("text_encoder")) else guided
            sizes = {**dims, "batch": batch}
            shapes = [[d if isinstance(d, int) else sizes.get(d) for d in t.shape] for t in engine.info.inputs]
            if any(d is None for shape in shapes for d in shape):
                log.debug("%s: inputs %s not prepared (a dimension other than batch, height, width)", name, shapes)
                continue
            t0 = time.perf_counter()
            engine.prepare(tuple(map(tuple, shapes)))
            self.load_seconds[name] = self.load_seconds.get(name, 0.0) + time.perf_counter() - t0

    def _release(self, name: str) -> None:
        if self.memory == "low":
            self.engines[name].unload()

    def close(self) -> None:
        for engine in self.engines.values():
            engine.unload()

    # -- what the bundle can do -------------------------------------------------------------------------------
    @property
    def supports_img2img(self) -> bool:
        """A bundle with its VAE encoder (SD1.5 or SDXL): `generate(image=...)` works."""
        return "vae_encoder" in self.manifest.components  # SDXL too: parity-checked in tests/test_sdxl.py

    @property
    def unet_in_channels(self) -> int:
        """The UNet's input channels: the latent channels, or 9 for an inpainting UNet."""
        sample = next((t for t in self.manifest.components["unet"].inputs if t.name == "sample"), None)
        channels = sample.shape[1] if sample is not None and len(sample.shape) == 4 else None
        return channels if isinstance(channels, int) else self.manifest.latent.channels

    @property
    def is_inpaint(self) -> bool:
        """An inpainting bundle (9-channel UNet): `generate` needs `image=` and `mask=`."""
        return self.unet_in_channels == INPAINT_CHANNELS

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
        max_images = s.batch_max // 2 if runs_guidance(guidance) else s.batch_max
        if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= max_images:
            raise BadInput(f"num_images={num_images!r}: must be from 1 to {max_images} for this bundle")
        return dict(steps=steps, guidance=float(guidance), width=width, height=height, scheduler=scheduler,
                    num_images=num_images)

    def _init_request(self, image, mask, strength, width, height) -> tuple[InitImage | None, int | None, int | None]:
        """Check an image-to-image / inpainting request against the bundle; the size defaults to the image's."""
        if image is None:
            if mask is not None:
                raise BadInput("mask= needs image=, the picture to inpaint")
            if strength is not None:
                raise BadInput("strength= is for image-to-image: give image= too")
            if self.is_inpaint:
                raise BadInput("this is an inpainting bundle (its UNet takes 9 channels: latents, mask, masked "
                               "image): give image= and mask=")
            return None, width, height
        if self.manifest.pipeline != "sd15" and mask is not None:  # SDXL img2img: parity-checked in tests/test_sdxl.py
            raise BadInput(f"inpainting runs on SD1.5 bundles; this one is {self.manifest.pipeline} (its image-to-image "
                           "works: give image= without mask=)")
        if not self.supports_img2img:
            raise BadInput(f"{self.bundle.root}: the bundle has no vae_encoder component, which image-to-image "
                           "needs; export it again without --no-vae-encoder")
        if self.is_inpaint and mask is None:
            raise BadInput("this is an inpainting bundle (its UNet takes 9 channels: latents, mask, masked image): "
                           "give mask= with the image")
        rgb = rgb_array(image, "image")
        width, height = check_size(rgb, "image", width, height)
        m = None
        if mask is not None:
            m = mask_array(mask, "mask")
            if m.shape != rgb.shape[:2]:
                raise BadInput(f"mask is {m.shape[1]}×{m.shape[0]} pixels, the image {width}×{height}: give a mask "
                               "of the image's size")
        default = 1.0 if m is not None else 0.8  # diffusers' inpainting / img2img defaults
        return InitImage(rgb, m, default if strength is None else strength), width, height

    def _encode(self, x: np.ndarray, rng) -> np.ndarray:
        """(1, 3, H, W) in [−1, 1] -> the posterior sample (1, 4, h, w), scaled by the VAE's scaling factor."""
        vae = self._load("vae_encoder")
        moments = vae.infer({"sample": x})[0]  # (1, 8, h, w)
        self._release("vae_encoder")
        return posterior_sample(moments, rng, self.manifest.latent.scaling_factor)

    def _init_latents(self, init: InitImage, sched, timesteps, shape, do_cfg: bool, rng) -> np.ndarray:
        """The first latents of image-to-image / inpainting, and (into `init`) the inpainting inputs; random draws in
        diffusers' order: the image's posterior, the noise, the masked image's posterior."""
        batch, s = shape[0], self.manifest.latent.vae_scale_factor
        x = to_model_range(init.image)  # (1, 3, H, W)
        inpaint9 = self.is_inpaint
        pure_noise = init.mask is not None and init.strength == 1.0  # diffusers' inpainting starts from noise then
        if not (pure_noise and inpaint9):
            init.image_latents = np.repeat(self._encode(x, rng), batch, axis=0)  # (B, 4, h, w)
        init.noise = rng.standard_normal(shape, dtype=np.float32)  # (B, 4, h, w)
        if pure_noise:
            latents = init.noise * np.float32(sched.init_noise_sigma)
        else:
            latents = sched.add_noise(init.image_latents, init.noise, timesteps[0])
        if init.mask is not None:
            m = binarize(init.mask)  # (1, 1, H, W)
            masked = x * (m < 0.5)
            if inpaint9:
                masked_latents = np.repeat(self._encode(masked, rng), batch, axis=0)  # (B, 4, h, w)
                init.masked_latents = np.concatenate([masked_latents] * 2) if do_cfg else masked_latents
            else:  # diffusers encodes the masked image for a 4-channel UNet too, unused: the same draw keeps parity
                rng.standard_normal((1, *shape[1:]), dtype=np.float32)
                init.blend = True
            init.latent_mask = np.repeat(m[:, :, ::s, ::s], batch, axis=0)  # (B, 1, h, w), nearest as diffusers
            init.unet_mask = np.concatenate([init.latent_mask] * 2) if do_cfg else init.latent_mask
        return latents

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
        image=None,
        mask=None,
        strength: float | None = None,
        rng=None,
        on_step: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
        micro_conditioning=None,
        watermark: bool = True,
    ) -> GenerationResult:
        """Run the pipeline. `latents` (B, 4, H/8, W/8) replaces the seeded initial noise of text-to-image (for parity
        runs).

        image: a PIL image or an (H, W, 3) uint8 array: image-to-image (the bundle needs its vae_encoder), as
        diffusers' StableDiffusionImg2ImgPipeline; the output has the image's size (a differing width/height is
        refused: images are not resized). strength in (0, 1] (default 0.8): how much of the schedule runs.
        mask: with image, a PIL image or an (H, W) uint8 array of the image's size, white (≥ 128) = repaint:
        inpainting as diffusers' StableDiffusionInpaintPipeline (default strength 1.0), with the mask and the
        masked image's latents fed to a 9-channel UNet (`is_inpaint`), or blended in after every step for a
        4-channel one. An inpainting bundle needs both.
        rng: every random draw of the call comes from it (anything with NumPy Generator's
        `standard_normal(shape, dtype=)`), in diffusers' order: the VAE posterior samples, the initial noise, the
        schedulers' per-step noise; it replaces the seed's streams (for parity runs against a torch generator).
        watermark: mark the images with the bundle's invisible watermark (runtime/watermark.py, docs/provenance.md);
        False for the decoder's pixels as they are (parity measurements).
        """
        req = self._request(prompt, negative_prompt, steps=steps, guidance=guidance, seed=seed, width=width,
                            height=height, scheduler=scheduler, num_images=num_images, latents=latents, image=image,
                            mask=mask, strength=strength, rng=rng, micro_conditioning=micro_conditioning)
        with self._lock:
            timings: dict[str, float] = {}
            # (2B or B, 77, D) and the pipeline's extra UNet inputs (SDXL: text_embeds, time_ids)
            embeddings, extra = self.conditioning.encode(req.prompts, req.negatives, req.do_cfg,
                                                         {**req.settings, "micro_conditioning": micro_conditioning},
                                                         timings)
            latents, timesteps = self._first_latents(req, timings)
            latents, step_times = self._denoise(req, latents, timesteps, embeddings, extra, on_step, cancel)
            timings["unet"] = float(sum(step_times))
            decoded = self._decode(latents, timings)  # (B, 3, H, W)

        images = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)  # (B, H, W, 3)
        mark = None
        if watermark:
            from .provenance import watermark_images

            t0 = time.perf_counter()
            images, mark = watermark_images(self, images)
            timings["watermark"] = time.perf_counter() - t0
        return GenerationResult(images=images, timings=timings, step_times=step_times,
                                peak_rss_bytes=peak_rss_bytes(), settings=req.settings, watermark=mark)

    def _request(self, prompt, negative_prompt, *, steps, guidance, seed, width, height, scheduler, num_images,
                 latents, image, mask, strength, rng, micro_conditioning) -> _Request:
        """A generation's arguments checked against the bundle, with its batch, scheduler, random streams and (for
        text-to-image) initial latents; refused with BadInput naming the argument."""
        init, width, height = self._init_request(image, mask, strength, width, height)
        cfg_ = self._settings(steps, guidance, width, height, scheduler, num_images)
        self.conditioning.check(micro_conditioning)  # SDXL's sdedge.runtime.sdxl.MicroConditioning
        if init is not None:
            init.strength = check_strength(init.strength, cfg_["steps"])
            cfg_["strength"] = init.strength
            if latents is not None:
                raise BadInput("latents= replaces text-to-image's initial noise; with image= the noise comes from "
                               "the seed (or rng=)")
        prompts, negatives = _prompt_batch(prompt, negative_prompt, cfg_["num_images"])
        batch = len(prompts)
        do_cfg = runs_guidance(cfg_["guidance"])
        if batch * (2 if do_cfg else 1) > self.manifest.shapes.batch_max:
            raise BadInput(f"{batch} images per call exceed this bundle's batch limit ({self.manifest.shapes.batch_max}"
                           f"{' including the negative prompts' if do_cfg else ''})")
        sched = make_scheduler(cfg_["scheduler"], self.scheduler_config)
        seed = int(np.random.SeedSequence().entropy % (2**31)) if seed is None else int(seed)
        cfg_["seed"] = seed
        noise_rng = np.random.default_rng(seed) if rng is None else rng
        # ancestral / LCM schedulers draw their per-step noise from a stream apart from the latents' (unless rng=)
        step_rng = np.random.default_rng([seed, 1]) if rng is None else rng
        lat = self.manifest.latent
        shape = (batch, lat.channels, cfg_["height"] // lat.vae_scale_factor, cfg_["width"] // lat.vae_scale_factor)
        if init is None:
            if latents is None:
                latents = noise_rng.standard_normal(shape, dtype=np.float32)  # (B, 4, H/8, W/8)
            elif latents.shape != shape:
                raise BadInput(f"latents have shape {latents.shape}, expected {shape}")
        return _Request(prompts=prompts, negatives=negatives, do_cfg=do_cfg, settings=cfg_, sched=sched,
                        noise_rng=noise_rng, step_rng=step_rng, shape=shape, latents=latents, init=init)

    def _first_latents(self, req: _Request, timings: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """The latents the denoising loop starts from, and its timesteps: the seeded noise scaled for the scheduler
        (text-to-image), or the image's latents noised to the strength's timestep (image-to-image, inpainting)."""
        sched, steps = req.sched, req.settings["steps"]
        sched.set_timesteps(steps, rng=req.step_rng)
        if req.init is None:
            return req.latents.astype(np.float32) * np.float32(sched.init_noise_sigma), sched.timesteps
        timesteps = strength_timesteps(sched, steps, req.init.strength)
        t0 = time.perf_counter()
        latents = self._init_latents(req.init, sched, timesteps, req.shape, req.do_cfg, req.noise_rng)
        timings["vae_encoder"] = time.perf_counter() - t0
        return latents, timesteps

    def _denoise(self, req: _Request, latents: np.ndarray, timesteps, embeddings: np.ndarray, extra: dict,
                 on_step, cancel) -> tuple[np.ndarray, list[float]]:
        """The denoising loop (module docstring): the final latents (B, 4, h, w) and each step's seconds."""
        sched, init, batch, do_cfg = req.sched, req.init, len(req.prompts), req.do_cfg
        guidance = np.float32(req.settings["guidance"])
        unet = self._load("unet")
        step_times = []
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled after {i} of {total} steps")
            s0 = time.perf_counter()
            model_in = np.concatenate([latents, latents]) if do_cfg else latents  # (2B, 4, h, w)
            model_in = sched.scale_model_input(model_in, t)
            if init is not None and init.masked_latents is not None:  # (2B, 4 + 1 + 4, h, w)
                model_in = np.concatenate([model_in, init.unet_mask, init.masked_latents], axis=1)
            tt = np.full((model_in.shape[0],), t, dtype=np.float32)
            eps = unet.infer({"sample": model_in, "timestep": tt, "encoder_hidden_states": embeddings, **extra})[0]
            if do_cfg:
                eps = guide(eps[:batch], eps[batch:], guidance)  # (B, 4, h, w)
            latents = sched.step(eps, t, latents)
            if init is not None and init.blend:
                latents = _blend(sched, init, latents, timesteps, i)
            step_times.append(time.perf_counter() - s0)
            if on_step is not None:
                on_step(i + 1, total)
        self._release("unet")
        return latents, step_times

    def _decode(self, latents: np.ndarray, timings: dict[str, float]) -> np.ndarray:
        """The VAE decoder's image (B, 3, H, W) in [-1, 1] of the final latents (B, 4, h, w)."""
        t0 = time.perf_counter()
        vae = self._load("vae_decoder")
        decoded = vae.infer({"latent_sample": latents / np.float32(self.manifest.latent.decoder_scaling)})[0]
        self._release("vae_decoder")
        timings["vae_decoder"] = time.perf_counter() - t0
        return decoded


@dataclass
class _Request:
    """One generation's checked arguments (Pipeline._request)."""

    prompts: list[str]  # B: each prompt repeated num_images times
    negatives: list[str]
    do_cfg: bool  # guidance > 1: the negative prompts share the UNet's batch (2B)
    settings: dict  # steps, guidance, width, height, scheduler, num_images, seed (and strength)
    sched: object
    noise_rng: object  # the latents' (and the VAE posterior's) draws
    step_rng: object  # ancestral / LCM schedulers' per-step draws
    shape: tuple[int, int, int, int]  # (B, 4, h, w)
    latents: np.ndarray | None  # text-to-image's initial noise (unscaled)
    init: InitImage | None


def _prompt_batch(prompt, negative_prompt, num_images: int) -> tuple[list[str], list[str]]:
    """The prompts and negative prompts of a call, each repeated `num_images` times (one negative serves them all)."""
    prompts = _as_list(prompt, "prompt")
    negatives = _as_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise BadInput(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    return ([p for p in prompts for _ in range(num_images)], [n for n in negatives for _ in range(num_images)])


def _blend(sched, init: InitImage, latents: np.ndarray, timesteps: np.ndarray, i: int) -> np.ndarray:
    """A 4-channel UNet's inpainting (diffusers): keep the denoised latents under the mask, and elsewhere the image's
    latents noised to the next timestep (unnoised after the last)."""
    proper = init.image_latents
    if i < len(timesteps) - 1:
        proper = sched.add_noise(proper, init.noise, timesteps[i + 1])
    m = init.latent_mask
    return ((np.float32(1.0) - m) * proper + m * latents).astype(np.float32, copy=False)


def _as_list(value, label: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(v, str) for v in items):
        raise BadInput(f"{label} must be a string or a non-empty list of strings")
    return items
