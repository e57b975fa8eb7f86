"""How well images of the shapes world match their prompts: a stand-in for CLIP score on the trained tiny base.

A small CNN, trained by `scripts/train_tiny_base.py` on rendered scenes (every colour, the held-out one too) and
shipped as `tinyworld/data/shape-classifier.safetensors`, reads an image's shape, shape colour and background colour.

- `ShapeClassifier`: the network; `features(x)` is its pooled 128-d penultimate layer.
- `load_classifier()`: the shipped weights, SHA-256 checked against `tiny-base.json`.
- `match_rate(images, prompts)`: the share of images whose shape, colour and background all match the prompt.
- `kid(features_a, features_b)`: kernel inception distance (unbiased MMD², cubic polynomial kernel) on the
  classifier's features, a FID/KID for this domain; `real_features(prompts)` renders the real side.
- `score_engines(images, prompts)`: both figures per engine, for `sdedge bench` on the tiny base.
- `bundle_prompt_match(bundle_dir)`: a bundle's match rate on 30 of the 90 base captions, for `sdedge export`.

Images go in as uint8 arrays (N, H, W, 3) or PIL images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from sdedge.tinyworld.shapes import ALL_COLOURS, SHAPES, parse_caption

__all__ = [
    "ShapeClassifier", "load_classifier", "predict", "match_rate", "image_features", "kid", "to_tensor", "HEADS",
    "real_features", "score_engines", "prompt_hits", "base_captions", "bundle_prompt_match",
]

HEADS = {"shape": SHAPES, "colour": ALL_COLOURS, "background": ALL_COLOURS}
CLASSIFIER_FILE = "shape-classifier.safetensors"


class ShapeClassifier(nn.Module):
    """Four strided 3×3 conv blocks (64 → 4 px), average- and max-pooled into 128 features, three heads."""

    def __init__(self):
        super().__init__()
        chans = (3, 32, 64, 64, 64)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (B, 64, H/16, W/16)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)  # (B, 128)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def to_tensor(images) -> torch.Tensor:
    """uint8 (N, H, W, 3) or PIL images → float (N, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if arr.shape[1:3] != (64, 64):
        from PIL import Image

        arr = np.stack([np.asarray(Image.fromarray(a).resize((64, 64), Image.Resampling.BILINEAR)) for a in arr])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (N, 3, 64, 64)


def load_classifier():
    """The shipped classifier, in eval mode (SHA-256 of its file checked)."""
    from safetensors.torch import load_file

    from sdedge.tinyworld.base import packaged_file

    model = ShapeClassifier()
    model.load_state_dict(load_file(str(packaged_file(CLASSIFIER_FILE))))
    return model.eval()


def predict(model, images) -> dict[str, list[str]]:
    """The classifier's reading of each image: {"shape": [...], "colour": [...], "background": [...]}."""
    with torch.no_grad():
        logits = model(to_tensor(images))
    return {k: [HEADS[k][i] for i in logits[k].argmax(1).tolist()] for k in HEADS}


def image_features(model, images) -> np.ndarray:
    with torch.no_grad():
        return model.features(to_tensor(images)).numpy().astype(np.float64)


def prompt_hits(model, images, prompts: Sequence[str]) -> list[float]:
    """1.0 for each image whose shape, shape colour and background colour all match its prompt, else 0.0."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    scenes = [parse_caption(p) for p in prompts]
    bad = [p for p, s in zip(prompts, scenes) if s is None]
    if bad:
        raise ValueError(f"not a prompt of the shapes world: {bad[0]!r} (e.g. 'a red circle on a blue background')")
    pred = predict(model, images)
    return [float(pred["shape"][i] == s.shape and pred["colour"][i] == s.colour and pred["background"][i] == s.background)
            for i, s in enumerate(scenes)]


def match_rate(model, images, prompts: Sequence[str]) -> float:
    """Share of images whose shape, shape colour and background colour all match their prompt."""
    return float(np.mean(prompt_hits(model, images, prompts)))


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² with the kernel k(x, y) = (x·y / d + 1)³ (KID), between two feature sets (N, d), (M, d)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"KID needs two (N≥2, d) feature sets, got {a.shape} and {b.shape}")
    d = a.shape[1]
    kaa, kbb, kab = ((x @ y.T / d + 1.0) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    n, m = len(a), len(b)
    return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                 - 2.0 * kab.mean())


def real_features(model, prompts: Sequence[str], per_prompt: int = 4, seed: int = 0) -> np.ndarray:
    """Classifier features of freshly rendered images of these prompts (the "real" side of a KID)."""
    from sdedge.tinyworld.shapes import render

    rng = np.random.default_rng(seed)
    scenes = [parse_caption(p) for p in prompts for _ in range(per_prompt)]
    return image_features(model, [np.asarray(render(s, rng)) for s in scenes])


def score_engines(images: dict[str, list[np.ndarray]], prompts: Sequence[str]) -> dict | None:
    """Prompt-match rate and KID per engine for a bench whose prompts are all shapes-world captions.

    images: engine name → one array per run, (batch, H, W, 3) uint8 or float in [0, 1]; prompts: one per run.
    Returns None when a prompt is not a shapes-world caption (the scores would mean nothing).
    """
    if not prompts or any(parse_caption(p) is None for p in prompts):
        return None
    model = load_classifier()
    out: dict = {"engines": {}}
    for name, runs in images.items():
        flat, flat_prompts = [], []
        for run, prompt in zip(runs, prompts):
            arr = np.asarray(run)
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
            flat += list(arr)
            flat_prompts += [prompt] * len(arr)
        hits = prompt_hits(model, flat, flat_prompts)
        value = None
        if len(flat) >= 2:
            value = kid(image_features(model, flat), real_features(model, flat_prompts))
        out["engines"][name] = {"prompt_match": {"rate": float(np.mean(hits)), "per_image": hits}, "kid": value}
    out["real_images_per_image"] = 4
    return out


def base_captions() -> list[str]:
    """The 90 captions of the tiny base's world: every shape, in every base colour, on every other base colour."""
    from sdedge.tinyworld.shapes import BASE_COLOURS, caption

    return [caption(s, c, b) for s in SHAPES for c in BASE_COLOURS for b in BASE_COLOURS if c != b]


def bundle_prompt_match(bundle_dir, every: int = 3, seed: int = 0) -> tuple[float, int, int]:
    """(match rate, prompts, seed) of a tiny-base bundle on every `every`-th base caption, one image each at the
    bundle's defaults: the prompt-match gate `sdedge export` records for the trained tiny base."""
    from sdedge.runtime.pipeline import Pipeline, to_uint8

    prompts = base_captions()[::every]
    pipe = Pipeline.load(bundle_dir, verify="off")  # a staging folder: not signed yet
    try:
        images = [to_uint8(pipe.generate(p, seed=seed + i).images)[0] for i, p in enumerate(prompts)]
    finally:
        pipe.close()
    return match_rate(load_classifier(), images, prompts), len(prompts), seed
