"""The external-data files an ONNX model names, read from its protobuf bytes without the `onnx` package.

The runtime may not import `onnx` (and does not need it): this walks only the messages that can hold a tensor,

    ModelProto.graph(7), .functions(25), .training_info(20: initialization 1, algorithm 2)
      GraphProto.node(1), .initializer(5), .sparse_initializer(15)
        NodeProto.attribute(5) ─► AttributeProto.t(5) .g(6) .tensors(10) .graphs(11) .sparse_tensor(22) .sparse_tensors(23)
        FunctionProto.node(7)
        SparseTensorProto.values(1) .indices(2)
          TensorProto.external_data(13: {key 1, value 2}), .data_location(14: 1 = EXTERNAL)

and returns every `location` a tensor stored outside the model refers to. Large fields (raw weights) are skipped
by their length, never copied. A model that is not well-formed protobuf is a ValueError.

`checked_external_files` matches those locations against the files the manifest lists for the component;
`private_copy` puts the checked model and files in a private folder for an engine that reads them only by path.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

MAX_NESTING = 64  # subgraphs inside attributes inside subgraphs ...

# (message kind, field number) -> kind of the embedded message to descend into
_CHILDREN = {
    ("model", 7): "graph", ("model", 25): "function", ("model", 20): "training",
    ("training", 1): "graph", ("training", 2): "graph",
    ("graph", 1): "node", ("graph", 5): "tensor", ("graph", 15): "sparse",
    ("function", 7): "node",
    ("node", 5): "attribute",
    ("attribute", 5): "tensor", ("attribute", 6): "graph", ("attribute", 10): "tensor", ("attribute", 11): "graph",
    ("attribute", 22): "sparse", ("attribute", 23): "sparse",
    ("sparse", 1): "tensor", ("sparse", 2): "tensor",
}


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or malformed varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field) for one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise ValueError("a field runs past the end of its message")
            yield number, wire, (pos, pos + n)
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise ValueError("truncated fixed-width field")
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _tensor_location(buf: memoryview, start: int, end: int) -> tuple[bool, str | None]:
    """(stored externally?, its location) for one TensorProto."""
    external, location = False, None
    for number, wire, value in _fields(buf, start, end):
        if number == 14 and wire == 0:
            external = value == 1
        elif number == 13 and wire == 2:
            key = val = None
            for n, w, v in _fields(buf, *value):
                if w == 2 and n in (1, 2):
                    text = bytes(buf[v[0]:v[1]]).decode("utf-8", errors="strict")
                    key, val = (text, val) if n == 1 else (key, text)
            if key == "location":
                external, location = True, val
    return external, location


def external_locations(model: bytes | memoryview) -> list[str]:
    """Every external-data `location` the model's tensors name, in order of appearance (with repeats removed).
    ValueError for malformed protobuf, an external tensor without a location, or nesting past MAX_NESTING."""
    buf = memoryview(model)
    found: dict[str, None] = {}
    stack = [("model", 0, len(buf), 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ValueError(f"subgraphs nested over {MAX_NESTING} deep")
        if kind == "tensor":
            external, location = _tensor_location(buf, start, end)
            if external:
                if not location:
                    raise ValueError("a tensor is stored externally but names no location")
                found[location] = None
            continue
        for number, wire, value in _fields(buf, start, end):
            child = _CHILDREN.get((kind, number))
            if child is not None and wire == 2:
                stack.append((child, value[0], value[1], depth + 1))
    return list(found)


def checked_external_files(bundle, info, model: bytes | memoryview, engine: str = "sdedge",
                           name: str = "") -> dict[str, str]:
    """{location as the model names it: bundle-relative path} for every external tensor of a component's model,
    after checking that each location is a plain relative path (no absolute path, `..`, `.`, backslash or drive)
    naming a file the manifest lists for this very component (`external_data`). Raises BundleError naming the
    model file and the location. Symbolic links are refused when the files are read (`Bundle.read`)."""
    from ..errors import BundleError
    from ..manifest import check_inside

    where = str(bundle.path(info.file))
    try:
        locations = external_locations(model)
    except ValueError as exc:
        raise BundleError(f"{where}: {engine} cannot load the {name or 'component'} model: not a readable ONNX "
                          f"model ({exc})") from None
    folder = info.file.rsplit("/", 1)[0] + "/" if "/" in info.file else ""
    out = {}
    for loc in locations:
        try:
            check_inside(loc, where)
            if any(p == "." for p in loc.split("/")):
                raise BundleError(loc)
        except BundleError:
            raise BundleError(f"{where}: external data location {loc!r} is not a plain relative path inside the "
                              "bundle; refusing to load it") from None
        rel = folder + loc
        if rel not in info.external_data:
            listed = ", ".join(info.external_data) or "none"
            raise BundleError(f"{where}: external data location {loc!r} ({rel}) is not one of the files the manifest "
                              f"lists for this component (external_data: {listed}); refusing to load it")
        out[loc] = rel
    return out


@contextlib.contextmanager
def private_copy(bundle, file: str, model: bytes, external: dict[str, str], prefix: str):
    """The checked `model` bytes of the bundle's `file` and its external files ({location: bundle path}, from
    `checked_external_files`; each copied by `Bundle.copy_checked`) in a fresh folder only this user can open
    (mode 0700); yields the model's path there, for an engine that reads external data only by path (OpenVINO,
    ONNX Runtime for data over 2 GiB). Removed when the block ends (a mapping the engine made of the copies
    lives on)."""
    from ..files import atomic_write_bytes

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        path = folder / Path(file).name
        atomic_write_bytes(path, model, mode=0o600)
        for loc, rel in external.items():
            bundle.copy_checked(rel, folder / loc)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)
