"""The router's HTTP face (starlette): health, metrics, device state, stream, dead letters.

Usage::

    app = create_app(router)                       # extra routes may be added by features
    server = await start_http(app, "127.0.0.1", 8080)
    ...
    await stop_http(server)

Endpoints: ``GET /healthz`` (process alive), ``GET /readyz`` (pipelines loaded, store open,
not pushing back), ``GET /metrics`` (Prometheus), ``GET /v1/devices/{project}/{device}/state``,
``GET /v1/stream``, ``GET /v1/dead-letters``, ``GET /v1/unmatched``. Prediction results
come in at the route the predictions feature adds (see ``pipelines.predictions_results``);
``POST /v1/devices/{device}/rpc`` calls a method on a device (``pipelines.device_services.rpc``).

With ``RouterSettings.extra["http_ingest"] = True`` (``pipeline serve --http-ingest``) the face
also takes messages: ``POST /v1/ingest/{project}/{device}/{path...}`` with the payload as the
body and its ``Content-Type``; an optional ``Message-Id`` header (letters, digits, ``-_.:``,
at most 128) makes a retried POST land on the same message. ``202 {"id": ...}`` means the
message is durably in the inbox; ``503`` with ``Retry-After`` means the router pushes back.
It needs an ``admin`` key once keys exist (see below).

Authentication (``pipelines.http_auth``): once ``pipeline keys create`` has made a key, every
endpoint but ``/healthz``, ``/readyz`` and ``/metrics`` (those too with ``protect_metrics``)
and the prediction callback (signed on its own) wants ``Authorization: Bearer KEY``; with no
key on a loopback address the face stays open; on any other address it refuses to start.
Bodies are counted as they arrive (``read_body``): a body over its cap, announced or chunked,
is refused at the cap, never held whole. TLS: ``start_http(..., certfile=, keyfile=)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from typing import TYPE_CHECKING

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from pipelines.http_auth import Authenticator
from pipelines.ingest import Overloaded
from pipelines.message import Message
from pipelines.metrics import RouterMetrics
from pipelines.secrets import redact_tree

if TYPE_CHECKING:
    from pipelines.router import Router


MAX_INGEST_BODY = 16 << 20
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000  # rows per answer on the listing endpoints; ?limit= is clamped to 1..MAX_LIMIT


class _BadQuery(ValueError):
    pass


class BodyTooLarge(ValueError):
    """The request body is over its cap (announced by Content-Length or counted as it came)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"body over {limit} bytes")
        self.limit = limit


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read chunk by chunk and refused (``BodyTooLarge``) as soon as it
    passes ``limit`` bytes, whether or not a ``Content-Length`` announced it (chunked
    bodies have none): memory stays bounded by ``limit`` per request."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(exc: BodyTooLarge) -> Response:
    # Connection: close: the rest of the body is not read; the client must not reuse the socket
    return JSONResponse({"error": str(exc)}, status_code=413, headers={"Connection": "close"})


def _limit(request: Request) -> int:
    """``?limit=`` as a whole number clamped to 1..MAX_LIMIT; ``_BadQuery`` if it is not one."""
    text = request.query_params.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    try:
        value = int(text.strip())
    except ValueError:
        raise _BadQuery(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {text[:40]!r}") from None
    return min(max(value, 1), MAX_LIMIT)


def _problem(status: int, title: str, detail: str) -> Response:
    return JSONResponse({"title": title, "status": status, "detail": detail}, status_code=status,
                        media_type="application/problem+json")
_MESSAGE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def ingest_route(router: Router) -> Route:
    """``POST /v1/ingest/{project}/{device}/{path}``: see the module docstring."""

    async def ingest(request: Request) -> Response:
        p = request.path_params
        message_id = request.headers.get("message-id")
        if message_id is not None and not _MESSAGE_ID.match(message_id):
            return JSONResponse({"error": "Message-Id must be 1-128 of A-Z a-z 0-9 - _ . :"},
                                status_code=400)
        try:
            body = await read_body(request, MAX_INGEST_BODY)
        except BodyTooLarge as exc:
            return too_large(exc)
        message = Message.new(project_id=p["project"], device_id=p["device"], path="/" + p["path"],
                              content_type=request.headers.get("content-type")
                              or "application/octet-stream",
                              payload=body, id=message_id)
        try:
            await router.accept(message)
        except Overloaded as exc:
            return JSONResponse({"error": "overloaded", "reason": str(exc)}, status_code=503,
                                headers={"Retry-After": str(max(1, round(exc.retry_after)))})
        return JSONResponse({"id": message.id}, status_code=202)

    return Route("/v1/ingest/{project}/{device}/{path:path}", ingest, methods=["POST"])


def create_app(router: Router, extra_routes: list[BaseRoute] | None = None,
               authenticator: Authenticator | None = None) -> Starlette:
    """The face's app. ``authenticator`` defaults to one on the router's store for a loopback
    address (open while the store holds no key)."""
    if authenticator is None:
        authenticator = Authenticator(router.settings.store_path)
    metrics = RouterMetrics(router)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        reason = None if router.ready else "starting"
        reason = reason or router.overload_reason
        if reason:
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def prometheus(_: Request) -> Response:
        body, ctype = await metrics.render()
        return Response(body, media_type=ctype)

    async def device_state(request: Request) -> Response:
        p, d = request.path_params["project"], request.path_params["device"]
        return JSONResponse(await router.get_state(p, d, request.query_params.get("path", "/")))

    async def stream(request: Request) -> Response:
        q = request.query_params
        rows = await router.store.query_stream(project_id=q.get("project"), device_id=q.get("device"),
                                               path=q.get("path"), limit=_limit(request))
        return JSONResponse(rows)

    async def dead_letters(request: Request) -> Response:
        q = request.query_params
        rows = await router.store.dead_letters(pipeline=q.get("pipeline"), step=q.get("step"),
                                               device_id=q.get("device"), limit=_limit(request))
        # secrets in every form (errors and answers may quote a URL with credentials)
        return JSONResponse([redact_tree(r.summary()) for r in rows])

    async def unmatched(request: Request) -> Response:
        return JSONResponse(await router.store.unmatched(_limit(request)))

    async def bad_query(_: Request, exc: Exception) -> Response:
        return _problem(400, "Bad Request", str(exc))

    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", prometheus),
        Route("/v1/devices/{project}/{device}/state", device_state),
        Route("/v1/stream", stream),
        Route("/v1/dead-letters", dead_letters),
        Route("/v1/unmatched", unmatched),
        *([ingest_route(router)] if router.settings.extra.get("http_ingest") else []),
        *(extra_routes or []),
    ]
    app = Starlette(routes=routes, exception_handlers={_BadQuery: bad_query},
                    middleware=[authenticator.middleware()])
    app.state.authenticator = authenticator
    return app


async def start_http(app: Starlette, host: str, port: int, *, certfile: str | None = None,
                     keyfile: str | None = None) -> uvicorn.Server:
    """Serve ``app`` in this event loop; returns once it is listening. Port 0 picks one:
    read it back from ``bound_port(server)``. ``host`` may be ``0.0.0.0`` or ``::`` (every
    interface). With ``certfile``/``keyfile`` (PEM) it serves HTTPS."""
    # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on sockets that say they are TCP, and
    # without it every keep-alive answer waits ~40 ms for the client's delayed ACK
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # log_config=None: uvicorn's loggers propagate to the root handlers and their redaction
    # filter, instead of uvicorn's own stderr handlers that would print a secret as it is
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, log_config=None,
                            ssl_certfile=certfile, ssl_keyfile=keyfile)
    server = uvicorn.Server(config)
    server._bound_socket = sock  # type: ignore[attr-defined]
    server._task = asyncio.create_task(server.serve(sockets=[sock]))  # type: ignore[attr-defined]
    while not server.started:
        if server._task.done():  # type: ignore[attr-defined]
            server._task.result()  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
    return server


def bound_port(server: uvicorn.Server) -> int:
    return server._bound_socket.getsockname()[1]  # type: ignore[attr-defined]


async def stop_http(server: uvicorn.Server) -> None:
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server._task, 5)  # type: ignore[attr-defined]
