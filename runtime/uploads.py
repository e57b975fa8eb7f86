"""Images uploaded to the server (`/v1/img2img`, `/v1/inpaint`): bounded before anything is decoded.

    base64 text ─► length ≤ the byte limit (else 413) ─► bytes ─► magic number: PNG, JPEG or WebP only (else 422)
      ─► Image.open(formats=[that one]) reads the header only ─► width × height ≤ the pixel limit (else 413)
      ─► one frame ─► decode (truncated or corrupt: 422; Pillow's own DecompressionBombError: 413)
      ─► RGB (alpha composited on white) or L (a mask); `to_array` resizes it to the size asked for

Nothing here changes Pillow's global settings (Image.MAX_IMAGE_PIXELS stays as it is): the pixel limit is checked
from the header before decoding, per call. Pillow is a base dependency; it is imported when a call needs it.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np

from .errors import BadInput

FORMATS = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}  # and RIFF....WEBP, below
_DATA_URL = re.compile(r"^data:image/[a-z.+-]+;base64,", re.IGNORECASE)


class UploadTooLarge(BadInput):
    """An upload over the byte or pixel limit (the server answers 413)."""


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 4_000_000  # of one decoded upload file
    max_pixels: int = 16_777_216  # width × height from the file's header (4096 × 4096)

    def base64_chars(self) -> int:
        """The longest base64 text of a file within max_bytes."""
        return 4 * -(-self.max_bytes // 3)


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG or WEBP from the file's first bytes; None for anything else."""
    for magic, name in FORMATS.items():
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_base64(text: str, label: str, limits: UploadLimits) -> bytes:
    """The file in a base64 string (or a `data:image/...;base64,` URL), refused past the byte limit unread."""
    text = _DATA_URL.sub("", text, count=1)
    if len(text) > limits.base64_chars() + 4:
        raise UploadTooLarge(f"{label}: about {len(text) * 3 // 4:,} bytes, over the upload limit of "
                             f"{limits.max_bytes:,} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{label}: not base64 text (give the file's bytes base64-encoded)") from None
    if len(data) > limits.max_bytes:
        raise UploadTooLarge(f"{label}: {len(data):,} bytes, over the upload limit of {limits.max_bytes:,} bytes")
    if not data:
        raise BadInput(f"{label}: empty")
    return data


def open_image(data: bytes, label: str, limits: UploadLimits, mode: str):
    """Decode `data` (PNG, JPEG or WebP) into a PIL image of `mode` ("RGB" or "L"), its size checked first."""
    from PIL import Image, UnidentifiedImageError

    fmt = sniff_format(data)
    if fmt is None:
        raise BadInput(f"{label}: not a PNG, JPEG or WebP file (those are the formats accepted)")
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])  # the header only
    except Image.DecompressionBombError as exc:  # Pillow's own check of the header, past 2 × MAX_IMAGE_PIXELS
        raise UploadTooLarge(f"{label}: {exc} (refused before decoding; the limit here is "
                             f"{limits.max_pixels:,} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadInput(f"{label}: not a readable {fmt} file ({exc})") from None
    w, h = im.size
    if w < 1 or h < 1 or w * h > limits.max_pixels:
        raise UploadTooLarge(f"{label}: {w}×{h} = {w * h:,} pixels, over the limit of {limits.max_pixels:,} "
                             "pixels (refused before decoding)")
    if getattr(im, "n_frames", 1) > 1:
        raise BadInput(f"{label}: an animated {fmt} ({im.n_frames} frames); give a still image")
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise UploadTooLarge(f"{label}: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise BadInput(f"{label}: the {fmt} data is damaged ({exc})") from None
    return _to_mode(im, mode)


def _to_mode(im, mode: str):
    from PIL import Image

    if mode == "L":
        return im.convert("L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")  # transparent parts white
    return im.convert("RGB")


def read_upload(text: str, label: str, limits: UploadLimits, mode: str = "RGB"):
    """A base64 upload (PNG, JPEG or WebP) as a PIL image of `mode`, every limit checked before its pixels are
    decoded."""
    return open_image(decode_base64(text, label, limits), label, limits, mode)


def to_array(im, size: tuple[int, int]) -> np.ndarray:
    """A PIL image as a uint8 array ((H, W, 3) for RGB, (H, W) for L), resized to `size` (width, height) when it
    differs: Lanczos for images, nearest for masks (so a mask stays black and white)."""
    from PIL import Image

    if im.size != tuple(size):
        im = im.resize(tuple(size), Image.Resampling.NEAREST if im.mode == "L" else Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)
