"""What the readers share: path checks and frame selection (``index``: ``:``, ``-5:``, ``::10``...)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from e2ip.data.structures import DataError
from e2ip.errors import ConfigError

if TYPE_CHECKING:
    pass


def check_path(path: str | os.PathLike) -> Path:
    """`path` as a Path; DataError when it is missing, a directory, empty or unreadable."""
    path = Path(path)
    try:
        exists, is_dir = path.exists(), path.is_dir()
        empty = exists and not is_dir and path.stat().st_size == 0
    except (OSError, ValueError) as exc:  # permissions, a name the OS refuses, ...
        raise DataError(f"{path}: cannot be read ({exc})") from None
    if not exists:
        raise DataError(f"{path}: file not found")
    if is_dir:
        raise DataError(f"{path}: is a directory, expected a data file")
    if empty:
        raise DataError(f"{path}: file is empty")
    return path


def index_to_slice(index: str | int | slice) -> int | slice:
    """The frame selection `index` (an int, a slice, or text such as '5', ':100', '::10') as an
    int or slice; a ConfigError for anything else."""
    problem = (f"index {index!r}: expected a frame number or a slice such as ':100', '10:20' "
               "or '::10'")
    if isinstance(index, str):
        parts = index.strip().split(":")
        if len(parts) > 3:
            raise ConfigError(problem)
        try:
            numbers = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            raise ConfigError(problem) from None
        index = numbers[0] if len(parts) == 1 else slice(*numbers)
        if index is None:
            raise ConfigError(problem)
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer, slice)):
        raise ConfigError(problem)
    if isinstance(index, slice):
        for part in (index.start, index.stop, index.step):
            if part is not None and not isinstance(part, (int, np.integer)):
                raise ConfigError(problem)
        if index.step == 0:
            raise ConfigError(f"index {index!r}: the step of a slice cannot be 0")
        return index
    return int(index)


def frame_numbers(index, count: int) -> list[int]:
    """Frame numbers in the file of the `count` frames selected by `index` (positions within the
    selection where the file's length would be needed, i.e. for negative indices)."""
    sel = index_to_slice(index)
    return [frame_number(sel, k) for k in range(count)]


def frame_number(sel: int | slice, k: int) -> int:
    """The frame number in the file of the k-th frame selected by `sel` (its position k in the
    selection where the file's length would be needed, i.e. for negative indices)."""
    if isinstance(sel, int):
        return sel if sel >= 0 else k
    start, step = sel.start or 0, sel.step or 1
    if start >= 0 and step > 0:
        return start + k * step
    return k
