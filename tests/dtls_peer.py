"""A hand-driven DTLS 1.2 client for tests: one UDP socket, flights sent and received one by one.

Unlike the simulator's aiocoap transport, it lets a test stop half way, reuse one source
address/port for a second identity, record and replay flights::

    peer = DtlsPeer(port)                                     # a fresh UDP socket on 127.0.0.1
    await peer.handshake(b"cam-01@demo", key, "PSK-AES128-CCM8")
    response = await peer.request(aiocoap.Message(code=POST, uri="/.s/x", payload=b"hi"))
    await peer.half_open(b"cam-01@demo", key)                  # ClientHello, cookie echo, silence
    peer.close()

Blocking socket calls run in a thread so the server in the test's event loop keeps running.
"""

from __future__ import annotations

import asyncio
import socket

import aiocoap
from OpenSSL import SSL
from OpenSSL._util import ffi, lib


class DtlsPeer:
    def __init__(self, port: int, *, sock: socket.socket | None = None, timeout: float = 5.0) -> None:
        self.addr = ("127.0.0.1", port)
        self.sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if sock is None:
            self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(timeout)
        self.conn: SSL.Connection | None = None
        self.sent: list[bytes] = []       # every datagram sent, for replay tests
        self._callback = None
        self._mid = 1

    def _context(self, identity: bytes, key: bytes, cipher: str) -> SSL.Context:
        ctx = SSL.Context(SSL.DTLS_METHOD)
        ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
        ctx.set_cipher_list((cipher + ":@SECLEVEL=0").encode())

        def psk(ssl, hint, identity_out, max_identity, psk_out, max_psk):
            if len(identity) > max_identity or len(key) > max_psk:  # the buffer holds max + NUL
                return 0
            ffi.memmove(identity_out, identity + b"\0", len(identity) + 1)
            ffi.memmove(psk_out, key, len(key))
            return len(key)

        self._callback = ffi.callback(
            "unsigned int(SSL *, const char *, char *, unsigned int, unsigned char *, unsigned int)", psk)
        lib.SSL_CTX_set_psk_client_callback(ctx._context, self._callback)
        return ctx

    def _out(self) -> list[bytes]:
        data = b""
        while True:
            try:
                data += self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
        return [data] if data else []

    def send_raw(self, datagram: bytes) -> None:
        self.sent.append(datagram)
        self.sock.sendto(datagram, self.addr)

    async def recv_raw(self) -> bytes:
        data, _ = await asyncio.to_thread(self.sock.recvfrom, 65536)
        return data

    def _step(self) -> bool:
        try:
            self.conn.do_handshake()
            done = True
        except SSL.WantReadError:
            done = False
        for datagram in self._out():
            self.send_raw(datagram)
        return done

    def start(self, identity: bytes, key: bytes, cipher: str = "PSK-AES128-GCM-SHA256") -> None:
        self.conn = SSL.Connection(self._context(identity, key, cipher), None)
        self.conn.set_connect_state()
        self.conn.set_ciphertext_mtu(1200)
        self._step()

    async def handshake(self, identity: bytes, key: bytes, cipher: str = "PSK-AES128-GCM-SHA256") -> str:
        """A full handshake; returns the negotiated suite. Raises SSL.Error or TimeoutError."""
        self.start(identity, key, cipher)
        while True:
            try:
                data = await self.recv_raw()
            except TimeoutError:
                raise
            self.conn.bio_write(data)
            if self._step():
                return self.conn.get_cipher_name()

    async def half_open(self, identity: bytes, key: bytes) -> None:
        """ClientHello, answer the HelloVerifyRequest with the cookie, then fall silent."""
        self.start(identity, key)
        self.conn.bio_write(await self.recv_raw())   # the HelloVerifyRequest
        self._step()                                 # ClientHello with the cookie

    async def request(self, message: aiocoap.Message, attempts: int = 4) -> aiocoap.Message:
        """Send a CON request (re-encrypted and resent each second, as CoAP retransmits) and
        return the answer with its token."""
        message.mtype = aiocoap.CON
        message.mid = self._mid
        self._mid += 1
        if not message.token:
            message.token = self._mid.to_bytes(4, "big")
        encoded = message.encode()
        timeout = self.sock.gettimeout()
        self.sock.settimeout(1.0)
        try:
            for _ in range(attempts):
                self.conn.send(encoded)
                for datagram in self._out():
                    self.send_raw(datagram)
                try:
                    while True:
                        self.conn.bio_write(await self.recv_raw())
                        try:
                            answer = aiocoap.Message.decode(self.conn.recv(65536))
                        except SSL.WantReadError:
                            continue
                        if answer.token == message.token:
                            return answer
                except TimeoutError:
                    continue
            raise TimeoutError(f"no answer after {attempts} attempts")
        finally:
            self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()
