"""The ``torch-crisp`` command line: the parser and the entry point.

Subcommands (each in its own module, registered in :data:`COMMANDS`):

* ``collect`` (:mod:`torch_crisp.commands.collect`): collect the K-FAC factors of a local Hugging
  Face model on a text corpus and save a projector folder.
* ``inspect`` (:mod:`torch_crisp.commands.inspect`): spectra and kept fractions of a saved projector.
* ``edit`` and ``demo`` (:mod:`torch_crisp.editing.cli`): knowledge editing, and the demo.

Adding a subcommand: write ``register_<name>(subparsers)`` that adds its parser and sets
``func=<run function taking the parsed args and returning an exit code>``, and append it to
:data:`COMMANDS`. User mistakes raise :class:`~torch_crisp.commands.common.CLIError` (or
``ValueError`` / ``OSError``) and are printed as one line with exit code 2; ``--traceback`` shows
the full trace for debugging.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .commands.collect import register_collect
from .commands.common import CLIError, first_line
from .commands.inspect import inspect_folder, register_inspect

__all__ = ["COMMANDS", "CLIError", "build_parser", "inspect_folder", "main"]

PROG = "torch-crisp"

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def register_editing(subparsers: argparse._SubParsersAction) -> None:
    """``edit`` and ``demo`` (in :mod:`torch_crisp.editing.cli`; transformers loads when they run)."""
    from .editing.cli import register

    register(subparsers)


COMMANDS: list[Registrar] = [register_collect, register_inspect, register_editing]
"""Subcommand registrars, in the order ``--help`` lists them."""


def build_parser(commands: Sequence[Registrar] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="CrispEdit tools: collect capability curvature once, inspect it, reuse it for editing.",
    )
    parser.add_argument("--traceback", action="store_true", help="show full Python tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in commands if commands is not None else COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``torch-crisp``; returns the exit code (0 success, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with 2 and a usage line on bad flags
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, OSError) as err:
        if args.traceback:
            raise
        print(f"{PROG} {args.command}: error: {first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
