"""Batch ingest: ``Store.add_inbox_many`` and ``Router.accept_many`` (one store operation for
many messages), and ``MqttIngest`` feeding a real Router through it, against a real mosquitto."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import aiomqtt
import pytest

from pipelines.ingest import Overloaded
from pipelines.ingest.mqtt import MqttIngest, MqttSettings
from pipelines.message import Message
from pipelines.router import Router, RouterSettings
from pipelines.store import Store, books_gaps
from tests.mqtt_broker import Mosquitto
from tests.test_mqtt_ingest import wait_for


def msg(i: int, *, id: str | None = None, path: str = "/p") -> Message:
    return Message.new(device_id=f"dev-{i}", path=path, content_type="application/json",
                       payload=b'{"level": "info", "msg": "m%d"}' % i, id=id)


async def inbox_payloads(store: Store) -> dict[str, bytes]:
    return {r.message.id: r.message.payload for r in await store.fetch_inbox(0, 10_000)}


async def test_add_inbox_many_duplicates_within_a_batch_and_against_earlier_ids(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        a, b, c = msg(1), msg(2), msg(3)
        a_again = msg(4, id=a.id)  # same id, other bytes: a duplicate, the first one stays
        before = store.ops
        assert await store.add_inbox_many([a, b, a_again, c]) == [True, True, False, True]
        assert store.ops == before + 1  # one store operation for the whole batch
        d = msg(5)
        assert await store.add_inbox_many([msg(6, id=b.id), d]) == [False, True]
        assert await store.add_inbox_many([]) == []
        assert await inbox_payloads(store) == {m.id: m.payload for m in (a, b, c, d)}
        books = await store.counters()
        assert (books["ingested"], books["duplicates"], books["inbox"]) == (4, 2, 4)
        assert books["payloads"] == 4  # no payload row left behind by a duplicate
        assert not any(books_gaps(books).values())
        # the stored messages are whole: fields and metadata survive the round trip
        row = next(r.message for r in await store.fetch_inbox(0) if r.message.id == c.id)
        assert (row.device_id, row.path, row.content_type, row.timestamp) == \
            (c.device_id, c.path, c.content_type, c.timestamp)


async def test_add_inbox_many_dedup_keys(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        assert await store.add_inbox(msg(0), dedup_key="seen-before")
        batch = [msg(1), msg(2), msg(3), msg(4), msg(5)]
        keys = ["k1", "k1", None, "seen-before", "k2"]
        assert await store.add_inbox_many(batch, keys) == [True, False, True, False, True]
        # the keys stay seen, for single and batch adds alike
        assert not await store.add_inbox(msg(6), dedup_key="k1")
        assert await store.add_inbox_many([msg(7), msg(8)], ["k2", "k3"]) == [False, True]
        # a new key with a duplicate id: not stored, but the key is recorded (as add_inbox does)
        assert await store.add_inbox_many([msg(9, id=batch[0].id)], ["k4"]) == [False]
        assert await store.add_inbox_many([msg(10)], ["k4"]) == [False]
        books = await store.counters()
        assert (books["ingested"], books["duplicates"]) == (5, 6)
        assert not any(books_gaps(books).values())
        with pytest.raises(ValueError, match="2 dedup keys for 1 messages"):
            await store.add_inbox_many([msg(11)], ["a", "b"])


async def test_add_inbox_many_answers_as_add_inbox_one_by_one(tmp_path: Path) -> None:
    """The same random mix of new messages, repeated ids and repeated keys gives the same
    answers, inbox and books through add_inbox one at a time and through add_inbox_many."""
    rng = random.Random(7)
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(40)]
    items = [(msg(i, id=rng.choice(ids)), rng.choice([None, None, "x", "y", f"z{i % 5}"]))
             for i in range(150)]
    async with Store(tmp_path / "one.db") as one, Store(tmp_path / "many.db") as many:
        singles = [await one.add_inbox(m, k) for m, k in items]
        batched: list[bool] = []
        for start in range(0, len(items), 37):
            chunk = items[start:start + 37]
            batched += await many.add_inbox_many([m for m, _ in chunk], [k for _, k in chunk])
        assert batched == singles
        assert 0 < sum(singles) < len(items)
        assert await inbox_payloads(many) == await inbox_payloads(one)
        b1, b2 = await one.counters(), await many.counters()
        for name in ("ingested", "duplicates", "inbox", "payloads"):
            assert b1[name] == b2[name], name


async def test_add_inbox_many_is_all_or_nothing(tmp_path: Path) -> None:
    async with Store(tmp_path / "s.db") as store:
        bad = msg(2)
        bad.id = None  # type: ignore[assignment]  # refused by the table, after msg(1) went in
        with pytest.raises(sqlite3.IntegrityError):
            await store.add_inbox_many([msg(1), bad, msg(3)])
        books = await store.counters()
        assert (books["ingested"], books["inbox"], books["payloads"]) == (0, 0, 0)
        assert await store.add_inbox_many([msg(4)]) == [True]  # and the store carries on


PIPELINE = """
pipelines:
  wanted:
    filter: {path: "/wanted"}
    steps:
      - name: log
        destination: {type: logs, version: v1}
"""


async def test_router_accept_many_routes_every_message_once(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(PIPELINE)
    settings = RouterSettings(pipelines=[tmp_path / "p.yaml"], store_path=tmp_path / "s.db")
    async with Router(settings) as router:
        batch = [msg(i, path="/wanted" if i % 3 == 0 else "/other") for i in range(300)]
        answers = await router.accept_many([*batch, msg(999, id=batch[0].id)])
        assert answers == [True] * 300 + [False]

        async def books() -> dict[str, int]:
            return await router.store.counters()
        deadline = asyncio.get_running_loop().time() + 15
        while (b := await books())["inbox"] or b["deliveries_queued"]:
            assert asyncio.get_running_loop().time() < deadline, b
            await asyncio.sleep(0.02)
        assert (b["ingested"], b["duplicates"], b["routed"], b["unmatched"]) == (300, 1, 100, 200)
        assert b["deliveries_delivered"] == 100 and b["payloads"] == 0
        assert not any(books_gaps(b).values())
        assert router.inbox_depth == 0
        logged = {r["msg"] for r in await router.store.query_logs(1000)}
        assert logged == {f"m{i}" for i in range(0, 300, 3)}


async def test_router_accept_many_overloaded_stores_nothing(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(PIPELINE)
    settings = RouterSettings(pipelines=[tmp_path / "p.yaml"], store_path=tmp_path / "s.db",
                              run_engine=False, max_inbox=3, overload_retry_after=7)
    async with Router(settings) as router:
        assert await router.accept_many([msg(i) for i in range(3)]) == [True] * 3
        await wait_for(lambda: router.overload_reason is not None, 5, "the router to push back")
        with pytest.raises(Overloaded, match="3 messages wait to be routed") as info:
            await router.accept_many([msg(10), msg(11)])
        assert info.value.retry_after == 7
        with pytest.raises(Overloaded):
            await router.accept(msg(12))
        books = await router.store.counters()
        assert (books["ingested"], books["inbox"], books["duplicates"]) == (3, 3, 0)


async def test_mqtt_batches_hold_acks_while_overloaded_and_lose_nothing(tmp_path: Path) -> None:
    """MqttIngest on a real Router (accept_many): while the router pushes back nothing is
    stored or acknowledged; once it takes messages again all are stored, in one or a few
    store operations, and acknowledged (a new session with the same client id gets none)."""
    (tmp_path / "p.yaml").write_text(PIPELINE)
    settings = RouterSettings(pipelines=[tmp_path / "p.yaml"], store_path=tmp_path / "s.db",
                              run_engine=False, max_inbox=1, overload_retry_after=0.05)
    ms = MqttSettings(port=0, client_id="w-batch", max_inflight=100, topic_filter="#")
    with Mosquitto(tmp_path / "broker") as broker:
        ms.port = broker.port
        async with Router(settings) as router:
            await router.accept(msg(0))
            await wait_for(lambda: router.overload_reason is not None, 5, "the router to push back")
            async with MqttIngest(router, ms) as ingest:
                await ingest.wait_subscribed()
                async with aiomqtt.Client("127.0.0.1", broker.port,
                                          protocol=aiomqtt.ProtocolVersion.V5) as dev:
                    for i in range(40):
                        await dev.publish(f"demo/cam-{i % 4}/stream/data", b"b%d" % i, qos=1)
                    await dev.publish("not/the/scheme", b"rejected", qos=1)
                await wait_for(lambda: ingest.stats["overloaded"] >= 2, 5, "retries while overloaded")
                assert (await router.store.counters())["ingested"] == 1
                settings.max_inbox = 1000  # the monitor opens ingest again within 0.25 s
                await wait_for(lambda: ingest.stats["accepted"] == 40, 10, "all forty stored")
                assert ingest.stats["rejected_topic"] == 1
                ops_for_all = router.store.ops
            # a new session under the same client id: the broker has nothing left to send
            async with MqttIngest(router, ms) as again:
                await again.wait_subscribed()
                await asyncio.sleep(0.5)
                assert again.stats["accepted"] == 0
            payloads = sorted(r.message.payload for r in await router.store.fetch_inbox(0, 100))
            assert payloads == sorted([b"b%d" % i for i in range(40)] + [msg(0).payload])
            assert ops_for_all < 60  # far fewer store operations than messages
    with sqlite3.connect(tmp_path / "s.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == 41
