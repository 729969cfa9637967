"""The ``sft-lightning`` command: fit | validate | test | predict (:class:`SFTLightningCLI`), the tools (``chat``,
``export``, ``estimate``, ``data ...``), and the one-line answer to every user error."""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError
from typing import Callable, Optional

import torch
from jsonargparse import ArgumentParser

from sft_lightning.chat import chat
from sft_lightning.data import convert, sample
from sft_lightning.data_check import check
from sft_lightning.entry import answered_without_loading, exit_with
from sft_lightning.errors import USER_ERRORS, SharedDataError
from sft_lightning.export import export
from sft_lightning.lightning_cli import SFTLightningCLI
from sft_lightning.memory import estimate
from sft_lightning.preemption import Preempted
from sft_lightning.prepare import prepare


def function_parser(function: Callable, prog: Optional[str] = None, positional: bool = False) -> ArgumentParser:
    """A parser whose options are ``function``'s typed, documented parameters (``--help`` shows them)."""
    parser = ArgumentParser(prog=prog, description=function.__doc__.splitlines()[0], allow_abbrev=False,
                            exit_on_error=False)
    # `overrides` (data check) collects the fit options that follow the config; not an option of its own.
    parser.add_function_arguments(function, as_positional=positional, skip={"overrides"})
    return parser


def run_function(function: Callable, prog: str, args: list[str]) -> None:
    function(**vars(function_parser(function, prog).parse_args(args)))


def data_main(args: list[str]) -> None:
    """``sft-lightning data sample | convert | check``: one subcommand per function, required values positional."""
    parser = ArgumentParser(prog="sft-lightning data", description="Data tools.", allow_abbrev=False,
                            exit_on_error=False)
    subcommands = parser.add_subcommands()
    for name, function in DATA_COMMANDS.items():
        command = function_parser(function, positional=name not in CONFIG_COMMANDS)  # check --config C, like fit
        subcommands.add_subcommand(name, command, help=command.description)
    args, overrides = _config_overrides(args) if args[:1] and args[0] in CONFIG_COMMANDS else (args, [])
    # `--from sharegpt` reads better than the parameter's name.
    config = parser.parse_args(["--format" if arg == "--from" else arg for arg in args])
    name = config.subcommand
    options = vars(config[name]) | ({"overrides": tuple(overrides)} if name in CONFIG_COMMANDS else {})
    DATA_COMMANDS[name](**options)


def _config_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """Split ``data check``'s (or ``prepare``'s) own options from the ``--model.*``/``--data.*`` ones it passes to the
    fit parser."""
    own, passed, rest = [], [], iter(args)
    for arg in rest:
        if arg.startswith(("--model.", "--data.")):
            passed += [arg] if "=" in arg else [arg, next(rest, "")]
        else:
            own.append(arg)
    return own, passed


DATA_COMMANDS = {"sample": sample, "convert": convert, "check": check, "prepare": prepare}
CONFIG_COMMANDS = ("check", "prepare")  # --config C then fit's --model.* and --data.* options
EXTRA_VERBS = {"export": export, "chat": chat, "estimate": estimate}


def cli_main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``sft-lightning``; ``args`` lets tests and notebooks run it in-process."""
    argv = sys.argv[1:] if args is None else list(args)
    if not torch.cuda.is_available():
        # DeepSpeed (imported by transformers and Lightning when installed) otherwise prints a warning on stdout
        # that it fell back to the CPU; on a GPU machine its own detection runs.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if answered_without_loading(argv):
        return
    try:
        if argv[0] == "data":
            data_main(argv[1:])
        elif argv[0] in EXTRA_VERBS:
            run_function(EXTRA_VERBS[argv[0]], f"sft-lightning {argv[0]}", argv[1:])
        else:
            SFTLightningCLI(args=args)
    except USER_ERRORS as err:
        if isinstance(err, SharedDataError) and torch.distributed.is_initialized() and torch.distributed.get_rank():
            sys.exit(2)  # the same line as global rank 0's, which says it
        exit_with(err)
    except ArgumentError as err:  # from the parsers: an unknown option, a value of the wrong type
        verb = " ".join(argv[:2] if argv[:1] == ["data"] else argv[:1])
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        exit_with(f"{message} (sft-lightning {verb} --help lists the options)")
    except Preempted as preempted:
        if preempted.is_global_zero:
            print(f"sft-lightning: preempted: {preempted}", file=sys.stderr)
        sys.exit(0)


if __name__ == "__main__":
    cli_main()
