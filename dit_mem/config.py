"""Typed configs: YAML fills a dataclass, ``key=value`` overrides from the command line win.

    cfg = load_config(TrainConfig, "config/train_dit_mem.yaml", ["optim.lr=2e-5", "k=3"])
    save_config(cfg, run_dir / "config.yaml")

Nested dataclasses are addressed with dots. Values are parsed as YAML scalars and then
checked against the field's type (``int``, ``float``, ``bool``, ``str``, ``Path``,
``Literal[...]``, ``X | None``, ``tuple[...]``/``list[...]``). An unknown key is an error that
names the key and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dit_mem.errors import UserError
from dit_mem.utils.io import write_text_atomic

T = TypeVar("T")


class ConfigError(UserError):
    """A config file or override that does not fit the config's schema."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # X | None: X's own message
            return _coerce(value, members[0], key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _yaml_value(value, key)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], key) for v in value]
        elif origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            items = [_coerce(v, a, key) for v, a in zip(value, args, strict=True)]
        else:
            items = [_coerce(v, args[0] if args else Any, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    return value


def _yaml_value(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{key}: {text!r} is not a valid value") from None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} for {cls.__name__}; "
            f"valid keys: {', '.join(prefix + n for n in names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def _is_text(tp: Any) -> bool:
    """A field whose command-line value is text: str, Path, a Literal of strings, or X | None."""
    if tp is str or tp is Path:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        return bool(members) and all(_is_text(a) for a in members)
    return False


def _set_path(data: dict[str, Any], cls: type, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(node_cls)}
        if part not in names:
            raise ConfigError(
                f"unknown config key {'.'.join(parts[: i + 1])} for {node_cls.__name__}; "
                f"valid keys: {', '.join(sorted(names))}"
            )
        tp = _hints(node_cls)[part]
        if i == len(parts) - 1:
            node[part] = _yaml_value(raw, dotted) if raw != "" else ""
            if _is_text(tp):
                # keep text verbatim ("1e-5" stays text for a str field, "no" for a Literal["no"]),
                # "null" is None where None is allowed
                allows_none = type(None) in typing.get_args(tp)
                node[part] = None if allows_none and raw in ("null", "None", "~") else raw
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key {'.'.join(parts[: i + 1])} is not a section")
        sub = node.get(part)
        if not isinstance(sub, dict):
            sub = to_dict(sub) if dataclasses.is_dataclass(sub) else {}
            node[part] = sub
        node, node_cls = sub, tp


def parse_overrides(items: list[str] | None) -> list[tuple[str, str]]:
    """Split ``["a.b=1", "c=x"]`` into pairs; a missing ``=`` is an error."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        out.append((key.strip().replace("-", "_"), value.strip()))
    return out


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """A YAML config file's mapping (``{}`` without a file); ``ConfigError`` naming the file."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Build ``cls`` from dataclass defaults, then the YAML file, then ``key=value`` overrides."""
    data = read_yaml(path)
    for key, raw in parse_overrides(overrides):
        _set_path(data, cls, key, raw)
    return _from_dict(cls, data)


def with_overrides(cfg: T, overrides: list[str] | None) -> T:
    """A copy of config ``cfg`` with ``key=value`` overrides applied (and checked)."""
    data = to_dict(cfg)
    for key, raw in parse_overrides(overrides):
        _set_path(data, type(cfg), key, raw)
    return _from_dict(type(cfg), data)


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-able form of a config (Paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
