"""The services Golioth devices use besides the stream: OTA, remote settings, RPC.

One module per service, each a tree of aiocoap resources plus its store tables and the
coroutines its ``pipeline`` verb (``pipelines/commands/<service>.py``) calls:

* ``ota``: ``/.u/desired`` (manifest, Observe), ``/.u/c/<package>@<version>`` (Block2
  downloads), ``/.u/c/<package>`` (progress reports); ``pipeline ota``.
* ``settings``: ``/.c`` (Observe), ``/.c/status``; ``pipeline settings``.
* ``rpc``: ``/.rpc`` (Observe: calls), ``/.rpc/status`` (answers); ``pipeline rpc`` and
  ``POST /v1/devices/{device}/rpc`` on the HTTP face.

Usage (what ``pipelines.ingest.coap.build_site`` does)::

    add_device_services(site, server)      # server: the CoAP ingest's shared state

The services need the router's store (``server.target.store``); a target without one (a test
double of the ingest) gets none of them, and ``/.u``, ``/.c``, ``/.rpc`` answer 4.04 as before.
Shared pieces (tables, Block2 answers, polling the store for changes made by other processes)
are in ``common``.
"""

from __future__ import annotations

from typing import Any

from aiocoap import resource


def add_device_services(site: resource.Site, server: Any) -> None:
    store = getattr(server.target, "store", None)
    if store is None:
        return
    from pipelines.device_services import ota, rpc, settings
    ota.add_resources(site, server, store)
    settings.add_resources(site, server, store)
    rpc.add_resources(site, server, store)
