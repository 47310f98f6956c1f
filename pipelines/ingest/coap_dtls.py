"""CoAP over DTLS 1.2 with pre-shared keys, served by aiocoap's ``tinydtls_server`` transport.

Usage (``pipelines.ingest.coap`` does this for you)::

    creds = RegistryCredentials(lambda: registry)           # PSK identity -> DeviceEntry
    ctx = aiocoap.Context(serversite=site, server_credentials=creds)
    port = await add_dtls_transport(ctx, ("127.0.0.1", 5684), creds)   # exactly 5684 (0 = any free)

    # in a resource: who is talking?
    entry = device_from_claims(request.remote)               # DeviceEntry or None

Why not ``Context.create_server_context(transports=["tinydtls_server"])``: that transport adds
``COAPS_PORT - COAP_PORT`` (= 1) to the bound port, so binding N listened on N+1 and binding 0
picked port 1. Here the transport binds exactly the port asked for, and it caps the number of
DTLS sessions held (upstream keeps every peer's session until it closes). The identity lookup is
a dict lookup in the registry, and the authenticated claims carry the registry entry itself.
Unknown identity, a device without a key, or a wrong key: the handshake fails.

Needs the ``DTLSSocket`` package (``pip install DTLSSocket``; its build needs autoconf, automake
and libtool). aiocoap marks this transport experimental; it only binds a concrete address
(not ``0.0.0.0`` / ``::``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from aiocoap import Context
from aiocoap.credentials import CredentialsMap
from aiocoap.numbers import COAP_PORT

from pipelines.devices import DeviceEntry, DeviceRegistry

log = logging.getLogger(__name__)


class DTLSUnavailable(RuntimeError):
    """DTLS was asked for but the DTLSSocket package is missing or the bind address is unusable."""


class RegistryCredentials(CredentialsMap):
    """aiocoap server credentials backed by the device registry (PSK identity -> entry)."""

    def __init__(self, registry: Callable[[], DeviceRegistry]) -> None:
        super().__init__()
        self._registry = registry

    def __bool__(self) -> bool:
        # An empty dict is falsy and aiocoap would replace it with a fresh, empty map.
        return True

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, DeviceEntry]:
        try:
            name = identity.decode() if isinstance(identity, bytes | bytearray) else str(identity)
        except UnicodeDecodeError:
            raise KeyError("identity is not UTF-8") from None
        entry = self._registry().by_identity(name)
        if entry is None or entry.psk is None:
            log.info("DTLS handshake refused: unknown identity or no key for %r", name[:80])
            raise KeyError(name)
        return entry.psk, entry


def device_from_claims(remote: Any) -> DeviceEntry | None:
    """The registry entry a DTLS peer authenticated as, or None (plain CoAP, no claims)."""
    claims = getattr(remote, "authenticated_claims", None) or []
    for claim in claims:
        if isinstance(claim, DeviceEntry):
            return claim
    return None


def _check_available(host: str) -> None:
    try:
        import DTLSSocket  # noqa: F401
    except ImportError:
        raise DTLSUnavailable("CoAP over DTLS needs the DTLSSocket package: pip install DTLSSocket "
                              "(its build needs autoconf, automake and libtool)") from None
    try:
        any_address = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        any_address = host in ("", "*")
    if any_address:
        raise DTLSUnavailable(f"aiocoap's DTLS server cannot bind the any-address {host!r}: give the "
                              "concrete address devices connect to (e.g. the host's LAN address)")


def _transport_classes(max_sessions: int):
    from aiocoap.transports import tinydtls_server as upstream

    class ExactPortSocket(upstream._DatagramServerSocketSimpleDTLS):
        max_sockets = max_sessions

        def datagram_received(self, data, sockaddr):
            if sockaddr not in self._connections:
                # Upstream never purges; without this a flood of handshakes grows without bound.
                self._maybe_purge_sockets()
            super().datagram_received(data, sockaddr)

    class ExactPortServer(upstream.MessageInterfaceTinyDTLSServer):
        # create_server binds port + (_default_port - COAP_PORT); making that 0 binds the port given.
        _default_port = COAP_PORT
        _serversocket = ExactPortSocket

    return ExactPortServer


async def add_dtls_transport(ctx: Context, bind: tuple[str, int], credentials: CredentialsMap,
                             max_sessions: int = 4096) -> int:
    """Add a DTLS-PSK server transport bound to exactly ``bind``; returns the bound port."""
    host, port = bind
    _check_available(host)
    server_cls = _transport_classes(max_sessions)
    created: list[Any] = []

    async def construct(mman):
        transport = await server_cls.create_server((host, port), mman, log=ctx.log, loop=ctx.loop,
                                                   server_credentials=credentials)
        created.append(transport)
        return transport

    # aiocoap has no public hook to add a transport with its own bind address; this is the
    # helper create_server_context itself uses (stable through 0.4.x).
    await ctx._append_tokenmanaged_messagemanaged_transport(construct)
    sockname = created[0]._pool._transport.get_extra_info("sockname")
    return int(sockname[1])
