"""Text conditioning strategies: prompts in, the UNet's conditioning out, one per bundle pipeline.

`make_conditioning(pipeline)` picks one by the manifest's `pipeline`:
- "sd15": `TextConditioning`, one CLIP text encoder's last hidden states (this module);
- "sdxl": `sdedge.runtime.sdxl.SdxlConditioning`, two text encoders, the pooled embedding and the micro-conditioning.

Each has `components` (the engines it runs, loaded up front with memory="normal"), `check(micro)` (its keyword
options, refused where they do not apply) and `encode(prompts, negatives, do_cfg, settings, timings)` returning
`(encoder_hidden_states, extra UNet inputs)`: the denoising loop of runtime/pipeline.py is the same for both.
`runs_guidance(guidance)`: whether the negative prompts run at all (guidance > 1).
"""

from __future__ import annotations

import time

import numpy as np

from .errors import BadInput


def runs_guidance(guidance: float) -> bool:
    """Whether a generation at this guidance runs classifier-free guidance: the negative prompts encoded and their
    UNet pass beside the positive one (batch 2B), ε = u + guidance · (c − u). At guidance <= 1 it runs no guidance
    pass (batch B, ε = c), as diffusers' `do_classifier_free_guidance`. The one statement of that rule: the
    pipeline, the export's gates and the benchmarks ask it (this module imports NumPy alone, so they stay light)."""
    return guidance > 1.0


def guide(uncond: np.ndarray, cond: np.ndarray, guidance: float) -> np.ndarray:
    """ε = u + guidance · (c − u): classifier-free guidance of the negative (u) and positive (c) predictions; the
    pipeline's step and the export's gates (export/gates.py `guided`) both compute it here."""
    return uncond + guidance * (cond - uncond)


class TextConditioning:
    """SD 1.5: `text_encoder(tokenizer(negatives ⊕ prompts))`, no extra UNet inputs."""

    components = ("text_encoder",)

    def __init__(self, pipe):
        self.pipe = pipe

    def check(self, micro) -> None:
        if micro is not None:
            raise BadInput(f"micro-conditioning (original_size, crops_coords_top_left, target_size) is SDXL's; "
                           f"this bundle's pipeline is {self.pipe.manifest.pipeline}")

    def encode(self, prompts: list[str], negatives: list[str], do_cfg: bool, settings: dict,
               timings: dict[str, float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        pipe = self.pipe
        t0 = time.perf_counter()
        ids = pipe.tokenizer((negatives + prompts) if do_cfg else prompts)  # (2B or B, 77)
        timings["tokenize"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        embeddings = pipe._load("text_encoder").infer({"input_ids": ids})[0]  # (2B, 77, D)
        pipe._release("text_encoder")
        timings["text_encoder"] = time.perf_counter() - t0
        return embeddings, {}


def make_conditioning(pipe):
    """The strategy for the bundle's pipeline (the manifest's `pipeline` field)."""
    kind = pipe.manifest.pipeline
    if kind == "sdxl":
        from .sdxl import SdxlConditioning

        return SdxlConditioning(pipe)
    if kind == "sd15":
        return TextConditioning(pipe)
    raise BadInput(f"this sdedge cannot run a {kind!r} pipeline")
