"""Prediction correlations and idempotency keys are pruned once nothing can still need them."""

from __future__ import annotations

import time

from pipelines.message import Message
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
