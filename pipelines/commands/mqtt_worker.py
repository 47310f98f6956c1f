"""``pipeline mqtt-worker``: a pipeline worker fed by an MQTT broker (scale-out).

    pipeline mqtt-worker --broker mqtt://127.0.0.1:1883 --pipelines pipeline.yaml \\
        --store data/worker-a.db --group workers --client-id worker-a [--http 127.0.0.1:8081]

Each worker runs a whole router (store, engine, delivery queues) on its own store file and
subscribes to ``$share/<group>/+/+/stream/#``, so the broker splits device messages between
all workers of the group, on any machine that reaches the broker. QoS 1 messages are
acknowledged only once they are in this worker's store. Keep ``--client-id`` stable per
worker (and per store file): after a crash the broker hands the unacknowledged messages to
the worker that comes back under that id. ``mqtt`` destination steps without a ``broker``
publish through this worker's broker connection. ``--http`` serves /metrics, /healthz and
/readyz. See docs/mqtt.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from pipelines.devices import DeviceRegistry
from pipelines.secrets import install_log_redaction


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("mqtt-worker", help="run a router fed by an MQTT broker (shared subscription)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                   help="mqtt://[user:password@]host:port (default: %(default)s)")
    p.add_argument("--pipelines", action="append", default=None, metavar="PATH",
                   help="pipeline file or directory (repeatable; default: ./pipeline.yaml)")
    p.add_argument("--store", default="pipeline-data/store.db", help="this worker's store file")
    p.add_argument("--group", default=None,
                   help="shared-subscription group ($share/GROUP/...); omit for a plain subscription")
    p.add_argument("--client-id", default=None, help="stable MQTT client id of this worker (recommended)")
    p.add_argument("--topic-filter", default="+/+/stream/#", help="device topics (default: %(default)s)")
    p.add_argument("--qos", type=int, choices=(0, 1), default=1)
    p.add_argument("--content-type", default="application/octet-stream",
                   help="content type when a message has no MQTT v5 content type")
    p.add_argument("--max-payload", type=int, default=4 << 20, help="bytes (default: 4 MiB)")
    p.add_argument("--max-inflight", type=int, default=256, help="unacknowledged QoS 1 messages")
    p.add_argument("--session-expiry", type=int, default=3600,
                   help="seconds the broker keeps this worker's session while it is away")
    p.add_argument("--registry", help="device registry file: unknown devices are rejected")
    p.add_argument("--trust-message-id", action="store_true",
                   help="keep the id in a message's 'message-id' user property (set by the CoAP gateway); "
                        "only when the broker lets nothing else publish to device topics")
    p.add_argument("--secrets", help="secrets file (NAME: value YAML or .env lines)")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="serve the HTTP face here (/metrics, /healthz, /readyz, prediction callbacks)")
    p.add_argument("--public-url", help="base URL at which the predictions API reaches this HTTP face")
    p.add_argument("--webhook-secret", default=os.environ.get("PREDICTIONS_WEBHOOK_SECRET"),
                   help="verifies prediction callbacks (default: $PREDICTIONS_WEBHOOK_SECRET)")
    p.add_argument("--override", action="append", default=[], metavar="FROM=TO",
                   help="send requests for base URL FROM to TO instead")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from destinations.mqtt import BrokerURL, MqttPublisher
    from pipelines.commands.send import parse_overrides
    from pipelines.ingest.mqtt import MqttSettings
    from pipelines.router import RouterSettings
    from pipelines.service import RouterService, ServiceSettings

    broker = BrokerURL(args.broker)
    if broker.tls:
        raise ValueError("mqtt-worker speaks plain mqtt:// for now (use a TLS terminator or mqtt://)")
    registry = DeviceRegistry.load(args.registry) if args.registry else None
    publisher = MqttPublisher(broker, client_id=f"{args.client_id}-pub" if args.client_id else None)
    router_settings = RouterSettings(
        pipelines=args.pipelines or ["pipeline.yaml"], store_path=Path(args.store),
        secrets_file=args.secrets, url_overrides=parse_overrides(args.override),
        extra={"mqtt_publish": publisher.publish})
    ingest_settings = MqttSettings(
        host=broker.host, port=broker.port, username=broker.username, password=broker.password,
        topic_filter=args.topic_filter, shared_group=args.group, qos=args.qos,
        default_content_type=args.content_type, max_payload=args.max_payload, registry=registry,
        client_id=args.client_id, session_expiry=args.session_expiry, max_inflight=args.max_inflight,
        trust_message_id=args.trust_message_id)
    http_host, http_port = "127.0.0.1", None
    if args.http:
        host, _, port = args.http.rpartition(":")
        http_host, http_port = host or "127.0.0.1", int(port)
    settings = ServiceSettings(router=router_settings, http_host=http_host, http_port=http_port,
                               mqtt=ingest_settings, webhook_secret=args.webhook_secret,
                               public_url=args.public_url)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with RouterService(settings) as service:
            from pipelines.gc_tuning import tune_for_serving
            tune_for_serving()
            logging.getLogger("pipelines.mqtt_worker").info(
                "worker %s: %s -> store %s%s", service.mqtt.client_id, service.mqtt.filter, args.store,
                f", HTTP face {service.http_url}" if service.http_url else "")
            await stop.wait()
    finally:
        await publisher.close()
    return 0
