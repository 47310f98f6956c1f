"""``pipeline serve``: run the router headless, with its HTTP face, until SIGTERM or Ctrl-C.

    pipeline serve --pipelines pipeline.yaml --store data/store.db --http-port 8080
    pipeline serve --pipelines p.yaml --store s.db --http-port 0 --http-ingest   # any free port
    pipeline serve --pipelines p.yaml --coap-dtls-port 5684 --registry devices.yaml
    pipeline serve --coap-dtls-port 5684 --registry devices.yaml --workers 2   # SO_REUSEPORT
    pipeline serve --coap-dtls-port 5684 --registry devices.yaml --rate-limit 50 --rate-burst 500
    pipeline serve --config router.yaml [--http-port 9000]    # one file; flags override it

``--config FILE`` reads store, listeners, pipelines, registry, secrets, limits, URL overrides
and logging from one YAML file (see ``pipelines.router_config`` and the README's
``router.yaml``), checked with FILE:LINE:COL like the pipelines; every flag given on the
command line wins over the file. The pipeline and secrets files are watched: a change (or
SIGHUP) is validated and swapped in between messages; a refused one keeps the last good set
(``--no-watch``: SIGHUP only). ``--log-format json`` writes one JSON object per log line,
with the message id, device, pipeline and step where they apply.

Once everything listens it prints one line, ``ready http://HOST:PORT`` (then the CoAP
ports if any), so scripts and tests can wait for it. The store is the durable SQLite file
given by ``--store``: stopping the process any way at all, ``kill -9`` included, loses no
acknowledged message; the next start resumes every unfinished run and delivery.

``--http-ingest`` adds ``POST /v1/ingest/{project}/{device}/{path}`` to the HTTP face (an
``admin`` key once keys exist). CoAP ingest starts when ``--coap-dtls-port`` or ``--coap-port``
(plain CoAP, development only) is given.
``--rate-limit`` / ``--rate-burst`` set the per-device token bucket of CoAP requests (each
``--workers`` process applies it to the devices it serves); ``GET /metrics`` counts what it
refused per device (``pipeline_coap_rate_limited_total``).

Security: the HTTP face wants ``Authorization: Bearer KEY`` once ``pipeline keys create`` made
a key; with no key it is open on loopback only, and refuses to start on any other address
(``--http-host 0.0.0.0``). ``--protect-metrics`` puts health and metrics behind a key too.
``--http-tls self-signed`` makes a certificate in the store's folder on first start
(``--http-cert``/``--http-key`` for your own). Prediction callbacks are always signed: without
``--webhook-secret`` (or ``--webhook-secret-file``, or ``$PREDICTIONS_WEBHOOK_SECRET``) the
router makes a secret and keeps it in the store (``pipeline keys webhook-secret`` prints it
for the predictions service). Secrets given on the command line are visible in ``ps``:
prefer the file or the environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipelines.gc_tuning import tune_for_serving
from pipelines.log_context import setup_logging
from pipelines.router import RouterSettings
from pipelines.service import RouterService, ServiceSettings


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the router headless with its HTTP face until stopped",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="router configuration file (router.yaml); flags given here override it")
    p.add_argument("--pipelines", action="append", default=None, metavar="PATH",
                   help="pipeline file or directory (repeatable; default: ./pipeline.yaml)")
    p.add_argument("--store", default="pipeline-data/store.db", help="SQLite store (default: %(default)s)")
    p.add_argument("--secrets", help="secrets file (NAME: value YAML or .env lines)")
    p.add_argument("--http-host", default="127.0.0.1", help="HTTP face address (default: %(default)s)")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP face port, 0 for any (default: 8080)")
    p.add_argument("--http-ingest", action="store_true", help="accept messages at POST /v1/ingest/...")
    add_http_security_arguments(p)
    p.add_argument("--coap-dtls-port", type=int, help="serve CoAP over DTLS on this port (needs --registry)")
    p.add_argument("--coap-port", type=int, help="serve plain CoAP on this port (development only)")
    p.add_argument("--coap-host", default="127.0.0.1",
                   help="CoAP address, 0.0.0.0 or :: for all (default: %(default)s)")
    p.add_argument("--registry", help="device registry file (PSK identities) for CoAP over DTLS")
    p.add_argument("--dtls-cert", help="the router's certificate (PEM) for certificate devices "
                                       "(pipeline certs init-ca); needs --dtls-key and --dtls-ca")
    p.add_argument("--dtls-key", help="the router certificate's private key (PEM)")
    p.add_argument("--dtls-ca", action="append", default=[], metavar="PEM",
                   help="project CA certificate that device certificates must chain to (repeatable)")
    add_rate_limit_arguments(p)
    p.add_argument("--max-queue", type=int, help="deliveries per destination queue before pushing back")
    p.add_argument("--max-inbox", type=int, help="unrouted messages before pushing back")
    p.add_argument("--max-state-bytes", type=int, metavar="N",
                   help="cap on one device's whole state document, as JSON (default: 1 MiB)")
    for table, what, default in (("stream", "lightdb-stream records", "1000000"),
                                 ("log", "logs destination records", "100000"),
                                 ("unmatched", "unmatched-message records", "10000")):
        p.add_argument(f"--keep-{table}-rows", type=_rows, metavar="N|all",
                       help=f"newest {what} kept, older ones deleted (default {default})")
    p.add_argument("--override", action="append", default=[], metavar="FROM=TO",
                   help="send requests for base URL FROM to TO, e.g. "
                        "https://api.replicate.com=http://127.0.0.1:8008 (repeatable)")
    p.add_argument("--webhook-secret", default=None,
                   help="whsec_... secret that prediction callbacks are signed with (visible in ps: "
                        "prefer --webhook-secret-file or PREDICTIONS_WEBHOOK_SECRET); unset: one "
                        "kept in the store")
    p.add_argument("--webhook-secret-file", metavar="FILE", help="read the webhook secret from FILE")
    p.add_argument("--public-url", help="base URL at which the predictions API reaches this HTTP face")
    p.add_argument("--workers", type=int, default=1,
                   help="CoAP ingest processes sharing the CoAP ports with SO_REUSEPORT (default: 1); "
                        "the kernel keeps each device on one process, this one also runs the engine")
    p.add_argument("--ingest-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="WARNING", help="log level (default: %(default)s)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log lines as text or one JSON object each (default: %(default)s)")
    p.add_argument("--no-watch", action="store_true",
                   help="do not reload when the pipeline or secrets files change (SIGHUP still reloads)")
    p.set_defaults(func=run)


def add_rate_limit_arguments(p: argparse.ArgumentParser) -> None:
    """``--rate-limit`` / ``--rate-burst``: the CoAP ingest's per-device token bucket."""
    from pipelines.ingest.rate_limit import DEFAULT_BURST, DEFAULT_RATE

    p.add_argument("--rate-limit", type=_non_negative, default=DEFAULT_RATE, metavar="PER_SECOND",
                   help="CoAP requests per second per device, sustained; 0 turns limiting off "
                        "(default: %(default)g); over it a device gets 4.29 Too Many Requests")
    p.add_argument("--rate-burst", type=_at_least_one, default=DEFAULT_BURST, metavar="N",
                   help="CoAP requests a device may send at once before the rate applies "
                        "(default: %(default)g, enough for the Golioth SDK's start-up and log bursts)")


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate (a number, 0 or more)")
    return value


def _at_least_one(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value >= 1 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a burst size (a number, 1 or more)")
    return value


def _rows(text: str) -> int | str:
    if text == "all":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of rows (0 or more) or 'all'")
    return n


def add_http_security_arguments(p: argparse.ArgumentParser) -> None:
    """--protect-metrics, --http-cert/--http-key, --http-tls (shared with ``pipeline run``)."""
    p.add_argument("--protect-metrics", action="store_true",
                   help="/healthz, /readyz and /metrics want an API key too")
    p.add_argument("--http-cert", metavar="PEM", help="TLS certificate for the HTTP face (with --http-key)")
    p.add_argument("--http-key", metavar="PEM", help="TLS private key for the HTTP face")
    p.add_argument("--http-tls", choices=("off", "self-signed"), default="off",
                   help="self-signed: make a certificate in the store's folder on first start")


def http_security(args: argparse.Namespace) -> dict[str, Any]:
    """ServiceSettings fields from the arguments of ``add_http_security_arguments``."""
    if bool(args.http_cert) != bool(args.http_key):
        raise ValueError("--http-cert and --http-key go together")
    return {"protect_metrics": args.protect_metrics, "http_cert": args.http_cert,
            "http_key": args.http_key, "http_tls_self_signed": args.http_tls == "self-signed"}


def webhook_secret_from(args: argparse.Namespace) -> str | None:
    """--webhook-secret-file, --webhook-secret (warned: visible in ps), or the environment."""
    from pipelines.secrets import remember, secret_argument
    value = secret_argument(args.webhook_secret, getattr(args, "webhook_secret_file", None),
                            "PREDICTIONS_WEBHOOK_SECRET", "--webhook-secret")
    if value:
        remember(value)
    return value


def settings_from(args: argparse.Namespace) -> ServiceSettings:
    from pipelines.commands.send import parse_overrides

    router = RouterSettings(pipelines=args.pipelines or ["pipeline.yaml"], store_path=args.store,
                            secrets_file=args.secrets, url_overrides=parse_overrides(args.override))
    if args.max_queue:
        router.max_queue = args.max_queue
    if args.max_inbox:
        router.max_inbox = args.max_inbox
    if args.max_state_bytes:
        router.max_state_bytes = args.max_state_bytes
    for table in ("stream", "log", "unmatched"):
        rows = getattr(args, f"keep_{table}_rows", None)
        if rows is not None:
            setattr(router, f"keep_{table}_rows", None if rows == "all" else rows)
    if args.http_ingest:
        router.extra["http_ingest"] = True
    coap = None
    if args.coap_dtls_port is not None or args.coap_port is not None:
        from pipelines.ingest.coap import CoapSettings
        coap = CoapSettings(host=args.coap_host, registry_path=args.registry,
                            dtls_enabled=args.coap_dtls_port is not None,
                            dtls_port=args.coap_dtls_port or 0,
                            plain_enabled=args.coap_port is not None, port=args.coap_port or 0,
                            reuse_port=args.workers > 1 or args.ingest_only,
                            rate_limit=args.rate_limit, rate_burst=args.rate_burst)
        if args.dtls_cert or args.dtls_key or args.dtls_ca:
            if not (args.dtls_cert and args.dtls_key and args.dtls_ca):
                raise ValueError("certificate devices need all of --dtls-cert, --dtls-key and --dtls-ca")
            coap.dtls.cert, coap.dtls.key, coap.dtls.ca = args.dtls_cert, args.dtls_key, list(args.dtls_ca)
    if args.ingest_only:  # a --workers child: CoAP into the shared store, no engine, no HTTP
        router.run_engine = False
        return ServiceSettings(router=router, http_port=None, coap=coap)
    return ServiceSettings(router=router, http_host=args.http_host, http_port=args.http_port, coap=coap,
                           webhook_secret=webhook_secret_from(args), public_url=args.public_url,
                           watch_config=not getattr(args, "no_watch", False), **http_security(args))


def _defaults() -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return vars(parser.parse_args(["serve"]))


def apply_config(args: argparse.Namespace) -> list[str]:
    """Fill in from ``args.config`` what the flags left at their defaults; the file's problems
    (FILE:LINE:COL: ...), nothing applied, if it has any. A flag given with exactly its default
    value cannot be told apart from no flag: the file's value is used then."""
    from pipelines.router_config import load_router_config

    config = load_router_config(Path(args.config))
    if config.problems:
        return [str(p) for p in config.problems]
    defaults = _defaults()
    for dest, value in config.values.items():
        if dest == "watch":
            args.no_watch = args.no_watch or not value
        elif dest == "override":
            args.override = value + list(args.override)  # later wins: the flags
        elif getattr(args, dest, None) == defaults.get(dest):
            setattr(args, dest, value)
    return []


def run(args: argparse.Namespace) -> int:
    if getattr(args, "config", None):
        problems = apply_config(args)
        if problems:
            for problem in problems:
                print(problem, file=sys.stderr)
            print(f"pipeline serve: {args.config} has {len(problems)} problem(s); nothing started",
                  file=sys.stderr)
            return 2
    setup_logging(args.log_level, args.log_format)
    if args.workers < 1:
        raise ValueError("--workers must be 1 or more")
    if args.workers > 1 and args.coap_dtls_port is None and args.coap_port is None:
        raise ValueError("--workers spreads CoAP ingest: give --coap-dtls-port and/or --coap-port")
    return asyncio.run(serve(settings_from(args), args))


def _worker_command(args: argparse.Namespace, dtls_port: int | None, plain_port: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--ingest-only", "--store", str(args.store),
           "--coap-host", args.coap_host, "--log-level", args.log_level, "--log-format", args.log_format]
    for p in args.pipelines or ["pipeline.yaml"]:
        cmd += ["--pipelines", str(p)]
    cmd += ["--rate-limit", repr(args.rate_limit), "--rate-burst", repr(args.rate_burst)]
    for item, flag in ((args.secrets, "--secrets"), (args.registry, "--registry"),
                       (dtls_port, "--coap-dtls-port"), (plain_port, "--coap-port"),
                       (args.dtls_cert, "--dtls-cert"), (args.dtls_key, "--dtls-key")):
        if item is not None:
            cmd += [flag, str(item)]
    for ca in args.dtls_ca:
        cmd += ["--dtls-ca", ca]
    return cmd


async def _start_workers(args: argparse.Namespace, service: RouterService) -> list[subprocess.Popen]:
    """The other ingest processes, on the ports this one bound (so port 0 works too)."""
    procs = []
    for _ in range(args.workers - 1):
        proc = subprocess.Popen(_worker_command(args, service.coap_dtls_port, service.coap_port),
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
    for proc in procs:
        line = await asyncio.to_thread(proc.stdout.readline)  # type: ignore[union-attr]
        if not line.startswith("ready"):
            for p in procs:
                p.terminate()
            raise RuntimeError(f"an ingest worker did not start (exit {proc.poll()}); see its log above")
    return procs


async def serve(settings: ServiceSettings, args: argparse.Namespace | None = None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with RouterService(settings) as service:
        reloads: set[asyncio.Task] = set()  # held until done (the loop keeps only weak references)

        def on_sighup() -> None:
            task = asyncio.ensure_future(service.reload("SIGHUP"))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        with contextlib.suppress(NotImplementedError, RuntimeError):  # SIGHUP: reload the configuration
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        workers = await _start_workers(args, service) if args is not None and args.workers > 1 else []
        tune_for_serving()
        try:
            parts = [f"ready {service.http_url or '(no http)'}"]
            if service.coap_dtls_port:
                parts.append(f"coaps://{settings.coap.host}:{service.coap_dtls_port}")
            if service.coap_port:
                parts.append(f"coap://{settings.coap.host}:{service.coap_port}")
            if workers:
                parts.append(f"ingest processes {1 + len(workers)}")
            print(" ".join(parts), flush=True)
            await stop.wait()
        finally:
            for proc in workers:
                proc.terminate()
            for proc in workers:
                try:
                    await asyncio.to_thread(proc.wait, 10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0
