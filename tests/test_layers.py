"""The layers of docs/architecture.md, held by a test: every import (module level and inside functions) of
every module is read with `ast` and checked against what its layer may import.

    runtime     numpy, onnxruntime, tokenizers, pillow, optional extras; never torch/diffusers, never another layer
    tinyworld   the built-in tiny world (shapes, classifier, tiny base): runtime only
    export      runtime, tinyworld
    trainer     runtime, tinyworld
    benchmarks  runtime, export, tinyworld
    sdedge      the CLI: everything (lazily)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"runtime": "runtime", "export": "export", "trainer": "trainer", "benchmarks": "benchmarks",
          "sdedge": "sdedge", "tinyworld": "tinyworld"}
MAY_IMPORT = {
    "runtime": {"runtime"},
    "tinyworld": {"tinyworld", "runtime"},
    "export": {"export", "runtime", "tinyworld"},
    "trainer": {"trainer", "runtime", "tinyworld"},
    "benchmarks": {"benchmarks", "runtime", "export", "tinyworld"},
    "sdedge": set(LAYERS),
}
RUNTIME_FORBIDDEN_PACKAGES = {"torch", "diffusers", "transformers", "peft", "accelerate", "onnx", "nncf",
                              "torch_pruning", "torchvision"}


def _modules():
    for layer, folder in LAYERS.items():
        base = ROOT / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            if "results" in path.relative_to(base).parts:
                continue
            yield layer, path


def _package_parts(layer: str, path: Path) -> list[str]:
    """sdedge.<layer>.<sub...> for a module file (the package its relative imports start from)."""
    rel = path.relative_to(ROOT / LAYERS[layer]).with_suffix("").parts
    pkg = ["sdedge"] if layer == "sdedge" else ["sdedge", layer]
    return pkg + list(rel[:-1]) if rel[-1] != "__init__" else pkg + list(rel[:-1])


def _imports(layer: str, path: Path):
    """(line, absolute dotted name) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _package_parts(layer, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield node.lineno, name
            if name == "sdedge" or name.count(".") == 1 and name.startswith("sdedge."):
                for alias in node.names:  # `from sdedge import cli` imports the module sdedge.cli
                    yield node.lineno, f"{name}.{alias.name}"


def _layer_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "sdedge":
        return None
    if len(parts) == 1:
        return "sdedge"
    return parts[1] if parts[1] in LAYERS and parts[1] != "sdedge" else "sdedge"


def violations() -> list[str]:
    found = []
    for layer, path in _modules():
        for line, name in _imports(layer, path):
            target = _layer_of(name)
            where = f"{path.relative_to(ROOT)}:{line}"
            if target is None:
                top = name.split(".")[0]
                if layer in ("runtime", "tinyworld") and layer == "runtime" and top in RUNTIME_FORBIDDEN_PACKAGES:
                    found.append(f"{where}: runtime imports {name}")
                continue
            if target not in MAY_IMPORT[layer]:
                found.append(f"{where}: {layer} imports {name} (layer {target})")
    return sorted(set(found))


def test_every_import_respects_the_layers():
    bad = violations()
    assert not bad, "imports across the layers of docs/architecture.md:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from sdedge.export.bases import load_base\n", "runtime imports sdedge.export.bases"),
    ("def f():\n    import torch\n", "runtime imports torch"),
    ("def f():\n    from ..trainer import train\n", "runtime imports sdedge.trainer"),
])
def test_the_walker_sees_what_it_must(tmp_path, monkeypatch, source, expected):
    """The checker itself: a function-level import and a relative import count (a test that cannot fail is none)."""
    fake = tmp_path / "runtime"
    fake.mkdir()
    (fake / "bad.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert any(expected in v for v in violations())


def _module_name(layer: str, path: Path) -> str:
    rel = path.relative_to(ROOT / LAYERS[layer]).with_suffix("").parts
    parts = (["sdedge"] if layer == "sdedge" else ["sdedge", layer]) + list(rel)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_cycles() -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (imports inside functions count:
    a lazy import hides a cycle from the interpreter, not from the reader)."""
    modules = {_module_name(layer, path): (layer, path) for layer, path in _modules()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, (layer, path) in modules.items():
        for _, target in _imports(layer, path):
            while target and target not in modules:  # sdedge.x.y.attr -> sdedge.x.y
                target = target.rpartition(".")[0]
            if target and target != name and not modules[name][1].name == "__init__.py":
                graph[name].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "modules that import each other:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# The export is one ordered list of stages (export/build.py, its stages in export/pipeline*.py): what the stages
# call never calls back up to them.
EXPORT_CALLEES = ("quantize", "gates", "calibration", "reference", "onnx_export", "bundle_writer")
EXPORT_ORCHESTRATION = ("sdedge.export.build", "sdedge.export.pipeline")  # pipeline.py, pipeline_*.py


def export_callbacks() -> list[str]:
    """Imports of the export's orchestration (build, the pipeline modules) by the modules its stages call."""
    found = []
    for name in EXPORT_CALLEES:
        path = ROOT / "export" / f"{name}.py"
        for line, target in _imports("export", path):
            if target.startswith(EXPORT_ORCHESTRATION):
                found.append(f"export/{name}.py:{line}: imports {target}")
    return found


def test_the_export_pipeline_is_one_directional():
    bad = export_callbacks()
    assert not bad, "the export's callees import its pipeline:\n" + "\n".join(bad)


@pytest.mark.parametrize("source", ["from .build import ExportOptions\n", "def f():\n    from . import pipeline_base\n",
                                    "def f():\n    from sdedge.export.pipeline_run import ExportRun\n"])
def test_the_export_callback_check_sees_a_call_back_up(tmp_path, monkeypatch, source):
    (tmp_path / "export").mkdir()
    for name in EXPORT_CALLEES:
        (tmp_path / "export" / f"{name}.py").write_text(source if name == "gates" else "")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert [v for v in export_callbacks() if v.startswith("export/gates.py:")]
