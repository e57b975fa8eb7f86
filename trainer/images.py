"""Reading untrusted images safely and shaping them for training.

- `open_image(path, max_pixels, background)`: JPEG, PNG, TIFF or WebP only (no other Pillow decoder is even
  tried); Pillow's decompression-bomb limit stays on (its warning is an error here, and `max_pixels` can only
  lower the limit); the EXIF orientation is applied; 16-bit and float pixels (modes I;16, I;16B, I, F) are
  scaled to 8 bits by the range of the mode (not clipped); an embedded ICC profile (and CMYK) is converted to
  sRGB with LittleCMS (PIL.ImageCms); transparency (alpha, palette or tRNS colour keys, premultiplied RGBa) is
  composited on `background`. Then every piece of metadata (EXIF, ICC, text chunks) is dropped: the result is
  built from the pixels alone. Problems raise `ImageSkip` with the reason for the report.
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

READ_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "TIFF": "TIFF", "WEBP": "WebP"}
READ_NAMES = "JPEG, PNG, TIFF and WebP"
_DECODERS = ["JPEG", "PNG", "TIFF", "WEBP"]  # the only Pillow plugins tried (the JPEG one also opens MPO)
# What a refused file is, told from its first bytes (the decoders of these formats are never run).
_MAGIC = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"),
          (b"icns", "ICNS"), (b"qoif", "QOI"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"DDS ", "DDS"))
_HEIF_BRANDS = (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"hevc")
AUGMENTS = ("flip", "rotate", "brightness")


class ImageSkip(Exception):
    """An input file that is not used; the message is the reason shown in the report."""


def open_image(path: Path, max_pixels: int | None = None, background: tuple[int, int, int] = (255, 255, 255)):
    """A clean RGB `PIL.Image` of `path`, or `ImageSkip` with the reason."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if Image.MAX_IMAGE_PIXELS is None:  # someone switched the guard off in this process: switch it back on
        Image.MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else min(int(max_pixels), Image.MAX_IMAGE_PIXELS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=_DECODERS) as im:
                fmt = im.format
                if fmt not in READ_FORMATS:
                    raise ImageSkip(f"unsupported image format {fmt} ({READ_NAMES} are read)")
                w, h = im.size
                if w * h > limit:
                    raise ImageSkip(f"{w}x{h} = {w * h} pixels exceeds the decompression-bomb limit of {limit}")
                im.load()
                icc = im.info.get("icc_profile")
                im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im, icc, background)
    except ImageSkip:
        raise
    except UnidentifiedImageError:
        other = _sniff(path)
        if other:
            raise ImageSkip(f"unsupported image format {other} ({READ_NAMES} are read)") from None
        raise ImageSkip("not an image (Pillow cannot identify it)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageSkip(f"decompression-bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise ImageSkip(f"corrupt image: {e}") from None
    # Rebuild from the raw pixels: nothing of the source's metadata (EXIF, GPS, ICC, XMP, text) survives.
    return Image.frombytes("RGB", rgb.size, rgb.tobytes()), READ_FORMATS[fmt]


def _sniff(path: Path) -> str | None:
    """The name of a refused image format, from the file's first bytes; None when it is none of them."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "AVIF" if head[8:12] == b"avif" else "HEIF"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _to_rgb(im, icc: bytes | None, background: tuple[int, int, int]):
    """8-bit sRGB of any mode Pillow decodes: deep pixels scaled, the ICC profile applied, alpha composited."""
    from PIL import Image

    im = _to_8bit(im)
    if im.mode in ("RGBa", "La"):  # premultiplied alpha
        im = im.convert("RGBA" if im.mode == "RGBa" else "LA")
    if im.mode == "P" or "transparency" in im.info:  # palette, or a tRNS colour key / palette alpha
        im = im.convert("RGBA" if "transparency" in im.info or im.mode == "P" else "RGB")
    if im.mode in ("LA", "PA"):
        im = im.convert("RGBA")
    alpha = im.getchannel("A") if im.mode == "RGBA" else None
    colour = im.convert("RGB") if im.mode == "RGBA" else im
    colour = _to_srgb(colour, icc)
    if alpha is None:
        return colour
    flat = Image.new("RGB", colour.size, background)
    flat.paste(colour, mask=alpha)
    return flat


def _to_8bit(im):
    """Modes I;16, I;16B, I;16L, I;16N, I and F as 8-bit L, scaled by the range of the mode: 0..65535 for the
    16-bit modes and for I holding 16-bit values (as 16-bit PNG and TIFF decode), 0..1 for F holding
    0..1; otherwise the image's own min..max. A 16-bit tRNS grey key becomes an alpha channel."""
    import numpy as np
    from PIL import Image

    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    a = np.asarray(im).astype(np.float64)  # (H, W)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    key = im.info.get("transparency")
    lo, hi = 0.0, 65535.0
    if im.mode == "F":
        lo, hi = (0.0, 1.0) if a.size and a.min() >= 0 and a.max() <= 1 else (float(a.min()), float(a.max()))
    elif im.mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
        lo, hi = float(a.min()), float(a.max())
    scaled = np.clip(np.round((a - lo) * (255.0 / max(hi - lo, 1e-12))), 0, 255).astype(np.uint8)
    grey = Image.fromarray(scaled, "L")
    if isinstance(key, int):
        mask = Image.fromarray(np.where(np.asarray(im) == key, 0, 255).astype(np.uint8), "L")
        grey = Image.merge("LA", (grey, mask))
    return grey


def _to_srgb(im, icc: bytes | None):
    """RGB, L or CMYK pixels as sRGB: through the embedded ICC profile with LittleCMS when there is one."""
    if not icc:
        return im.convert("RGB")
    import io

    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as e:
        raise ImageSkip(f"its embedded ICC colour profile cannot be applied: {e}") from None


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
