"""The labelled grid (sdedge.runtime.grid) and every grid sdedge writes through it: the quickstart's before/after
grid, the bench's samples.png and the trainer's validation grid carry row and column labels really drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.grid import GRID_PNG_KEY, GridLayout, font, grid_size, labelled_grid, wrap_text, write_grid

REPO = Path(__file__).resolve().parents[1]
LONG = "a purple triangle on a yellow background, highly detailed, studio lighting, sharp focus, 8k, trending"


def _cells(rows: int, cols: int, side: int = 32) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [[rng.integers(0, 255, (side, side, 3), dtype=np.uint8) for _ in range(cols)] for _ in range(rows)]


def _bands(img: Image.Image, layout: GridLayout) -> tuple[np.ndarray, np.ndarray]:
    """(header band above the cells, label column left of them) as arrays."""
    a = np.asarray(img)
    return a[: layout.header_h - layout.pad, layout.label_w:], a[layout.header_h:, : layout.label_w]


def _ink(band: np.ndarray) -> int:
    """Pixels of the band darker than the white background."""
    return int((band.min(axis=-1) < 128).sum())


def test_labels_are_drawn_and_cells_are_the_images():
    layout = GridLayout(cell=32, label_w=90)
    cells = _cells(3, 4)
    img = labelled_grid(cells, ["base", "LoRA fp32", "LoRA int8"], ["red", "green", "blue", "white"], layout)
    assert img.size == grid_size(3, 4, layout) == (90 + 4 * 38 + 6, layout.header_h + 3 * 38 + 6)
    header, rows = _bands(img, layout)
    assert _ink(header) > 50 and _ink(rows) > 50  # text, not a blank band
    blank = labelled_grid(cells, ["", "", ""], ["", "", "", ""], layout)
    b_header, b_rows = _bands(blank, layout)
    assert _ink(b_header) == 0 and _ink(b_rows) == 0  # the ink above is the labels and nothing else
    a = np.asarray(img)
    for r in range(3):
        for c in range(4):  # each cell holds its image, unchanged (same size: no resampling)
            y, x = layout.header_h + r * layout.row_h, layout.label_w + layout.pad + c * (layout.cell + layout.pad)
            assert np.array_equal(a[y:y + 32, x:x + 32], cells[r][c])
    other = labelled_grid(cells, ["base", "LoRA fp32", "LoRA fp16"], ["red", "green", "blue", "black"], layout)
    assert not np.array_equal(np.asarray(other), a)  # the pixels follow the label text


def test_each_row_label_lands_in_its_row():
    layout = GridLayout(cell=40, label_w=90)
    img = np.asarray(labelled_grid(_cells(3, 1, 40), ["", "middle", ""], ["x"], layout))
    ink = [_ink(img[layout.header_h + r * layout.row_h: layout.header_h + (r + 1) * layout.row_h, : layout.label_w])
           for r in range(3)]
    assert ink[0] == 0 and ink[1] > 20 and ink[2] == 0


def test_long_labels_wrap_then_end_in_an_ellipsis():
    f = font(12)
    lines = wrap_text(LONG, f, 120, 3)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(f.getlength(line) <= 120 for line in lines)
    assert " ".join(lines).replace("…", "").split()[:4] == LONG.split()[:4]  # wrapped on words, in order
    assert wrap_text("a red circle", f, 120, 3) == ["a red circle"]
    assert wrap_text("a red circle", f, 120, 0) == []  # no room: nothing drawn
    word = wrap_text("supercalifragilisticexpialidocious" * 3, f, 60, 2)
    assert len(word) == 1 and word[0].endswith("…") and f.getlength(word[0]) <= 60  # one long word: cut
    assert wrap_text("run 0 · seed 42\na cat", f, 200, 3) == ["run 0 · seed 42", "a cat"]
    # a grid with a long prompt keeps its size and draws inside its header
    layout = GridLayout(cell=64, label_w=60, header_lines=2)
    img = labelled_grid(_cells(1, 2, 64), ["base"], [LONG, LONG], layout)
    assert img.size == grid_size(1, 2, layout)


def test_captions_and_mismatched_labels():
    layout = GridLayout(cell=32, label_w=60, caption_lines=1)
    img = labelled_grid(_cells(1, 2), ["r"], ["a", "b"], layout, captions=[["41.2 dB", "reference"]])
    a = np.asarray(img)
    under = a[layout.header_h + 32: layout.header_h + layout.row_h, layout.label_w:]
    assert _ink(under) > 20
    with pytest.raises(SdedgeError, match="2 rows of images but 1 row labels"):
        labelled_grid(_cells(2, 2), ["r"], ["a", "b"], layout)
    with pytest.raises(SdedgeError, match="more images than the 1 column labels"):
        labelled_grid(_cells(1, 2), ["r"], ["a"], layout)


def test_write_grid_keeps_the_labels_in_the_png(tmp_path):
    path = write_grid(labelled_grid(_cells(2, 2), ["base", "LoRA"], ["a cat", "a dog"]), tmp_path / "g.png")
    with Image.open(path) as im:
        assert json.loads(im.info[GRID_PNG_KEY]) == {"rows": ["base", "LoRA"], "columns": ["a cat", "a dog"]}
        assert im.size == grid_size(2, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # atomic: no temporary left


def _labels(path: Path) -> dict:
    with Image.open(path) as im:
        info = json.loads(im.info[GRID_PNG_KEY])
        return {**info, "ink": _ink(np.asarray(im.convert("RGB"))[:40])}


# -- every caller ----------------------------------------------------------------------------------------------
def test_quickstart_grid_is_labelled(tmp_path):
    from sdedge.quickstart import _grid_png, concept_prompts

    prompts = concept_prompts()
    imgs = np.stack([c for row in _cells(1, len(prompts), 64) for c in row])  # (18, 64, 64, 3)
    _grid_png([("base", imgs), ("LoRA fp32", imgs), ("LoRA int8", imgs)], prompts, tmp_path / "before-after.png")
    got = _labels(tmp_path / "before-after.png")
    assert got["rows"] == ["base", "LoRA fp32", "LoRA int8"] and got["columns"] == prompts and got["ink"] > 100
    with Image.open(tmp_path / "before-after.png") as im:
        assert im.size == grid_size(3, len(prompts), GridLayout(cell=128, label_w=110))


def test_bench_samples_grid_is_labelled(tmp_path):
    from sdedge.benchmarks import report as report_mod

    report = {"settings": {"runs": 2, "width": 32, "seed": 7, "prompts": ["a red circle on a blue background"]},
              "engines": [{"name": "diffusers", "role": "reference"},
                          {"name": "sdedge-fp32", "role": "engine",
                           "parity": {"images": [{"run": 0, "image": 0, "psnr_db": 41.5, "ssim": 0.991}]}}]}
    samples = {"diffusers": [c[0] for c in _cells(2, 1)], "sdedge-fp32": [c[0] for c in _cells(2, 1)]}
    path = write_grid(report_mod.render_samples(report, samples), tmp_path / "samples.png")
    got = _labels(path)
    assert got["columns"] == ["diffusers (reference)", "sdedge-fp32"] and got["ink"] > 50
    assert got["rows"] == ["run 0 · seed 7\na red circle on a blue background",
                           "run 1 · seed 8\na red circle on a blue background"]
    with Image.open(path) as im:
        assert im.size == report_mod.grid_size(2, 2, report_mod.grid_cell(32))


def test_validation_grid_is_labelled(tmp_path):
    from sdedge.trainer.validation import write_validation_grid

    for step in (100, 200):
        for i in range(2):
            Image.fromarray(_cells(1, 1, 64)[0][0]).save(tmp_path / f"step-{step:06d}-{i:02d}.png")
    (tmp_path / "notes.png").write_bytes(b"")  # not a validation image: ignored
    got = _labels(write_validation_grid(tmp_path, ["a red circle", "a blue square"]))
    assert got == {"rows": ["step 100", "step 200"], "columns": ["a red circle", "a blue square"], "ink": got["ink"]}
    assert got["ink"] > 50


def test_tiny_base_script_samples_grid_is_labelled(tmp_path):
    import importlib.util

    from sdedge.tinyworld.classifier import base_captions

    spec = importlib.util.spec_from_file_location("train_tiny_base", REPO / "scripts" / "train_tiny_base.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    prompts = base_captions()[:10]
    script.write_samples(np.stack([c for row in _cells(1, 10, 64) for c in row]), prompts, tmp_path / "samples.png")
    got = _labels(tmp_path / "samples.png")
    assert got["rows"] == ["a red circle", "a green circle"] and got["ink"] > 50


# canvases that are not grids: alpha flattening, rendered scenes, the bench's bar chart, the grid itself
NOT_GRIDS = {"runtime/uploads.py", "runtime/grid.py", "trainer/images.py", "tinyworld/shapes.py",
             "benchmarks/report.py:render_chart", "benchmarks/train_step.py"}


def test_no_grid_is_drawn_without_the_helper():
    """Every Image.new / paste outside the list above would be a grid (or canvas) bypassing runtime/grid.py."""
    import ast

    found = []
    for folder in ("runtime", "trainer", "export", "benchmarks", "sdedge", "tinyworld", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if "results" in rel.split("/") or rel in NOT_GRIDS:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
                for node in ast.walk(fn):
                    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                            and (node.func.attr == "paste" or node.func.attr == "new"
                                 and getattr(node.func.value, "id", "") == "Image")
                            and f"{rel}:{fn.name}" not in NOT_GRIDS):
                        found.append(f"{rel}:{fn.name}")
    assert not found, f"draws a canvas without sdedge.runtime.grid: {sorted(set(found))}"
