"""Reading config values: YAML files and ``--set key=value`` overrides into the dataclasses of
:mod:`pipeline.config`, with every value checked against its field's annotation. Generic over
dataclasses (nothing here knows the config's sections); :mod:`pipeline.config` owns the
sections, their defaults and the cross-field rules.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

from preprocess.errors import UsageError

__all__ = ["ConfigError", "apply_values", "nest_key", "parse_override", "read_yaml"]


class ConfigError(UsageError):
    """A bad config file, key or value (exit code 2, one line on stderr)."""



def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp) -> Any:
    """Check/convert ``value`` against the annotation ``tp``; ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"config key '{key}': expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) if item is not Any else v for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        # YAML 1.1 reads "1e3" as a string; accept any integral number
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        # PyYAML reads 2e-5 (no dot) as a string: accept numeric strings
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_values(obj: Any, values: dict, prefix: str = "") -> None:
    """Set the fields of dataclass ``obj`` from the nested dict ``values``."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {values!r}")
    hints = _section_types(type(obj))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in hints:
            raise ConfigError(f"unknown config key '{key}'")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            apply_values(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=2.0e-3'`` -> ``('optim.lr', 0.002)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value (e.g. --set optim.lr=0.002)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({_yaml_problem(err, column_only=True)})")
    return key, value


def _yaml_problem(err: yaml.YAMLError, column_only: bool = False) -> str:
    """``'could not find expected ':' at line 3, column 5'`` (1-based) from a PyYAML error."""
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if mark is None:
        return str(problem)
    where = f"column {mark.column + 1}" if column_only else f"line {mark.line + 1}, column {mark.column + 1}"
    return f"{problem} at {where}"


def nest_key(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping from ``path`` (empty file -> {}); ConfigError on a missing/bad file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a directory; pass a YAML file (e.g. configs/reach_myow.yaml)") from None
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror or err}); check the path and "
                          "its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                          "save the file as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: YAML syntax error: {_yaml_problem(err)}; fix the file") from None
    except RecursionError:
        raise ConfigError(f"--config {path}: nested too deeply to be a config; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections (data:, model:, ...) at the top")
    return data
