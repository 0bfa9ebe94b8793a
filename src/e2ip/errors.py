"""The project's error types. Each carries one line meant for a user: the CLI prints it as
``e2ip <command>: error: <message>`` and exits with status 2, never with a traceback."""

from __future__ import annotations


class E2IPError(Exception):
    """Base of every error e2ip raises on purpose (bad input, bad configuration, bad model file)."""


class DataError(E2IPError, ValueError):
    """Bad input data; the message names the file, frame and field."""


class ConfigError(E2IPError, ValueError):
    """A configuration or command-line problem; the message names the key, flag or path."""


class ModelError(E2IPError, ValueError):
    """A model file that cannot be used, or a request the model cannot serve (for example
    calibrating a model that has no uncertainty head, or a device this machine lacks)."""


class TrainingError(E2IPError, RuntimeError):
    """A training run that cannot go on (for example repeated non-finite losses or gradients);
    the message names the batch's structures, and the last good checkpoint is kept."""


# --- one-line message helpers (every message is one line, see the module docstring) ----------

def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, ending in '...' when cut."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short_repr(value, limit: int = 60) -> str:
    """repr(value) on one line and at most `limit` characters (for values read from a file)."""
    return shorten(" ".join(repr(value).split()), limit)


def first_line(exc: BaseException, limit: int = 160, with_type: bool = False) -> str:
    """The first line of an exception's message (its type name when empty), at most `limit`
    characters; with_type: as ``Type: first line`` (cut with '...')."""
    if with_type:
        first = (str(exc).strip().splitlines() or [""])[0]
        return shorten(f"{type(exc).__name__}: {first}" if first else type(exc).__name__, limit)
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
