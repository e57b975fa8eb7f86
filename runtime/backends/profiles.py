"""Shape profiles for engines that fix their shapes at build time (TensorRT).

`sdedge build-engines BUNDLE --shapes 512x512,768x768 --batch 1-4` names the image sizes and batch sizes an
engine must accept. A TensorRT optimisation profile gives each dynamic input a (min, opt, max) shape. This
module turns the user's sizes into those triples per component, checked against the shape range the bundle
was exported for (`manifest.shapes`): an engine cannot accept what the ONNX graph was not exported for.

    sizes  512x512,768x768      →  latent h, w: min 64×64, max 96×96, opt the first size (64×64)
    batch  1-4                  →  B: min 1, opt 1, max 4        (a single size and batch: a static profile)

`--batch` counts images per request. With guidance the UNet runs the guided batch (unconditional +
conditional: 2·B per call) and the text encoder encodes both prompts in one call, so their batch axis spans
min .. 2·max (opt 2·min; min stays B so that unguided calls fit too); the manifest's batch range counts model
calls, so 2·max must fit in it. Axis names are the ONNX graph's
(export/specs.py DYNAMIC_AXES): batch, latent_height, latent_width, height, width.

Pure NumPy-free Python: it runs (and is tested) on any machine; only building the engines needs the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BadInput
from ..manifest import Manifest

GUIDED = ("text_encoder", "text_encoder_2", "unet")  # components that see the guided batch (2 × images)


@dataclass(frozen=True)
class Profile:
    """One input's (min, opt, max) shapes; min == opt == max is a static shape."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def static(self) -> bool:
        return self.min == self.max


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"512x512,768x768" (width x height) -> [(512, 512), (768, 768)]."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        w, sep, h = part.lower().partition("x")
        if not (sep and w.isdigit() and h.isdigit()) or int(w) <= 0 or int(h) <= 0:
            raise BadInput(f"--shapes {text!r}: {part!r} is not WIDTHxHEIGHT (e.g. 512x512,768x768)")
        sizes.append((int(w), int(h)))
    return sizes


def parse_batch(text: str) -> tuple[int, int]:
    """"1-4" -> (1, 4); "2" -> (2, 2)."""
    lo, sep, hi = text.strip().partition("-")
    hi = hi if sep else lo
    if not (lo.isdigit() and hi.isdigit()) or not 1 <= int(lo) <= int(hi):
        raise BadInput(f"--batch {text!r}: give a size or a range MIN-MAX with 1 <= MIN <= MAX (e.g. 1-4)")
    return int(lo), int(hi)


def check_sizes(manifest: Manifest, sizes: list[tuple[int, int]], batch: tuple[int, int]) -> None:
    """Refuse what the bundle's ONNX graphs were not exported for, naming the limit."""
    s = manifest.shapes
    for w, h in sizes:
        if w % s.pixel_multiple or h % s.pixel_multiple:
            raise BadInput(f"--shapes {w}x{h}: width and height must be multiples of {s.pixel_multiple} "
                           f"for this bundle")
        if not (s.width_min <= w <= s.width_max and s.height_min <= h <= s.height_max):
            raise BadInput(f"--shapes {w}x{h}: this bundle was exported for widths {s.width_min}–{s.width_max} and "
                           f"heights {s.height_min}–{s.height_max}; re-export with --size-range to go beyond")
    if not (s.batch_min <= batch[0] and 2 * batch[1] <= s.batch_max):
        raise BadInput(f"--batch {batch[0]}-{batch[1]}: with guidance {batch[1]} images run {2 * batch[1]} through the "
                       f"UNet, and this bundle was exported for model batches {s.batch_min}–{s.batch_max}; re-export "
                       f"with --batch {s.batch_min}-{2 * batch[1]} to go beyond")


def engine_profiles(manifest: Manifest, sizes: list[tuple[int, int]],
                    batch: tuple[int, int]) -> dict[str, dict[str, Profile]]:
    """component -> input name -> Profile, for every component of the bundle. The first size is the one the
    engine is tuned for (opt); the batch opt is the smallest batch (one image per request is the edge case)."""
    if not sizes:
        raise BadInput("--shapes: give at least one WIDTHxHEIGHT")
    check_sizes(manifest, sizes, batch)
    f = manifest.latent.vae_scale_factor
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    (opt_w, opt_h) = sizes[0]
    pixel = {"height": (min(heights), opt_h, max(heights)), "width": (min(widths), opt_w, max(widths))}
    dims = dict(pixel, latent_height=tuple(v // f for v in pixel["height"]),
                latent_width=tuple(v // f for v in pixel["width"]))
    profiles: dict[str, dict[str, Profile]] = {}
    for name, comp in manifest.components.items():
        k = 2 if name in GUIDED else 1
        axis = dict(dims, batch=(batch[0], k * batch[0], k * batch[1]))
        profiles[name] = {}
        for t in comp.inputs:
            triple = [[], [], []]
            for d in t.shape:
                for i in range(3):
                    if isinstance(d, int):
                        triple[i].append(d)
                    elif d in axis:
                        triple[i].append(axis[d][i])
                    else:
                        raise BadInput(f"{name}: input {t.name!r} has a dynamic axis {d!r} that no profile sets")
            profiles[name][t.name] = Profile(*(tuple(x) for x in triple))
    return profiles


def profile_table(profiles: dict[str, dict[str, Profile]]) -> list[tuple[str, str, str, str, str]]:
    """Rows (component, input, min, opt, max) for printing."""
    def fmt(s: tuple[int, ...]) -> str:
        return "×".join(map(str, s))

    return [(c, n, fmt(p.min), fmt(p.opt), fmt(p.max)) for c, ins in profiles.items() for n, p in ins.items()]
