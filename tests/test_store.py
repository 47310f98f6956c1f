"""The SQLite store: group commit, atomic routing records, queues, dead letters, the books,
and durability of a committed write across a SIGKILL of the writing process."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.message import Message
from pipelines.store import (
    PendingDeadLetter,
    PendingDelivery,
    RoutingOutcome,
    Store,
    books_gaps,
)

ROOT = Path(__file__).resolve().parents[1]


def msg(i: int = 0, **kw: object) -> Message:
    return Message.new(device_id=str(kw.pop("device_id", f"dev-{i}")), path="/p",
                       content_type="application/octet-stream", payload=bytes([i % 256]) * 100, **kw)


def balanced(books: dict[str, int]) -> bool:
    return not any(books_gaps(books).values())


async def test_concurrent_writes_share_commits_and_each_is_acknowledged(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        before = store.commits
        results = await asyncio.gather(*(store.add_inbox(msg(i)) for i in range(300)))
        assert all(results)
        assert store.commits - before < 100  # group commit: far fewer transactions than writes
        assert await store.inbox_size() == 300
        books = await store.counters()
        assert books["ingested"] == 300 and balanced(books)


async def test_a_failing_write_does_not_take_its_batch_down(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        def bad(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO no_such_table VALUES (1)")
        results = await asyncio.gather(*(store.add_inbox(msg(i)) for i in range(20)),
                                       store._run(bad), *(store.add_inbox(msg(i)) for i in range(20, 40)),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], sqlite3.OperationalError)
        assert await store.inbox_size() == 40


async def test_duplicate_ids_are_counted_not_ingested(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        m = msg(1)
        assert await store.add_inbox(m) is True
        assert await store.add_inbox(m) is False
        books = await store.counters()
        assert (books["ingested"], books["duplicates"], books["inbox"]) == (1, 1, 1) and balanced(books)


async def test_routing_is_recorded_atomically_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    m, lost = msg(1), msg(2)
    async with Store(path) as store:
        await store.add_inbox(m)
        await store.add_inbox(lost)
        out = m.evolve(content_type="text/plain")
        outcome = RoutingOutcome(True, [PendingDelivery(m, "a", "hook", 0),
                                        PendingDelivery(out, "b", "hook", 1)],
                                 [PendingDeadLetter(m, "c", "t", 0, "transform", "bad input")],
                                 runs_completed=2, runs_dead=1)
        await store.finish_message(m, outcome)
        await store.finish_message(m, outcome)  # a second engine finishing it again: no effect
        await store.finish_message(lost, RoutingOutcome(False, [], []))
    async with Store(path) as store:
        books = await store.counters()
        assert books["inbox"] == 0 and books["routed"] == 1 and books["unmatched"] == 1
        assert books["deliveries_enqueued"] == 2 and books["deliveries_queued"] == 2
        assert books["runs_completed"] == 2 and books["runs_dead"] == 1 and books["dead_letters"] == 1
        assert balanced(books)
        assert [u["message_id"] for u in await store.unmatched()] == [lost.id]
        rows = await store.due_deliveries("b", "hook", time.time(), 10, set())
        assert rows[0].message.content_type == "text/plain" and rows[0].message.id == m.id
        assert rows[0].message.payload == m.payload


async def test_queues_order_exclude_retry_and_batch_done(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        ms = [msg(i) for i in range(5)]
        for m in ms:
            await store.add_inbox(m)
            await store.finish_message(m, RoutingOutcome(True, [PendingDelivery(m, "p", "s", 0)], [], 1))
        await store.finish_message(ms[0], RoutingOutcome(True, [PendingDelivery(ms[0], "p", "other", 1)], [],
                                                         from_inbox=False))
        now = time.time()
        rows = await store.due_deliveries("p", "s", now, 3, set())
        assert [r.message.id for r in rows] == [m.id for m in ms[:3]]
        await store.delivery_retry(rows[0].seq, attempts=1, next_attempt_at=now + 60,
                                   first_attempt_at=now, status=503, error="HTTP 503")
        rows2 = await store.due_deliveries("p", "s", now, 10, {rows[1].seq})
        assert [r.message.id for r in rows2] == [m.id for m in ms[2:]]  # retried one not due yet
        later = await store.due_deliveries("p", "s", now + 61, 10, set())
        assert later[-1].seq == rows[0].seq and later[-1].attempts == 1
        assert await store.next_due_time("p", "s", {r.seq for r in later[:-1]}) == pytest.approx(now + 60)
        assert await store.deliveries_done([r.seq for r in later] + [10_000]) == 5
        assert await store.deliveries_done([later[0].seq]) == 0  # done twice counts once
        books = await store.counters()
        assert books["deliveries_delivered"] == 5 and books["deliveries_retried"] == 1
        assert await store.queue_depths() == {("p", "other"): 1}
        assert balanced(books)


async def test_payloads_are_written_once_and_released_with_their_last_row(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        m = msg(7)
        await store.add_inbox(m)
        [row] = await store.fetch_inbox(0)
        routed = row.message
        relabelled = routed.evolve(content_type="text/plain")  # same bytes, other label
        changed = routed.evolve(payload=b"other bytes")
        await store.finish_message(routed, RoutingOutcome(True, [
            PendingDelivery(routed, "p", "a", 0), PendingDelivery(relabelled, "p", "b", 1),
            PendingDelivery(changed, "p", "c", 2), PendingDelivery(changed, "q", "d", 0)], [], 2))
        books = await store.counters()
        assert books["payloads"] == 2 and books["deliveries_queued"] == 4  # frame once, new bytes once
        got = {}
        for step in "abcd":
            [r] = await store.due_deliveries("q" if step == "d" else "p", step, time.time(), 5, set())
            got[step] = r
        assert got["a"].message.payload == got["b"].message.payload == m.payload
        assert got["b"].message.content_type == "text/plain"
        assert got["c"].message.payload == got["d"].message.payload == b"other bytes"
        await store.deliveries_done([got["a"].seq, got["c"].seq])
        assert (await store.counters())["payloads"] == 2  # each still has one holder
        await store.delivery_dead(got["b"], attempts=1, status=400, error="permanent", response_excerpt=None)
        await store.deliveries_done([got["d"].seq])
        books = await store.counters()
        assert books["payloads"] == 0 and balanced(books)
        [letter] = await store.dead_letters()
        assert letter.message.payload == m.payload  # the dead letter kept its own copy
        await store.add_inbox(msg(8))
        [row] = await store.fetch_inbox(0)
        await store.finish_message(row.message, RoutingOutcome(False, [], []))
        assert (await store.counters())["payloads"] == 0  # unmatched: the bytes go too


async def test_a_store_from_the_old_layout_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE inbox(seq INTEGER PRIMARY KEY, id TEXT, payload BLOB)")
    with pytest.raises(RuntimeError, match="older version"):
        await Store(path).open()


async def test_dead_letters_filter_requeue_and_purge_keep_the_books(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        ms = [msg(i, device_id=dev) for i, dev in enumerate(["a", "b", "a"])]
        for i, m in enumerate(ms):
            await store.add_inbox(m)
            await store.finish_message(m, RoutingOutcome(True, [PendingDelivery(m, "p", f"s{i % 2}", i % 2)],
                                                         [], 1))
        t0 = time.time()
        for row in await store.due_deliveries("p", "s0", t0, 10, set()) + \
                await store.due_deliveries("p", "s1", t0, 10, set()):
            await store.delivery_dead(row, attempts=3, status=500, error="retries exhausted: HTTP 500",
                                      response_excerpt="oops")
        assert len(await store.dead_letters()) == 3
        assert {d.message.device_id for d in await store.dead_letters(device_id="a")} == {"a"}
        assert len(await store.dead_letters(step="s0")) == 2
        assert len(await store.dead_letters(since=t0 - 5, until=time.time() + 5)) == 3
        assert await store.dead_letters(until=t0 - 5) == []
        first, second, third = await store.dead_letters()
        assert first.attempts == 3 and first.last_status == 500 and first.response_excerpt == "oops"
        assert await store.requeue_dead_letter(first) is True
        assert await store.requeue_dead_letter(first) is False
        assert await store.purge_dead_letters([first.id, second.id]) == 2
        books = await store.counters()
        assert books["dead_letters"] == 3 and books["dead_letters_replayed"] == 1
        assert books["dead_letters_purged"] == 1 and books["dead_letters_open"] == 1
        assert books["deliveries_enqueued"] == 4 and books["deliveries_queued"] == 1
        assert balanced(books), books_gaps(books)
        assert [d.id for d in await store.dead_letters(include_replayed=True)] == [third.id]


CHILD = r"""
import asyncio, os, signal, sys
sys.path.insert(0, sys.argv[2])
from pipelines.message import Message
from pipelines.store import Store
async def main():
    store = Store(sys.argv[1])
    await store.open()
    await store.add_inbox(Message.new(id="acked-1", device_id="d", path="/p",
                                      content_type="text/plain", payload=b"kept"))
    print("acked", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(main())
"""


async def test_an_acknowledged_write_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", CHILD, str(path), str(ROOT)],
                                   capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9 and proc.stdout == "acked\n", proc.stderr
    async with Store(path) as store:
        rows = await store.fetch_inbox(0)
        assert [(r.message.id, r.message.payload) for r in rows] == [("acked-1", b"kept")]
        assert balanced(await store.counters())


async def test_the_wal_stays_bounded_under_a_writer_that_never_pauses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.store as store_module
    monkeypatch.setattr(store_module, "WAL_RESTART_FRAMES", 256)  # 1 MB of 4 KB pages
    monkeypatch.setattr(store_module, "CHECKPOINT_EVERY", 0.01)
    path = tmp_path / "s.db"
    wal = Path(str(path) + "-wal")
    peak = 0
    blob = bytes(range(256)) * 400  # 100 KB

    async def producer(store: Store, n: int) -> None:
        nonlocal peak
        for _ in range(n):  # back to back: the writer always has the next batch waiting
            m = Message.new(device_id="d", path="/p", content_type="x", payload=blob)
            await store.add_inbox(m)
            await store.finish_message(m, RoutingOutcome(False, [], []))
            peak = max(peak, wal.stat().st_size if wal.exists() else 0)

    async with Store(path) as store:
        await asyncio.gather(*(producer(store, 80) for _ in range(8)))  # 64 MB in all
        assert (await store.counters())["unmatched"] == 640
    # unbounded it would hold all 64 MB; the margin absorbs a checkpointer slowed by a busy machine
    assert peak < 40 << 20, f"the WAL grew to {peak / 1e6:.1f} MB"
    assert not wal.exists() or wal.stat().st_size == 0  # truncated at close


async def test_named_counters_count_and_show_in_the_books(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        await asyncio.gather(*(store.bump_counter("mqtt_reconnects") for _ in range(5)),
                             store.bump_counter("mqtt_reconnects", 2))
        assert (await store.counters())["mqtt_reconnects"] == 7
    async with Store(tmp_path / "s.db") as store:
        assert (await store.counters())["mqtt_reconnects"] == 7


async def test_memory_store_and_closed_store(tmp_path: Path) -> None:
    store = Store(":memory:")
    with pytest.raises(RuntimeError, match="not open"):
        await store.add_inbox(msg())
    async with store:
        assert await store.add_inbox(msg())
        assert (await store.counters())["ingested"] == 1


async def test_finish_messages_records_many_as_finish_message_does(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        ms = [msg(i) for i in range(6)]
        assert await store.add_inbox_many(ms) == [True] * 6
        unmatched = RoutingOutcome(matched=False, deliveries=[], dead=[])
        delivered = RoutingOutcome(True, [PendingDelivery(ms[1], "p", "s", 0)], [], runs_completed=1)
        dead = RoutingOutcome(True, [], [PendingDeadLetter(ms[2], "p", "t", 0, "transform", "bad")],
                              runs_dead=1)
        await store.finish_message(ms[3], unmatched)  # routed before: skipped in the batch below
        before = store.ops
        await store.finish_messages([(ms[0], unmatched), (ms[1], delivered), (ms[2], dead),
                                     (ms[3], unmatched), (ms[4], unmatched)])
        assert store.ops == before + 1
        await store.finish_messages([])
        books = await store.counters()
        assert (books["unmatched"], books["routed"], books["inbox"]) == (3, 2, 1)
        assert (books["deliveries_queued"], books["dead_letters_open"]) == (1, 1)
        assert books["payloads"] == 2  # ms[5] in the inbox, ms[1] in its delivery
        assert balanced(books)
        assert [u["message_id"] for u in await store.unmatched()] == [ms[4].id, ms[0].id, ms[3].id]
        [row] = await store.fetch_inbox(0)
        assert row.message.id == ms[5].id
