"""A lean CoAP Block1 uploader for load generation: many devices per process, little CPU each.

aiocoap's client does a great deal per request (exchange and token managers, pipes, tasks),
so on a 2-core machine its devices take the CPU the server under test should have. Here each
device keeps a UDP socket and a message id. The datagrams of a frame are built once, with
aiocoap's own ``Message.encode``, before the clock starts; sending a block only writes its
message id and a fresh token into the header. Answers are read from their header (type, code,
message id, token), and decoded in full by aiocoap only when they end the upload or renegotiate
the block size. A lost datagram is retransmitted after ACK_TIMEOUT with backoff, an empty ACK
is followed by waiting for the separate response (RFC 7252 4.2, 5.2.2)::

    device = await LeanDevice.open(("127.0.0.1", 5683), "cam-001")
    upload = device.prepare("images", png, content_format=23, szx=6)   # before timing
    code, payload = await device.upload(upload)
    device.close()

Plain CoAP only (the device names itself with ``?d=``); the DTLS benchmarks use aiocoap.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import aiocoap
from aiocoap import CON, Code
from aiocoap.optiontypes import BlockOption

ACK_TIMEOUT = 2.0
MAX_RETRANSMIT = 4
SEPARATE_TIMEOUT = 30.0
TOKEN_LENGTH = 4
_CONTINUE = int(Code.CONTINUE)
_TYPE_CON, _TYPE_NON = 0, 1


class UploadFailed(Exception):
    """No answer after every retransmission, or no separate response after an empty ACK."""


@dataclass
class Prepared:
    """One frame's upload: its blocks as encoded datagrams (message id and token left blank)."""

    path: str
    payload: bytes
    content_format: int
    szx: int
    datagrams: list[bytearray]


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[bytes]] = {}  # by message id: the ACK
        self.separate: dict[bytes, asyncio.Future[bytes]] = {}  # by token, after an empty ACK
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # asyncio's datagram transport

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) < 4:
            return  # a load generator ignores what it cannot parse
        mtype, tkl = (data[0] >> 4) & 3, data[0] & 0x0F
        if mtype in (_TYPE_CON, _TYPE_NON) and data[1] >= 0x40:  # a separate response
            if mtype == _TYPE_CON and self.transport is not None:
                self.transport.sendto(bytes((0x60, 0)) + data[2:4])  # its empty ACK
            fut = self.separate.pop(data[4:4 + tkl], None)
        else:
            fut = self.waiting.pop(int.from_bytes(data[2:4], "big"), None)
        if fut is not None and not fut.done():
            fut.set_result(data)


def _expire(fut: asyncio.Future, expired: list[bool]) -> None:
    expired.append(True)
    fut.cancel()


class LeanDevice:
    """One simulated device: its own UDP endpoint, one request in flight."""

    def __init__(self, transport: asyncio.DatagramTransport, endpoint: _Endpoint, device_id: str) -> None:
        self.transport = transport
        self.endpoint = endpoint
        self.device_id = device_id
        self.mid = int.from_bytes(os.urandom(2), "big")
        self.retransmissions = 0

    @classmethod
    async def open(cls, server: tuple[str, int], device_id: str) -> LeanDevice:
        loop = asyncio.get_running_loop()
        transport, endpoint = await loop.create_datagram_endpoint(_Endpoint, remote_addr=server)
        return cls(transport, endpoint, device_id)

    def close(self) -> None:
        self.transport.close()

    def prepare(self, path: str, payload: bytes, content_format: int, szx: int = 6) -> Prepared:
        """Encode every block of ``payload`` for ``POST /.s/<path>`` at 2**(szx+4) bytes."""
        size = 1 << (szx + 4)
        segments = (".s", *path.strip("/").split("/"))
        datagrams = []
        for num in range(max(1, -(-len(payload) // size))):
            msg = aiocoap.Message(mtype=CON, mid=0, token=bytes(TOKEN_LENGTH), code=Code.POST,
                                  uri_path=segments, uri_query=(f"d={self.device_id}",),
                                  content_format=content_format, payload=payload[num * size:(num + 1) * size])
            msg.opt.block1 = BlockOption.BlockwiseTuple(num, (num + 1) * size < len(payload), szx)
            datagrams.append(bytearray(msg.encode()))
        return Prepared(path, payload, content_format, szx, datagrams)

    async def _exchange(self, data: bytearray) -> bytes:
        self.mid = (self.mid + 1) & 0xFFFF
        data[2:4] = self.mid.to_bytes(2, "big")
        token = os.urandom(TOKEN_LENGTH)  # a late answer to an earlier request never matches
        data[4:4 + TOKEN_LENGTH] = token
        loop = asyncio.get_running_loop()
        # a separate response may arrive in the same read as its empty ACK: wait for both at once
        later: asyncio.Future[bytes] = loop.create_future()
        self.endpoint.separate[token] = later
        try:
            timeout = ACK_TIMEOUT
            for attempt in range(MAX_RETRANSMIT + 1):
                fut: asyncio.Future[bytes] = loop.create_future()
                self.endpoint.waiting[self.mid] = fut
                self.transport.sendto(data)
                # a timer that cancels the wait: cheaper than wait_for's wrapping per block
                expired: list[bool] = []
                timer = loop.call_later(timeout, _expire, fut, expired)
                try:
                    answer = await fut
                except asyncio.CancelledError:
                    if not expired:
                        raise  # the upload itself was cancelled
                    self.retransmissions += attempt < MAX_RETRANSMIT
                    timeout *= 2
                    continue
                finally:
                    timer.cancel()
                    self.endpoint.waiting.pop(self.mid, None)
                if answer[1] != 0:  # not an empty ACK
                    return answer
                try:
                    return await asyncio.wait_for(later, SEPARATE_TIMEOUT)
                except TimeoutError:
                    raise UploadFailed(f"{self.device_id}: no separate response after an empty ACK") from None
        finally:
            self.endpoint.separate.pop(token, None)
        raise UploadFailed(f"{self.device_id}: no answer after {MAX_RETRANSMIT} retransmissions")

    async def upload(self, upload: Prepared) -> tuple[Code, bytes]:
        """Send the blocks in order; returns the final answer's code and payload. A 2.31 moves on
        to the next block; a smaller block size asked by the server is followed."""
        num, first = 0, True
        while True:
            answer = await self._exchange(upload.datagrams[num])
            more = num + 1 < len(upload.datagrams)
            if answer[1] == _CONTINUE and more and not first:
                num += 1
                continue
            msg = aiocoap.Message.decode(answer)
            if msg.code == Code.CONTINUE and more:
                first = False
                got = msg.opt.block1
                if got is not None and got.size_exponent < upload.szx:  # re-cut at the size asked
                    ratio = 1 << (upload.szx - got.size_exponent)
                    upload = self.prepare(upload.path, upload.payload, upload.content_format, got.size_exponent)
                    num = (num + 1) * ratio
                else:
                    num += 1
                continue
            return msg.code, msg.payload
