"""Checking a configuration read from YAML: types, finite values, sizes, unknown keys (with
suggestions), files and devices; every problem one line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

from e2ip.data.splits import check_split
from e2ip.errors import ConfigError, DataError, short_repr
from e2ip.train.config.schema import SECTIONS, Config


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _accepts_float(hint) -> bool:
    if hint is float:
        return True
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint)


def _float_or_same(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def short_value(value: Any) -> str:
    """A value in a message: one line, at most 80 characters."""
    return short_repr(value, 80)


def _unknown(key, known, where: str) -> ConfigError:
    key = repr(str(key))[1:-1][:80]  # control characters escaped: the message stays one line
    close = difflib.get_close_matches(key.split(".")[-1], list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{where}{key}'{hint}")


#: deepest nesting of lists and mappings, and most values in all, accepted in one config value
MAX_NESTING = 16


MAX_ITEMS = 10_000


def _check_value(value, name: str) -> None:
    """A ConfigError if `value` is, or holds in its lists and mappings, a NaN or infinite float,
    refers to itself (a recursive YAML alias), nests deeper than MAX_NESTING levels, or expands
    to more than MAX_ITEMS values (a YAML alias bomb: each alias is one more full copy once the
    configuration is written out)."""
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()

    def size(item, depth: int) -> int:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"'{name}' must be finite, got {short_value(value)}")
        if not isinstance(item, (list, tuple, dict)):
            return 1
        if id(item) in ancestors:
            raise ConfigError(f"'{name}' refers to itself (a recursive YAML alias)")
        if id(item) not in sizes:
            if depth >= MAX_NESTING:
                raise ConfigError(f"'{name}' nests lists or mappings more than {MAX_NESTING} "
                                  "levels deep")
            ancestors.add(id(item))
            children = item.values() if isinstance(item, dict) else item
            sizes[id(item)] = 1 + sum(size(child, depth + 1) for child in children)
            ancestors.discard(id(item))
        if sizes[id(item)] > MAX_ITEMS:
            raise ConfigError(f"'{name}' holds more than {MAX_ITEMS} values")
        return sizes[id(item)]

    size(value, 0)


def build_section(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"'{where.rstrip('.')}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown(key, names, where)
        if isinstance(value, str) and _accepts_float(hints[key]):
            value = _float_or_same(value)  # YAML 1.1 reads '5e-3' (no dot) as a string
        if not _type_ok(value, hints[key]):
            raise ConfigError(
                f"'{where}{key}' must be {type_name(hints[key])}, got {short_value(value)}"
            )
        _check_value(value, f"{where}{key}")
        if hints[key] is float and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def _validate_options(hp_cls, options: dict, where: str) -> None:
    """Check a hyperparameter dict against a dataclass (keys and types)."""
    build_section(hp_cls, options, where)


def config_from_dict(raw: dict | None) -> Config:
    """Validate a nested dict (as read from YAML) into a :class:`Config`."""
    from e2ip.backbones import BACKBONES
    from e2ip.heads import HEADS

    raw = dict(raw or {})
    known = set(SECTIONS) | {"head"}
    for key in raw:
        if key not in known:
            raise _unknown(key, known, "")
    sections = {}
    for name in ("head", *SECTIONS):
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise ConfigError(f"'{name}' must be a mapping of keys, got "
                              f"{type(raw[name]).__name__} {short_value(raw[name])}")
    for name, cls in SECTIONS.items():
        values = dict(raw.get(name) or {})
        if name == "model":
            options = {k: values.pop(k) for k in list(values) if k in BACKBONES}
            sections[name] = build_section(cls, values, "model.")
            for bname, opts in options.items():
                _validate_options(BACKBONES[bname].Hyperparameters, opts or {}, f"model.{bname}.")
            sections[name].backbone_options = {k: dict(v or {}) for k, v in options.items()}
        else:
            sections[name] = build_section(cls, values, f"{name}.")
    cfg = Config(head=dict(raw.get("head") or {}), **sections)
    m = cfg.model
    if m.backbone not in BACKBONES:
        raise ConfigError(f"'model.backbone' must be one of {sorted(BACKBONES)}, got {m.backbone!r}")
    if m.head not in HEADS:
        raise ConfigError(f"'model.head' must be one of {sorted(HEADS)}, got {m.head!r}")
    if m.dtype not in ("float32", "float64"):
        raise ConfigError(f"'model.dtype' must be float32 or float64, got {m.dtype!r}")
    if m.cutoff <= 0:
        raise ConfigError(f"'model.cutoff' must be > 0, got {m.cutoff}")
    _validate_options(HEADS[m.head].Hyperparameters, cfg.head, "head.")
    if cfg.ensemble.size < 1:
        raise ConfigError(f"'ensemble.size' must be >= 1, got {cfg.ensemble.size}")
    if cfg.ensemble.calibration not in ("nll", "paper_floor"):
        raise ConfigError(f"'ensemble.calibration' must be nll or paper_floor, got "
                          f"{cfg.ensemble.calibration!r}")
    if cfg.ensemble.calibration == "paper_floor" and m.head != "none" and cfg.ensemble.size > 1:
        raise ConfigError("'ensemble.calibration: paper_floor' is the paper's recipe for plain "
                          "ensembles (model.head: none); use nll")
    if cfg.head.get("calibration_r_bins") and cfg.ensemble.size > 1:
        raise ConfigError("'head.calibration_r_bins' bins a single model's feature distance; an "
                          "ensemble (ensemble.size > 1) is calibrated on its members' spread and "
                          "would ignore it: set it to 0 or ensemble.size to 1")
    if len(cfg.data.split) != 3:
        raise ConfigError(f"'data.split' must have 3 fractions (train, validation, test), "
                          f"got {cfg.data.split}")
    try:
        check_split(cfg.data.split, "'data.split' fractions")
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    for key in ("batch_size", "eval_batch_size"):
        if getattr(cfg.data, key) < 1:
            raise ConfigError(f"'data.{key}' must be >= 1, got {getattr(cfg.data, key)}")
    for key in ("n_train", "n_validation", "n_test"):
        if getattr(cfg.data, key) is not None and getattr(cfg.data, key) < 1:
            raise ConfigError(f"'data.{key}' must be >= 1 (or null), got {getattr(cfg.data, key)}")
    t = cfg.training
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        raise ConfigError(f"'training.ema_decay' must be in (0, 1) or null, got {t.ema_decay}")
    if t.max_epochs < 1:
        raise ConfigError(f"'training.max_epochs' must be >= 1, got {t.max_epochs}")
    if t.num_nodes < 1:
        raise ConfigError(f"'training.num_nodes' must be >= 1, got {t.num_nodes}")
    _check_devices(t.devices)
    if cfg.data.num_workers < 0:
        raise ConfigError(f"'data.num_workers' must be >= 0, got {cfg.data.num_workers}")
    if t.max_bad_steps < 1:
        raise ConfigError(f"'training.max_bad_steps' must be >= 1, got {t.max_bad_steps}")
    if t.init_from is not None and not Path(t.init_from).exists():
        raise ConfigError(f"'training.init_from': file not found: {t.init_from}")
    if cfg.data.report_units.lower() not in ("ev", "kcal/mol", "mev", "kj/mol"):
        raise ConfigError(f"'data.report_units' must be eV, meV, kcal/mol or kJ/mol, "
                          f"got {cfg.data.report_units!r}")
    from e2ip.data.units import energy_factor, length_factor

    for key, factor in (("energy_unit", energy_factor), ("length_unit", length_factor)):
        if getattr(cfg.data, key) is not None:
            try:
                factor(getattr(cfg.data, key))
            except ConfigError as exc:
                raise ConfigError(f"'data.{key}': {exc}") from None
    for key in ("train", "validation", "test"):
        if getattr(cfg.data, key) is not None:
            _check_file(f"data.{key}", getattr(cfg.data, key))
    if cfg.data.reference_energies not in ("fit", "zero"):
        _check_file("data.reference_energies", cfg.data.reference_energies)
    return cfg


def _check_devices(devices: Any) -> None:
    """A ConfigError unless `devices` is what the Lightning Trainer takes: a count >= 1, -1 (all),
    'auto', a list of device indices, or such a list as text ('0,1')."""
    def index(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if isinstance(devices, int) and not isinstance(devices, bool):
        ok = devices >= 1 or devices == -1
    elif isinstance(devices, str):
        text = devices.strip()
        parts = [p.strip() for p in text.split(",") if p.strip()]
        ok = (text in ("auto", "-1") or (text.isdigit() and int(text) >= 1)
              or ("," in text and bool(parts) and all(p.isdigit() for p in parts)))
    elif isinstance(devices, list):
        ok = bool(devices) and all(index(v) for v in devices)
    else:
        ok = False
    if not ok:
        raise ConfigError(f"'training.devices' must be a number of devices (>= 1, or -1 for all), "
                          f"'auto' or a list of device indices, got {short_value(devices)}")


def _check_file(key: str, path: str) -> None:
    """A ConfigError unless `path` (the value of `key`) is an existing file."""
    if not Path(path).exists():
        raise ConfigError(f"'{key}': file not found: {path}")
    if Path(path).is_dir():
        raise ConfigError(f"'{key}': {path} is a directory, expected a file")
