"""The router's one durable store: a SQLite database in WAL mode.

Usage::

    store = Store("data/store.db")          # or Store(":memory:") for tests and benchmarks
    await store.open()
    await store.add_inbox(message)         # returns once the row is committed
    await store.add_inbox_many(messages)   # many, one operation: [added?, ...]
    rows = await store.fetch_inbox(after_seq=0, limit=100)
    await store.close()

Every write goes through one writer thread that commits whatever is waiting in one
transaction (group commit): many concurrent ``add_inbox`` calls cost one fsync-free WAL
commit, and each caller resumes only once its own write is committed. Each operation
runs in its own SAVEPOINT, so one failing write never takes its neighbours down.

Tables: ``inbox`` (accepted, not yet routed), ``deliveries`` (one queue per destination
step), ``payloads`` (the bytes of inbox and delivery rows, stored once and shared by
reference count: a frame that goes unchanged to two destinations is written once),
``dead_letters`` (each with its own copy of the exact bytes). A delivery row with ``rebuild``
set holds the routed message rather than the request its step sends (see
``pipelines.engine``): a frame is then written once, not once more as the request body, ``state`` (device documents),
``stream``, ``logs``, ``unmatched``, ``counters`` (the accounting books), ``predictions`` (correlation of a
prediction with the frame that caused it), ``webhooks_seen`` (idempotency).

Several processes may share the file (CoAP workers write the inbox; one engine routes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pipelines.file_perms import make_private
from pipelines.message import Message
from pipelines.state_doc import MAX_STATE_BYTES, StateTooLarge

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  project_id TEXT NOT NULL, device_id TEXT NOT NULL, path TEXT NOT NULL,
  content_type TEXT NOT NULL, timestamp REAL NOT NULL, received_at REAL NOT NULL,
  metadata TEXT NOT NULL, payload_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS payloads(
  id INTEGER PRIMARY KEY, refs INTEGER NOT NULL, data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  message_id TEXT NOT NULL, pipeline TEXT NOT NULL, step TEXT NOT NULL, step_index INTEGER NOT NULL,
  project_id TEXT NOT NULL, device_id TEXT NOT NULL, path TEXT NOT NULL,
  content_type TEXT NOT NULL, timestamp REAL NOT NULL, metadata TEXT NOT NULL, payload_id INTEGER NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL DEFAULT 0,
  first_attempt_at REAL, last_status INTEGER, last_error TEXT, created_at REAL NOT NULL,
  rebuild INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS deliveries_queue ON deliveries(pipeline, step, next_attempt_at);
CREATE TABLE IF NOT EXISTS dead_letters(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  message_id TEXT NOT NULL, pipeline TEXT NOT NULL, step TEXT NOT NULL, step_index INTEGER NOT NULL,
  stage TEXT NOT NULL,
  project_id TEXT NOT NULL, device_id TEXT NOT NULL, path TEXT NOT NULL,
  content_type TEXT NOT NULL, timestamp REAL NOT NULL, metadata TEXT NOT NULL, payload BLOB NOT NULL,
  attempts INTEGER NOT NULL, last_status INTEGER, response_excerpt TEXT, error TEXT NOT NULL,
  created_at REAL NOT NULL, replayed_at REAL
);
CREATE INDEX IF NOT EXISTS dead_letters_open ON dead_letters(replayed_at, id);
CREATE TABLE IF NOT EXISTS state(
  project_id TEXT NOT NULL, device_id TEXT NOT NULL, doc TEXT NOT NULL,
  version INTEGER NOT NULL, updated_at REAL NOT NULL,
  PRIMARY KEY(project_id, device_id)
);
CREATE TABLE IF NOT EXISTS stream(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  project_id TEXT NOT NULL, device_id TEXT NOT NULL, path TEXT NOT NULL, time REAL NOT NULL,
  data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS stream_device ON stream(project_id, device_id, time);
CREATE TABLE IF NOT EXISTS logs(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  project_id TEXT NOT NULL, device_id TEXT NOT NULL, time REAL NOT NULL, level TEXT NOT NULL,
  module TEXT NOT NULL, msg TEXT NOT NULL, metadata TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS unmatched(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  message_id TEXT NOT NULL, project_id TEXT NOT NULL, device_id TEXT NOT NULL,
  path TEXT NOT NULL, content_type TEXT NOT NULL, time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS predictions(
  prediction_id TEXT PRIMARY KEY, message_id TEXT NOT NULL, project_id TEXT NOT NULL,
  device_id TEXT NOT NULL, path TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS webhooks_seen(webhook_id TEXT PRIMARY KEY, seen_at REAL NOT NULL);
"""

# The books (spec §8). Counters only ever grow; ``inbox``, ``deliveries_queued`` and
# ``dead_letters_open`` are row counts read in the same transaction, so every snapshot from
# ``Store.counters()`` satisfies the identities in ``BOOKS`` (see ``books_gaps``).
COUNTERS = (
    "ingested", "duplicates", "unmatched", "routed", "runs_completed", "runs_dead",
    "deliveries_enqueued", "deliveries_delivered", "deliveries_dead", "deliveries_retried",
    "dead_letters", "dead_letters_replayed", "dead_letters_purged",
)

# name -> (left side, right side): sum(left) == sum(right) at every moment.
BOOKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # every accepted message is unmatched, routed, or still waiting in the inbox
    # (duplicates of a message still in the inbox are counted apart and never enter it)
    "ingest": (("ingested",), ("unmatched", "routed", "inbox")),
    # every delivery row ever enqueued (dead-letter replays included) was delivered,
    # was dead-lettered, or is still queued (in flight is a part of queued)
    "deliveries": (("deliveries_enqueued",),
                   ("deliveries_delivered", "deliveries_dead", "deliveries_queued")),
    # a dead letter comes from a failed transform run or from a delivery given up on
    "dead_letter_sources": (("dead_letters",), ("runs_dead", "deliveries_dead")),
    # and is still open, or was replayed, or was purged while open
    "dead_letters": (("dead_letters",),
                     ("dead_letters_open", "dead_letters_replayed", "dead_letters_purged")),
}


def read_books(conn: sqlite3.Connection, unwritten: dict[str, int] | None = None) -> dict[str, int]:
    """The counters and current sizes, as ``Store.counters`` reports them (``unwritten``: counter
    changes not yet in the table, added to it)."""
    out = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    for name, by in (unwritten or {}).items():
        out[name] = out.get(name, 0) + by
    out["inbox"] = conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
    out["deliveries_queued"] = conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
    out["payloads"] = conn.execute("SELECT COUNT(*) FROM payloads").fetchone()[0]
    out["dead_letters_open"] = conn.execute(
        "SELECT COUNT(*) FROM dead_letters WHERE replayed_at IS NULL").fetchone()[0]
    return out


def books_gaps(books: dict[str, int]) -> dict[str, int]:
    """Left side minus right side of each identity in ``BOOKS``: all zero when the books hold."""
    return {name: sum(books.get(k, 0) for k in left) - sum(books.get(k, 0) for k in right)
            for name, (left, right) in BOOKS.items()}


def to_epoch(dt: datetime) -> float:
    return dt.timestamp()


def from_epoch(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


@dataclass
class InboxRow:
    seq: int
    message: Message


@dataclass
class DeliveryRow:
    seq: int
    pipeline: str
    step: str
    step_index: int
    attempts: int
    first_attempt_at: float | None
    message: Message
    # message is the routed one: pipelines.engine.rebuild_message makes the step's request,
    # with the pipelines of configuration generation ``rebuild - 1`` (0: not to be rebuilt)
    rebuild: int = 0


@dataclass
class DeadLetter:
    id: int
    message_id: str
    pipeline: str
    step: str
    step_index: int
    stage: str
    attempts: int
    last_status: int | None
    response_excerpt: str | None
    error: str
    created_at: float
    replayed_at: float | None
    message: Message

    def summary(self) -> dict[str, Any]:
        m = self.message
        return {
            "id": self.id, "message_id": self.message_id, "pipeline": self.pipeline,
            "step": self.step, "step_index": self.step_index, "stage": self.stage,
            "device_id": m.device_id, "project_id": m.project_id, "path": m.path,
            "content_type": m.content_type, "size": len(m.payload), "attempts": self.attempts,
            "last_status": self.last_status, "error": self.error,
            "response_excerpt": self.response_excerpt,
            "created_at": from_epoch(self.created_at).isoformat(),
            "replayed_at": from_epoch(self.replayed_at).isoformat() if self.replayed_at else None,
            "metadata": m.metadata,
        }


def _message_from(row: sqlite3.Row | tuple, offset: int = 0, msg_id: str | None = None) -> Message:
    # columns: id, project_id, device_id, path, content_type, timestamp, metadata, payload
    r = row
    return Message(
        id=msg_id if msg_id is not None else r[offset],
        project_id=r[offset + 1], device_id=r[offset + 2], path=r[offset + 3],
        content_type=r[offset + 4], timestamp=from_epoch(r[offset + 5]),
        metadata=json.loads(r[offset + 6]), payload=bytes(r[offset + 7]),
    )


def _msg_values(m: Message) -> tuple:
    return (m.project_id, m.device_id, m.path, m.content_type, to_epoch(m.timestamp),
            json.dumps(m.metadata), m.payload)


def _meta_values(m: Message) -> tuple:
    return (m.project_id, m.device_id, m.path, m.content_type, to_epoch(m.timestamp),
            json.dumps(m.metadata))


def _new_payload(conn: sqlite3.Connection, data: bytes, refs: int) -> int:
    return conn.execute("INSERT INTO payloads(refs, data) VALUES (?, ?)", (refs, data)).lastrowid  # type: ignore[return-value]


def _release_payloads(conn: sqlite3.Connection, counts: dict[int, int]) -> None:
    """Drop ``counts[payload_id]`` references each; rows nobody refers to any more go."""
    if counts:
        conn.executemany("UPDATE payloads SET refs = refs - ? WHERE id = ?",
                         [(n, pid) for pid, n in counts.items()])
        ids = list(counts)
        conn.execute(f"DELETE FROM payloads WHERE id IN ({','.join('?' * len(ids))}) AND refs <= 0", ids)


def _existing(conn: sqlite3.Connection, sql: str, values: list[str]) -> set[str]:
    """Which of ``values`` the one-column query ``sql`` (with ``IN ({})``) finds."""
    found: set[str] = set()
    for i in range(0, len(values), 500):  # under SQLite's limit of bound variables
        chunk = values[i:i + 500]
        found.update(r[0] for r in conn.execute(sql.format(",".join("?" * len(chunk))), chunk))
    return found


class StoreClosed(RuntimeError):
    pass


class StoreError(RuntimeError):
    """The store file cannot be used (e.g. it was made by an incompatible version)."""


class Store:
    """See the module docstring. All public methods are coroutines safe to call from the loop."""

    def __init__(self, path: str | Path = ":memory:", *, synchronous: str = "NORMAL",
                 max_batch: int = 512, max_state_bytes: int = MAX_STATE_BYTES) -> None:
        self.path = str(path)
        self.max_state_bytes = max_state_bytes
        self.synchronous = synchronous
        self.max_batch = max_batch
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._closing = False
        self._wal_restart = False  # set by the checkpointer when the WAL grew too long
        self.commits = 0  # group commits done (for benchmarks)
        self.ops = 0  # operations in them
        self.busy_seconds = 0.0  # time the writer spent in transactions
        self.busy_cpu_seconds = 0.0  # CPU time it used in them

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        if self.path != ":memory:":
            # private: a new folder 0700, the file 0600 before SQLite opens it (its -wal and
            # -shm files take the database file's permissions)
            make_private(Path(self.path).parent, directory=True, create=True)
            make_private(Path(self.path))
        self._thread = threading.Thread(target=self._writer, name="store-writer", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait)
        if self._open_error:
            raise self._open_error

    async def close(self) -> None:
        if self._thread is None:
            return
        self._closing = True  # nothing may queue behind the stop marker: it would wait forever
        self._ops.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self._closing = False

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA foreign_keys=OFF")
        # Debian's SQLite is built with SECURE_DELETE: every delivered frame's pages would be
        # overwritten with zeros, a second write of its bytes (WAL, then checkpoint). FAST
        # still clears what is deleted inside b-tree pages; freed overflow pages (a payload's
        # bulk) keep their old bytes until reused, which under load is soon. Measured: ~30%
        # less store CPU per frame (bench/frames_to_webhook.py's workload, store alone)
        conn.execute("PRAGMA secure_delete=FAST")
        return conn

    def _checkpointer(self, stop: threading.Event) -> None:
        """Copy the WAL back into the database file beside the writer, not in its way: with
        SQLite's automatic checkpoints the writer itself would stop for the copy and its fsync."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            while not stop.wait(CHECKPOINT_EVERY):
                with contextlib.suppress(sqlite3.Error):  # busy now: the next round will do it
                    _, wal_frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    # a writer that never pauses keeps the WAL from starting over: ask it to
                    # restart the WAL itself between two batches (the copying is mostly done)
                    self._wal_restart = wal_frames > WAL_RESTART_FRAMES
        finally:
            conn.close()

    def _writer(self) -> None:
        try:
            conn = self._connect()
            old = {r[1] for r in conn.execute("PRAGMA table_info(inbox)")}
            if old and "payload_id" not in old:
                raise StoreError(f"{self.path} was written by an older version of the router (payloads "
                                 "were kept per row); move it aside and start with a new store")
            if old and "rebuild" not in {r[1] for r in conn.execute("PRAGMA table_info(deliveries)")}:
                conn.execute("ALTER TABLE deliveries ADD COLUMN rebuild INTEGER NOT NULL DEFAULT 0")
            conn.executescript(SCHEMA)
            conn.executemany("INSERT OR IGNORE INTO counters(name, value) VALUES (?, 0)",
                             [(c,) for c in COUNTERS])
        except BaseException as exc:  # reported to open()
            self._open_error = exc
            self._ready.set()
            return
        stop_checkpoints = threading.Event()
        checkpointer = None
        if self.path != ":memory:":
            conn.execute("PRAGMA wal_autocheckpoint=0")
            checkpointer = threading.Thread(target=self._checkpointer, args=(stop_checkpoints,),
                                            name="store-checkpoint", daemon=True)
            checkpointer.start()
        self._ready.set()
        wal_path = None if self.path == ":memory:" else f"{self.path}-wal"
        wal_limit = 2 * WAL_RESTART_FRAMES * 4096  # twice what the checkpointer asks for, in bytes
        stop = False
        while not stop:
            if self._wal_restart:
                self._wal_restart = False
                # wait briefly at most: a reader in another process must not stall the writer
                conn.execute("PRAGMA busy_timeout=100")
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                conn.execute("PRAGMA busy_timeout=30000")
            item = self._ops.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._ops.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            started, cpu = time.perf_counter(), time.thread_time()
            results = self._commit(conn, batch)
            self.busy_seconds += time.perf_counter() - started
            self.busy_cpu_seconds += time.thread_time() - cpu
            self.ops += len(batch)
            # The writer also watches the WAL itself (one stat per batch): a checkpointer thread
            # starved by a busy machine must not let it grow without bound.
            if wal_path is not None and not self._wal_restart:
                with contextlib.suppress(OSError):
                    self._wal_restart = os.stat(wal_path).st_size > wal_limit
            # one wake-up per event loop per batch, not one per operation
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, bool, Any]]] = {}
            for (_, loop, fut), (ok, res) in zip(batch, results, strict=True):
                by_loop.setdefault(loop, []).append((fut, ok, res))
            for loop, settled in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle_all, settled)
        if checkpointer is not None:
            stop_checkpoints.set()
            checkpointer.join()
        conn.close()  # the last connection to close checkpoints and removes the WAL itself

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple[Any, Any, Any]]) -> list[tuple[bool, Any]]:
        """Run a batch of operations in one transaction; (ok, result or exception) each.

        Fast path: the operations run back to back and the counter changes they make are
        summed and written once, just before COMMIT. If one raises, the transaction is
        rolled back and the batch runs again with a SAVEPOINT around each operation, so
        the failing one is undone alone and its neighbours still commit."""
        for careful in (False, True):
            results: list[tuple[bool, Any]] = []
            totals: dict[str, int] = {}
            _tls.batch = totals
            try:
                conn.execute("BEGIN IMMEDIATE")
                for fn, _, _ in batch:
                    _tls.op = deltas = {}
                    if not careful:
                        results.append((True, fn(conn)))
                    else:
                        conn.execute("SAVEPOINT op")
                        try:
                            results.append((True, fn(conn)))
                            conn.execute("RELEASE op")
                        except BaseException as exc:
                            conn.execute("ROLLBACK TO op")
                            conn.execute("RELEASE op")
                            results.append((False, exc))
                            continue
                    for name, by in deltas.items():
                        totals[name] = totals.get(name, 0) + by
                _tls.op = None
                if totals:
                    conn.executemany("UPDATE counters SET value = value + ? WHERE name = ?",
                                     [(by, name) for name, by in totals.items() if by])
                conn.execute("COMMIT")
                self.commits += 1
                return results
            except BaseException as exc:
                _tls.op = None
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if careful or len(results) == len(batch):  # the commit itself failed: all hear of it
                    return [(False, exc)] * len(batch)
            finally:
                _tls.batch = None
        raise AssertionError("unreachable")

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in the writer's next transaction and return its result: for
        modules that own tables of their own (``pipelines.device_services``)."""
        return await self._run(fn)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None or self._closing:
            raise StoreClosed("the store is not open")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._ops.put((fn, loop, fut))
        return await fut

    # -- counters -----------------------------------------------------------------------

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, by: int = 1) -> None:
        if not by:
            return
        deltas = getattr(_tls, "op", None)
        if deltas is None:  # outside a writer batch
            conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))
        else:  # written once per batch, in the same transaction (see _commit)
            deltas[name] = deltas.get(name, 0) + by

    async def counters(self) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            # with changes made earlier in this same transaction, not yet written to the table
            return read_books(conn, getattr(_tls, "batch", None))
        return await self._run(op)

    async def bump_counter(self, name: str, by: int = 1) -> None:
        """Add to a named counter, created at 0 the first time: ``/metrics`` shows every
        counter as ``pipeline_<name>``; it survives restarts and is shared by processes."""
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR IGNORE INTO counters(name, value) VALUES (?, 0)", (name,))
            Store._bump(conn, name, by)
        await self._run(op)

    # -- inbox --------------------------------------------------------------------------

    async def add_inbox(self, message: Message, dedup_key: str | None = None) -> bool:
        """Store an accepted message. False if a message with this id is already there, or
        if ``dedup_key`` (e.g. an inbound webhook's id) was seen before, even long routed."""
        now = time.time()
        values = (message.id, *_meta_values(message))

        def op(conn: sqlite3.Connection) -> bool:
            if dedup_key is not None and not conn.execute(
                    "INSERT OR IGNORE INTO webhooks_seen(webhook_id, seen_at) VALUES (?, ?)",
                    (dedup_key, now)).rowcount:
                Store._bump(conn, "duplicates")
                return False
            pid = _new_payload(conn, message.payload, 1)
            if not conn.execute(
                    "INSERT OR IGNORE INTO inbox(id, project_id, device_id, path, content_type, timestamp,"
                    " metadata, payload_id, received_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    (*values, pid, now)).rowcount:
                conn.execute("DELETE FROM payloads WHERE id = ?", (pid,))  # a duplicate (rare)
                Store._bump(conn, "duplicates")
                return False
            Store._bump(conn, "ingested")
            return True
        return await self._run(op)

    async def add_inbox_many(self, messages: Sequence[Message],
                             dedup_keys: Sequence[str | None] | None = None,
                             outcomes: Sequence[RoutingOutcome | None] | None = None) -> list[bool]:
        """``add_inbox`` for many messages in one store operation (one transaction, one
        thread hand-off): one answer per message, in order, each as ``add_inbox`` would have
        given it had the messages been added one after the other (a second message with
        the same id, or the same dedup key, in one batch is a duplicate). All are committed
        when it returns, or none (it raises).

        ``outcomes`` (routed at ingest, see ``Router.accept_many``): a message with an
        outcome is not put in the inbox but recorded as routed at once, as ``finish_message``
        would (its deliveries share its payload row): one transaction and one write of its
        bytes instead of an inbox row written, read back and deleted."""
        messages = list(messages)
        if not messages:
            return []
        keys = list(dedup_keys) if dedup_keys is not None else [None] * len(messages)
        if len(keys) != len(messages):
            raise ValueError(f"{len(keys)} dedup keys for {len(messages)} messages")
        routed = list(outcomes) if outcomes is not None else [None] * len(messages)
        if len(routed) != len(messages):
            raise ValueError(f"{len(routed)} outcomes for {len(messages)} messages")
        now = time.time()
        rows = [(m.id, *_meta_values(m)) for m in messages]

        def op(conn: sqlite3.Connection) -> list[bool]:
            seen_keys = _existing(conn, "SELECT webhook_id FROM webhooks_seen WHERE webhook_id IN ({})",
                                  [k for k in keys if k is not None])
            ids = _existing(conn, "SELECT id FROM inbox WHERE id IN ({})", [m.id for m in messages])
            answers: list[bool] = []
            new_keys: list[tuple[str, float]] = []
            taken: list[int] = []  # indexes of the messages that go in
            for i, (m, key) in enumerate(zip(messages, keys, strict=True)):
                if key is not None:
                    if key in seen_keys:
                        answers.append(False)
                        continue
                    seen_keys.add(key)  # kept even if the id turns out a duplicate (as add_inbox)
                    new_keys.append((key, now))
                if m.id in ids:
                    answers.append(False)
                    continue
                ids.add(m.id)
                taken.append(i)
                answers.append(True)
            if new_keys:
                conn.executemany("INSERT INTO webhooks_seen(webhook_id, seen_at) VALUES (?, ?)", new_keys)
            if taken:
                # we hold the write lock (BEGIN IMMEDIATE), so the ids after the largest are ours;
                # a message routed at ingest that nothing wanted needs no payload row
                first = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM payloads").fetchone()[0]
                kept = [i for i in taken if routed[i] is None or routed[i].matched]  # type: ignore[union-attr]
                pids = {i: first + n for n, i in enumerate(kept)}
                conn.executemany("INSERT INTO payloads(id, refs, data) VALUES (?, 1, ?)",
                                 [(pids[i], messages[i].payload) for i in kept])
                conn.executemany(
                    "INSERT INTO inbox(id, project_id, device_id, path, content_type, timestamp,"
                    " metadata, payload_id, received_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    [(*rows[i], pids[i], now) for i in kept if routed[i] is None])
                unmatched = []
                for i in taken:
                    outcome, m = routed[i], messages[i]
                    if outcome is None:
                        continue
                    if not outcome.matched:
                        unmatched.append((m.id, m.project_id, m.device_id, m.path, m.content_type, now))
                        continue
                    Store._bump(conn, "routed")
                    Store._insert_deliveries(conn, outcome.deliveries, now, (m.payload, pids[i]))
                    Store._insert_dead(conn, outcome.dead, now)
                    Store._bump(conn, "runs_completed", outcome.runs_completed)
                    Store._bump(conn, "runs_dead", outcome.runs_dead)
                if unmatched:
                    conn.executemany("INSERT INTO unmatched(message_id, project_id, device_id, path,"
                                     " content_type, time) VALUES (?,?,?,?,?,?)", unmatched)
                    Store._bump(conn, "unmatched", len(unmatched))
            Store._bump(conn, "ingested", len(taken))
            Store._bump(conn, "duplicates", len(messages) - len(taken))
            return answers
        return await self._run(op)

    async def fetch_inbox(self, after_seq: int, limit: int = 256) -> list[InboxRow]:
        def op(conn: sqlite3.Connection) -> list[InboxRow]:
            rows = conn.execute(
                "SELECT i.seq, i.id, i.project_id, i.device_id, i.path, i.content_type, i.timestamp,"
                " i.metadata, p.data FROM inbox i JOIN payloads p ON p.id = i.payload_id"
                " WHERE i.seq > ? ORDER BY i.seq LIMIT ?", (after_seq, limit)).fetchall()
            return [InboxRow(r[0], _message_from(r, 1)) for r in rows]
        return await self._run(op)

    async def inbox_size(self) -> int:
        return await self._run(lambda c: c.execute("SELECT COUNT(*) FROM inbox").fetchone()[0])

    async def finish_message(self, message: Message, outcome: RoutingOutcome) -> None:
        """Record the routing of one inbox message atomically: its deliveries, dead letters,
        run counts, and its removal from the inbox (or its unmatched record)."""
        now = time.time()
        await self._run(lambda conn: Store._finish(conn, message, outcome, now))

    async def finish_messages(self, routed: Sequence[tuple[Message, RoutingOutcome]]) -> None:
        """``finish_message`` for many messages in one store operation (one transaction):
        all are recorded when it returns, or none (it raises)."""
        routed = list(routed)
        if not routed:
            return
        now = time.time()

        # messages no pipeline wanted (often most of them) go with a few statements for all
        plain = [m for m, o in routed if not o.matched and o.from_inbox]
        rest = [(m, o) for m, o in routed if o.matched or not o.from_inbox]

        def op(conn: sqlite3.Connection) -> None:
            if plain:
                Store._finish_unmatched(conn, plain, now)
            for message, outcome in rest:
                Store._finish(conn, message, outcome, now)
        await self._run(op)

    @staticmethod
    def _finish_unmatched(conn: sqlite3.Connection, messages: list[Message], now: float) -> None:
        """``_finish`` of unmatched inbox messages, for many at once."""
        routed: dict[str, int] = {}  # message id -> payload id of the inbox rows removed now
        ids = [m.id for m in messages]
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            routed.update(conn.execute(f"DELETE FROM inbox WHERE id IN ({','.join('?' * len(chunk))})"
                                       " RETURNING id, payload_id", chunk).fetchall())
        counts: dict[int, int] = {}
        for pid in routed.values():
            counts[pid] = counts.get(pid, 0) + 1
        for i in range(0, len(counts), 500):
            _release_payloads(conn, dict(list(counts.items())[i:i + 500]))
        rows = []
        for m in messages:  # rows already routed by someone else are skipped, as in _finish
            if routed.pop(m.id, None) is not None:
                rows.append((m.id, m.project_id, m.device_id, m.path, m.content_type, now))
        conn.executemany("INSERT INTO unmatched(message_id, project_id, device_id, path, content_type,"
                         " time) VALUES (?,?,?,?,?,?)", rows)
        Store._bump(conn, "unmatched", len(rows))

    @staticmethod
    def _finish(conn: sqlite3.Connection, m: Message, outcome: RoutingOutcome, now: float) -> None:
        inbox_payload: tuple[bytes, int] | None = None
        if outcome.from_inbox:
            r = conn.execute("DELETE FROM inbox WHERE id = ? RETURNING payload_id", (m.id,)).fetchone()
            if r is None:
                return  # already routed by someone else (another engine after a restart)
            inbox_payload = (m.payload, r[0])
        if not outcome.matched:
            if inbox_payload:
                _release_payloads(conn, {inbox_payload[1]: 1})
            conn.execute(
                "INSERT INTO unmatched(message_id, project_id, device_id, path, content_type, time)"
                " VALUES (?,?,?,?,?,?)",
                (m.id, m.project_id, m.device_id, m.path, m.content_type, now))
            Store._bump(conn, "unmatched")
            return
        Store._bump(conn, "routed", 1 if outcome.from_inbox else 0)
        Store._insert_deliveries(conn, outcome.deliveries, now, inbox_payload)
        Store._insert_dead(conn, outcome.dead, now)
        Store._bump(conn, "runs_completed", outcome.runs_completed)
        Store._bump(conn, "runs_dead", outcome.runs_dead)

    @staticmethod
    def _insert_deliveries(conn: sqlite3.Connection, items: Iterable[PendingDelivery], now: float,
                           inbox_payload: tuple[bytes, int] | None = None) -> list[int]:
        """Insert delivery rows; returns their seqs. Deliveries carrying the same bytes share
        one ``payloads`` row; ``inbox_payload`` (bytes, payload id) is the routed inbox row's,
        whose reference passes to the deliveries that still carry those bytes."""
        items = list(items)
        groups: dict[int, list[int]] = {}  # id(bytes) -> indexes of items carrying them
        blobs: dict[int, bytes] = {}
        stored = [d.source if d.source is not None else d.message for d in items]
        for i, m in enumerate(stored):
            data = m.payload
            groups.setdefault(id(data), []).append(i)
            blobs[id(data)] = data
        pids: list[int] = [0] * len(items)
        inbox_refs = 0
        for key, idx in groups.items():
            data = blobs[key]
            if inbox_payload is not None and (data is inbox_payload[0] or data == inbox_payload[0]):
                pid = inbox_payload[1]
                inbox_refs += len(idx)
            else:
                pid = _new_payload(conn, data, len(idx))
            for i in idx:
                pids[i] = pid
        if inbox_payload is not None:
            if inbox_refs > 1:  # the inbox row's reference goes to the first delivery sharing it
                conn.execute("UPDATE payloads SET refs = refs + ? WHERE id = ?",
                             (inbox_refs - 1, inbox_payload[1]))
            elif not inbox_refs:
                _release_payloads(conn, {inbox_payload[1]: 1})
        seqs = []
        for d, m, pid in zip(items, stored, pids, strict=True):
            d.seq = conn.execute(
                "INSERT INTO deliveries(message_id, pipeline, step, step_index, project_id, device_id,"
                " path, content_type, timestamp, metadata, payload_id, created_at, rebuild)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (m.id, d.pipeline, d.step, d.step_index, *_meta_values(m), pid, now, int(d.rebuild))
            ).lastrowid
            seqs.append(d.seq)
        Store._bump(conn, "deliveries_enqueued", len(items))
        return seqs  # type: ignore[return-value]

    @staticmethod
    def _insert_dead(conn: sqlite3.Connection, items: Iterable[PendingDeadLetter], now: float) -> None:
        for d in items:
            conn.execute(
                "INSERT INTO dead_letters(message_id, pipeline, step, step_index, stage, project_id,"
                " device_id, path, content_type, timestamp, metadata, payload, attempts, last_status,"
                " response_excerpt, error, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (d.message.id, d.pipeline, d.step, d.step_index, d.stage, *_msg_values(d.message),
                 d.attempts, d.last_status, d.response_excerpt, d.error, now))
            Store._bump(conn, "dead_letters")

    # -- deliveries ---------------------------------------------------------------------

    async def due_deliveries(self, pipeline: str, step: str, now: float, limit: int,
                             exclude: set[int]) -> list[DeliveryRow]:
        """Up to ``limit`` rows of one queue that are due, oldest first, skipping ``exclude``
        (rows the caller already holds). Payloads are read only for the rows returned."""
        def op(conn: sqlite3.Connection) -> list[DeliveryRow]:
            # the index (pipeline, step, next_attempt_at) covers seq: no payload is touched here
            seqs = [r[0] for r in conn.execute(
                "SELECT seq FROM deliveries WHERE pipeline = ? AND step = ? AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, seq LIMIT ?", (pipeline, step, now, limit + len(exclude)))
                if r[0] not in exclude][:limit]
            if not seqs:
                return []
            rows = conn.execute(
                "SELECT d.seq, d.pipeline, d.step, d.step_index, d.attempts, d.first_attempt_at,"
                " d.message_id, d.project_id, d.device_id, d.path, d.content_type, d.timestamp,"
                " d.metadata, p.data, d.rebuild FROM deliveries d JOIN payloads p ON p.id = d.payload_id"
                f" WHERE d.seq IN ({','.join('?' * len(seqs))})", seqs).fetchall()
            by_seq = {r[0]: r for r in rows}
            return [DeliveryRow(r[0], r[1], r[2], r[3], r[4], r[5], _message_from(r, 6), r[14])
                    for r in (by_seq[s] for s in seqs if s in by_seq)]
        return await self._run(op)

    async def next_due_time(self, pipeline: str, step: str, exclude: set[int]) -> float | None:
        def op(conn: sqlite3.Connection) -> float | None:
            rows = conn.execute(
                "SELECT seq, next_attempt_at FROM deliveries WHERE pipeline = ? AND step = ?"
                " ORDER BY next_attempt_at LIMIT ?", (pipeline, step, len(exclude) + 1)).fetchall()
            for seq, t in rows:
                if seq not in exclude:
                    return t
            return None
        return await self._run(op)

    async def queue_depths(self) -> dict[tuple[str, str], int]:
        def op(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
            rows = conn.execute("SELECT pipeline, step, COUNT(*) FROM deliveries GROUP BY pipeline, step")
            return {(p, s): n for p, s, n in rows}
        return await self._run(op)

    async def delivery_done(self, seq: int) -> None:
        await self.deliveries_done([seq])

    @staticmethod
    def _remove_deliveries(conn: sqlite3.Connection, seqs: list[int]) -> int:
        """Delete delivery rows and release their payloads; returns how many were there."""
        n = 0
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            marks = ",".join("?" * len(chunk))
            counts: dict[int, int] = {}
            for (pid,) in conn.execute(f"DELETE FROM deliveries WHERE seq IN ({marks}) RETURNING payload_id",
                                       chunk).fetchall():
                counts[pid] = counts.get(pid, 0) + 1
                n += 1
            _release_payloads(conn, counts)
        return n

    async def deliveries_done(self, seqs: list[int]) -> int:
        """Several deliveries succeeded: one write for all of them. Returns rows removed."""
        def op(conn: sqlite3.Connection) -> int:
            n = Store._remove_deliveries(conn, seqs)
            Store._bump(conn, "deliveries_delivered", n)
            return n
        return await self._run(op)

    async def delivery_retry(self, seq: int, *, attempts: int, next_attempt_at: float,
                             first_attempt_at: float, status: int | None, error: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE deliveries SET attempts = ?, next_attempt_at = ?, first_attempt_at = ?,"
                " last_status = ?, last_error = ? WHERE seq = ?",
                (attempts, next_attempt_at, first_attempt_at, status, error, seq))
            Store._bump(conn, "deliveries_retried")
        await self._run(op)

    async def delivery_dead(self, row: DeliveryRow, *, attempts: int, status: int | None,
                            error: str, response_excerpt: str | None) -> None:
        now = time.time()
        dl = PendingDeadLetter(row.message, row.pipeline, row.step, row.step_index, "delivery",
                               error, attempts, status, response_excerpt)

        def op(conn: sqlite3.Connection) -> None:
            if Store._remove_deliveries(conn, [row.seq]):
                Store._insert_dead(conn, [dl], now)
                Store._bump(conn, "deliveries_dead")
        await self._run(op)

    # -- dead letters -------------------------------------------------------------------

    async def dead_letters(self, *, pipeline: str | None = None, step: str | None = None,
                           device_id: str | None = None, since: float | None = None,
                           until: float | None = None, ids: list[int] | None = None,
                           include_replayed: bool = False, limit: int = 1000) -> list[DeadLetter]:
        where, args = [], []
        for col, val in (("pipeline", pipeline), ("step", step), ("device_id", device_id)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if since is not None:
            where.append("created_at >= ?")
            args.append(since)
        if until is not None:
            where.append("created_at <= ?")
            args.append(until)
        if ids:
            where.append(f"id IN ({','.join('?' * len(ids))})")
            args.extend(ids)
        if not include_replayed:
            where.append("replayed_at IS NULL")
        sql = ("SELECT id, message_id, pipeline, step, step_index, stage, attempts, last_status,"
               " response_excerpt, error, created_at, replayed_at,"
               " message_id, project_id, device_id, path, content_type, timestamp, metadata, payload"
               " FROM dead_letters" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY id LIMIT ?")

        def op(conn: sqlite3.Connection) -> list[DeadLetter]:
            return [DeadLetter(*r[:12], message=_message_from(r, 12))
                    for r in conn.execute(sql, (*args, limit)).fetchall()]
        return await self._run(op)

    async def requeue_dead_letter(self, dl: DeadLetter) -> bool:
        """Replay a delivery dead letter: back into its destination queue, same message id."""
        now = time.time()
        pd = PendingDelivery(dl.message, dl.pipeline, dl.step, dl.step_index)

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("UPDATE dead_letters SET replayed_at = ? WHERE id = ? AND replayed_at IS NULL",
                               (now, dl.id))
            if not cur.rowcount:
                return False
            Store._insert_deliveries(conn, [pd], now)
            Store._bump(conn, "dead_letters_replayed")
            return True
        return await self._run(op)

    async def finish_replay(self, dead_letter_id: int, message: Message, outcome: RoutingOutcome) -> bool:
        """Record a transform dead letter's replay (its new deliveries or new dead letter)
        and mark it replayed, in one transaction. False if it was already replayed."""
        now = time.time()

        def op(conn: sqlite3.Connection) -> bool:
            if not conn.execute("UPDATE dead_letters SET replayed_at = ? WHERE id = ?"
                                " AND replayed_at IS NULL", (now, dead_letter_id)).rowcount:
                return False
            Store._bump(conn, "dead_letters_replayed")
            Store._insert_deliveries(conn, outcome.deliveries, now)
            Store._insert_dead(conn, outcome.dead, now)
            Store._bump(conn, "runs_completed", outcome.runs_completed)
            Store._bump(conn, "runs_dead", outcome.runs_dead)
            return True
        return await self._run(op)

    async def mark_replayed(self, dead_letter_id: int) -> bool:
        now = time.time()

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("UPDATE dead_letters SET replayed_at = ? WHERE id = ? AND replayed_at IS NULL",
                               (now, dead_letter_id))
            if cur.rowcount:
                Store._bump(conn, "dead_letters_replayed")
            return bool(cur.rowcount)
        return await self._run(op)

    async def purge_dead_letters(self, ids: list[int]) -> int:
        def op(conn: sqlite3.Connection) -> int:
            n = 0
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                # only letters still open leave the books as purged; replayed ones already left
                Store._bump(conn, "dead_letters_purged", conn.execute(
                    f"SELECT COUNT(*) FROM dead_letters WHERE id IN ({marks}) AND replayed_at IS NULL",
                    chunk).fetchone()[0])
                n += conn.execute(f"DELETE FROM dead_letters WHERE id IN ({marks})", chunk).rowcount
            return n
        return await self._run(op)

    async def open_dead_letter_counts(self) -> dict[tuple[str, str], int]:
        """(pipeline, step) -> dead letters not yet replayed (the console's per-step column)."""
        def op(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
            return {(p, s): n for p, s, n in conn.execute(
                "SELECT pipeline, step, COUNT(*) FROM dead_letters WHERE replayed_at IS NULL"
                " GROUP BY pipeline, step")}
        return await self._run(op)

    # -- device state -------------------------------------------------------------------

    async def get_state(self, project_id: str, device_id: str) -> tuple[Any, int]:
        """(document, version); ({}, 0) when the device has none."""
        def op(conn: sqlite3.Connection) -> tuple[Any, int]:
            r = conn.execute("SELECT doc, version FROM state WHERE project_id = ? AND device_id = ?",
                             (project_id, device_id)).fetchone()
            return (json.loads(r[0]), r[1]) if r else ({}, 0)
        return await self._run(op)

    async def update_state(self, project_id: str, device_id: str,
                           change: Callable[[Any], Any]) -> tuple[Any, int]:
        """Read-modify-write the document atomically; ``change(doc) -> new doc``."""
        now = time.time()

        def op(conn: sqlite3.Connection) -> tuple[Any, int]:
            r = conn.execute("SELECT doc, version FROM state WHERE project_id = ? AND device_id = ?",
                             (project_id, device_id)).fetchone()
            doc, version = (json.loads(r[0]), r[1]) if r else ({}, 0)
            new = change(doc)
            text = json.dumps(new)
            if len(text) > self.max_state_bytes:
                raise StateTooLarge(len(text), self.max_state_bytes)
            conn.execute(
                "INSERT INTO state(project_id, device_id, doc, version, updated_at) VALUES (?,?,?,?,?)"
                " ON CONFLICT(project_id, device_id) DO UPDATE SET doc = excluded.doc,"
                " version = excluded.version, updated_at = excluded.updated_at",
                (project_id, device_id, text, version + 1, now))
            return new, version + 1
        return await self._run(op)

    async def state_versions(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        def op(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
            out = {}
            for p, d in keys:
                r = conn.execute("SELECT version FROM state WHERE project_id = ? AND device_id = ?",
                                 (p, d)).fetchone()
                out[(p, d)] = r[0] if r else 0
            return out
        return await self._run(op)

    # -- stream, logs, unmatched ----------------------------------------------------------

    async def append_stream(self, project_id: str, device_id: str, path: str, time: float,
                            data: Any) -> None:
        text = json.dumps(data)
        await self._run(lambda c: c.execute(
            "INSERT INTO stream(project_id, device_id, path, time, data) VALUES (?,?,?,?,?)",
            (project_id, device_id, path, time, text)) and None)

    async def query_stream(self, *, project_id: str | None = None, device_id: str | None = None,
                           path: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        where, args = [], []
        for col, val in (("project_id", project_id), ("device_id", device_id), ("path", path)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = ("SELECT project_id, device_id, path, time, data FROM stream"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC LIMIT ?")

        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            return [{"time": from_epoch(t).isoformat(), "project_id": p, "device": d, "path": pa,
                     "data": json.loads(data)}
                    for p, d, pa, t, data in conn.execute(sql, (*args, limit)).fetchall()]
        return await self._run(op)

    async def append_log(self, project_id: str, device_id: str, time: float, level: str,
                         module: str, msg: str, metadata: dict[str, Any]) -> None:
        meta = json.dumps(metadata)
        await self._run(lambda c: c.execute(
            "INSERT INTO logs(project_id, device_id, time, level, module, msg, metadata)"
            " VALUES (?,?,?,?,?,?,?)", (project_id, device_id, time, level, module, msg, meta)) and None)

    async def query_logs(self, limit: int = 100) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute("SELECT project_id, device_id, time, level, module, msg, metadata FROM logs"
                                " ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            return [{"project_id": p, "device": d, "time": from_epoch(t).isoformat(), "level": lv,
                     "module": mo, "msg": ms, "metadata": json.loads(md)}
                    for p, d, t, lv, mo, ms, md in rows]
        return await self._run(op)

    async def unmatched(self, limit: int = 100) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute("SELECT message_id, device_id, path, content_type, time FROM unmatched"
                                " ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            return [{"message_id": i, "device": d, "path": p, "content_type": ct,
                     "time": from_epoch(t).isoformat()} for i, d, p, ct, t in rows]
        return await self._run(op)

    # -- predictions correlation and webhook idempotency ------------------------------------

    async def remember_prediction(self, prediction_id: str, message: Message) -> None:
        now = time.time()
        await self._run(lambda c: c.execute(
            "INSERT OR REPLACE INTO predictions(prediction_id, message_id, project_id, device_id, path,"
            " created_at) VALUES (?,?,?,?,?,?)",
            (prediction_id, message.id, message.project_id, message.device_id, message.path, now)) and None)

    async def lookup_prediction(self, prediction_id: str) -> dict[str, Any] | None:
        def op(conn: sqlite3.Connection) -> dict[str, Any] | None:
            r = conn.execute("SELECT message_id, project_id, device_id, path, created_at FROM predictions"
                             " WHERE prediction_id = ?", (prediction_id,)).fetchone()
            if not r:
                return None
            return {"message_id": r[0], "project_id": r[1], "device_id": r[2], "path": r[3],
                    "created_at": r[4]}
        return await self._run(op)

    async def prune_correlations(self, older_than: float) -> int:
        """Forget prediction correlations and idempotency keys recorded before ``older_than``
        (Unix time): both are only needed while a prediction or a retry can still arrive.
        Returns how many rows went."""
        def op(conn: sqlite3.Connection) -> int:
            n = conn.execute("DELETE FROM predictions WHERE created_at < ?", (older_than,)).rowcount
            return n + conn.execute("DELETE FROM webhooks_seen WHERE seen_at < ?", (older_than,)).rowcount
        return await self._run(op)

    async def prune_records(self, keep: dict[str, int | None]) -> dict[str, int]:
        """Keep only the newest rows of the record tables: ``keep`` maps ``stream``, ``logs``
        or ``unmatched`` to how many rows to keep (None: all). By arrival order, not by the
        device's timestamps, which may be old (backfill). Returns how many rows went, per table."""
        bad = set(keep) - set(RECORD_TABLES)
        if bad:
            raise ValueError(f"not a record table: {', '.join(sorted(bad))}")

        def op(conn: sqlite3.Connection) -> dict[str, int]:
            gone: dict[str, int] = {}
            for table, rows in keep.items():
                if rows is None:
                    continue
                # seq is the table's INTEGER PRIMARY KEY: this is a range delete on the rowid
                gone[table] = conn.execute(
                    f"DELETE FROM {table} WHERE seq <= (SELECT MAX(seq) FROM {table}) - ?",
                    (max(0, rows),)).rowcount
            return gone
        return await self._run(op)


RECORD_TABLES = ("stream", "logs", "unmatched")


def _settle_all(settled: list[tuple[asyncio.Future, bool, Any]]) -> None:
    for fut, ok, res in settled:
        if fut.done():  # the caller was cancelled
            continue
        if ok:
            fut.set_result(res)
        else:
            fut.set_exception(res)


CHECKPOINT_EVERY = 0.05  # seconds between WAL checkpoints (file stores)
WAL_RESTART_FRAMES = 4096  # pages in the WAL (16 MB of 4 KB pages) before it is made to start over

# the writer thread's bookkeeping of counter changes (see Store._commit)
_tls = threading.local()


@dataclass
class PendingDelivery:
    message: Message
    pipeline: str
    step: str
    step_index: int
    # the routed message the request was made from by deterministic steps only: the store
    # keeps it (the frame, shared with the inbox row) instead of the request, and the delivery
    # worker makes the request again (pipelines.engine.rebuild_message)
    source: Message | None = None
    seq: int | None = None  # the row's seq, set when it is inserted (hand it to its queue at once)
    generation: int = 0  # the configuration (Router.generation) that routed it: rebuilt by the same

    @property
    def rebuild(self) -> int:
        """What the ``rebuild`` column holds: 0, or the routing generation + 1."""
        return self.generation + 1 if self.source is not None else 0


@dataclass
class PendingDeadLetter:
    message: Message
    pipeline: str
    step: str
    step_index: int
    stage: str  # "transform" | "delivery"
    error: str
    attempts: int = 1
    last_status: int | None = None
    response_excerpt: str | None = None


@dataclass
class RoutingOutcome:
    matched: bool
    deliveries: list[PendingDelivery]
    dead: list[PendingDeadLetter]
    runs_completed: int = 0
    runs_dead: int = 0
    from_inbox: bool = True
