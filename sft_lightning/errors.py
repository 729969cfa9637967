"""Errors the user can fix. Each message is one complete line; the CLI prints it without a traceback."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse


class DataError(ValueError):
    """Bad input data: the message names the file, the 1-based line or record, and what is wrong."""


class SharedDataError(DataError):
    """A :class:`DataError` that every process of a run raises alike (one found while they prepare together): the
    first process says it, the others exit without repeating it."""


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


def check_range(name: str, value, at_least=None, above=None, at_most=None) -> None:
    """A setting outside its sensible range as one line (``name=value: ...``), before it fails far away as a
    ``ZeroDivisionError`` or a ``range()`` error; None (not set) passes."""
    if value is None:
        return
    if at_least is not None and value < at_least:
        raise ConfigError(f"{name}={value}: must be at least {at_least}")
    if above is not None and value <= above:
        raise ConfigError(f"{name}={value}: must be more than {above}")
    if at_most is not None and value > at_most:
        raise ConfigError(f"{name}={value}: must be at most {at_most}")


# What makes a folder loadable by from_pretrained, by what is loaded from it.
REQUIRED_FILES = {
    "model": ("config.json",),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"),
}


@contextmanager
def loading(path: str, what: str):
    """Turn the loaders' OSError (missing folder, unknown hub name, no network) and ValueError (a config they
    cannot read) into one clear line.

    A path that exists must be a Hugging Face folder; one that looks local (absolute, ``./``, ``~``, more than one
    ``/``, or under an existing folder) and does not exist is an error without a hub lookup; a hub name is tried
    only when the hub answers (transformers retries for about a minute), unless ``HF_HUB_OFFLINE`` is set.
    """
    _check_source(path, what)
    try:
        yield
    except (OSError, ValueError) as err:  # ValueError: a config.json without model_type, an unknown architecture
        raise ModelLoadError(f"{what} {path!r} cannot be loaded: {str(err).splitlines()[0]}") from None


def _check_source(path: str, what: str) -> None:
    if check_local_source(path, what):
        return
    if not os.environ.get("HF_HUB_OFFLINE") and not _hub_reachable():
        raise ModelLoadError(
            f"{path}: not a local folder, and the Hugging Face hub cannot be reached: give a local folder, or set "
            "HF_HUB_OFFLINE=1 to load it from the local hub cache"
        )


def check_local_source(path: str, what: str) -> bool:
    """True if ``path`` is a loadable local folder, False if it reads as a hub name; a one-line error otherwise."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not any((local / name).is_file() for name in REQUIRED_FILES[what]):
            exported = sorted(local.rglob("hf_model/config.json"), key=lambda found: found.stat().st_mtime)
            hint = f"; the newest exported model under it is {exported[-1].parent}" if exported else ""
            raise ModelLoadError(
                f"{path}: not a Hugging Face {what} folder (it has no {' or '.join(REQUIRED_FILES[what])}){hint}"
            )
        return True
    if local.exists():
        raise ModelLoadError(f"{path}: a file, not a Hugging Face {what} folder")
    first = Path(path).parts[0] if Path(path).parts else ""
    looks_local = local.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1 or Path(first).is_dir()
    if looks_local:
        raise ModelLoadError(f"{path}: no such {what} folder")
    return False


@lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError:
        return False
    return True
