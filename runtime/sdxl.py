"""SDXL's text conditioning without PyTorch, as diffusers' StableDiffusionXLPipeline builds it.

    prompts ─► tokenizer   ─► text_encoder   ─► penultimate hidden states h1           (N, 77, D1)
            └► tokenizer_2 ─► text_encoder_2 ─► penultimate hidden states h2, pooled p  (N, 77, D2), (N, P)
    encoder_hidden_states = h1 ⊕ h2 (last axis)                                        (N, 77, D1 + D2)
    time_ids = original_size ⊕ crops_coords_top_left ⊕ target_size (each (height, width) / (top, left))  (N, 6)
    UNet extra inputs: text_embeds = p, time_ids                 N = 2B with guidance (negatives first), else B

An empty negative prompt (every one "") becomes zero embeddings and a zero pooled embedding when the bundle's
`force_zeros_for_empty_prompt` is set (SDXL's default), which is what diffusers does when no negative prompt is
given. original_size and target_size default to the generated (height, width), crops to (0, 0); the negative
time ids are the positive ones unless both negative_original_size and negative_target_size are given
(diffusers' rule). With those, diffusers orders its time ids [neg, pos] × B rather than neg × B ⊕ pos × B, so
only a batch of one matches it there; sdedge keeps each row with its own prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .errors import BadInput

Size = tuple[int, int]


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and crop conditioning, in pixels; None: the generated image's (height, width)."""

    original_size: Size | None = None
    crops_coords_top_left: Size = (0, 0)
    target_size: Size | None = None
    negative_original_size: Size | None = None
    negative_crops_coords_top_left: Size = (0, 0)
    negative_target_size: Size | None = None

    def __post_init__(self) -> None:
        for name in ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                     "negative_crops_coords_top_left", "negative_target_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if (not isinstance(value, (tuple, list)) or len(value) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 16384 for v in value)):
                raise BadInput(f"{name}={value!r}: must be two integers from 0 to 16384 ((height, width) or "
                               "(top, left) in pixels)")
            object.__setattr__(self, name, tuple(value))

    def time_ids(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(negative, positive) time ids, each (6,) float32."""
        size = (height, width)
        pos = (*(self.original_size or size), *self.crops_coords_top_left, *(self.target_size or size))
        if self.negative_original_size is not None and self.negative_target_size is not None:
            neg = (*self.negative_original_size, *self.negative_crops_coords_top_left, *self.negative_target_size)
        else:
            neg = pos
        return np.asarray(neg, dtype=np.float32), np.asarray(pos, dtype=np.float32)


class SdxlConditioning:
    """The conditioning strategy of an "sdxl" bundle (see runtime/conditioning.py for the interface)."""

    components = ("text_encoder", "text_encoder_2")

    def __init__(self, pipe):
        self.pipe = pipe
        manifest = pipe.manifest
        self.tokenizer_2 = pipe._tokenizer(manifest.tokenizer_2)
        self.force_zeros = manifest.sdxl.force_zeros_for_empty_prompt if manifest.sdxl is not None else True
        self.micro = MicroConditioning()

    def check(self, micro) -> None:
        if micro is not None and not isinstance(micro, MicroConditioning):
            raise BadInput(f"micro_conditioning must be a sdedge.runtime.sdxl.MicroConditioning, got "
                           f"{type(micro).__name__}")

    def _encode(self, prompts: list[str], timings: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """(hidden states h1 ⊕ h2 (N, 77, D1 + D2), pooled (N, P))."""
        pipe = self.pipe
        t0 = time.perf_counter()
        ids1, ids2 = pipe.tokenizer(prompts), self.tokenizer_2(prompts)  # (N, 77) each
        timings["tokenize"] = timings.get("tokenize", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        h1 = pipe._load("text_encoder").infer({"input_ids": ids1})[0]  # (N, 77, D1)
        pipe._release("text_encoder")
        h2, pooled = pipe._load("text_encoder_2").infer({"input_ids": ids2})[:2]  # (N, 77, D2), (N, P)
        pipe._release("text_encoder_2")
        timings["text_encoder"] = timings.get("text_encoder", 0.0) + time.perf_counter() - t0
        return np.concatenate([h1, h2], axis=-1), pooled

    def encode(self, prompts: list[str], negatives: list[str], do_cfg: bool, settings: dict,
               timings: dict[str, float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        batch = len(prompts)
        zero_negatives = do_cfg and self.force_zeros and all(n == "" for n in negatives)
        if do_cfg and not zero_negatives:
            hidden, pooled = self._encode(negatives + prompts, timings)  # (2B, 77, D), (2B, P)
        else:
            hidden, pooled = self._encode(prompts, timings)
            if do_cfg:  # zeros for the negative half, as diffusers with force_zeros_for_empty_prompt
                hidden = np.concatenate([np.zeros_like(hidden), hidden])
                pooled = np.concatenate([np.zeros_like(pooled), pooled])
        micro = settings.get("micro_conditioning") or self.micro
        neg, pos = micro.time_ids(settings["height"], settings["width"])
        rows = ([neg] * batch if do_cfg else []) + [pos] * batch
        time_ids = np.stack(rows).astype(np.float32)  # (2B or B, 6)
        return hidden.astype(np.float32), {"text_embeds": pooled.astype(np.float32), "time_ids": time_ids}
