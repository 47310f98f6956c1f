"""Firmware updates (OTA) as Golioth's Firmware SDK expects them (``src/ota.c``).

Operators (``pipeline ota``, or these coroutines on an open ``Store``)::

    art = await upload_artifact(store, data, package="main", version="1.2.3")  # sha256, size
    rel = await release(store, "main", "1.2.3", devices=["cam-01"], rollout=50)  # or tag=, or all
    rows = await device_status(store)            # each device's last reported state per package

Devices (CoAP resources under ``/.u``, registered by ``pipelines.ingest.coap.build_site``):

* ``GET /.u/desired`` (Observe; Accept CBOR): the manifest, CBOR
  ``{1: sequence, 2: hash, 3: [{1: package, 2: version, 3: sha256 hex, 4: size, 5: uri}]}``
  (the keys ``golioth_ota_payload_as_manifest`` decodes). The sequence is the id of the newest
  release in it (0: none). A new release made by ``pipeline ota release`` in another process
  is noticed within ``POLL_INTERVAL`` and observers are notified at once. A manifest larger than
  one block is served with Block2 (the SDK's ``golioth_ota_blockwise_manifest``).
* ``GET /.u/c/<package>@<version>``: the artifact, one Block2 block per request, served from
  the block number alone (stateless: a download resumes at any block, from a new source port
  after a reconnect). Size2 and an ETag (first 8 bytes of the sha256) on every block. Unknown
  package or version: 4.04. A block number past the end: **4.02 Bad Option** with a reason
  (the Block2 option names something that does not exist; 4.08 would tell the client to start
  over, which is not what happened).
* ``POST /.u/c/<package>``: a progress report, CBOR ``{"s": state, "r": reason, "pkg": package,
  "v": current version, "t": target version}`` (``golioth_ota_report_state``): 2.04 and kept
  (``ota_events``, one row per report: the history, the newest ``KEEP_REPORTS`` per device and
  package; the last one is its status). Malformed reports: 4.00 with the reason.

Which release a device gets: per package, the newest release whose target includes it: all
devices, a list of device ids, or a registry tag (``tags:`` in the device registry), and whose
rollout percentage includes it. The rollout bucket is fixed per device and package
(``sha256("<package>/<device>")``), so raising a percentage in a later release only adds devices.

Storage: artifacts live in the router's SQLite store, in 64 KiB chunks (``ota_chunks``), not in
files beside it: one file to back up and move, written in the same transactions as the releases
that name them, shared by every process on the store, and no path handling. A serving process
keeps the artifacts it serves in memory (``ArtifactCache``, bounded), so a block is a slice of
bytes, not a query.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiocoap
import cbor2
from aiocoap import Code, resource

from pipelines.device_services.common import (
    CF_CBOR,
    CF_OCTET_STREAM,
    ChangePoller,
    PastEnd,
    Refusal,
    Server,
    ServiceResource,
    Tables,
    block2_answer,
    decode_cbor_or_json,
    error,
    notify_changes,
    refuse,
    small_body,
)
from pipelines.store import Store

TABLES = Tables("ota", """
CREATE TABLE IF NOT EXISTS ota_artifacts(
  id INTEGER PRIMARY KEY AUTOINCREMENT, package TEXT NOT NULL, version TEXT NOT NULL,
  size INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at REAL NOT NULL, UNIQUE(package, version));
CREATE TABLE IF NOT EXISTS ota_chunks(
  artifact_id INTEGER NOT NULL, n INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY(artifact_id, n));
CREATE TABLE IF NOT EXISTS ota_releases(
  id INTEGER PRIMARY KEY AUTOINCREMENT, artifact_id INTEGER NOT NULL, devices TEXT, tag TEXT,
  rollout REAL NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS ota_events(
  seq INTEGER PRIMARY KEY AUTOINCREMENT, project_id TEXT NOT NULL, device_id TEXT NOT NULL,
  package TEXT NOT NULL, state INTEGER NOT NULL, reason INTEGER NOT NULL, version TEXT, target TEXT,
  received_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS ota_events_device ON ota_events(device_id, package, seq);
""")

CHUNK = 64 << 10
MAX_ARTIFACT = 64 << 20          # 64 MiB
POLL_INTERVAL = 0.2              # seconds between looks for releases made by other processes
CACHE_BYTES = 256 << 20          # artifacts kept in memory by a serving process
KEEP_REPORTS = 1000              # newest reports kept per device and package
# The SDK's limits (include/golioth/config.h): a longer name would not fit its buffers.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,15}$")

STATES = ("IDLE", "DOWNLOADING", "DOWNLOADED", "UPDATING")
REASONS = ("READY", "FIRMWARE_UPDATED_SUCCESSFULLY", "NOT_ENOUGH_FLASH_MEMORY", "OUT_OF_RAM",
           "CONNECTION_LOST", "INTEGRITY_CHECK_FAILURE", "UNSUPPORTED_PACKAGE_TYPE", "INVALID_URI",
           "FIRMWARE_UPDATE_FAILED", "UNSUPPORTED_PROTOCOL", "IO", "AWAIT_RETRY")


class OtaError(ValueError):
    """An operator's request that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Artifact:
    id: int
    package: str
    version: str
    size: int
    sha256: str

    @property
    def uri(self) -> str:
        return f"/.u/c/{self.package}@{self.version}"


@dataclass(frozen=True)
class Release:
    id: int
    artifact: Artifact
    devices: tuple[str, ...] | None
    tag: str | None
    rollout: float
    created_at: float

    def includes(self, device_id: str, tags: Iterable[str]) -> bool:
        if self.devices is not None and device_id not in self.devices:
            return False
        if self.tag is not None and self.tag not in tags:
            return False
        return rollout_bucket(self.artifact.package, device_id) < self.rollout

    @property
    def target(self) -> str:
        who = (f"devices {','.join(self.devices)}" if self.devices is not None
               else f"tag {self.tag}" if self.tag is not None else "all devices")
        return who if self.rollout >= 100 else f"{who}, rollout {self.rollout:g}%"


def rollout_bucket(package: str, device_id: str) -> float:
    """The device's fixed place in [0, 100) for rollouts of ``package``."""
    digest = hashlib.sha256(f"{package}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 10000 / 100


def check_name(what: str, value: str) -> str:
    if not _NAME_RE.match(value):
        raise OtaError(f"{what} {value!r}: use 1-16 letters, digits, '.', '_', '+' or '-' "
                       "(the SDK keeps at most 16 characters)")
    return value


# -- operators ---------------------------------------------------------------------------

def _artifact(row: Any) -> Artifact:
    return Artifact(row[0], row[1], row[2], row[3], row[4])


_ART_COLS = "id, package, version, size, sha256"


async def upload_artifact(store: Store, data: bytes, *, package: str, version: str) -> Artifact:
    """Store ``data`` as ``package@version`` (sha256 and size computed). Uploading the same
    bytes again is a no-op; other bytes under an existing version are refused."""
    check_name("package", package)
    check_name("version", version)
    if not data:
        raise OtaError("the artifact is empty")
    if len(data) > MAX_ARTIFACT:
        raise OtaError(f"the artifact is {len(data)} bytes; at most {MAX_ARTIFACT} are taken")
    sha = hashlib.sha256(data).hexdigest()
    await TABLES.ready(store)

    def op(conn: sqlite3.Connection) -> Artifact:
        old = conn.execute(f"SELECT {_ART_COLS} FROM ota_artifacts WHERE package = ? AND version = ?",
                           (package, version)).fetchone()
        if old is not None:
            if old[4] != sha:
                raise OtaError(f"{package}@{version} exists with other content (sha256 {old[4][:12]}...); "
                               "give the new build a new version")
            return _artifact(old)
        cur = conn.execute("INSERT INTO ota_artifacts(package, version, size, sha256, created_at)"
                           " VALUES (?,?,?,?,?)", (package, version, len(data), sha, time.time()))
        aid = int(cur.lastrowid or 0)
        conn.executemany("INSERT INTO ota_chunks(artifact_id, n, data) VALUES (?,?,?)",
                         ((aid, i // CHUNK, data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)))
        return Artifact(aid, package, version, len(data), sha)
    return await store.run(op)


async def artifacts(store: Store) -> list[Artifact]:
    await TABLES.ready(store)
    rows = await store.run(lambda c: c.execute(
        f"SELECT {_ART_COLS} FROM ota_artifacts ORDER BY package, id").fetchall())
    return [_artifact(r) for r in rows]


async def find_artifact(store: Store, package: str, version: str) -> Artifact | None:
    await TABLES.ready(store)
    row = await store.run(lambda c: c.execute(
        f"SELECT {_ART_COLS} FROM ota_artifacts WHERE package = ? AND version = ?",
        (package, version)).fetchone())
    return _artifact(row) if row else None


async def read_artifact(store: Store, artifact_id: int) -> bytes:
    await TABLES.ready(store)
    rows = await store.run(lambda c: c.execute(
        "SELECT data FROM ota_chunks WHERE artifact_id = ? ORDER BY n", (artifact_id,)).fetchall())
    return b"".join(r[0] for r in rows)


async def release(store: Store, package: str, version: str, *, devices: list[str] | None = None,
                  tag: str | None = None, rollout: float = 100.0) -> Release:
    """Make ``package@version`` the desired version for the devices named (default: all)."""
    if devices is not None and tag is not None:
        raise OtaError("target either a list of devices or a tag, not both")
    if not 0 < rollout <= 100:
        raise OtaError(f"rollout {rollout:g}: give a percentage above 0 and at most 100")
    if devices is not None and not devices:
        raise OtaError("the device list is empty")
    art = await find_artifact(store, package, version)
    if art is None:
        raise OtaError(f"no artifact {package}@{version}: upload it first with "
                       f"`pipeline ota upload FILE --package {package} --version {version}`")
    now = time.time()
    devices_json = json.dumps(sorted(set(devices))) if devices is not None else None
    rid = await store.run(lambda c: c.execute(
        "INSERT INTO ota_releases(artifact_id, devices, tag, rollout, created_at) VALUES (?,?,?,?,?)",
        (art.id, devices_json, tag, rollout, now)).lastrowid)
    return Release(int(rid or 0), art, tuple(sorted(set(devices))) if devices is not None else None,
                   tag, rollout, now)


async def releases(store: Store) -> list[Release]:
    await TABLES.ready(store)
    rows = await store.run(lambda c: c.execute(
        "SELECT r.id, r.devices, r.tag, r.rollout, r.created_at, a.id, a.package, a.version, a.size, a.sha256"
        " FROM ota_releases r JOIN ota_artifacts a ON a.id = r.artifact_id ORDER BY r.id").fetchall())
    return [Release(r[0], _artifact(r[5:]), tuple(json.loads(r[1])) if r[1] is not None else None,
                    r[2], r[3], r[4]) for r in rows]


def desired(all_releases: list[Release], device_id: str, tags: Iterable[str]) -> list[Release]:
    """Per package, the newest release that includes the device."""
    tags = tuple(tags)
    chosen: dict[str, Release] = {}
    for rel in all_releases:  # oldest first: newer ones replace older ones
        if rel.includes(device_id, tags):
            chosen[rel.artifact.package] = rel
    return [chosen[p] for p in sorted(chosen)]


def manifest(chosen: list[Release]) -> bytes:
    """The CBOR manifest the SDK decodes (see the module docstring)."""
    components = [{1: r.artifact.package, 2: r.artifact.version, 3: r.artifact.sha256,
                   4: r.artifact.size, 5: r.artifact.uri} for r in chosen]
    seq = max((r.id for r in chosen), default=0)
    digest = hashlib.sha256(cbor2.dumps(components)).hexdigest()
    return cbor2.dumps({1: seq, 2: digest, 3: components})


async def add_report(store: Store, project_id: str, device_id: str, package: str, state: int,
                     reason: int, version: str | None, target: str | None) -> None:
    await TABLES.ready(store)

    def op(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO ota_events(project_id, device_id, package, state, reason, version, target,"
                     " received_at) VALUES (?,?,?,?,?,?,?,?)",
                     (project_id, device_id, package, state, reason, version, target, time.time()))
        conn.execute("DELETE FROM ota_events WHERE device_id = ? AND package = ? AND seq <= (SELECT seq FROM"
                     " ota_events WHERE device_id = ? AND package = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                     (device_id, package, device_id, package, KEEP_REPORTS))
    await store.run(op)


def _event(r: Any) -> dict[str, Any]:
    state, reason = r[4], r[5]
    return {"project_id": r[1], "device_id": r[2], "package": r[3],
            "state": STATES[state] if 0 <= state < len(STATES) else str(state),
            "reason": REASONS[reason] if 0 <= reason < len(REASONS) else str(reason),
            "version": r[6], "target": r[7], "received_at": r[8]}


async def device_status(store: Store, device_id: str | None = None) -> list[dict[str, Any]]:
    """The last report of each device for each package."""
    await TABLES.ready(store)
    sql = ("SELECT e.seq, e.project_id, e.device_id, e.package, e.state, e.reason, e.version, e.target,"
           " e.received_at FROM ota_events e JOIN (SELECT MAX(seq) AS seq FROM ota_events"
           " GROUP BY project_id, device_id, package) last ON last.seq = e.seq")
    args: tuple[Any, ...] = ()
    if device_id is not None:
        sql += " WHERE e.device_id = ?"
        args = (device_id,)
    rows = await store.run(lambda c: c.execute(sql + " ORDER BY e.device_id, e.package", args).fetchall())
    return [_event(r) for r in rows]


async def events(store: Store, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """A device's reports, oldest first (the last ``limit``)."""
    await TABLES.ready(store)
    rows = await store.run(lambda c: c.execute(
        "SELECT seq, project_id, device_id, package, state, reason, version, target, received_at"
        " FROM ota_events WHERE device_id = ? ORDER BY seq DESC LIMIT ?", (device_id, limit)).fetchall())
    return [_event(r) for r in reversed(rows)]


# -- serving -----------------------------------------------------------------------------

class ArtifactCache:
    """Artifacts by (package, version), bytes in memory, least recently used dropped first."""

    def __init__(self, store: Store, max_bytes: int = CACHE_BYTES) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self._data: OrderedDict[int, bytes] = OrderedDict()
        self._held = 0
        self._loading: dict[int, asyncio.Future[bytes]] = {}
        self._meta: dict[tuple[str, str], Artifact] = {}

    async def artifact(self, package: str, version: str) -> Artifact | None:
        art = self._meta.get((package, version))
        if art is None:
            art = await find_artifact(self.store, package, version)
            if art is not None:  # artifacts never change: (package, version) is unique
                self._meta[(package, version)] = art
        return art

    async def data(self, art: Artifact) -> bytes:
        data = self._data.get(art.id)
        if data is not None:
            self._data.move_to_end(art.id)
            return data
        loading = self._loading.get(art.id)
        if loading is not None:  # many devices start at once: one read
            return await asyncio.shield(loading)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._loading[art.id] = fut
        try:
            data = await read_artifact(self.store, art.id)
            fut.set_result(data)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._loading[art.id]
        self._data[art.id] = data
        self._held += len(data)
        while self._held > self.max_bytes and len(self._data) > 1:
            _, old = self._data.popitem(last=False)
            self._held -= len(old)
        return data


class OtaResource(ServiceResource, resource.ObservableResource):
    """``/.u/desired``, ``/.u/c/<package>@<version>`` and ``/.u/c/<package>`` (module docstring)."""

    link = {"rt": "x.ota", "obs": None, "title": "firmware updates: /.u/desired, /.u/c/<package>"}

    def __init__(self, server: Server, store: Store) -> None:
        super().__init__(server, store)
        self.cache = ArtifactCache(store)
        self.poller = ChangePoller(store, "SELECT MAX(id) FROM ota_releases", POLL_INTERVAL, TABLES)
        self._releases: tuple[Any, list[Release]] | None = None

    async def current_releases(self) -> list[Release]:
        """All releases, read again only when the newest id changed."""
        await TABLES.ready(self.store)
        newest = await self.store.run(lambda c: c.execute("SELECT MAX(id) FROM ota_releases").fetchone()[0])
        if self._releases is None or self._releases[0] != newest:
            self._releases = (newest, await releases(self.store))
        return self._releases[1]

    async def manifest_for(self, device_id: str) -> bytes:
        entry = self.server.registry.find_device(device_id)
        tags = entry.tags if entry is not None else ()
        return manifest(desired(await self.current_releases(), device_id, tags))

    def _route(self, request: aiocoap.Message) -> tuple[str, str | None]:
        path = list(request.opt.uri_path)
        if path == ["desired"]:
            return "desired", None
        if len(path) == 2 and path[0] == "c" and path[1]:
            return "component", path[1]
        raise refuse(Code.NOT_FOUND, "OTA resources: /.u/desired, /.u/c/<package>[@<version>]")

    async def render_get(self, request):
        who = self.server.who(request)
        kind, name = self._route(request)
        if kind == "desired":
            if request.opt.accept not in (None, CF_CBOR):
                raise refuse(Code.NOT_ACCEPTABLE, "the manifest is served as CBOR (60)")
            if request.opt.observe is None and not request.opt.block2:
                self.server.check_rate(who)
            body = await self.manifest_for(who.device_id)
            return self._block(request, body, CF_CBOR, None)
        assert name is not None
        package, at, version = name.partition("@")
        if not at or not package or not version:
            raise refuse(Code.NOT_FOUND, f"download {name!r}: ask for /.u/c/<package>@<version>")
        b2 = request.opt.block2
        if b2 is None or b2.block_number == 0:
            self.server.check_rate(who)  # one per download, not one per block
        art = await self.cache.artifact(package, version)
        if art is None:
            raise refuse(Code.NOT_FOUND, f"no artifact {package}@{version}")
        data = await self.cache.data(art)
        return self._block(request, data, CF_OCTET_STREAM, bytes.fromhex(art.sha256)[:8])

    @staticmethod
    def _block(request: aiocoap.Message, body: bytes, cf: int, etag: bytes | None) -> aiocoap.Message:
        try:
            return block2_answer(request, body, content_format=cf, etag=etag)
        except PastEnd as exc:
            return error(Code.BAD_OPTION, str(exc))

    async def render_post(self, request):
        who = self.server.who(request)
        kind, package = self._route(request)
        if kind != "component" or package is None or "@" in package:
            raise refuse(Code.METHOD_NOT_ALLOWED, "report progress with POST /.u/c/<package>")
        self.server.check_rate(who)
        body = small_body(request, 1024, "an OTA report")
        report = decode_cbor_or_json(body, request.opt.content_format, "the OTA report")
        state, reason, version, target = _check_report(report, package)
        await add_report(self.store, who.project_id, who.device_id, package, state, reason, version, target)
        return aiocoap.Message(code=Code.CHANGED)

    async def add_observation(self, request, serverobservation):
        try:
            who = self.server.who(request)
            kind, _ = self._route(request)
        except Refusal:
            return
        if kind != "desired" or request.opt.accept not in (None, CF_CBOR):
            return
        await notify_changes(serverobservation, self.poller, lambda: self.manifest_for(who.device_id),
                             lambda body: aiocoap.Message(code=Code.CONTENT, payload=body, content_format=CF_CBOR))


def _check_report(report: Any, package: str) -> tuple[int, int, str | None, str | None]:
    if not isinstance(report, dict):
        raise refuse(Code.BAD_REQUEST, "an OTA report is a map {s, r, pkg, v?, t?}")
    state, reason = report.get("s"), report.get("r")
    if not isinstance(state, int) or isinstance(state, bool) or not 0 <= state < 256:
        raise refuse(Code.BAD_REQUEST, "OTA report: 's' (state) must be a small whole number")
    if not isinstance(reason, int) or isinstance(reason, bool) or not 0 <= reason < 256:
        raise refuse(Code.BAD_REQUEST, "OTA report: 'r' (reason) must be a small whole number")
    pkg = report.get("pkg", package)
    if pkg != package:
        raise refuse(Code.BAD_REQUEST, f"OTA report for package {pkg!r} posted to /.u/c/{package}")
    out: list[str | None] = []
    for key in ("v", "t"):
        value = report.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > 64):
            raise refuse(Code.BAD_REQUEST, f"OTA report: {key!r} must be a version string")
        out.append(value)
    return state, reason, out[0], out[1]


def add_resources(site: resource.Site, server: Server, store: Store) -> OtaResource:
    res = OtaResource(server, store)
    site.add_resource([".u"], res)
    return res
