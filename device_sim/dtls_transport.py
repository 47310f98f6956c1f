"""A DTLS 1.2 client transport for aiocoap on OpenSSL (pyOpenSSL), as a device would run it.

Use it through :class:`device_sim.coap_link.CoapLink` (which builds the context), or directly::

    ctx = await dtls_client_context(b"cam-01@demo", key)                 # PSK, GCM (Zephyr's default)
    ctx = await dtls_client_context(b"cam-01@demo", key, ciphers="PSK-AES128-CCM8")
    ctx = await dtls_client_context(cert="dev.pem", key_file="dev.key", ca="ca.pem")  # certificate
    response = await ctx.request(Message(code=POST, uri="coaps://127.0.0.1:5684/.s/x", payload=b"..")).response
    await ctx.shutdown()                                                  # sends close_notify

One UDP socket and one DTLS session per server address. The handshake starts with the first
request; requests wait for it. When the server ends the session (close_notify or a fatal
alert) the pending requests fail with ``aiocoap.error.NetworkError`` and the next request starts a
new handshake. Keys may be up to 64 bytes (OpenSSL takes up to 512) and the offered suite is
``TLS_PSK_WITH_AES_128_GCM_SHA256`` (with a certificate ``ECDHE-ECDSA-AES128-GCM-SHA256``)
unless told otherwise.

pyOpenSSL has no PSK API; the client PSK callback is registered through its cffi binding
(``OpenSSL._util.lib.SSL_CTX_set_psk_client_callback``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import aiocoap
from aiocoap import Message, error, interfaces
from aiocoap.numbers import constants
from OpenSSL import SSL
from OpenSSL._util import ffi, lib

log = logging.getLogger(__name__)

DEFAULT_CIPHERS = "PSK-AES128-GCM-SHA256"            # Zephyr's default
DEFAULT_CERT_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256"  # with a device certificate
MTU = 1280 - 48
_READ = 1 << 16
_MAX_PENDING = 64   # plaintexts queued while the handshake runs


def _split_records(data: bytes) -> list[bytes]:
    records, offset = [], 0
    while offset + 13 <= len(data):
        end = offset + 13 + int.from_bytes(data[offset + 11:offset + 13], "big")
        if end > len(data):
            break
        records.append(data[offset:end])
        offset = end
    return records


class _Remote(interfaces.EndpointAddress):
    """The aiocoap remote for one server address (kept across re-handshakes)."""

    scheme = "coaps"
    # A class attribute shadowing aiocoap's property, so it is settable per instance (as upstream's).
    maximum_block_size_exp = constants.MAX_REGULAR_BLOCK_SIZE_EXP
    is_multicast = False
    is_multicast_locally = False

    def __init__(self, link: _ServerLink) -> None:
        self._link = link

    @property
    def hostinfo(self) -> str:
        host, port = self._link.hostport
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def hostinfo_local(self) -> str:
        return "local"

    @property
    def uri_base(self) -> str:
        return "coaps://" + self.hostinfo

    @property
    def uri_base_local(self) -> str:
        return "coaps://local"

    @property
    def blockwise_key(self) -> tuple:
        return self._link.hostport

    def send(self, data: bytes) -> None:
        self._link.send(data)


class _ServerLink(asyncio.DatagramProtocol):
    """One UDP socket and (re)handshaking DTLS session towards one server."""

    def __init__(self, owner: DtlsClientTransport, hostport: tuple[str, int]) -> None:
        self.owner = owner
        self.hostport = hostport
        self.remote = _Remote(self)
        self._transport: asyncio.DatagramTransport | None = None
        self._conn: SSL.Connection | None = None
        self._established = False
        self._pending: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None

    async def open(self, loop: asyncio.AbstractEventLoop) -> None:
        infos = await loop.getaddrinfo(*self.hostport, type=socket.SOCK_DGRAM)
        if not infos:
            raise error.NetworkError(f"no address for {self.hostport[0]}")
        await loop.create_datagram_endpoint(lambda: self, remote_addr=infos[0][4])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        self._fail(error.NetworkError(f"DTLS to {self.remote.hostinfo}: {exc}"))

    # --- handshake ---------------------------------------------------------------------------

    def _start(self) -> None:
        conn = SSL.Connection(self.owner.ssl_context, None)
        conn.set_connect_state()
        conn.set_ciphertext_mtu(MTU)
        self._conn, self._established = conn, False
        self._advance()

    def _advance(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            self._flush()
            self._arm()
            return
        except SSL.Error as exc:
            self._flush()
            self._fail(error.NetworkError(f"DTLS handshake with {self.remote.hostinfo} failed: {exc}"))
            return
        self._established = True
        self._cancel_timer()
        self._flush()
        pending, self._pending = self._pending, []
        for data in pending:
            self.send(data)

    def _arm(self) -> None:
        self._cancel_timer()
        delay = self._conn.DTLSv1_get_timeout() if self._conn is not None else None
        if delay is not None:
            self._timer = asyncio.get_running_loop().call_later(max(delay, 0.01), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._conn is None or self._established:
            return
        try:
            self._conn.DTLSv1_handle_timeout()
        except SSL.Error:
            self._fail(error.NetworkError(f"DTLS handshake with {self.remote.hostinfo} timed out"))
            return
        self._flush()
        self._arm()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- data --------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._conn is None:
            self._pending.append(data)
            self._start()
            return
        if not self._established:
            if len(self._pending) < _MAX_PENDING:
                self._pending.append(data)
            return
        try:
            self._conn.send(data)
        except SSL.Error as exc:
            self._fail(error.NetworkError(f"DTLS session with {self.remote.hostinfo} broken: {exc}"))
            return
        self._flush()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        conn = self._conn
        if conn is None:
            return
        conn.bio_write(data)
        if not self._established:
            self._advance()
            if not self._established:
                return
        plaintexts = []
        ended: Exception | None = None
        while True:
            try:
                plaintexts.append(conn.recv(_READ))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                ended = error.NetworkError(f"{self.remote.hostinfo} closed the DTLS session")
                break
            except SSL.Error as exc:
                ended = error.NetworkError(f"DTLS session with {self.remote.hostinfo} failed: {exc}")
                break
        self._flush()
        for plaintext in plaintexts:
            self.owner.dispatch(self.remote, plaintext)
        if ended is not None:
            self._fail(ended)

    def _flush(self) -> None:
        conn = self._conn
        if conn is None or self._transport is None:
            return
        out = b""
        while True:
            try:
                out += conn.bio_read(_READ)
            except SSL.WantReadError:
                break
        datagram = b""
        for record in _split_records(out):
            if datagram and len(datagram) + len(record) > MTU:
                self._transport.sendto(datagram)
                datagram = b""
            datagram += record
        if datagram:
            self._transport.sendto(datagram)

    def _fail(self, exc: Exception) -> None:
        self._cancel_timer()
        self._conn, self._established, self._pending = None, False, []
        self.owner.dispatch_error(self.remote, exc)

    def close(self) -> None:
        self._cancel_timer()
        if self._conn is not None and self._established:
            with contextlib.suppress(SSL.Error):
                self._conn.shutdown()
            self._flush()
        self._conn = None
        if self._transport is not None:
            self._transport.close()


class DtlsClientTransport(interfaces.MessageInterface):
    """aiocoap MessageInterface for ``coaps://`` requests with one PSK or certificate."""

    def __init__(self, mman: interfaces.MessageManager, loop: asyncio.AbstractEventLoop, *,
                 identity: bytes | None = None, psk: bytes | None = None,
                 ciphers: str | None = None, cert: str | None = None,
                 key_file: str | None = None, ca: str | None = None) -> None:
        self._mman: interfaces.MessageManager | None = mman
        self._loop = loop
        self._links: dict[tuple[str, int], _ServerLink] = {}
        self._identity, self._psk = identity, psk
        ctx = SSL.Context(SSL.DTLS_METHOD)
        ctx.set_min_proto_version(0xFEFD)
        ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
        ciphers = ciphers or (DEFAULT_CERT_CIPHERS if cert else DEFAULT_CIPHERS)
        ctx.set_cipher_list((ciphers + ":@SECLEVEL=0").encode())
        if cert:
            ctx.use_certificate_chain_file(cert)
            ctx.use_privatekey_file(key_file or cert)
        if ca:
            ctx.load_verify_locations(ca)
            ctx.set_verify(SSL.VERIFY_PEER, lambda _c, _x, _e, _d, ok: ok)
        if identity is not None and psk is not None:
            # Kept referenced: the SSL context calls it for as long as it lives.
            self._psk_callback = ffi.callback(
                "unsigned int(SSL *, const char *, char *, unsigned int, unsigned char *, unsigned int)",
                self._psk_client)
            lib.SSL_CTX_set_psk_client_callback(ctx._context, self._psk_callback)
        self.ssl_context = ctx

    def _psk_client(self, ssl: Any, hint: Any, identity_out: Any, max_identity: int,
                    psk_out: Any, max_psk: int) -> int:
        ident, psk = self._identity or b"", self._psk or b""
        if len(ident) > max_identity or len(psk) > max_psk:  # the buffer holds max + NUL
            return 0
        ffi.memmove(identity_out, ident + b"\0", len(ident) + 1)
        ffi.memmove(psk_out, psk, len(psk))
        return len(psk)

    def dispatch(self, remote: _Remote, plaintext: bytes) -> None:
        if self._mman is None:
            return
        try:
            message = Message.decode(plaintext, remote=remote)
        except Exception:
            log.debug("undecodable CoAP message from %s dropped", remote.hostinfo)
            return
        self._mman.dispatch_message(message)

    def dispatch_error(self, remote: _Remote, exc: Exception) -> None:
        if self._mman is not None:
            self._mman.dispatch_error(exc, remote)

    # --- aiocoap MessageInterface ------------------------------------------------------------

    def send(self, message: Message) -> None:
        if self._mman is not None:
            message.remote.send(message.encode())

    async def determine_remote(self, request: Message) -> _Remote | None:
        if request.requested_scheme != "coaps":
            return None
        if request.unresolved_remote is not None:
            host, port = aiocoap.util.hostportsplit(request.unresolved_remote)
        else:
            host, port = request.opt.uri_host, request.opt.uri_port
        if not host:
            raise ValueError("no host to send the coaps request to")
        hostport = (host, port or 5684)
        link = self._links.get(hostport)
        if link is None:
            link = _ServerLink(self, hostport)
            await link.open(self._loop)
            self._links[hostport] = link
        return link.remote

    async def recognize_remote(self, remote: Any) -> bool:
        return isinstance(remote, _Remote) and remote._link.owner is self

    async def shutdown(self) -> None:
        self._mman = None
        for link in self._links.values():
            link.close()
        self._links.clear()


async def dtls_client_context(identity: bytes | None = None, psk: bytes | None = None, *,
                              ciphers: str | None = None, cert: str | None = None,
                              key_file: str | None = None, ca: str | None = None,
                              loggername: str = "coap-dtls-client") -> aiocoap.Context:
    """An aiocoap client Context whose ``coaps://`` requests go through this transport."""
    loop = asyncio.get_running_loop()
    ctx = aiocoap.Context(loop=loop, serversite=None, loggername=loggername)
    await ctx._append_tokenmanaged_messagemanaged_transport(
        lambda mman: _construct(mman, loop, identity, psk, ciphers, cert, key_file, ca))
    return ctx


async def _construct(mman: interfaces.MessageManager, loop: asyncio.AbstractEventLoop, *args: Any,
                     ) -> DtlsClientTransport:
    identity, psk, ciphers, cert, key_file, ca = args
    return DtlsClientTransport(mman, loop, identity=identity, psk=psk, ciphers=ciphers, cert=cert,
                               key_file=key_file, ca=ca)
