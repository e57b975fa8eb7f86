"""Units a reader takes in at once, held by a test: no function or method in the package is longer than
MAX_LINES lines (decorators aside, docstring and comments included), unless it is on LONG_BY_CHOICE and carries,
inside it, a comment `# long: <why>` that says why it stays whole (docs/architecture.md, "The layers").
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import test_layers

MAX_LINES = 80
# "folder/file.py:Qualified.name": each keeps a `# long:` comment with its reason
LONG_BY_CHOICE: set[str] = set()
# not split yet, each for the reason given: listed so that the test holds everything else; an entry that is no
# longer long fails (take it off)
NOT_SPLIT_YET: set[str] = set()  # functions known to be long, to be split (none left)
REASON = re.compile(r"#\s*long:\s*\S")


def _functions(path: Path):
    """(qualified name, node) for every function and method in a module, nested ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    yield name, child
                yield from walk(child, name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def long_functions() -> dict[str, tuple[int, bool]]:
    """{"folder/file.py:name": (lines, has a `# long:` reason)} for every function over MAX_LINES lines, in the
    modules tests/test_layers.py walks."""
    found = {}
    for _, path in test_layers._modules():
        lines = path.read_text(encoding="utf-8").splitlines()
        for name, node in _functions(path):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_LINES:
                body = lines[node.lineno - 1: node.end_lineno]
                found[f"{path.relative_to(test_layers.ROOT).as_posix()}:{name}"] = (n, any(REASON.search(x) for x in body))
    return found


def problems(allowed: set[str] = LONG_BY_CHOICE, pending: set[str] = NOT_SPLIT_YET) -> list[str]:
    found = long_functions()
    bad = [f"{k}: {n} lines (split it along its seams, or keep it whole with a `# long:` reason and list it)"
           for k, (n, _) in sorted(found.items()) if k not in allowed and k not in pending]
    bad += [f"{k}: listed in LONG_BY_CHOICE without a `# long:` comment saying why"
            for k, (_, why) in sorted(found.items()) if k in allowed and not why]
    bad += [f"{k}: listed in LONG_BY_CHOICE or NOT_SPLIT_YET but no longer over {MAX_LINES} lines (take it off)"
            for k in sorted((allowed | pending) - set(found))]
    return bad


def test_no_function_is_longer_than_a_screen_without_a_reason():
    bad = problems()
    assert not bad, "long units:\n" + "\n".join(bad)


def _module(tmp_path: Path, body_lines: int, reason: bool) -> None:
    (tmp_path / "export").mkdir()
    body = ["    # long: one flat list of steps" if reason else "    x = 0"] + ["    x = 1"] * (body_lines - 1)
    (tmp_path / "export" / "m.py").write_text("class C:\n    def f(self):\n" + "\n".join("    " + b for b in body)
                                               + "\n\n\ndef short():\n    return 1\n")


@pytest.mark.parametrize("body_lines, reason, allowed, expected", [
    (MAX_LINES, False, set(), "export/m.py:C.f: 81 lines"),
    (MAX_LINES, False, {"export/m.py:C.f"}, "without a `# long:` comment"),
    (MAX_LINES - 1, True, {"export/m.py:C.f"}, "no longer over"),
])
def test_the_length_check_sees_what_it_must(tmp_path, monkeypatch, body_lines, reason, allowed, expected):
    """The checker itself (a method, a missing reason, a stale entry), so that the test above can fail."""
    monkeypatch.setattr(test_layers, "ROOT", tmp_path)
    _module(tmp_path, body_lines, reason)
    assert any(expected in p for p in problems(allowed, set()))


def test_a_listed_unit_with_its_reason_passes(tmp_path, monkeypatch):
    monkeypatch.setattr(test_layers, "ROOT", tmp_path)
    _module(tmp_path, MAX_LINES, True)
    assert problems({"export/m.py:C.f"}, set()) == []
    assert problems(set(), set()) != []
    assert problems(set(), {"export/m.py:C.f"}) == []
