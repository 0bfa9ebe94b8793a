"""Atomic file writes: write a temporary file in the same folder, then rename it into place, so a
crash never leaves a truncated or half-written file under the real name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Run `write(temporary_path)`, then rename the file into `path` (creates the folder); a
    failed write leaves no temporary file behind."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (creates the folder)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically (creates the folder)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
