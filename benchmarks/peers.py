"""Peers: the Stable Diffusion pipelines a CPU user would pick instead of sdedge, measured in the same bench run.

    optimum-onnxruntime   optimum's ORTStableDiffusionPipeline (package optimum-onnx), CPUExecutionProvider
    optimum-openvino      optimum-intel's OVStableDiffusionPipeline, reshaped to static shapes and compiled
    diffusers             diffusers' eager pipeline (sdedge's own venv), with LoRAs fused and a light decoder: the
                          fair few-step peer of a fast bundle

Each optimum peer runs in a child process started with its own virtual environment's interpreter (their pins conflict with
sdedge's and with each other's: benchmarks/peer-envs/README.md makes them). sdedge is installed there with
--no-deps, so the child speaks the bench's worker protocol (sdedge.benchmarks.worker_process) and this module only
opens the pipeline: the run, the stage timing and the initial latents are the reference worker's, since both
peers subclass diffusers' StableDiffusionPipeline (same `latents=`, `output_type="np"`, same scheduler object).
"""

from __future__ import annotations

import re
from pathlib import Path

from sdedge.runtime.conditioning import runs_guidance
from sdedge.runtime.environment import package_versions

from .suite import BenchError
from .workers import _DiffusersWorker


class PeerWorker(_DiffusersWorker):
    """A peer's pipeline from its own exported folder (spec: kind, model, threads, static_shapes)."""

    def _open(self):
        kind, model, threads = self.spec["kind"], self.spec["model"], self.spec["threads"]
        self.dtype = self.torch.float32  # the latents handed to the pipeline; the peer casts them itself
        if kind == "diffusers":  # diffusers' eager pipeline in sdedge's own venv (LoRAs, decoder: workers.py)
            pipe, info = super()._open()
            return pipe, {**info, "backend_reason": "peer: diffusers' eager pipeline" + info["backend_reason"].removeprefix(
                "the PyTorch reference")}
        try:
            if kind == "optimum-onnxruntime":
                return self._open_onnxruntime(model, threads)
            if kind == "optimum-openvino":
                return self._open_openvino(model, threads)
        except ImportError as exc:
            raise BenchError(f"peer {kind}: {exc}. Its interpreter must be the peer's own venv "
                             "(benchmarks/peer-envs/README.md)") from None
        raise BenchError(f"unknown peer kind {kind!r}")

    def _open_onnxruntime(self, model: str, threads: int):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        pipe = ORTStableDiffusionPipeline.from_pretrained(model, provider="CPUExecutionProvider", session_options=so)
        return pipe, {"backend": f"optimum-onnx {_version('optimum-onnx')} / onnxruntime {ort.__version__}",
                      "backend_reason": "peer: optimum's ORTStableDiffusionPipeline, CPUExecutionProvider",
                      "precision": "fp32"}

    def _open_openvino(self, model: str, threads: int):
        import openvino as ov
        from optimum.intel import OVStableDiffusionPipeline

        config = {"INFERENCE_NUM_THREADS": str(threads)}
        pipe = OVStableDiffusionPipeline.from_pretrained(model, compile=False, ov_config=config)
        s = self.settings
        if self.spec.get("static_shapes", True):
            # (batch, images per prompt): the doubled batch of guidance is the pipeline's own business
            pipe.reshape(batch_size=s["batch"], height=s["size"], width=s["size"], num_images_per_prompt=1)
            if not runs_guidance(s["guidance"]):
                _unguided_unet_batch(pipe.unet.model, s["batch"])
        pipe.compile()
        precision = _ov_precision(model)
        ov_version = ov.__version__.split("-")[0]  # "2026.4.1-22982-e213a14...-releases/..." → "2026.4.1"
        return pipe, {"backend": f"optimum-intel {_version('optimum-intel')} / openvino {ov_version}",
                      "backend_reason": (f"peer: optimum-intel's OVStableDiffusionPipeline, "
                                         f"{'static' if self.spec.get('static_shapes', True) else 'dynamic'} shapes, "
                                         f"{precision} as exported"),
                      "precision": precision}


def _unguided_unet_batch(model, batch: int) -> None:
    """optimum-intel's static reshape gives the UNet the doubled batch of guidance (unless it has a `timestep_cond`
    input, as an LCM-distilled UNet does); with an LCM-LoRA fused and guidance 1 its pipeline calls the UNet with
    the prompt's batch alone, which that shape refuses. So those inputs are reshaped back to `batch`."""
    shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        if shape.rank.is_static and shape.rank.get_length() > 0 and shape[0].is_static and \
                shape[0].get_length() == 2 * batch:
            shape[0] = batch
        shapes[port] = shape
    model.reshape(shapes)


def _ov_precision(model: str) -> str:
    """What the exported UNet's IR stores its weights as, read from its constants' element types: u8/i8
    constants are optimum-intel's int8 weight compression (`--weight-format int8`, with f16 scales)."""
    try:
        xml = (Path(model) / "unet" / "openvino_model.xml").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "fp32"
    types = set(re.findall(r'element_type="([a-z0-9]+)"', xml))
    if types & {"u8", "i8", "u4", "i4"}:
        return "int8-weights" if types & {"u8", "i8"} else "int4-weights"
    return "fp16" if "f16" in types and "f32" not in types else "fp32"


def _version(dist: str) -> str:
    return package_versions([dist]).get(dist, "?")
