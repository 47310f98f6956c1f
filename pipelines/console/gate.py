"""The browser's way past the HTTP face's API keys: a login form and an HttpOnly cookie.

Usage (what ``RouterService`` does; outermost, around the app with the auth middleware)::

    app = ConsoleGate(app, authenticate=authenticator.authenticate)   # or authenticate=None

A browser cannot send ``Authorization: Bearer KEY`` by itself, so for paths under ``/console``:

- ``GET /console/login`` shows a form for the key; ``POST`` checks it with ``authenticate``
  (the HTTP face's own check, ``pipelines.http_auth.Authenticator.authenticate``) and sets it
  as an HttpOnly, SameSite=Strict cookie (``Secure`` on HTTPS); ``/console/logout`` clears it;
- a request with the cookie and no ``Authorization`` header gets the header from the cookie,
  so the auth middleware behind checks it exactly as it checks any client;
- a page request without any key, when keys are required, gets 401 with the login form
  (API clients get the middleware's JSON 401 as usual);
- ``/console/static/*`` (CSS and JavaScript, nothing about the router) is served without a key.

With ``authenticate=None`` (an HTTP face without keys) the gate only serves the static files
and a login page saying no key is needed.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from pipelines.console.access import COOKIE

PREFIX = "/console"
MAX_FORM = 4096
MAX_FAILURES = 10        # wrong keys per client address within FAILURE_WINDOW before 429
FAILURE_WINDOW = 60.0
_STATIC = StaticFiles(directory=str(Path(__file__).parent / "static"))

_LOGIN = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Log in · pipeline console</title>
<link rel="stylesheet" href="{p}/static/console.css"></head><body>
<header><strong class="brand">pipeline console</strong></header>
<main><h1>Log in</h1>{msg}
<form method="post" action="{p}/login" class="filters">
<input type="hidden" name="next" value="{next}">
<label>API key <input name="key" type="password" autocomplete="current-password" size="48" autofocus></label>
<button>Log in</button></form>
<p><small>Keys are made with <code>pipeline keys create --scope read</code> (or <code>admin</code>
to replay and purge dead letters).</small></p></main></body></html>"""


def login_page(message: str = "", next_path: str = PREFIX + "/", status: int = 200) -> Response:
    msg = f'<p class="banner" role="alert">{html.escape(message)}</p>' if message else ""
    return HTMLResponse(_LOGIN.format(p=PREFIX, msg=msg, next=html.escape(next_path, quote=True)),
                        status_code=status, headers={"Cache-Control": "no-store"})


def _safe_next(value: str | None) -> str:
    """Only a path of the console itself (no open redirect)."""
    if value and value.startswith(PREFIX + "/") and not value.startswith("//") and "\\" not in value:
        return value
    return PREFIX + "/"


class ConsoleGate:
    def __init__(self, app: ASGIApp, authenticate: Callable[[str | None], Any] | None = None) -> None:
        self.app = app
        self.authenticate = authenticate
        self._failures: dict[str, list[float]] = {}  # client address -> times of wrong keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        if path.startswith(PREFIX + "/static/"):
            await _STATIC({**scope, "path": path[len(PREFIX + "/static"):], "root_path": ""}, receive, send)
            return
        if path == PREFIX + "/login":
            await (await self._login(scope, receive))(scope, receive, send)
            return
        if path == PREFIX + "/logout":
            r = RedirectResponse(PREFIX + "/login", status_code=303)
            r.delete_cookie(COOKIE, path=PREFIX)
            await r(scope, receive, send)
            return
        headers = list(scope.get("headers", ()))
        has_auth = any(k == b"authorization" for k, _ in headers)
        key = _cookie(headers)
        if not has_auth and key:
            headers.append((b"authorization", b"Bearer " + key.encode("latin-1", "replace")))
            scope = {**scope, "headers": headers}
        elif not has_auth and self.authenticate is not None and _wants_html(headers) \
                and self.authenticate(None) is None:
            nxt = path + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
            await login_page("This router requires an API key.", _safe_next(nxt), 401)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive) -> Response:
        if scope["method"] != "POST":
            qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if self.authenticate is None or self.authenticate(None) is not None:
                return login_page("This router has no API keys: the console is open (loopback only).")
            return login_page(next_path=_safe_next((qs.get("next") or [None])[0]))
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_FORM:
                return login_page("That form is too large.", status=413)
            if not message.get("more_body"):
                break
        form = parse_qs(body.decode("utf-8", "replace"))
        key = (form.get("key") or [""])[0].strip()
        nxt = _safe_next((form.get("next") or [None])[0])
        if self.authenticate is None:
            return RedirectResponse(nxt, status_code=303)
        client = (scope.get("client") or ("?",))[0]
        now = time.monotonic()
        recent = [t for t in self._failures.get(client, []) if now - t < FAILURE_WINDOW]
        if len(recent) >= MAX_FAILURES:  # the login form is no way around the face's own limit
            r = login_page("Too many wrong keys from this address: wait a minute.", nxt, 429)
            r.headers["Retry-After"] = str(round(FAILURE_WINDOW - (now - recent[0])) + 1)
            return r
        if not key or self.authenticate(f"Bearer {key}") is None:
            recent.append(now)
            self._failures[client] = recent
            if len(self._failures) > 10_000:
                self._failures.pop(next(iter(self._failures)))
            return login_page("That key is not valid.", nxt, 401)
        self._failures.pop(client, None)
        r = RedirectResponse(quote(nxt, safe="/?=&%"), status_code=303)
        r.set_cookie(COOKIE, key, path=PREFIX, httponly=True, samesite="strict",
                     secure=scope.get("scheme") == "https", max_age=7 * 24 * 3600)
        return r


def _cookie(headers: list[tuple[bytes, bytes]]) -> str | None:
    for k, v in headers:
        if k == b"cookie":
            for part in v.decode("latin-1").split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE and value:
                    return value
    return None


def _wants_html(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k == b"accept" and b"text/html" in v for k, v in headers)
