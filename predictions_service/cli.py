"""Command line of the local predictions service (shared by ``python -m predictions_service`` and
``pipeline predictions``).

    python -m predictions_service --port 8008 --token r8_local          # serve (the default)
    python -m predictions_service serve --host 0.0.0.0 --token A --token B --webhook-secret whsec_...
    python -m predictions_service build-model                           # build the ONNX into the cache

Tokens and the webhook secret can also come from files (``--token-file`` one token a line,
``--webhook-secret-file``) or the environment: ``PREDICTIONS_API_TOKENS`` (comma-separated) and
``PREDICTIONS_WEBHOOK_SECRET``. Given on the command line they are visible to every user in
``ps``: that works, with a warning.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

from .settings import FAULT_KINDS, Settings, new_webhook_secret


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8008, help="TCP port (0: pick a free one)")
    p.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="accepted API token (repeatable; visible in ps: prefer --token-file or PREDICTIONS_API_TOKENS=a,b)",
    )
    p.add_argument("--token-file", type=Path, metavar="FILE", help="accepted API tokens, one a line")
    p.add_argument("--allow-anonymous", action="store_true", help="serve requests without a token")
    p.add_argument(
        "--webhook-secret",
        metavar="whsec_...",
        help="webhook signing secret (visible in ps: prefer --webhook-secret-file or "
        "PREDICTIONS_WEBHOOK_SECRET); default: random per run",
    )
    p.add_argument("--webhook-secret-file", type=Path, metavar="FILE", help="read the webhook secret from FILE")
    p.add_argument("--create-rate", type=int, default=600, help="prediction creates per minute per token")
    p.add_argument("--other-rate", type=int, default=3000, help="other calls per minute per token")
    p.add_argument(
        "--fault-rate", type=float, default=0.0, help="probability (0-1) of an injected fault per call"
    )
    p.add_argument(
        "--fault-kinds",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated subset of {','.join(FAULT_KINDS)}",
    )
    p.add_argument("--fault-seed", type=int, help="seed for reproducible faults")
    p.add_argument(
        "--model-dir", type=Path, help="where the ONNX model is cached (default: see IOT_PIPELINES_MODEL_DIR)"
    )
    p.add_argument("--workers", type=int, default=1, help="concurrent model runs")
    p.add_argument("--public-base-url", help="base URL written into urls.get etc. (default: as requested)")
    p.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="fetch image URLs on loopback, private and link-local addresses too (refused by default)",
    )
    p.add_argument("--files-dir", type=Path, help="where Files API uploads go (default: a temporary directory)")
    p.add_argument("--max-file-bytes", type=int, default=100 << 20, help="cap per uploaded file (100 MiB)")
    p.add_argument("--max-files-total-bytes", type=int, default=2 << 30, help="cap on all stored files (2 GiB)")
    p.add_argument(
        "--max-held-input-bytes",
        type=int,
        default=128 << 20,
        help="cap on the memory inputs of held predictions take (128 MiB)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _from_file(path: Path, flag: str) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{flag} {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    values = [line for line in lines if line and not line.startswith("#")]
    if not values:
        raise ValueError(f"{flag} {path} is empty")
    return values


def _warn_argv(flag: str, safer: str) -> None:
    print(f"predictions serve: warning: {flag} on the command line is visible to every user of this "
          f"machine (ps): use {safer} instead", file=sys.stderr)


def settings_from_args(args: argparse.Namespace) -> Settings:
    tokens = list(args.token)
    if tokens:
        _warn_argv("--token", "--token-file FILE or PREDICTIONS_API_TOKENS")
    if getattr(args, "token_file", None):
        tokens += _from_file(args.token_file, "--token-file")
    tokens = tokens or [t.strip() for t in os.environ.get("PREDICTIONS_API_TOKENS", "").split(",") if t.strip()]
    secret = None
    if getattr(args, "webhook_secret_file", None):
        secret = _from_file(args.webhook_secret_file, "--webhook-secret-file")[0]
    elif args.webhook_secret:
        _warn_argv("--webhook-secret", "--webhook-secret-file FILE or PREDICTIONS_WEBHOOK_SECRET")
        secret = args.webhook_secret
    secret = secret or os.environ.get("PREDICTIONS_WEBHOOK_SECRET") or new_webhook_secret()
    return Settings(
        host=args.host,
        port=args.port,
        tokens=tuple(tokens),
        allow_anonymous=args.allow_anonymous,
        webhook_secret=secret,
        create_rate_per_minute=args.create_rate,
        other_rate_per_minute=args.other_rate,
        fault_rate=args.fault_rate,
        fault_kinds=tuple(k for k in args.fault_kinds.split(",") if k),
        fault_seed=args.fault_seed,
        model_dir=args.model_dir,
        workers=args.workers,
        inline_runs=True,  # its own process: the event loop is the service's alone
        public_base_url=args.public_base_url,
        allow_private_urls=args.allow_private_urls,
        files_dir=args.files_dir,
        max_file_bytes=args.max_file_bytes,
        max_files_total_bytes=args.max_files_total_bytes,
        max_held_input_bytes=args.max_held_input_bytes,
        log_level=args.log_level,
    )


def run_serve(args: argparse.Namespace) -> int:
    from .app import StartupError, loop_factory, serve

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"predictions serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve(settings))
    except (StartupError, OSError) as exc:
        print(f"predictions serve: {exc}", file=sys.stderr)
        return 1
    return 0


def run_build_model(args: argparse.Namespace) -> int:
    from .model import MODEL_FILE
    from .model_build import ModelBuildError, build_onnx
    from .model_weights import WeightsError
    from .settings import default_model_dir

    target = (args.model_dir or default_model_dir()) / MODEL_FILE
    try:
        report = build_onnx(target)
    except (ModelBuildError, WeightsError, OSError) as exc:
        print(f"build-model: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {report.path} from {report.tensors} tensors "
        f"({len(report.missing)} missing, {len(report.unexpected)} unexpected)"
    )
    return 0


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="predictions_command", metavar="{serve,build-model}")
    serve_p = sub.add_parser("serve", help="run the Replicate-compatible predictions service")
    add_serve_arguments(serve_p)
    serve_p.set_defaults(predictions_func=run_serve)
    build_p = sub.add_parser("build-model", help="build the ONNX model into the cache directory")
    build_p.add_argument("--model-dir", type=Path, help="target directory (default: the cache directory)")
    build_p.set_defaults(predictions_func=run_build_model)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m predictions_service", description="Local Replicate-compatible predictions service"
    )
    add_subcommands(parser)
    if not argv or argv[0] not in ("serve", "build-model", "-h", "--help"):
        argv = ["serve", *argv]  # serving is the default command
    args = parser.parse_args(argv)
    return args.predictions_func(args)
