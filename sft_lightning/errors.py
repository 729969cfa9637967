"""Errors the user can fix. Each message is one complete line; the CLI prints it without a traceback."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


class DataError(ValueError):
    """Bad input data: the message names the file, the 1-based line or record, and what is wrong."""


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be rendered or masked reliably."""


class ModelLoadError(ValueError):
    """A model or tokenizer cannot be loaded."""


class NonFiniteError(ArithmeticError):
    """Too many optimizer steps in a row had a NaN or infinite loss or gradient."""


class PackingError(ValueError):
    """Packed samples would attend to each other with the configured attention."""


class CheckFailed(ValueError):
    """``sft-lightning data check`` found a problem; its report says which and why."""


class ConfigError(ValueError):
    """Settings that cannot work together (checked before anything is written)."""


USER_ERRORS = (CheckFailed, ConfigError, NonFiniteError, PackingError, DataError, TemplateError, ModelLoadError, FileNotFoundError)


@contextmanager
def loading(path: str, what: str):
    """Turn the loaders' OSError (missing folder, unknown hub name, no network) into one clear line."""
    looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") > 1
    if looks_local and not Path(path).exists():
        raise ModelLoadError(f"{path}: no such {what} folder")
    try:
        yield
    except OSError as err:
        raise ModelLoadError(f"{what} {path!r} cannot be loaded: {str(err).splitlines()[0]}") from None
