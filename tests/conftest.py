"""Shared fixtures: the built-in tiny base and its fp32 bundle, built once per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach for a model hub
# the compiled-model and optimised-graph caches of the runtime go to a folder of this session, not ~/.cache
_CACHE = tempfile.mkdtemp(prefix="sdedge-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("SDEDGE_CACHE_DIR", _CACHE)
REPO = Path(__file__).resolve().parents[1]
# `python -m pytest` from the checkout puts the checkout on sys.path, where `runtime/`, `export/`, ... would import
# as top-level packages: a second copy of sdedge.runtime.errors whose exceptions the first copy's `except` misses.
# sdedge is imported through its install (the editable finder maps the folders), never from the checkout root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]


@pytest.fixture(autouse=True)
def _gradients_stay_on():
    """A test (or the code it calls) that leaves torch's gradients off globally breaks every later training test
    with "element 0 of tensors does not require grad": fail the test that did it instead."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None and not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left torch's gradients disabled for the process (torch.set_grad_enabled(False))")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from sdedge.export.bases import write_builtin_base

    return write_builtin_base("tiny", tmp_path_factory.mktemp("bases") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_base, tmp_path_factory) -> Path:
    from sdedge.export.build import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(tiny_base, out, ExportOptions(overwrite=True))
    return out


@pytest.fixture(scope="session")
def tiny_pipe(tiny_base):
    """diffusers' reference pipeline on the tiny base."""
    from sdedge.export.bases import load_base

    return load_base(tiny_base)


def run_cli(*args: str, env: dict | None = None, timeout: float = 600):
    """Run `python -m sdedge ...` in a subprocess; returns CompletedProcess with text output."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "sdedge", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def bundle_without(bundle: Path, out: Path, component: str) -> Path:
    """A copy of an unsigned `bundle` at `out` with `component` (e.g. "vae_encoder") removed from its manifest and
    its files: a bundle exported without it."""
    import json

    shutil.copytree(bundle, out)
    doc = json.loads((out / "sdedge.json").read_text())
    del doc["components"][component]
    doc["files"] = {k: v for k, v in doc["files"].items() if not k.startswith(f"{component}/")}
    (out / "sdedge.json").write_text(json.dumps(doc))
    shutil.rmtree(out / component)
    return out


def disc_dataset(root: Path, colours: dict[str, tuple[int, int, int]], n: int = 8) -> Path:
    """`n` captioned 64x64 pictures of coloured discs ("a red circle") on textured backgrounds, prepared into
    root/data (the training tests' small set)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from sdedge.trainer.prepare import PrepareOptions, prepare_dataset

    src = root / "src"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        name = list(colours)[i % len(colours)]
        im = Image.fromarray(rng.integers(0, 70, (8, 8, 3)).astype(np.uint8)).resize((64, 64), Image.Resampling.BICUBIC)
        x = int(rng.integers(4, 24))
        ImageDraw.Draw(im).ellipse((x, x, x + 34, x + 34), fill=colours[name])
        im.save(src / f"img{i}.png")
        (src / f"img{i}.txt").write_text(f"a {name} circle")
    prepare_dataset(src, root / "data", PrepareOptions(resolution=64))
    return root / "data"
