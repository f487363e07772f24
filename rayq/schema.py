"""Typed-config machinery: dataclasses checked against their annotations, with errors that name the key.

A config section is a dataclass whose fields carry type annotations (``Literal`` for closed sets,
``int | None``, nested dataclasses, lists of them) and an optional ``validate(path)`` for value
ranges. :func:`from_dict` builds one from plain YAML data and fails on the first unknown key or bad
value with a message that names the key, the value seen and what is allowed:
``compression.codec='qsdg' is not a codec; choose one of: none, fp16, ...``.

This module knows nothing about runs, codecs or Ray: the run config (:mod:`rayq.config`), node
profiles and Tune search spaces are all built on it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml

from compressors.base import NUMBER

#: A float written the way YAML 1.1 would read as a string ("1e-3"): a user means the number.
FLOAT = NUMBER


class ConfigError(ValueError):
    """A config key or value is invalid; raised before anything starts."""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` ``key=value is invalid; expected <allowed>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; expected {allowed}")


def type_name(hint: Any) -> str:
    """A reader's name for an annotation: ``one of: 'a', 'b'``, ``int or null``, ..."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of: " + ", ".join(map(repr, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def keys(cls: type) -> str:
    """The field names of a config section, comma-separated (for error messages)."""
    return ", ".join(f.name for f in dataclasses.fields(cls))


def convert(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``hint``; build nested dataclasses on the way."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is invalid; choose one of: {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(a, value, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{key}={value!r} is invalid; expected {type_name(hint)}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is invalid; expected a mapping of {keys(hint)}")
        return from_dict(hint, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} is invalid; expected a list")
        return [convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is invalid; expected a mapping")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid; expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} is invalid; expected an integer")
        return value
    if hint is float:
        if isinstance(value, str) and FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} is invalid; expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} is invalid; expected a string")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build the config section ``cls`` from ``data``; unknown keys and bad values are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown config key {where!r}; allowed keys{' in ' + path if path else ''}: {keys(cls)}")
    kwargs = {k: convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config section (postponed annotations evaluated)."""
    return typing.get_type_hints(cls)


def parse_set(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` (one ``--set`` item) → (``['a', 'b']``, the value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like key=value (e.g. compression.codec=none)")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"--set {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {err}") from err
    return key.split("."), value


def apply_set(data: dict[str, Any], item: str) -> None:
    """Apply one ``--set key=value`` item to the nested mapping ``data`` in place."""
    path, value = parse_set(item)
    node = data
    for k in path[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {k!r} is not a section")
    node[path[-1]] = value


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied; nested mappings merge key by key."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_mapping(path: Any, what: str = "config file") -> dict[str, Any]:
    """The YAML mapping in ``path``; a missing file, bad YAML or a non-mapping is a :class:`ConfigError`."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded
