"""The one labelled image grid every picture sdedge writes is drawn with (quickstart before/after, the bench's
samples.png, the trainer's validation grid): a header band with a label per column (the prompt, the engine),
a label column with a label per row (base, LoRA fp32, step 100 …), an optional caption under each cell.

Text is drawn with the font that ships with Pillow (`ImageFont.load_default(size=...)`, scalable from Pillow
10.1); a label too long for its box is wrapped on words and, past its line budget, cut with an ellipsis.
`write_grid` saves the PNG atomically with the labels also in a PNG text chunk ("sdedge-grid", JSON), so a
reader (or a test) can tell what each row and column is without reading pixels.

    ┌───────────┬────────┬────────┐  header: GridLayout.header_lines lines per column label
    │           │ col 0  │ col 1  │
    ├───────────┼────────┼────────┤
    │ row 0     │ cell   │ cell   │  cell: GridLayout.cell px square, caption_lines lines under it
    │ (wrapped) │ caption│ caption│
    └───────────┴────────┴────────┘
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SdedgeError

__all__ = ["GridLayout", "grid_size", "labelled_grid", "write_grid", "font", "wrap_text", "GRID_PNG_KEY"]

GRID_PNG_KEY = "sdedge-grid"
INK, SUBTLE, BACKGROUND = (0, 0, 0), (70, 70, 70), (255, 255, 255)


@dataclass(frozen=True)
class GridLayout:
    cell: int = 128  # side of a cell in pixels; images are resized to it (nearest when enlarging)
    label_w: int = 150  # width of the row-label column
    header_lines: int = 3  # lines of a column label
    caption_lines: int = 0  # lines under each cell (0: no captions)
    font_size: int = 12
    pad: int = 6

    @property
    def line_h(self) -> int:
        return self.font_size + 4

    @property
    def header_h(self) -> int:
        return self.pad + self.header_lines * self.line_h + self.pad

    @property
    def row_h(self) -> int:
        return self.cell + self.caption_lines * self.line_h + self.pad


def grid_size(rows: int, cols: int, layout: GridLayout = GridLayout()) -> tuple[int, int]:
    """(width, height) of a grid of rows × cols cells."""
    return (layout.label_w + cols * (layout.cell + layout.pad) + layout.pad,
            layout.header_h + rows * layout.row_h + layout.pad)


def font(size: int):
    """The font that ships with Pillow, at `size` px (the fixed bitmap font on Pillow < 10.1)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def _fit(text: str, fnt, width: int) -> str:
    """`text` cut with an ellipsis to fit `width` px."""
    if fnt.getlength(text) <= width:
        return text
    while text and fnt.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


def wrap_text(text: str, fnt, width: int, max_lines: int) -> list[str]:
    """`text` wrapped on words into lines of at most `width` px; past `max_lines` the last line ends in '…'.
    Explicit newlines start new lines."""
    if max_lines < 1:
        return []
    lines: list[str] = []
    for para in str(text).split("\n"):
        cur = ""
        for word in para.split():
            trial = f"{cur} {word}".strip()
            if cur and fnt.getlength(trial) > width:
                lines.append(cur)
                cur = word
            else:
                cur = trial
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1].rstrip() + "…", fnt, width)
    return [_fit(line, fnt, width) for line in lines]


def _tile(image, cell: int):
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))  # (H, W, 3) uint8
    image = image.convert("RGB")
    if image.size == (cell, cell):
        return image
    big = image.width <= cell and image.height <= cell
    return image.resize((cell, cell), Image.Resampling.NEAREST if big else Image.Resampling.LANCZOS)


def labelled_grid(cells: Sequence[Sequence[object]], row_labels: Sequence[str], col_labels: Sequence[str],
                  layout: GridLayout = GridLayout(), captions: Sequence[Sequence[str]] | None = None):
    """A PIL image: cells[r][c] (a (H, W, 3) uint8 array, a PIL image or None for an empty cell) under
    col_labels[c], beside row_labels[r], captions[r][c] under each cell when layout.caption_lines > 0."""
    from PIL import Image, ImageDraw

    if len(cells) != len(row_labels):
        raise SdedgeError(f"grid: {len(cells)} rows of images but {len(row_labels)} row labels")
    if any(len(row) > len(col_labels) for row in cells):
        raise SdedgeError(f"grid: a row has more images than the {len(col_labels)} column labels")
    L = layout
    img = Image.new("RGB", grid_size(len(cells), len(col_labels), L), BACKGROUND)
    d = ImageDraw.Draw(img)
    fnt, bold = font(L.font_size), font(L.font_size + 1)
    for c, label in enumerate(col_labels):
        x = L.label_w + L.pad + c * (L.cell + L.pad)
        for i, line in enumerate(wrap_text(label, bold, L.cell, L.header_lines)):
            d.text((x, L.pad + i * L.line_h), line, fill=INK, font=bold)
    for r, (label, row) in enumerate(zip(row_labels, cells)):
        y = L.header_h + r * L.row_h
        max_lines = max(1, (L.row_h - L.pad) // L.line_h)
        for i, line in enumerate(wrap_text(label, bold, L.label_w - 2 * L.pad, max_lines)):
            d.text((L.pad, y + i * L.line_h), line, fill=INK, font=bold)
        for c, image in enumerate(row):
            x = L.label_w + L.pad + c * (L.cell + L.pad)
            if image is not None:
                img.paste(_tile(image, L.cell), (x, y))
            text = captions[r][c] if captions and c < len(captions[r]) else ""
            for i, line in enumerate(wrap_text(text, fnt, L.cell, L.caption_lines) if L.caption_lines else []):
                d.text((x, y + L.cell + 2 + i * L.line_h), line, fill=SUBTLE, font=fnt)
    img.info[GRID_PNG_KEY] = json.dumps({"rows": list(row_labels), "columns": list(col_labels)}, ensure_ascii=False)
    return img


def write_grid(image, path: str | Path) -> Path:
    """Save a grid from `labelled_grid` as PNG, atomically, its labels in the "sdedge-grid" text chunk."""
    from PIL.PngImagePlugin import PngInfo

    from .files import atomic_write_bytes

    info = PngInfo()
    if GRID_PNG_KEY in image.info:
        info.add_itxt(GRID_PNG_KEY, image.info[GRID_PNG_KEY])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
