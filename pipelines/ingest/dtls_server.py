"""CoAP over DTLS 1.2 for the router: an aiocoap message transport on OpenSSL (pyOpenSSL).

Usage (``pipelines.ingest.coap`` does this)::

    options = DtlsOptions(cert="server.pem", key="server.key", ca=["project-ca.pem"])  # all optional
    port = await add_dtls_server(ctx, ("0.0.0.0", 5684), lambda: registry, options)
    entry = device_from_claims(request.remote)     # in a resource: the DeviceEntry talking

One plain UDP socket (so the any-address works), one OpenSSL ``Connection`` on memory BIOs per
peer address. Authentication:

* **PSK** (``TLS_PSK_WITH_AES_128_GCM_SHA256``, ``_AES_128_CCM``, ``_AES_128_CCM_8``,
  ``_AES_128_CBC_SHA256``; the client picks). The identity ``<device>@<project>`` is looked up
  in the live registry at each handshake, so a re-keyed device's new key works at once. Keys up
  to ``MAX_PSK_KEY`` (64) bytes, identities up to ``MAX_PSK_IDENTITY`` (256, OpenSSL's own
  limit); ``pipelines.devices`` refuses longer ones when the registry is loaded.
* **Certificates** (``ECDHE-ECDSA-AES128-GCM-SHA256``, ``-CCM``, ``-CCM8``), when ``options``
  names the router's certificate and key and the project CA(s): the device's chain must verify
  against a CA, and its subject (CN = device id, O = project id, as Golioth's) must name a
  device in the registry.

Against hostile traffic: a ClientHello without a valid cookie is answered with a
HelloVerifyRequest built here (``dtls_records``) and nothing is kept, so spoofed floods cost no
state and cannot evict anyone. A ClientHello with a valid cookie starts a handshake (OpenSSL's
``DTLSv1_listen`` re-checks the same cookie); handshakes are capped (the oldest is dropped, never
an established session) and must finish within ``handshake_timeout``; retransmissions run on the
event loop's timers (``DTLSv1_get_timeout``), never a busy loop. Established sessions are capped
too (the least recently active one is replaced only when it has been idle a while) and expire
after ``idle_timeout``. Every second the sessions are checked against the registry: a removed or
re-keyed device loses its session (close_notify) within about a second of the reload.

A new ClientHello (valid cookie) from an address that has a session is a new handshake
(RFC 6347 §4.2.8): the old session keeps its address (and its traffic) until the new one
completes, then is replaced, whatever identity the new one authenticates as. A device has one
session: a handshake completed from a new address replaces the device's session at the old
one, so a NAT rebinding costs one handshake (1 round trip for the cookie, 2 for the handshake)
and leaves nothing behind.

Library choice (measured in this session):

* python-mbedtls 2.10.1 (bundled Mbed TLS 2.28.8): its DTLS server works, but the bundled
  build has ``MBEDTLS_PSK_MAX_LEN = 32`` (a 33-byte key fails with "SSL - Bad input
  parameters"); devices need 64-byte keys. Its Connection ID is the pre-RFC draft, not exposed.
* pyOpenSSL + cryptography (bundled OpenSSL): DTLS, memory BIOs, timers, cookie callbacks, MTU.
  pyOpenSSL has no PSK API; the PSK server callback is registered through its cffi binding
  (``OpenSSL._util.lib.SSL_CTX_set_psk_server_callback``).
* Connection ID (RFC 9146) is not available: OpenSSL has no DTLS 1.2 CID support (none of
  ``SSL_set_dtls_cid``-like functions exists in OpenSSL or its cffi binding), so it is not
  negotiated; an address change costs one quick handshake instead (above).

Session resumption is off: a resumed session would skip the registry lookup of the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiocoap import Message, error, interfaces
from aiocoap.numbers import constants
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from pipelines.devices import MAX_PSK_IDENTITY, MAX_PSK_KEY, DeviceEntry, DeviceRegistry
from pipelines.ingest.coap_datagrams import screen
from pipelines.ingest.datagram_counts import DATAGRAMS
from pipelines.ingest.dtls_records import (
    CookieJar,
    first_record_is_client_hello,
    hello_verify_request,
    pack_datagrams,
    parse_client_hello,
    split_records,
)

log = logging.getLogger(__name__)

PSK_SUITES = ["PSK-AES128-GCM-SHA256", "PSK-AES128-CCM", "PSK-AES128-CCM8", "PSK-AES128-CBC-SHA256"]
CERT_SUITES = ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-CCM", "ECDHE-ECDSA-AES128-CCM8"]
DTLS1_2_VERSION = 0xFEFD
_READ = 1 << 16
# One buffer for every SSL_read / BIO_read of the established sessions (the event loop is one
# thread): pyOpenSSL's recv / bio_read allocate a new 64 KB buffer on each call and signal "no
# more data" with an exception, the usual case of every call loop, once per datagram each way.
_BUFFER = ffi.new("char[]", _READ)
_WANT_READ = lib.SSL_ERROR_WANT_READ


@dataclass
class DtlsOptions:
    """Limits and (optional) certificate material of the DTLS server."""

    mtu: int = 1280 - 48             # IPv6 minimum MTU minus IPv6 + UDP headers
    handshake_timeout: float = 20.0  # a handshake not finished by then is dropped
    max_handshakes: int = 512        # in progress at once; beyond, the oldest is dropped
    max_sessions: int = 4096         # established
    idle_timeout: float = 900.0      # an established session without traffic is closed
    evictable_after: float = 60.0    # a full table replaces its least recent session only if idle this long
    sweep_interval: float = 1.0
    cert: str | None = None          # router certificate (PEM chain) for ECDHE-ECDSA
    key: str | None = None           # its private key (PEM)
    ca: list[str] = field(default_factory=list)  # project CA certificates devices must chain to


class _Session:
    """One peer address: a handshake in progress or an established DTLS session."""

    __slots__ = (
        "addr",
        "closed",
        "conn",
        "cookie",
        "entry",
        "established",
        "last",
        "psk",
        "random",
        "remote",
        "started",
        "timer",
    )

    def __init__(self, addr: tuple, conn: SSL.Connection, cookie: bytes, random: bytes) -> None:
        self.addr = addr
        self.conn = conn
        self.remote: DtlsRemote | None = None
        self.entry: DeviceEntry | None = None
        self.psk: bytes | None = None
        self.established = False
        self.started = self.last = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.cookie = cookie
        self.random = random
        self.closed = False


class DtlsRemote(interfaces.EndpointAddress):
    """The aiocoap remote of one established session (equality is identity: one per session)."""

    def __init__(self, server: DtlsServerTransport, session: _Session) -> None:
        self._server = server
        self._session = session

    scheme = "coaps"
    # A class attribute shadowing aiocoap's property, so it is settable per instance (as upstream's).
    maximum_block_size_exp = constants.MAX_REGULAR_BLOCK_SIZE_EXP
    is_multicast = False
    is_multicast_locally = False

    def __repr__(self) -> str:
        entry = self._session.entry
        return f"<DtlsRemote {self.hostinfo} {entry.identity if entry else '?'}>"

    @property
    def hostinfo(self) -> str:
        host, port = self._session.addr[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def hostinfo_local(self) -> str:
        return self._server.hostinfo_local

    @property
    def uri_base(self) -> str:
        return "coaps://" + self.hostinfo

    @property
    def uri_base_local(self) -> str:
        return "coaps://" + self.hostinfo_local

    @property
    def authenticated_claims(self) -> list[DeviceEntry]:
        return [self._session.entry] if self._session.entry is not None else []

    @property
    def blockwise_key(self) -> tuple:
        entry = self._session.entry
        return (self._session.addr, entry.identity if entry else None)

    def send(self, data: bytes) -> None:
        self._server._send_plaintext(self._session, data)


def device_from_claims(remote: Any) -> DeviceEntry | None:
    """The registry entry a DTLS peer authenticated as, or None (plain CoAP, no claims)."""
    claims = getattr(remote, "authenticated_claims", None) or []
    for claim in claims:
        if isinstance(claim, DeviceEntry):
            return claim
    return None


class DtlsServerTransport(asyncio.DatagramProtocol, interfaces.MessageInterface):
    """aiocoap MessageInterface serving ``coaps`` on one UDP socket. Build with ``create``."""

    def __init__(self, mman: interfaces.MessageManager, registry: Callable[[], DeviceRegistry],
                 options: DtlsOptions, loop: asyncio.AbstractEventLoop) -> None:
        self._mman: interfaces.MessageManager | None = mman
        self._registry = registry
        self.options = options
        self._loop = loop
        self._cookies = CookieJar()
        self._handshakes: OrderedDict[tuple, _Session] = OrderedDict()
        self._sessions: OrderedDict[tuple, _Session] = OrderedDict()
        self._by_identity: dict[str, _Session] = {}   # one session per device
        self._transport: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._entries_seen: object = None
        self.hostinfo_local = ""
        self.stats: dict[str, int] = dict.fromkeys(
            ("hello_verify_sent", "handshakes_started", "handshakes_completed", "handshakes_failed",
             "handshakes_expired", "handshakes_dropped", "sessions_expired", "sessions_revoked",
             "sessions_replaced", "datagrams_dropped", "undecodable"), 0)
        # The cffi callback object must stay referenced for as long as the SSL context lives.
        self._psk_callback = ffi.callback(
            "unsigned int(SSL *, const char *, unsigned char *, unsigned int)", self._psk_lookup)
        self._ctx = ssl_context(options, self._psk_callback)
        self._last_log = 0.0
        # ``coap_fastpath.Block1FastPath`` (set by the ingest): tried on each decrypted
        # datagram before the screening and aiocoap; it answers the Block1 blocks with more to come
        self.fast_path: Callable[..., bool] | None = None

    # --- setup -------------------------------------------------------------------------------

    @classmethod
    async def create(cls, bind: tuple[str, int], mman: interfaces.MessageManager,
                     registry: Callable[[], DeviceRegistry], options: DtlsOptions,
                     loop: asyncio.AbstractEventLoop, reuse_port: bool = False) -> DtlsServerTransport:
        self = cls(mman, registry, options, loop)
        await loop.create_datagram_endpoint(lambda: self, local_addr=bind,
                                            reuse_port=reuse_port or None)
        host, port = self._transport.get_extra_info("sockname")[:2]
        self.port = int(port)
        self.hostinfo_local = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._sweeper = loop.call_later(options.sweep_interval, self._sweep)
        return self

    # --- PSK lookup (called by OpenSSL during a handshake) -----------------------------------

    def _psk_lookup(self, ssl: Any, identity: Any, out: Any, max_len: int) -> int:
        try:
            conn = SSL.Connection._reverse_mapping[ssl]
            session: _Session = conn.get_app_data()
            raw = ffi.string(identity, MAX_PSK_IDENTITY + 1) if identity != ffi.NULL else b""
            if len(raw) > MAX_PSK_IDENTITY:
                return 0
            try:
                name = raw.decode()
            except UnicodeDecodeError:
                return 0
            entry = self._registry().by_identity(name)
            if entry is None or entry.psk is None or len(entry.psk) > min(max_len, MAX_PSK_KEY):
                self._note(f"DTLS handshake refused: unknown identity or no key for {name[:80]!r}")
                return 0
            ffi.memmove(out, entry.psk, len(entry.psk))
            session.entry, session.psk = entry, entry.psk
            return len(entry.psk)
        except Exception:  # never let an exception cross into OpenSSL
            log.exception("DTLS PSK lookup failed")
            return 0

    # --- datagrams in ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        log.debug("DTLS socket error (ignored): %s", exc)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        addr = addr[:2]
        try:
            self._received(data, addr)
        except Exception:  # one peer's bad input never reaches the event loop
            log.exception("DTLS datagram from %s dropped", addr)
            self.stats["datagrams_dropped"] += 1

    def _received(self, data: bytes, addr: tuple) -> None:
        hs = self._handshakes.get(addr)
        if first_record_is_client_hello(data):
            hello = parse_client_hello(data)
            if hello is None:
                self.stats["datagrams_dropped"] += 1
                return
            if hs is not None and hello.random == hs.random:
                self._feed_handshake(hs, data)       # a retransmitted ClientHello
                return
            if not self._cookies.valid(addr, hello):
                self._sendto(hello_verify_request(hello, self._cookies.make(addr, hello)), addr)
                self.stats["hello_verify_sent"] += 1
                return
            if hs is not None:
                self._drop_handshake(hs)
            self._start_handshake(addr, data, hello.cookie, hello.random)
            return
        session = self._sessions.get(addr)
        if hs is not None and session is not None and data[3:5] != b"\x00\x00":
            # A new handshake runs where a session is established (a replayed or restarted
            # ClientHello): encrypted records go to the session first; only what it cannot
            # read (the new handshake's Finished) goes on to the handshake.
            if self._feed_session(session, data):
                return
            self._feed_handshake(hs, data)
            return
        if hs is not None:
            self._feed_handshake(hs, data)
            return
        if session is None:
            self.stats["datagrams_dropped"] += 1
            return
        self._feed_session(session, data)

    def _start_handshake(self, addr: tuple, data: bytes, cookie: bytes, random: bytes) -> None:
        while len(self._handshakes) >= self.options.max_handshakes:
            _, oldest = next(iter(self._handshakes.items()))
            self._drop_handshake(oldest)
            self.stats["handshakes_dropped"] += 1
        conn = SSL.Connection(self._ctx, None)
        session = _Session(addr, conn, cookie, random)
        conn.set_app_data(session)
        conn.set_accept_state()
        conn.set_ciphertext_mtu(self.options.mtu)
        self._handshakes[addr] = session
        self.stats["handshakes_started"] += 1
        conn.bio_write(data)
        try:
            conn.DTLSv1_listen()
        except SSL.WantReadError:
            self._drop_handshake(session)   # the cookie did not verify after all
            return
        except SSL.Error:
            self._fail_handshake(session)
            return
        self._advance_handshake(session)

    def _feed_handshake(self, session: _Session, data: bytes) -> None:
        session.conn.bio_write(data)
        self._advance_handshake(session)

    def _advance_handshake(self, session: _Session) -> None:
        try:
            session.conn.do_handshake()
        except SSL.WantReadError:
            self._flush(session)
            self._arm_timer(session)
            return
        except SSL.Error:
            self._flush(session)            # the alert, if OpenSSL made one
            self._fail_handshake(session)
            return
        self._flush(session)
        self._established(session)

    def _arm_timer(self, session: _Session) -> None:
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        delay = session.conn.DTLSv1_get_timeout()
        if delay is not None:
            session.timer = self._loop.call_later(max(delay, 0.01), self._retransmit, session)

    def _retransmit(self, session: _Session) -> None:
        session.timer = None
        if session.closed or session.established:
            return
        try:
            session.conn.DTLSv1_handle_timeout()
        except SSL.Error:
            self._fail_handshake(session)
            return
        self._flush(session)
        self._arm_timer(session)

    def _established(self, session: _Session) -> None:
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        if self._handshakes.get(session.addr) is session:
            del self._handshakes[session.addr]
        entry = session.entry
        if entry is None:
            entry = self._certificate_entry(session)
            session.entry = entry
        if entry is None:
            self._close(session, notify=True)
            self.stats["handshakes_failed"] += 1
            return
        # The peer started over on this address (RFC 6347 §4.2.8), or the device came back from
        # a new address (a NAT rebinding, a restart): its old session is gone. No close_notify:
        # it would reach the new peer under keys it no longer has, or an address nobody holds.
        for old in {self._sessions.get(session.addr), self._by_identity.get(entry.identity)}:
            if old is not None:
                self._close(old, notify=False)
                self.stats["sessions_replaced"] += 1
        if not self._make_room():
            self._note("DTLS session refused: the session table is full of active sessions")
            self._close(session, notify=True)
            self.stats["handshakes_failed"] += 1
            return
        session.established = True
        session.last = time.monotonic()
        session.remote = DtlsRemote(self, session)
        self._sessions[session.addr] = session
        self._by_identity[entry.identity] = session
        self.stats["handshakes_completed"] += 1
        log.debug("DTLS session with %s as %s (%s)", session.addr, entry.identity,
                  session.conn.get_cipher_name())

    def _make_room(self) -> bool:
        if len(self._sessions) < self.options.max_sessions:
            return True
        _, oldest = next(iter(self._sessions.items()))
        if time.monotonic() - oldest.last < self.options.evictable_after:
            return False
        self._close(oldest, notify=True)
        self.stats["sessions_expired"] += 1
        return True

    def _certificate_entry(self, session: _Session) -> DeviceEntry | None:
        cert = session.conn.get_peer_certificate(as_cryptography=True)
        if cert is None:
            return None
        device = _name_attr(cert.subject, NameOID.COMMON_NAME)
        project = _name_attr(cert.subject, NameOID.ORGANIZATION_NAME)
        entry = self._registry().lookup(project, device) if device and project else None
        if entry is None:
            self._note(f"DTLS certificate refused: no device {device!r} in project {project!r}")
        return entry

    def _feed_session(self, session: _Session, data: bytes) -> bool:
        """Decrypt and dispatch; True if the datagram held application data for this session.

        OpenSSL through its cffi binding, as pyOpenSSL's ``bio_write`` / ``recv`` do, with one
        shared buffer and no exception for the "nothing more to read" that ends every datagram;
        any other outcome is turned into pyOpenSSL's exception (``_raise_ssl_error``) and ends
        the session, as before."""
        if not data:   # an empty datagram: no record in it
            self.stats["datagrams_dropped"] += 1
            return False
        conn = session.conn
        if lib.BIO_write(conn._into_ssl, data, len(data)) <= 0:
            conn.bio_write(data)   # pyOpenSSL raises the BIO's error
        plaintexts = []
        closed = False
        ssl = conn._ssl
        while True:
            n = lib.SSL_read(ssl, _BUFFER, _READ)
            if n > 0:
                plaintexts.append(ffi.buffer(_BUFFER, n)[:])
                continue
            if lib.SSL_get_error(ssl, n) == _WANT_READ:
                break
            with contextlib.suppress(SSL.Error):  # ZeroReturnError (close_notify) or a fatal error
                conn._raise_ssl_error(ssl, n)
            closed = True
            break
        self._flush(session)
        if plaintexts:
            session.last = time.monotonic()
            self._sessions.move_to_end(session.addr)
        for plaintext in plaintexts:
            self._dispatch(session, plaintext)
        if closed:
            self._close(session, notify=False)
        return bool(plaintexts) or closed

    def _dispatch(self, session: _Session, plaintext: bytes) -> None:
        if self._mman is None or session.remote is None:
            return
        fast = self.fast_path
        if fast is not None and fast(plaintext, session.remote, self._mman, session.remote.send):
            return
        # the checks plain CoAP gets (coap_datagrams.screen): undecodable messages answered
        # (RST / 4.02) and counted, unknown critical options, type/code misfits, token reuse
        out = screen(plaintext, session.remote, self._mman)
        if out.reply is not None:
            session.remote.send(out.reply)
        if out.message is None:
            self.stats["undecodable"] += 1
            return
        try:
            self._mman.dispatch_message(out.message)
        except Exception as exc:  # never a traceback per datagram
            DATAGRAMS.note("dispatch_error", f"{type(exc).__name__}: {exc}"[:120], log, exc_info=exc)

    # --- datagrams out -----------------------------------------------------------------------

    def _flush(self, session: _Session) -> None:
        """Send what OpenSSL wrote to the session's memory BIO: whole records, in datagrams of at
        most the MTU (one answer's record is one datagram: sent without splitting)."""
        bio = session.conn._from_ssl
        out = b""
        while True:
            n = lib.BIO_read(bio, _BUFFER, _READ)
            if n <= 0:   # a memory BIO that is empty
                break
            out += ffi.buffer(_BUFFER, n)[:]
        if not out:
            return
        if len(out) <= self.options.mtu:
            self._sendto(out, session.addr)
            return
        for datagram in pack_datagrams(split_records(out), self.options.mtu):
            self._sendto(datagram, session.addr)

    def _sendto(self, datagram: bytes, addr: tuple) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(datagram, addr)

    def _send_plaintext(self, session: _Session, data: bytes) -> None:
        if session.closed:
            log.debug("not sending to %s: DTLS session closed", session.addr)
            return
        conn = session.conn
        n = lib.SSL_write(conn._ssl, data, len(data))  # pyOpenSSL's send, without its checks of a success
        if n <= 0:
            try:
                conn._raise_ssl_error(conn._ssl, n)
            except SSL.Error:
                self._close(session, notify=False)
                return
        self._flush(session)

    # --- ending sessions ---------------------------------------------------------------------

    def _fail_handshake(self, session: _Session) -> None:
        self.stats["handshakes_failed"] += 1
        self._drop_handshake(session)

    def _drop_handshake(self, session: _Session) -> None:
        if self._handshakes.get(session.addr) is session:
            del self._handshakes[session.addr]
        self._close(session, notify=False)

    def _close(self, session: _Session, *, notify: bool, reason: Exception | None = None) -> None:
        if session.closed:
            return
        session.closed = True
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        if self._sessions.get(session.addr) is session:
            del self._sessions[session.addr]
        if session.entry is not None and self._by_identity.get(session.entry.identity) is session:
            del self._by_identity[session.entry.identity]
        if notify:
            with contextlib.suppress(SSL.Error):
                session.conn.shutdown()
            self._flush(session)
        if session.remote is not None and self._mman is not None:
            self._mman.dispatch_error(reason or error.LibraryShutdown("DTLS session closed"),
                                      session.remote)

    def _sweep(self) -> None:
        self._sweeper = self._loop.call_later(self.options.sweep_interval, self._sweep)
        try:
            now = time.monotonic()
            for session in list(self._handshakes.values()):
                if now - session.started > self.options.handshake_timeout:
                    self._drop_handshake(session)
                    self.stats["handshakes_expired"] += 1
            for session in list(self._sessions.values()):
                if now - session.last > self.options.idle_timeout:
                    self._close(session, notify=True)
                    self.stats["sessions_expired"] += 1
            self._check_registry()
        except Exception:
            log.exception("DTLS housekeeping failed")

    def _check_registry(self) -> None:
        registry = self._registry()
        if registry.entries is self._entries_seen:
            return
        self._entries_seen = registry.entries
        for session in list(self._sessions.values()):
            entry = session.entry
            current = registry.by_identity(entry.identity) if entry is not None else None
            if current is None or (session.psk is not None and current.psk != session.psk):
                log.info("DTLS session of %s closed: device removed or re-keyed in the registry",
                         entry.identity if entry else session.addr)
                self._close(session, notify=True, reason=error.LibraryShutdown("device revoked"))
                self.stats["sessions_revoked"] += 1

    def _note(self, text: str) -> None:
        """Log refusals at INFO, at most one per second (hostile handshakes come in floods)."""
        now = time.monotonic()
        if now - self._last_log >= 1.0:
            self._last_log = now
            log.info("%s", text)
        else:
            log.debug("%s", text)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def handshake_count(self) -> int:
        return len(self._handshakes)

    def sessions(self) -> Iterable[DtlsRemote]:
        return [s.remote for s in self._sessions.values() if s.remote is not None]

    # --- aiocoap MessageInterface ------------------------------------------------------------

    def send(self, message: Message) -> None:
        if self._mman is None:
            return
        message.remote.send(message.encode())

    async def determine_remote(self, request: Message) -> None:
        return None  # a server transport: it answers, it never starts sessions

    async def recognize_remote(self, remote: Any) -> bool:
        return isinstance(remote, DtlsRemote) and remote._server is self

    async def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._mman = None
        for session in list(self._handshakes.values()):
            self._drop_handshake(session)
        for session in list(self._sessions.values()):
            self._close(session, notify=True)
        if self._transport is not None:
            self._transport.close()


def ssl_context(o: DtlsOptions, psk_callback: Any = None) -> SSL.Context:
    """The server's OpenSSL context; bad certificate files raise ValueError naming the file."""
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)   # idle sessions give their record buffers back
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    suites = list(PSK_SUITES)
    if o.cert or o.key or o.ca:
        if not (o.cert and o.key and o.ca):
            raise ValueError("DTLS certificates need the router's certificate, its key and the project CA")
        _load(ctx.use_certificate_chain_file, o.cert, "router certificate")
        _load(ctx.use_privatekey_file, o.key, "router key")
        _load(lambda _path: ctx.check_privatekey(), o.key, "router key (does not match the certificate)")
        for ca in o.ca:
            _load(ctx.load_verify_locations, ca, "project CA")
        # Only certificate suites send a CertificateRequest, so PSK handshakes are unaffected.
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda _c, _x, _e, _d, ok: ok)
        ctx.set_session_id(b"iot-pipelines-dtls")
        suites += CERT_SUITES
    # SECLEVEL 0: OpenSSL counts the 64-bit tag of the CCM_8 suites as too weak otherwise.
    ctx.set_cipher_list((":".join(suites) + ":@SECLEVEL=0").encode())
    ctx.set_cookie_generate_callback(lambda conn: conn.get_app_data().cookie)
    ctx.set_cookie_verify_callback(lambda conn, cookie: bytes(cookie) == conn.get_app_data().cookie)
    if psk_callback is not None:
        lib.SSL_CTX_set_psk_server_callback(ctx._context, psk_callback)
    return ctx


def _load(method: Callable[[str], Any], path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"DTLS {what}: {path} is not a readable file")
    try:
        method(path)
    except SSL.Error as exc:
        reason = "; ".join(str(e[-1]) for e in exc.args[0]) if exc.args and exc.args[0] else str(exc)
        raise ValueError(f"DTLS {what}: {path}: {reason}") from None


def _name_attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else None


async def add_dtls_server(ctx: Any, bind: tuple[str, int], registry: Callable[[], DeviceRegistry],
                          options: DtlsOptions | None = None, reuse_port: bool = False) -> DtlsServerTransport:
    """Add the DTLS server transport to an aiocoap ``Context`` bound to exactly ``bind``."""
    options = options or DtlsOptions()
    ssl_context(options)   # bad certificate files fail here, before aiocoap holds a half-made transport
    created: list[DtlsServerTransport] = []

    async def construct(mman: interfaces.MessageManager) -> DtlsServerTransport:
        transport = await DtlsServerTransport.create(bind, mman, registry, options, ctx.loop,
                                                     reuse_port=reuse_port)
        created.append(transport)
        return transport

    # aiocoap has no public hook to add a transport with its own bind address; this is the
    # helper create_server_context itself uses (stable through 0.4.x).
    await ctx._append_tokenmanaged_messagemanaged_transport(construct)
    return created[0]
