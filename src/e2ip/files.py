"""Atomic file writes: write a temporary file in the same folder, then rename it into place, so a
crash never leaves a truncated or half-written file under the real name."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (creates the folder)."""
    path = Path(path)
    tmp = _temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically (creates the folder)."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:  # a failed write leaves no temporary file behind
        tmp.unlink(missing_ok=True)
