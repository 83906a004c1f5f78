"""The `einpart` command. Each area registers its own subcommands (see
COMMAND_MODULES); this module parses arguments and turns every EinpartError
into one message on stderr and exit status 1, never a traceback."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import progress
from .errors import EinpartError

# Modules that define `register(subparsers)`, each adding subcommands whose
# `func(args) -> int` runs them.
COMMAND_MODULES = (
    "einpart.cli_ir",
    "einpart.cli_frontend",
    "einpart.passes.shard.cli",
    "einpart.cli_run",
    "einpart.reports.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="einpart",
        description="Compile transformer inference written as einsum cascades into sharded JAX programs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():     # every subcommand: -v (einpart.progress), unless it has its own
        if "-v" not in command._option_string_actions and "--verbose" not in command._option_string_actions:
            command.add_argument("-v", "--verbose", action="store_true",
                                 help="print each pass's time and each long step's (on stderr)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    progress.configure(verbose=getattr(args, "verbose", False))   # progress: stderr, on a terminal
    try:
        return int(args.func(args) or 0)
    except EinpartError as e:
        print(str(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("einpart: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
