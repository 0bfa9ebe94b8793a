"""Named classes of one kind (backbones, heads, model kinds) and the hyperparameter dataclasses
that configure them: what the backbone and head registries, and the model-file registry, share."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class Registry(dict):
    """A dict from name to class. ``@registry.register`` adds a class under its attribute `key`
    (``name`` by default); :meth:`lookup` returns a class or raises a ValueError that lists the
    names known."""

    def __init__(self, what: str, key: str = "name"):
        super().__init__()
        self.what = what
        self.key = key

    def register(self, cls: type) -> type:
        """Class decorator: make `cls` available under ``cls.<key>``."""
        self[getattr(cls, self.key)] = cls
        return cls

    def lookup(self, name: str) -> type:
        if name not in self:
            raise ValueError(f"unknown {self.what} {name!r}; available: {', '.join(sorted(self))}")
        return self[name]


class Configurable:
    """Mixin for a class configured by a ``Hyperparameters`` dataclass, read from and written to
    a plain dictionary (the config's section, the model file's spec)."""

    Hyperparameters: ClassVar[type] = object

    @classmethod
    def hparams_from_dict(cls, options: dict | None) -> Any:
        return cls.Hyperparameters(**(options or {}))

    @classmethod
    def hparams_to_dict(cls, hparams) -> dict:
        return dataclasses.asdict(hparams)
