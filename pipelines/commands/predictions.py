"""``pipeline predictions``: run the local Replicate-compatible predictions service.

    pipeline predictions serve --port 8008 --token r8_local [--webhook-secret whsec_...]
    pipeline predictions build-model          # build the ONNX model into the cache once

Same options as ``python -m predictions_service`` (see ``predictions_service.cli``).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from predictions_service.cli import add_subcommands

    parser = subparsers.add_parser(
        "predictions",
        help="local Replicate-compatible predictions service",
        description="Local Replicate-compatible predictions service",
    )
    add_subcommands(parser)
    parser.set_defaults(func=run, _predictions_parser=parser)


def run(args: argparse.Namespace) -> int:
    func = getattr(args, "predictions_func", None)
    if func is None:
        args._predictions_parser.print_help()
        return 2
    return func(args)
