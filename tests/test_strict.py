import dataclasses
import enum
from dataclasses import dataclass, field

import pytest

from sdedge.runtime.strict import ConfigError, from_dict, to_dict


class Colour(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner:
    size: int
    scale: float = 1.0


@dataclass(frozen=True)
class Outer:
    name: str
    colour: Colour
    inner: Inner
    items: tuple[int, ...] = ()
    table: dict[str, Inner] = field(default_factory=dict)
    note: str | None = None


GOOD = {"name": "x", "colour": "red", "inner": {"size": 3}, "items": [1, 2], "table": {"a": {"size": 1, "scale": 2}}}


def test_round_trip():
    obj = from_dict(Outer, GOOD)
    assert obj.inner == Inner(3, 1.0) and obj.items == (1, 2) and obj.colour is Colour.RED
    assert from_dict(Outer, to_dict(obj)) == obj


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"Outer.inner: unknown key 'sise'"):
        from_dict(Outer, {**GOOD, "inner": {"sise": 3}})


def test_missing_key_is_named():
    with pytest.raises(ConfigError, match=r"missing key 'colour'"):
        from_dict(Outer, {"name": "x", "inner": {"size": 1}})


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"colour": "green"}, "'green' is not one of 'red', 'blue'"),
        ({"inner": {"size": "3"}}, "expected an integer"),
        ({"inner": {"size": True}}, "expected an integer"),
        ({"items": [1, "a"]}, r"items\[1\]: expected an integer"),
        ({"name": 5}, "expected str"),
        ({"table": {"a": {"size": 1, "extra": 0}}}, r"table.a: unknown key 'extra'"),
    ],
)
def test_wrong_types_are_named(patch, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, {**GOOD, **patch})


def test_optional_and_frozen():
    obj = from_dict(Outer, {**GOOD, "note": None})
    assert obj.note is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.name = "y"  # frozen
