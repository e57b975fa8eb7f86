"""The bench's engine workers: the sdedge runtime on a bundle, or diffusers' eager pipeline on a base.

A worker runs in a child process or inline in the bench's process (the protocol and the registry of worker
kinds: worker_process.py); the peers' worker (peers.py) builds on `_DiffusersWorker`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .report import STAGES
from .suite import BenchError


# == workers (run in the child process, or inline) ===========================================================
def _peak_rss() -> int:
    """This process's peak RSS. On Linux, VmHWM of /proc/self/status: the high-water mark of this program's
    own address space. (getrusage's ru_maxrss survives fork + exec, so a child started by a large parent
    would report at least the parent's size.) Elsewhere, sdedge.runtime.memory.peak_rss_bytes."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    from sdedge.runtime.memory import peak_rss_bytes

    return peak_rss_bytes()


class _SdedgeWorker:
    """The PyTorch-free runtime on a bundle."""

    def __init__(self, spec: dict, settings: dict):
        self.spec, self.settings = spec, settings
        self.pipe = None

    def load(self) -> dict:
        t0 = time.perf_counter()
        from sdedge.runtime.pipeline import Pipeline

        t1 = time.perf_counter()
        s = self.settings
        kw = {"device": self.spec["device"], "memory": self.spec["memory"], "threads": self.spec["threads"],
              "verify": self.spec["verify"], **{k: self.spec[k] for k in ("public_key", "identity", "issuer")
                                                if self.spec.get(k)}}
        if self.spec.get("backend", "auto") != "auto":
            kw["backend"] = self.spec["backend"]
        # compiled at load for the bench's request (OpenVINO's static shapes): the first image runs at the steady speed
        kw["prepare"] = {"width": s["size"], "height": s["size"], "num_images": s["batch"], "guidance": s["guidance"]}
        self.pipe = Pipeline.load(self.spec["bundle"], **kw)
        t2 = time.perf_counter()
        m = self.pipe.manifest
        prov = m.provenance
        return {
            "import_seconds": t1 - t0,
            "load_seconds": t2 - t1,
            "component_load_seconds": dict(self.pipe.load_seconds),
            "backend": self.pipe.backend,
            "backend_reason": getattr(self.pipe, "backend_reason", ""),
            "precision": m.precision.value,
            "signed": bool(getattr(self.pipe, "signer", None)),
            "provenance": {"base_id": prov.base.id, "base_sha256": prov.base.sha256, "quantisation": prov.quantisation,
                           "prune_ratio": prov.prune_ratio, "adapters": len(prov.adapters)},
            "scheduler": s["scheduler"],
            "peak_rss_bytes": _peak_rss(),
        }

    def run(self, req: dict) -> dict:
        s = self.settings
        latents = np.load(req["latents"])
        t0 = time.perf_counter()
        r = self.pipe.generate(s["prompt_list"][req["prompt_index"]], s["negative"], steps=s["steps"],
                               guidance=s["guidance"], scheduler=s["scheduler"], width=s["size"], height=s["size"],
                               num_images=s["batch"], latents=latents, watermark=False,  # parity vs the reference
                               seed=req.get("seed"))  # the noise a stochastic scheduler (LCM) injects between steps
        wall = time.perf_counter() - t0
        stages = {k: float(r.timings.get(k, 0.0)) for k in STAGES if k != "other"}
        stages["other"] = max(0.0, wall - sum(stages.values()))
        if req.get("image"):
            np.save(req["image"], r.images.astype(np.float32))
        return {"seconds": wall, "stages": stages, "step_seconds": [float(x) for x in r.step_times],
                "peak_rss_bytes": _peak_rss()}

    def final(self) -> dict:
        return {"peak_rss_bytes": _peak_rss(), "peak_gpu_allocated_bytes": None}

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None


class _DiffusersWorker:
    """diffusers' eager StableDiffusionPipeline, with hooks timing each stage."""

    def __init__(self, spec: dict, settings: dict):
        self.spec, self.settings = spec, settings
        self.pipe = None
        self.rec: dict[str, Any] = {}

    def load(self) -> dict:
        t0 = time.perf_counter()
        import torch

        from sdedge.export.reference import diffusers_scheduler

        t1 = time.perf_counter()
        self.torch = torch
        self.make_scheduler = diffusers_scheduler
        self.threads_before = torch.get_num_threads()  # restored at close (inline mode shares the process)
        torch.set_num_threads(self.spec["threads"])
        device = self.spec["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise BenchError("reference: device cuda asked for, but this torch build sees no CUDA GPU")
        self.device = device
        self.pipe, info = self._open()
        self.pipe.set_progress_bar_config(disable=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t2 = time.perf_counter()
        self._instrument()
        return {
            "import_seconds": t1 - t0,
            "load_seconds": t2 - t1,
            "component_load_seconds": {},
            "signed": False,
            "provenance": None,
            "scheduler": self.settings["scheduler"],
            "peak_rss_bytes": _peak_rss(),
            **info,
        }

    def _open(self):
        """The pipeline on self.device, and what the report says of it (backend, reason, precision)."""
        torch = self.torch
        from sdedge.export.bases import load_base

        dtype = self.spec.get("dtype", "fp32")
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        pipe = load_base(self.spec.get("base") or self.spec["model"])  # a diffusers peer names its base `model`
        pipe, done = _with_adapters(pipe, self.spec.get("loras") or (), self.spec.get("decoder"))
        reason = "the PyTorch reference" + done
        if self.dtype != torch.float32 or self.device != "cpu":
            pipe = pipe.to(device=self.device, dtype=self.dtype)
        return pipe, {"backend": f"torch-eager:{self.device}", "backend_reason": reason,
                      "precision": dtype}

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _instrument(self) -> None:
        """Time the text encoder and UNet calls, the VAE decode and the tokenizer. Each component's class is
        swapped for a subclass whose __call__ is timed: the same for torch modules and for the non-torch
        component wrappers of the peers' pipelines (benchmarks/peers.py)."""
        rec, pipe, clock = self.rec, self.pipe, time.perf_counter

        def timed(name, component, sync=True):
            def start():
                if sync:
                    self._sync()
                rec[f"{name}_t0"] = clock()
                if name == "unet":
                    rec["step_starts"].append(rec["unet_t0"])

            def end():
                if sync:
                    self._sync()
                rec[name] += clock() - rec[f"{name}_t0"]

            return _time_calls(component, start, end)

        for name in ("text_encoder", "unet"):
            timed(name, getattr(pipe, name))
        if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: both encoders count as the text encoder
            timed("text_encoder", pipe.text_encoder_2)
        self.tokenizer_timed = timed("tokenize", pipe.tokenizer, sync=False)
        decode = pipe.vae.decode

        def timed_decode(*args, **kwargs):
            self._sync()
            t = clock()
            rec["vae_start"] = t
            try:
                return decode(*args, **kwargs)
            finally:
                self._sync()
                rec["vae_decoder"] += clock() - t

        pipe.vae.decode = timed_decode

    def run(self, req: dict) -> dict:
        torch, s = self.torch, self.settings
        lat = torch.from_numpy(np.load(req["latents"])).to(device=self.device, dtype=self.dtype)
        prompt = s["prompt_list"][req["prompt_index"]]
        b = lat.shape[0]
        # LCM re-noises between steps: drawn as the runtime draws it for this run's seed (export/reference.py
        # runtime_noise_lcm), so an LCM row's parity measures the engine, not two noise streams
        self.pipe.scheduler = self.make_scheduler(s["scheduler"], s["scheduler_config"], req.get("seed"))
        self.rec.clear()
        self.rec.update(tokenize=0.0, text_encoder=0.0, unet=0.0, vae_decoder=0.0, step_starts=[], vae_start=None)
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            # SDXL: an empty negative prompt is none (zero embeddings), as the runtime reads it (runtime/sdxl.py)
            sdxl_none = getattr(self.pipe, "text_encoder_2", None) is not None and s["negative"] == ""
            out = self.pipe([prompt] * b, negative_prompt=None if sdxl_none else [s["negative"]] * b,
                            num_inference_steps=s["steps"],
                            guidance_scale=s["guidance"], latents=lat, height=s["size"], width=s["size"],
                            output_type="np")
        self._sync()
        t_end = time.perf_counter()
        wall = t_end - t0
        images = np.asarray(out.images, dtype=np.float32)
        starts = self.rec["step_starts"]
        ends = starts[1:] + [self.rec["vae_start"] or t_end]
        steps = [e - a for a, e in zip(starts, ends)]
        stages = {"tokenize": self.rec["tokenize"], "text_encoder": self.rec["text_encoder"], "unet": float(sum(steps)),
                  "vae_decoder": self.rec["vae_decoder"]}
        stages["other"] = max(0.0, wall - sum(stages.values()))
        if req.get("image"):
            np.save(req["image"], images)
        return {"seconds": wall, "stages": stages, "step_seconds": steps, "peak_rss_bytes": _peak_rss()}

    def final(self) -> dict:
        gpu = None
        if self.device == "cuda":
            gpu = int(self.torch.cuda.max_memory_allocated())
        return {"peak_rss_bytes": _peak_rss(), "peak_gpu_allocated_bytes": gpu}

    def close(self) -> None:
        self.pipe = None
        if hasattr(self, "threads_before"):
            self.torch.set_num_threads(self.threads_before)


def _with_adapters(pipe, loras, decoder: str | None):
    """Fuse `loras` ((file, scale), sdedge's fuser: equal to the peft-adapted model, tests/test_fast_path.py) into the
    pipeline's weights and put the `decoder` folder's AutoencoderTiny in place of its VAE; returns the pipeline and
    what was done."""
    done = ""
    if loras:
        from sdedge.export.lora import fuse_loras

        fuse_loras(pipe, [(str(f), float(scale)) for f, scale in loras])
        done += ", LoRAs fused: " + ", ".join(f"{Path(f).name}:{scale:g}" for f, scale in loras)
    if decoder:
        from sdedge.export.decoder import decoder_pipeline, load_decoder

        vae, cfg = load_decoder(decoder, pipe)
        pipe = decoder_pipeline(pipe, vae)  # it divides the latents by this decoder's own scaling_factor
        done += f", decoder {cfg['_class_name']} from {Path(decoder).name}"
    return pipe, done


def _time_calls(obj, start, end) -> bool:
    """Make `obj(...)` call start() before and end() after (also on error), by giving obj a subclass of its
    own class with a timed __call__. False when the class refuses it (its time then lands in "other")."""
    base_cls = type(obj)
    import torch

    if isinstance(obj, torch.nn.Module):  # hooks: a swapped class loses transformers 5's output_hidden_states
        obj.register_forward_pre_hook(lambda *a: start())
        obj.register_forward_hook(lambda *a: end(), always_call=True)
        return True

    def call(this, *args, **kwargs):
        start()
        try:
            return base_cls.__call__(this, *args, **kwargs)
        finally:
            end()

    try:
        obj.__class__ = type(base_cls.__name__, (base_cls,), {"__call__": call})
    except TypeError:  # pragma: no cover - e.g. a class with __slots__ or a C type
        return False
    return True
