"""A lean path for the Block1 blocks of ``POST /.s/...`` that have more to come: answered at the datagram.

Usage (``CoapIngest`` installs it on each transport; the transports call it per datagram)::

    fast = Block1FastPath(handler)                # handler(block, remote) -> Answer | None
    if not fast(data, remote, manager, send):     # manager: the transport's aiocoap MessageManager
        ... the datagram goes on to aiocoap as before (screen -> dispatch_message)

Why it replaces aiocoap's work: a camera frame of 44 KB is 44 Block1 exchanges, and each went
through aiocoap's whole request pipeline (``Message.decode``, the message and token layers, a
``Pipe`` and a task per request, ``Message`` objects for the answer, ``encode``): some 160 µs
of CPU per block, ten times the cost of the frame's storage. A block with more to come (M = 1)
needs none of it: its answer is a 2.31 Continue built from the header, or a refusal (from the
upload's assembler, or the rate limit for a block 0), and never waits for anything. The last
block, which stores the frame and answers 2.04 after the commit, stays with aiocoap.

What it takes (everything else, or anything it cannot read, goes to aiocoap untouched):
a CON or NON POST whose options are only Uri-Path (first segment ``.s``), Content-Format,
Uri-Query, Block1 (M = 1, SZX <= 6), Size1, Request-Tag, and Uri-Host / Uri-Port (libcoap
sends them; the router ignores them, as ``coap_options`` says), each well formed
(lengths within RFC 7252 / 7959 / 9175 ranges, the non-repeatable ones once, Uri-Path and
Uri-Query UTF-8), a token of at most 8 bytes not in use by a request aiocoap is still
answering. The handler decides the rest (who is talking, the path, the assembler) and may
decline (None), which also hands the datagram on; it must then have changed nothing.

Duplicates: aiocoap's own table of recent exchanges (``coap_exchanges.RecentExchanges``, keyed
by (remote, message id), as ``MessageManager._deduplicate_message``) is consulted and filled
here, so a message id is one exchange whichever path saw it first. A re-sent CON of a block
answered here gets the same answer bytes again and is not fed twice; a repeated NON is
dropped; a message id aiocoap saw goes to aiocoap, which answers it from its cache. The
answer is kept as ``PreparedAnswer``, which aiocoap can re-send as if it were its own.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiocoap.numbers.types import ACK, NON

from pipelines.ingest.coap_exchanges import RecentExchanges

POST = 2
URI_HOST, URI_PORT, URI_PATH, CONTENT_FORMAT, URI_QUERY, BLOCK1, SIZE1, REQUEST_TAG = 3, 7, 11, 12, 15, 27, 60, 292
MAX_OPTION_LENGTH = {URI_HOST: 255, URI_PORT: 2, URI_PATH: 255, CONTENT_FORMAT: 2, URI_QUERY: 255, BLOCK1: 3,
                     SIZE1: 4, REQUEST_TAG: 8}
EXCHANGE_LIFETIME = 247.0  # seconds (RFC 7252 §4.8.2), as aiocoap's default transport tuning


@dataclass(slots=True)
class UploadBlock:
    """One parsed Block1 block with more to come (M = 1)."""

    mtype: int
    mid: int
    token: bytes
    path: list[str]          # Uri-Path segments, the first one ".s"
    query: list[str]
    content_format: int | None
    num: int
    szx: int
    size1: int | None
    request_tag: tuple[bytes, ...]
    payload: bytes


@dataclass(slots=True)
class Answer:
    """What to answer: a response code, options (number, value) and a payload."""

    code: int
    options: list[tuple[int, bytes]]
    payload: bytes = b""


class PreparedAnswer:
    """An encoded answer kept in aiocoap's exchange table. aiocoap's duplicate handling re-sends
    a table entry with ``MessageManager._send_initially``, which reads ``mtype``, ``remote`` and
    ``mid`` and calls the transport's ``send``, which calls ``encode()``: these are here."""

    __slots__ = ("data", "mid", "mtype", "remote")
    request = None  # unlike aiocoap's answers, never linked to the request (its 1 KB block)

    def __init__(self, data: bytes, mtype: Any, mid: int, remote: Any) -> None:
        self.data, self.mtype, self.mid, self.remote = data, mtype, mid, remote

    def encode(self) -> bytes:
        return self.data


def uint(value: int) -> bytes:
    """A CoAP uint option value: big-endian, no leading zero bytes (0 is empty)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def parse_upload_block(data: bytes) -> UploadBlock | None:
    """The Block1 block with more to come in ``data``, or None for anything else (or anything odd)."""
    n = len(data)
    if n < 4:
        return None
    first = data[0]
    tkl = first & 0x0F
    if first >> 6 != 1 or tkl > 8 or data[1] != POST:
        return None
    mtype = (first >> 4) & 0x03
    if mtype != 0 and mtype != 1:  # CON, NON
        return None
    pos = 4 + tkl
    if pos > n:
        return None
    token = data[4:pos]
    number = 0
    path: list[str] = []
    query: list[str] = []
    content_format = size1 = block = None
    tags: list[bytes] = []
    host_seen = port_seen = False
    payload = b""
    try:
        while pos < n:
            byte = data[pos]
            pos += 1
            if byte == 0xFF:
                payload = data[pos:]
                if not payload:
                    return None  # a payload marker with no payload: a format error, aiocoap's to answer
                break
            delta, length = byte >> 4, byte & 0x0F
            if delta == 13:
                delta = data[pos] + 13
                pos += 1
            elif delta == 14:
                delta = (data[pos] << 8 | data[pos + 1]) + 269
                pos += 2
            elif delta == 15:
                return None
            if length == 13:
                length = data[pos] + 13
                pos += 1
            elif length == 14:
                length = (data[pos] << 8 | data[pos + 1]) + 269
                pos += 2
            elif length == 15:
                return None
            number += delta
            end = pos + length
            if end > n:
                return None
            limit = MAX_OPTION_LENGTH.get(number)
            if limit is None or length > limit:
                return None
            value = data[pos:end]
            pos = end
            if number == URI_PATH:
                path.append(value.decode())
            elif number == URI_QUERY:
                query.append(value.decode())
            elif number == REQUEST_TAG:
                tags.append(value)
            elif number == BLOCK1:
                if block is not None:
                    return None
                block = int.from_bytes(value, "big")
            elif number == CONTENT_FORMAT:
                if content_format is not None:
                    return None
                content_format = int.from_bytes(value, "big")
            elif number == SIZE1:
                if size1 is not None:
                    return None
                size1 = int.from_bytes(value, "big")
            else:  # Uri-Host, Uri-Port: the router ignores them (coap_options), but never twice
                if number == URI_HOST:
                    if host_seen:
                        return None
                    host_seen = True
                    value.decode()
                elif port_seen:
                    return None
                else:
                    port_seen = True
    except (IndexError, UnicodeDecodeError):
        return None
    if block is None or not path or path[0] != ".s":
        return None
    num, more, szx = block >> 4, block & 0x08, block & 0x07
    if not more or szx == 7:
        return None
    mid = data[2] << 8 | data[3]
    return UploadBlock(mtype, mid, token, path, query, content_format, num, szx, size1,
                             tuple(tags), payload)


def encode_answer(block: UploadBlock, answer: Answer) -> bytes:
    """The answer datagram: a piggybacked ACK to a CON (its message id), a NON to a NON."""
    if block.mtype == 0:
        head = struct.pack("!BBH", 0x60 | len(block.token), answer.code, block.mid)
    else:
        head = struct.pack("!BBH", 0x50 | len(block.token), answer.code, random.getrandbits(16))
    out = bytearray(head)
    out += block.token
    options = answer.options
    if len(options) == 1 and options[0][0] == BLOCK1 and len(options[0][1]) < 13:
        # the 2.31 Continue of nearly every block: Block1 alone (delta 27 = 13 + 14, short value)
        value = options[0][1]
        out.append(0xD0 | len(value))
        out.append(BLOCK1 - 13)
        out += value
        return bytes(out)
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        delta, length = number - last, len(value)
        last = number
        ext = b""
        if delta < 13:
            d = delta
        elif delta < 269:
            d, ext = 13, bytes([delta - 13])
        else:
            d, ext = 14, (delta - 269).to_bytes(2, "big")
        if length < 13:
            ln = length
        elif length < 269:
            ln, ext = 13, ext + bytes([length - 13])
        else:
            ln, ext = 14, ext + (length - 269).to_bytes(2, "big")
        out.append(d << 4 | ln)
        out += ext
        out += value
    if answer.payload:
        out.append(0xFF)
        out += answer.payload
    return bytes(out)


def continue_answer(num: int, szx: int) -> Answer:
    """2.31 Continue with Block1 (num, M = 1, szx)."""
    return Answer(2 * 32 + 31, [(BLOCK1, uint(num << 4 | 0x08 | szx))])


Handler = Callable[[UploadBlock, Any], Answer | None]


class Block1FastPath:
    """Per transport: ``fast(data, remote, manager, send)`` -> True if the datagram was handled."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.handled = 0
        self.duplicates = 0

    def __call__(self, data: bytes, remote: Any, manager: Any, send: Callable[[bytes], None]) -> bool:
        # cheapest test first: a POST (code byte 0.02) is all this path takes
        if len(data) < 4 or data[1] != POST:
            return False
        table = getattr(manager, "_recent_messages", None)
        if not isinstance(table, RecentExchanges):
            return False  # aiocoap's table not capped (not ours): leave duplicates to aiocoap
        key = (remote, data[2] << 8 | data[3])
        seen = table.get(key, False)
        if seen is not False:
            if not isinstance(seen, PreparedAnswer):
                return False  # aiocoap's exchange: it answers the duplicate from its cache
            if data[0] >> 4 & 0x03 == 0:  # CON again: the same answer again
                send(seen.data)
            self.duplicates += 1
            return True
        block = parse_upload_block(data)
        if block is None:
            return False
        # a token aiocoap is still answering from this remote: its checks apply (screen)
        if (remote, block.token) in manager._piggyback_opportunities:
            return False
        running = manager.token_manager.incoming_requests
        if running and (block.token, remote) in running:
            return False
        answer = self.handler(block, remote)
        if answer is None:
            return False
        out = encode_answer(block, answer)
        table.remember_answered(key, EXCHANGE_LIFETIME,
                                PreparedAnswer(out, ACK if block.mtype == 0 else NON, block.mid, remote))
        self.handled += 1
        send(out)
        return True

