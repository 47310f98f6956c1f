"""API keys for the router's HTTP face: creating, revoking, checking; scopes ``read`` and ``admin``.

Keys live in the router's store file (table ``api_keys``), hashed: only ``sha256(key)`` is
kept, the key itself is printed once by ``pipeline keys create``. A key looks like
``iotp_<id>_<secret>`` (``id`` 8 hex digits, ``secret`` 32 random bytes in urlsafe base64), so
it is found by id and compared in constant time. A key is sent as ``Authorization: Bearer KEY``.

Scopes: ``read`` reads (GET/HEAD), ``admin`` reads and operates (any method). ``admin``
includes ``read``.

Usage::

    keys = KeyStore("pipeline-data/store.db")
    key_id, key = keys.create("read", name="grafana")      # show ``key`` to the user once
    keys.list(); keys.revoke(key_id)

    auth = Authenticator(store_path, host="0.0.0.0")       # raises NoKeysError: see below
    app = Starlette(routes=..., middleware=[auth.middleware()])

    @require("admin")                                      # on an endpoint: a stricter scope
    async def replay(request): ...

What the middleware does, before any route reads a body:

- open paths (``/healthz``, and on loopback also ``/readyz`` and ``/metrics``, none of them
  with ``protect_metrics``; and the prediction callback, which has its own signature and
  token) pass without a key;
- with no key at all in the store and a loopback address, everything is open (what the
  demo and the tests rely on), logged once; ``request.scope["auth"]`` is then the
  :data:`OPEN` principal (admin);
- otherwise a missing or wrong key is 401; a client that sent ``max_failures`` wrong keys
  within ``failure_window`` seconds gets 429 with ``Retry-After`` until the window passes;
  a ``read`` key on a non-read method is 403;
- at most ``max_uploads`` requests with a body run at once per client address (429 beyond).

``Authenticator.check_startup()`` refuses a non-loopback address when the store holds no
key (:class:`NoKeysError` says what to run). The key table is re-read at most once a
second, so ``pipeline keys revoke`` takes effect within a second on a running router.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import logging
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pipelines.file_perms import make_private

log = logging.getLogger("pipelines.http_auth")

SCOPES = ("read", "admin")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
KEY_PREFIX = "iotp_"
HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# routes that authenticate on their own: the prediction callback (Standard Webhooks signature
# and a per-prediction token, see pipelines.predictions_results)
SELF_AUTHENTICATED = frozenset({"/v1/hooks/predictions"})

TABLE = """
CREATE TABLE IF NOT EXISTS api_keys(
  id TEXT PRIMARY KEY, name TEXT NOT NULL, scope TEXT NOT NULL, hash TEXT NOT NULL,
  created_at REAL NOT NULL, revoked_at REAL
);
CREATE TABLE IF NOT EXISTS router_secrets(name TEXT PRIMARY KEY, value TEXT NOT NULL, created_at REAL NOT NULL);
"""


class NoKeysError(RuntimeError):
    """The HTTP face would listen on a non-loopback address with no API key to check."""


@dataclass(frozen=True)
class Principal:
    """Who made a request: the key's id, name and scope."""
    key_id: str
    name: str
    scope: str

    def allows(self, scope: str) -> bool:
        return self.scope == "admin" or self.scope == scope


OPEN = Principal("open", "(no keys: open on loopback)", "admin")


def is_local(host: str) -> bool:
    """Loopback addresses (127.0.0.0/8, ::1) and ``localhost``; everything else, including
    ``0.0.0.0`` and ``::`` (every interface), is not."""
    if host.strip("[]").lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: could be anything


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _key_id(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    rest = key[len(KEY_PREFIX):]
    key_id, sep, secret = rest.partition("_")
    if not sep or len(key_id) != 8 or not secret:
        return None
    return key_id


# ---------------------------------------------------------------------------------------
# the key table


class KeyStore:
    """The ``api_keys`` table of a store file (plain sqlite3, short-lived connections, so it
    works beside a running router)."""

    def __init__(self, store_path: str | Path) -> None:
        self.path = str(store_path)

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            make_private(Path(self.path).parent, directory=True, create=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(TABLE)
        if self.path != ":memory:":
            make_private(Path(self.path))
        return conn

    def create(self, scope: str, name: str = "") -> tuple[str, str]:
        """A new key: ``(id, key)``. The key is not kept anywhere: show it now."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        key_id = secrets.token_hex(4)
        key = f"{KEY_PREFIX}{key_id}_{base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b'=').decode()}"
        conn = self._connect()
        try:
            conn.execute("INSERT INTO api_keys(id, name, scope, hash, created_at) VALUES (?,?,?,?,?)",
                         (key_id, name or "", scope, _hash(key), time.time()))
        finally:
            conn.close()
        return key_id, key

    def list(self, include_revoked: bool = False) -> list[dict[str, Any]]:
        conn = self._connect()
        try:
            rows = conn.execute("SELECT id, name, scope, created_at, revoked_at FROM api_keys"
                                " ORDER BY created_at").fetchall()
        finally:
            conn.close()
        return [{"id": r[0], "name": r[1], "scope": r[2], "created_at": r[3], "revoked_at": r[4]}
                for r in rows if include_revoked or r[4] is None]

    def revoke(self, key_id: str) -> bool:
        conn = self._connect()
        try:
            n = conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                             (time.time(), key_id)).rowcount
        finally:
            conn.close()
        return n > 0

    def webhook_secret(self) -> str:
        """The router's own ``whsec_...`` signing secret for prediction callbacks, made and kept
        in the store on first use (the store file is private: 0600)."""
        candidate = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        conn = self._connect()
        try:
            conn.execute("INSERT OR IGNORE INTO router_secrets(name, value, created_at) VALUES (?,?,?)",
                         ("webhook_secret", candidate, time.time()))
            (value,) = conn.execute("SELECT value FROM router_secrets WHERE name = 'webhook_secret'").fetchone()
        finally:
            conn.close()
        return value

    def active(self, timeout: float = 5.0) -> dict[str, tuple[str, str, str]]:
        """id -> (hash, scope, name) of every key not revoked; {} if the store has no table yet."""
        if self.path == ":memory:" or not Path(self.path).exists():
            return {}
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout)
        try:
            rows = conn.execute("SELECT id, hash, scope, name FROM api_keys WHERE revoked_at IS NULL").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # no key was ever created
                return {}
            raise  # busy or broken: the caller must not take it for "no keys"
        finally:
            conn.close()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}


# ---------------------------------------------------------------------------------------
# checking requests


class _Failures:
    """Wrong keys per client address within a window (bounded: the oldest clients are forgotten)."""

    def __init__(self, limit: int, window: float, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def blocked_for(self, client: str, now: float) -> float:
        """Seconds this client must still wait (0: it may try)."""
        entry = self._seen.get(client)
        if entry is None:
            return 0.0
        start, count = entry
        if now - start >= self.window:
            del self._seen[client]
            return 0.0
        return self.window - (now - start) if count >= self.limit else 0.0

    def add(self, client: str, now: float) -> None:
        start, count = self._seen.pop(client, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        self._seen[client] = (start, count + 1)
        while len(self._seen) > self.max_clients:
            self._seen.popitem(last=False)


class Authenticator:
    """Checks ``Authorization: Bearer`` keys against the store's key table; see the module
    docstring. ``open_paths`` pass without a key (their routes authenticate on their own)."""

    def __init__(self, store_path: str | Path | None, *, host: str = "127.0.0.1",
                 protect_metrics: bool = False, open_paths: frozenset[str] = SELF_AUTHENTICATED,
                 max_failures: int = 10, failure_window: float = 60.0, max_uploads: int = 16,
                 refresh_every: float = 1.0) -> None:
        self.keys = KeyStore(store_path) if store_path is not None else None
        self.host = host
        self.protect_metrics = protect_metrics
        # health and metrics stay open on loopback; on other addresses only /healthz (it says
        # nothing but "ok"), since /metrics names devices' pipelines and queues
        health = HEALTH_PATHS if is_local(host) else frozenset({"/healthz"})
        self.open_paths = frozenset(open_paths) | (frozenset() if protect_metrics else health)
        self.failures = _Failures(max_failures, failure_window)
        self.max_uploads = max_uploads
        self.refresh_every = refresh_every
        self._uploads: dict[str, int] = {}
        self._active: dict[str, tuple[str, str, str]] = {}
        # header value -> principal, for keys already checked once; emptied whenever the key
        # table changes (a revoked key stops working at the next re-read). Looked up by the
        # exact header bytes through a SipHash-keyed dict: no timing to learn a key from.
        self._checked: dict[bytes, Principal] = {}
        self._loaded_at = -1e9
        self._loaded_ok = False
        self._said_open = False
        self.rejected = 0

    # -- the key table, cached ------------------------------------------------------------

    def _refresh(self, now: float) -> dict[str, tuple[str, str, str]]:
        if now - self._loaded_at >= self.refresh_every:
            self._loaded_at = now
            try:
                # re-read from the event loop once a second: never wait long for a busy database
                # (the keys it had are kept, and it tries again a second later); the first read
                # may wait, and if it fails the request fails: never open because of an error
                active = (self.keys.active(0.05 if self._loaded_ok else 5.0)
                          if self.keys is not None else {})
                if active != self._active:
                    self._checked = {}
                self._active = active
                self._loaded_ok = True
            except sqlite3.Error as exc:
                if not self._loaded_ok:
                    self._loaded_at = -1e9  # the next request tries again
                    raise
                log.warning("could not re-read the API keys (%s); keeping the last %d",
                            exc, len(self._active))
        return self._active

    def check_startup(self) -> None:
        """Raise :class:`NoKeysError` for a non-loopback address without keys; log once when open."""
        if self._refresh(time.monotonic()):
            return
        if not is_local(self.host):
            where = self.keys.path if self.keys is not None else "(the store)"
            raise NoKeysError(
                f"refusing to serve the HTTP face on {self.host} without authentication: no API key "
                f"exists in {where}, so anyone who can reach this address could read device state "
                f"and dead letters. Create one first: `pipeline keys create --scope admin --store "
                f"{where}` (then send it as 'Authorization: Bearer KEY'), or bind the HTTP face to "
                f"127.0.0.1 (--http-host 127.0.0.1)")
        self._log_open()

    def _log_open(self) -> None:
        if not self._said_open:
            self._said_open = True
            log.warning("the HTTP face on %s is open (no API keys): fine on loopback; create keys "
                        "with `pipeline keys create` to require them", self.host)

    def authenticate(self, authorization: str | None, now: float | None = None) -> Principal | None:
        """The principal a header value names; :data:`OPEN` when there are no keys on loopback;
        None when the key is missing or wrong."""
        active = self._refresh(time.monotonic() if now is None else now)
        if not active and is_local(self.host):
            self._log_open()
            return OPEN
        if not authorization:
            return None
        kind, _, key = authorization.partition(" ")
        if kind.lower() != "bearer":
            return None
        key = key.strip()
        key_id = _key_id(key)
        entry = active.get(key_id) if key_id else None
        # hash anyway so a wrong id costs the same as a wrong secret
        digest = _hash(key)
        if entry is None or not hmac.compare_digest(digest, entry[0]):
            return None
        return Principal(key_id, entry[2], entry[1])  # type: ignore[arg-type]

    def middleware(self) -> Any:
        from starlette.middleware import Middleware
        return Middleware(AuthMiddleware, authenticator=self)


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "?"


def _answer(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    title = {401: "Unauthorized", 403: "Forbidden", 429: "Too Many Requests"}.get(status, "Error")
    hdrs = dict(headers or {})
    if status == 401:
        hdrs.setdefault("WWW-Authenticate", 'Bearer realm="iot-pipelines"')
    return JSONResponse({"title": title, "status": status, "detail": detail}, status_code=status,
                        headers=hdrs, media_type="application/problem+json")


class AuthMiddleware:
    """Pure ASGI middleware (no body buffering): see the module docstring."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.auth = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        auth = self.auth
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        client = _client(scope)
        if path not in auth.open_paths:
            now = time.monotonic()
            wait = auth.failures.blocked_for(client, now)
            if wait > 0:
                await _answer(429, "too many requests with a wrong API key from this address",
                              {"Retry-After": str(max(1, round(wait)))})(scope, receive, send)
                return
            raw = None
            for k, v in scope.get("headers", ()):
                if k == b"authorization":
                    raw = v
                    break
            principal = auth._checked.get(raw) if raw is not None else None
            if principal is None or not auth._refresh(now):
                header = raw.decode("latin-1") if raw is not None else None
                principal = auth.authenticate(header, now)
                if principal is not None and raw is not None and principal is not OPEN:
                    if len(auth._checked) >= 1024:
                        auth._checked.clear()
                    auth._checked[raw] = principal
            if principal is None:
                auth.rejected += 1
                auth.failures.add(client, now)
                detail = ("an API key is required: 'Authorization: Bearer KEY' (keys are made with "
                          "`pipeline keys create`)" if not header else "the API key is not valid")
                await _answer(401, detail)(scope, receive, send)
                return
            if method not in READ_METHODS and not principal.allows("admin"):
                await _answer(403, f"key {principal.key_id} has scope {principal.scope}: "
                                   f"{method} needs admin")(scope, receive, send)
                return
            scope["auth"] = principal
        if method in BODY_METHODS:
            busy = auth._uploads.get(client, 0)
            if busy >= auth.max_uploads:
                await _answer(429, f"at most {auth.max_uploads} uploads at once per client",
                              {"Retry-After": "1"})(scope, receive, send)
                return
            auth._uploads[client] = busy + 1
            try:
                await self.app(scope, receive, send)
            finally:
                left = auth._uploads[client] - 1
                if left:
                    auth._uploads[client] = left
                else:
                    del auth._uploads[client]
            return
        await self.app(scope, receive, send)


def principal_of(request: Request) -> Principal | None:
    return request.scope.get("auth")


def require(scope: str) -> Callable[[Callable[[Request], Awaitable[Response]]],
                                    Callable[[Request], Awaitable[Response]]]:
    """Endpoint decorator: 403 unless the request's key has ``scope`` (401 if the route was
    left open by the middleware and no key came with it)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")

    def wrap(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(endpoint)
        async def checked(request: Request) -> Response:
            principal = principal_of(request)
            if principal is None:
                return _answer(401, "an API key is required: 'Authorization: Bearer KEY'")
            if not principal.allows(scope):
                return _answer(403, f"key {principal.key_id} has scope {principal.scope}: needs {scope}")
            return await endpoint(request)
        return checked
    return wrap
