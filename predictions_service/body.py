"""Request bodies read with their size counted as they stream in (chunked encoding included).

    raw = b"".join([chunk async for chunk in read_capped(request, 10_000_000)])

A declared ``Content-Length`` over the cap is refused before anything is read; without one
(``Transfer-Encoding: chunked``) the running count refuses the body as soon as it passes the cap,
so a client cannot make the service buffer more than ``cap`` bytes of one request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request

from .problems import ApiProblem


def too_large(cap: int, hint: str) -> ApiProblem:
    return ApiProblem(413, f"Request body is larger than {cap} bytes; {hint}", title="Request Entity Too Large")


async def read_capped(request: Request, cap: int,
                      hint: str = "upload big files and pass their URL instead") -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise too_large(cap, hint)
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise too_large(cap, hint)
        if chunk:
            yield chunk
