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
