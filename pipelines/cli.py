"""The ``pipeline`` command line.

Usage::

    pipeline --version
    pipeline validate pipeline.yaml [--secrets secrets.env] [--format json]
    pipeline components [TYPE]
    python -m pipelines.cli validate ...     # the same, without the console script

Subcommands come from the modules in ``pipelines/commands/`` (see that package's
docstring). ``main`` returns the exit code instead of exiting, so tests can call it:
0 success, 1 the command found problems, 2 usage errors or a command that failed (printed as
one line, secrets redacted, never a traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pipelines import __version__
from pipelines.commands import command_modules
from pipelines.secrets import install_log_redaction, redact

PROG = "pipeline"


Parsers = dict[str, argparse.ArgumentParser]


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, Parsers]:
    """The parser with every command, or with just the module named ``only`` when it exists."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Self-hosted router for device data with Golioth-compatible pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules, failed = command_modules(only)
    for module in modules:
        module.add_parser(subparsers)
    for name, exc in failed:
        print(f"{PROG}: warning: command module {name!r} could not be loaded: "
              f"{type(exc).__name__}: {redact(str(exc))}", file=sys.stderr)
    return parser, dict(subparsers.choices)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args_list if not a.startswith("-")), None)
    parser, commands = build_parser(only=first) if first else build_parser()
    if first is not None and first not in commands:
        # the command lives in a module named otherwise: load them all
        parser, commands = build_parser()

    # an unknown command (or none) shows the help rather than argparse's terse error
    wants_top_option = any(a in ("-h", "--help", "--version") for a in args_list[:1])
    if not wants_top_option and (first is None or first not in commands):
        if first is not None:
            print(f"{PROG}: unknown command {first!r}", file=sys.stderr)
        parser.print_help(sys.stderr)
        return 2

    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    install_log_redaction()  # handlers set up later by a command install it again themselves

    func = getattr(args, "func", None)
    if func is None:
        commands[args.command].print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as shells expect
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - replaces the dead stdout for good
        return 141
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG} {args.command}: error: {redact(reason)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
