"""Reading untrusted images safely and shaping them for training.

- `open_image(path, max_pixels)`: JPEG, PNG or WebP only; Pillow's decompression-bomb limit stays on (its
  warning is an error here, and `max_pixels` can only lower the limit); the EXIF orientation is applied, then
  every piece of metadata (EXIF, ICC, text chunks) is dropped: the result is built from the pixels alone.
  Problems raise `ImageSkip` with the reason for the report.
- `fit(image, width, height)`: resize to cover, then centre-crop.
- `bucket_sizes(resolution)`, `nearest_bucket(w, h, buckets)`: aspect-ratio buckets of about resolution² pixels.
- `augment(image, kind, rng)`: flip, rotate (small angle, cropped to stay inside the picture) or brightness.
"""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path

__all__ = ["ImageSkip", "READ_FORMATS", "open_image", "fit", "bucket_sizes", "nearest_bucket", "augment",
           "AUGMENTS"]

READ_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP"}
AUGMENTS = ("flip", "rotate", "brightness")


class ImageSkip(Exception):
    """An input file that is not used; the message is the reason shown in the report."""


def open_image(path: Path, max_pixels: int | None = None):
    """A clean RGB `PIL.Image` of `path`, or `ImageSkip` with the reason."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if Image.MAX_IMAGE_PIXELS is None:  # someone switched the guard off in this process: switch it back on
        Image.MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else min(int(max_pixels), Image.MAX_IMAGE_PIXELS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt = im.format
                if fmt not in READ_FORMATS:
                    raise ImageSkip(f"unsupported image format {fmt} (JPEG, PNG and WebP are read)")
                w, h = im.size
                if w * h > limit:
                    raise ImageSkip(f"{w}x{h} = {w * h} pixels exceeds the decompression-bomb limit of {limit}")
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im)
    except ImageSkip:
        raise
    except UnidentifiedImageError:
        raise ImageSkip("not an image (Pillow cannot identify it)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageSkip(f"decompression-bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise ImageSkip(f"corrupt image: {e}") from None
    # Rebuild from the raw pixels: nothing of the source's metadata (EXIF, GPS, ICC, XMP, text) survives.
    return Image.frombytes("RGB", rgb.size, rgb.tobytes()), READ_FORMATS[fmt]


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def fit(image, width: int, height: int):
    """Resize (Lanczos) so the image covers width x height, then crop the centre."""
    from PIL import Image

    w, h = image.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    resized = image.resize((nw, nh), Image.Resampling.LANCZOS) if (nw, nh) != (w, h) else image
    left, top = (nw - width) // 2, (nh - height) // 2
    return resized.crop((left, top, left + width, top + height))


def bucket_sizes(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, with at most resolution² pixels and aspect ratio within
    1/max_ratio..max_ratio; the square bucket is always among them."""
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    w = step
    while w <= resolution * max_ratio:
        h = (area // w) // step * step
        if h >= step and 1 / max_ratio <= w / h <= max_ratio:
            sizes.add((w, h))
            sizes.add((h, w))
        w += step
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def augment(image, kind: str, rng: random.Random):
    """One augmented copy of an already fitted image, the same size."""
    from PIL import Image, ImageEnhance, ImageOps

    if kind == "flip":
        return ImageOps.mirror(image)
    if kind == "rotate":
        angle = rng.uniform(4.0, 10.0) * rng.choice((-1, 1))
        w, h = image.size
        rotated = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)
        # The largest centred rectangle of the same aspect with no blank corners, scaled back up.
        a = math.radians(abs(angle))
        shrink = 1.0 / (math.cos(a) + math.sin(a) * max(w / h, h / w))
        cw, ch = max(1, int(w * shrink)), max(1, int(h * shrink))
        left, top = (w - cw) // 2, (h - ch) // 2
        return rotated.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.LANCZOS)
    if kind == "brightness":
        factor = rng.uniform(0.8, 0.92) if rng.random() < 0.5 else rng.uniform(1.08, 1.2)
        return ImageEnhance.Brightness(image).enhance(factor)
    raise ValueError(f"unknown augmentation {kind!r}")
