"""The value types of config/defaults.yml: what a setting may hold beyond its YAML type.

A default written with a tag declares its setting's type: `port: !port 5432` makes `db.port` a
port, `mode: !enum off|self-signed|file|acme` an enum whose first choice is the default.
`load_defaults` reads the file once into the plain defaults and the type of each dotted key;
`problems` refuses every value that is not of its type, naming the file, the key and the fix. A
string setting whose default is empty may stay empty: empty means unset. The checked settings
become a frozen `Section`, read by attribute (`settings.db.port`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.core.errors import Problem

DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
ABSOLUTE_PATH = re.compile(r"^(/[A-Za-z0-9._+-]+)+$")


def valid_address(address: Any) -> bool:
    """An IP address or a DNS name made of valid labels."""
    if not isinstance(address, str) or not address:
        return False
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        pass
    if address.replace(".", "").isdigit():
        return False  # looks like a mistyped IPv4 address, e.g. 10.0.0.300
    return len(address) <= 253 and all(DNS_LABEL.match(part) for part in address.split("."))


def matches(pattern: str) -> Callable[[Any], bool]:
    """Whether a string matches the whole pattern."""
    compiled = re.compile(pattern)
    return lambda value: isinstance(value, str) and bool(compiled.fullmatch(value))


def plain_path(value: Any) -> bool:
    """An absolute path of plain names, none of them `..`."""
    return (isinstance(value, str) and bool(ABSOLUTE_PATH.fullmatch(value))
            and ".." not in value.split("/"))


def between(low: int, high: int | None = None) -> Callable[[Any], bool]:
    """Whether an integer lies in low..high (no upper bound when high is None)."""
    return lambda value: isinstance(value, int) and low <= value and (high is None
                                                                       or value <= high)


@dataclass(frozen=True)
class ValueType:
    """What a tagged setting must be: `accepts` decides, `what` and `fix` explain a refusal."""

    tag: str
    base: type
    accepts: Callable[[Any], bool]
    what: str
    fix: str


TYPES: dict[str, ValueType] = {t.tag: t for t in (
    ValueType("!path", str, plain_path, "a plain absolute path",
              "an absolute path of letters, digits, '.', '_', '+' and '-', e.g. /srv/dify"),
    ValueType("!host", str, valid_address, "a DNS name or an address",
              "a name such as dify.example.com, or an IP address"),
    ValueType("!slug", str, matches(r"[a-z0-9][a-z0-9-]{0,62}"), "a slug",
              "lower-case letters, digits and dashes, e.g. production"),
    ValueType("!name", str, matches(r"[A-Za-z0-9._-]{1,64}"), "a plain name",
              "letters, digits, '.', '_' and '-', e.g. dify-master"),
    ValueType("!identifier", str, matches(r"[a-z_][a-z0-9_]{0,62}"),
              "a PostgreSQL identifier",
              "lower-case letters, digits and '_', starting with a letter, e.g. dify_vector"),
    ValueType("!port", int, between(1, 65535), "a port (1-65535)",
              "a free port of the host, e.g. the default in config/defaults.yml"),
    ValueType("!count", int, between(1), "a positive integer", "a whole number above 0"),
    ValueType("!natural", int, between(0), "a whole number of 0 or more",
              "0 or a positive whole number"),
    ValueType("!percent", int, between(1, 99), "a percentage", "a number between 1 and 99"),
    ValueType("!url", str, matches(r"https?://[^\s'\"\\<>`]+"), "an http(s) URL",
              "a URL such as https://hooks.example.com/dify"),
    ValueType("!duration", str, matches(r"(\d+(ms|s|m|h|d|w|y))+"), "a duration",
              "a number and a unit, e.g. 30s, 5m, 26h, 15d"),
    ValueType("!time", str, matches(r"([01]\d|2[0-3]):[0-5]\d"), "a time of day (HH:MM)",
              "two-digit hours and minutes, e.g. 03:00"),
    ValueType("!image", str, matches(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*"), "an image reference",
              "a name with an optional tag, e.g. langgenius/dify-api:1.16.1"),
    ValueType("!registry", str,
              matches(r"[A-Za-z0-9][A-Za-z0-9._:-]*(/[A-Za-z0-9._-]+)*/?"), "a registry",
              "a host[:port] with an optional path, e.g. mirror.example.com/"),
)}


@dataclass(frozen=True)
class Declared:
    """A default as the tagged YAML wrote it, before load_defaults splits value and type."""

    value: Any
    type: ValueType


def choice_type(choices: tuple[str, ...]) -> ValueType:
    """An enum: one of the choices."""
    shown = ", ".join(repr(c) if c else '""' for c in choices)
    return ValueType("!enum", str, lambda value: value in choices, f"one of {shown}",
                     f"one of {shown}")


class SchemaLoader(yaml.SafeLoader):
    """YAML's safe loader that also reads the value tags of config/defaults.yml."""


def construct_typed(loader: SchemaLoader, suffix: str, node: yaml.Node) -> Declared:
    """A tagged scalar: its default, read as the type's base (never YAML's own guess)."""
    value_type = TYPES.get(f"!{suffix}")
    if (value_type is None and suffix != "enum") or not isinstance(node, yaml.ScalarNode):
        raise yaml.constructor.ConstructorError(None, None, f"unknown value type !{suffix}",
                                                node.start_mark)
    text = str(loader.construct_scalar(node))
    if value_type is None:  # !enum a|b|c
        choices = tuple(text.split("|"))
        return Declared(choices[0], choice_type(choices))
    return Declared(value_type.base(text), value_type)


SchemaLoader.add_multi_constructor("!", construct_typed)


def load_defaults(path: Path) -> tuple[dict[str, Any], dict[str, ValueType]]:
    """The plain defaults of the file and the value type of each tagged dotted key."""
    types: dict[str, ValueType] = {}

    def plain(node: Any, prefix: str) -> Any:
        if isinstance(node, Declared):
            types[prefix] = node.type
            return node.value
        if isinstance(node, dict):
            return {key: plain(value, f"{prefix}.{key}" if prefix else key)
                    for key, value in node.items()}
        return node

    return plain(yaml.load(path.read_text(), Loader=SchemaLoader), ""), types


def value_at(settings: Mapping[str, Any], key: str) -> Any:
    """The value of a dotted key."""
    value: Any = settings
    for part in key.split("."):
        value = value[part]
    return value


def problems(settings: Mapping[str, Any], defaults: Mapping[str, Any],
             types: dict[str, ValueType], shown: str) -> Iterator[Problem]:
    """Every setting whose value is not of its declared type."""
    for key, value_type in types.items():
        value, default = value_at(settings, key), value_at(defaults, key)
        if value == "" and default == "":
            continue
        if not value_type.accepts(value):
            default_is = ", or leave it empty (the default)" if default == "" else \
                f"; the default is {default!r}"
            yield Problem(shown, key, f"{value!r} is not {value_type.what}",
                          f"use {value_type.fix}{default_is}")


class Section(Mapping[str, Any]):
    """A frozen part of the settings: read by attribute (`settings.db.port`), or by item where
    the key is chosen at run time (`settings.app[service]`). Lists become tuples."""

    __slots__ = ("_values",)
    _values: dict[str, Any]

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", {key: frozen(value) for key, value in values.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the settings are frozen: build new ones with replace()")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Section({self._values!r})"

    def __copy__(self) -> Section:
        return self

    def __deepcopy__(self, memo: dict) -> Section:
        return self

    def replace(self, **changes: Any) -> Section:
        """A copy with some keys set to new values."""
        return Section({**self._values, **changes})


def frozen(value: Any) -> Any:
    """A value as the frozen settings hold it: mappings as Sections, lists as tuples."""
    if isinstance(value, Mapping):
        return value if isinstance(value, Section) else Section(value)
    if isinstance(value, (list, tuple)):
        return tuple(frozen(item) for item in value)
    return value
