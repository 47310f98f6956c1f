"""``pipeline run``: the whole chain on one machine, in one command.

    pipeline run                          # router on ./pipeline.yaml + local predictions + 3 cameras
    pipeline run --devices 5 --interval 1 --duration 60
    pipeline run --no-sim                 # router and predictions service only; bring your devices
    pipeline run --replicate --public-url https://my.host   # the real api.replicate.com

What starts:
- the router (store in ``--data``), its HTTP face and CoAP over DTLS (and plain CoAP with ``--plain``);
- unless ``--replicate``: the local predictions service on loopback, speaking Replicate's API with a
  real offline image model; ``https://api.replicate.com`` is pointed at it without editing the
  pipeline, and ``$REPLICATE_TOKEN`` becomes a token the local service accepts;
- unless ``--no-sim``: N simulated cameras with their own PSK identities (fresh random keys on
  every start unless ``--key-seed``; the registry file is written to match), uploading frames
  and observing ``/.d/result`` for their captions.

``--host`` sets every address (``--http-host``/``--coap-host`` one each); ``0.0.0.0`` listens on
every interface. The HTTP face then needs API keys (``pipeline keys create --store
DATA/store.db``): without one it refuses to start. See ``pipeline serve --help`` for TLS.

A live view shows it all on a terminal; plain log lines otherwise. Ctrl-C (or ``--duration``)
stops the cameras, waits up to ``--drain`` seconds for answers still under way, stops
everything and prints a summary in which every frame is accounted for. Exit code 0 when every
acknowledged frame was answered and nothing was dead-lettered, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from pipelines.commands.serve import add_rate_limit_arguments
from pipelines.file_perms import make_private
from pipelines.gc_tuning import tune_for_serving
from pipelines.http_auth import NoKeysError
from pipelines.log_context import setup_logging
from pipelines.router import ConfigError, RouterSettings
from pipelines.secrets import SecretSource
from pipelines.service import RouterService, ServiceSettings

REPLICATE_BASE = "https://api.replicate.com"
log = logging.getLogger("pipelines.run")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="run the router, the local predictions service and simulated cameras",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipelines", action="append", default=None, metavar="PATH",
                   help="pipeline file or directory (repeatable; default: ./pipeline.yaml)")
    p.add_argument("--secrets", help="secrets file (NAME: value YAML or .env lines)")
    p.add_argument("--data", default="pipeline-data", help="folder for the store and the device registry")
    p.add_argument("--devices", type=int, default=3, help="simulated cameras (default: 3)")
    p.add_argument("--no-sim", action="store_true", help="start no simulated cameras")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between a camera's frames (default: 2)")
    p.add_argument("--duration", type=float, default=0.0,
                   help="stop after this many seconds (default: run until Ctrl-C)")
    p.add_argument("--drain", type=float, default=15.0, help="seconds to wait for outstanding answers at stop")
    p.add_argument("--seed", type=int, default=1, help="seed for the cameras' scenes and frames")
    p.add_argument("--key-seed", type=int, default=None,
                   help="derive the cameras' keys from this seed (reproducible benchmarks only: anyone "
                        "who knows it knows the keys); default: fresh random keys on every start")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on, 0.0.0.0 for every interface (default: 127.0.0.1)")
    p.add_argument("--http-host", default=None, help="HTTP face address (default: --host)")
    p.add_argument("--coap-host", default=None, help="CoAP address (default: --host)")
    p.add_argument("--http-port", type=int, default=8080, help="router HTTP face port (0: any free port)")
    p.add_argument("--coap-port", type=int, default=5684, help="CoAP over DTLS port (0: any free port)")
    p.add_argument("--plain", action="store_true", help="also serve plain CoAP (development only)")
    p.add_argument("--plain-port", type=int, default=5683, help="plain CoAP port")
    p.add_argument("--predictions-port", type=int, default=0,
                   help="local predictions service port (default: any free port)")
    p.add_argument("--replicate", action="store_true",
                   help="use the real api.replicate.com (needs REPLICATE_TOKEN and --public-url)")
    p.add_argument("--public-url", help="URL at which the predictions API reaches this router's HTTP face")
    p.add_argument("--transport", choices=("coaps", "coap"), default="coaps",
                   help="how the simulated cameras talk: coaps (DTLS-PSK, default) or coap (implies --plain)")
    p.add_argument("--block-size", type=int, default=1024, help="cameras' Block1 size (16..1024)")
    add_rate_limit_arguments(p)
    p.add_argument("--plain-output", action="store_true", help="log lines instead of the live view")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log lines as text or one JSON object each (default: %(default)s)")
    from pipelines.commands.serve import add_http_security_arguments
    add_http_security_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.devices < 0:
        raise ValueError("--devices must be 0 or more")
    setup_logging(logging.INFO, args.log_format)
    for noisy in ("coap-ingest", "coap", "aiocoap", "httpx", "uvicorn", "predictions_service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(_run(args))


class _Stop:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()


async def _run(args: argparse.Namespace) -> int:
    if (args.http_tls != "off" or args.http_cert) and not args.replicate and not args.public_url:
        print("pipeline run: the local predictions service cannot call back a router that serves TLS "
              "with its own certificate yet: run without --http-tls here, or use `pipeline serve` "
              "with --http-tls, or give --public-url", file=sys.stderr)
        return 2
    console = Console(stderr=False, highlight=False)
    interactive = sys.stdout.isatty() and not args.plain_output
    data = Path(args.data)
    make_private(data, directory=True, create=True)  # 0700: the store and the keys go in it
    secrets_file = Path(args.secrets) if args.secrets else None
    source = SecretSource.from_sources(secrets_file)

    stack = contextlib.AsyncExitStack()
    async with stack:
        # --- the predictions API -------------------------------------------------------
        overrides: dict[str, str] = {}
        webhook_secret: str | None = None
        if args.replicate:
            token = _lookup(source, "REPLICATE_TOKEN")
            if not token:
                print("pipeline run: --replicate needs REPLICATE_TOKEN (\"Bearer r8_...\") in the "
                      "environment or the secrets file", file=sys.stderr)
                return 2
            if not args.public_url:
                print("pipeline run: --replicate needs --public-url: api.replicate.com must reach this "
                      "router to deliver results", file=sys.stderr)
                return 2
            import httpx

            from pipelines.predictions_results import fetch_webhook_secret
            async with httpx.AsyncClient() as client:
                webhook_secret = await fetch_webhook_secret(client, REPLICATE_BASE, token)
            predictions_desc = REPLICATE_BASE
        else:
            from predictions_service.app import running
            from predictions_service.settings import Settings as PredictionSettings
            from predictions_service.settings import new_webhook_secret

            local_token = "local-" + secrets.token_hex(12)
            tokens = [local_token]
            given = _lookup(source, "REPLICATE_TOKEN")
            if given:  # the user's own value keeps working against the local service
                tokens.append(given.split(None, 1)[-1])
            else:
                os.environ["REPLICATE_TOKEN"] = f"Bearer {local_token}"
            webhook_secret = new_webhook_secret()
            psettings = PredictionSettings(host="127.0.0.1", port=args.predictions_port,
                                           tokens=tuple(tokens), webhook_secret=webhook_secret)
            console.print("starting the local predictions service (EfficientNet-Lite0 on onnxruntime)…")
            local_url = await stack.enter_async_context(running(psettings))
            overrides[REPLICATE_BASE] = local_url.rstrip("/")
            predictions_desc = f"{local_url} (local, standing in for {REPLICATE_BASE})"

        # --- the router ----------------------------------------------------------------
        from pipelines.ingest.coap import CoapSettings

        identities: list[Any] = []
        registry_path = data / "devices.yaml"
        if not args.no_sim and args.devices > 0:
            from device_sim.identity import fleet_identities, write_registry

            identities = fleet_identities(args.devices, seed=args.seed, project_id="demo",
                                          key_seed=args.key_seed)
            write_registry(registry_path, identities)
        elif not registry_path.exists():
            registry_path.write_text("project_id: demo\ndevices: []\n")
        if args.transport == "coap":
            args.plain = True
        from pipelines.commands.serve import http_security
        http_host = args.http_host or args.host
        coap_host = args.coap_host or args.host
        coap = CoapSettings(host=coap_host, dtls_port=args.coap_port, plain_enabled=args.plain,
                            port=args.plain_port, registry_path=registry_path,
                            rate_limit=args.rate_limit, rate_burst=args.rate_burst)
        settings = ServiceSettings(
            router=RouterSettings(pipelines=args.pipelines or ["pipeline.yaml"],
                                  store_path=data / "store.db", secrets_file=secrets_file,
                                  url_overrides=overrides),
            http_host=http_host, http_port=args.http_port, coap=coap,
            webhook_secret=webhook_secret, public_url=args.public_url, watch_config=True,
            **http_security(args))
        service = RouterService(settings)
        try:
            await service.start()
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return 2
        except NoKeysError as exc:
            print(f"pipeline run: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"pipeline run: could not listen: {exc} (is another router running? "
                  "try --http-port 0 --coap-port 0)", file=sys.stderr)
            return 2
        stack.push_async_callback(service.stop)
        router = service.router
        console.print(f"router: HTTP {service.http_url}  CoAPS udp/{service.coap_dtls_port}"
                      + (f"  CoAP udp/{service.coap_port}" if service.coap_port else "")
                      + f"  store {data / 'store.db'}")
        console.print(f"predictions API: {predictions_desc}")
        console.print(f"pipelines: {', '.join(p.name for p in router.pipeline_configs)}"
                      " (edit the file: it is reloaded live)")
        console.print(f"web console: {service.http_url}/console/")

        # --- the cameras ---------------------------------------------------------------
        fleet = None
        if identities:
            from device_sim.camera import CameraConfig
            from device_sim.fleet import Fleet

            port = service.coap_dtls_port if args.transport == "coaps" else service.coap_port
            # the cameras reach the router's CoAP address; every interface: through loopback
            cam_host = "127.0.0.1" if coap_host in ("0.0.0.0", "") else ("::1" if coap_host == "::" else coap_host)
            fleet = Fleet(identities, CameraConfig(host=cam_host, port=port, transport=args.transport,
                                                   interval=args.interval, block_size=args.block_size),
                          seed=args.seed)
            await fleet.start()
            console.print(f"cameras: {', '.join(c.device_id for c in fleet.cameras)} "
                          f"(registry {registry_path})")

        tune_for_serving()
        stop = _Stop()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set, f"{signal.Signals(sig).name.lower()}")
        started = time.monotonic()

        async def until_stop() -> None:
            if args.duration > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.event.wait(), args.duration)
                stop.set(f"--duration {args.duration:g} s")
            else:
                await stop.event.wait()

        if interactive:
            with Live(await _view(service, fleet, started), console=console, refresh_per_second=4,
                      transient=False) as live:
                waiter = asyncio.create_task(until_stop())
                while not waiter.done():
                    await asyncio.wait([waiter], timeout=0.5)
                    live.update(await _view(service, fleet, started))
        else:
            waiter = asyncio.create_task(until_stop())
            while not waiter.done():
                await asyncio.wait([waiter], timeout=5)
                console.print(_status_line(fleet, router, started))

        # --- stop and account ----------------------------------------------------------
        console.print(f"stopping ({stop.reason})…")
        # the DTLS sessions' close alerts and aiocoap's shutdown order are noise at this point
        logging.getLogger("coap-ingest").setLevel(logging.ERROR)
        if fleet is not None:
            for cam in fleet.cameras:
                cam.config.max_frames = cam.stats.frames_sent  # no new frames; answers still come
            deadline = time.monotonic() + args.drain
            while time.monotonic() < deadline:
                if _outstanding(fleet) == 0:
                    break
                await asyncio.sleep(0.2)
            await fleet.stop()
        books = await router.store.counters()
        router.queue_depths = await router.store.queue_depths()  # not the last 0.25 s sample
        console.print(await _view(service, fleet, started, final=True))
        ok = _print_summary(console, fleet, books)
        return 0 if ok else 1


def _lookup(source: SecretSource, name: str) -> str | None:
    try:
        return source.resolve(f"${name}")
    except Exception:
        return None


def _outstanding(fleet: Any) -> int:
    t = fleet.totals()
    return t["frames_acked"] - t["frames_answered"]


def _status_line(fleet: Any, router: Any, started: float) -> str:
    up = time.monotonic() - started
    if fleet is None:
        return f"[{up:6.1f}s] router up; inbox {router.inbox_depth}"
    t = fleet.totals()
    parts = [f"[{up:6.1f}s] frames sent {t['frames_sent']} acked {t['frames_acked']} "
             f"answered {t['frames_answered']}"]
    for cam in fleet.cameras:
        if cam.stats.last_answer:
            lat = f" {cam.stats.last_latency * 1000:.0f} ms" if cam.stats.last_latency else ""
            parts.append(f"{cam.device_id}: {cam.stats.last_answer}{lat}")
    return "; ".join(parts)


async def _view(service: RouterService, fleet: Any, started: float, final: bool = False) -> Group:
    router = service.router
    cams = Table(title=f"cameras ({time.monotonic() - started:.0f} s)", expand=False)
    for col in ("camera", "sent", "acked", "answered", "errors", "latest answer", "latency"):
        cams.add_column(col, justify="right" if col in {"sent", "acked", "answered", "errors", "latency"} else "left")
    if fleet is not None:
        for cam in fleet.cameras:
            s = cam.stats
            cams.add_row(cam.device_id, str(s.frames_sent), str(s.frames_acked), str(s.frames_answered),
                         str(s.errors), s.last_answer or ("(observing)" if s.observing else "…"),
                         f"{s.last_latency * 1000:.0f} ms" if s.last_latency else "")
    dests = Table(title="pipelines and destinations")
    for col in ("pipeline", "step", "delivered", "queued", "in flight", "retries", "dead letters"):
        dests.add_column(col, justify="left" if col in {"pipeline", "step"} else "right")
    if router.delivery is not None:
        for (p, s), w in router.delivery.workers.items():
            dests.add_row(p, s, str(w.stats.delivered), str(router.queue_depths.get((p, s), 0)),
                          str(w.stats.in_flight), str(w.stats.retried), str(w.stats.dead))
    return Group(cams, dests)


def _print_summary(console: Console, fleet: Any, books: dict[str, int]) -> bool:
    console.print("[bold]summary[/]")
    ok = True
    if fleet is not None:
        t = fleet.totals()
        lost_uploads = t["frames_sent"] - t["frames_acked"] - t["frames_rejected"]
        unanswered = t["frames_acked"] - t["frames_answered"]
        console.print(f"  frames: {t['frames_sent']} sent = {t['frames_acked']} acknowledged"
                      f" + {t['frames_rejected']} refused + {lost_uploads} cut off by the stop")
        console.print(f"  acknowledged: {t['frames_acked']} = {t['frames_answered']} answered"
                      f" + {unanswered} unanswered when stopped")
        if t["latency_p50"] is not None:
            console.print(f"  frame-to-answer latency: p50 {t['latency_p50'] * 1000:.0f} ms,"
                          f" p95 {t['latency_p95'] * 1000:.0f} ms")
        ok = unanswered == 0 and t["frames_rejected"] == 0 and t["frames_acked"] > 0
    console.print(f"  router: {books['ingested']} ingested = {books['routed']} routed"
                  f" + {books['unmatched']} unmatched + {books['inbox']} waiting")
    console.print(f"  deliveries: {books['deliveries_enqueued']} enqueued, {books['deliveries_delivered']}"
                  f" delivered, {books['deliveries_queued']} queued, {books['deliveries_dead']} dead letters"
                  f" ({books['deliveries_retried']} retries)")
    if books["deliveries_dead"] or books["runs_dead"]:
        ok = False
        console.print("  [yellow]dead letters: see `pipeline dlq list`[/]")
    console.print("  [green]every frame accounted for[/]" if ok else
                  "  [yellow]some frames were not answered: see above[/]")
    return ok


