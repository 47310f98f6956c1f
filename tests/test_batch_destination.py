"""``batch``: elements re-enter matching once each, even when the batch is delivered again."""

from __future__ import annotations

import asyncio
import json

import pytest

from destinations.registry import registry
from pipelines.components import ComponentContext, ComponentError
from pipelines.message import Message
from pipelines.router import Router, RouterSettings

PIPELINES = """
pipelines:
  readings:
    filter: {path: /r, content_type: application/json}
    steps:
      - name: store
        destination: {type: lightdb-stream, version: v1}
"""


async def test_a_redelivered_batch_ingests_each_element_once(tmp_path):
    (tmp_path / "p.yaml").write_text(PIPELINES)
    async with Router(RouterSettings(pipelines=[tmp_path / "p.yaml"], store_path=tmp_path / "s.db")) as router:
        cls = registry.resolve("batch", "v1")
        batch = cls(cls.Params(), ComponentContext(reinject=router.accept))
        parent = Message.new(device_id="d1", project_id="p", path="/r", content_type="application/json",
                             payload=json.dumps([{"c": 1}, {"c": 2}, {"c": 3}]).encode())
        await batch.deliver(parent)
        for _ in range(100):  # let the engine route them, so the inbox alone cannot deduplicate
            if (await router.store.counters())["routed"] == 3:
                break
            await asyncio.sleep(0.05)
        await batch.deliver(parent)  # as a retry after a partial failure would
        books = await router.store.counters()
        assert books["ingested"] == 3 and books["duplicates"] == 3
        rows = await router.store.query_stream(device_id="d1")
        assert sorted(r["data"]["c"] for r in rows) == [1, 2, 3]


async def test_a_non_array_is_a_permanent_failure():
    cls = registry.resolve("batch", "v1")
    batch = cls(cls.Params(), ComponentContext(reinject=None))
    with pytest.raises(ComponentError, match="JSON array"):
        await batch.deliver(Message.new(device_id="d", path="/r", content_type="application/json",
                                        payload=b'{"a": 1}'))
