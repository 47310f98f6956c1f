"""Who may see the console and who may change things: one function decides.

Usage (the console's views)::

    denied = await check_access(request, "read")     # or "admin" for replay and purge
    if denied is not None:
        return denied

Until the HTTP face has API keys, every request is let through: serve the console on
loopback (the default ``--http-host``) or behind a proxy that authenticates. Once keys
exist this is where the console asks the HTTP face's authentication, with the key from an
``Authorization: Bearer`` header or the console's HttpOnly cookie (set by ``/console/login``).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

COOKIE = "pipeline_console_key"
SCOPES = ("read", "admin")


def key_of(request: Request) -> str | None:
    """The API key the request carries: ``Authorization: Bearer KEY`` or the console's cookie."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.cookies.get(COOKIE) or None


async def check_access(request: Request, scope: str) -> Response | None:
    """None when ``request`` may go on with ``scope`` ("read" or "admin"); otherwise the answer
    to send instead (401 or 403). No keys configured: open (see the module docstring)."""
    assert scope in SCOPES
    return None


def auth_enabled(request: Request) -> bool:
    """Whether the console should offer a login form."""
    return False
