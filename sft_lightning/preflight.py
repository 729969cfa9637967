"""The checks of ``fit | validate | test | predict`` that need no model code, run before Lightning is imported.

Importing Lightning (with torch, transformers and torchmetrics) takes 5-10 s; the commonest mistakes, a missing
config file, data file or model folder, a list of data sources that cannot be mixed (a negative weight, a weight
and a count), are answered in a fraction of a second. The values checked are the
ones the command will use (the ``--config`` files in order, then the ``--model.*`` and ``--data.*`` options;
each path of a list of data sources), and the checks are the functions the full path runs later, so the line is
the same either way. A value this reader cannot be sure of (a section given as a file or a dict, a glob, a hub
name) is left to the full path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

from sft_lightning.errors import ConfigError, check_local_source
from sft_lightning.sources import GLOB_CHARACTERS, require_source, resolve_sources

# The data files each verb reads.
VERB_DATA = {"fit": ("train_path", "val_path"), "validate": ("val_path",), "test": ("test_path",),
             "predict": ("predict_path",)}
SECTIONS = ("model", "data")


def preflight(argv: list[str]) -> None:
    """Raise the user error that ``argv`` (a verb and its options) would meet in the full path, if certain."""
    if not argv or argv[0] not in VERB_DATA or any(arg.split("=")[0] in ("-h", "--help", "--print_config") for arg in argv):
        return
    settings = _settings(argv[1:])
    if settings is None:
        return
    for name in VERB_DATA[argv[0]]:
        value = settings["data"].get(name)
        if _plain_sources(value):  # the full path's own check of the list: files, weights, counts
            resolve_sources(value, name, "auto")
            continue
        for source in value if isinstance(value, list) else [value]:
            path = source.get("path") if isinstance(source, dict) else source
            if _plain_path(path):
                require_source(path)
    model = settings["model"].get("model_name_or_path")
    if isinstance(model, str):
        check_local_source(model, "model")


def _plain_sources(value: Any) -> bool:
    """Whether ``value`` reads as the full parser would give it to :func:`resolve_sources`: a path, or a list of
    paths and ``{path, weight | conversations, format}`` with numbers where numbers go (anything else, such as a
    quoted weight the parser would convert, or a glob, is left to it)."""
    items = value if isinstance(value, list) else [value]
    number = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))  # noqa: E731
    return bool(items) and all(
        _plain_path(item) or (isinstance(item, dict) and _plain_path(item.get("path")) and number(item.get("weight"))
                              and number(item.get("conversations")))
        for item in items
    )


def _plain_path(path: Any) -> bool:
    """A path as written, not a glob or an inline value the full parser reads its own way."""
    return isinstance(path, str) and not any(char in path for char in GLOB_CHARACTERS + "{")


def _settings(options: list[str]) -> Optional[dict[str, dict[str, Any]]]:
    """The ``model`` and ``data`` values the options set; None when a section comes from somewhere not read here."""
    import yaml

    settings: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for key, value in _pairs(options):
        if key == "config":
            loaded = _config_file(value, yaml)
            for section in SECTIONS:
                if section in loaded and not isinstance(loaded[section], dict):
                    return None  # `data: data.yaml` or a class_path: the full parser reads it
                settings[section].update(loaded.get(section) or {})
        elif key in SECTIONS:
            return None  # --data '{...}' or --data data.yaml
        elif key.split(".")[0] in SECTIONS:
            section, _, name = key.partition(".")
            settings[section][name] = yaml.safe_load(value) if value is not None else None
    return settings


def _pairs(options: list[str]) -> Iterator[tuple[str, Optional[str]]]:
    """(key, value) for each ``--key value`` or ``--key=value``; a flag without a value gets None."""
    rest = iter(options)
    for option in rest:
        if not option.startswith("--"):
            continue
        key, equals, value = option[2:].partition("=")
        if not equals and (key == "config" or key.split(".")[0] in SECTIONS):
            value = next(rest, None)
        yield key, value if equals or value is not None else None


def _config_file(path: Optional[str], yaml) -> dict:
    if path is None or any(mark in path for mark in ("{", "\n", ": ")):
        return {}  # a config given inline, not a file: the full parser reads it
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    return loaded if isinstance(loaded, dict) else {}
