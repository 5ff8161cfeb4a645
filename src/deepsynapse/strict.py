"""The strict reader of configuration: dataclasses from plain data, every error by path.

A leaf module: ``config`` and the controllers' own config sections (``control.build``) both
read through it, so neither imports the other.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """Bad configuration input; the message names the key (and file) and what was expected."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key``."""
    if tp is Any:
        _check_plain(value, key)
        return value
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value if value is not None else {}, key)
    origin = typing.get_origin(tp)
    expected = _type_name(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")
    if origin in (typing.Union, types.UnionType):
        classes = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if classes and isinstance(value, dict):  # keep the inner key's own error message
            return from_mapping(classes[0], value, key)
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _check_value(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: got {value!r}, expected a list ({expected})")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping ({expected})")
        key_tp, val_tp = typing.get_args(tp)
        return {
            _check_value(k, key_tp, f"{key} key"): _check_value(v, val_tp, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: got {value!r}, expected a number") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{key}: got {value!r}, expected a finite number")
            return float(value)
        raise ConfigError(f"{key}: got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected a string")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _check_plain(value: Any, key: str, limit: int = 10_000, max_depth: int = 32) -> None:
    """Free-form values stay small plain data: YAML aliases can expand a few lines into
    billions of leaves (an 'alias bomb')."""
    stack, seen = [(value, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > limit or depth > max_depth:
            raise ConfigError(f"{key}: value too large or too deeply nested")
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                raise ConfigError(f"{key}: mapping keys must be strings")
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
        elif not (node is None or isinstance(node, (str, int, float, bool))):
            raise ConfigError(f"{key}: got {type(node).__name__}, expected plain data")


def from_mapping(cls: type, data: Any, prefix: str) -> Any:
    """``cls`` from plain data; unknown keys, wrong types and missing keys fail by path."""
    if not isinstance(data, dict):
        where = prefix or "the config"
        raise ConfigError(f"{where}: got {type(data).__name__}, expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key)
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{near[0]}'?" if near else ""
            raise ConfigError(f"unknown key '{path}'{hint} (valid: {', '.join(sorted(fields))})")
        kwargs[key] = _check_value(value, hints[key], path)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix or cls.__name__}: missing key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix}: {exc}" if prefix else str(exc)) from None
