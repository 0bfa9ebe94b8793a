"""The run configuration: one YAML file, validated on load.

An unknown or misspelt key, a wrong type or a missing file is a one-line :class:`ConfigError`
naming the key or path. Command-line overrides use `section.key=value` (value parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.splits import check_split
from ..errors import ConfigError, DataError, first_line, short_repr
from ..files import atomic_write_text

__all__ = ["Config", "ConfigError", "load_config"]


@dataclass
class DataConfig:
    """train: data file (None: the built-in demo set); validation/test: separate files, else cut
    from `train` by `split` (fractions train/validation/test, shuffled with `seed`);
    n_train/n_validation/n_test: caps on the number of structures; energy_key/forces_key: extxyz keys;
    energy_key null: train on forces alone (data without energies; no energy loss, zero reference
    energies, so predicted energies are defined up to a constant; forces are required: the
    uncertainty heads learn from force labels);
    energy_unit/length_unit: units in the files (None: eV/Å for xyz, kcal/mol/Å for npz);
    reference_energies: 'fit' (least squares on train), 'zero', or an isolated-atoms file;
    report_units: energy unit of reported metrics ('eV' or 'kcal/mol');
    batch_size: structures per training step and per process (under DDP the global batch is
    batch_size x the number of processes); num_workers: DataLoader worker processes per training
    process (0: load in the training process);
    allow_duplicates: accept structures that occur twice in one data file (same atoms at the same
    positions; by default an error naming both frames, since a copy can land in both the
    training and the test split)."""

    train: str | None = None
    validation: str | None = None
    test: str | None = None
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    n_train: int | None = None
    n_validation: int | None = None
    n_test: int | None = None
    seed: int = 0
    energy_key: str | None = "energy"
    forces_key: str = "forces"
    energy_unit: str | None = None
    length_unit: str | None = None
    reference_energies: str = "fit"
    batch_size: int = 8
    eval_batch_size: int = 32
    report_units: str = "eV"
    allow_duplicates: bool = False
    num_workers: int = 0


@dataclass
class ModelConfig:
    """backbone: painn | tensor_product | alphanet; head: e2ip | eip | cholesky | none;
    cutoff in Å; dtype float32 | float64. Backbone hyperparameters go in a sub-section named
    after the backbone (e.g. `model.painn.num_features`)."""

    backbone: str = "painn"
    head: str = "e2ip"
    cutoff: float = 5.0
    dtype: str = "float32"
    backbone_options: dict[str, dict] = field(default_factory=dict)


@dataclass
class TrainingConfig:
    """Loss weights: energy_weight on the per-atom energy MSE (in units of sigma_F^2),
    force_weight on the head's per-atom loss (NLL + reg for uncertainty heads, MSE otherwise),
    mse_weight on an extra force MSE for uncertainty heads. max_time in minutes (None: no limit).
    ema_decay: exponential moving average of the weights, used for validation, checkpoints and
    the saved model (None: off); its decay ramps up as min(ema_decay, (1 + n) / (10 + n)) after
    n updates, so short runs export trained weights, not their initialisation.
    patience: early stopping on the validation loss (epochs).
    recalibrate: after training, fit the model's post-hoc calibration on the validation set (a
    variance scale for single models, the coverage-fitted floor for ensembles); metrics are then
    reported in the form 'cal', with the raw ones beside them.
    init_from: a trained model file (or run folder) to fine-tune: its weights, architecture,
    elements, scales and reference energies are used (the model and head sections are ignored;
    an element it does not know is an error). scheduler_*: ReduceLROnPlateau on the validation
    loss. accelerator/devices/strategy/num_nodes: passed to the Lightning Trainer (e.g. 'gpu', 4,
    'ddp', 2: four GPUs on each of two nodes; see docs/distributed.md); devices is a count, -1
    (all), 'auto' or a list of device indices.
    num_threads: torch intra-op threads (None: torch's default). grad_clip: gradient-norm clip.
    max_bad_steps: a step whose loss or gradient is NaN or inf is skipped (the weights are not
    touched) and logged; after this many such steps in a row the run stops with an error naming
    the batch's structures, keeping its last good checkpoint for --resume.
    compile: run the model's energy-and-forces path through torch.compile (forces by
    torch.func.grad inside the compiled function, so the training step's double backward works);
    the first steps pay the compilation (tens of seconds), see docs/performance.md for when it
    pays off."""

    max_epochs: int = 200
    max_time: float | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    energy_weight: float = 1.0
    force_weight: float = 1.0
    mse_weight: float = 1.0
    grad_clip: float | None = 10.0
    ema_decay: float | None = 0.99
    patience: int = 40
    recalibrate: bool = True
    scheduler_patience: int = 10
    scheduler_factor: float = 0.5
    min_lr: float = 1e-5
    seed: int = 0
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    num_threads: int | None = None
    progress_bar: bool = True
    tensorboard: bool = False
    init_from: str | None = None
    max_bad_steps: int = 10
    compile: bool = False


@dataclass
class EnsembleConfig:
    """size: number of members (1: a single model); members differ in seed (and data order)."""

    size: int = 1


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: dict[str, Any] = field(default_factory=dict)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        options = out["model"].pop("backbone_options")
        out["model"].update(options)
        return out


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig,
             "ensemble": EnsembleConfig}


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


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _short(value: Any) -> str:
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
            raise ConfigError(f"'{name}' must be finite, got {_short(value)}")
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


def _build_section(cls, values: dict, where: str):
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
                f"'{where}{key}' must be {_type_name(hints[key])}, got {_short(value)}"
            )
        _check_value(value, f"{where}{key}")
        if hints[key] is float and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def _validate_options(hp_cls, options: dict, where: str) -> None:
    """Check a hyperparameter dict against a dataclass (keys and types)."""
    _build_section(hp_cls, options, where)


def config_from_dict(raw: dict | None) -> Config:
    """Validate a nested dict (as read from YAML) into a :class:`Config`."""
    from ..backbones import BACKBONES
    from ..heads import HEADS

    raw = dict(raw or {})
    known = set(_SECTIONS) | {"head"}
    for key in raw:
        if key not in known:
            raise _unknown(key, known, "")
    sections = {}
    for name in ("head", *_SECTIONS):
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise ConfigError(f"'{name}' must be a mapping of keys, got "
                              f"{type(raw[name]).__name__} {_short(raw[name])}")
    for name, cls in _SECTIONS.items():
        values = dict(raw.get(name) or {})
        if name == "model":
            options = {k: values.pop(k) for k in list(values) if k in BACKBONES}
            sections[name] = _build_section(cls, values, "model.")
            for bname, opts in options.items():
                _validate_options(BACKBONES[bname].Hyperparameters, opts or {}, f"model.{bname}.")
            sections[name].backbone_options = {k: dict(v or {}) for k, v in options.items()}
        else:
            sections[name] = _build_section(cls, values, f"{name}.")
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
    from ..data.units import energy_factor, length_factor

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
                          f"'auto' or a list of device indices, got {_short(devices)}")


def _check_file(key: str, path: str) -> None:
    """A ConfigError unless `path` (the value of `key`) is an existing file."""
    if not Path(path).exists():
        raise ConfigError(f"'{key}': file not found: {path}")
    if Path(path).is_dir():
        raise ConfigError(f"'{key}': {path} is a directory, expected a file")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {_short(text)} must look like section.key=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except Exception:  # noqa: BLE001 - not YAML (or YAML that cannot be built): the plain text
        parsed = value
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {_short(text)}: the key {key.strip()!r} has an empty part; "
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
                raise ConfigError(f"override {_short(text)}: '{where}' is a {type(child).__name__} "
                                  f"({_short(child)}), not a section of keys")
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
