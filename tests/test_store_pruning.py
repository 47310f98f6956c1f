"""Prediction correlations and idempotency keys are pruned once nothing can still need them;
the record tables (stream, logs, unmatched) keep their newest rows up to a configured count."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipelines.message import Message
from pipelines.router import Router, RouterSettings
from pipelines.store import Store


async def test_old_correlations_and_dedup_keys_are_pruned_recent_ones_kept(tmp_path):
    async with Store(tmp_path / "s.db") as store:
        frame = Message.new(device_id="d", path="/images", content_type="image/png", payload=b"x")
        await store.remember_prediction("old", frame)
        await store.add_inbox(Message.new(device_id="d", path="/r", content_type="application/json",
                                          payload=b"{}"), dedup_key="hook:old")
        cutoff = time.time() + 1  # everything so far is older than this
        assert await store.prune_correlations(cutoff) == 2
        await store.remember_prediction("new", frame)
        assert await store.prune_correlations(time.time() - 3600) == 0
        assert await store.lookup_prediction("old") is None
        assert (await store.lookup_prediction("new"))["message_id"] == frame.id
        # a pruned key no longer deduplicates (a day later nothing retries it any more)
        again = Message.new(device_id="d", path="/r", content_type="application/json", payload=b"{}")
        assert await store.add_inbox(again, dedup_key="hook:old")


async def test_record_tables_keep_their_newest_rows_by_arrival_not_device_time(tmp_path):
    async with Store(tmp_path / "s.db") as store:
        for i in range(10):  # the newest rows carry the oldest device timestamps (a backfill)
            await store.append_stream("p", "d", "/temp", 1_000_000.0 - i, {"i": i})
            await store.append_log("p", "d", 1_000.0, "info", "m", f"log {i}", {})
        gone = await store.prune_records({"stream": 3, "logs": None})
        assert gone == {"stream": 7}
        assert [r["data"]["i"] for r in await store.query_stream()] == [9, 8, 7]
        assert len(await store.query_logs()) == 10
        assert await store.prune_records({"stream": 3, "logs": 0}) == {"stream": 0, "logs": 10}
        assert await store.query_logs() == []
        with pytest.raises(ValueError, match="not a record table: inbox"):
            await store.prune_records({"inbox": 1})


async def test_the_router_prunes_unmatched_records_to_the_configured_count(tmp_path):
    pipelines = tmp_path / "p.yaml"
    pipelines.write_text("filter: {path: /images}\nsteps:\n  - name: log\n"
                         "    destination: {type: logs, version: v1}\n")
    settings = RouterSettings(pipelines=[pipelines], store_path=tmp_path / "s.db", keep_unmatched_rows=2,
                              housekeeping_interval=0.1)
    async with Router(settings) as router:
        sent = []
        for i in range(5):
            msg = Message.new(device_id="d", path=f"/other/{i}", content_type="text/plain", payload=b"x")
            await router.accept(msg)
            sent.append(msg.id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = await router.store.unmatched()
            if len(rows) == 2 and not router.inbox_depth:
                break
            await asyncio.sleep(0.05)
        assert [r["message_id"] for r in rows] == [sent[4], sent[3]]


def test_serve_takes_retention_counts_or_all_and_refuses_nonsense(capsys):
    from pipelines.cli import build_parser
    from pipelines.commands.serve import settings_from

    parser, _ = build_parser("serve")
    args = parser.parse_args(["serve", "--keep-stream-rows", "500", "--keep-log-rows", "all"])
    router = settings_from(args).router
    assert (router.keep_stream_rows, router.keep_log_rows, router.keep_unmatched_rows) == (500, None, 10_000)
    for bad in ("-1", "lots"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["serve", "--keep-unmatched-rows", bad])
        assert exc.value.code == 2
        assert f"{bad!r} is not a number of rows (0 or more) or 'all'" in capsys.readouterr().err
