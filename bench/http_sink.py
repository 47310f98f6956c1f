"""The benchmarks' HTTP destination: a minimal HTTP/1.1 receiver on asyncio, in its own process.

    proc, url = start_sink()        # POST anything to url + "/..."; GET answers "<requests> <bytes>"
    ...
    proc.kill()

Keep-alive, Content-Length bodies, one answer per request. It is deliberately cheap so that on
a small machine the CPU goes to the router under test, not to the receiver, and it runs in a
process of its own so that it never competes with the router for the router's GIL.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import httpx

_count = 0
_bytes = 0


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request on a keep-alive connection: its head (up to the blank line) and its
    Content-Length body (empty without one)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return head, (await reader.readexactly(length) if length else b"")


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global _count, _bytes
    try:
        while True:
            head, received = await read_request(reader)
            length = len(received)
            if head.startswith(b"POST"):
                _count += 1
                _bytes += length
                body = b""
            else:
                body = f"{_count} {_bytes}".encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _serve(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sink() -> tuple[subprocess.Popen, str]:
    """Start the receiver; returns its process and base URL once it answers."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            httpx.get(url + "/count", timeout=0.5)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the sink did not start")


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1])))
