"""lightdb-state, lightdb-stream and logs against a real router's store: what they keep, and
that bad input is a clear, permanent failure."""

from __future__ import annotations

import json

import pytest

from destinations.registry import registry
from pipelines.components import ComponentContext, ComponentError
from pipelines.message import Message
from pipelines.router import Router, RouterSettings

PIPELINES = """
pipelines:
  idle:
    filter: {path: /nothing}
    steps:
      - name: s
        destination: {type: lightdb-stream, version: v1}
"""


@pytest.fixture
async def router(tmp_path):
    (tmp_path / "p.yaml").write_text(PIPELINES)
    async with Router(RouterSettings(pipelines=[tmp_path / "p.yaml"], store_path=tmp_path / "s.db")) as r:
        yield r


def make(type_name: str, router: Router, **params):
    cls = registry.resolve(type_name, "v1")
    ctx = ComponentContext(state=router, stream=router.store, logs=router.store)
    return cls(cls.Params(**params), ctx)


def msg(payload, path="/env", content_type="application/json") -> Message:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Message.new(device_id="d1", project_id="p", path=path, content_type=content_type, payload=data)


async def test_lightdb_state_merges_under_the_path_or_the_message_path(router):
    await make("lightdb-state", router).deliver(msg({"t": 21}, path="/env/room"))
    await make("lightdb-state", router, path="/latest").deliver(msg({"a": {"x": 1}}))
    await make("lightdb-state", router, path="/latest").deliver(msg({"a": {"y": 2}}))
    doc = await router.get_state("p", "d1")
    assert doc == {"env": {"room": {"t": 21}}, "latest": {"a": {"x": 1, "y": 2}}}


async def test_lightdb_stream_appends_with_the_message_time(router):
    m = msg({"c": 1})
    await make("lightdb-stream", router).deliver(m)
    rows = await router.store.query_stream(device_id="d1")
    assert rows[0]["data"] == {"c": 1} and rows[0]["path"] == "/env"
    assert rows[0]["time"] == m.timestamp.isoformat()


async def test_logs_keeps_level_module_msg_and_the_rest_as_metadata(router):
    await make("logs", router).deliver(msg({"level": "warn", "module": "net", "msg": "rssi low", "rssi": -90}))
    rows = await router.store.query_logs()
    assert rows[0]["level"] == "warn" and rows[0]["module"] == "net" and rows[0]["msg"] == "rssi low"
    assert rows[0]["metadata"] == {"rssi": -90}


@pytest.mark.parametrize("type_name", ["lightdb-state", "lightdb-stream", "logs", "batch"])
async def test_json_destinations_refuse_other_content_types_and_bad_json(router, type_name):
    dest = make(type_name, router)
    with pytest.raises(ComponentError, match="takes application/json, got image/png"):
        await dest.deliver(msg(b"\x89PNG", content_type="image/png"))
    with pytest.raises(ComponentError, match="not valid JSON"):
        await dest.deliver(msg(b"{nope"))


async def test_logs_refuses_an_unknown_level_or_a_non_object(router):
    with pytest.raises(ComponentError, match="log level 'loud'"):
        await make("logs", router).deliver(msg({"level": "loud", "msg": "x"}))
    with pytest.raises(ComponentError, match="JSON object"):
        await make("logs", router).deliver(msg([1, 2]))


@pytest.mark.parametrize(("payload", "why"), [
    (b'{"t": NaN}', "NaN"), (b'{"t": 1e400}', "finite"), (b'"\\ud800"', "surrogate"),
    (b"[" * 70 + b"]" * 70, "nested too deeply"),
])
async def test_lightdb_state_refuses_what_json_cannot_serve(router, payload, why):
    with pytest.raises(ComponentError, match=why):
        await make("lightdb-state", router).deliver(msg(payload, path="/env/x"))
    assert await router.get_state("p", "d1") == {}
