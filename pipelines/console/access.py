"""Who may see the console and who may change things: one function decides.

Usage (the console's views)::

    denied = await check_access(request, "read")     # or "admin" for replay and purge
    if denied is not None:
        return denied

The HTTP face's API keys (``pipelines.http_auth``, when the face has them) are checked by its
middleware before any console route runs: a key from ``Authorization: Bearer`` or from the
console's HttpOnly cookie (``pipelines.console.gate`` turns the cookie into the header). Here
the scope is checked: pages need ``read``; replay, purge and exact bytes need ``admin``. An
HTTP face without keys is open (it serves on loopback).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

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
    to send instead (403). The HTTP face's auth middleware, when there is one, has already
    refused a request without a valid key (401) and put who made it in ``scope["auth"]``;
    without that middleware the face has no keys and the console is open."""
    assert scope in SCOPES
    principal = request.scope.get("auth")
    if principal is None or principal.allows(scope):
        return None
    return JSONResponse({"title": "Forbidden", "status": 403,
                         "detail": f"key {principal.key_id} has scope {principal.scope}: needs {scope}"},
                        status_code=403, media_type="application/problem+json")


def auth_enabled(request: Request) -> bool:
    """Whether the request came with a real key (the console then offers to log out)."""
    principal = request.scope.get("auth")
    return principal is not None and getattr(principal, "key_id", "open") != "open"
