"""The engine's fast paths give exactly what the plain paths give.

* transformers with a plain ``transform_sync`` (the deterministic built-ins) are called without a
  coroutine; a plug-in transformer that only has ``async transform`` still runs, in the same
  order, with the same dead-letter handling;
* ``request_headers`` (the raw pairs ``post_message`` sends, worked out once per device) equals
  the reference ``build_headers`` for odd ids, devices, paths, content types and user headers
  that replace ours, including ``Ce-Id`` and ``Ce-Time``;
* the serialiser that copies known-safe strings gives the bytes of ``dumps`` for random
  documents (seeded; the seed is printed).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from pipelines.components import ComponentContext, Transformer, TransformError
from pipelines.config import load_pipelines
from pipelines.engine import Engine, build_pipelines, rebuild_message
from pipelines.message import Message, dumps, dumps_with_safe_strings
from pipelines.outbound_http import build_headers, request_headers, rfc3339
from pipelines.secrets import SecretSource
from transformers.registry import registry


class _Upper(Transformer):
    """A plug-in written the old way: only ``async transform``."""

    type = "test-upper-async"
    deterministic = True

    async def transform(self, message: Message) -> Message:
        if message.payload.startswith(b"!"):
            raise TransformError("test-upper-async: refuses '!'")
        return message.evolve(payload=message.payload.upper())


class _Suffix(Transformer):
    type = "test-suffix-sync"
    deterministic = True

    def transform_sync(self, message: Message) -> Message:
        return message.evolve(payload=message.payload + b"-s")


@pytest.fixture
def plugins():
    for cls in (_Upper, _Suffix):
        registry.register(cls)
    yield
    for cls in (_Upper, _Suffix):
        registry._by_type.pop(cls.type, None)


PIPELINE = """
pipelines:
  mixed:
    filter: {path: /t}
    steps:
      - name: up
        transformer: {type: test-upper-async}
      - name: sfx
        transformer: {type: test-suffix-sync}
      - name: out
        destination: {type: logs}
"""


def _engine(tmp_path) -> Engine:
    (tmp_path / "p.yaml").write_text(PIPELINE)
    loaded = load_pipelines([tmp_path / "p.yaml"], SecretSource({}))
    assert not loaded.problems, loaded.problems
    return Engine(build_pipelines(loaded.pipelines, lambda pc, sc: ComponentContext()))


async def test_async_only_and_sync_transformers_run_in_order(plugins, tmp_path):
    engine = _engine(tmp_path)
    steps = engine.pipelines[0].steps
    assert steps[0].run_sync is None and steps[1].run_sync is not None
    msg = Message.new(device_id="d", path="/t", content_type="text/plain", payload=b"abc")
    outcome, _ = await engine.route(msg)
    assert [d.message.payload for d in outcome.deliveries] == [b"ABC-s"]
    assert outcome.runs_completed == 1 and not outcome.dead
    # the delivery worker's rebuild takes the same two paths
    again = await rebuild_message(engine.pipelines[0], 2, "out", msg)
    assert again.payload == b"ABC-s"
    # the base class's transform() calls transform_sync
    assert (await steps[1].transformer.transform(msg)).payload == b"abc-s"


async def test_a_failing_async_only_transformer_still_makes_a_dead_letter(plugins, tmp_path):
    engine = _engine(tmp_path)
    msg = Message.new(device_id="d", path="/t", content_type="text/plain", payload=b"!no")
    outcome, _ = await engine.route(msg)
    assert not outcome.deliveries and outcome.runs_dead == 1
    assert outcome.dead[0].step == "up" and "refuses" in outcome.dead[0].error


def test_a_transformer_with_neither_method_says_so():
    class Neither(Transformer):
        type = "test-neither"

    with pytest.raises(NotImplementedError, match="Neither implements neither"):
        Neither(Neither.Params(), ComponentContext()).transform_sync(
            Message.new(device_id="d", path="/t", content_type="text/plain", payload=b""))


ODD = ["cam-1", "cam 2", 'q"uote', "100%", "é-device", "tab\there", "a/b"]
USER_SETS = [
    None,
    {},
    {"Authorization": "Bearer r8_x"},
    {"ce-id": "mine", "CE-TIME": "then", "content-type": "application/x"},
    {"Ce-Source": "override", "X-Extra": "1", "x-extra": "2"},
]


@pytest.mark.parametrize("user", USER_SETS)
def test_request_headers_equal_the_reference_build(user):
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(200):
        msg = Message.new(device_id=rng.choice(ODD), project_id=rng.choice(ODD),
                          path=rng.choice(["/images", "images", "/a b/c", "/é"]),
                          content_type=rng.choice(["image/png", "application/json; charset=utf-8"]),
                          payload=b"x", id=rng.choice([*ODD, None]),  # type: ignore[arg-type]
                          timestamp=datetime(2026, 12, 4, 1, 2, 3, rng.randrange(1_000_000), tzinfo=UTC))
        assert request_headers(msg, user) == build_headers(msg, user).raw


def test_rfc3339_for_utc_naive_and_other_zones():
    assert rfc3339(datetime(2026, 1, 1, 1, 2, 3, 456)) == "2026-01-01T01:02:03.000456Z"
    assert rfc3339(datetime(2026, 1, 1, 1, 2, 3, tzinfo=UTC)) == "2026-01-01T01:02:03Z"
    assert rfc3339(datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=2)))) == "2025-12-31T23:00:00Z"


def _random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.35:
        return rng.choice([0, -7, 2.5, 1e300, True, False, None, "", "plain", 'q"uote', "back\\slash",
                           "é\n\u2028", "\x00ctl"])
    if r < 0.65:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["a", "b", "é", 'k"', "", "input"]): _random_json(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def test_safe_string_serialiser_gives_the_bytes_of_dumps():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(2000):
        safe = "data:image/png;base64," + "QUJD" * rng.randrange(1, 50)
        doc = {"version": "v", "input": {"image": safe, "other": _random_json(rng)}, "x": _random_json(rng)}
        expected = dumps(doc)
        assert dumps_with_safe_strings(doc, (safe,)) == expected
        assert dumps_with_safe_strings(doc, (safe,), (safe.encode("ascii"),)) == expected


async def test_the_default_pipeline_request_is_the_same_through_every_path():
    """change-content-type -> data-url -> embed-in-json -> json-patch, as pipeline.yaml has it:
    the body the engine makes (safe strings reused as bytes) parses to what a plain build gives."""
    import base64
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    loaded = load_pipelines([root / "pipeline.yaml"], SecretSource({"REPLICATE_TOKEN": "Bearer t"}))
    engine = Engine(build_pipelines(loaded.pipelines, lambda pc, sc: ComponentContext()))
    png = bytes(random.Random(5).randrange(256) for _ in range(5000))
    msg = Message.new(device_id="cam", project_id="p", path="/images", content_type="application/octet-stream",
                      payload=png)
    outcome, _ = await engine.route(msg)
    (delivery,) = [d for d in outcome.deliveries if d.pipeline == "camera-caption"]
    body = json.loads(delivery.message.payload)
    assert body["input"]["image"] == "data:image/png;base64," + base64.b64encode(png).decode()
    assert delivery.message.payload == dumps(body)
    rebuilt = await rebuild_message(engine.by_name["camera-caption"], 4, "predict", msg)
    assert rebuilt.payload == delivery.message.payload
