"""Exact and near-duplicate detection for `sdedge prepare`.

- Exact: the same decoded pixels (SHA-256 of the prepared image's RGB bytes).
- Near: a perceptual hash (pHash: the signs of the 8x8 lowest DCT frequencies of a 32x32 thumbnail against
  their median, the construction of the `imagehash` package, in NumPy) of each of R, G and B, so a recoloured
  picture is not a duplicate: 192 bits, similarity = 1 - Hamming distance / 192. Two images are duplicates
  when similarity >= the threshold.
- With a local CLIP model (`--clip-model DIR`, a transformers folder with a vision tower and an image
  processor config), also when the cosine of their CLIP image embeddings >= the threshold.

The first image (in sorted source order) of each group is kept; the others are reported with the image they
duplicate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdedge.runtime.errors import SdedgeError

__all__ = ["PHASH_BITS", "phash", "phash_similarity", "pixel_sha256", "Duplicate", "find_duplicates", "clip_embeddings"]

_N = 32
_DCT = np.cos(np.pi * (2 * np.arange(_N)[None, :] + 1) * np.arange(_N)[:, None] / (2 * _N))  # DCT-II basis


PHASH_BITS = 192


def phash(image) -> int:
    """192-bit perceptual hash of a PIL image (64 bits per RGB channel)."""
    from PIL import Image

    thumb = np.asarray(image.convert("RGB").resize((_N, _N), Image.Resampling.LANCZOS), dtype=np.float64)
    bits = []
    for c in range(3):
        low = (_DCT @ thumb[:, :, c] @ _DCT.T)[:8, :8]
        bits += (low > np.median(low)).flatten().tolist()
    return int("".join("1" if b else "0" for b in bits), 2)


def phash_similarity(a: int, b: int) -> float:
    return 1.0 - bin(a ^ b).count("1") / PHASH_BITS


def pixel_sha256(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


@dataclass(frozen=True)
class Duplicate:
    index: int  # the dropped image
    of: int  # the kept image it duplicates
    how: str  # "exact", "phash" or "clip"
    similarity: float


def find_duplicates(pixel_hashes: list[str], phashes: list[int], threshold: float,
                    embeddings: np.ndarray | None = None) -> list[Duplicate]:
    """Duplicates among images given in keep-priority order; each is matched against the kept ones only."""
    kept: list[int] = []
    dups: list[Duplicate] = []
    by_pixels: dict[str, int] = {}
    for i, (ph, h) in enumerate(zip(pixel_hashes, phashes)):
        if ph in by_pixels:
            dups.append(Duplicate(i, by_pixels[ph], "exact", 1.0))
            continue
        match = None
        for k in kept:
            s = phash_similarity(h, phashes[k])
            if s >= threshold:
                match = Duplicate(i, k, "phash", s)
                break
        if match is None and embeddings is not None and kept:
            cos = embeddings[kept] @ embeddings[i]
            j = int(np.argmax(cos))
            if cos[j] >= threshold:
                match = Duplicate(i, kept[j], "clip", float(cos[j]))
        if match is not None:
            dups.append(match)
            continue
        by_pixels[ph] = i
        kept.append(i)
    return dups


def clip_embeddings(model_dir: str | Path, images: list, batch: int = 16) -> np.ndarray:
    """L2-normalised CLIP image embeddings (N, D) from a local transformers CLIP folder, offline."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SdedgeError(f"--clip-model {model_dir}: not a folder (a local CLIP model in transformers' layout)")
    try:
        import torch
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    except ImportError as e:  # pragma: no cover - the train extra brings them
        raise SdedgeError(f"--clip-model needs torch and transformers (pip install 'sdedge[train]'): {e}") from e
    try:
        processor = CLIPImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
        model = CLIPVisionModelWithProjection.from_pretrained(str(model_dir), local_files_only=True).eval()
    except Exception as e:
        raise SdedgeError(f"--clip-model {model_dir}: cannot load a CLIP vision model and image processor: {e}") from e
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            inputs = processor(images=images[start:start + batch], return_tensors="pt")
            emb = model(pixel_values=inputs["pixel_values"]).image_embeds.float()
            out.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)
