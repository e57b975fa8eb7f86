"""Image metrics of the bench: PSNR, SSIM, CLIP score, and the summary statistics of a list of times."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdedge.runtime.errors import BadInput

from .suite import BenchError

PSNR_CAP = 999.0


# == image metrics ==========================================================================================
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two float images in [0, 1]; identical images give PSNR_CAP (JSON has no infinity)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10.0 * float(np.log10(1.0 / mse)))


def _gaussian(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _filter(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of (H, W, ...) by the 1-D window w on both axes."""
    k = len(w)
    h, wd = img.shape[:2]
    rows = sum(w[i] * img[i : h - k + 1 + i] for i in range(k))
    return sum(w[i] * rows[:, i : wd - k + 1 + i] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004) of two images (H, W) or (H, W, C) in [0, data_range].

    Gaussian window 11×11 with σ = 1.5 (smaller for images under 11 px), 'valid' filtering, K1 = 0.01,
    K2 = 0.03, computed per channel and averaged. Identical images give exactly 1.0.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise BadInput(f"ssim: images of different shapes {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    size = min(11, a.shape[0], a.shape[1])
    size -= 1 - size % 2  # odd
    w = _gaussian(size, 1.5 * size / 11)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter(a, w), _filter(b, w)
    s_aa = _filter(a * a, w) - mu_a * mu_a
    s_bb = _filter(b * b, w) - mu_b * mu_b
    s_ab = _filter(a * b, w) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (s_aa + s_bb + c2)
    return float(np.mean(num / den))


def summarize(values) -> dict[str, float] | None:
    """min / median / p95 (linear interpolation) / max / mean of a list of numbers; None when empty."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return None
    return {"n": int(v.size), "min": float(v.min()), "median": float(np.median(v)),
            "p95": float(np.percentile(v, 95)), "max": float(v.max()), "mean": float(v.mean())}



def clip_scores(model_dir: str | Path, images: dict[str, list[np.ndarray]], prompts: list[str]) -> dict[str, list[float]]:
    """CLIP score 100 · max(cos(image embedding, prompt embedding), 0) of each image (per engine, per run, per
    image in the batch) with a local CLIP model folder (transformers' CLIPModel + its processor)."""
    try:
        import torch
        from PIL import Image
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as exc:
        raise BenchError(f"the CLIP score needs torch and transformers ({exc})") from None
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - an older transformers
        pass
    try:
        model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a skip with its reason
        raise BenchError(f"cannot load the CLIP model at {model_dir}: {exc}") from None
    out: dict[str, list[float]] = {}
    for name, runs in images.items():
        pil, texts = [], []
        for r, batch in enumerate(runs):
            for img in batch:
                pil.append(Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)))
                texts.append(prompts[r])
        with torch.no_grad():
            inputs = processor(text=texts, images=pil, return_tensors="pt", padding=True, truncation=True)
            res = model(**inputs)
            a = torch.nn.functional.normalize(res.image_embeds, dim=-1)
            b = torch.nn.functional.normalize(res.text_embeds, dim=-1)
            cos = (a * b).sum(-1)
        out[name] = [float(100 * max(c, 0.0)) for c in cos.tolist()]
    return out


