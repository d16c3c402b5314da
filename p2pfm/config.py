"""Strict configuration loading shared by the daemon, the swarm and the simulator.

Configs are frozen dataclasses whose defaults carry their reasons. Building one from a
TOML table (or from CLI flags) goes through :func:`build_config`, which rejects unknown
keys, checks types, and raises :class:`ConfigError` naming the offending field, never an
``assert`` or a bare ``TypeError`` from deep inside.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value (file, flag or environment) is missing, unknown or invalid."""


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning I/O and syntax errors into ConfigError naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` converted to ``annotation`` where lossless (int -> float), else raise."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(annotation)
        item_type = args[0] if args else Any
        items = [_check_type(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        key_type, value_type = typing.get_args(annotation) or (Any, Any)
        return {
            _check_type(k, key_type, f"{where} key"): _check_type(v, value_type, f"{where}.{k}")
            for k, v in value.items()
        }
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return build_config(annotation, value, where=where)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path string, got {type(value).__name__}")
        return Path(value)
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {type(value).__name__}")
    return value


def build_config(cls: type[T], values: Mapping[str, Any], *, where: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``values``: unknown keys and bad types are errors.

    Fields may define ``__post_init__`` checks that raise ConfigError for range violations.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(typing.cast(Any, cls)) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(prefix + k for k in unknown)} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _check_type(value, hints[name], prefix + name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # missing required fields
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None
    except ConfigError as exc:
        # Reusable configs (a CodecSpec is both gossip.codec and gossip.sync_codec) name their
        # fields bare; say which table the value came from.
        message = str(exc)
        if not where or message.startswith(prefix):
            raise
        # Configs with a home table name their fields from it (GPTConfig says "model.n_head");
        # embedded deeper (the simulator's workload.gpt.model), put the path above it in front.
        parent, _, table = where.rpartition(".")
        if parent and message.startswith(f"{table}."):
            raise ConfigError(f"{parent}.{message}") from None
        raise ConfigError(prefix + message) from None


def require(condition: bool, field: str, problem: str) -> None:
    """Raise ConfigError(field: problem) unless condition holds; use in ``__post_init__``."""
    if not condition:
        raise ConfigError(f"{field}: {problem}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON/TOML-friendly dict of a (nested) config dataclass, for logs and checkpoints."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)
