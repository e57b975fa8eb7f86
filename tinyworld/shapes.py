"""The procedural world of the trained tiny base: one coloured shape on a plain background, 64×64.

Captions read "a red circle on a blue background". The built-in `tiny` base is trained on the base colours;
`NEW_COLOUR` ("purple") is held out so that a LoRA can teach it something it never saw (the quickstart does).

- `render(shape, colour, background, rng)` draws one image (anti-aliased by drawing at 4× and downsampling,
  with a little jitter of position, size and colour);
- `caption(...)` / `parse_caption(text)` go between a scene and its words;
- `sample_scenes(rng, n, colours)` draws scenes whose shape colour differs from the background;
- `write_dataset(out_dir, n, colours, seed)` writes PNG + .txt pairs, the layout `sdedge prepare` reads.

NumPy and Pillow only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES", "COLOURS", "BASE_COLOURS", "NEW_COLOUR", "ALL_COLOURS", "SIZE", "Scene",
    "render", "caption", "parse_caption", "sample_scenes", "render_batch", "write_dataset", "vocabulary",
]

SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "purple": (140, 50, 190),
}
NEW_COLOUR = "purple"
BASE_COLOURS = tuple(c for c in COLOURS if c != NEW_COLOUR)
ALL_COLOURS = tuple(COLOURS)
_CAPTION = re.compile(r"^\s*an? (\w+) (\w+) on an? (\w+) background\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes, or None when it is not one of this world's captions."""
    m = _CAPTION.match(text)
    if not m:
        return None
    colour, shape, background = (g.lower() for g in m.groups())
    if shape not in SHAPES or colour not in COLOURS or background not in COLOURS:
        return None
    return Scene(shape, colour, background)


def vocabulary() -> tuple[str, ...]:
    """Every word a caption of this world uses (for the tiny base's small tokenizer)."""
    return ("a", "an", "on", "background", *SHAPES, *ALL_COLOURS)


def sample_scenes(rng: np.random.Generator, n: int, colours=BASE_COLOURS, backgrounds=None) -> list[Scene]:
    """n random scenes (backgrounds from the base colours unless given); the shape's colour differs from the
    background's."""
    backgrounds = tuple(backgrounds) if backgrounds is not None else BASE_COLOURS
    out = []
    while len(out) < n:
        s = SHAPES[rng.integers(len(SHAPES))]
        c = colours[rng.integers(len(colours))]
        b = backgrounds[rng.integers(len(backgrounds))]
        if c != b:
            out.append(Scene(s, c, b))
    return out


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in rgb)  # type: ignore[return-value]


def render(scene: Scene, rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """One anti-aliased RGB image of the scene, with jittered position, size and colours."""
    k = 4  # drawn at 4× then downsampled: smooth edges
    big = size * k
    img = Image.new("RGB", (big, big), _jitter(COLOURS[scene.background], rng))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.19, 0.30) * big  # half the shape's extent
    cx = big / 2 + rng.uniform(-0.12, 0.12) * big
    cy = big / 2 + rng.uniform(-0.12, 0.12) * big
    fill = _jitter(COLOURS[scene.colour], rng)
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif scene.shape == "triangle":
        h = r * 1.1
        draw.polygon([(cx, cy - h), (cx - h, cy + h * 0.8), (cx + h, cy + h * 0.8)], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; this world has {', '.join(SHAPES)}")
    return img.resize((size, size), Image.Resampling.LANCZOS)


def render_batch(scenes: list[Scene], rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Images of the scenes as uint8, shape (N, size, size, 3)."""
    return np.stack([np.asarray(render(s, rng, size)) for s in scenes])


def write_dataset(out_dir: str | os.PathLike, n: int, colours=BASE_COLOURS, seed: int = 0,
                  backgrounds=None) -> Path:
    """Write n images with captions (`0000.png` + `0000.txt`, ...) into out_dir; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, scene in enumerate(sample_scenes(rng, n, colours, backgrounds)):
        render(scene, rng).save(out / f"{i:04d}.png")
        (out / f"{i:04d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
    return out
