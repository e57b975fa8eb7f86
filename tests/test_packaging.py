"""Packaging that cannot silently drop a file: the wheel holds every subpackage and data file of the checkout,
and nothing of the checkout root is importable beside the installed package."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"sdedge": "sdedge", "sdedge.runtime": "runtime", "sdedge.export": "export", "sdedge.trainer": "trainer",
          "sdedge.benchmarks": "benchmarks", "sdedge.tinyworld": "tinyworld"}
DATA_SUFFIXES = {".safetensors", ".json", ".gz", ".txt", ".html", ".js", ".css", ".svg", ".png"}


def _expected() -> tuple[set[str], set[str]]:
    """Module files and data files the wheel must hold, as wheel paths (sdedge/runtime/bundle.py, ...)."""
    modules, data = set(), set()
    for package, folder in LAYERS.items():
        base = ROOT / folder
        prefix = package.replace(".", "/")
        for path in base.rglob("*"):
            rel = path.relative_to(base)
            if not path.is_file() or "__pycache__" in rel.parts or "results" in rel.parts or "peer-envs" in rel.parts:
                continue
            if path.suffix == ".py" and (path.parent / "__init__.py").is_file():
                modules.add(f"{prefix}/{rel.as_posix()}")
            elif "data" in rel.parts or "static" in rel.parts or "web" in rel.parts:
                if path.suffix in DATA_SUFFIXES:
                    data.add(f"{prefix}/{rel.as_posix()}")
    return modules, data


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy, so the build's own build/ and egg-info folders stay out of the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                             "results", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("sdedge-*.whl")
    return zipfile.ZipFile(whl)


def test_the_wheel_holds_every_subpackage_and_data_file(wheel):
    names = set(wheel.namelist())
    modules, data = _expected()
    assert modules and data
    assert not sorted(modules - names), "modules missing from the wheel"
    assert not sorted(data - names), "data files missing from the wheel"


def test_results_tests_and_scripts_stay_out_of_the_wheel(wheel):
    bad = [n for n in wheel.namelist() if "/results/" in n or n.startswith(("tests/", "scripts/", "benchmarks/"))]
    assert not bad


def test_the_checkout_root_is_not_a_second_import_root():
    """`import runtime.errors` from the checkout would be a second copy of sdedge.runtime.errors."""
    import sdedge.runtime.errors as errors

    assert Path(errors.__file__).resolve() == ROOT / "runtime" / "errors.py"
    for name in ("runtime", "export", "trainer", "benchmarks", "tinyworld"):
        assert importlib.util.find_spec(name) is None, f"{name} is importable as a top-level package"
    assert not [m for m in sys.modules if m.split(".")[0] in ("runtime", "export", "trainer", "benchmarks")]
