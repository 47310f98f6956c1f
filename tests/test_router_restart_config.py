"""A router restarted with edited pipelines: deliveries queued for a step that no longer
exists become dead letters (replayable) instead of waiting forever and holding ingest shut."""

from __future__ import annotations

import asyncio

from pipelines.message import Message
from pipelines.router import Router, RouterSettings

PIPELINE = """
pipelines:
  p:
    filter: {{path: /x}}
    steps:
      - name: {step}
        destination:
          type: webhook
          version: v1
          parameters: {{url: "http://127.0.0.1:9/nothing-listens"}}
        retry: {{max_attempts: 1000, max_elapsed: 3600}}
"""


async def test_deliveries_for_a_renamed_step_become_dead_letters(tmp_path):
    pf = tmp_path / "p.yaml"
    pf.write_text(PIPELINE.format(step="old"))
    settings = RouterSettings(pipelines=[pf], store_path=tmp_path / "s.db", max_queue=3)
    async with Router(settings) as router:
        for i in range(3):
            await router.accept(Message.new(device_id="d", path="/x", content_type="application/json",
                                            payload=b'{"i": %d}' % i))
        for _ in range(100):
            if (await router.store.queue_depths()).get(("p", "old")) == 3:
                break
            await asyncio.sleep(0.05)
        assert (await router.store.queue_depths()) == {("p", "old"): 3}

    pf.write_text(PIPELINE.format(step="new"))  # the step was renamed
    async with Router(RouterSettings(pipelines=[pf], store_path=tmp_path / "s.db", max_queue=3)) as router:
        assert router.overload_reason is None  # ingest is open
        assert await router.store.queue_depths() == {}
        letters = await router.store.dead_letters(pipeline="p", step="old")
        assert len(letters) == 3
        assert all("no longer in the pipelines" in d.error for d in letters)
        books = await router.store.counters()
        assert books["deliveries_dead"] == 3 and books["deliveries_queued"] == 0
