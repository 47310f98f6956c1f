"""aiocoap's plain UDP transport, receiving whole datagrams and answering the ones it cannot read.

Usage (what ``CoapIngest`` does for plain CoAP)::

    transport = await IngestUDP6.create_server_transport_endpoint(
        mman, log=ctx.log, loop=loop, bind=(host, port), multicast=[])

Another transport (DTLS) screens each decrypted datagram the same way::

    out = screen(data, remote, message_manager, truncated=record_was_cut)
    if out.reply is not None: send out.reply back to remote (an RST, a 4.02 / 4.00 / 4.13)
    if out.message is not None: message_manager.dispatch_message(out.message)

What it changes in ``aiocoap.transports.udp6.MessageInterfaceUDP6`` (aiocoap 0.4.17), and why:

* **Whole datagrams.** aiocoap reads with a 4,096-byte buffer and ignores ``MSG_TRUNC``, so a
  bigger datagram was decoded from its first 4,096 bytes and acknowledged: the device got 2.04
  for bytes it never sent. We read up to ``MAX_DATAGRAM`` (65,535, more than any UDP payload),
  and should a datagram still be cut (``MSG_TRUNC``, a smaller ``max_datagram``), it is answered
  4.13 Request Entity Too Large with Size1 (the largest datagram we read) and a Block1 hint, and
  never reaches the resources.
* **A deeper receive queue** (``set_receive_buffer``, 4 MB asked): bursts (hostile or not) do
  not push honest datagrams out of the kernel's queue.
* **Undecodable datagrams.** ``Message.decode`` raises ``UnicodeDecodeError`` for a Uri-Path
  that is not UTF-8 (and aiocoap lets it escape from the receive callback: one ERROR traceback
  per datagram), and logs a warning per unparsable datagram. Here: a message-format error in a
  CON gets RST (RFC 7252 §4.2; anything else is dropped), an option value of the wrong form in a
  request gets 4.02 Bad Option (§5.4.3: treated as an unrecognised critical option). Each is
  counted (``datagram_counts.DATAGRAMS``, exported on ``/metrics``) and logged at most once a
  minute, summarised. So is a message whose type and code do not fit (a request in an ACK,
  a reserved code class), which aiocoap logs as a warning each.

Upstream (aiocoap): the receive buffer size and the ``MSG_TRUNC`` check belong in
``util/asyncio/recvmsg.py``; ``UnicodeDecodeError`` from ``StringOption.decode`` should become
``UnparsableMessage`` (or a 4.02) in ``Message.decode``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import aiocoap
from aiocoap import error
from aiocoap.message import Direction
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from aiocoap.transports.udp6 import MessageInterfaceUDP6, UDP6EndpointAddress

from pipelines.ingest.coap_options import option_refusal
from pipelines.ingest.datagram_counts import DATAGRAMS

log = logging.getLogger("coap-ingest")

MAX_DATAGRAM = 65_535      # bytes: no UDP payload is larger (IPv4 65,507; IPv6 65,527)
MAX_BLOCK_SZX = 6          # the Block1 size hinted with 4.13: 1024-byte blocks
RECEIVE_BUFFER = 4 << 20   # bytes of kernel receive queue asked for (see set_receive_buffer)


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask the kernel for a ``size``-byte receive queue; returns what it granted.

    The default (``net.core.rmem_default``, some 200 KB) holds a few dozen datagrams: a burst
    of junk, or a moment the process spends elsewhere (a store commit), and honest blocks are
    dropped, each costing its device a 2 s retransmission. ``SO_RCVBUFFORCE`` (root or
    CAP_NET_ADMIN) may exceed ``net.core.rmem_max``; otherwise ``SO_RCVBUF`` is capped by it
    (raise ``net.core.rmem_max`` for big fleets)."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        if force is None:
            raise PermissionError
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def _header(data: bytes) -> tuple[int, int, int, bytes] | None:
    """(type, code, message id, token) of a datagram that starts like CoAP, else None."""
    if len(data) < 4:
        return None
    vttkl, code, mid = struct.unpack_from("!BBH", data)
    tkl = vttkl & 0x0F
    if vttkl >> 6 != 1 or tkl > 8 or len(data) < 4 + tkl:
        return None
    return (vttkl >> 4) & 0x03, code, mid, bytes(data[4:4 + tkl])


def _is_request(code: int) -> bool:
    return 1 <= code <= 31


def _fits(message: aiocoap.Message) -> bool:
    """Whether type and code go together (what ``MessageManager.dispatch_message`` handles).
    A code of a reserved class (1, 6, 7), a request in an ACK or RST, or a response in an RST is
    a message format error (RFC 7252 3, 4.2): a CON gets RST, the rest is dropped. An empty NON
    (the Golioth SDK's keep-alive) fits: aiocoap answers nothing and the ingest filters its
    log line."""
    code, mtype = message.code, message.mtype
    if code == Code.EMPTY:
        return True
    if code.is_request():
        return mtype in (aiocoap.CON, aiocoap.NON)
    if code.is_response():
        return mtype != aiocoap.RST
    return False


def _refusal(head: tuple[int, int, int, bytes], code: int, reason: bytes) -> bytes | None:
    """The answer to a request (``head`` = type, code, message id, token) with ``code`` and a
    diagnostic payload, encoded here (RFC 7252 3: header, token, payload marker, payload)
    without building a Message: junk comes in thousands per second, and this is most of what
    it costs. None for a request that is neither CON nor NON."""
    mtype, _code, mid, token = head
    if mtype == aiocoap.CON:
        first, mid_out = 0x60 | len(token), mid            # version 1, ACK, the request's id
    elif mtype == aiocoap.NON:
        first, mid_out = 0x50 | len(token), random.getrandbits(16)
    else:
        return None
    return struct.pack("!BBH", first, code, mid_out) + token + (b"\xff" + reason if reason else b"")


def _reset(mid: int) -> bytes:
    """RST for a CON that cannot be processed (RFC 7252 4.2)."""
    return struct.pack("!BBH", 0x70, 0, mid)


def token_in_use(manager: Any, message: aiocoap.Message) -> bool:
    """A new request (not a retransmission) on a token whose request from the same endpoint
    is still in progress. aiocoap matches a response to its request by (endpoint, token): it
    would answer one request with the other's response (a 2.04 carrying another message's id)
    and cache that answer for the retransmissions. Clients SHOULD NOT reuse a token that is in
    use (RFC 7252 5.3.1); such a request is answered 4.00. Observe re-registrations, which
    reuse the token on purpose (RFC 7641 3.3.1), are let through. ``manager``: aiocoap's
    ``MessageManager`` (a message interface's ``_ctx``)."""
    pending = getattr(manager, "_piggyback_opportunities", {}).get((message.remote, message.token))
    if pending is not None:
        return pending[0] != message.mid
    running = getattr(getattr(manager, "token_manager", None), "incoming_requests", None)
    entry = running.get((message.token, message.remote)) if running else None
    if entry is None:
        return False
    earlier = getattr(entry[0], "request", None)
    if earlier is None or earlier.opt.observe is not None or message.opt.observe is not None:
        return False
    return earlier.mid != message.mid


@dataclass
class Screened:
    """What to do with one incoming datagram: dispatch ``message``, or send ``reply`` (if any)."""

    message: aiocoap.Message | None = None
    reply: bytes | None = None


def screen(data: bytes, remote: Any, manager: Any, *, truncated: bool = False,
           max_datagram: int = MAX_DATAGRAM, block_szx: int = MAX_BLOCK_SZX) -> Screened:
    """Decode one datagram for aiocoap, or say how to answer it: the checks of this module, for
    any transport (plain UDP here; the DTLS transport calls it for each decrypted record, with
    ``truncated`` when the record did not fit its buffer). Counts and logs what it refuses."""
    if truncated:
        DATAGRAMS.note("truncated", f"datagram over {max_datagram} bytes", log)
        head = _header(data)
        if head is None or not _is_request(head[1]) or head[0] not in (aiocoap.CON, aiocoap.NON):
            return Screened()
        with warnings.catch_warnings():  # setting type, MID and token by hand is the point here
            warnings.simplefilter("ignore", DeprecationWarning)
            msg = aiocoap.Message(mtype=aiocoap.ACK if head[0] == aiocoap.CON else aiocoap.NON,
                                  mid=head[2] if head[0] == aiocoap.CON else random.getrandbits(16),
                                  token=head[3], code=Code.REQUEST_ENTITY_TOO_LARGE,
                                  payload=f"datagram over {max_datagram} bytes: send the body in "
                                          "Block1 blocks".encode())
        msg.opt.size1 = max_datagram
        msg.opt.block1 = BlockOption.BlockwiseTuple(0, False, block_szx)
        return Screened(reply=msg.encode())
    try:
        message = aiocoap.Message.decode(data, remote)
    except error.UnparsableMessage as exc:
        DATAGRAMS.note("unparsable", f"{exc} ({len(data)} bytes)", log)
        head = _header(data)
        return Screened(reply=_reset(head[2]) if head is not None and head[0] == aiocoap.CON else None)
    except Exception as exc:  # UnicodeDecodeError (a Uri-Path not UTF-8) and anything else
        what = "an option value is not UTF-8" if isinstance(exc, UnicodeDecodeError) else \
            "an option value is malformed"
        DATAGRAMS.note("undecodable_option", what, log)
        head = _header(data)
        if head is None:
            return Screened()
        if _is_request(head[1]):
            return Screened(reply=_refusal(head, Code.BAD_OPTION, what.encode()))
        return Screened(reply=_reset(head[2]) if head[0] == aiocoap.CON else None)
    message.direction = Direction.INCOMING
    if not _fits(message):  # aiocoap would log a warning for each and drop it
        DATAGRAMS.note("misfit", f"code {int(message.code)} in a {message.mtype.name}", log)
        return Screened(reply=_reset(message.mid) if message.mtype == aiocoap.CON else None)
    if message.code.is_request():
        head = (message.mtype, 0, message.mid, message.token)
        refusal = option_refusal(message.opt)
        if refusal is not None:
            # answered here, statelessly, before aiocoap builds a pipe and a task for it (the
            # Site checks again, for transports that do not screen)
            DATAGRAMS.note("bad_option", refusal[1], log)
            return Screened(reply=_refusal(head, refusal[0], refusal[1].encode()))
        if token_in_use(manager, message):
            DATAGRAMS.note("token_in_use", f"token {message.token.hex() or '(empty)'} reused while a "
                           "request with it is in progress", log)
            return Screened(reply=_refusal(head, Code.BAD_REQUEST,
                                           b"token already in use by a request in progress (RFC 7252 5.3.1)"))
    return Screened(message=message)


class IngestUDP6(MessageInterfaceUDP6):
    """``MessageInterfaceUDP6`` that reads whole datagrams and answers undecodable ones."""

    max_datagram = MAX_DATAGRAM
    block_szx = MAX_BLOCK_SZX
    receive_buffer = RECEIVE_BUFFER
    # ``coap_fastpath.Block1FastPath`` (set by the ingest): tried on each whole datagram
    # before the screening and aiocoap; it answers the Block1 blocks with more to come
    fast_path: Any = None

    def connection_made(self, transport):
        transport.max_size = self.max_datagram  # aiocoap's recvmsg buffer, 4,096 by default
        sock = transport.get_extra_info("socket")
        if sock is not None and self.receive_buffer:
            self.receive_buffer_bytes = set_receive_buffer(sock, self.receive_buffer)
        super().connection_made(transport)

    def datagram_msg_received(self, data, ancdata, flags, address):
        pktinfo = None
        for cmsg_level, cmsg_type, cmsg_data in ancdata:
            if cmsg_level == socket.IPPROTO_IPV6 and cmsg_type == socket.IPV6_PKTINFO:
                pktinfo = cmsg_data
        remote = UDP6EndpointAddress(address, self, pktinfo=pktinfo)
        truncated = bool(flags & socket.MSG_TRUNC)
        if self.fast_path is not None and not truncated:
            def answer(reply: bytes) -> None:
                self._answer(reply, pktinfo, address)
            if self.fast_path(data, remote, self._ctx, answer):
                return
        out = screen(data, remote, self._ctx, truncated=truncated,
                     max_datagram=self.max_datagram, block_szx=self.block_szx)
        if out.reply is not None:
            self._answer(out.reply, pktinfo, address)
        if out.message is None:
            return
        try:
            self._ctx.dispatch_message(out.message)
        except Exception as exc:  # aiocoap would re-raise into the event loop: a traceback each
            DATAGRAMS.note("dispatch_error", f"{type(exc).__name__}: {exc}"[:120], log, exc_info=exc)

    def _answer(self, reply: bytes, pktinfo: bytes | None, address: Any) -> None:
        """Send an answer made here (not by aiocoap) back from the address the request came to."""
        ancdata = [] if pktinfo is None else [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)]
        try:
            self.transport.sendmsg(reply, ancdata, 0, address)
        except Exception as exc:  # a send failure must not end the receive loop
            DATAGRAMS.note("answer_failed", f"{type(exc).__name__}: {exc}"[:120], log)
