"""Remote settings as Golioth's Firmware SDK expects them (``src/settings.c``).

Operators (``pipeline settings``, or these coroutines on an open ``Store``)::

    await set_setting(store, "LOOP_DELAY_S", "10", type_="int")               # every device
    await set_setting(store, "LOOP_DELAY_S", "5", device="cam-01")             # one device's override
    await set_setting(store, "LOOP_DELAY_S", "7", project="demo")              # one project
    doc = await document_for(store, "demo", "cam-01")    # {"version": 3, "settings": {...}}
    await statuses(store)                                # what each device answered

Settings are typed: ``int`` (32-bit, what the SDK's callbacks take), ``float``, ``bool``,
``string``. A key keeps the type it was first set with, at every level; a value that does not
parse as that type, or a key set again with another type, is refused with the reason. Keys are
``A-Z``, ``0-9`` and ``_``, at most 63 characters (the SDK's limit). A device's settings are the
ones set for all devices, overridden by its project's, overridden by its own; their version is
the store's revision of the newest of them, so it grows with every change that touches it.

Devices (CoAP, under ``/.c``):

* ``GET /.c`` (Observe; Accept CBOR, or JSON): ``{"version": V, "settings": {KEY: value}}``.
  A change made by ``pipeline settings set`` in another process reaches observers within
  ``POLL_INTERVAL``; a device is notified only when its own document changed.
* ``POST /.c/status``: the device's answer, CBOR ``{"version": V, "errors": [{"setting_key":
  K, "error_code": N}]}`` (no ``errors``: all accepted). Kept per device (``settings_status``)
  and shown by ``pipeline settings list``. Malformed answers: 4.00 with the reason.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from typing import Any

import aiocoap
import cbor2
from aiocoap import Code, resource

from pipelines.device_services.common import (
    CF_CBOR,
    CF_JSON,
    ChangePoller,
    Refusal,
    Server,
    ServiceResource,
    Tables,
    add_at,
    decode_cbor_or_json,
    first_block,
    notify_changes,
    refuse,
    small_body,
)
from pipelines.store import Store

TABLES = Tables("settings", """
CREATE TABLE IF NOT EXISTS settings_values(
  scope TEXT NOT NULL, key TEXT NOT NULL, type TEXT NOT NULL, value TEXT NOT NULL,
  rev INTEGER NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY(scope, key));
CREATE TABLE IF NOT EXISTS settings_status(
  project_id TEXT NOT NULL, device_id TEXT NOT NULL, version INTEGER NOT NULL, errors TEXT NOT NULL,
  received_at REAL NOT NULL, PRIMARY KEY(project_id, device_id));
""")

POLL_INTERVAL = 0.2
TYPES = ("int", "float", "bool", "string")
KEY_RE = re.compile(r"^[A-Z0-9_]{1,63}$")
MAX_STRING = 1024
# include/golioth/settings.h: enum golioth_settings_status
ERROR_CODES = {0: "success", 1: "key not recognized", 2: "key not valid", 3: "value format not valid",
               4: "value outside range", 5: "value string too long", 6: "general error"}


class SettingsError(ValueError):
    """An operator's request that cannot be done; the message says why and what to do."""


def scope_of(project: str | None, device: str | None) -> str:
    if project is not None and device is not None:
        raise SettingsError("a setting is for a device or for a project, not both")
    return f"device:{device}" if device is not None else f"project:{project}" if project is not None else "*"


def parse_value(text: str, type_: str) -> Any:
    """The typed value of ``text``, or a ``SettingsError`` saying what was expected."""
    if type_ == "int":
        try:
            value = int(text, 0) if text.strip().lower().startswith(("0x", "-0x")) else int(text)
        except ValueError:
            raise SettingsError(f"{text!r} is not a whole number (type int)") from None
        if not -(1 << 31) <= value < (1 << 31):
            raise SettingsError(f"{value} does not fit a 32-bit int (the SDK's int settings)")
        return value
    if type_ == "float":
        try:
            value = float(text)
        except ValueError:
            raise SettingsError(f"{text!r} is not a number (type float)") from None
        if not math.isfinite(value):
            raise SettingsError(f"{text!r}: a float setting must be finite")
        return value
    if type_ == "bool":
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise SettingsError(f"{text!r} is not true or false (type bool)")
    if type_ == "string":
        if len(text.encode()) > MAX_STRING:
            raise SettingsError(f"string settings are at most {MAX_STRING} bytes")
        return text
    raise SettingsError(f"type {type_!r}: use one of {', '.join(TYPES)}")


def guess_type(text: str) -> str:
    for type_ in ("int", "float", "bool"):
        try:
            parse_value(text, type_)
            return type_
        except SettingsError:
            continue
    return "string"


async def set_setting(store: Store, key: str, value: str, *, type_: str | None = None,
                      project: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Set ``key`` for all devices, a project or one device; returns the stored row."""
    if not KEY_RE.match(key):
        raise SettingsError(f"key {key!r}: use A-Z, 0-9 and _ (at most 63 characters)")
    scope = scope_of(project, device)
    if type_ is not None and type_ not in TYPES:
        raise SettingsError(f"type {type_!r}: use one of {', '.join(TYPES)}")
    await TABLES.ready(store)
    now = time.time()

    def op(conn: sqlite3.Connection) -> dict[str, Any]:
        row = conn.execute("SELECT type, scope FROM settings_values WHERE key = ? LIMIT 1", (key,)).fetchone()
        known = row[0] if row else None
        chosen = type_ or known or guess_type(value)
        if known is not None and chosen != known:
            raise SettingsError(f"{key} is a {known} setting (set for {_scope_text(row[1])}); "
                                f"a {chosen} value cannot be set for it")
        typed = parse_value(value, chosen)
        rev = conn.execute("SELECT COALESCE(MAX(rev), 0) + 1 FROM settings_values").fetchone()[0]
        conn.execute("INSERT INTO settings_values(scope, key, type, value, rev, updated_at) VALUES (?,?,?,?,?,?)"
                     " ON CONFLICT(scope, key) DO UPDATE SET type = excluded.type, value = excluded.value,"
                     " rev = excluded.rev, updated_at = excluded.updated_at",
                     (scope, key, chosen, json.dumps(typed), rev, now))
        return {"scope": _scope_text(scope), "key": key, "type": chosen, "value": typed, "rev": rev}
    return await store.run(op)


def _scope_text(scope: str) -> str:
    return "all devices" if scope == "*" else scope.replace(":", " ", 1)


async def all_settings(store: Store) -> list[dict[str, Any]]:
    await TABLES.ready(store)
    rows = await store.run(lambda c: c.execute(
        "SELECT scope, key, type, value, rev, updated_at FROM settings_values ORDER BY key, scope").fetchall())
    return [{"scope": _scope_text(r[0]), "key": r[1], "type": r[2], "value": json.loads(r[3]),
             "rev": r[4], "updated_at": r[5]} for r in rows]


async def document_for(store: Store, project_id: str, device_id: str) -> dict[str, Any]:
    """The settings document the device is sent."""
    await TABLES.ready(store)
    scopes = ("*", f"project:{project_id}", f"device:{device_id}")  # later ones win
    rows = await store.run(lambda c: c.execute(
        "SELECT scope, key, value, rev FROM settings_values WHERE scope IN (?,?,?)", scopes).fetchall())
    rank = {s: i for i, s in enumerate(scopes)}
    best: dict[str, tuple[int, Any, int]] = {}
    for scope, key, value, rev in rows:
        if key not in best or rank[scope] > best[key][0]:
            best[key] = (rank[scope], json.loads(value), rev)
    version = max((rev for _, _, rev in best.values()), default=0)
    return {"version": version, "settings": {k: best[k][1] for k in sorted(best)}}


async def record_status(store: Store, project_id: str, device_id: str, version: int,
                        errors: list[dict[str, Any]]) -> None:
    await TABLES.ready(store)
    await store.run(lambda c: c.execute(
        "INSERT INTO settings_status(project_id, device_id, version, errors, received_at) VALUES (?,?,?,?,?)"
        " ON CONFLICT(project_id, device_id) DO UPDATE SET version = excluded.version,"
        " errors = excluded.errors, received_at = excluded.received_at",
        (project_id, device_id, version, json.dumps(errors), time.time())) and None)


async def statuses(store: Store, device_id: str | None = None) -> list[dict[str, Any]]:
    """Each device's last answer: the version it saw and its errors (empty: all accepted)."""
    await TABLES.ready(store)
    sql = "SELECT project_id, device_id, version, errors, received_at FROM settings_status"
    args: tuple[Any, ...] = ()
    if device_id is not None:
        sql += " WHERE device_id = ?"
        args = (device_id,)
    rows = await store.run(lambda c: c.execute(sql + " ORDER BY device_id", args).fetchall())
    out = []
    for r in rows:
        errors = json.loads(r[3])
        out.append({"project_id": r[0], "device_id": r[1], "version": r[2], "errors": errors,
                    "accepted": not errors, "received_at": r[4]})
    return out


def _check_status(answer: Any) -> tuple[int, list[dict[str, Any]]]:
    if not isinstance(answer, dict):
        raise refuse(Code.BAD_REQUEST, "a settings status is a map {version, errors?}")
    version = answer.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise refuse(Code.BAD_REQUEST, "settings status: 'version' must be a whole number")
    raw = answer.get("errors", [])
    if not isinstance(raw, list) or len(raw) > 256:
        raise refuse(Code.BAD_REQUEST, "settings status: 'errors' must be a list")
    errors = []
    for item in raw:
        if not isinstance(item, dict):
            raise refuse(Code.BAD_REQUEST, "settings status: each error is a map {setting_key, error_code}")
        key, code = item.get("setting_key"), item.get("error_code")
        if not isinstance(key, str) or len(key) > 128:
            raise refuse(Code.BAD_REQUEST, "settings status: 'setting_key' must be a string")
        if not isinstance(code, int) or isinstance(code, bool):
            raise refuse(Code.BAD_REQUEST, "settings status: 'error_code' must be a whole number")
        errors.append({"key": key, "code": code, "error": ERROR_CODES.get(code, f"error {code}")})
    return version, errors


def _encode(doc: dict[str, Any], accept: int | None) -> aiocoap.Message:
    if accept == CF_JSON:
        return aiocoap.Message(code=Code.CONTENT, payload=json.dumps(doc).encode(), content_format=CF_JSON)
    return aiocoap.Message(code=Code.CONTENT, payload=cbor2.dumps(doc), content_format=CF_CBOR)


class SettingsResource(ServiceResource, resource.ObservableResource):
    """``/.c`` and ``/.c/status`` (module docstring)."""

    link = {"rt": "x.settings", "obs": None, "title": "remote settings: /.c, /.c/status"}

    def __init__(self, server: Server, store: Store) -> None:
        super().__init__(server, store)
        self.poller = ChangePoller(store, "SELECT MAX(rev) FROM settings_values", POLL_INTERVAL, TABLES)

    async def ready(self) -> None:
        await TABLES.ready(self.store)

    async def render_get(self, request):
        who = self.server.who(request)
        if self._path(request):
            raise refuse(Code.NOT_FOUND, "settings: GET /.c, POST /.c/status")
        if request.opt.accept not in (None, CF_CBOR, CF_JSON):
            raise refuse(Code.NOT_ACCEPTABLE, "settings are served as CBOR (60) or JSON (50)")
        if request.opt.observe is None:
            self.server.check_rate(who)
        doc = await document_for(self.store, who.project_id, who.device_id)
        return first_block(_encode(doc, request.opt.accept))

    async def render_post(self, request):
        who = self.server.who(request)
        if self._path(request) != ["status"]:
            raise refuse(Code.METHOD_NOT_ALLOWED, "settings: answer with POST /.c/status")
        # not rate limited: an answer to the router's own notification (the SDK does not resend)
        body = small_body(request, 16 << 10, "a settings status")
        answer = decode_cbor_or_json(body, request.opt.content_format, "the settings status")
        version, errors = _check_status(answer)
        await record_status(self.store, who.project_id, who.device_id, version, errors)
        return aiocoap.Message(code=Code.CHANGED)

    async def add_observation(self, request, serverobservation):
        try:
            who = self.server.who(request)
        except Refusal:
            return
        if self._path(request) or request.opt.accept not in (None, CF_CBOR, CF_JSON):
            return
        accept = request.opt.accept
        await notify_changes(serverobservation, self.poller,
                             lambda: document_for(self.store, who.project_id, who.device_id),
                             lambda doc: _encode(doc, accept))


def add_resources(site: resource.Site, server: Server, store: Store) -> SettingsResource:
    res = SettingsResource(server, store)
    add_at(site, ".c", res)
    return res
