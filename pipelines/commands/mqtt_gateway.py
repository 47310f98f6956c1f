"""``pipeline mqtt-gateway``: CoAP devices in, the MQTT broker out (for ``mqtt-worker``s).

    pipeline mqtt-gateway --broker mqtt://127.0.0.1:1883 --coap-dtls-port 5684 --registry devices.yaml
    pipeline mqtt-gateway --broker mqtt://127.0.0.1:1883 --coap-port 5683     # plain CoAP, development

Serves CoAP (DTLS-PSK, Block1, ``/.s/`` and ``/.d/``) exactly as ``pipeline serve`` does, but
instead of a store and pipelines it publishes each upload to ``<project>/<device>/stream/<path>``
(QoS 1, with the content type and a ``message-id`` user property) and answers the device's 2.04
once the broker has acknowledged it. Device state is read from and written to the retained
``<project>/<device>/state/...`` topics. Run workers with ``pipeline mqtt-worker --group ...
--trust-message-id`` behind a broker ACL that lets only gateways publish to device topics.
Prints ``ready coaps://HOST:PORT`` (and/or ``coap://``) once listening. See docs/mqtt.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from pipelines.secrets import install_log_redaction


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("mqtt-gateway", help="serve CoAP devices and forward their data to an MQTT broker",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                   help="mqtt://[user:password@]host:port (default: %(default)s)")
    p.add_argument("--client-id", default=None, help="MQTT client id of this gateway")
    p.add_argument("--coap-dtls-port", type=int, help="serve CoAP over DTLS on this port (needs --registry)")
    p.add_argument("--coap-port", type=int, help="serve plain CoAP on this port (development only)")
    p.add_argument("--coap-host", default="127.0.0.1", help="CoAP address (default: %(default)s)")
    p.add_argument("--registry", help="device registry file (PSK identities) for CoAP over DTLS")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the broker's acknowledgement (default: %(default)s)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    if args.coap_dtls_port is None and args.coap_port is None:
        print("pipeline mqtt-gateway: give --coap-dtls-port (with --registry) and/or --coap-port",
              file=sys.stderr)
        return 2
    if args.coap_dtls_port is not None and not args.registry:
        print("pipeline mqtt-gateway: CoAP over DTLS needs --registry (the devices' keys)", file=sys.stderr)
        return 2
    from destinations.mqtt import BrokerURL

    try:
        broker = BrokerURL(args.broker)
    except ValueError as exc:
        print(f"pipeline mqtt-gateway: {exc}", file=sys.stderr)
        return 2
    if broker.tls:
        print("pipeline mqtt-gateway: speaks plain mqtt:// for now (use a TLS terminator)", file=sys.stderr)
        return 2
    return asyncio.run(_serve(args, broker))


async def _serve(args: argparse.Namespace, broker: Any) -> int:
    from pipelines.gc_tuning import tune_for_serving
    from pipelines.ingest.coap import CoapIngest, CoapSettings
    from pipelines.ingest.mqtt import GatewaySettings, MqttGateway

    gateway_settings = GatewaySettings(host=broker.host, port=broker.port, username=broker.username,
                                       password=broker.password, client_id=args.client_id, timeout=args.timeout)
    coap_settings = CoapSettings(host=args.coap_host, registry_path=args.registry,
                                 dtls_enabled=args.coap_dtls_port is not None, dtls_port=args.coap_dtls_port or 0,
                                 plain_enabled=args.coap_port is not None, port=args.coap_port or 0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    gateway = MqttGateway(gateway_settings)
    try:
        await gateway.start()
    except ConnectionError as exc:
        print(f"pipeline mqtt-gateway: {exc}", file=sys.stderr)
        return 2
    try:
        async with CoapIngest(gateway, coap_settings) as coap:
            tune_for_serving()
            parts = ["ready"]
            if coap.dtls_port:
                parts.append(f"coaps://{args.coap_host}:{coap.dtls_port}")
            if coap.port:
                parts.append(f"coap://{args.coap_host}:{coap.port}")
            parts.append(f"-> {broker}")
            print(" ".join(parts), flush=True)
            await stop.wait()
    finally:
        await gateway.stop()
    return 0
