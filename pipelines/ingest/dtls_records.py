"""DTLS 1.2 record framing and the stateless cookie exchange (RFC 6347 §4.1, §4.2.1).

The DTLS server (``dtls_server``) runs OpenSSL on memory BIOs; this module is the part done in
Python around it, before any per-peer state exists::

    records = split_records(bio_bytes)            # OpenSSL's output, one bytes per record
    for datagram in pack_datagrams(records, mtu): # whole records, each datagram <= mtu
        sock.sendto(datagram, peer)

    hello = parse_client_hello(datagram)          # None unless an unfragmented epoch-0 ClientHello
    cookies = CookieJar()
    if not cookies.valid(peer, hello):
        sock.sendto(hello_verify_request(hello, cookies.make(peer, hello)), peer)  # nothing kept

The cookie is an HMAC over the peer address and the ClientHello's version, random and session
id, keyed by a per-process secret and a 30-second window (the current and the previous window
are accepted). A spoofed source address never sees its cookie, so a flood of cookie-less
ClientHellos costs one HMAC and one small datagram each and creates no state.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from dataclasses import dataclass

RECORD_HEADER = 13          # type(1) version(2) epoch(2) sequence(6) length(2)
HANDSHAKE_HEADER = 12       # type(1) length(3) message_seq(2) fragment_offset(3) fragment_length(3)
CT_HANDSHAKE = 22
HT_CLIENT_HELLO = 1
HT_HELLO_VERIFY_REQUEST = 3
DTLS_1_0 = b"\xfe\xff"      # RFC 6347 §4.2.1: HelloVerifyRequest carries DTLS 1.0
COOKIE_BYTES = 16
COOKIE_WINDOW = 30.0        # seconds


def split_records(data: bytes) -> list[bytes]:
    """Cut a run of DTLS records into single records (a truncated tail is dropped)."""
    records = []
    offset = 0
    while offset + RECORD_HEADER <= len(data):
        length = int.from_bytes(data[offset + 11:offset + 13], "big")
        end = offset + RECORD_HEADER + length
        if end > len(data):
            break
        records.append(data[offset:end])
        offset = end
    return records


def pack_datagrams(records: list[bytes], mtu: int) -> list[bytes]:
    """Whole records into as few datagrams as fit ``mtu`` (a record over ``mtu`` goes alone)."""
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


@dataclass(frozen=True)
class ClientHello:
    record_seq: bytes       # 6 bytes; echoed in the HelloVerifyRequest record
    version: bytes
    random: bytes
    session_id: bytes
    cookie: bytes


def first_record_is_client_hello(datagram: bytes) -> bool:
    """True when the datagram starts with an epoch-0 handshake record holding a ClientHello."""
    return (len(datagram) > RECORD_HEADER and datagram[0] == CT_HANDSHAKE
            and datagram[3:5] == b"\x00\x00" and datagram[RECORD_HEADER] == HT_CLIENT_HELLO)


def parse_client_hello(datagram: bytes) -> ClientHello | None:
    """The ClientHello in the datagram's first record, or None if it is not a whole one."""
    if not first_record_is_client_hello(datagram):
        return None
    record_len = int.from_bytes(datagram[11:13], "big")
    body_end = RECORD_HEADER + record_len
    if body_end > len(datagram) or record_len < HANDSHAKE_HEADER:
        return None
    hs = datagram[RECORD_HEADER:body_end]
    length = int.from_bytes(hs[1:4], "big")
    frag_offset = int.from_bytes(hs[6:9], "big")
    frag_length = int.from_bytes(hs[9:12], "big")
    # Fragmented ClientHellos are not accepted statelessly (OpenSSL's DTLSv1_listen neither).
    if frag_offset != 0 or frag_length != length or HANDSHAKE_HEADER + length > len(hs):
        return None
    body = hs[HANDSHAKE_HEADER:HANDSHAKE_HEADER + length]
    if len(body) < 2 + 32 + 1:
        return None
    version, random = body[:2], body[2:34]
    pos = 34
    sid_len = body[pos]
    pos += 1
    session_id = body[pos:pos + sid_len]
    pos += sid_len
    if len(session_id) != sid_len or pos >= len(body):
        return None
    cookie_len = body[pos]
    pos += 1
    cookie = body[pos:pos + cookie_len]
    if len(cookie) != cookie_len:
        return None
    return ClientHello(datagram[5:11], version, random, session_id, cookie)


def hello_verify_request(hello: ClientHello, cookie: bytes) -> bytes:
    """The HelloVerifyRequest record answering ``hello`` (message_seq 0, the hello's record seq)."""
    body = DTLS_1_0 + bytes([len(cookie)]) + cookie
    handshake = (bytes([HT_HELLO_VERIFY_REQUEST]) + len(body).to_bytes(3, "big") + b"\x00\x00"
                 + b"\x00\x00\x00" + len(body).to_bytes(3, "big") + body)
    return (bytes([CT_HANDSHAKE]) + DTLS_1_0 + b"\x00\x00" + hello.record_seq
            + struct.pack("!H", len(handshake)) + handshake)


class CookieJar:
    """Stateless HelloVerifyRequest cookies bound to the peer address and its ClientHello."""

    def __init__(self, secret: bytes | None = None, window: float = COOKIE_WINDOW) -> None:
        self._secret = secret or os.urandom(32)
        self._window = window

    def _mac(self, peer: tuple, hello: ClientHello, slot: int) -> bytes:
        host, port = str(peer[0]), int(peer[1])
        msg = b"|".join([str(slot).encode(), host.encode(), str(port).encode(),
                         hello.version, hello.random, hello.session_id])
        return hmac.new(self._secret, msg, hashlib.sha256).digest()[:COOKIE_BYTES]

    def make(self, peer: tuple, hello: ClientHello) -> bytes:
        return self._mac(peer, hello, int(time.time() // self._window))

    def valid(self, peer: tuple, hello: ClientHello) -> bool:
        if len(hello.cookie) != COOKIE_BYTES:
            return False
        now = int(time.time() // self._window)
        return any(hmac.compare_digest(hello.cookie, self._mac(peer, hello, slot))
                   for slot in (now, now - 1))
