"""Build frozen dataclasses from JSON/YAML dicts, rejecting unknown keys and wrong types.

Configs and the bundle manifest are frozen dataclasses; `from_dict(Cls, data)` is the one place that turns
untrusted dicts into them, so a typo in a key (`guidence: 7.5`) is an error that names the key, never a
silently ignored setting. Supported field types: str, int, float, bool, Enums, nested dataclasses,
`X | None`, `tuple[X, ...]`, `dict[str, X]`, `Literal[...]`, `Annotated[X, AtLeast(n)]` (`NonNegative`) and `Any`
(kept as is).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any, TypeVar

from .errors import SdedgeError

T = TypeVar("T")


class ConfigError(SdedgeError):
    """A config or manifest dict that does not match its schema."""


# Caps on the documents sdedge parses before anything is verified (sdedge.json, model.sig, cache records): far
# above any real one, far below what would exhaust memory or the parser's stack.
MAX_DOCUMENT_BYTES = 16 << 20
MAX_DEPTH = 64


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """`Annotated[int, AtLeast(0)]`: a field whose value may not be below `minimum`."""

    minimum: float


NonNegative = typing.Annotated[int, AtLeast(0)]


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]}… overflows to infinity")
    return value


def read_capped(path, max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
    """A document's bytes, refusing one over `max_bytes` before it is read whole (and a symbolic link at the
    last component). Raises ConfigError naming the file and the cap; FileNotFoundError passes through."""
    import os

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ConfigError(f"{path}: over {max_bytes} bytes, far larger than any such document; refusing to parse it")
    return data


def parse_json(raw: bytes, where: str, max_bytes: int = MAX_DOCUMENT_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse an untrusted JSON document: size capped, UTF-8, no NaN/Infinity, nesting at most `max_depth` deep.
    Any failure is a ConfigError naming `where`, never a traceback."""
    import json

    if len(raw) > max_bytes:
        raise ConfigError(f"{where}: {len(raw)} bytes, over the {max_bytes}-byte cap for this document")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a real document (over {max_depth} levels)") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, over-long integers, NaN
        raise ConfigError(f"{where}: not valid JSON ({exc})") from None
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise ConfigError(f"{where}: nested over {max_depth} levels deep; not a real document")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return doc


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from `data`; `where` names the place (file and key path) for error messages."""
    return _convert(cls, data, where or cls.__name__)


def to_dict(obj: Any) -> Any:
    """The inverse of `from_dict`: plain JSON-ready dicts, lists, strings and numbers."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {_key(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Annotated:
        value = _convert(args[0], value, where)
        for bound in (m for m in tp.__metadata__ if isinstance(m, AtLeast)):
            if value < bound.minimum:
                raise ConfigError(f"{where}: {value!r} is below the minimum {bound.minimum:g}")
        return value
    if origin is typing.Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(f"{where}: {value!r} is not one of {allowed}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"strict.from_dict cannot handle the type {tp!r} at {where}")


def _dataclass(cls: Any, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {_key(f): f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for key, field in fields.items():
        if key in value:
            kwargs[field.name] = _convert(hints[field.name], value[key], f"{where}.{key}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing key {key!r}")
    return cls(**kwargs)


def _key(f: dataclasses.Field) -> str:
    """A field's key in the document: its name, or `field(metadata={"key": ...})` for a name Python reserves."""
    return f.metadata.get("key", f.name)
