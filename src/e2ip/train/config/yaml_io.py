"""The run configuration: one YAML file, validated on load.

An unknown or misspelt key, a wrong type or a missing file is a one-line :class:`ConfigError`
naming the key or path. Command-line overrides use `section.key=value` (value parsed as YAML).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from e2ip.errors import ConfigError, first_line
from e2ip.files import atomic_write_text
from e2ip.train.config.checks import config_from_dict, short_value
from e2ip.train.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config"]


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {short_value(text)} must look like section.key=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except Exception:  # noqa: BLE001 - not YAML (or YAML that cannot be built): the plain text
        parsed = value
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {short_value(text)}: the key {key.strip()!r} has an empty part; "
                          "write section.key=value")
    return path, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`raw` with each `section.key=value` override set (sections created as needed)."""
    raw = dict(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is not None and not isinstance(child, dict):
                where = ".".join(path[:depth + 1])
                raise ConfigError(f"override {short_value(text)}: '{where}' is a {type(child).__name__} "
                                  f"({short_value(child)}), not a section of keys")
            node[part] = dict(child or {})
            node = node[part]
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (None: defaults), apply `section.key=value` overrides and validate."""
    raw = read_yaml_mapping(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw)


def read_yaml_mapping(path: str | Path) -> dict:
    """The top-level mapping of a YAML file, or a one-line ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a YAML config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}: "
                          f"{exc.object[exc.start:exc.start + 1]!r})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - YAMLError, or a value YAML cannot build
        raise ConfigError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the configuration as YAML, atomically (temporary file + rename)."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def flat_config(cfg: Config) -> dict[str, Any]:
    """{'section.key': value} for every key (backbone options as model.<backbone>.<key>)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix.rstrip(".")] = node

    walk("", cfg.to_dict())
    return out


def config_diff(a: Config, b: Config) -> list[str]:
    """The keys whose values differ between two configurations (sorted)."""
    fa, fb = flat_config(a), flat_config(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
