"""A lean CoAP Block1 uploader for load generation: many devices per process, little CPU each.

aiocoap's client does a great deal per request (exchange and token managers, pipes, tasks),
so on a 2-core machine its devices take the CPU the server under test should have. This one
keeps per device only a UDP socket and a message id, and per block builds the
confirmable POST with aiocoap's own ``Message.encode`` and reads the answer with
``Message.decode``; a lost datagram is retransmitted after ACK_TIMEOUT with backoff (RFC 7252
4.2). It does what a camera does on the wire, one frame at a time, and nothing else::

    device = await LeanDevice.open(("127.0.0.1", 5683), "cam-001")
    code, payload = await device.upload("images", png, content_format=23, szx=6)
    device.close()

Plain CoAP only (the device names itself with ``?d=``); the DTLS benchmarks use aiocoap.
"""

from __future__ import annotations

import asyncio
import os

import aiocoap
from aiocoap import ACK, CON, EMPTY, NON, Code

ACK_TIMEOUT = 2.0
MAX_RETRANSMIT = 4
SEPARATE_TIMEOUT = 30.0


class UploadFailed(Exception):
    """No answer after every retransmission, or the server answered something unexpected."""


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[aiocoap.Message]] = {}  # by message id: the ACK
        self.separate: dict[bytes, asyncio.Future[aiocoap.Message]] = {}  # by token, after an empty ACK
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # asyncio's datagram transport

    def datagram_received(self, data: bytes, addr: object) -> None:
        try:
            msg = aiocoap.Message.decode(data)
        except Exception:
            return  # a load generator ignores what it cannot parse
        if msg.mtype in (CON, NON) and msg.code.is_response():  # a separate response (RFC 7252 5.2.2)
            if msg.mtype == CON and self.transport is not None:
                self.transport.sendto(aiocoap.Message(mtype=ACK, mid=msg.mid, code=EMPTY).encode())
            fut = self.separate.pop(msg.token, None)
        else:
            fut = self.waiting.pop(msg.mid, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)


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

    async def _exchange(self, msg: aiocoap.Message) -> aiocoap.Message:
        self.mid = (self.mid + 1) & 0xFFFF
        msg.mid = self.mid
        msg.token = os.urandom(4)  # a late answer to an earlier request can never match this one
        data = msg.encode()
        loop = asyncio.get_running_loop()
        # a separate response (after an empty ACK) may arrive in the same read as the ACK
        later: asyncio.Future[aiocoap.Message] = loop.create_future()
        self.endpoint.separate[msg.token] = later
        try:
            timeout = ACK_TIMEOUT
            for attempt in range(MAX_RETRANSMIT + 1):
                fut: asyncio.Future[aiocoap.Message] = loop.create_future()
                self.endpoint.waiting[msg.mid] = fut
                self.transport.sendto(data)
                try:
                    answer = await asyncio.wait_for(fut, timeout)
                except TimeoutError:
                    self.retransmissions += attempt < MAX_RETRANSMIT
                    timeout *= 2
                    continue
                finally:
                    self.endpoint.waiting.pop(msg.mid, None)
                if answer.code != EMPTY:
                    return answer
                # empty ACK: the server answers separately once it has kept the frame
                try:
                    return await asyncio.wait_for(later, SEPARATE_TIMEOUT)
                except TimeoutError:
                    raise UploadFailed(f"{self.device_id}: no separate response after an empty ACK") from None
        finally:
            self.endpoint.separate.pop(msg.token, None)
        raise UploadFailed(f"{self.device_id}: no answer after {MAX_RETRANSMIT} retransmissions")

    async def upload(self, path: str, payload: bytes, content_format: int, szx: int = 6) -> tuple[Code, bytes]:
        """POST ``payload`` to ``/.s/<path>`` in Block1 blocks of 2**(szx+4) bytes; returns the
        final answer's code and payload. A 2.31 moves on to the next block; anything else ends."""
        size = 1 << (szx + 4)
        segments = (".s", *path.strip("/").split("/"))
        num = 0
        while True:
            chunk = payload[num * size:(num + 1) * size]
            more = (num + 1) * size < len(payload)
            msg = aiocoap.Message(mtype=CON, code=Code.POST, uri_path=segments,
                                  uri_query=(f"d={self.device_id}",), content_format=content_format,
                                  payload=chunk)
            msg.opt.block1 = aiocoap.optiontypes.BlockOption.BlockwiseTuple(num, more, szx)
            answer = await self._exchange(msg)
            if answer.code == Code.CONTINUE and more:
                got = answer.opt.block1
                if got is not None and got.size_exponent < szx:  # the server asks for smaller blocks
                    ratio = 1 << (szx - got.size_exponent)
                    num, szx = (num + 1) * ratio, got.size_exponent
                    size = 1 << (szx + 4)
                else:
                    num += 1
                continue
            return answer.code, answer.payload
